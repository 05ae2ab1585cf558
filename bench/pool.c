/*
 * bench/pool -- page compression through the ring pool against the old
 * one-page-per-thread mutex/condition-variable model.
 *
 * Both models compress the same pages (text-like "word salad", 64 MiB by
 * default, zlib level 1, each page an independent zlib stream) and hand
 * every result to the producing thread, which copies it into a 1 MiB sink
 * as the migration thread copies records into its stream buffer:
 *
 *   mutex  the old QEMU compress-threads model, written from its
 *          description: each thread has ONE pending page, its own mutex and
 *          condition variable and a `done` flag; the producer, holding one
 *          shared lock, looks for a done thread, takes its result, gives it
 *          the next page and signals it, and waits on a shared condition
 *          variable when no thread is done.
 *   ring   compressor (src/compress) on worker_pool: per-worker SPSC rings of
 *          COMPRESS_RING requests, one MPSC done ring, bounded spin
 *          before futex sleep.
 *
 * Also measured in the same run, as the machine's limits: the same pages
 * compressed inline on one thread (no hand-off at all, results copied into
 * the sink), and "zlib": compression alone on one thread, no copy in or out
 * -- the work one worker cannot avoid, so the ceiling of any 1-worker model.
 *
 * The pool under test is the one this binary links (bench/meson.build):
 * `pool` links liblivemig and its ring pool (rows "ring"); `pool-mutex`
 * links the bench's mutex-model build of the library, bench/pool_mutex.c
 * (rows "pool-mx"), which then runs against this file's own mutex model as
 * a check that the two behave alike.
 *
 * Printed per model and worker count: pages/s, CPU use ((user+sys) / wall,
 * getrusage RUSAGE_SELF: every thread of the process), the workers' own
 * CPU per worker (/proc/self/task: a worker at ~100% is saturated, so the
 * model can only go faster by making the per-page work cheaper), voluntary and
 * involuntary context switches per 1000 pages (ru_nvcsw, ru_nivcsw, whole
 * process), futex sleeps of the pool's workers and owner per 1000 pages,
 * then ring/mutex ratios.  The models run interleaved, repetition by
 * repetition, so that a burst of other work hits all of them alike; each
 * figure is from the fastest of --reps runs.  Every run checks that the
 * total compressed size equals the inline one.
 *
 * Compression is CPU-bound: zlib -1 does ~0.1 GB/s per core here and the
 * machine has 2 cores, so 2 workers plus the producer compete for 2 CPUs.
 *
 * Usage: pool [--mib N] [--level L] [--reps R] [--workers 1,2] [--ring LIST]
 *             [--spin-ns LIST]
 *   --ring 4,8,16            ring model once per ring size (COMPRESS_RING)
 *   --spin-ns 0,20000,50000  ring model once per spin budget (-1: the pool's
 *                            own choice, printed "a:N")
 *   --wait-idle SECS         first wait up to SECS for the CPUs to be idle
 *   --produce-ns N           the producer busy-waits N ns per finished page,
 *                            standing in for its other work (the stream
 *                            write): with N near a page's compression time
 *                            the workers run dry and the spin budget matters
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "compress/compress.h"
#include "util/pool.h"
#include "util/time.h"

#define PAGE 4096
#define SINK_SIZE (1 << 20)
#define MAX_RUNS 16

/* The label of the compressor rows, after the pool this binary links:
 * bench/meson.build passes "ring" for `pool`, "pool-mx" for `pool-mutex`. */
#ifndef BENCH_POOL_ROWS
#define BENCH_POOL_ROWS "ring"
#endif

/* ------------------------------------------------------------------ input and sink */

static void fill_text(unsigned char *p, uint64_t seed)
{
    static const char *const words[] = {
        "migration", "page", "dirty", "the", "of", "guest", "memory", "a", "stream",
        "compress", "thread", "ring", "worker", "and", "to", "bitmap", "precopy", "in",
        "kernel", "is", "for", "socket", "buffer", "section", "device", "state", "qemu",
    };
    uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
    size_t i = 0;

    while (i < PAGE) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        const char *w = words[s % (sizeof(words) / sizeof(words[0]))];
        size_t n = strlen(w);

        for (size_t k = 0; k <= n && i < PAGE; k++)
            p[i++] = k < n ? (unsigned char)w[k] : (s & 0x300) ? ' ' : '\n';
    }
}

typedef struct sink {
    unsigned char *buf;
    size_t pos;
    uint64_t bytes, pages, compressed;
    int64_t work_ns;   /* extra producer work per page (--produce-ns) */
} sink;

static void sink_put(sink *s, const void *data, uint32_t len, bool compressed)
{
    /* 12 bytes of record header, then the data, wrapping like a stream
     * buffer that is flushed when full. */
    if (s->pos + len + 12 > SINK_SIZE)
        s->pos = 0;
    memset(s->buf + s->pos, 0, 12);
    memcpy(s->buf + s->pos + 12, data, len);
    s->pos += len + 12;
    s->bytes += len;
    s->pages++;
    s->compressed += compressed;
    if (s->work_ns) {
        /* Stand-in for the rest of the producer's job (the stream write). */
        int64_t end = time_now_ns() + s->work_ns;

        while (time_now_ns() < end)
            ;
    }
}

/* ------------------------------------------------------------------ measurement */

typedef struct result {
    double secs, pages_per_s, cpu, vcsw_k, ivcsw_k;
    double wcpu;                /* CPU of the worker threads / wall / workers; < 0: none */
    double wsleep_k, osleep_k;  /* ring: worker / owner futex sleeps per 1000 pages */
    int64_t spin_used;          /* ring: the pool's spin budget */
    uint64_t bytes;
} result;

typedef struct meter {
    int64_t t0;
    struct rusage r0;
} meter;

static void meter_start(meter *m)
{
    getrusage(RUSAGE_SELF, &m->r0);
    m->t0 = time_now_ns();
}

static double tv_secs(struct timeval tv)
{
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static result meter_stop(meter *m, uint64_t pages, uint64_t bytes)
{
    struct rusage r1;
    result r;

    r.secs = (double)(time_now_ns() - m->t0) / 1e9;
    getrusage(RUSAGE_SELF, &r1);
    r.pages_per_s = (double)pages / r.secs;
    r.cpu = (tv_secs(r1.ru_utime) - tv_secs(m->r0.ru_utime) + tv_secs(r1.ru_stime) -
             tv_secs(m->r0.ru_stime)) / r.secs;
    r.vcsw_k = (double)(r1.ru_nvcsw - m->r0.ru_nvcsw) * 1000.0 / (double)pages;
    r.ivcsw_k = (double)(r1.ru_nivcsw - m->r0.ru_nivcsw) * 1000.0 / (double)pages;
    r.bytes = bytes;
    r.wsleep_k = r.osleep_k = -1;
    r.wcpu = -1;
    return r;
}

/*
 * CPU seconds (user + sys) of this process's threads whose name starts
 * with `prefix`, from /proc/self/task/TID/stat (clock ticks: 10 ms here,
 * fine for runs of seconds).  The workers are named by their pool
 * ("compress/0") or by run_mutex ("mutex/0").
 */
static double threads_cpu(const char *prefix)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    double ticks = 0;

    if (!d)
        return 0;
    while ((e = readdir(d))) {
        char path[64], buf[512], *p;
        unsigned long long ut, st;
        FILE *f;
        size_t n;

        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "/proc/self/task/%.20s/stat", e->d_name);
        if (!(f = fopen(path, "r")))
            continue;
        n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = 0;
        /* "tid (comm) state ...": comm may hold spaces, ends at the last ')'. */
        p = strchr(buf, '(');
        if (!p || strncmp(p + 1, prefix, strlen(prefix)) || !(p = strrchr(buf, ')')))
            continue;
        /* Fields after comm: state(3) ... utime(14) stime(15). */
        if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut,
                   &st) == 2)
            ticks += (double)(ut + st);
    }
    closedir(d);
    return ticks / (double)sysconf(_SC_CLK_TCK);
}

/* Compress one page the way both models do; len, or PAGE when not smaller. */
static uint32_t zpage(z_stream *zs, const unsigned char *in, unsigned char *out, bool *comp)
{
    deflateReset(zs);
    zs->next_in = (unsigned char *)in;
    zs->avail_in = PAGE;
    zs->next_out = out;
    zs->avail_out = PAGE - 1;
    *comp = deflate(zs, Z_FINISH) == Z_STREAM_END;
    return *comp ? (uint32_t)zs->total_out : PAGE;
}

/* ------------------------------------------------------------------ inline */

static result run_inline(const unsigned char *pages, uint64_t n, int level, sink *out)
{
    static unsigned char buf[PAGE];
    z_stream zs;
    meter m;
    bool comp;

    memset(&zs, 0, sizeof(zs));
    deflateInit(&zs, level);
    out->bytes = out->pages = out->compressed = 0;
    meter_start(&m);
    for (uint64_t i = 0; i < n; i++) {
        uint32_t len = zpage(&zs, pages + i * PAGE, buf, &comp);

        sink_put(out, comp ? buf : pages + i * PAGE, len, comp);
    }
    result r = meter_stop(&m, n, out->bytes);
    deflateEnd(&zs);
    return r;
}

/*
 * Compression alone: no sink, no copy of the result.  What one worker must
 * spend per page whatever the hand-off, hence the 1-worker ceiling.
 */
static result run_zlib(const unsigned char *pages, uint64_t n, int level)
{
    static unsigned char buf[PAGE];
    z_stream zs;
    meter m;
    bool comp;
    uint64_t bytes = 0;

    memset(&zs, 0, sizeof(zs));
    deflateInit(&zs, level);
    meter_start(&m);
    for (uint64_t i = 0; i < n; i++)
        bytes += zpage(&zs, pages + i * PAGE, buf, &comp);
    result r = meter_stop(&m, n, bytes);
    deflateEnd(&zs);
    return r;
}

/* ------------------------------------------------------------------ mutex model */

typedef struct mthread {
    pthread_t th;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool has_work;        /* under lock */
    bool quit;            /* under lock */
    bool done;            /* under the shared done_lock */
    bool has_result;      /* producer only */
    bool comp;
    uint32_t len;
    unsigned char page[PAGE], out[PAGE];
    z_stream zs;
    struct mmodel *model;
} mthread;

typedef struct mmodel {
    pthread_mutex_t done_lock;
    pthread_cond_t done_cond;
    mthread *t;
    int n;
} mmodel;

static void *mthread_main(void *arg)
{
    mthread *t = arg;
    mmodel *m = t->model;

    for (;;) {
        pthread_mutex_lock(&t->lock);
        while (!t->has_work && !t->quit)
            pthread_cond_wait(&t->cond, &t->lock);
        if (t->quit) {
            pthread_mutex_unlock(&t->lock);
            return NULL;
        }
        t->has_work = false;
        pthread_mutex_unlock(&t->lock);

        t->len = zpage(&t->zs, t->page, t->out, &t->comp);

        pthread_mutex_lock(&m->done_lock);
        t->done = true;
        pthread_cond_signal(&m->done_cond);
        pthread_mutex_unlock(&m->done_lock);
    }
}

static void mthread_emit(mthread *t, sink *out)
{
    if (t->has_result)
        sink_put(out, t->comp ? t->out : t->page, t->len, t->comp);
    t->has_result = false;
}

static result run_mutex(const unsigned char *pages, uint64_t n, int nthreads, int level,
                        sink *out)
{
    mmodel m;
    meter mt;
    result r;

    memset(&m, 0, sizeof(m));
    m.n = nthreads;
    m.t = calloc((size_t)nthreads, sizeof(*m.t));
    pthread_mutex_init(&m.done_lock, NULL);
    pthread_cond_init(&m.done_cond, NULL);
    for (int i = 0; i < nthreads; i++) {
        mthread *t = &m.t[i];

        t->model = &m;
        t->done = true;
        pthread_mutex_init(&t->lock, NULL);
        pthread_cond_init(&t->cond, NULL);
        deflateInit(&t->zs, level);
        pthread_create(&t->th, NULL, mthread_main, t);
        char name[32];
        snprintf(name, sizeof(name), "mutex/%d", i);
        name[15] = 0;  /* the kernel's limit */
        pthread_setname_np(t->th, name);
    }
    out->bytes = out->pages = out->compressed = 0;
    meter_start(&mt);
    pthread_mutex_lock(&m.done_lock);
    for (uint64_t i = 0; i < n; i++) {
        for (;;) {
            int k;

            for (k = 0; k < nthreads && !m.t[k].done; k++)
                ;
            if (k == nthreads) {
                pthread_cond_wait(&m.done_cond, &m.done_lock);
                continue;
            }
            mthread *t = &m.t[k];

            t->done = false;
            mthread_emit(t, out);
            memcpy(t->page, pages + i * PAGE, PAGE);
            t->has_result = true;
            pthread_mutex_lock(&t->lock);
            t->has_work = true;
            pthread_cond_signal(&t->cond);
            pthread_mutex_unlock(&t->lock);
            break;
        }
    }
    /* Drain: wait for every thread to be done, then take the last results. */
    for (int k = 0; k < nthreads; k++) {
        while (!m.t[k].done)
            pthread_cond_wait(&m.done_cond, &m.done_lock);
        mthread_emit(&m.t[k], out);
    }
    pthread_mutex_unlock(&m.done_lock);
    r = meter_stop(&mt, n, out->bytes);
    r.wcpu = threads_cpu("mutex/") / r.secs / nthreads;

    for (int i = 0; i < nthreads; i++) {
        mthread *t = &m.t[i];

        pthread_mutex_lock(&t->lock);
        t->quit = true;
        pthread_cond_signal(&t->cond);
        pthread_mutex_unlock(&t->lock);
        pthread_join(t->th, NULL);
        deflateEnd(&t->zs);
        pthread_mutex_destroy(&t->lock);
        pthread_cond_destroy(&t->cond);
    }
    pthread_mutex_destroy(&m.done_lock);
    pthread_cond_destroy(&m.done_cond);
    free(m.t);
    return r;
}

/* ------------------------------------------------------------------ ring model */

static int ring_emit(void *opaque, uint64_t tag, const void *data, uint32_t len, bool comp)
{
    sink_put(opaque, data, len, comp);
    return 0;
}

static result run_ring(const unsigned char *pages, uint64_t n, int nthreads, int level,
                       unsigned ring, int64_t spin_ns, sink *out)
{
    pool_tuning t = POOL_TUNING_DEFAULT;
    pool_stats st;
    lm_error err = { 0 };
    compressor *c;
    meter m;
    result r;

    t.spin_ns = spin_ns;
    c = compress_new_tuned(nthreads, level, ring, &t, &err);
    if (!c) {
        fprintf(stderr, "pool: %s\n", err.msg);
        exit(1);
    }
    out->bytes = out->pages = out->compressed = 0;
    meter_start(&m);
    for (uint64_t i = 0; i < n; i++) {
        if (compress_submit(c, pages + i * PAGE, i, ring_emit, out, &err) < 0 ||
            compress_poll(c, ring_emit, out) < 0) {
            fprintf(stderr, "pool: %s\n", err.msg);
            exit(1);
        }
    }
    if (compress_flush(c, ring_emit, out, &err) < 0) {
        fprintf(stderr, "pool: %s\n", err.msg);
        exit(1);
    }
    r = meter_stop(&m, n, out->bytes);
    r.wcpu = threads_cpu("compress/") / r.secs / nthreads;
    pool_get_stats(compress_pool_of(c), &st);
    r.spin_used = pool_spin_ns(compress_pool_of(c));
    r.wsleep_k = (double)st.worker_sleeps * 1000.0 / (double)n;
    r.osleep_k = (double)st.owner_sleeps * 1000.0 / (double)n;
    compress_free(c);
    return r;
}

/* ------------------------------------------------------------------ machine load */

/* Idle share of all CPUs over `ms`, from /proc/stat (idle + iowait). */
static double idle_share(int ms)
{
    unsigned long long v[2][10] = { { 0 } };

    for (int k = 0; k < 2; k++) {
        FILE *f = fopen("/proc/stat", "r");

        if (!f || fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[k][0], &v[k][1],
                         &v[k][2], &v[k][3], &v[k][4], &v[k][5], &v[k][6], &v[k][7]) != 8) {
            if (f)
                fclose(f);
            return -1;
        }
        fclose(f);
        if (k == 0) {
            struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
            nanosleep(&ts, NULL);
        }
    }
    unsigned long long tot = 0, idle = v[1][3] + v[1][4] - v[0][3] - v[0][4];

    for (int i = 0; i < 8; i++)
        tot += v[1][i] - v[0][i];
    return tot ? (double)idle / (double)tot : -1;
}

/*
 * Other processes share this 2-CPU machine; a run while they compute
 * measures the scheduler, not the pool.  Wait up to `secs` for a second in
 * which the CPUs are >= 95% idle.
 */
static void wait_idle(int secs)
{
    double idle = -1;
    int t;

    for (t = 0; t < secs; t++)
        if ((idle = idle_share(1000)) >= 0.95)
            break;
    printf("# machine idle %.0f%% before the run (waited %d s of %d)\n", idle * 100, t, secs);
}

/* ------------------------------------------------------------------ main */

/*
 * The fastest of the runs: other processes on the machine can only slow a
 * run down, so the fastest is the one closest to what the code can do.
 */
static result best(const result *r, int n)
{
    result b = r[0];

    for (int i = 1; i < n; i++)
        if (r[i].pages_per_s > b.pages_per_s)
            b = r[i];
    return b;
}

static void row(const char *model, int workers, unsigned ring, int64_t spin, const result *r)
{
    char rs[16] = "-", ss[24] = "-", ws[16] = "-", os[16] = "-", wc[16] = "-";

    if (ring)
        snprintf(rs, sizeof(rs), "%u", ring);
    if (spin >= 0)
        snprintf(ss, sizeof(ss), "%lld", (long long)spin);
    else if (spin < -1)
        snprintf(ss, sizeof(ss), "a:%lld", (long long)(-spin - 2));
    if (r->wsleep_k >= 0) {
        snprintf(ws, sizeof(ws), "%.1f", r->wsleep_k);
        snprintf(os, sizeof(os), "%.1f", r->osleep_k);
    }
    if (r->wcpu >= 0)
        snprintf(wc, sizeof(wc), "%.0f%%", r->wcpu * 100);
    printf("%-7s %7d %4s %8s %9.0f %6.3f %5.0f%% %6s %9.1f %9.1f %8s %8s\n", model, workers,
           rs, ss, r->pages_per_s, r->pages_per_s * PAGE / 1e9, r->cpu * 100, wc, r->vcsw_k,
           r->ivcsw_k, ws, os);
}

static int parse_list(const char *s, int64_t *v, int max)
{
    int n = 0;

    while (*s && n < max) {
        char *end;

        v[n++] = strtoll(s, &end, 10);
        if (end == s)
            return -1;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

int main(int argc, char **argv)
{
    int64_t mib = 64, level = 1, reps = 3;
    int64_t workers[8] = { 1, 2 }, spins[16] = { -1 }, rings[8] = { COMPRESS_RING };
    int nworkers = 2, nspins = 1, nrings = 1, idle_wait = 0;
    int64_t produce_ns = 0;
    unsigned char *pages;
    uint64_t n;
    sink out;
    static result rg[8 * 16 * MAX_RUNS];  /* ring rows: [ring x spin][rep] */
    result inl[MAX_RUNS], zl[MAX_RUNS], mx[MAX_RUNS], base, zres, mres, rres;
    uint64_t ref_bytes;
    const char *plabel = BENCH_POOL_ROWS;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (!v) {
            fprintf(stderr, "usage: pool [--mib N] [--level L] [--reps R] [--workers LIST] "
                            "[--ring LIST] [--spin-ns LIST] [--wait-idle SECS] "
                            "[--produce-ns N]\n");
            return 2;
        }
        i++;
        if (!strcmp(a, "--mib"))
            mib = strtoll(v, NULL, 10);
        else if (!strcmp(a, "--level"))
            level = strtoll(v, NULL, 10);
        else if (!strcmp(a, "--reps"))
            reps = strtoll(v, NULL, 10);
        else if (!strcmp(a, "--workers"))
            nworkers = parse_list(v, workers, 8);
        else if (!strcmp(a, "--spin-ns"))
            nspins = parse_list(v, spins, 16);
        else if (!strcmp(a, "--ring"))
            nrings = parse_list(v, rings, 8);
        else if (!strcmp(a, "--wait-idle"))
            idle_wait = atoi(v);
        else if (!strcmp(a, "--produce-ns"))
            produce_ns = strtoll(v, NULL, 10);
        else {
            fprintf(stderr, "pool: unknown option %s\n", a);
            return 2;
        }
    }
    if (mib < 1 || level < 0 || level > 9 || reps < 1 || reps > MAX_RUNS || nworkers < 1 ||
        nspins < 1 || nrings < 1) {
        fprintf(stderr, "pool: bad arguments\n");
        return 2;
    }

    n = (uint64_t)mib * 1024 * 1024 / PAGE;
    pages = aligned_alloc(4096, n * PAGE);
    out.buf = malloc(SINK_SIZE);
    if (!pages || !out.buf) {
        fprintf(stderr, "pool: out of memory\n");
        return 1;
    }
    /* Writing every page also warms the memory (first touch is costly here). */
    for (uint64_t i = 0; i < n; i++)
        fill_text(pages + i * PAGE, i);
    memset(out.buf, 0, SINK_SIZE);
    out.pos = 0;
    out.work_ns = produce_ns;

    printf("# bench/pool: %llu text-like pages (%lld MiB), zlib level %lld, fastest of %lld;"
           " CPU-bound: zlib runs at ~0.1 GB/s per core and this machine has %ld CPUs\n",
           (unsigned long long)n, (long long)mib, (long long)level, (long long)reps,
           sysconf(_SC_NPROCESSORS_ONLN));
    if (produce_ns)
        printf("# the producer also busy-waits %lld ns per page it takes back\n",
               (long long)produce_ns);
    if (idle_wait > 0)
        wait_idle(idle_wait);
    /* The reference size; every later run must produce the same. */
    run_inline(pages, n, (int)level, &out);
    ref_bytes = out.bytes;
    printf("# compressed size %llu bytes (ratio %.2f), %llu of %llu pages compressed\n",
           (unsigned long long)ref_bytes, (double)n * PAGE / (double)ref_bytes,
           (unsigned long long)out.compressed, (unsigned long long)n);
    printf("# models run interleaved, rep by rep (inline, zlib, mutex, %s...), so that each "
           "sees the same machine; best of %lld each\n", plabel, (long long)reps);
    printf("%-7s %7s %4s %8s %9s %6s %6s %6s %9s %9s %8s %8s\n", "model", "workers", "ring",
           "spin-ns", "pages/s", "GB/s", "CPU", "wkCPU", "vcsw/1kp", "ivcsw/1kp", "wslp/1kp",
           "oslp/1kp");

    for (int w = 0; w < nworkers; w++) {
        int nr = nrings * nspins;

        for (int k = 0; k < reps; k++) {
            inl[k] = run_inline(pages, n, (int)level, &out);
            zl[k] = run_zlib(pages, n, (int)level);
            mx[k] = run_mutex(pages, n, (int)workers[w], (int)level, &out);
            if (mx[k].bytes != ref_bytes) {
                fprintf(stderr, "pool: mutex model produced %llu bytes, inline %llu\n",
                        (unsigned long long)mx[k].bytes, (unsigned long long)ref_bytes);
                return 1;
            }
            for (int g = 0; g < nr; g++) {
                result *rr = &rg[g * MAX_RUNS + k];

                *rr = run_ring(pages, n, (int)workers[w], (int)level,
                               (unsigned)rings[g / nspins], spins[g % nspins], &out);
                if (rr->bytes != ref_bytes) {
                    fprintf(stderr, "pool: %s model produced %llu bytes, inline %llu\n",
                            plabel, (unsigned long long)rr->bytes,
                            (unsigned long long)ref_bytes);
                    return 1;
                }
            }
        }
        base = best(inl, (int)reps);
        zres = best(zl, (int)reps);
        mres = best(mx, (int)reps);
        row("inline", 0, 0, -1, &base);
        if (base.cpu < 0.9)
            printf("# WARNING: the inline run got %.0f%% of a CPU: other processes are "
                   "running, figures are not reliable\n", base.cpu * 100);
        row("zlib", 0, 0, -1, &zres);
        row("mutex", (int)workers[w], 0, -1, &mres);
        for (int g = 0; g < nr; g++) {
            int64_t spin = spins[g % nspins];

            rres = best(&rg[g * MAX_RUNS], (int)reps);
            /* "a:N": the pool's automatic choice, N ns. */
            row(plabel, (int)workers[w], (unsigned)rings[g / nspins],
                spin < 0 ? -2 - rres.spin_used : spin, &rres);
            printf("    %s/mutex: pages/s x%.2f, voluntary switches x%.3f", plabel,
                   rres.pages_per_s / mres.pages_per_s,
                   mres.vcsw_k > 0 ? rres.vcsw_k / mres.vcsw_k : 0.0);
            if (rres.vcsw_k > 0)
                printf(" (%.1f times fewer)", mres.vcsw_k / rres.vcsw_k);
            printf("; %s/inline x%.2f; %s/zlib x%.2f\n", plabel,
                   rres.pages_per_s / base.pages_per_s, plabel,
                   rres.pages_per_s / zres.pages_per_s);
        }
    }
    free(pages);
    free(out.buf);
    return 0;
}
