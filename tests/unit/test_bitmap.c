/*
 * Unit tests for src/util/bitmap.c.
 *
 * Range operations are checked exhaustively against a plain bool array on a
 * bitmap whose size is not a multiple of the word size, so every boundary
 * case (start and end at, before and after a word edge, the tail word) is
 * covered.  The atomic pair is checked under real concurrency: two threads
 * OR ranges in while the main thread keeps draining, and the drained union
 * must equal the union computed single-threaded afterwards.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "util/bitmap.h"

#define NB 200   /* 3 words + 8 bits: crosses words and has a tail */

static void check_same(const unsigned long *map, const bool *ref, uint64_t nbits)
{
    for (uint64_t i = 0; i < nbits; i++)
        if (bitmap_test(map, i) != ref[i])
            fail_msg("bit %llu is %d, expected %d", (unsigned long long)i,
                     bitmap_test(map, i), ref[i]);
}

/* Bits past nbits in the last word must stay clear. */
static void check_tail_clear(const unsigned long *map, uint64_t nbits)
{
    uint64_t words = BITMAP_WORDS(nbits);

    if (nbits % BITMAP_BITS_PER_LONG)
        assert_int_equal(map[words - 1] >> (nbits % BITMAP_BITS_PER_LONG), 0);
}

static void test_single_bits(void **state)
{
    unsigned long *map = bitmap_new(NB);
    uint64_t idx[] = { 0, 1, 62, 63, 64, 65, 127, 128, 191, 192, NB - 1 };

    assert_int_equal(bitmap_bytes(NB), 4 * sizeof(unsigned long));
    assert_int_equal(bitmap_count(map, NB), 0);
    for (size_t k = 0; k < sizeof(idx) / sizeof(idx[0]); k++) {
        assert_false(bitmap_test(map, idx[k]));
        bitmap_set(map, idx[k]);
        assert_true(bitmap_test(map, idx[k]));
        assert_int_equal(bitmap_count(map, NB), k + 1);
    }
    /* Setting twice does not count twice. */
    bitmap_set(map, 64);
    assert_int_equal(bitmap_count(map, NB), sizeof(idx) / sizeof(idx[0]));
    for (size_t k = 0; k < sizeof(idx) / sizeof(idx[0]); k++) {
        bitmap_clear(map, idx[k]);
        assert_false(bitmap_test(map, idx[k]));
    }
    assert_int_equal(bitmap_count(map, NB), 0);
    bitmap_free(map);
}

/* Every (start, n) on a bitmap that starts half full in a known pattern. */
static void test_ranges_exhaustive(void **state)
{
    unsigned long *map = bitmap_new(NB);
    bool ref[NB];

    for (int op = 0; op < 2; op++) {
        for (uint64_t start = 0; start < NB; start++) {
            for (uint64_t n = 0; start + n <= NB; n++) {
                /* Pattern: every third bit set. */
                bitmap_zero(map, NB);
                for (uint64_t i = 0; i < NB; i++) {
                    ref[i] = i % 3 == 0;
                    if (ref[i])
                        bitmap_set(map, i);
                }
                if (op == 0) {
                    bitmap_set_range(map, start, n);
                    for (uint64_t i = start; i < start + n; i++)
                        ref[i] = true;
                } else {
                    bitmap_clear_range(map, start, n);
                    for (uint64_t i = start; i < start + n; i++)
                        ref[i] = false;
                }
                check_same(map, ref, NB);
                check_tail_clear(map, NB);
                uint64_t c = 0;
                for (uint64_t i = 0; i < NB; i++)
                    c += ref[i];
                assert_int_equal(bitmap_count(map, NB), c);
            }
        }
    }
    bitmap_free(map);
}

static void test_fill_zero_tail(void **state)
{
    uint64_t sizes[] = { 1, 63, 64, 65, 128, NB };

    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        uint64_t nb = sizes[k];
        unsigned long *map = bitmap_new(nb);

        bitmap_fill(map, nb);
        assert_int_equal(bitmap_count(map, nb), nb);
        check_tail_clear(map, nb);
        assert_int_equal(bitmap_next_clear(map, nb, 0), nb);
        /* A full-length set_range must not spill into the tail either. */
        bitmap_zero(map, nb);
        assert_int_equal(bitmap_count(map, nb), 0);
        bitmap_set_range(map, 0, nb);
        assert_int_equal(bitmap_count(map, nb), nb);
        check_tail_clear(map, nb);
        bitmap_free(map);
    }
}

static void test_next_set_clear(void **state)
{
    unsigned long *map = bitmap_new(NB);

    /* Empty: no set bit anywhere, first clear bit is start itself. */
    assert_int_equal(bitmap_next_set(map, NB, 0), NB);
    assert_int_equal(bitmap_next_set(map, NB, NB - 1), NB);
    assert_int_equal(bitmap_next_clear(map, NB, 0), 0);
    assert_int_equal(bitmap_next_clear(map, NB, NB - 1), NB - 1);
    /* Start at or past the end. */
    assert_int_equal(bitmap_next_set(map, NB, NB), NB);
    assert_int_equal(bitmap_next_clear(map, NB, NB), NB);
    assert_int_equal(bitmap_next_clear(map, NB, NB + 1000), NB);

    bitmap_set(map, 0);
    bitmap_set(map, 63);
    bitmap_set(map, 64);
    bitmap_set(map, NB - 1);
    assert_int_equal(bitmap_next_set(map, NB, 0), 0);
    assert_int_equal(bitmap_next_set(map, NB, 1), 63);
    assert_int_equal(bitmap_next_set(map, NB, 63), 63);
    assert_int_equal(bitmap_next_set(map, NB, 64), 64);
    assert_int_equal(bitmap_next_set(map, NB, 65), NB - 1);
    assert_int_equal(bitmap_next_set(map, NB, NB - 1), NB - 1);

    /* Full except a few: next_clear must find them and never the tail. */
    bitmap_fill(map, NB);
    bitmap_clear(map, 64);
    bitmap_clear(map, 130);
    assert_int_equal(bitmap_next_clear(map, NB, 0), 64);
    assert_int_equal(bitmap_next_clear(map, NB, 64), 64);
    assert_int_equal(bitmap_next_clear(map, NB, 65), 130);
    assert_int_equal(bitmap_next_clear(map, NB, 131), NB);
    assert_int_equal(bitmap_next_set(map, NB, 64), 65);

    /* Walking with next_set visits exactly the set bits. */
    bitmap_zero(map, NB);
    for (uint64_t i = 0; i < NB; i += 7)
        bitmap_set(map, i);
    uint64_t seen = 0, expect = 0;
    for (uint64_t i = bitmap_next_set(map, NB, 0); i < NB;
         i = bitmap_next_set(map, NB, i + 1)) {
        assert_int_equal(i, expect);
        expect += 7;
        seen++;
    }
    assert_int_equal(seen, (NB + 6) / 7);
    bitmap_free(map);
}

static void test_move_counts_newly_set(void **state)
{
    unsigned long *dst = bitmap_new(NB), *src = bitmap_new(NB);

    bitmap_set(dst, 1);
    bitmap_set(dst, 2);
    bitmap_set(src, 2);
    bitmap_set(src, 3);
    bitmap_set(src, 150);
    assert_int_equal(bitmap_move_atomic(dst, src, NB), 2);
    assert_int_equal(bitmap_count(src, NB), 0);
    assert_int_equal(bitmap_count(dst, NB), 4);
    assert_true(bitmap_test(dst, 3));
    assert_true(bitmap_test(dst, 150));
    /* Nothing left to move. */
    assert_int_equal(bitmap_move_atomic(dst, src, NB), 0);
    /* Atomic set behaves like the plain one on ranges across words. */
    bitmap_set_range_atomic(src, 60, 70);
    assert_int_equal(bitmap_count(src, NB), 70);
    assert_int_equal(bitmap_next_set(src, NB, 0), 60);
    assert_int_equal(bitmap_next_clear(src, NB, 60), 130);
    check_tail_clear(src, NB);
    bitmap_free(dst);
    bitmap_free(src);
}

/* ---------------------------------------------------------------- concurrency */

#define CNB (1u << 16)
#define OPS 200000

struct setter {
    pthread_t tid;
    unsigned long *log;
    uint32_t seed;
    int *done;
};

/* Deterministic range for op i of a setter: replayed single-threaded later. */
static void op_range(uint32_t seed, uint32_t i, uint64_t *start, uint64_t *n)
{
    uint32_t h = (seed ^ i) * 2654435761u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    *start = h % CNB;
    *n = 1 + (h >> 16) % 130;
    if (*start + *n > CNB)
        *n = CNB - *start;
}

static void *setter_main(void *arg)
{
    struct setter *s = arg;

    for (uint32_t i = 0; i < OPS; i++) {
        uint64_t start, n;
        op_range(s->seed, i, &start, &n);
        bitmap_set_range_atomic(s->log, start, n);
    }
    __atomic_add_fetch(s->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void test_atomic_concurrent_no_loss(void **state)
{
    unsigned long *log = bitmap_new(CNB), *dst = bitmap_new(CNB);
    unsigned long *ref = bitmap_new(CNB);
    struct setter s[2];
    int done = 0;
    uint64_t moved = 0, rounds = 0;

    for (int t = 0; t < 2; t++) {
        s[t] = (struct setter){ .log = log, .seed = 0x9e3779b9u * (uint32_t)(t + 1),
                                .done = &done };
        assert_int_equal(pthread_create(&s[t].tid, NULL, setter_main, &s[t]), 0);
    }
    /* Drain while the setters run; they do a fixed amount of work, so this ends. */
    while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) < 2) {
        moved += bitmap_move_atomic(dst, log, CNB);
        rounds++;
    }
    for (int t = 0; t < 2; t++)
        pthread_join(s[t].tid, NULL);
    moved += bitmap_move_atomic(dst, log, CNB);
    assert_int_equal(bitmap_count(log, CNB), 0);

    for (int t = 0; t < 2; t++)
        for (uint32_t i = 0; i < OPS; i++) {
            uint64_t start, n;
            op_range(s[t].seed, i, &start, &n);
            bitmap_set_range(ref, start, n);
        }
    /* Checksum first (cheap to read in a failure), then exact equality. */
    assert_int_equal(bitmap_count(dst, CNB), bitmap_count(ref, CNB));
    assert_int_equal(moved, bitmap_count(ref, CNB));
    assert_memory_equal(dst, ref, bitmap_bytes(CNB));
    print_message("# %llu drain rounds ran concurrently with the setters\n",
                  (unsigned long long)rounds);
    bitmap_free(log);
    bitmap_free(dst);
    bitmap_free(ref);
}

/*
 * Every bit is set exactly once, so a bit lost by a non-atomic drain is
 * never set again and the final count shows it.  The two setters interleave
 * (even and odd bits) so they share words, and the drainer follows them,
 * draining only the few words they are writing, to make the race likely.
 */
#define DNB (1u << 20)

struct walker {
    pthread_t tid;
    unsigned long *log;
    uint64_t parity;
    uint64_t pos;     /* atomic: last bit set */
    int *done;
};

static void *walker_main(void *arg)
{
    struct walker *s = arg;

    for (uint64_t b = s->parity; b < DNB; b += 2) {
        bitmap_set_range_atomic(s->log, b, 1);
        __atomic_store_n(&s->pos, b, __ATOMIC_RELAXED);
    }
    __atomic_add_fetch(s->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void test_atomic_drain_no_loss(void **state)
{
    unsigned long *log = bitmap_new(DNB), *dst = bitmap_new(DNB);
    struct walker s[2];
    int done = 0;
    uint64_t moved = 0, rounds = 0, words = BITMAP_WORDS(DNB);

    for (int t = 0; t < 2; t++) {
        s[t] = (struct walker){ .log = log, .parity = (uint64_t)t, .done = &done };
        assert_int_equal(pthread_create(&s[t].tid, NULL, walker_main, &s[t]), 0);
    }
    while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) < 2) {
        uint64_t a = __atomic_load_n(&s[0].pos, __ATOMIC_RELAXED);
        uint64_t b = __atomic_load_n(&s[1].pos, __ATOMIC_RELAXED);
        uint64_t w = (a < b ? a : b) / BITMAP_BITS_PER_LONG;
        uint64_t w0 = w > 2 ? w - 2 : 0, nw = words - w0 < 8 ? words - w0 : 8;

        moved += bitmap_move_atomic(dst + w0, log + w0, nw * BITMAP_BITS_PER_LONG);
        rounds++;
    }
    for (int t = 0; t < 2; t++)
        pthread_join(s[t].tid, NULL);
    moved += bitmap_move_atomic(dst, log, DNB);
    assert_int_equal(bitmap_count(log, DNB), 0);
    assert_int_equal(bitmap_count(dst, DNB), DNB);
    assert_int_equal(moved, DNB);
    print_message("# %llu window drains ran concurrently with the setters\n",
                  (unsigned long long)rounds);
    bitmap_free(log);
    bitmap_free(dst);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_bits),
        cmocka_unit_test(test_ranges_exhaustive),
        cmocka_unit_test(test_fill_zero_tail),
        cmocka_unit_test(test_next_set_clear),
        cmocka_unit_test(test_move_counts_newly_set),
        cmocka_unit_test(test_atomic_concurrent_no_loss),
        cmocka_unit_test(test_atomic_drain_no_loss),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
