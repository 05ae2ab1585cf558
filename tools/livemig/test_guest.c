/*
 * Unit tests for the demo guest (guest.c) and its page model (verify.c).
 *
 * These run without the library: the guest is plain memory and threads, so
 * its promises can be checked in isolation -- page contents round-trip, each
 * kind of damage is classified as documented, a stopped guest really stops
 * writing, and writers honour rate, throttle and exit.  Every wait for the
 * writers to make progress is a bounded poll on their write counter that
 * fails the test when the bound expires.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <endian.h>
#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <sched.h>
#include <stdlib.h>

#include "guest.h"
#include "util.h"
#include "verify.h"

#define WAIT_MS 10000

/* Spin (yielding) until the guest has done `n` writes; fail after WAIT_MS. */
static void wait_writes(struct guest *g, uint64_t n)
{
    int64_t deadline = tool_now_ms() + WAIT_MS;
    while (guest_writes(g) < n) {
        if (tool_now_ms() > deadline)
            fail_msg("writers made %llu of %llu writes in %d ms",
                     (unsigned long long)guest_writes(g), (unsigned long long)n, WAIT_MS);
        sched_yield();
    }
}

static struct guest *make_guest(uint64_t mem, unsigned vcpus, int64_t rate,
                                enum guest_pattern pat, enum guest_fill fill)
{
    struct guest_config cfg = {
        .mem = mem, .vcpus = vcpus, .rate = rate, .pattern = pat, .fill = fill, .seed = 7,
    };
    struct guest *g;
    lm_error err = { 0 };
    int rc = guest_new(&g, &cfg, &err);
    if (rc)
        fail_msg("guest_new: %s", err.msg);
    return g;
}

/* ---------------------------------------------------------------- pages */

static void test_page_roundtrip(void **state)
{
    static uint8_t page[GUEST_PAGE_SIZE] __attribute__((aligned(64)));
    uint64_t found;

    for (int kind = GUEST_FILL_RANDOM; kind <= GUEST_FILL_ZERO; kind++) {
        for (uint32_t v = 0; v < 4; v++) {
            page_fill(page, 12345, v, kind);
            assert_int_equal(page_check(page, 12345, v, kind, &found), PAGE_OK);
        }
        page_fill(page, 12345, 3, kind);
        assert_int_equal(le64toh(((uint64_t *)page)[0]), 12345);
        assert_int_equal(le64toh(((uint64_t *)page)[1]), 3);
    }
    /* Version 0 is an all-zero page. */
    page_fill(page, 9, 0, GUEST_FILL_RANDOM);
    for (size_t i = 0; i < sizeof(page); i++)
        assert_int_equal(page[i], 0);
    /* Different versions and pages really differ in the body. */
    static uint8_t other[GUEST_PAGE_SIZE];
    page_fill(page, 1, 1, GUEST_FILL_RANDOM);
    page_fill(other, 1, 2, GUEST_FILL_RANDOM);
    assert_memory_not_equal(page + 16, other + 16, GUEST_PAGE_SIZE - 16);
    page_fill(other, 2, 1, GUEST_FILL_RANDOM);
    assert_memory_not_equal(page + 16, other + 16, GUEST_PAGE_SIZE - 16);
}

static void test_text_is_text(void **state)
{
    static uint8_t page[GUEST_PAGE_SIZE];

    page_fill(page, 77, 5, GUEST_FILL_TEXT);
    for (size_t i = GUEST_PAGE_HEADER; i < sizeof(page); i++)
        assert_true((page[i] >= 'a' && page[i] <= 'z') || page[i] == ' ' || page[i] == '\n');
    /* A text page is not the random page of the same version. */
    uint64_t found;
    assert_int_equal(page_check(page, 77, 5, GUEST_FILL_RANDOM, &found), PAGE_TORN);
}

static void test_classify(void **state)
{
    static uint8_t page[GUEST_PAGE_SIZE];
    uint64_t found;

    /* lost: zero page, written version expected */
    memset(page, 0, sizeof(page));
    assert_int_equal(page_check(page, 4, 2, GUEST_FILL_RANDOM, &found), PAGE_LOST);
    /* stale: older version of the right page */
    page_fill(page, 4, 1, GUEST_FILL_RANDOM);
    assert_int_equal(page_check(page, 4, 2, GUEST_FILL_RANDOM, &found), PAGE_STALE);
    assert_int_equal(found, 1);
    /* torn: newer than the table */
    page_fill(page, 4, 3, GUEST_FILL_RANDOM);
    assert_int_equal(page_check(page, 4, 2, GUEST_FILL_RANDOM, &found), PAGE_TORN);
    assert_int_equal(found, 3);
    /* torn: right header, one flipped byte at the very end of the body */
    page_fill(page, 4, 2, GUEST_FILL_RANDOM);
    page[GUEST_PAGE_SIZE - 1] ^= 1;
    assert_int_equal(page_check(page, 4, 2, GUEST_FILL_RANDOM, &found), PAGE_TORN);
    /* misplaced: another page's content */
    page_fill(page, 5, 2, GUEST_FILL_RANDOM);
    assert_int_equal(page_check(page, 4, 2, GUEST_FILL_RANDOM, &found), PAGE_MISPLACED);
    /* version 0 expected, but something is there */
    page_fill(page, 4, 1, GUEST_FILL_RANDOM);
    assert_int_equal(page_check(page, 4, 0, GUEST_FILL_RANDOM, &found), PAGE_TORN);
    memset(page, 0, sizeof(page));
    page[100] = 1;
    assert_int_equal(page_check(page, 0, 0, GUEST_FILL_RANDOM, &found), PAGE_TORN);
    /* text pages: a flipped byte is torn too */
    page_fill(page, 4, 2, GUEST_FILL_TEXT);
    assert_int_equal(page_check(page, 4, 2, GUEST_FILL_TEXT, &found), PAGE_OK);
    page[2000] ^= 0x20;
    assert_int_equal(page_check(page, 4, 2, GUEST_FILL_TEXT, &found), PAGE_TORN);
}

/* Damage a filled guest in every way and check the report names each page. */
static void test_verify_report(void **state)
{
    struct guest *g = make_guest(64 * GUEST_PAGE_SIZE * 64, 2, 0, GUEST_PATTERN_RANDOM,
                                 GUEST_FILL_RANDOM);
    struct verify_report r;
    lm_error err = { 0 };
    uint8_t *ram = guest_ram(g);
    uint32_t *ver = guest_versions(g);
    uint64_t pages = guest_pages(g);

    assert_int_equal(guest_verify(g, &r, &err), 0);
    assert_int_equal(r.checked, pages);
    assert_int_equal(r.bad, 0);

    memset(ram + 10 * GUEST_PAGE_SIZE, 0, GUEST_PAGE_SIZE);               /* lost */
    ver[20] = 2;                                                          /* stale */
    memcpy(ram + 30 * GUEST_PAGE_SIZE, ram + 31 * GUEST_PAGE_SIZE, GUEST_PAGE_SIZE); /* misplaced */
    ram[(pages - 1) * GUEST_PAGE_SIZE + 999] ^= 0x80;                     /* torn, last page */

    assert_int_equal(guest_verify(g, &r, &err), 0);
    assert_int_equal(r.checked, pages);
    assert_int_equal(r.bad, 4);
    assert_int_equal(r.lost, 1);
    assert_int_equal(r.stale, 1);
    assert_int_equal(r.misplaced, 1);
    assert_int_equal(r.torn, 1);
    assert_int_equal(r.nexamples, 4);
    /* Examples come in page order even though ranges ran on several threads. */
    assert_int_equal(r.examples[0].page, 10);
    assert_int_equal(r.examples[0].kind, PAGE_LOST);
    assert_int_equal(r.examples[1].page, 20);
    assert_int_equal(r.examples[1].kind, PAGE_STALE);
    assert_int_equal(r.examples[1].expected_version, 2);
    assert_int_equal(r.examples[1].found_version, 1);
    assert_int_equal(r.examples[2].page, 30);
    assert_int_equal(r.examples[2].kind, PAGE_MISPLACED);
    assert_int_equal(r.examples[3].page, pages - 1);
    assert_int_equal(r.examples[3].kind, PAGE_TORN);

    char buf[2048];
    verify_format(&r, buf, sizeof(buf));
    assert_non_null(strstr(buf, "4 bad (lost 1, stale 1, torn 1, misplaced 1)"));
    assert_non_null(strstr(buf, "page 20: stale, expected version 2, found 1"));
    guest_free(g);
}

static void test_zero_fill(void **state)
{
    struct guest *g = make_guest(1 << 20, 1, 0, GUEST_PATTERN_RANDOM, GUEST_FILL_ZERO);
    struct verify_report r;
    lm_error err = { 0 };

    for (uint64_t i = 0; i < guest_pages(g); i++)
        assert_int_equal(guest_versions(g)[i], 0);
    assert_int_equal(guest_verify(g, &r, &err), 0);
    assert_int_equal(r.bad, 0);
    guest_free(g);
}

/* ---------------------------------------------------------------- writers */

/* Written pages as reported through the hook, to check cooperative tracking. */
struct hook_log {
    _Atomic uint64_t calls;
    uint8_t *seen;     /* one byte per page */
};

static void hook_fn(void *opaque, uint64_t page)
{
    struct hook_log *h = opaque;
    h->seen[page] = 1;
    atomic_fetch_add(&h->calls, 1);
}

static void test_writers_pause(void **state)
{
    const uint64_t mem = 8 << 20;
    struct guest *g = make_guest(mem, 2, GUEST_RATE_MAX, GUEST_PATTERN_RANDOM,
                                 GUEST_FILL_RANDOM);
    struct hook_log h = { .seen = calloc(mem / GUEST_PAGE_SIZE, 1) };
    struct verify_report r;
    lm_error err = { 0 };

    guest_set_write_hook(g, hook_fn, &h);
    assert_int_equal(guest_start_writers(g, &err), 0);
    /* Created stopped: nothing is written until start. */
    assert_int_equal(guest_vm_stop(g, &err), 0);
    assert_int_equal(guest_writes(g), 0);
    guest_vm_start(g);
    assert_true(guest_vm_running(g));

    for (int round = 0; round < 20; round++) {
        wait_writes(g, guest_writes(g) + 2000);
        /* Verification holds the writers while they run flat out. */
        assert_int_equal(guest_verify(g, &r, &err), 0);
        assert_int_equal(r.bad, 0);
    }

    /* Stopping at full speed costs about one page write plus a wake-up
     * (tens of us); the best of ten must be far below a scheduler slice. */
    int64_t best = INT64_MAX;
    for (int i = 0; i < 10; i++) {
        guest_vm_start(g);
        wait_writes(g, guest_writes(g) + 100);
        assert_int_equal(guest_vm_stop(g, &err), 0);
        if (guest_last_stop_ns(g) < best)
            best = guest_last_stop_ns(g);
    }
    assert_true(best < 2 * 1000000ll);
    assert_false(guest_vm_running(g));
    uint64_t w = guest_writes(g);
    assert_int_equal(atomic_load(&h.calls), w);
    /* Every written page went through the hook: versions > 1 were seen. */
    for (uint64_t i = 0; i < guest_pages(g); i++)
        if (guest_versions(g)[i] > 1)
            assert_int_equal(h.seen[i], 1);
    /* Stopped means stopped: a hold and a full check later, still w writes. */
    assert_int_equal(guest_verify(g, &r, &err), 0);
    assert_int_equal(r.bad, 0);
    assert_int_equal(guest_writes(g), w);
    /* Verification does not restart a stopped guest. */
    assert_false(guest_vm_running(g));
    assert_int_equal(guest_writes(g), w);

    guest_vm_start(g);
    wait_writes(g, w + 1000);
    guest_free(g);         /* joins running writers */
    free(h.seen);
}

static void test_writers_own_pages(void **state)
{
    /* Sequential pattern, 3 writers: each page is written by its owner only
     * and round-robin, so after a stop all versions differ by at most 1
     * within a writer's set. */
    struct guest *g = make_guest(3 * 100 * GUEST_PAGE_SIZE, 3, GUEST_RATE_MAX,
                                 GUEST_PATTERN_SEQUENTIAL, GUEST_FILL_RANDOM);
    lm_error err = { 0 };
    struct verify_report r;

    assert_int_equal(guest_start_writers(g, &err), 0);
    guest_vm_start(g);
    wait_writes(g, 30000);
    assert_int_equal(guest_vm_stop(g, &err), 0);
    uint32_t *v = guest_versions(g);
    for (unsigned k = 0; k < 3; k++) {
        uint32_t lo = UINT32_MAX, hi = 0;
        for (uint64_t i = k; i < guest_pages(g); i += 3) {
            lo = v[i] < lo ? v[i] : lo;
            hi = v[i] > hi ? v[i] : hi;
        }
        assert_true(hi - lo <= 1);
        assert_true(hi > 1);
    }
    assert_int_equal(guest_verify(g, &r, &err), 0);
    assert_int_equal(r.bad, 0);
    guest_free(g);
}

static void test_hotset(void **state)
{
    struct guest *g = make_guest(1000 * GUEST_PAGE_SIZE, 1, GUEST_RATE_MAX,
                                 GUEST_PATTERN_HOTSET, GUEST_FILL_RANDOM);
    lm_error err = { 0 };

    assert_int_equal(guest_start_writers(g, &err), 0);
    guest_vm_start(g);
    wait_writes(g, 50000);
    assert_int_equal(guest_vm_stop(g, &err), 0);
    uint64_t hot = 0, all = 0;
    for (uint64_t i = 0; i < guest_pages(g); i++) {
        uint64_t n = guest_versions(g)[i] - 1;     /* writes since the fill */
        all += n;
        if (i < 100)
            hot += n;
    }
    /* 90% expected; allow generous noise. */
    assert_true(hot * 100 > all * 85);
    assert_true(hot * 100 < all * 95);
    guest_free(g);
}

static void test_rate_limit(void **state)
{
    /* 4000 pages/s: 400 writes take ~100 ms, minus a 10 ms burst. */
    struct guest *g = make_guest(4 << 20, 2, 4000, GUEST_PATTERN_RANDOM, GUEST_FILL_ZERO);
    lm_error err = { 0 };

    assert_int_equal(guest_start_writers(g, &err), 0);
    int64_t t0 = tool_now_ns();
    guest_vm_start(g);
    wait_writes(g, 400);
    int64_t el = tool_now_ns() - t0;
    assert_true(el > 70 * 1000000ll);
    /* Idle: no writes at all. */
    guest_set_rate(g, 0);
    assert_int_equal(guest_vm_stop(g, &err), 0);
    uint64_t w = guest_writes(g);
    guest_vm_start(g);
    /* Max: a change of rate takes effect at once (no 100 ms idle nap). */
    guest_set_rate(g, GUEST_RATE_MAX);
    assert_int_equal(guest_rate(g), GUEST_RATE_MAX);
    wait_writes(g, w + 100000);
    guest_free(g);
}

static void test_throttle(void **state)
{
    /* At 90% throttle the writers sleep 9 ms of every 10: measure that the
     * write rate drops well below the unthrottled one. */
    struct guest *g = make_guest(4 << 20, 1, GUEST_RATE_MAX, GUEST_PATTERN_RANDOM,
                                 GUEST_FILL_ZERO);
    lm_error err = { 0 };

    assert_int_equal(guest_start_writers(g, &err), 0);
    guest_vm_start(g);
    int64_t t0 = tool_now_ns();
    uint64_t w0 = guest_writes(g);
    wait_writes(g, w0 + 20000);
    double fast = 20000.0 / (double)(tool_now_ns() - t0);

    guest_throttle(g, 90);
    wait_writes(g, guest_writes(g) + 1);     /* let the old slice end */
    t0 = tool_now_ns();
    w0 = guest_writes(g);
    wait_writes(g, w0 + 2000);
    double slow = (double)(guest_writes(g) - w0) / (double)(tool_now_ns() - t0);
    assert_true(slow < fast * 0.5);
    guest_throttle(g, 0);
    guest_free(g);
}

static void test_stop_wakes_sleepers(void **state)
{
    /* Idle writers nap 100 ms at a time.  A stop while both nap must wake
     * them rather than wait the nap out. */
    struct guest *g = make_guest(4 << 20, 2, 0, GUEST_PATTERN_RANDOM, GUEST_FILL_ZERO);
    lm_error err = { 0 };
    int64_t best = INT64_MAX;

    assert_int_equal(guest_start_writers(g, &err), 0);
    for (int i = 0; i < 5; i++) {
        guest_vm_start(g);
        int64_t deadline = tool_now_ms() + WAIT_MS;
        while (guest_napping(g) < 2) {
            if (tool_now_ms() > deadline)
                fail_msg("writers did not start napping");
            sched_yield();
        }
        assert_int_equal(guest_vm_stop(g, &err), 0);
        assert_int_equal(guest_napping(g), 0);
        if (guest_last_stop_ns(g) < best)
            best = guest_last_stop_ns(g);
    }
    assert_true(best < 50 * 1000000ll);
    assert_int_equal(guest_writes(g), 0);
    guest_free(g);
}

static void test_incoming(void **state)
{
    struct guest_config cfg = {
        .mem = 4 << 20, .vcpus = 2, .rate = 0, .fill = GUEST_FILL_TEXT, .incoming = true,
    };
    struct guest *g;
    lm_error err = { 0 };
    struct verify_report r;

    assert_int_equal(guest_new(&g, &cfg, &err), 0);
    for (uint64_t i = 0; i < guest_pages(g); i++) {
        assert_int_equal(guest_versions(g)[i], 0);
        assert_int_equal(guest_ram(g)[i * GUEST_PAGE_SIZE], 0);
    }
    /* Loaded state: write pages as a migration would, then check them. */
    for (uint64_t i = 0; i < guest_pages(g); i += 2) {
        guest_versions(g)[i] = 5;
        page_fill(guest_ram(g) + i * GUEST_PAGE_SIZE, i, 5, GUEST_FILL_TEXT);
    }
    assert_int_equal(guest_verify(g, &r, &err), 0);
    assert_int_equal(r.bad, 0);
    guest_set_fill(g, GUEST_FILL_RANDOM);
    assert_int_equal(guest_verify(g, &r, &err), 0);
    assert_int_equal(r.bad, guest_pages(g) / 2);
    assert_int_equal(r.torn, guest_pages(g) / 2);
    guest_free(g);
}

static void test_bad_config(void **state)
{
    struct guest_config cfg = { .mem = 4097, .vcpus = 1 };
    struct guest *g = (struct guest *)1;
    lm_error err = { 0 };

    assert_int_equal(guest_new(&g, &cfg, &err), -EINVAL);
    assert_null(g);
    assert_non_null(strstr(err.msg, "multiple of 4096"));
    cfg.mem = 2 * GUEST_PAGE_SIZE;
    cfg.vcpus = 3;
    assert_int_equal(guest_new(&g, &cfg, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "3 vcpus for 2 pages"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_page_roundtrip),
        cmocka_unit_test(test_text_is_text),
        cmocka_unit_test(test_classify),
        cmocka_unit_test(test_verify_report),
        cmocka_unit_test(test_zero_fill),
        cmocka_unit_test(test_writers_pause),
        cmocka_unit_test(test_writers_own_pages),
        cmocka_unit_test(test_hotset),
        cmocka_unit_test(test_rate_limit),
        cmocka_unit_test(test_throttle),
        cmocka_unit_test(test_stop_wakes_sleepers),
        cmocka_unit_test(test_incoming),
        cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
