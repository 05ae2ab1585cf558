/*
 * Unit tests for src/util/zero.c.
 *
 * Every implementation this CPU can run (buf_is_zero_get) gets the same
 * checks: an all-zero page is zero; a page with one non-zero byte is not,
 * for every offset of that byte and several byte values (a checker that
 * only looked at some lanes or some bits would miss one); unaligned
 * pointers and odd lengths are handled exactly, including non-zero bytes
 * just outside the range, which must be ignored.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "util/zero.h"

static const char *const impls[] = { "avx512", "avx2", "sse2", "scalar" };
#define N_IMPLS (sizeof(impls) / sizeof(impls[0]))
#define PAGE 4096

static unsigned char *alloc_aligned(size_t len)
{
    void *p = NULL;

    assert_int_equal(posix_memalign(&p, 64, len), 0);
    memset(p, 0, len);
    return p;
}

static void test_choice(void **state)
{
    const char *chosen = buf_is_zero_impl();
    size_t k;

    assert_non_null(buf_is_zero_get("scalar"));
    assert_null(buf_is_zero_get("mmx"));
    /* The chosen one is the widest this CPU supports. */
    for (k = 0; k < N_IMPLS; k++)
        if (buf_is_zero_get(impls[k]))
            break;
    assert_true(k < N_IMPLS);
    assert_string_equal(chosen, impls[k]);
    print_message("# buf_is_zero uses %s\n", chosen);
}

static void check_page(buf_is_zero_fn fn, const char *name)
{
    static const unsigned char vals[] = { 0x01, 0x80, 0xff, 0x10 };
    unsigned char *buf = alloc_aligned(PAGE);

    assert_true(fn(buf, PAGE));
    for (size_t off = 0; off < PAGE; off++) {
        for (size_t v = 0; v < sizeof(vals); v++) {
            buf[off] = vals[v];
            if (fn(buf, PAGE))
                fail_msg("%s: byte %zu = %#x reported as zero", name, off, vals[v]);
            buf[off] = 0;
        }
    }
    /* Still zero after all that (nothing left behind). */
    assert_true(fn(buf, PAGE));
    /* Every 64-multiple length up to a page, with the last byte set. */
    for (size_t len = 64; len <= PAGE; len += 64) {
        assert_true(fn(buf, len));
        buf[len - 1] = 1;
        assert_false(fn(buf, len));
        buf[len - 1] = 0;
    }
    free(buf);
}

static void test_page_every_offset(void **state)
{
    int tested = 0;

    for (size_t k = 0; k < N_IMPLS; k++) {
        buf_is_zero_fn fn = buf_is_zero_get(impls[k]);
        if (!fn) {
            print_message("# %s not supported by this CPU, not tested\n", impls[k]);
            continue;
        }
        check_page(fn, impls[k]);
        tested++;
    }
    /* The public entry point too. */
    check_page(buf_is_zero, "buf_is_zero");
    assert_true(tested >= 1);
}

static void check_odd(buf_is_zero_fn fn, const char *name)
{
    enum { SLACK = 80, MAXLEN = 300 };
    unsigned char *buf = alloc_aligned(SLACK + MAXLEN + SLACK);

    for (size_t off = 1; off < SLACK; off++) {
        for (size_t len = 0; len <= MAXLEN; len++) {
            unsigned char *p = buf + off;

            /* Non-zero neighbours outside [p, p+len) must not matter. */
            p[-1] = 0xaa;
            p[len] = 0xbb;
            if (!fn(p, len))
                fail_msg("%s: off %zu len %zu: zero range reported non-zero", name, off, len);
            if (len) {
                size_t pos[] = { 0, len / 2, len - 1 };
                for (size_t q = 0; q < 3; q++) {
                    p[pos[q]] = 1;
                    if (fn(p, len))
                        fail_msg("%s: off %zu len %zu: byte %zu missed", name, off, len,
                                 pos[q]);
                    p[pos[q]] = 0;
                }
            }
            p[-1] = 0;
            p[len] = 0;
        }
    }
    /* Aligned pointer, lengths that are not multiples of 64: every position. */
    for (size_t len = 1; len < 200; len += 13) {
        for (size_t i = 0; i < len; i++) {
            buf[i] = 0x40;
            if (fn(buf, len))
                fail_msg("%s: aligned len %zu: byte %zu missed", name, len, i);
            buf[i] = 0;
        }
        buf[len] = 1;
        assert_true(fn(buf, len));
        buf[len] = 0;
    }
    free(buf);
}

static void test_unaligned_odd_lengths(void **state)
{
    for (size_t k = 0; k < N_IMPLS; k++) {
        buf_is_zero_fn fn = buf_is_zero_get(impls[k]);
        if (fn)
            check_odd(fn, impls[k]);
    }
    check_odd(buf_is_zero, "buf_is_zero");
}

static void test_large_buffer(void **state)
{
    size_t len = 1 << 20;
    unsigned char *buf = alloc_aligned(len);

    for (size_t k = 0; k < N_IMPLS; k++) {
        buf_is_zero_fn fn = buf_is_zero_get(impls[k]);
        if (!fn)
            continue;
        assert_true(fn(buf, len));
        buf[len - 1] = 1;
        assert_false(fn(buf, len));
        buf[len - 1] = 0;
        buf[len / 2 + 17] = 2;
        assert_false(fn(buf, len));
        buf[len / 2 + 17] = 0;
    }
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_choice),
        cmocka_unit_test(test_page_every_offset),
        cmocka_unit_test(test_unaligned_odd_lengths),
        cmocka_unit_test(test_large_buffer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
