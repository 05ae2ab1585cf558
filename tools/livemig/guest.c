/*
 * The demo guest: RAM, version table, writer threads, pause and throttle.
 * See guest.h for the model and the thread table.
 *
 * Park protocol (the one piece of synchronisation that matters):
 *
 *   stopper                              writer
 *   -------                              ------
 *   lock                                 loop:
 *   vm_running = false / holds++           if atomic park (acquire):
 *   park = true (release)                    lock; nparked++; signal parked_cv
 *   broadcast park_cv   (wakes sleepers)     while park: wait park_cv
 *   while nparked < nthreads:                nparked--; unlock
 *       timedwait parked_cv                write one page (no lock)
 *   unlock
 *
 * A writer tests `park` only between two page writes, so when the stopper
 * sees nparked == nthreads no write is in flight, and the mutex hand-off
 * orders every page write before the stopper's return (and the loader's
 * writes before a writer's next page, on start).  Writers that sleep for
 * their rate limit or throttle sleep on park_cv with the lock held around
 * the check, so a stop can never miss them: it wakes them and they park.
 *
 * Initial fill, destination prefault and verification run on a few helper
 * threads (one per CPU, at most 8) over disjoint page ranges: first touch of
 * fresh memory costs ~1.5-11 us per page on these machines, and a 2 GiB
 * check should take about a second.
 */
#include "guest.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define SLICE_NS 10000000ll       /* throttle slice, 10 ms */
#define IDLE_WAIT_NS 100000000ll  /* rate 0: re-check every 100 ms */
#define MAX_SLEEP_NS 10000000ll   /* longest rate-limit nap before re-checking */
#define MAX_HELPERS 8

struct writer {
    struct guest *g;
    unsigned k;
    pthread_t thread;
    uint64_t npages;              /* pages owned: k, k + vcpus, ... */
    uint64_t seq;                 /* sequential pattern cursor */
    uint64_t rng;                 /* splitmix64 state for the page choice */
    double tokens;                /* rate limit bucket */
    int64_t refill_ns;
    int64_t slice_ns;             /* start of the current throttle slice */
    _Atomic uint64_t writes;      /* written by this writer only */
    _Atomic int tid;              /* its kernel thread id, once it runs */
} __attribute__((aligned(64)));   /* own cache line: `writes` is hot */

struct guest {
    struct guest_config cfg;
    uint8_t *ram;
    int ram_fd;                   /* memfd / file backends; -1 otherwise */
    uint64_t pages;
    uint32_t *versions;
    enum guest_fill fill;         /* changes only while writers are parked */
    guest_write_hook hook;
    void *hook_opaque;

    _Atomic bool park;            /* = !vm_running || holds || exiting */
    _Atomic int64_t rate;
    _Atomic int throttle;
    _Atomic int64_t last_stop_ns;

    pthread_mutex_t lock;
    pthread_cond_t park_cv;       /* writers park and sleep here */
    pthread_cond_t parked_cv;     /* stoppers wait here for nparked */
    /* under lock */
    bool vm_running;
    int holds;
    bool exiting;
    unsigned nthreads;            /* writer threads created */
    unsigned nparked;
    unsigned nnapping;            /* in writer_sleep's timed wait */
    struct writer *writers;
};

int guest_pattern_parse(const char *s)
{
    if (!strcmp(s, "random"))
        return GUEST_PATTERN_RANDOM;
    if (!strcmp(s, "sequential"))
        return GUEST_PATTERN_SEQUENTIAL;
    if (!strcmp(s, "hotset"))
        return GUEST_PATTERN_HOTSET;
    return -1;
}

const char *guest_pattern_name(enum guest_pattern p)
{
    switch (p) {
    case GUEST_PATTERN_RANDOM: return "random";
    case GUEST_PATTERN_SEQUENTIAL: return "sequential";
    case GUEST_PATTERN_HOTSET: return "hotset";
    }
    return "?";
}

/* ---------------------------------------------------------------- helpers */

static struct timespec deadline_after_ns(int64_t ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t t = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec + ns;
    ts.tv_sec = t / 1000000000;
    ts.tv_nsec = t % 1000000000;
    return ts;
}

/* Uniform in [0, n) from 64 random bits (multiply-high, no division). */
static inline uint64_t pick_below(uint64_t r, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static inline uint64_t writer_rand(struct writer *w)
{
    w->rng += GUEST_GOLDEN;
    return guest_mix64(w->rng);
}

struct job {
    struct guest *g;
    uint64_t first, count;
    int rc;
    struct verify_report rep;
};

static unsigned helper_count(uint64_t pages)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1)
        n = 1;
    if (n > MAX_HELPERS)
        n = MAX_HELPERS;
    if ((uint64_t)n > pages / 1024 + 1)
        n = (long)(pages / 1024 + 1);
    return (unsigned)n;
}

/* Split all pages over helpers running fn; job 0 runs on the caller. */
static void run_jobs(struct guest *g, void *(*fn)(void *), struct job *jobs, unsigned n)
{
    pthread_t th[MAX_HELPERS];
    bool started[MAX_HELPERS] = { false };
    uint64_t per = g->pages / n, first = 0;

    for (unsigned i = 0; i < n; i++) {
        memset(&jobs[i], 0, sizeof(jobs[i]));
        jobs[i].g = g;
        jobs[i].first = first;
        jobs[i].count = i == n - 1 ? g->pages - first : per;
        first += jobs[i].count;
    }
    for (unsigned i = 1; i < n; i++)
        started[i] = pthread_create(&th[i], NULL, fn, &jobs[i]) == 0;
    fn(&jobs[0]);
    for (unsigned i = 1; i < n; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else
            fn(&jobs[i]);          /* no thread: do the share here */
    }
}

static void *job_fill(void *arg)
{
    struct job *j = arg;
    struct guest *g = j->g;

    for (uint64_t i = j->first; i < j->first + j->count; i++) {
        g->versions[i] = 1;
        page_fill(g->ram + i * GUEST_PAGE_SIZE, i, 1, g->fill);
    }
    return NULL;
}

static void *job_populate(void *arg)
{
    struct job *j = arg;
    uint8_t *p = j->g->ram + j->first * GUEST_PAGE_SIZE;
    size_t len = j->count * GUEST_PAGE_SIZE;

    if (madvise(p, len, MADV_POPULATE_WRITE) == 0)
        return NULL;
    if (errno != EINVAL) {
        j->rc = -errno;
        return NULL;
    }
    /* Kernel older than 5.14: touch every page instead. */
    for (size_t off = 0; off < len; off += GUEST_PAGE_SIZE)
        ((volatile uint8_t *)p)[off] = 0;
    return NULL;
}

static void *job_verify(void *arg)
{
    struct job *j = arg;
    verify_range(j->g->ram, j->g->versions, j->first, j->count, j->g->fill, &j->rep);
    return NULL;
}

/* ---------------------------------------------------------------- writers */

static void update_park_locked(struct guest *g)
{
    bool p = !g->vm_running || g->holds > 0 || g->exiting;
    atomic_store_explicit(&g->park, p, memory_order_release);
    pthread_cond_broadcast(&g->park_cv);
}

/* Park until released; false when the guest is going away. */
static bool writer_park(struct writer *w)
{
    struct guest *g = w->g;
    bool alive;

    pthread_mutex_lock(&g->lock);
    g->nparked++;
    pthread_cond_broadcast(&g->parked_cv);
    /* Interruptible: guest_free sets exiting and broadcasts. */
    while (atomic_load_explicit(&g->park, memory_order_relaxed) && !g->exiting)
        pthread_cond_wait(&g->park_cv, &g->lock);
    g->nparked--;
    alive = !g->exiting;
    pthread_mutex_unlock(&g->lock);
    w->refill_ns = w->slice_ns = tool_now_ns();
    w->tokens = 0;
    return alive;
}

/* Sleep up to ns, returning early when a stop, rate change or exit wakes us. */
static void writer_sleep(struct writer *w, int64_t ns)
{
    struct guest *g = w->g;
    struct timespec dl = deadline_after_ns(ns);

    pthread_mutex_lock(&g->lock);
    if (!atomic_load_explicit(&g->park, memory_order_relaxed)) {
        g->nnapping++;
        pthread_cond_timedwait(&g->park_cv, &g->lock, &dl);
        g->nnapping--;
    }
    pthread_mutex_unlock(&g->lock);
}

static uint64_t writer_pick(struct writer *w)
{
    uint64_t n = w->npages, j;

    switch (w->g->cfg.pattern) {
    case GUEST_PATTERN_SEQUENTIAL:
        j = w->seq;
        if (++w->seq == n)
            w->seq = 0;
        break;
    case GUEST_PATTERN_HOTSET: {
        uint64_t hot = n / 10 ? n / 10 : 1;
        if (pick_below(writer_rand(w), 10) < 9 || hot == n)
            j = pick_below(writer_rand(w), hot);
        else
            j = hot + pick_below(writer_rand(w), n - hot);
        break;
    }
    default:
        j = pick_below(writer_rand(w), n);
        break;
    }
    return w->k + j * w->g->cfg.vcpus;
}

static void writer_write_one(struct writer *w)
{
    struct guest *g = w->g;
    uint64_t i = writer_pick(w);
    uint32_t v = g->versions[i] + 1;

    if (v == 0)
        v = 1;          /* 2^32 writes to one page: wrap, never back to "unwritten" */
    g->versions[i] = v;
    page_fill(g->ram + i * GUEST_PAGE_SIZE, i, v, g->fill);
    if (g->hook)
        g->hook(g->hook_opaque, i);     /* after the write: see lm_ram_mark_dirty */
    atomic_store_explicit(&w->writes,
                          atomic_load_explicit(&w->writes, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

/* Rate limit: true when this writer may write a page now. */
static bool writer_take_token(struct writer *w, int64_t rate)
{
    double per = (double)rate / w->g->cfg.vcpus;
    int64_t now = tool_now_ns();
    double burst = per / 100 > 1 ? per / 100 : 1;    /* 10 ms worth */

    w->tokens += (double)(now - w->refill_ns) * per / 1e9;
    w->refill_ns = now;
    if (w->tokens > burst)
        w->tokens = burst;
    if (w->tokens >= 1) {
        w->tokens -= 1;
        return true;
    }
    double wait_ns = (1 - w->tokens) / per * 1e9;
    writer_sleep(w, wait_ns < MAX_SLEEP_NS ? (int64_t)wait_ns + 1 : MAX_SLEEP_NS);
    return false;
}

/* Throttle: after (100-p)% of a slice, sleep p% of it. */
static void writer_throttle(struct writer *w, int p)
{
    int64_t now = tool_now_ns();

    if (now - w->slice_ns < SLICE_NS * (100 - p) / 100)
        return;
    writer_sleep(w, SLICE_NS * p / 100);
    w->slice_ns = tool_now_ns();
}

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    struct guest *g = w->g;

    atomic_store(&w->tid, (int)gettid());

    for (;;) {
        if (atomic_load_explicit(&g->park, memory_order_acquire)) {
            if (!writer_park(w))
                break;
            continue;
        }
        int64_t rate = atomic_load_explicit(&g->rate, memory_order_relaxed);
        if (rate == 0) {
            writer_sleep(w, IDLE_WAIT_NS);
            continue;
        }
        if (rate > 0 && !writer_take_token(w, rate))
            continue;
        int p = atomic_load_explicit(&g->throttle, memory_order_relaxed);
        if (p > 0)
            writer_throttle(w, p);
        writer_write_one(w);
    }
    return NULL;
}

/* ---------------------------------------------------------------- public */

/* g->ram (and g->ram_fd) by the configured backend; see rambackend.h. */
static int guest_map_ram(struct guest *g, lm_error *err)
{
    return tool_ram_map(g->cfg.backend, g->cfg.mem_path, g->cfg.mem, g->cfg.incoming,
                        &g->ram, &g->ram_fd, err);
}

int guest_ram_fd(struct guest *g)
{
    return g->ram_fd;
}

int guest_new(struct guest **out, const struct guest_config *cfg, lm_error *err)
{
    struct guest *g;
    pthread_condattr_t ca;
    int rc = 0;

    *out = NULL;
    if (cfg->mem == 0 || cfg->mem % GUEST_PAGE_SIZE)
        return tool_error(err, -EINVAL, "guest memory size %llu is not a non-zero multiple of %u",
                          (unsigned long long)cfg->mem, GUEST_PAGE_SIZE);
    if (cfg->vcpus < 1 || cfg->vcpus > cfg->mem / GUEST_PAGE_SIZE)
        return tool_error(err, -EINVAL, "%u vcpus for %llu pages: need 1 to one per page",
                          cfg->vcpus, (unsigned long long)(cfg->mem / GUEST_PAGE_SIZE));

    g = calloc(1, sizeof(*g));
    if (!g)
        return tool_error(err, -ENOMEM, "out of memory");
    g->cfg = *cfg;
    g->ram_fd = -1;
    g->pages = cfg->mem / GUEST_PAGE_SIZE;
    g->fill = cfg->fill;
    atomic_init(&g->park, true);
    atomic_init(&g->rate, cfg->rate);
    atomic_init(&g->throttle, 0);
    atomic_init(&g->last_stop_ns, 0);
    pthread_mutex_init(&g->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->park_cv, &ca);
    pthread_cond_init(&g->parked_cv, &ca);
    pthread_condattr_destroy(&ca);

    g->versions = calloc(g->pages, sizeof(uint32_t));
    if (!g->versions) {
        rc = tool_error(err, -ENOMEM, "cannot allocate the version table (%llu pages)",
                        (unsigned long long)g->pages);
        goto out;
    }
    if ((rc = guest_map_ram(g, err)))
        goto out;

    struct job jobs[MAX_HELPERS];
    unsigned n = helper_count(g->pages);
    if (cfg->incoming && cfg->backend != GUEST_MEM_ANON) {
        /* memfd: a reservation, file: its content as it is (guest.h) */
    } else if (cfg->incoming) {
        run_jobs(g, job_populate, jobs, n);
        for (unsigned i = 0; i < n && !rc; i++)
            if (jobs[i].rc)
                rc = tool_error_errno(err, jobs[i].rc, "cannot prefault guest RAM");
    } else if (cfg->fill != GUEST_FILL_ZERO) {
        run_jobs(g, job_fill, jobs, n);
    }
out:
    if (rc) {
        guest_free(g);
        return rc;
    }
    *out = g;
    return 0;
}

void guest_set_write_hook(struct guest *g, guest_write_hook fn, void *opaque)
{
    g->hook = fn;
    g->hook_opaque = opaque;
}

int guest_start_writers(struct guest *g, lm_error *err)
{
    unsigned n = g->cfg.vcpus;
    size_t sz = sizeof(struct writer) * n;

    g->writers = aligned_alloc(64, sz);
    if (!g->writers)
        return tool_error(err, -ENOMEM, "out of memory");
    memset(g->writers, 0, sz);
    for (unsigned k = 0; k < n; k++) {
        struct writer *w = &g->writers[k];
        w->g = g;
        w->k = k;
        uint64_t ws = g->cfg.working_set ? g->cfg.working_set / GUEST_PAGE_SIZE : g->pages;
        if (ws > g->pages)
            ws = g->pages;
        if (ws < n)
            ws = n;     /* every writer owns at least one page */
        w->npages = (ws - k + n - 1) / n;
        w->rng = guest_mix64(g->cfg.seed * GUEST_GOLDEN + k + 1);
        atomic_init(&w->writes, 0);
        int rc = pthread_create(&w->thread, NULL, writer_main, w);
        if (rc)
            return tool_error_errno(err, -rc, "cannot start writer thread %u", k);
        pthread_mutex_lock(&g->lock);
        g->nthreads++;
        pthread_mutex_unlock(&g->lock);
    }
    return 0;
}

int guest_writer_tids(struct guest *g, int *tids, int max)
{
    unsigned n = g->cfg.vcpus < (unsigned)max ? g->cfg.vcpus : (unsigned)max;

    for (unsigned k = 0; k < n; k++) {
        /* a thread just created sets it first thing: wait for it, bounded */
        for (int i = 0; i < 5000 && !atomic_load(&g->writers[k].tid); i++)
            usleep(1000);
        tids[k] = atomic_load(&g->writers[k].tid);
        if (!tids[k])
            return -1;
    }
    return (int)n;
}

void guest_free(struct guest *g)
{
    if (!g)
        return;
    pthread_mutex_lock(&g->lock);
    g->exiting = true;
    update_park_locked(g);
    unsigned n = g->nthreads;
    pthread_mutex_unlock(&g->lock);
    for (unsigned k = 0; k < n; k++)
        pthread_join(g->writers[k].thread, NULL);
    free(g->writers);
    if (g->ram)
        munmap(g->ram, g->cfg.mem);
    if (g->ram_fd >= 0)
        close(g->ram_fd);
    free(g->versions);
    pthread_cond_destroy(&g->park_cv);
    pthread_cond_destroy(&g->parked_cv);
    pthread_mutex_destroy(&g->lock);
    free(g);
}

/* With the lock held and park already set: wait until every writer parked. */
static int quiesce_locked(struct guest *g, lm_error *err)
{
    struct timespec dl = deadline_after_ns((int64_t)GUEST_STOP_TIMEOUT_MS * 1000000);

    while (g->nparked < g->nthreads) {
        if (pthread_cond_timedwait(&g->parked_cv, &g->lock, &dl) == ETIMEDOUT &&
            g->nparked < g->nthreads)
            return tool_error(err, -ETIMEDOUT,
                              "guest writers did not stop within %d ms (%u of %u parked)",
                              GUEST_STOP_TIMEOUT_MS, g->nparked, g->nthreads);
    }
    return 0;
}

int guest_vm_stop(struct guest *g, lm_error *err)
{
    int64_t t0 = tool_now_ns();
    int rc;

    pthread_mutex_lock(&g->lock);
    g->vm_running = false;
    update_park_locked(g);
    rc = quiesce_locked(g, err);
    pthread_mutex_unlock(&g->lock);
    atomic_store_explicit(&g->last_stop_ns, tool_now_ns() - t0, memory_order_relaxed);
    return rc;
}

void guest_vm_start(struct guest *g)
{
    pthread_mutex_lock(&g->lock);
    g->vm_running = true;
    update_park_locked(g);
    pthread_mutex_unlock(&g->lock);
}

bool guest_vm_running(struct guest *g)
{
    pthread_mutex_lock(&g->lock);
    bool r = g->vm_running;
    pthread_mutex_unlock(&g->lock);
    return r;
}

void guest_throttle(struct guest *g, int percent)
{
    if (percent < 0)
        percent = 0;
    if (percent > 99)
        percent = 99;
    atomic_store_explicit(&g->throttle, percent, memory_order_relaxed);
}

int guest_hold(struct guest *g, lm_error *err)
{
    int rc;

    pthread_mutex_lock(&g->lock);
    g->holds++;
    update_park_locked(g);
    rc = quiesce_locked(g, err);
    if (rc) {
        g->holds--;
        update_park_locked(g);
    }
    pthread_mutex_unlock(&g->lock);
    return rc;
}

void guest_release(struct guest *g)
{
    pthread_mutex_lock(&g->lock);
    g->holds--;
    update_park_locked(g);
    pthread_mutex_unlock(&g->lock);
}

void guest_set_rate(struct guest *g, int64_t rate)
{
    atomic_store_explicit(&g->rate, rate < 0 ? GUEST_RATE_MAX : rate, memory_order_relaxed);
    /* Wake writers idling or napping under the old rate. */
    pthread_mutex_lock(&g->lock);
    pthread_cond_broadcast(&g->park_cv);
    pthread_mutex_unlock(&g->lock);
}

int64_t guest_rate(struct guest *g)
{
    return atomic_load_explicit(&g->rate, memory_order_relaxed);
}

uint64_t guest_writes(struct guest *g)
{
    uint64_t sum = 0;

    pthread_mutex_lock(&g->lock);
    unsigned n = g->nthreads;
    pthread_mutex_unlock(&g->lock);
    for (unsigned k = 0; k < n; k++)
        sum += atomic_load_explicit(&g->writers[k].writes, memory_order_relaxed);
    return sum;
}

unsigned guest_napping(struct guest *g)
{
    pthread_mutex_lock(&g->lock);
    unsigned n = g->nnapping;
    pthread_mutex_unlock(&g->lock);
    return n;
}

int64_t guest_last_stop_ns(struct guest *g)
{
    return atomic_load_explicit(&g->last_stop_ns, memory_order_relaxed);
}

const struct guest_config *guest_config(struct guest *g) { return &g->cfg; }
uint8_t *guest_ram(struct guest *g) { return g->ram; }
uint64_t guest_pages(struct guest *g) { return g->pages; }
uint32_t *guest_versions(struct guest *g) { return g->versions; }
enum guest_fill guest_fill(struct guest *g) { return g->fill; }
void guest_set_fill(struct guest *g, enum guest_fill f) { g->fill = f; }

int guest_verify(struct guest *g, struct verify_report *r, lm_error *err)
{
    struct job jobs[MAX_HELPERS];
    int64_t t0;
    int rc;

    memset(r, 0, sizeof(*r));
    rc = guest_hold(g, err);
    if (rc)
        return rc;
    t0 = tool_now_ns();
    unsigned n = helper_count(g->pages);
    run_jobs(g, job_verify, jobs, n);
    for (unsigned i = 0; i < n; i++)
        verify_merge(r, &jobs[i].rep);
    r->time_ms = (tool_now_ns() - t0) / 1000000;
    guest_release(g);
    return 0;
}
