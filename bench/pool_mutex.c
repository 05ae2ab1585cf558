/*
 * worker_pool, mutex model: the old one-pending-page-per-thread design behind
 * the same API as src/util/pool.c (contract in src/util/pool.h).  NOT FOR
 * PRODUCTION: a benchmark baseline.
 *
 * Why it exists: issue 5 asks whether a dirtying guest that the old QEMU
 * (7.2) compress-threads design cannot migrate within the downtime limit
 * migrates with the ring pool.  Answering that needs the old design inside
 * the real migration path, not only in a micro-benchmark, so this file
 * implements it behind worker_pool.  It is not part of liblivemig:
 * bench/meson.build links it with the library's other objects into a
 * bench-only library, and builds livemig-mutex, pool-mutex and the mutex
 * runs of the pool and compress tests on it (bench/compress compares
 * livemig with livemig-mutex; bench/compress.md has the results).  It uses
 * the pool's private util/pool_common.h, as pool.c does, so both models
 * check their arguments and run their threads alike.  It is written
 * from the description of that design, not from its code:
 *
 *   - each worker has ONE pending request (ring_size is validated as in
 *     pool.c and then ignored: it is always 1), its own mutex and condition
 *     variable; it sleeps on that condition variable whenever it has
 *     nothing to do (no spinning);
 *   - the owner gives work by finding a worker whose single slot is free,
 *     scanning from worker 0 as the old code did, and signalling it under
 *     the worker's mutex;
 *   - a worker that finishes marks itself done under one shared lock and
 *     signals one shared condition variable, every time; an owner with no
 *     free worker sleeps on that condition variable until enough are done.
 *
 * What it keeps from pool.h, so callers and tests do not change: the
 * request life cycle and its misuse checks, the error messages, waits
 * bounded by their timeout and ended by pool_interrupt(), destroy with
 * work queued or running, and the stats (worker_sleeps: a worker went idle
 * and waited; worker_wakes: a signal sent to a waiting worker; owner_sleeps
 * / owner_wakes: the same for the owner).  pool_spin_ns() is 0: the
 * workers never spin.
 *
 * Threads and locks:
 *   thread   | waits on                      | woken by              | owns
 *   ---------+-------------------------------+-----------------------+---------------------
 *   owner    | done_cond under done_lock, in | a finishing worker;   | free and kept
 *            | pool_wait_* only, bounded  | pool_interrupt()   | requests
 *   worker i | w->cond under w->lock while   | commit; destroy       | the request it runs
 *            | it has no pending request     |                       |
 * Lock order: done_lock before any w->lock (the owner may commit from
 * done(), which runs outside done_lock anyway); a worker never holds both.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/error.h"
#include "util/pool.h"
#include "util/pool_common.h"
#include "util/time.h"

#define RELAXED memory_order_relaxed

/* Owner's view of a request (pool_state), checked on every hand-over. */
enum { REQ_FREE = 0x46524545, REQ_HELD, REQ_QUEUED, REQ_KEPT };

typedef struct mworker {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    /* Under lock. */
    pool_req *pending;           /* committed, not yet taken by the worker */
    bool sleeping;               /* waiting on cond */
    bool quit;
    /* Under the pool's done_lock. */
    pool_req *finished;          /* handled, not yet polled by the owner */
    /* Owner only. */
    pool_req *free;              /* the worker's one request when it is free */
    /* Any thread (stats). */
    _Atomic uint64_t handled, sleeps;
    /* Fixed after create. */
    worker_pool *pool;
    pool_thread pt;
    bool locks_ready;
} mworker;

struct worker_pool {
    pthread_mutex_t done_lock;
    pthread_cond_t done_cond;    /* CLOCK_MONOTONIC, for the owner's deadlines */
    /* Under done_lock. */
    unsigned nfinished;          /* workers whose `finished` is set */
    bool owner_waiting;
    /* Written under done_lock, read anywhere. */
    _Atomic uint32_t interrupted;
    _Atomic uint64_t owner_sleeps, owner_wakes, worker_wakes, submitted;
    /* Owner only. */
    unsigned outstanding;        /* committed, not yet polled */
    /* Fixed after create. */
    unsigned nworkers;
    size_t stride;
    pool_ops ops;
    void *opaque;
    char name[16];
    bool locks_ready;
    unsigned char *reqmem;       /* nworkers * stride: one request per worker */
    mworker *w;
};

static pool_req *req_at(worker_pool *p, unsigned worker)
{
    return (pool_req *)(p->reqmem + (size_t)worker * p->stride);
}

static void *mworker_main(void *arg)
{
    mworker *w = arg;
    worker_pool *p = w->pool;

    pthread_mutex_lock(&w->lock);
    for (;;) {
        pool_req *req;

        if (w->quit)
            break;
        if (!w->pending) {
            /* One count per idle period: a spurious wake-up is not a new
             * sleep, and `sleeping` stays set until work arrives. */
            atomic_fetch_add_explicit(&w->sleeps, 1, RELAXED);
            w->sleeping = true;
            /* Unbounded, but interruptible: destroy sets quit and signals. */
            while (!w->pending && !w->quit)
                pthread_cond_wait(&w->cond, &w->lock);
            w->sleeping = false;
            continue;
        }
        req = w->pending;
        w->pending = NULL;
        pthread_mutex_unlock(&w->lock);

        p->ops.handler(p->opaque, w->pt.wctx, req);
        atomic_fetch_add_explicit(&w->handled, 1, RELAXED);

        pthread_mutex_lock(&p->done_lock);
        w->finished = req;
        p->nfinished++;
        if (p->owner_waiting)
            atomic_fetch_add_explicit(&p->owner_wakes, 1, RELAXED);
        /* Every completion signals, whether or not the owner waits: the
         * old design did, and the library makes the call cheap when no
         * thread waits. */
        pthread_cond_signal(&p->done_cond);
        pthread_mutex_unlock(&p->done_lock);

        pthread_mutex_lock(&w->lock);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static void pool_teardown(worker_pool *p)
{
    unsigned i;

    for (i = 0; i < p->nworkers; i++) {
        mworker *w = &p->w[i];

        if (!w->pt.started)
            continue;
        pthread_mutex_lock(&w->lock);
        w->quit = true;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->lock);
    }
    pool_threads_stop(&p->w[0].pt, sizeof(p->w[0]), p->nworkers, &p->ops, p->opaque);
    for (i = 0; i < p->nworkers; i++) {
        mworker *w = &p->w[i];

        if (w->locks_ready) {
            pthread_mutex_destroy(&w->lock);
            pthread_cond_destroy(&w->cond);
        }
    }
    if (p->locks_ready) {
        pthread_mutex_destroy(&p->done_lock);
        pthread_cond_destroy(&p->done_cond);
    }
    free(p->w);
    free(p->reqmem);
    free(p);
}

worker_pool *pool_create_tuned(unsigned nworkers, unsigned ring_size, size_t req_size,
                               const char *name, const pool_ops *ops, void *opaque,
                               const pool_tuning *tuning, lm_error *err)
{
    pthread_condattr_t ca;
    worker_pool *p;
    unsigned i;
    int r;

    /* The tuning (spin budget, ring start index) has nothing to act on here. */
    (void)tuning;
    if (!name)
        name = "pool";
    if (ring_size == 0)
        ring_size = POOL_RING_DEFAULT;
    if (pool_check_args(nworkers, ring_size, req_size, name, ops, err))
        return NULL;

    p = calloc(1, sizeof(*p));
    if (!p)
        goto oom;
    p->nworkers = nworkers;
    p->stride = (req_size + 63) & ~(size_t)63;
    p->ops = *ops;
    p->opaque = opaque;
    snprintf(p->name, sizeof(p->name), "%.10s", name);
    p->w = calloc(nworkers, sizeof(*p->w));
    p->reqmem = aligned_alloc(64, (size_t)nworkers * p->stride);
    if (!p->w || !p->reqmem) {
        free(p->w);
        free(p->reqmem);
        free(p);
        goto oom;
    }
    memset(p->reqmem, 0, (size_t)nworkers * p->stride);

    /* The owner's deadlines are CLOCK_MONOTONIC (util/time.h). */
    if ((r = pthread_condattr_init(&ca)) == 0) {
        if ((r = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC)) == 0)
            r = pthread_cond_init(&p->done_cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    if (r) {
        error_set_errno(err, -r, "pool %s: condition variable", p->name);
        free(p->w);
        free(p->reqmem);
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->done_lock, NULL);
    p->locks_ready = true;

    for (i = 0; i < nworkers; i++) {
        mworker *w = &p->w[i];
        pool_req *req = req_at(p, i);

        w->pool = p;
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cond, NULL);
        w->locks_ready = true;
        req->pool_worker = i;
        req->pool_state = REQ_FREE;
        req->pool_next = NULL;
        w->free = req;
    }
    if (pool_threads_start(p->w, &p->w[0].pt, sizeof(p->w[0]), nworkers, ops, opaque, p->name,
                           mworker_main, err))
        goto fail;
    return p;

fail:
    pool_teardown(p);
    return NULL;
oom:
    error_set(err, -ENOMEM, "pool %s: out of memory", name);
    return NULL;
}

void pool_destroy(worker_pool *p)
{
    if (p)
        pool_teardown(p);
}

pool_req *pool_submit_prepare(worker_pool *p)
{
    /* From worker 0 every time, as the old code looked for a done thread;
     * a worker's request is free once the owner polled its last result. */
    for (unsigned i = 0; i < p->nworkers; i++) {
        pool_req *req = p->w[i].free;

        if (req) {
            p->w[i].free = NULL;
            req->pool_state = REQ_HELD;
            return req;
        }
    }
    return NULL;
}

void pool_submit_commit(worker_pool *p, pool_req *req)
{
    mworker *w = &p->w[req->pool_worker];

    if (req->pool_state != REQ_HELD) {
        util_log("pool %s: commit of a request not obtained from prepare (state %#x)",
                 p->name, req->pool_state);
        abort();
    }
    req->pool_state = REQ_QUEUED;
    p->outstanding++;
    atomic_fetch_add_explicit(&p->submitted, 1, RELAXED);
    pthread_mutex_lock(&w->lock);
    /* Invariant: the worker's one request was free, so its slot is empty. */
    if (w->pending) {
        pthread_mutex_unlock(&w->lock);
        util_log("pool %s: worker %u slot taken with a free request", p->name,
                 req->pool_worker);
        abort();
    }
    w->pending = req;
    if (w->sleeping)
        atomic_fetch_add_explicit(&p->worker_wakes, 1, RELAXED);
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

void pool_req_release(worker_pool *p, pool_req *req)
{
    mworker *w = &p->w[req->pool_worker];

    if (req->pool_state != REQ_HELD && req->pool_state != REQ_KEPT) {
        util_log("pool %s: release of a request the owner does not hold (state %#x)",
                 p->name, req->pool_state);
        abort();
    }
    req->pool_state = REQ_FREE;
    req->pool_next = NULL;
    w->free = req;
}

unsigned pool_poll_done(worker_pool *p)
{
    pool_req *head = NULL, **tail = &head;
    unsigned n = 0;

    /* Collect under the lock, call done() outside it: done() may commit. */
    pthread_mutex_lock(&p->done_lock);
    for (unsigned i = 0; i < p->nworkers && p->nfinished; i++) {
        pool_req *req = p->w[i].finished;

        if (req) {
            p->w[i].finished = NULL;
            p->nfinished--;
            req->pool_next = NULL;
            *tail = req;
            tail = &req->pool_next;
        }
    }
    pthread_mutex_unlock(&p->done_lock);

    while (head) {
        pool_req *req = head;
        pool_disposition d = POOL_RECYCLE;

        head = req->pool_next;
        p->outstanding--;
        n++;
        req->pool_state = REQ_KEPT;
        if (p->ops.done)
            d = p->ops.done(p->opaque, req);
        if (d == POOL_RECYCLE)
            pool_req_release(p, req);
    }
    return n;
}

/*
 * Owner: wait until at least `need` workers are done and not yet polled.
 * 0, -ETIMEDOUT at `deadline` (ns, INT64_MAX = none), or -ECANCELED.
 */
static int owner_wait(worker_pool *p, unsigned need, int64_t deadline)
{
    int rc = 0;

    pthread_mutex_lock(&p->done_lock);
    for (;;) {
        int64_t now;

        if (p->nfinished >= need)
            break;
        /* interrupt() sets it under done_lock, so it cannot slip in
         * between this check and the wait. */
        if (atomic_load_explicit(&p->interrupted, RELAXED)) {
            rc = -ECANCELED;
            break;
        }
        now = time_now_ns();
        if (now >= deadline) {
            rc = -ETIMEDOUT;
            break;
        }
        p->owner_waiting = true;
        atomic_fetch_add_explicit(&p->owner_sleeps, 1, RELAXED);
        if (deadline == INT64_MAX) {
            pthread_cond_wait(&p->done_cond, &p->done_lock);
        } else {
            struct timespec ts = { .tv_sec = deadline / 1000000000,
                                   .tv_nsec = deadline % 1000000000 };

            pthread_cond_timedwait(&p->done_cond, &p->done_lock, &ts);
        }
        p->owner_waiting = false;
    }
    pthread_mutex_unlock(&p->done_lock);
    return rc;
}

int pool_wait_for(worker_pool *p, unsigned want, int64_t deadline, int64_t timeout_ms,
                  lm_error *err)
{
    unsigned polled;
    int rc;

    if (atomic_load(&p->interrupted))
        return error_set(err, -ECANCELED, "pool %s: interrupted", p->name);
    if (want == 0)
        want = 1;
    if (want > p->outstanding)
        want = p->outstanding;
    /* Invariant: want - polled <= outstanding (as in pool.c). */
    polled = pool_poll_done(p);
    while (polled < want) {
        rc = owner_wait(p, want - polled, deadline);
        if (rc == -ECANCELED)
            return error_set(err, rc, "pool %s: interrupted", p->name);
        if (rc == -ETIMEDOUT)
            return error_set(err, rc, "pool %s: %u request(s) still running after %lld ms",
                             p->name, p->outstanding, (long long)timeout_ms);
        polled += pool_poll_done(p);
    }
    return (int)polled;
}

void pool_interrupt(worker_pool *p)
{
    pthread_mutex_lock(&p->done_lock);
    atomic_store(&p->interrupted, 1);
    pthread_cond_broadcast(&p->done_cond);
    pthread_mutex_unlock(&p->done_lock);
}

bool pool_interrupted(worker_pool *p)
{
    return atomic_load(&p->interrupted);
}

int64_t pool_spin_ns(const worker_pool *p)
{
    return 0;  /* workers never spin in this model */
}

unsigned pool_outstanding(const worker_pool *p)
{
    return p->outstanding;
}

unsigned pool_nworkers(const worker_pool *p)
{
    return p->nworkers;
}

void pool_get_stats(worker_pool *p, pool_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->submitted = atomic_load_explicit(&p->submitted, RELAXED);
    st->worker_wakes = atomic_load_explicit(&p->worker_wakes, RELAXED);
    st->owner_sleeps = atomic_load_explicit(&p->owner_sleeps, RELAXED);
    st->owner_wakes = atomic_load_explicit(&p->owner_wakes, RELAXED);
    for (unsigned i = 0; i < p->nworkers; i++) {
        st->completed += atomic_load_explicit(&p->w[i].handled, RELAXED);
        st->worker_sleeps += atomic_load_explicit(&p->w[i].sleeps, RELAXED);
    }
}

uint64_t pool_worker_handled(worker_pool *p, unsigned worker)
{
    return worker < p->nworkers ? atomic_load_explicit(&p->w[worker].handled, RELAXED) : 0;
}
