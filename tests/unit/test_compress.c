/*
 * Unit tests for src/compress/compress.c.
 *
 * Source: text and zero pages come back compressed as complete zlib
 * streams (plain zlib uncompress() restores them), random pages come back
 * compressed=false carrying the page itself; submit takes a copy (the
 * caller may overwrite its page at once); every page is emitted exactly
 * once, on the polling thread, through 1 and 2 threads; the counters add up;
 * bad arguments, interrupt and "nothing polled" give clear errors.
 *
 * Destination: what the source produced decompresses to the original
 * pages; corrupt, truncated, over-long, under-long, trailing-garbage and
 * oversize records fail with a message naming the byte offset -- and never
 * write outside the destination page (guard bytes around it stay intact).
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <cmocka.h>

#include "compress/compress.h"

#define PAGE COMPRESS_PAGE_SIZE

enum { KIND_TEXT, KIND_ZERO, KIND_RANDOM, KIND_MIXED };

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void fill_page(unsigned char *p, int kind, uint64_t seed)
{
    static const char *const words[] = {
        "migration", "page", "dirty", "the", "of", "guest", "memory", "a", "stream",
        "compress", "thread", "ring", "worker", "and", "to", "bitmap", "precopy",
    };
    uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
    size_t i = 0;

    switch (kind) {
    case KIND_ZERO:
        memset(p, 0, PAGE);
        break;
    case KIND_RANDOM:
        for (i = 0; i < PAGE; i += 8) {
            uint64_t v = rng_next(&s);
            memcpy(p + i, &v, 8);
        }
        break;
    case KIND_MIXED:
        /* Mostly zero with a few numbers: very compressible. */
        memset(p, 0, PAGE);
        for (i = 0; i < 64; i++)
            p[rng_next(&s) % PAGE] = (unsigned char)rng_next(&s);
        break;
    default:
        while (i < PAGE) {
            const char *w = words[rng_next(&s) % (sizeof(words) / sizeof(words[0]))];
            size_t n = strlen(w);

            for (size_t k = 0; k <= n && i < PAGE; k++)
                p[i++] = k < n ? (unsigned char)w[k] : ' ';
        }
    }
}

/* ------------------------------------------------------------------ emit capture */

typedef struct result {
    unsigned count;          /* times emitted: must end as 1 */
    bool compressed;
    uint32_t len;
    unsigned char data[COMPRESS_BOUND];
} result;

typedef struct capture {
    result *r;
    size_t n;
    pthread_t owner;
    bool wrong_thread;
    bool bad_tag;
    uint64_t emitted;
    int fail_after;          /* emit returns -EIO on this call (0 = never) */
} capture;

static int capture_emit(void *opaque, uint64_t tag, const void *data, uint32_t len,
                        bool compressed)
{
    capture *c = opaque;

    if (!pthread_equal(pthread_self(), c->owner))
        c->wrong_thread = true;
    if (tag >= c->n || len > (compressed ? PAGE - 1 : PAGE)) {
        c->bad_tag = true;
        return 0;
    }
    c->r[tag].count++;
    c->r[tag].compressed = compressed;
    c->r[tag].len = len;
    memcpy(c->r[tag].data, data, len);
    c->emitted++;
    if (c->fail_after && c->emitted == (uint64_t)c->fail_after)
        return -EIO;
    return 0;
}

static void capture_init(capture *c, size_t n)
{
    memset(c, 0, sizeof(*c));
    c->r = calloc(n, sizeof(*c->r));
    assert_non_null(c->r);
    c->n = n;
    c->owner = pthread_self();
}

/* ------------------------------------------------------------------ source */

static void check_zlib_stream(const result *r, const unsigned char *orig)
{
    unsigned char out[PAGE + 16];
    uLongf outlen = sizeof(out);

    assert_true(r->compressed);
    assert_int_equal(r->data[0], 0x78);  /* zlib header, 32 KiB window */
    assert_int_equal(uncompress(out, &outlen, r->data, r->len), Z_OK);
    assert_int_equal(outlen, PAGE);
    assert_memory_equal(out, orig, PAGE);
}

static void test_kinds(void **state)
{
    const int kinds[] = { KIND_TEXT, KIND_ZERO, KIND_RANDOM, KIND_MIXED };
    unsigned char page[PAGE], orig[4][PAGE];
    lm_error err = { 0 };
    compress_stats st;
    compressor *c = compress_new(1, 1, &err);
    capture cap;

    assert_non_null(c);
    capture_init(&cap, 4);
    for (int k = 0; k < 4; k++) {
        fill_page(page, kinds[k], 100 + k);
        memcpy(orig[k], page, PAGE);
        assert_int_equal(compress_submit(c, page, (uint64_t)k, capture_emit, &cap, &err), 0);
        /* The caller's page is free again at once: the bounce copy counts. */
        memset(page, 0xAB, PAGE);
    }
    assert_int_equal(compress_flush(c, capture_emit, &cap, &err), 0);
    assert_false(cap.wrong_thread);
    assert_false(cap.bad_tag);
    for (int k = 0; k < 4; k++)
        assert_int_equal(cap.r[k].count, 1);

    check_zlib_stream(&cap.r[KIND_TEXT], orig[KIND_TEXT]);
    check_zlib_stream(&cap.r[KIND_ZERO], orig[KIND_ZERO]);
    check_zlib_stream(&cap.r[KIND_MIXED], orig[KIND_MIXED]);
    assert_true(cap.r[KIND_ZERO].len < 64);
    assert_true(cap.r[KIND_TEXT].len < PAGE / 2);
    /* Random does not shrink: the page itself, flagged uncompressed. */
    assert_false(cap.r[KIND_RANDOM].compressed);
    assert_int_equal(cap.r[KIND_RANDOM].len, PAGE);
    assert_memory_equal(cap.r[KIND_RANDOM].data, orig[KIND_RANDOM], PAGE);

    compress_get_stats(c, &st);
    assert_int_equal(st.submitted, 4);
    assert_int_equal(st.pages, 3);
    assert_int_equal(st.not_smaller, 1);
    assert_int_equal(st.compressed_size,
                     cap.r[0].len + cap.r[1].len + cap.r[3].len);
    assert_true(st.compression_rate > 3.0);
    assert_true(st.compression_rate ==
                (double)3 * PAGE / (double)st.compressed_size);
    compress_free(c);
    free(cap.r);
}

static void test_levels(void **state)
{
    unsigned char page[PAGE];
    lm_error err = { 0 };
    uint32_t len[10];

    fill_page(page, KIND_TEXT, 7);
    for (int level = 0; level <= 9; level++) {
        compressor *c = compress_new(1, level, &err);
        capture cap;

        assert_non_null(c);
        capture_init(&cap, 1);
        assert_int_equal(compress_submit(c, page, 0, capture_emit, &cap, &err), 0);
        assert_int_equal(compress_flush(c, capture_emit, &cap, &err), 0);
        assert_int_equal(cap.r[0].count, 1);
        len[level] = cap.r[0].len;
        if (level == 0)
            assert_false(cap.r[0].compressed);  /* stored blocks only grow */
        else
            check_zlib_stream(&cap.r[0], page);
        compress_free(c);
        free(cap.r);
    }
    assert_true(len[9] <= len[1]);
}

/* Many pages through n threads, polled as we go, then decompressed by m. */
static void many_pages(int nthreads, int dthreads, size_t npages)
{
    unsigned char *src = malloc(npages * PAGE);
    unsigned char *dst = malloc(npages * PAGE);
    lm_error err = { 0 };
    compress_stats st;
    compressor *c = compress_new(nthreads, 1, &err);
    decompressor *d = decompress_new(dthreads, &err);
    capture cap;
    uint64_t zsize = 0, ncomp = 0;

    assert_non_null(src);
    assert_non_null(dst);
    assert_non_null(c);
    assert_non_null(d);
    capture_init(&cap, npages);
    for (size_t i = 0; i < npages; i++)
        fill_page(src + i * PAGE, (int)(i % 7 == 3 ? KIND_RANDOM : i % 5 == 1 ? KIND_MIXED
                                        : KIND_TEXT), i);
    for (size_t i = 0; i < npages; i++) {
        assert_int_equal(compress_submit(c, src + i * PAGE, i, capture_emit, &cap, &err), 0);
        assert_true(compress_poll(c, capture_emit, &cap) >= 0);
    }
    assert_int_equal(compress_flush(c, capture_emit, &cap, &err), 0);
    assert_false(cap.wrong_thread);
    assert_false(cap.bad_tag);
    assert_int_equal(cap.emitted, npages);

    memset(dst, 0x5A, npages * PAGE);
    for (size_t i = 0; i < npages; i++) {
        result *r = &cap.r[i];

        assert_int_equal(r->count, 1);
        assert_int_equal(r->compressed, i % 7 != 3);
        if (r->compressed) {
            ncomp++;
            zsize += r->len;
            assert_int_equal(decompress_submit(d, dst + i * PAGE, r->data, r->len,
                                               1000 + i, &err), 0);
        } else {
            memcpy(dst + i * PAGE, r->data, PAGE);
        }
    }
    assert_int_equal(decompress_wait(d, &err), 0);
    for (size_t i = 0; i < npages; i++)
        if (memcmp(dst + i * PAGE, src + i * PAGE, PAGE))
            fail_msg("page %zu differs after the round trip", i);

    compress_get_stats(c, &st);
    assert_int_equal(st.submitted, npages);
    assert_int_equal(st.pages, ncomp);
    assert_int_equal(st.pages + st.not_smaller, npages);
    assert_int_equal(st.compressed_size, zsize);
    assert_true(st.busy <= st.submitted);
    assert_true(st.busy_rate >= 0.0 && st.busy_rate <= 1.0);
    print_message("# %d+%d threads, %zu pages: busy %llu (%.2f), rate %.2f\n", nthreads,
                  dthreads, npages, (unsigned long long)st.busy, st.busy_rate,
                  st.compression_rate);
    compress_free(c);
    decompress_free(d);
    free(cap.r);
    free(src);
    free(dst);
}

static void test_many_1(void **state)
{
    many_pages(1, 1, 3000);
}

static void test_many_2(void **state)
{
    many_pages(2, 2, 3000);
    many_pages(2, 1, 1000);
    many_pages(3, 2, 1000);
}

static void test_emit_in_submit(void **state)
{
    unsigned char page[PAGE];
    lm_error err = { 0 };
    compressor *c = compress_new(1, 1, &err);
    capture cap;
    int rc, failures = 0;

    assert_non_null(c);
    capture_init(&cap, 200);
    /* Never polling: submit itself emits when it needs room, and an emit
     * error stops that submit (the page whose emit failed is consumed). */
    cap.fail_after = 50;
    for (int i = 0; i < 200; i++) {
        fill_page(page, KIND_TEXT, (uint64_t)i);
        rc = compress_submit(c, page, (uint64_t)i, capture_emit, &cap, &err);
        if (rc == -EIO) {
            failures++;
            assert_string_equal(err.msg,
                                "compress: emitting a finished page: Input/output error");
            rc = compress_submit(c, page, (uint64_t)i, capture_emit, &cap, &err);
        }
        assert_int_equal(rc, 0);
    }
    assert_int_equal(failures, 1);
    assert_true(cap.emitted >= 200 - COMPRESS_RING);     /* all but what the worker holds */
    assert_int_equal(compress_flush(c, capture_emit, &cap, &err), 0);
    assert_int_equal(cap.emitted, 200);
    for (int i = 0; i < 200; i++)
        assert_int_equal(cap.r[i].count, 1);
    compress_free(c);
    free(cap.r);
}

static void test_interrupt(void **state)
{
    unsigned char page[PAGE];
    lm_error err = { 0 };
    compressor *c = compress_new(1, 9, &err);
    capture cap;
    int rc = 0;

    assert_non_null(c);
    capture_init(&cap, 1000);
    fill_page(page, KIND_TEXT, 2);
    compress_interrupt(c);
    /* Submits go on while there is room; the first that must wait fails.
     * (Level 9 takes far longer per page than a submit.) */
    for (int i = 0; i < 1000 && rc == 0; i++)
        rc = compress_submit(c, page, (uint64_t)i, capture_emit, &cap, &err);
    assert_int_equal(rc, -ECANCELED);
    assert_non_null(strstr(err.msg, "interrupted"));
    assert_int_equal(compress_flush(c, capture_emit, &cap, &err), -ECANCELED);
    compress_free(c);     /* with work outstanding */
    free(cap.r);
}

static void test_new_errors(void **state)
{
    lm_error err = { 0 };

    assert_null(compress_new(0, 1, &err));
    assert_int_equal(err.code, -EINVAL);
    assert_non_null(strstr(err.msg, "compress-threads 0"));
    assert_null(compress_new(256, 1, &err));
    assert_null(compress_new(1, 10, &err));
    assert_non_null(strstr(err.msg, "compress-level 10"));
    assert_null(compress_new(1, -1, &err));
    assert_null(decompress_new(0, &err));
    assert_non_null(strstr(err.msg, "decompress-threads 0"));
    assert_int_equal(compressBound(PAGE), COMPRESS_BOUND);
    compress_free(NULL);
    decompress_free(NULL);
}

/* ------------------------------------------------------------------ destination */

/* A page with GUARD bytes of 0xEE on each side, to catch stray writes. */
#define GUARD 4096

typedef struct guarded {
    unsigned char *buf;
    unsigned char *page;
} guarded;

static guarded guarded_new(void)
{
    guarded g;

    g.buf = malloc(PAGE + 2 * GUARD);
    assert_non_null(g.buf);
    memset(g.buf, 0xEE, PAGE + 2 * GUARD);
    g.page = g.buf + GUARD;
    return g;
}

static void guarded_check(guarded *g)
{
    for (size_t i = 0; i < GUARD; i++) {
        if (g->buf[i] != 0xEE || g->page[PAGE + i] != 0xEE)
            fail_msg("write outside the destination page near byte %zu", i);
    }
}

/* zlib stream of `n` bytes of text into out; returns its length. */
static uint32_t zlib_of(unsigned char *out, size_t outsize, size_t n)
{
    unsigned char *in = malloc((n + PAGE - 1) / PAGE * PAGE);  /* whole pages */
    uLongf len = outsize;

    for (size_t i = 0; i < n; i += PAGE)
        fill_page(in + i, KIND_TEXT, i);
    assert_int_equal(compress2(out, &len, in, n, 1), Z_OK);
    free(in);
    return (uint32_t)len;
}

static void expect_corrupt(const void *data, uint32_t len, uint64_t where, const char *reason)
{
    lm_error err = { 0 };
    decompressor *d = decompress_new(2, &err);
    guarded g = guarded_new();
    char want[256];
    int rc;

    assert_non_null(d);
    rc = decompress_submit(d, g.page, data, len, where, &err);
    if (rc == 0)
        rc = decompress_wait(d, &err);
    assert_int_equal(rc, -EINVAL);
    snprintf(want, sizeof(want), "corrupt compressed page at byte offset %llu: zlib: ",
             (unsigned long long)where);
    if (strncmp(err.msg, want, strlen(want)))
        fail_msg("message '%s' does not start with '%s'", err.msg, want);
    if (reason && !strstr(err.msg, reason))
        fail_msg("message '%s' does not say '%s'", err.msg, reason);
    if (where < 100)
        print_message("# %s\n", err.msg);
    guarded_check(&g);
    /* Latched: later submits and waits report the same error. */
    lm_error err2 = { 0 };
    assert_int_equal(decompress_submit(d, g.page, data, len, where + 1, &err2), -EINVAL);
    assert_string_equal(err2.msg, err.msg);
    assert_int_equal(decompress_wait(d, &err2), -EINVAL);
    assert_string_equal(err2.msg, err.msg);
    decompress_free(d);
    free(g.buf);
}

static void test_corrupt(void **state)
{
    unsigned char good[COMPRESS_BOUND], bad[COMPRESS_BOUND];
    unsigned char big[3 * PAGE];
    uint32_t len = zlib_of(good, sizeof(good), PAGE);
    uint32_t n;
    uint64_t s = 42;

    assert_true(len > 100);
    /* Header check failure. */
    memcpy(bad, good, len);
    bad[0] = 0x12;
    expect_corrupt(bad, len, 123456, "incorrect header check");
    /* Damage in the body: zlib or its checksum notices. */
    memcpy(bad, good, len);
    for (uint32_t i = len / 2; i < len / 2 + 8; i++)
        bad[i] ^= 0x5A;
    expect_corrupt(bad, len, 7, NULL);
    /* Adler-32 trailer wrong. */
    memcpy(bad, good, len);
    bad[len - 1] ^= 1;
    expect_corrupt(bad, len, 8, "incorrect data check");
    /* Truncated, and empty. */
    expect_corrupt(good, len - 10, 9, "truncated");
    expect_corrupt(good, 0, 10, "truncated");
    /* Garbage after a complete stream. */
    memcpy(bad, good, len);
    memset(bad + len, 0, 5);
    expect_corrupt(bad, len + 5, 11, "5 bytes after the end");
    /* A stream of 100 bytes: too short a page. */
    n = zlib_of(bad, sizeof(bad), 100);
    expect_corrupt(bad, n, 12, "decompressed to 100 bytes, not 4096");
    /* A stream of 3 pages (fits the bound when compressed): no overflow. */
    memset(big, 0, sizeof(big));
    {
        uLongf blen = sizeof(bad);
        assert_int_equal(compress2(bad, &blen, big, sizeof(big), 9), Z_OK);
        assert_true(blen <= COMPRESS_BOUND);
        expect_corrupt(bad, (uint32_t)blen, 13, "more than 4096 bytes");
    }
    /* Random bytes. */
    for (int t = 0; t < 20; t++) {
        for (uint32_t i = 0; i < sizeof(bad); i++)
            bad[i] = (unsigned char)rng_next(&s);
        expect_corrupt(bad, 1 + (uint32_t)(rng_next(&s) % sizeof(bad)), 14 + t, NULL);
    }
    /* Random deflate data behind a valid header: the decoder's own paths. */
    for (int t = 0; t < 200; t++) {
        for (uint32_t i = 0; i < sizeof(bad); i++)
            bad[i] = (unsigned char)rng_next(&s);
        bad[0] = 0x78;
        bad[1] = 0x01;
        expect_corrupt(bad, 2 + (uint32_t)(rng_next(&s) % (sizeof(bad) - 2)), 100 + t, NULL);
    }
    /* Bit flips all over a good page's stream (header check, block codes,
     * Adler-32 trailer): each is caught and nothing lands outside the page. */
    for (uint32_t bit = 0; bit < len * 8; bit += 7) {
        memcpy(bad, good, len);
        bad[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        expect_corrupt(bad, len, 1000 + bit, NULL);
    }
}

static void test_oversize(void **state)
{
    unsigned char data[COMPRESS_BOUND + 1];
    lm_error err = { 0 };
    decompressor *d = decompress_new(1, &err);
    guarded g = guarded_new();

    assert_non_null(d);
    memset(data, 0, sizeof(data));
    assert_int_equal(decompress_submit(d, g.page, data, COMPRESS_BOUND + 1, 99, &err),
                     -EINVAL);
    assert_string_equal(err.msg, "compressed page at byte offset 99 has length 4111 > bound 4110");
    assert_int_equal(decompress_wait(d, &err), -EINVAL);
    assert_string_equal(err.msg, "compressed page at byte offset 99 has length 4111 > bound 4110");
    guarded_check(&g);
    decompress_free(d);
    free(g.buf);
}

static void test_decompress_exact(void **state)
{
    unsigned char z[COMPRESS_BOUND], orig[PAGE];
    lm_error err = { 0 };
    decompressor *d = decompress_new(1, &err);
    guarded g = guarded_new();
    uLongf len = sizeof(z);

    /* A stream made by plain zlib (as QEMU makes them) at the bound's edge:
     * random data at level 0 is stored, 4096 + 11 bytes. */
    fill_page(orig, KIND_RANDOM, 5);
    assert_int_equal(compress2(z, &len, orig, PAGE, 0), Z_OK);
    assert_true(len <= COMPRESS_BOUND);
    assert_non_null(d);
    assert_int_equal(decompress_submit(d, g.page, z, (uint32_t)len, 0, &err), 0);
    assert_int_equal(decompress_wait(d, &err), 0);
    assert_memory_equal(g.page, orig, PAGE);
    guarded_check(&g);
    decompress_free(d);
    free(g.buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kinds),
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_many_1),
        cmocka_unit_test(test_many_2),
        cmocka_unit_test(test_emit_in_submit),
        cmocka_unit_test(test_interrupt),
        cmocka_unit_test(test_new_errors),
        cmocka_unit_test(test_corrupt),
        cmocka_unit_test(test_oversize),
        cmocka_unit_test(test_decompress_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
