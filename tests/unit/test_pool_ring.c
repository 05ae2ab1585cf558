/*
 * Unit tests for the rings of src/util/pool.c (spsc, mpsc), on their
 * own.  Only against liblivemig: the mutex model (bench/pool_mutex.c) has
 * no rings.  The pool API is tested by test_pool.c on both models.
 *
 * Full and empty are detected exactly, items come out in order, and all of
 * it holds when the free-running indices cross 2^32 (every ring test starts
 * a few items before the wrap).  The MPSC ring gets a stress run: several
 * producers push tagged items through a small ring (so "full" is hit
 * constantly) while the consumer pops; the sum and xor of everything pushed
 * and popped must match, every item must arrive exactly once and each
 * producer's items in the order it pushed them.
 *
 * No test sleeps to synchronise: threads meet on atomics, and every wait
 * has a deadline that fails the test.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "util/pool.h"
#include "util/time.h"

#define WRAP_START (UINT32_MAX - 5u)
#define DEADLINE_MS 20000

static void *item_of(uint64_t v)
{
    return (void *)(uintptr_t)(v + 1);  /* never NULL */
}

static uint64_t value_of(void *p)
{
    return (uint64_t)(uintptr_t)p - 1;
}

/* ------------------------------------------------------------------ SPSC */

static void spsc_check(uint32_t size, uint32_t start)
{
    spsc r;
    uint64_t in = 0, out = 0;

    assert_int_equal(spsc_init(&r, size, start), 0);
    assert_null(spsc_peek(&r));
    assert_int_equal(spsc_count(&r), 0);
    /* Several full/empty rounds so head and tail both cross 2^32. */
    for (int round = 0; round < 8; round++) {
        for (uint32_t k = 0; k < size; k++)
            assert_true(spsc_push(&r, item_of(in++)));
        assert_int_equal(spsc_count(&r), size);
        assert_false(spsc_push(&r, item_of(999999)));
        for (uint32_t k = 0; k < size; k++) {
            void *p = spsc_peek(&r);

            assert_non_null(p);
            assert_ptr_equal(spsc_peek(&r), p);     /* peek leaves it */
            assert_int_equal(value_of(p), out++);
            spsc_pop(&r);
            /* Room again after every pop. */
            assert_true(spsc_push(&r, item_of(in++)));
            assert_false(spsc_push(&r, item_of(999999)));
        }
        while (spsc_peek(&r)) {
            assert_int_equal(value_of(spsc_peek(&r)), out++);
            spsc_pop(&r);
        }
        assert_int_equal(spsc_count(&r), 0);
        assert_int_equal(in, out);
    }
    spsc_destroy(&r);
}

static void test_spsc_full_empty(void **state)
{
    spsc_check(1, 0);
    spsc_check(4, 0);
    spsc_check(16, 12345);
}

static void test_spsc_wrap(void **state)
{
    for (uint32_t s = 1; s <= 64; s *= 2) {
        spsc_check(s, WRAP_START);
        spsc_check(s, UINT32_MAX);
        spsc_check(s, UINT32_MAX - s + 1);
    }
}

static void test_ring_bad_size(void **state)
{
    spsc s;
    mpsc m;

    assert_int_equal(spsc_init(&s, 0, 0), -EINVAL);
    assert_int_equal(spsc_init(&s, 3, 0), -EINVAL);
    assert_int_equal(mpsc_init(&m, 1, 0), -EINVAL);     /* needs two cells */
    assert_int_equal(mpsc_init(&m, 6, 0), -EINVAL);
}

/* ------------------------------------------------------------------ MPSC */

static void mpsc_check(uint32_t size, uint32_t start)
{
    mpsc r;
    uint64_t in = 0, out = 0;

    assert_int_equal(mpsc_init(&r, size, start), 0);
    assert_null(mpsc_pop(&r));
    for (int round = 0; round < 8; round++) {
        for (uint32_t k = 0; k < size; k++)
            assert_true(mpsc_push(&r, item_of(in++)));
        assert_false(mpsc_push(&r, item_of(999999)));
        for (uint32_t k = 0; k < size / 2; k++)
            assert_int_equal(value_of(mpsc_pop(&r)), out++);
        for (uint32_t k = 0; k < size / 2; k++)
            assert_true(mpsc_push(&r, item_of(in++)));
        assert_false(mpsc_push(&r, item_of(999999)));
        for (void *p; (p = mpsc_pop(&r));)
            assert_int_equal(value_of(p), out++);
        assert_int_equal(in, out);
    }
    mpsc_destroy(&r);
}

static void test_mpsc_full_empty(void **state)
{
    mpsc_check(2, 0);
    mpsc_check(8, 77);
}

static void test_mpsc_wrap(void **state)
{
    for (uint32_t s = 2; s <= 64; s *= 2) {
        mpsc_check(s, WRAP_START);
        mpsc_check(s, UINT32_MAX);
        mpsc_check(s, UINT32_MAX - s + 1);
    }
}

#define STRESS_PRODUCERS 4
#define STRESS_ITEMS 200000   /* per producer */

typedef struct stress {
    mpsc ring;
    atomic_int go;
    uint64_t sum[STRESS_PRODUCERS], xor[STRESS_PRODUCERS];
    atomic_bool timed_out;
} stress;

typedef struct stress_arg {
    stress *s;
    unsigned id;
} stress_arg;

/* Item: producer id in the top byte, sequence below, scrambled payload bits. */
static uint64_t stress_item(unsigned id, uint64_t seq)
{
    return ((uint64_t)id << 56) | (seq << 16) | ((seq * 0x9e37u + id) & 0xffff);
}

static void *stress_producer(void *arg)
{
    stress_arg *a = arg;
    stress *s = a->s;
    int64_t deadline = time_now_ms() + DEADLINE_MS;

    while (!atomic_load(&s->go))
        sched_yield();
    for (uint64_t i = 0; i < STRESS_ITEMS; i++) {
        uint64_t v = stress_item(a->id, i);

        while (!mpsc_push(&s->ring, item_of(v))) {
            if (time_now_ms() > deadline) {
                atomic_store(&s->timed_out, true);
                return NULL;
            }
            sched_yield();
        }
        s->sum[a->id] += v;
        s->xor[a->id] ^= v;
    }
    return NULL;
}

static void test_mpsc_stress(void **state)
{
    stress *s = calloc(1, sizeof(*s));
    stress_arg args[STRESS_PRODUCERS];
    pthread_t th[STRESS_PRODUCERS];
    uint64_t next[STRESS_PRODUCERS] = { 0 };
    uint64_t sum = 0, xor = 0, n = 0, want_sum = 0, want_xor = 0;
    int64_t deadline = time_now_ms() + DEADLINE_MS;

    assert_non_null(s);
    /* 8 cells, starting so the indices cross 2^32 early in the run. */
    assert_int_equal(mpsc_init(&s->ring, 8, UINT32_MAX - 1000), 0);
    for (unsigned i = 0; i < STRESS_PRODUCERS; i++) {
        args[i] = (stress_arg){ s, i };
        assert_int_equal(pthread_create(&th[i], NULL, stress_producer, &args[i]), 0);
    }
    atomic_store(&s->go, 1);
    while (n < (uint64_t)STRESS_PRODUCERS * STRESS_ITEMS) {
        void *p = mpsc_pop(&s->ring);

        if (!p) {
            if (time_now_ms() > deadline || atomic_load(&s->timed_out))
                break;
            sched_yield();
            continue;
        }
        uint64_t v = value_of(p);
        unsigned id = (unsigned)(v >> 56);

        assert_true(id < STRESS_PRODUCERS);
        /* Per producer, FIFO and nothing lost or doubled. */
        if (v != stress_item(id, next[id]))
            fail_msg("producer %u: got %#llx, expected item %llu", id,
                     (unsigned long long)v, (unsigned long long)next[id]);
        next[id]++;
        sum += v;
        xor ^= v;
        n++;
    }
    for (unsigned i = 0; i < STRESS_PRODUCERS; i++)
        pthread_join(th[i], NULL);
    assert_false(atomic_load(&s->timed_out));
    assert_int_equal(n, (uint64_t)STRESS_PRODUCERS * STRESS_ITEMS);
    assert_null(mpsc_pop(&s->ring));
    for (unsigned i = 0; i < STRESS_PRODUCERS; i++) {
        want_sum += s->sum[i];
        want_xor ^= s->xor[i];
    }
    assert_int_equal(sum, want_sum);
    assert_int_equal(xor, want_xor);
    mpsc_destroy(&s->ring);
    free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spsc_full_empty),
        cmocka_unit_test(test_spsc_wrap),
        cmocka_unit_test(test_ring_bad_size),
        cmocka_unit_test(test_mpsc_full_empty),
        cmocka_unit_test(test_mpsc_wrap),
        cmocka_unit_test(test_mpsc_stress),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
