/*
 * Whole migrations inside one process: a source and a destination context
 * over a real socket, a writer thread dirtying the source while it migrates,
 * and memory compared byte for byte at the end.  Two contexts in one process
 * is the point: the library has no globals.  Every wait is bounded.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <endian.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "livemig/livemig.h"

#define MEM (32ULL << 20)
#define PAGE 4096ULL
#define WAIT_MS 60000

/* Which sanitizer: gcc says it with __SANITIZE_*__, clang with
 * __has_feature (so the two are asked separately: a build is one of them). */
#if defined(__SANITIZE_THREAD__)
#define TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TEST_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif

/* Sanitizers slow the migration far more than the writer: dirty less there
 * so that the test still measures convergence, not the sanitizer's speed. */
#if defined(TEST_TSAN) || defined(TEST_ASAN)
#define WRITER_NAP_US 3000
#endif

/*
 * Under ThreadSanitizer the passes of a multifd migration of this dirtying
 * guest occasionally measure so little bandwidth (a few MB/s) that the
 * expected downtime of the last few hundred pages stays above the default
 * 300 ms limit for the whole WAIT_MS (seen in CI, test_multifd_zero_detection:
 * 47 syncs, 380 pages left, 1.9 s expected; test_multifd_channels: 2.2 s on
 * a loaded machine).  These tests check what arrives, not convergence
 * (test_cancel and integration-convergence do), so a TSan build allows a
 * switch-over at up to 5 s; the downtime assertions stand.  (Until this
 * was split out, clang's TSan build never got the allowance: only gcc
 * defines __SANITIZE_THREAD__.)
 */
#ifdef TEST_TSAN
#define TEST_DOWNTIME_LIMIT_MS 5000
#endif
#ifndef WRITER_NAP_US
#define WRITER_NAP_US 50
#endif

/*
 * A VMM's own dirty log behind lm_set_dirty_tracker_ops (tracker
 * "vmm-log"): the writer sets a page's bit after writing it, sync moves the
 * bits out.  The counters and the thread checks say how the library
 * called it; fail_at_sync and stop_writes script the two tests that use it.
 */
typedef struct vmm_log {
    unsigned long bits[MEM / PAGE / (8 * sizeof(unsigned long))];
    atomic_int starts, syncs, stops, wrong_thread;
    pthread_t thread;            /* start's; sync and stop must be on it too */
    int fail_at_sync;            /* 0, or which sync fails (1 = the first) */
    bool stop_writes;            /* vm stop writes pages 5 (logged) and 6 (not) */
} vmm_log;

typedef struct guest {
    lm_mig *m;
    vmm_log *log;
    uint8_t *mem;
    int block;
    bool coop;
    pthread_t writer;
    atomic_bool quit, paused_req, parked, running;
    atomic_int throttle;
    atomic_int nap_us;          /* writer pause every 64 page writes */
    atomic_ulong writes;
    uint32_t dev_value;
    int starts, stops;
    /* postcopy destination: a thread that reads pages once the guest runs,
     * so that it faults on the ones that have not arrived */
    bool toucher;
    pthread_t touch_thread;
    atomic_bool touching;
    atomic_ulong touched;
} guest;

static void *toucher_main(void *arg)
{
    guest *g = arg;
    uint64_t x = 0x2545F4914F6CDD1DULL, sum = 0;

    while (!atomic_load(&g->quit)) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        sum += ((volatile uint8_t *)g->mem)[(x % (MEM / PAGE)) * PAGE + 8];
        atomic_fetch_add(&g->touched, 1);
    }
    return (void *)(uintptr_t)sum;
}

static void *writer_main(void *arg)
{
    guest *g = arg;
    uint64_t x = 88172645463325252ULL;

    while (!atomic_load(&g->quit)) {
        if (atomic_load(&g->paused_req)) {
            atomic_store(&g->parked, true);
            while (atomic_load(&g->paused_req) && !atomic_load(&g->quit))
                usleep(100);
            atomic_store(&g->parked, false);
            continue;
        }
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        /* pages below 16 are never written: some of them stay zero */
        uint64_t page = 16 + x % (MEM / PAGE - 16);
        uint64_t *p = (uint64_t *)(g->mem + page * PAGE);
        for (int i = 0; i < 8; i++)
            p[(x >> (i * 3)) % (PAGE / 8)] = x + (uint64_t)i;
        if (g->coop)
            lm_ram_mark_dirty_idx(g->m, g->block, page * PAGE, PAGE);
        if (g->log)
            __atomic_fetch_or(&g->log->bits[page / (8 * sizeof(unsigned long))],
                              1UL << (page % (8 * sizeof(unsigned long))), __ATOMIC_RELEASE);
        atomic_fetch_add(&g->writes, 1);
        if (atomic_load(&g->writes) % 64 == 0)
            usleep((useconds_t)atomic_load(&g->nap_us));  /* dirtying, not saturating */
    }
    return NULL;
}

static void g_stop(void *opaque)
{
    guest *g = opaque;
    g->stops++;
    atomic_store(&g->paused_req, true);
    if (!atomic_load(&g->running))
        return;
    for (int i = 0; i < 100000 && !atomic_load(&g->parked); i++)
        usleep(10);
    assert_true(atomic_load(&g->parked));
    if (g->log && g->log->stop_writes) {
        /* the guest's last writes, after the migration's last pass: one the
         * log saw (must arrive), one it did not (must not be resent) */
        memset(g->mem + 5 * PAGE, 0xa5, PAGE);
        __atomic_fetch_or(&g->log->bits[0], 1UL << 5, __ATOMIC_RELEASE);
        memset(g->mem + 6 * PAGE, 0x5a, PAGE);
    }
}

static void g_start(void *opaque)
{
    guest *g = opaque;
    g->starts++;
    atomic_store(&g->paused_req, false);
    if (g->toucher && !atomic_exchange(&g->touching, true))
        assert_int_equal(pthread_create(&g->touch_thread, NULL, toucher_main, g), 0);
}

static void g_throttle(void *opaque, int pct)
{
    guest *g = opaque;
    atomic_store(&g->throttle, pct);
}

static int dev_save(lm_stream *s, void *opaque)
{
    guest *g = opaque;
    lm_put_be32(s, g->dev_value);
    return 0;
}

static int dev_load(lm_stream *s, void *opaque, uint32_t version, int type)
{
    guest *g = opaque;
    return lm_get_be32(s, &g->dev_value) ? -EIO : 0;
}

static const lm_vm_ops vm_ops = { g_stop, g_start, g_throttle };

static pthread_t main_thread;

/* The ops run on the migration thread, and all on the same one. */
static void vmm_check_thread(vmm_log *l, bool first)
{
    char name[16] = "";

    pthread_getname_np(pthread_self(), name, sizeof(name));
    if (first)
        l->thread = pthread_self();
    if (strcmp(name, "lm-migrate") || pthread_equal(pthread_self(), main_thread) ||
        !pthread_equal(pthread_self(), l->thread))
        atomic_fetch_add(&l->wrong_thread, 1);
}

static int vmm_start(void *opaque, lm_error *err)
{
    guest *g = opaque;

    atomic_fetch_add(&g->log->starts, 1);
    vmm_check_thread(g->log, true);
    return 0;
}

static int vmm_sync(void *opaque, int block, unsigned long *bitmap, uint64_t npages,
                    lm_error *err)
{
    guest *g = opaque;
    vmm_log *l = g->log;
    int n = atomic_fetch_add(&l->syncs, 1) + 1;

    vmm_check_thread(l, false);
    if (block != g->block || npages != MEM / PAGE)
        return -EINVAL;
    if (n == l->fail_at_sync) {
        snprintf(err->msg, sizeof(err->msg), "vmm-log: lost the dirty log of block %d",
                 block);
        return -EIO;
    }
    for (size_t w = 0; w < sizeof(l->bits) / sizeof(l->bits[0]); w++)
        bitmap[w] |= __atomic_exchange_n(&l->bits[w], 0UL, __ATOMIC_ACQUIRE);
    return 0;
}

static void vmm_stop(void *opaque)
{
    guest *g = opaque;

    vmm_check_thread(g->log, false);
    atomic_fetch_add(&g->log->stops, 1);
}

/* No arm: the log tracks everything from start on. */
static const lm_dirty_tracker_ops vmm_ops = { .start = vmm_start, .sync = vmm_sync,
                                              .stop = vmm_stop };
static const lm_device_ops dev_ops = { .save = dev_save, .load = dev_load };

static void guest_init(guest *g, bool source, const char *tracker, uint64_t mem)
{
    lm_error err = { 0 };

    memset(g, 0, sizeof(*g));
    atomic_init(&g->nap_us, WRITER_NAP_US);
    g->m = lm_new();
    g->mem = mmap(NULL, mem, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(g->mem != MAP_FAILED);
    if (source) {
        for (uint64_t i = 0; i < mem / 8; i += 3)
            ((uint64_t *)g->mem)[i] = i * 0x9e3779b97f4a7c15ULL;
        memset(g->mem + PAGE * 7, 0, PAGE * 9);     /* zero pages 7..15 */
        g->dev_value = 0x1234abcd;
    }
    if (lm_ram_register(g->m, "guest.ram", g->mem, mem, PAGE, &err))
        fail_msg("%s", err.msg);
    g->block = lm_ram_find(g->m, "guest.ram");
    assert_int_equal(lm_device_register(g->m, "dev", 0, 1, &dev_ops, g, &err), 0);
    lm_set_vm_ops(g->m, &vm_ops, g);
    if (tracker && !strcmp(tracker, "vmm-log")) {
        g->log = calloc(1, sizeof(*g->log));
        assert_non_null(g->log);
        if (lm_set_dirty_tracker_ops(g->m, "vmm-log", &vmm_ops, g, &err))
            fail_msg("%s", err.msg);
    } else if (tracker) {
        assert_int_equal(lm_set_dirty_tracker(g->m, tracker, &err), 0);
        g->coop = !strcmp(tracker, "cooperative");
    }
    if (source) {
        lm_runstate_set_running(g->m);
        atomic_store(&g->running, true);
        assert_int_equal(pthread_create(&g->writer, NULL, writer_main, g), 0);
    }
}

static void guest_fini(guest *g, uint64_t mem)
{
    if (atomic_load(&g->running)) {
        atomic_store(&g->quit, true);
        pthread_join(g->writer, NULL);
    }
    if (atomic_load(&g->touching)) {
        atomic_store(&g->quit, true);
        pthread_join(g->touch_thread, NULL);
    }
    lm_free(g->m);
    free(g->log);
    munmap(g->mem, mem);
}

/* stop runs after the final status is published: wait for it, bounded. */
static void wait_vmm_stopped(guest *g)
{
    for (int i = 0; i < 10000 && atomic_load(&g->log->stops) == 0; i++)
        usleep(1000);
}

static void sock_path(char *buf, size_t n, const char *tag)
{
    snprintf(buf, n, "unix:/tmp/lm-test-%d-%s.sock", getpid(), tag);
}

/* Bounded wait until g's writers have really dirtied memory. */
static void wait_dirtying(guest *g)
{
    for (int i = 0; i < 5000 && atomic_load(&g->writes) < 1000; i++)
        usleep(1000);
    assert_true(atomic_load(&g->writes) >= 1000);
}

/* lm_wait for COMPLETED (bounded by WAIT_MS), or fail saying where it stood. */
static void wait_completed(lm_mig *m, const char *what)
{
    lm_stats st;

    if (lm_wait(m, WAIT_MS) == LM_STATUS_COMPLETED)
        return;
    lm_query(m, &st);
    fail_msg("%s %s after %d ms: syncs %llu remaining %llu expected downtime %lld "
             "transferred %llu error '%s'", what, lm_status_name(st.status), WAIT_MS,
             (unsigned long long)st.dirty_sync_count, (unsigned long long)st.remaining,
             (long long)st.expected_downtime, (unsigned long long)st.transferred,
             st.error_desc);
}

/* multifd: 0 = off, else the channel count; zpd = zero-page-detection */
static void migrate_ok_mfc(const char *tracker, bool tcp, int multifd, const char *zpd,
                           const char *comp)
{
    guest src, dst;
    lm_error err = { 0 };
    lm_stats st;
    char uri[160];

    guest_init(&src, true, tracker, MEM);
    guest_init(&dst, false, NULL, MEM);
#ifdef TEST_DOWNTIME_LIMIT_MS
    assert_int_equal(lm_param_set_int(src.m, "downtime-limit", TEST_DOWNTIME_LIMIT_MS, &err), 0);
#endif
    if (comp)
        atomic_store(&src.nap_us, 20000);   /* zlib runs at ~0.1 GB/s per core here */
    if (multifd) {
        for (guest *g = &src; g; g = g == &src ? &dst : NULL) {
            assert_int_equal(lm_cap_set(g->m, "multifd", true, &err), 0);
            assert_int_equal(lm_param_set_int(g->m, "multifd-channels", multifd, &err), 0);
            if (zpd)
                assert_int_equal(lm_param_set_str(g->m, "zero-page-detection", zpd, &err), 0);
            if (comp)
                assert_int_equal(lm_param_set_str(g->m, "multifd-compression", comp, &err), 0);
        }
    }
    if (tcp)
        snprintf(uri, sizeof(uri), "tcp:127.0.0.1:0");
    else
        sock_path(uri, sizeof(uri), tracker ? tracker : "auto");
    if (lm_incoming(dst.m, uri, &err))
        fail_msg("incoming: %s", err.msg);
    lm_query(dst.m, &st);
    assert_true(st.socket_address[0]);
    assert_int_equal(lm_runstate_get(dst.m), LM_RUN_INMIGRATE);
    /* the guest is really dirtying memory when the migration starts */
    wait_dirtying(&src);
    if (lm_migrate(src.m, st.socket_address, &err)) {
        if (tracker && !strcmp(tracker, "uffd-wp") && strstr(err.msg, "uffd")) {
            guest_fini(&src, MEM);
            guest_fini(&dst, MEM);
            skip();   /* no userfaultfd write-protect here: said in err.msg */
        }
        fail_msg("migrate: %s", err.msg);
    }
    wait_completed(src.m, "source");
    wait_completed(dst.m, "destination");

    /* The source is stopped (postmigrate): its memory is final. */
    assert_int_equal(lm_runstate_get(src.m), LM_RUN_POSTMIGRATE);
    assert_int_equal(lm_runstate_get(dst.m), LM_RUN_RUNNING);
    assert_int_equal(dst.starts, 1);
    assert_true(atomic_load(&src.writes) > 0);
    assert_memory_equal(src.mem, dst.mem, MEM);
    assert_int_equal(dst.dev_value, 0x1234abcd);
    lm_query(src.m, &st);
    assert_true(st.dirty_sync_count >= 2);
    assert_true(st.downtime >= 0 && st.downtime < 5000);
    assert_true(st.normal > 0);
    if (zpd && !strcmp(zpd, "none"))
        assert_int_equal(st.duplicate, 0);
    else
        assert_true(st.duplicate > 0);
    if (tracker)
        assert_string_equal(st.dirty_tracker, tracker);
    if (multifd && comp)
        assert_true(st.multifd_bytes > 0 && st.multifd_bytes < st.normal_bytes / 2);
    else if (multifd)
        assert_true(st.multifd_bytes > MEM / 2 && st.multifd_bytes < st.transferred);
    else
        assert_int_equal(st.multifd_bytes, 0);
    guest_fini(&src, MEM);
    guest_fini(&dst, MEM);
}

static void migrate_ok_mf(const char *tracker, bool tcp, int multifd, const char *zpd)
{
    migrate_ok_mfc(tracker, tcp, multifd, zpd, NULL);
}

/*
 * Postcopy in one process: the source's writer never lets precopy converge
 * (16 MiB/s against a 1 ms downtime limit); after `syncs` dirty syncs (0:
 * at once, the idle race: nothing left, EOF may reach the listen thread
 * inside the package) lm_migrate_start_postcopy switches; the destination's
 * toucher faults on pages that have not arrived.  The source stops at the
 * switch and the destination never writes, so both memories must be equal.
 */
static void migrate_postcopy_p(int multifd, int syncs, bool idle, bool preempt)
{
    guest src, dst;
    lm_error err = { 0 };
    lm_stats st, dst_st;
    char uri[160];

    guest_init(&src, true, NULL, MEM);
    guest_init(&dst, false, NULL, MEM);
    dst.toucher = true;
    if (idle)
        atomic_store(&src.nap_us, 100000);
    for (guest *g = &src; g; g = g == &src ? &dst : NULL) {
        assert_int_equal(lm_cap_set(g->m, "postcopy-ram", true, &err), 0);
        if (preempt)
            assert_int_equal(lm_cap_set(g->m, "postcopy-preempt", true, &err), 0);
        if (multifd) {
            assert_int_equal(lm_cap_set(g->m, "multifd", true, &err), 0);
            assert_int_equal(lm_param_set_int(g->m, "multifd-channels", multifd, &err), 0);
        }
    }
    if (!idle) {
        assert_int_equal(lm_param_set_int(src.m, "downtime-limit", 1, &err), 0);
        /* 2 s for the first pass of 32 MiB: the writer (even napping
         * under a sanitizer) has dirtied all of it again by then, so the
         * switch always leaves pages for the toucher to fault on */
        assert_int_equal(lm_param_set_int(src.m, "max-bandwidth", 16 << 20, &err), 0);
    }
    sock_path(uri, sizeof(uri), preempt ? "pc-pre" : multifd ? "pc-mf" : "pc");
    if (lm_incoming(dst.m, uri, &err))
        fail_msg("incoming: %s", err.msg);
    lm_query(dst.m, &st);
    if (!idle)
        wait_dirtying(&src);
    if (lm_migrate(src.m, st.socket_address, &err))
        fail_msg("migrate: %s", err.msg);
    for (int i = 0; i < WAIT_MS && syncs; i++) {
        lm_query(src.m, &st);
        if (st.dirty_sync_count >= (uint64_t)syncs)
            break;
        usleep(1000);
    }
    assert_int_equal(lm_migrate_start_postcopy(src.m, &err), 0);
    wait_completed(src.m, "source");
    wait_completed(dst.m, "destination");
    assert_int_equal(lm_runstate_get(src.m), LM_RUN_POSTMIGRATE);
    assert_int_equal(lm_runstate_get(dst.m), LM_RUN_RUNNING);
    assert_int_equal(dst.starts, 1);
    assert_memory_equal(src.mem, dst.mem, MEM);
    assert_int_equal(dst.dev_value, 0x1234abcd);
    lm_query(src.m, &st);
    lm_query(dst.m, &dst_st);
    assert_true(st.postcopy_bytes > 0);
    if (!idle)
        assert_true(st.postcopy_requests > 0 && dst_st.postcopy_requests > 0);
    if (multifd)
        assert_true(st.multifd_bytes > 0);
    assert_true(atomic_load(&dst.touched) > 0);
    guest_fini(&src, MEM);
    guest_fini(&dst, MEM);
}

static void migrate_postcopy(int multifd, int syncs, bool idle)
{
    migrate_postcopy_p(multifd, syncs, idle, false);
}

static void test_postcopy(void **state)
{
    migrate_postcopy(0, 1, false);
}

static void test_postcopy_preempt(void **state)
{
    migrate_postcopy_p(2, 1, false, true);
}

static void test_postcopy_multifd(void **state)
{
    migrate_postcopy(2, 1, false);
}

static void test_postcopy_idle(void **state)
{
    for (int i = 0; i < 5; i++)
        migrate_postcopy(0, 0, true);
}

static void test_postcopy_refused(void **state)
{
    lm_mig *m = lm_new();
    lm_error err = { 0 };

    /* capability off, then no migration */
    assert_int_equal(lm_migrate_start_postcopy(m, &err), -EINVAL);
    assert_int_equal(lm_cap_set(m, "postcopy-ram", true, &err), 0);
    assert_int_equal(lm_migrate_start_postcopy(m, &err), -EBUSY);
    assert_int_equal(lm_cap_set(m, "mapped-ram", true, &err), 0);
    static uint8_t mem[4 * 4096] __attribute__((aligned(4096)));
    assert_int_equal(lm_ram_register(m, "r", mem, sizeof(mem), PAGE, &err), 0);
    assert_true(lm_migrate(m, "file:/tmp/lm-test-pc-refused", &err) < 0);
    assert_non_null(strstr(err.msg, "postcopy-ram cannot be combined with mapped-ram"));
    assert_int_equal(lm_cap_set(m, "mapped-ram", false, &err), 0);
    assert_true(lm_migrate(m, "file:/tmp/lm-test-pc-refused", &err) < 0);
    assert_non_null(strstr(err.msg, "needs a return path"));
    lm_free(m);
}

static void test_multifd_compression(void **state)
{
    migrate_ok_mfc(NULL, false, 2, NULL, "zlib");
    migrate_ok_mfc(NULL, true, 3, NULL, "zstd");
    migrate_ok_mfc(NULL, false, 1, "legacy", "zstd");
}

/* Many short migrations back to back, random channel counts and modes. */
static void test_multifd_stress(void **state)
{
    static const char *const zpd[] = { "none", "legacy", "multifd" };
    unsigned seed = (unsigned)time(NULL);

    print_message("# stress seed %u\n", seed);
    for (int i = 0; i < 16; i++) {
        int channels = 1 + rand_r(&seed) % 8;
        migrate_ok_mf(NULL, rand_r(&seed) % 2, channels, zpd[rand_r(&seed) % 3]);
    }
}

/* ---- files: plain stream and mapped-ram ---- */

static void set_file_caps(lm_mig *m, bool mapped, int channels, bool direct)
{
    lm_error err = { 0 };

    if (!mapped)
        return;
    assert_int_equal(lm_cap_set(m, "mapped-ram", true, &err), 0);
    if (channels) {
        assert_int_equal(lm_cap_set(m, "multifd", true, &err), 0);
        assert_int_equal(lm_param_set_int(m, "multifd-channels", channels, &err), 0);
    }
    if (direct)
        assert_int_equal(lm_param_set_bool(m, "direct-io", true, &err), 0);
}

/* Save src to `path`, restore into a fresh guest, compare memory.  */
static void file_round_trip(bool mapped, int channels, bool direct, bool live)
{
    guest src, dst;
    lm_error err = { 0 };
    char path[128], uri[160];
    struct stat sb;

    snprintf(path, sizeof(path), "/tmp/lm-test-%d.mig", getpid());
    snprintf(uri, sizeof(uri), "file:%s", path);
    unlink(path);
    guest_init(&src, true, NULL, MEM);
    atomic_store(&src.nap_us, 2000);    /* a disk is slower than a socket */
#ifdef TEST_DOWNTIME_LIMIT_MS
    assert_int_equal(lm_param_set_int(src.m, "downtime-limit", TEST_DOWNTIME_LIMIT_MS, &err), 0);
#endif
    wait_dirtying(&src);
    if (!live)
        g_stop(&src);
    set_file_caps(src.m, mapped, channels, direct);
    if (lm_migrate(src.m, uri, &err))
        fail_msg("save: %s", err.msg);
    wait_completed(src.m, "save");
    assert_int_equal(stat(path, &sb), 0);
    if (mapped)   /* one copy of each page at most, plus headers and device state */
        assert_true((uint64_t)sb.st_size <= MEM + (4u << 20));

    guest_init(&dst, false, NULL, MEM);
    set_file_caps(dst.m, mapped, channels, direct);
    if (lm_incoming(dst.m, uri, &err))
        fail_msg("restore: %s", err.msg);
    wait_completed(dst.m, "restore");
    assert_memory_equal(src.mem, dst.mem, MEM);
    assert_int_equal(dst.dev_value, 0x1234abcd);
    guest_fini(&src, MEM);
    guest_fini(&dst, MEM);
    unlink(path);
}

static void test_file_plain(void **state)
{
    file_round_trip(false, 0, false, false);
    file_round_trip(false, 0, false, true);
}

static void test_file_mapped_ram(void **state)
{
    file_round_trip(true, 0, false, false);
    file_round_trip(true, 0, false, true);
    file_round_trip(true, 2, false, true);
    file_round_trip(true, 4, false, false);
    file_round_trip(true, 2, true, true);
    file_round_trip(true, 1, true, false);
}

/* Damage a mapped-ram file: each refusal names the block and offset. */
static void mapped_refused(const char *path, const char *words)
{
    guest dst;
    lm_error err = { 0 };
    lm_stats st;
    char uri[160];

    snprintf(uri, sizeof(uri), "file:%s", path);
    guest_init(&dst, false, NULL, MEM);
    set_file_caps(dst.m, true, 2, false);
    assert_int_equal(lm_incoming(dst.m, uri, &err), 0);
    assert_int_equal(lm_wait(dst.m, WAIT_MS), LM_STATUS_FAILED);
    lm_query(dst.m, &st);
    if (!strstr(st.error_desc, words))
        fail_msg("error '%s' lacks '%s'", st.error_desc, words);
    assert_int_equal(dst.starts, 0);
    guest_fini(&dst, MEM);
}

static void patch_be64(const char *path, off_t off, uint64_t v)
{
    int fd = open(path, O_WRONLY);
    v = htobe64(v);
    assert_int_equal(pwrite(fd, &v, 8, off), 8);
    close(fd);
}

static void test_file_mapped_ram_malformed(void **state)
{
    guest src;
    lm_error err = { 0 };
    char path[128], copy[160], uri[160], cmd[400];
    /* header(22) + caps subsection(47) + START(17) + MEM_SIZE(8) + "guest.ram"(10) + len(8) */
    const off_t hdr = 22 + 47 + 17 + 8 + 10 + 8;

    snprintf(path, sizeof(path), "/tmp/lm-test-%d-mal.mig", getpid());
    snprintf(copy, sizeof(copy), "%s.copy", path);
    snprintf(uri, sizeof(uri), "file:%s", path);
    guest_init(&src, true, NULL, MEM);
    g_stop(&src);
    set_file_caps(src.m, true, 2, false);
    assert_int_equal(lm_migrate(src.m, uri, &err), 0);
    assert_int_equal(lm_wait(src.m, WAIT_MS), LM_STATUS_COMPLETED);

#define COPY() do { snprintf(cmd, sizeof(cmd), "cp %s %s", path, copy); \
                    assert_int_equal(system(cmd), 0); } while (0)
    COPY();
    assert_int_equal(truncate(copy, 1 << 20), 0);
    mapped_refused(copy, "truncated");
    COPY();
    patch_be64(copy, hdr + 4, 8192);                   /* page size */
    mapped_refused(copy, "page size 8192");
    COPY();
    patch_be64(copy, hdr + 12, 10);                    /* bitmap offset inside the stream */
    mapped_refused(copy, "block 'guest.ram'");
    COPY();
    patch_be64(copy, hdr + 20, 0);                     /* pages overlap the bitmap */
    mapped_refused(copy, "overlaps the bitmap");
    COPY();
    patch_be64(copy, hdr + 20, 1ULL << 40);            /* pages past the end */
    mapped_refused(copy, "truncated");
#undef COPY
    /* without the capability, the file is refused at the configuration */
    {
        guest dst;
        lm_stats st;
        guest_init(&dst, false, NULL, MEM);
        assert_int_equal(lm_incoming(dst.m, uri, &err), 0);
        assert_int_equal(lm_wait(dst.m, WAIT_MS), LM_STATUS_FAILED);
        lm_query(dst.m, &st);
        assert_non_null(strstr(st.error_desc, "saved with mapped-ram"));
        guest_fini(&dst, MEM);
    }
    guest_fini(&src, MEM);
    unlink(path);
    unlink(copy);
}

/* The `compress` capability: COMPRESS_PAGE records in the main stream. */
static void compress_ok(int threads, int dthreads)
{
    guest src, dst;
    lm_error err = { 0 };
    lm_stats st;
    char uri[160];

    guest_init(&src, true, NULL, MEM);
    guest_init(&dst, false, NULL, MEM);
    atomic_store(&src.nap_us, 20000);
#ifdef TEST_DOWNTIME_LIMIT_MS
    assert_int_equal(lm_param_set_int(src.m, "downtime-limit", TEST_DOWNTIME_LIMIT_MS, &err), 0);
#endif
    assert_int_equal(lm_cap_set(src.m, "compress", true, &err), 0);
    assert_int_equal(lm_param_set_int(src.m, "compress-threads", threads, &err), 0);
    assert_int_equal(lm_cap_set(dst.m, "compress", true, &err), 0);
    assert_int_equal(lm_param_set_int(dst.m, "decompress-threads", dthreads, &err), 0);
    sock_path(uri, sizeof(uri), "compress");
    assert_int_equal(lm_incoming(dst.m, uri, &err), 0);
    wait_dirtying(&src);
    assert_int_equal(lm_migrate(src.m, uri, &err), 0);
    wait_completed(src.m, "source");
    wait_completed(dst.m, "destination");
    assert_memory_equal(src.mem, dst.mem, MEM);
    lm_query(src.m, &st);
    assert_true(st.compression && st.compress_pages > 0);
    assert_true(st.compression_rate > 1.5);
    guest_fini(&src, MEM);
    guest_fini(&dst, MEM);
}

static void test_compress_capability(void **state)
{
    lm_error err = { 0 };
    lm_mig *m = lm_new();

    compress_ok(1, 1);
    compress_ok(2, 2);
    /* not with multifd (QEMU's rule) */
    assert_int_equal(lm_cap_set(m, "compress", true, &err), 0);
    assert_int_equal(lm_cap_set(m, "multifd", true, &err), 0);
    assert_int_not_equal(lm_migrate(m, "unix:/tmp/lm-never", &err), 0);
    assert_non_null(strstr(err.msg, "cannot be combined"));
    lm_free(m);
}

static void migrate_ok(const char *tracker, bool tcp)
{
    migrate_ok_mf(tracker, tcp, 0, NULL);
}

static void test_multifd_channels(void **state)
{
    migrate_ok_mf(NULL, false, 1, NULL);
    migrate_ok_mf(NULL, true, 2, NULL);
    migrate_ok_mf("cooperative", false, 4, NULL);
    migrate_ok_mf(NULL, true, 8, NULL);
}

static void test_multifd_zero_detection(void **state)
{
    migrate_ok_mf(NULL, false, 2, "none");
    migrate_ok_mf(NULL, false, 2, "legacy");
    migrate_ok_mf(NULL, true, 3, "multifd");
}

static void test_multifd_bad_uri(void **state)
{
    guest src;
    lm_error err = { 0 };

    guest_init(&src, true, NULL, MEM);
    assert_int_equal(lm_cap_set(src.m, "multifd", true, &err), 0);
    assert_int_not_equal(lm_migrate(src.m, "file:/tmp/lm-mf-never", &err), 0);
    assert_non_null(strstr(err.msg, "multifd needs a tcp: or unix: URI"));
    assert_int_not_equal(lm_param_set_str(src.m, "zero-page-detection", "sometimes", &err), 0);
    assert_non_null(strstr(err.msg, "none, legacy, multifd"));
    guest_fini(&src, MEM);
}

static void test_unix_uffd(void **state)
{
    migrate_ok("uffd-wp", false);
}

static void test_unix_cooperative(void **state)
{
    migrate_ok("cooperative", false);
}

static void test_tcp_auto(void **state)
{
    migrate_ok(NULL, true);
}

/*
 * The program's own dirty log as the tracker: only what it reports is sent
 * again, and its start / sync / stop are called on the migration thread,
 * start and stop once each.
 */
static void test_vmm_log_tracker(void **state)
{
    guest src, dst;
    lm_error err = { 0 };
    lm_stats st;
    char uri[160];
    uint8_t page6[PAGE];

    guest_init(&src, true, "vmm-log", MEM);
    guest_init(&dst, false, NULL, MEM);
    src.log->stop_writes = true;
    memcpy(page6, src.mem + 6 * PAGE, PAGE);
#ifdef TEST_DOWNTIME_LIMIT_MS
    assert_int_equal(lm_param_set_int(src.m, "downtime-limit", TEST_DOWNTIME_LIMIT_MS, &err), 0);
#endif
    assert_string_equal(lm_dirty_tracker_name(src.m), "vmm-log");
    sock_path(uri, sizeof(uri), "vmm-log");
    assert_int_equal(lm_incoming(dst.m, uri, &err), 0);
    wait_dirtying(&src);
    if (lm_migrate(src.m, uri, &err))
        fail_msg("migrate: %s", err.msg);
    wait_completed(src.m, "source");
    wait_completed(dst.m, "destination");
    wait_vmm_stopped(&src);

    assert_int_equal(atomic_load(&src.log->starts), 1);
    assert_int_equal(atomic_load(&src.log->stops), 1);
    assert_int_equal(atomic_load(&src.log->wrong_thread), 0);
    lm_query(src.m, &st);
    assert_string_equal(st.dirty_tracker, "vmm-log");
    assert_string_equal(lm_dirty_tracker_name(src.m), "vmm-log");
    /* one block: one call of sync per bitmap sync */
    assert_true(st.dirty_sync_count >= 2);
    assert_int_equal((uint64_t)atomic_load(&src.log->syncs), st.dirty_sync_count);
    /* the writer's pages (reported) and page 5 (reported after the stop)
     * arrived; page 6, written but never reported, was not sent again */
    assert_memory_equal(src.mem, dst.mem, 6 * PAGE);
    assert_memory_equal(src.mem + 7 * PAGE, dst.mem + 7 * PAGE, MEM - 7 * PAGE);
    assert_int_equal(dst.mem[5 * PAGE + 100], 0xa5);
    assert_memory_equal(dst.mem + 6 * PAGE, page6, PAGE);
    assert_int_equal(src.mem[6 * PAGE + 100], 0x5a);
    assert_int_equal(dst.starts, 1);
    guest_fini(&src, MEM);
    guest_fini(&dst, MEM);
}

/* A sync that fails fails the migration with the program's message. */
static void test_vmm_log_sync_fails(void **state)
{
    guest src, dst;
    lm_error err = { 0 };
    lm_stats st;
    char uri[160];

    guest_init(&src, true, "vmm-log", MEM);
    guest_init(&dst, false, NULL, MEM);
    src.log->fail_at_sync = 1;
    sock_path(uri, sizeof(uri), "vmm-fail");
    assert_int_equal(lm_incoming(dst.m, uri, &err), 0);
    assert_int_equal(lm_migrate(src.m, uri, &err), 0);
    assert_int_equal(lm_wait(src.m, WAIT_MS), LM_STATUS_FAILED);
    assert_int_equal(lm_wait(dst.m, WAIT_MS), LM_STATUS_FAILED);
    wait_vmm_stopped(&src);
    lm_query(src.m, &st);
    assert_non_null(strstr(st.error_desc, "vmm-log: lost the dirty log of block 0"));
    assert_int_equal(lm_runstate_get(src.m), LM_RUN_RUNNING);
    assert_int_equal(dst.starts, 0);
    assert_int_equal(atomic_load(&src.log->starts), 1);
    assert_int_equal(atomic_load(&src.log->syncs), 1);
    assert_int_equal(atomic_load(&src.log->stops), 1);
    assert_int_equal(atomic_load(&src.log->wrong_thread), 0);
    guest_fini(&src, MEM);
    guest_fini(&dst, MEM);
}

/* lm_set_dirty_tracker_ops checks what it is given. */
static void test_vmm_log_set_errors(void **state)
{
    lm_mig *m = lm_new();
    lm_error err = { 0 };
    lm_dirty_tracker_ops no_sync = vmm_ops;

    no_sync.sync = NULL;
    assert_int_equal(lm_set_dirty_tracker_ops(m, "", &vmm_ops, NULL, &err), -EINVAL);
    assert_int_equal(lm_set_dirty_tracker_ops(m, "has space", &vmm_ops, NULL, &err), -EINVAL);
    assert_int_equal(lm_set_dirty_tracker_ops(m, "a-name-that-is-far-too-long-for-it",
                                              &vmm_ops, NULL, &err), -EINVAL);
    assert_int_equal(lm_set_dirty_tracker_ops(m, "cooperative", &vmm_ops, NULL, &err),
                     -EINVAL);
    assert_int_equal(lm_set_dirty_tracker_ops(m, "kvm", &no_sync, NULL, &err), -EINVAL);
    assert_int_equal(lm_set_dirty_tracker_ops(m, "kvm", NULL, NULL, &err), -EINVAL);
    assert_string_equal(lm_dirty_tracker_name(m), "auto");
    assert_int_equal(lm_set_dirty_tracker_ops(m, "kvm-dirty-log", &vmm_ops, NULL, &err), 0);
    assert_string_equal(lm_dirty_tracker_name(m), "kvm-dirty-log");
    /* a built-in chosen later replaces it */
    assert_int_equal(lm_set_dirty_tracker(m, "cooperative", &err), 0);
    assert_string_equal(lm_dirty_tracker_name(m), "cooperative");
    lm_free(m);
}

static void test_cancel(void **state)
{
    guest src, dst;
    lm_error err = { 0 };
    lm_stats st;
    char uri[160];

    guest_init(&src, true, NULL, MEM);
    guest_init(&dst, false, NULL, MEM);
    sock_path(uri, sizeof(uri), "cancel");
    assert_int_equal(lm_incoming(dst.m, uri, &err), 0);
    /* 4 MB/s: the first pass alone takes ~8 s, so we cancel mid-pass */
    assert_int_equal(lm_param_set_int(src.m, "max-bandwidth", 4 << 20, &err), 0);
    assert_int_equal(lm_migrate(src.m, uri, &err), 0);
    for (int i = 0; i < 1000; i++) {
        lm_query(src.m, &st);
        if (st.status == LM_STATUS_ACTIVE && st.transferred > (1 << 20))
            break;
        usleep(10000);
    }
    assert_int_equal(st.status, LM_STATUS_ACTIVE);
    unsigned long before = atomic_load(&src.writes);
    assert_int_equal(lm_cancel(src.m, &err), 0);
    assert_int_equal(lm_wait(src.m, WAIT_MS), LM_STATUS_CANCELLED);
    assert_int_equal(lm_wait(dst.m, WAIT_MS), LM_STATUS_FAILED);
    assert_int_equal(lm_runstate_get(src.m), LM_RUN_RUNNING);
    assert_int_not_equal(lm_runstate_get(dst.m), LM_RUN_RUNNING);
    assert_int_equal(dst.starts, 0);
    lm_query(dst.m, &st);
    assert_non_null(strstr(st.error_desc, "truncated"));
    /* the source guest keeps running */
    for (int i = 0; i < 1000 && atomic_load(&src.writes) == before; i++)
        usleep(1000);
    assert_true(atomic_load(&src.writes) > before);
    guest_fini(&src, MEM);
    guest_fini(&dst, MEM);
}

/* A destination whose RAM does not match: it fails, tells the source over
 * the return path, and the source reports it and keeps its guest running. */
static void test_destination_refuses(void **state)
{
    guest src, dst;
    lm_error err = { 0 };
    lm_stats st;
    char uri[160];

    guest_init(&src, true, NULL, MEM);
    guest_init(&dst, false, NULL, MEM / 2);
    sock_path(uri, sizeof(uri), "refuse");
    assert_int_equal(lm_incoming(dst.m, uri, &err), 0);
    assert_int_equal(lm_migrate(src.m, uri, &err), 0);
    assert_int_equal(lm_wait(dst.m, WAIT_MS), LM_STATUS_FAILED);
    assert_int_equal(lm_wait(src.m, WAIT_MS), LM_STATUS_FAILED);
    lm_query(dst.m, &st);
    assert_non_null(strstr(st.error_desc, "this guest has 16777216"));
    lm_query(src.m, &st);
    assert_true(st.error_desc[0]);
    assert_int_equal(lm_runstate_get(src.m), LM_RUN_RUNNING);
    assert_int_equal(dst.starts, 0);
    guest_fini(&src, MEM);
    guest_fini(&dst, MEM / 2);
}

static void test_refused_and_bad_uri(void **state)
{
    guest src;
    lm_error err = { 0 };

    guest_init(&src, true, NULL, MEM);
    assert_int_not_equal(lm_migrate(src.m, "unix:/nonexistent/dir/sock", &err), 0);
    assert_true(err.msg[0]);
    assert_int_equal(lm_wait(src.m, 1000), LM_STATUS_FAILED);
    assert_int_not_equal(lm_migrate(src.m, "bogus:xyz", &err), 0);
    assert_non_null(strstr(err.msg, "bogus"));
    assert_int_equal(lm_runstate_get(src.m), LM_RUN_RUNNING);
    guest_fini(&src, MEM);
}

static void test_params_and_caps(void **state)
{
    lm_mig *m = lm_new();
    lm_error err = { 0 };
    int64_t v;
    bool on;

    assert_int_equal(lm_param_get(m, "downtime-limit", &v, NULL, NULL, 0), 0);
    assert_int_equal(v, 300);
    assert_int_equal(lm_param_get(m, "max-bandwidth", &v, NULL, NULL, 0), 0);
    assert_int_equal(v, 0);
    assert_int_equal(lm_param_set_int(m, "downtime-limit", 50, &err), 0);
    assert_int_equal(lm_param_get(m, "downtime-limit", &v, NULL, NULL, 0), 0);
    assert_int_equal(v, 50);
    assert_int_not_equal(lm_param_set_int(m, "cpu-throttle-initial", 100, &err), 0);
    assert_non_null(strstr(err.msg, "between 1 and 99"));
    assert_int_not_equal(lm_param_set_int(m, "nope", 1, &err), 0);
    assert_non_null(strstr(err.msg, "'nope'"));
    assert_int_equal(lm_cap_set(m, "auto-converge", true, &err), 0);
    assert_int_equal(lm_cap_get(m, "auto-converge", &on), 0);
    assert_true(on);
    assert_int_not_equal(lm_cap_set(m, "warp-drive", true, &err), 0);
    assert_int_equal(lm_parse_size("1G"), 1LL << 30);
    assert_int_equal(lm_parse_size("64M"), 64LL << 20);
    assert_int_equal(lm_parse_size("4096"), 4096);
    assert_int_equal(lm_parse_size("12Q"), -1);
    lm_free(m);
}

int main(void)
{
    main_thread = pthread_self();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_params_and_caps),
        cmocka_unit_test(test_postcopy),
        cmocka_unit_test(test_postcopy_multifd),
        cmocka_unit_test(test_postcopy_preempt),
        cmocka_unit_test(test_postcopy_idle),
        cmocka_unit_test(test_postcopy_refused),
        cmocka_unit_test(test_unix_uffd),
        cmocka_unit_test(test_unix_cooperative),
        cmocka_unit_test(test_tcp_auto),
        cmocka_unit_test(test_vmm_log_tracker),
        cmocka_unit_test(test_vmm_log_sync_fails),
        cmocka_unit_test(test_vmm_log_set_errors),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_destination_refuses),
        cmocka_unit_test(test_refused_and_bad_uri),
        cmocka_unit_test(test_multifd_channels),
        cmocka_unit_test(test_multifd_zero_detection),
        cmocka_unit_test(test_multifd_bad_uri),
        cmocka_unit_test(test_multifd_compression),
        cmocka_unit_test(test_multifd_stress),
        cmocka_unit_test(test_compress_capability),
        cmocka_unit_test(test_file_plain),
        cmocka_unit_test(test_file_mapped_ram),
        cmocka_unit_test(test_file_mapped_ram_malformed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
