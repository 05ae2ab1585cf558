/*
 * Unit tests for src/dirty/: both trackers through the public interface.
 *
 * Each behavioural test runs once per tracker (the tracker name is the
 * test's prestate).  "Written" means: the test stores to the page, and for
 * the cooperative tracker then reports it with dirty_mark(), as a VMM
 * would.  Every sync is compared with the exact set of pages written, not a
 * superset: a tracker that reports too much wastes bandwidth, one that
 * reports too little corrupts the guest.
 *
 * The concurrency test is a small precopy: a writer thread keeps writing
 * while the main thread syncs and copies the reported pages to a shadow;
 * after the writer stops and one last sync, the shadow must equal memory
 * and every page the writer recorded must have been reported.
 *
 * The ops tracker (the program's own log) is tested with a fake log whose
 * reports, arms and failures are scripted.
 *
 * When this kernel cannot do uffd-wp, its tests skip and say why.
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
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cmocka.h>
#if defined(__x86_64__)
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#endif

#include "dirty/dirty.h"
#include "util/bitmap.h"
#include "util/time.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23   /* Linux 5.14 uapi; older libc headers lack it */
#endif

#define PS 4096ULL
#define REGION (64ULL << 20)
#define NPAGES (REGION / PS)

/* A mapped region and a tracker over it. */
struct fixture {
    const char *tracker;
    bool coop;
    uint8_t *mem;
    uint64_t len;
    dirty_region reg;
    dirty_tracker *d;
};

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint8_t *map_anon(uint64_t len, bool populate)
{
    uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    assert_true(p != MAP_FAILED);
    if (populate && madvise(p, len, MADV_POPULATE_WRITE) < 0)
        memset(p, 0, len);
    return p;
}

/*
 * Create the tracker named in *state over a fresh region.  Does not return
 * (cmocka's skip()) when uffd-wp is not available here.
 */
static void fixture_open(struct fixture *f, void **state, uint64_t len, bool populate)
{
    lm_error err = { 0 };

    memset(f, 0, sizeof(*f));
    f->tracker = *state;
    f->coop = !strcmp(f->tracker, "cooperative");
    f->len = len;
    f->mem = map_anon(len, populate);
    f->reg = (dirty_region){ .host = f->mem, .length = len, .page_size = PS };
    f->d = dirty_new(f->tracker, &f->reg, 1, &err);
    if (!f->d) {
        munmap(f->mem, len);
        if (!f->coop) {
            print_message("# SKIP: uffd-wp tracker unavailable here: %s\n", err.msg);
            skip();
        }
        fail_msg("dirty_new(%s): %s", f->tracker, err.msg);
    }
    assert_string_equal(dirty_name(f->d), f->tracker);
}

static void fixture_close(struct fixture *f)
{
    dirty_free(f->d);
    munmap(f->mem, f->len);
}

static void start_ok(dirty_tracker *d)
{
    lm_error err = { 0 };
    if (dirty_start(d, &err) < 0)
        fail_msg("dirty_start: %s", err.msg);
}

static int64_t sync_ok(dirty_tracker *d, int r, unsigned long *map)
{
    lm_error err = { 0 };
    int64_t n = dirty_sync(d, r, map, &err);
    if (n < 0)
        fail_msg("dirty_sync(%d): %s", r, err.msg);
    return n;
}

/* Write `len` bytes at `off` (value v), then report it if cooperative. */
static void write_at(struct fixture *f, int r, uint8_t *base, uint64_t off, uint64_t len,
                     uint8_t v)
{
    memset(base + off, v, len);
    if (f->coop)
        dirty_mark(f->d, r, off, len);
}

/*
 * The known write set: first page, last page, a run across many bitmap
 * words, random pages, a 1-byte write at a page's end and a 16-byte write
 * straddling two pages.  Mirrors it into `expect`.
 */
static void write_known_set(struct fixture *f, unsigned long *expect, uint64_t seed)
{
    uint64_t npages = f->len / PS, s = seed;

    write_at(f, 0, f->mem, 0, 8, 1);
    bitmap_set(expect, 0);
    write_at(f, 0, f->mem, (npages - 1) * PS + PS - 8, 8, 2);
    bitmap_set(expect, npages - 1);
    for (uint64_t p = 1000; p < 1300 && p < npages; p++) {
        write_at(f, 0, f->mem, p * PS + 64, 8, 3);
        bitmap_set(expect, p);
    }
    for (int i = 0; i < 200; i++) {
        uint64_t p = xorshift(&s) % npages;
        write_at(f, 0, f->mem, p * PS + (xorshift(&s) % (PS / 8)) * 8, 8, 4);
        bitmap_set(expect, p);
    }
    write_at(f, 0, f->mem, 5000 * PS + PS - 1, 1, 5);
    bitmap_set(expect, 5000);
    write_at(f, 0, f->mem, 7001 * PS - 8, 16, 6);
    bitmap_set(expect, 7000);
    bitmap_set(expect, 7001);
}

static void assert_bitmap_equal(const unsigned long *got, const unsigned long *expect,
                                uint64_t nbits)
{
    for (uint64_t i = 0; i < nbits; i++)
        if (bitmap_test(got, i) != bitmap_test(expect, i))
            fail_msg("page %llu: reported %d, written %d", (unsigned long long)i,
                     bitmap_test(got, i), bitmap_test(expect, i));
}

/* Start, write a known set, sync: exactly that set; sync again: nothing. */
static void exact_set(void **state, bool populate)
{
    struct fixture f;
    unsigned long *expect, *got;
    int64_t n;

    fixture_open(&f, state, REGION, populate);
    expect = bitmap_new(NPAGES);
    got = bitmap_new(NPAGES);
    start_ok(f.d);
    write_known_set(&f, expect, 42);

    n = sync_ok(f.d, 0, got);
    assert_bitmap_equal(got, expect, NPAGES);
    assert_int_equal(n, bitmap_count(expect, NPAGES));

    bitmap_zero(got, NPAGES);
    assert_int_equal(sync_ok(f.d, 0, got), 0);
    assert_int_equal(bitmap_count(got, NPAGES), 0);

    /* The count is of newly set bits: a page already in the bitmap is not counted. */
    bitmap_set(got, 6);
    write_at(&f, 0, f.mem, 5 * PS, 8, 7);
    write_at(&f, 0, f.mem, 6 * PS, 8, 7);
    assert_int_equal(sync_ok(f.d, 0, got), 1);
    assert_int_equal(bitmap_count(got, NPAGES), 2);
    assert_true(bitmap_test(got, 5) && bitmap_test(got, 6));

    dirty_stop(f.d);
    bitmap_free(expect);
    bitmap_free(got);
    fixture_close(&f);
}

static void test_exact_set_populated(void **state)
{
    exact_set(state, true);
}

static void test_exact_set_unpopulated(void **state)
{
    exact_set(state, false);
}

/*
 * Every other page of the region: 8192 separate runs, more than one scan
 * returns at once, so the tracker must resume where the kernel stopped.
 */
static void test_many_runs(void **state)
{
    struct fixture f;
    unsigned long *expect = bitmap_new(NPAGES), *got = bitmap_new(NPAGES);

    fixture_open(&f, state, REGION, true);
    start_ok(f.d);
    for (int round = 0; round < 2; round++) {
        bitmap_zero(expect, NPAGES);
        bitmap_zero(got, NPAGES);
        for (uint64_t p = (uint64_t)round; p < NPAGES; p += 2) {
            write_at(&f, 0, f.mem, p * PS, 1, 1);
            bitmap_set(expect, p);
        }
        assert_int_equal(sync_ok(f.d, 0, got), NPAGES / 2);
        assert_bitmap_equal(got, expect, NPAGES);
    }
    bitmap_zero(got, NPAGES);
    assert_int_equal(sync_ok(f.d, 0, got), 0);
    bitmap_free(expect);
    bitmap_free(got);
    fixture_close(&f);
}

/* Stop, untracked writes, start again: only writes after the new start count. */
static void test_restart(void **state)
{
    struct fixture f;
    unsigned long *expect = bitmap_new(NPAGES), *got = bitmap_new(NPAGES);

    fixture_open(&f, state, REGION, true);
    for (int round = 0; round < 3; round++) {
        start_ok(f.d);
        bitmap_zero(expect, NPAGES);
        bitmap_zero(got, NPAGES);
        write_known_set(&f, expect, 1000 + (uint64_t)round);
        assert_int_equal(sync_ok(f.d, 0, got), bitmap_count(expect, NPAGES));
        assert_bitmap_equal(got, expect, NPAGES);
        /* Leave some writes unsynced: the next start must forget them. */
        write_at(&f, 0, f.mem, 123 * PS, 8, 9);
        dirty_stop(f.d);
        dirty_stop(f.d);      /* idempotent */
        /* Untracked writes (for cooperative, also marked: ignored while stopped). */
        for (uint64_t p = 2000; p < 2100; p++)
            write_at(&f, 0, f.mem, p * PS, 8, 10);
    }
    /* A second tracker on the same memory after the first is gone (a second migration). */
    dirty_free(f.d);
    {
        lm_error err = { 0 };
        f.d = dirty_new(f.tracker, &f.reg, 1, &err);
        if (!f.d)
            fail_msg("second dirty_new: %s", err.msg);
    }
    start_ok(f.d);
    bitmap_zero(expect, NPAGES);
    bitmap_zero(got, NPAGES);
    write_known_set(&f, expect, 77);
    assert_int_equal(sync_ok(f.d, 0, got), bitmap_count(expect, NPAGES));
    assert_bitmap_equal(got, expect, NPAGES);
    bitmap_free(expect);
    bitmap_free(got);
    fixture_close(&f);
}

/* Two regions: each sync reports only its own region's pages. */
static void test_two_regions(void **state)
{
    const char *tracker = *state;
    bool coop = !strcmp(tracker, "cooperative");
    uint64_t len[2] = { 8 << 20, 3 << 20 };
    dirty_region regs[2];
    unsigned long *got[2];
    lm_error err = { 0 };
    dirty_tracker *d;

    for (int r = 0; r < 2; r++) {
        regs[r] = (dirty_region){ .host = map_anon(len[r], true), .length = len[r],
                                     .page_size = PS };
        got[r] = bitmap_new(len[r] / PS);
    }
    d = dirty_new(tracker, regs, 2, &err);
    if (!d) {
        for (int r = 0; r < 2; r++)
            munmap(regs[r].host, len[r]);
        if (!coop) {
            print_message("# SKIP: uffd-wp tracker unavailable here: %s\n", err.msg);
            skip();
        }
        fail_msg("dirty_new: %s", err.msg);
    }
    start_ok(d);
    regs[0].host[3 * PS] = 1;
    regs[1].host[7 * PS] = 1;
    regs[1].host[len[1] - 1] = 1;
    if (coop) {
        dirty_mark(d, 0, 3 * PS, 1);
        dirty_mark(d, 1, 7 * PS, 1);
        dirty_mark(d, 1, len[1] - 1, 1);
    }
    assert_int_equal(sync_ok(d, 0, got[0]), 1);
    assert_true(bitmap_test(got[0], 3));
    assert_int_equal(sync_ok(d, 1, got[1]), 2);
    assert_true(bitmap_test(got[1], 7));
    assert_true(bitmap_test(got[1], len[1] / PS - 1));
    dirty_free(d);
    for (int r = 0; r < 2; r++) {
        munmap(regs[r].host, len[r]);
        bitmap_free(got[r]);
    }
}

/* ---------------------------------------------------------------- concurrent writer */

#define MAX_RECORDED (1u << 20)
#define MIN_ROUNDS 30
#define MIN_RECORDED 20000
#define DEADLINE_MS 60000

struct writer {
    struct fixture *f;
    pthread_t tid;
    int stop;                 /* atomic: set by the main thread */
    uint64_t nrec;            /* atomic: entries of rec[] filled (published with release) */
    uint32_t *rec;            /* pages written, in order; the writer's own list */
};

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    uint64_t s = 0x123456789abcdefULL, val = 1;
    uint64_t npages = w->f->len / PS, n = 0;

    while (!__atomic_load_n(&w->stop, __ATOMIC_RELAXED) && n < MAX_RECORDED) {
        uint64_t r = xorshift(&s);
        uint64_t page = r % npages, word = (r >> 32) % (PS / 8);
        uint64_t *p = (uint64_t *)(w->f->mem + page * PS) + word;

        /* Atomic only so the test's racy page copy is well defined. */
        __atomic_store_n(p, val++, __ATOMIC_RELAXED);
        if (w->f->coop)
            dirty_mark(w->f->d, 0, page * PS + word * 8, 8);
        w->rec[n++] = (uint32_t)page;
        __atomic_store_n(&w->nrec, n, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Copy reported pages to the shadow, the way precopy sends them. */
static void copy_reported(struct fixture *f, const unsigned long *map, uint8_t *shadow,
                          unsigned long *ever)
{
    uint64_t npages = f->len / PS;

    for (uint64_t p = bitmap_next_set(map, npages, 0); p < npages;
         p = bitmap_next_set(map, npages, p + 1)) {
        const uint64_t *src = (const uint64_t *)(f->mem + p * PS);
        uint64_t *dst = (uint64_t *)(shadow + p * PS);
        for (size_t i = 0; i < PS / 8; i++)
            dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
        bitmap_set(ever, p);
    }
}

static void test_concurrent_writer(void **state)
{
    struct fixture f;
    struct writer w = { 0 };
    uint64_t npages = REGION / PS, rounds = 0, reported = 0;
    unsigned long *map = bitmap_new(npages), *ever = bitmap_new(npages);
    uint8_t *shadow;
    int64_t deadline;

    fixture_open(&f, state, REGION, true);
    shadow = malloc(REGION);
    assert_non_null(shadow);
    w.f = &f;
    w.rec = malloc(MAX_RECORDED * sizeof(*w.rec));
    assert_non_null(w.rec);

    /* Initial copy = the first precopy pass over an all-dirty bitmap. */
    start_ok(f.d);
    memcpy(shadow, f.mem, REGION);
    assert_int_equal(pthread_create(&w.tid, NULL, writer_main, &w), 0);

    deadline = time_now_ms() + DEADLINE_MS;
    while (rounds < MIN_ROUNDS || __atomic_load_n(&w.nrec, __ATOMIC_ACQUIRE) < MIN_RECORDED) {
        if (time_now_ms() > deadline) {
            __atomic_store_n(&w.stop, 1, __ATOMIC_RELAXED);
            pthread_join(w.tid, NULL);
            fail_msg("writer made no progress: %llu rounds, %llu writes in %d ms",
                     (unsigned long long)rounds,
                     (unsigned long long)__atomic_load_n(&w.nrec, __ATOMIC_ACQUIRE),
                     DEADLINE_MS);
        }
        bitmap_zero(map, npages);
        reported += (uint64_t)sync_ok(f.d, 0, map);
        copy_reported(&f, map, shadow, ever);
        rounds++;
    }
    __atomic_store_n(&w.stop, 1, __ATOMIC_RELAXED);
    pthread_join(w.tid, NULL);
    bitmap_zero(map, npages);
    reported += (uint64_t)sync_ok(f.d, 0, map);
    copy_reported(&f, map, shadow, ever);

    for (uint64_t i = 0; i < w.nrec; i++)
        if (!bitmap_test(ever, w.rec[i]))
            fail_msg("write %llu to page %u was never reported", (unsigned long long)i,
                     w.rec[i]);
    for (uint64_t p = 0; p < npages; p++)
        if (memcmp(shadow + p * PS, f.mem + p * PS, PS))
            fail_msg("page %llu: shadow differs from memory (a re-write was lost)",
                     (unsigned long long)p);
    print_message("# %s: %llu syncs, %llu writes, %llu pages reported\n", f.tracker,
                  (unsigned long long)rounds + 1, (unsigned long long)w.nrec,
                  (unsigned long long)reported);
    free(w.rec);
    free(shadow);
    bitmap_free(map);
    bitmap_free(ever);
    fixture_close(&f);
}

/* ---------------------------------------------------------------- tracker specifics */

static void test_coop_mark_rules(void **state)
{
    static const char *coop = "cooperative";
    struct fixture f;
    unsigned long *got = bitmap_new(NPAGES);
    void *st = (void *)coop;

    fixture_open(&f, &st, REGION, false);
    /* Before start: ignored. */
    dirty_mark(f.d, 0, 0, PS);
    start_ok(f.d);
    assert_int_equal(sync_ok(f.d, 0, got), 0);
    /* Bad region, zero length, past the end: ignored without harm. */
    dirty_mark(f.d, 1, 0, PS);
    dirty_mark(f.d, -1, 0, PS);
    dirty_mark(f.d, 0, 10 * PS, 0);
    dirty_mark(f.d, 0, REGION, PS);
    dirty_mark(f.d, 0, UINT64_MAX, 2);
    assert_int_equal(sync_ok(f.d, 0, got), 0);
    /* A range running past the end is clipped to the last page. */
    dirty_mark(f.d, 0, REGION - PS - 1, UINT64_MAX);
    assert_int_equal(sync_ok(f.d, 0, got), 2);
    assert_true(bitmap_test(got, NPAGES - 2) && bitmap_test(got, NPAGES - 1));
    /* A multi-page range marks every page it touches. */
    bitmap_zero(got, NPAGES);
    dirty_mark(f.d, 0, 10 * PS + 100, 3 * PS);
    assert_int_equal(sync_ok(f.d, 0, got), 4);
    assert_int_equal(bitmap_next_set(got, NPAGES, 0), 10);
    assert_int_equal(bitmap_next_clear(got, NPAGES, 10), 14);
    bitmap_free(got);
    fixture_close(&f);
}

static void test_uffd_ignores_marks_and_busy(void **state)
{
    static const char *uffd = "uffd-wp";
    struct fixture f;
    unsigned long *got = bitmap_new(NPAGES);
    void *st = (void *)uffd;
    lm_error err = { 0 };
    dirty_tracker *other;

    fixture_open(&f, &st, REGION, true);
    start_ok(f.d);
    /* uffd-wp sees writes, not reports. */
    dirty_mark(f.d, 0, 0, REGION);
    assert_int_equal(sync_ok(f.d, 0, got), 0);

    /* A second tracker cannot take memory that is already tracked: clear error. */
    other = dirty_new("uffd-wp", &f.reg, 1, &err);
    assert_non_null(other);
    assert_true(dirty_start(other, &err) < 0);
    assert_non_null(strstr(err.msg, "register region 0"));
    print_message("# expected error: %s\n", err.msg);
    dirty_free(other);
    /* ...and the failed attempt did not disturb the first tracker. */
    f.mem[9 * PS] = 1;
    assert_int_equal(sync_ok(f.d, 0, got), 1);
    assert_true(bitmap_test(got, 9));
    bitmap_free(got);
    fixture_close(&f);
}

/*
 * Writes the kernel makes into guest RAM (read(2) from a device or socket,
 * as a VMM's I/O thread does) are seen too -- also when the uffd had to be
 * opened user-mode-only (unprivileged callers).
 */
static void test_uffd_kernel_writes(void **state)
{
    static const char *uffd = "uffd-wp";
    struct fixture f;
    unsigned long *got = bitmap_new(NPAGES);
    void *st = (void *)uffd;
    int pfd[2];
    char msg[2 * 4096];

    fixture_open(&f, &st, REGION, true);
    start_ok(f.d);
    memset(msg, 0x5a, sizeof(msg));
    assert_int_equal(pipe(pfd), 0);
    /* Two pages' worth, landing across pages 100..102. */
    assert_int_equal(write(pfd[1], msg, sizeof(msg)), (ssize_t)sizeof(msg));
    assert_int_equal(read(pfd[0], f.mem + 100 * PS + 10, sizeof(msg)), (ssize_t)sizeof(msg));
    close(pfd[0]);
    close(pfd[1]);
    assert_int_equal(sync_ok(f.d, 0, got), 3);
    assert_int_equal(bitmap_next_set(got, NPAGES, 0), 100);
    assert_int_equal(bitmap_next_clear(got, NPAGES, 100), 103);
    bitmap_free(got);
    fixture_close(&f);
}

/* memfd MAP_SHARED guest RAM (how a VMM shares RAM with vhost-user). */
static void test_uffd_memfd(void **state)
{
    uint64_t len = 16 << 20, np = len / PS;
    int fd = memfd_create("lm-test", MFD_CLOEXEC);
    unsigned long *got = bitmap_new(np);
    lm_error err = { 0 };
    dirty_region reg;
    dirty_tracker *d;
    uint8_t *mem;

    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, (off_t)len), 0);
    mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    assert_true(mem != MAP_FAILED);
    memset(mem, 0, len / 2);   /* half populated, half never touched */
    reg = (dirty_region){ .host = mem, .length = len, .page_size = PS };
    d = dirty_new("uffd-wp", &reg, 1, &err);
    if (!d) {
        munmap(mem, len);
        close(fd);
        print_message("# SKIP: uffd-wp tracker unavailable here: %s\n", err.msg);
        skip();
    }
    if (dirty_start(d, &err) < 0) {
        dirty_free(d);
        munmap(mem, len);
        close(fd);
        print_message("# SKIP: uffd-wp cannot track memfd memory here: %s\n", err.msg);
        skip();
    }
    mem[0] = 1;
    mem[len / 2 - 1] = 1;
    mem[len / 2] = 1;
    mem[len - 1] = 1;
    assert_int_equal(sync_ok(d, 0, got), 4);
    assert_true(bitmap_test(got, 0) && bitmap_test(got, np / 2 - 1) &&
                bitmap_test(got, np / 2) && bitmap_test(got, np - 1));
    bitmap_zero(got, np);
    assert_int_equal(sync_ok(d, 0, got), 0);
    dirty_free(d);
    munmap(mem, len);
    close(fd);
    bitmap_free(got);
}

static void test_auto(void **state)
{
    uint8_t *mem = map_anon(1 << 20, true);
    dirty_region reg = { .host = mem, .length = 1 << 20, .page_size = PS };
    lm_error err = { 0 };
    dirty_tracker *u = dirty_new("uffd-wp", &reg, 1, &err);
    dirty_tracker *a = dirty_new("auto", &reg, 1, NULL);

    assert_non_null(a);
    if (!u) {
        /* Must still work, by falling back. */
        assert_string_equal(dirty_name(a), "cooperative");
        dirty_free(a);
        munmap(mem, 1 << 20);
        print_message("# SKIP: uffd-wp unavailable (%s); auto fell back to cooperative\n",
                      err.msg);
        skip();
    }
    assert_string_equal(dirty_name(a), "uffd-wp");
    dirty_free(u);
    dirty_free(a);
    munmap(mem, 1 << 20);
}

/*
 * Make userfaultfd unavailable to one thread (a seccomp filter: the syscall
 * fails with ENOSYS, /dev/userfaultfd's USERFAULTFD_IOC_NEW with EPERM) and
 * check, on that thread, that "uffd-wp" fails with a reason, "auto" falls
 * back to cooperative, and the fallback is logged exactly once for two
 * contexts.  Runs first, so no other test has logged the fallback yet.
 */
#if defined(__x86_64__) && defined(SYS_userfaultfd)
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

struct nouffd {
    dirty_region reg;
    int status;            /* 0 = all checks passed, else which one failed */
    char msg[LM_ERROR_MAX];
    char names[2][32];
};

static void *nouffd_main(void *arg)
{
    struct nouffd *t = arg;
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ioctl, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)USERFAULTFD_IOC_NEW, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { .len = sizeof(filter) / sizeof(filter[0]), .filter = filter };
    lm_error err = { 0 };
    dirty_tracker *d;

    /* Without SECCOMP_FILTER_FLAG_TSYNC the filter binds this thread only. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0) {
        t->status = -errno;
        return NULL;
    }
    d = dirty_new("uffd-wp", &t->reg, 1, &err);
    if (d) {
        dirty_free(d);
        t->status = 1;
        return NULL;
    }
    snprintf(t->msg, sizeof(t->msg), "%s", err.msg);
    for (int i = 0; i < 2; i++) {
        d = dirty_new("auto", &t->reg, 1, &err);
        if (!d) {
            t->status = 2;
            return NULL;
        }
        snprintf(t->names[i], sizeof(t->names[i]), "%s", dirty_name(d));
        dirty_free(d);
    }
    return NULL;
}

static void test_auto_fallback(void **state)
{
    uint8_t *mem = map_anon(1 << 20, false);
    struct nouffd t = { .reg = { .host = mem, .length = 1 << 20, .page_size = PS } };
    FILE *log = tmpfile();
    char buf[4096] = "", *p;
    int saved, nlog = 0;
    pthread_t tid;
    size_t got;

    /* Capture stderr (util_log) for the duration of the thread. */
    assert_non_null(log);
    fflush(stderr);
    saved = dup(2);
    assert_true(saved >= 0);
    assert_true(dup2(fileno(log), 2) >= 0);
    assert_int_equal(pthread_create(&tid, NULL, nouffd_main, &t), 0);
    pthread_join(tid, NULL);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(log);
    got = fread(buf, 1, sizeof(buf) - 1, log);
    buf[got] = 0;
    fclose(log);
    munmap(mem, 1 << 20);

    if (t.status < 0) {
        print_message("# SKIP: cannot install a seccomp filter: %s\n", strerror(-t.status));
        skip();
    }
    assert_int_equal(t.status, 0);
    print_message("# uffd-wp refused: %s\n", t.msg);
    assert_non_null(strstr(t.msg, "userfaultfd"));
    assert_string_equal(t.names[0], "cooperative");
    assert_string_equal(t.names[1], "cooperative");
    for (p = buf; (p = strstr(p, "uffd-wp unavailable")); p++)
        nlog++;
    print_message("# logged: %s", buf);
    assert_int_equal(nlog, 1);
    assert_non_null(strstr(buf, "using cooperative"));
}
#else
static void test_auto_fallback(void **state)
{
    print_message("# SKIP: the seccomp filter of this test is written for x86-64\n");
    skip();
}
#endif

/*
 * File-backed private memory (file: RAM): depending on the kernel it is
 * either tracked exactly or refused at start with a clear error -- never
 * silently untracked.
 */
static void test_uffd_file_memory(void **state)
{
    uint64_t len = 1 << 20, np = len / PS;
    int fd = open("/var/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    unsigned long *got = bitmap_new(np);
    lm_error err = { 0 };
    dirty_region reg;
    dirty_tracker *d;
    uint8_t *mem;

    if (fd < 0) {
        print_message("# SKIP: no O_TMPFILE in /var/tmp: %s\n", strerror(errno));
        skip();
    }
    assert_int_equal(ftruncate(fd, (off_t)len), 0);
    mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    assert_true(mem != MAP_FAILED);
    mem[PS] = 1;   /* one page already copied-on-write before start */
    reg = (dirty_region){ .host = mem, .length = len, .page_size = PS };
    d = dirty_new("uffd-wp", &reg, 1, &err);
    if (!d) {
        munmap(mem, len);
        close(fd);
        print_message("# SKIP: uffd-wp tracker unavailable here: %s\n", err.msg);
        skip();
    }
    if (dirty_start(d, &err) < 0) {
        print_message("# refused, as allowed: %s\n", err.msg);
        assert_non_null(strstr(err.msg, "register region 0"));
        /* The failed start left nothing behind: sync refuses, free is clean. */
        assert_true(dirty_sync(d, 0, got, &err) < 0);
    } else {
        print_message("# file-backed private memory is tracked by this kernel\n");
        mem[PS + 1] = 2;
        mem[3 * PS] = 3;   /* never touched before start */
        mem[len - 1] = 4;
        assert_int_equal(sync_ok(d, 0, got), 3);
        assert_true(bitmap_test(got, 1) && bitmap_test(got, 3) &&
                    bitmap_test(got, np - 1));
        bitmap_zero(got, np);
        assert_int_equal(sync_ok(d, 0, got), 0);
    }
    dirty_free(d);
    bitmap_free(got);
    munmap(mem, len);
    close(fd);
}

static void test_errors(void **state)
{
    uint8_t *mem = map_anon(1 << 20, false);
    dirty_region reg = { .host = mem, .length = 1 << 20, .page_size = PS };
    lm_error err = { 0 };
    unsigned long map[4] = { 0 };
    dirty_tracker *d;

    assert_null(dirty_new("soft-dirty", &reg, 1, &err));
    assert_int_equal(err.code, -EINVAL);
    assert_non_null(strstr(err.msg, "soft-dirty"));

    reg.host = mem + 100;
    assert_null(dirty_new("cooperative", &reg, 1, &err));
    assert_non_null(strstr(err.msg, "aligned"));
    reg.host = mem;
    reg.page_size = 3000;
    assert_null(dirty_new("cooperative", &reg, 1, &err));
    assert_non_null(strstr(err.msg, "power of two"));
    reg.page_size = PS;
    assert_null(dirty_new("cooperative", &reg, -1, &err));

    d = dirty_new("cooperative", &reg, 1, &err);
    assert_non_null(d);
    assert_int_equal(dirty_sync(d, 0, map, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "before start"));
    start_ok(d);
    assert_int_equal(dirty_start(d, &err), -EBUSY);
    assert_int_equal(dirty_sync(d, 1, map, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "no region 1"));
    assert_int_equal(dirty_sync(d, 0, NULL, &err), -EINVAL);
    dirty_free(d);      /* while started: stops first */
    dirty_free(NULL);
    munmap(mem, 1 << 20);
}

/* ---------------------------------------------------------------- measurement */

/* Print (not assert) the cost of one sync of 1 GiB with 1% of pages dirty. */
static void test_sync_cost_1g(void **state)
{
    const char *names[] = { "uffd-wp", "cooperative" };
    uint64_t len = 1ULL << 30, np = len / PS, ndirty = np / 100;
    uint8_t *mem = map_anon(len, true);
    unsigned long *map = bitmap_new(np);
    dirty_region reg = { .host = mem, .length = len, .page_size = PS };

    for (int k = 0; k < 2; k++) {
        lm_error err = { 0 };
        dirty_tracker *d = dirty_new(names[k], &reg, 1, &err);
        int64_t t0, t_clean, t_dirty, n;
        uint64_t s = 99;

        if (!d) {
            print_message("# %s: not measured (%s)\n", names[k], err.msg);
            continue;
        }
        t0 = time_now_ns();
        start_ok(d);
        t0 = time_now_ns() - t0;
        t_clean = time_now_ns();
        sync_ok(d, 0, map);
        t_clean = time_now_ns() - t_clean;
        for (uint64_t i = 0; i < ndirty; i++) {
            uint64_t p = xorshift(&s) % np;
            mem[p * PS] = (uint8_t)i;
            if (k == 1)
                dirty_mark(d, 0, p * PS, 1);
        }
        bitmap_zero(map, np);
        t_dirty = time_now_ns();
        n = sync_ok(d, 0, map);
        t_dirty = time_now_ns() - t_dirty;
        print_message("# %s, 1 GiB: start %.2f ms, clean sync %.3f ms, sync with %lld dirty "
                      "pages (1%%) %.3f ms\n", names[k], t0 / 1e6, t_clean / 1e6,
                      (long long)n, t_dirty / 1e6);
        /* Sanity, not performance: the pages written are the pages reported. */
        assert_true(n > 0 && (uint64_t)n <= ndirty);
        dirty_free(d);
    }
    bitmap_free(map);
    munmap(mem, len);
}

/*
 * Lazy arming (dirty_start_unarmed + dirty_arm), as the first pass of
 * a migration uses it: writes after a range's arm are reported; sync arms
 * whatever is left, so writes after it are reported everywhere; arming
 * backwards or past the end is harmless.
 */
static void test_lazy_arm(void **state)
{
    struct fixture f;
    lm_error err = { 0 };
    uint64_t npages = 1024;
    unsigned long *map = bitmap_new(npages);

    fixture_open(&f, state, npages * PS, true);
    if (dirty_start_unarmed(f.d, &err) < 0)
        fail_msg("dirty_start_unarmed: %s", err.msg);
    assert_int_equal(dirty_arm(f.d, 0, 512 * PS, &err), 0);
    assert_int_equal(dirty_arm(f.d, 0, 100 * PS, &err), 0);        /* backwards */
    write_at(&f, 0, f.mem, 5 * PS, 8, 1);        /* armed */
    write_at(&f, 0, f.mem, 700 * PS, 8, 1);      /* not armed yet */
    assert_true(sync_ok(f.d, 0, map) >= 1);
    assert_true(bitmap_test(map, 5));
    if (!f.coop)   /* written before its arm: the caller sends it anyway */
        assert_false(bitmap_test(map, 700));
    /* The sync armed the rest: every later write is seen. */
    bitmap_zero(map, npages);
    write_at(&f, 0, f.mem, 50 * PS, 8, 2);
    write_at(&f, 0, f.mem, 900 * PS, 8, 2);
    write_at(&f, 0, f.mem, (npages - 1) * PS, 8, 2);
    assert_int_equal(sync_ok(f.d, 0, map), 3);
    assert_true(bitmap_test(map, 50) && bitmap_test(map, 900) &&
                bitmap_test(map, npages - 1));
    assert_int_equal(dirty_arm(f.d, 0, 4 * npages * PS, &err), 0);      /* clamped */
    assert_int_equal(dirty_arm(f.d, 5, PS, &err), 0);                   /* no region 5 */
    bitmap_free(map);
    fixture_close(&f);
}

/* ------------------------------------------------------------ ops tracker */

/*
 * A fake program log for the ops tracker: `log` is what its sync reports
 * (bits past the region's end included, to check that they are ignored);
 * the counters and the arm ends say what the backend called.
 */
struct fake_log {
    unsigned long log[BITMAP_WORDS(1024)];
    int starts, syncs, stops, arms;
    uint64_t arm_end[8];
    uint64_t armed_at_sync;      /* last arm end when sync was called */
    int fail_start, fail_sync;   /* negative errno to return */
    const char *fail_msg;        /* NULL: leave err empty */
};

static int fake_start(void *opaque, lm_error *err)
{
    struct fake_log *f = opaque;

    f->starts++;
    if (f->fail_start) {
        if (f->fail_msg)
            snprintf(err->msg, sizeof(err->msg), "%s", f->fail_msg);
        return f->fail_start;
    }
    return 0;
}

static int fake_arm(void *opaque, int block, uint64_t end, lm_error *err)
{
    struct fake_log *f = opaque;

    assert_int_equal(block, 0);
    if (f->arms < 8)
        f->arm_end[f->arms] = end;
    f->arms++;
    return 0;
}

static int fake_sync(void *opaque, int block, unsigned long *bitmap, uint64_t npages,
                     lm_error *err)
{
    struct fake_log *f = opaque;

    f->syncs++;
    f->armed_at_sync = f->arms ? f->arm_end[f->arms - 1] : 0;
    assert_int_equal(block, 0);
    assert_int_equal(npages, 1000);
    /* the library hands a zeroed bitmap */
    for (size_t w = 0; w < BITMAP_WORDS(npages); w++)
        assert_int_equal(bitmap[w], 0);
    if (f->fail_sync) {
        if (f->fail_msg)
            snprintf(err->msg, sizeof(err->msg), "%s", f->fail_msg);
        return f->fail_sync;
    }
    memcpy(bitmap, f->log, BITMAP_WORDS(npages) * sizeof(*bitmap));
    memset(f->log, 0, sizeof(f->log));
    return 0;
}

static void fake_stop(void *opaque)
{
    ((struct fake_log *)opaque)->stops++;
}

static const lm_dirty_tracker_ops fake_ops = { fake_start, fake_arm, fake_sync, fake_stop };
static const lm_dirty_tracker_ops fake_ops_noarm = { fake_start, NULL, fake_sync, fake_stop };

static dirty_tracker *fake_open(struct fake_log *f, const lm_dirty_tracker_ops *ops,
                                uint8_t **mem)
{
    lm_error err = { 0 };
    dirty_region reg;
    dirty_tracker *d;

    memset(f, 0, sizeof(*f));
    *mem = map_anon(1000 * PS, false);
    reg = (dirty_region){ .host = *mem, .length = 1000 * PS, .page_size = PS };
    d = dirty_new_ops("fake-vmm", ops, f, &reg, 1, &err);
    if (!d)
        fail_msg("dirty_new_ops: %s", err.msg);
    assert_string_equal(dirty_name(d), "fake-vmm");
    /* creating it calls nothing of the program's */
    assert_int_equal(f->starts + f->syncs + f->stops + f->arms, 0);
    return d;
}

/* What the program's log reports ends up in the caller's bitmap, counted once. */
static void test_ops_forwarding(void **state)
{
    struct fake_log f;
    uint8_t *mem;
    dirty_tracker *d = fake_open(&f, &fake_ops, &mem);
    unsigned long *map = bitmap_new(1000);
    lm_error err = { 0 };

    assert_int_equal(dirty_start_unarmed(d, &err), 0);
    assert_int_equal(f.starts, 1);
    assert_int_equal(f.arms, 0);
    assert_int_equal(dirty_arm(d, 0, 512 * PS, &err), 0);
    assert_int_equal(dirty_arm(d, 0, 100 * PS, &err), 0);   /* backwards: not forwarded */
    assert_int_equal(f.arms, 1);
    assert_int_equal(f.arm_end[0], 512 * PS);

    /* pages 3 and 999 reported, page 3 already set by the caller; the log's
     * bits past the region's end (1000..1023) are dropped */
    bitmap_set(f.log, 3);
    bitmap_set(f.log, 999);
    f.log[BITMAP_WORDS(1000) - 1] |= ~0UL << (1000 % BITMAP_BITS_PER_LONG);
    bitmap_set(map, 3);
    assert_int_equal(sync_ok(d, 0, map), 1);
    /* the first sync armed the rest of the region before asking */
    assert_int_equal(f.arms, 2);
    assert_int_equal(f.armed_at_sync, 1000 * PS);
    assert_int_equal(bitmap_count(map, 1000), 2);
    assert_true(bitmap_test(map, 3) && bitmap_test(map, 999));
    assert_int_equal(map[BITMAP_WORDS(1000) - 1] >> (1000 % BITMAP_BITS_PER_LONG), 0);

    /* nothing reported: the caller's bits stay (a program cannot clear them) */
    assert_int_equal(sync_ok(d, 0, map), 0);
    assert_int_equal(bitmap_count(map, 1000), 2);

    /* cooperative reports are merged with the program's log */
    bitmap_zero(map, 1000);
    dirty_mark(d, 0, 10 * PS + 5, 1);
    bitmap_set(f.log, 10);
    bitmap_set(f.log, 11);
    assert_int_equal(sync_ok(d, 0, map), 2);
    assert_int_equal(bitmap_count(map, 1000), 2);
    assert_true(bitmap_test(map, 10) && bitmap_test(map, 11));
    assert_int_equal(f.syncs, 3);
    assert_int_equal(f.arms, 2);

    dirty_stop(d);
    dirty_stop(d);
    assert_int_equal(f.stops, 1);
    /* a second migration: start and stop once more, arming from scratch */
    assert_int_equal(dirty_start(d, &err), 0);
    assert_int_equal(f.starts, 2);
    assert_int_equal(f.arms, 3);
    assert_int_equal(f.arm_end[2], 1000 * PS);
    dirty_free(d);
    assert_int_equal(f.stops, 2);
    bitmap_free(map);
    munmap(mem, 1000 * PS);
}

/* Without an arm op, start tracks everything: arming is a no-op. */
static void test_ops_no_arm(void **state)
{
    struct fake_log f;
    uint8_t *mem;
    dirty_tracker *d = fake_open(&f, &fake_ops_noarm, &mem);
    unsigned long *map = bitmap_new(1000);
    lm_error err = { 0 };

    assert_int_equal(dirty_start_unarmed(d, &err), 0);
    assert_int_equal(dirty_arm(d, 0, 512 * PS, &err), 0);
    bitmap_set(f.log, 600);
    assert_int_equal(sync_ok(d, 0, map), 1);
    assert_true(bitmap_test(map, 600));
    dirty_free(d);
    assert_int_equal(f.starts, 1);
    assert_int_equal(f.stops, 1);
    bitmap_free(map);
    munmap(mem, 1000 * PS);
}

/* The program's failures come back with its message (or one naming the op). */
static void test_ops_errors(void **state)
{
    struct fake_log f;
    uint8_t *mem;
    dirty_tracker *d = fake_open(&f, &fake_ops, &mem);
    unsigned long *map = bitmap_new(1000);
    lm_error err = { 0 };
    dirty_region reg = { .host = mem, .length = 1000 * PS, .page_size = PS };
    lm_dirty_tracker_ops bad = fake_ops;

    /* start fails: not started, and stop is never called */
    f.fail_start = -EACCES;
    f.fail_msg = "fake: no log for you";
    assert_int_equal(dirty_start_unarmed(d, &err), -EACCES);
    assert_string_equal(err.msg, "fake: no log for you");
    assert_true(dirty_sync(d, 0, map, &err) < 0);          /* not started */
    f.fail_start = 0;
    f.fail_msg = NULL;
    assert_int_equal(dirty_start_unarmed(d, &err), 0);
    /* sync fails with the program's message, as it is */
    f.fail_sync = -EIO;
    f.fail_msg = "fake: dirty log lost";
    assert_int_equal(dirty_sync(d, 0, map, &err), -EIO);
    assert_int_equal(err.code, -EIO);
    assert_string_equal(err.msg, "fake: dirty log lost");
    /* without a message: one naming the tracker, the op and the block */
    f.fail_sync = -ENXIO;
    f.fail_msg = NULL;
    assert_int_equal(dirty_sync(d, 0, map, &err), -ENXIO);
    assert_non_null(strstr(err.msg, "fake-vmm: sync of block 0 failed"));
    dirty_free(d);
    assert_int_equal(f.starts, 2);
    assert_int_equal(f.stops, 1);

    bad.sync = NULL;
    assert_null(dirty_new_ops("x", &bad, &f, &reg, 1, &err));
    assert_int_equal(err.code, -EINVAL);
    assert_null(dirty_new_ops("x", NULL, &f, &reg, 1, &err));
    bitmap_free(map);
    munmap(mem, 1000 * PS);
}

/* One case per tracker, named so the TAP output says which one failed. */
#define PER_TRACKER(fn) \
    { .name = #fn "(uffd-wp)", .test_func = fn, .initial_state = (void *)"uffd-wp" }, \
    { .name = #fn "(cooperative)", .test_func = fn, .initial_state = (void *)"cooperative" }

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_auto_fallback),   /* first: see its comment */
        PER_TRACKER(test_exact_set_populated),
        PER_TRACKER(test_exact_set_unpopulated),
        PER_TRACKER(test_many_runs),
        PER_TRACKER(test_restart),
        PER_TRACKER(test_two_regions),
        PER_TRACKER(test_concurrent_writer),
        PER_TRACKER(test_lazy_arm),
        cmocka_unit_test(test_coop_mark_rules),
        cmocka_unit_test(test_uffd_ignores_marks_and_busy),
        cmocka_unit_test(test_uffd_kernel_writes),
        cmocka_unit_test(test_uffd_memfd),
        cmocka_unit_test(test_uffd_file_memory),
        cmocka_unit_test(test_auto),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_sync_cost_1g),
        cmocka_unit_test(test_ops_forwarding),
        cmocka_unit_test(test_ops_no_arm),
        cmocka_unit_test(test_ops_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
