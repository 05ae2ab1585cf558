/*
 * Worker pool on lockless rings; the contract, the thread table and the
 * list of ordering pairs (R1, R2, D1, D2, W1, W2, W3) are in pool.h.
 *
 * Design notes:
 *
 * - Per-worker SPSC rings instead of one shared queue: the owner decides
 *   which worker gets a request, so it can skip a worker that is behind
 *   (all its requests out) and keep the others fed, and no two workers ever
 *   write the same cache line to take work.
 *
 * - The done ring is a bounded MPSC array in which each cell carries a
 *   sequence number: a producer claims index i with a CAS on head when the
 *   cell says "free for i" (seq == i), writes the item, then publishes with
 *   seq = i + 1; the consumer reads cell i when seq == i + 1 and frees it
 *   for the producer of i + size with seq = i + size.  Sequence numbers are
 *   compared as (int32_t)(seq - i), which is what makes the 2^32 wrap
 *   harmless (sizes are far below 2^31).  It needs size >= 2: with one cell,
 *   "holds item i" (i + 1) and "free for i + 1" would be the same number.
 *   It cannot overflow in the pool: it has room for every request there is.
 *
 * - A worker owns exactly ring_size requests, so its ring can never be
 *   full when the owner holds one of its free requests: "has room" is "has
 *   a free request", decided on the owner's private free list with no
 *   shared memory access at all.
 *
 * - Sleeping: an idle worker spins for `spin_ns` (the owner does not spin,
 *   see owner_wait), then announces itself with a seq_cst store to its
 *   futex word, re-checks for work with a seq_cst load and only then calls
 *   FUTEX_WAIT(word == 1).  The other side publishes work with a seq_cst
 *   store (or RMW) and then reads the word; only if it is 1 does it
 *   exchange it to 0 and call FUTEX_WAKE.  The exchange makes one waker pay for one sleep, and a
 *   sleeper that has not entered the kernel yet finds the word 0 and
 *   returns at once.  Seq_cst operations instead of fences because
 *   ThreadSanitizer does not model atomic_thread_fence.
 *
 * - The owner waits for "at least `want` finished", not for one: filling a
 *   worker's queue again after each single completion would cost the owner
 *   a wake-up per page.  A worker wakes the owner only when its own
 *   completion is the one that reaches the owner's target (counter
 *   `published`, compared with `consumed` and `owner_want`, which the owner
 *   writes before it announces itself; the worker reads them after seeing
 *   the announcement, an acquire).
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "util/error.h"
#include "util/pool.h"
#include "util/pool_common.h"
#include "util/sem.h"
#include "util/time.h"

#define RELAXED memory_order_relaxed
#define ACQUIRE memory_order_acquire
#define RELEASE memory_order_release

/* ------------------------------------------------------------------ rings */

static bool is_pow2(uint32_t v)
{
    return v && !(v & (v - 1));
}

int spsc_init(spsc *r, uint32_t size, uint32_t start)
{
    if (!is_pow2(size) || size > (1u << 30))
        return -EINVAL;
    r->slot = calloc(size, sizeof(*r->slot));
    if (!r->slot)
        return -ENOMEM;
    r->mask = size - 1;
    atomic_init(&r->head, start);
    atomic_init(&r->tail, start);
    return 0;
}

void spsc_destroy(spsc *r)
{
    free(r->slot);
    r->slot = NULL;
}

bool spsc_push(spsc *r, void *item)
{
    uint32_t h = atomic_load_explicit(&r->head, RELAXED);  /* ours */
    uint32_t t = atomic_load_explicit(&r->tail, ACQUIRE);  /* R2: slot h-size was read */

    if (h - t > r->mask)
        return false;
    r->slot[h & r->mask] = item;
    /* R1: the slot and the request are written before the index says so.
     * Also W1: seq_cst, so the sleeping flag read after it is ordered. */
    atomic_store(&r->head, h + 1);
    return true;
}

void *spsc_peek(spsc *r)
{
    uint32_t t = atomic_load_explicit(&r->tail, RELAXED);  /* ours */
    uint32_t h = atomic_load(&r->head);                    /* R1 / W1 */

    return h == t ? NULL : r->slot[t & r->mask];
}

void spsc_pop(spsc *r)
{
    uint32_t t = atomic_load_explicit(&r->tail, RELAXED);

    /* R2: our read of the slot is done before the producer may reuse it. */
    atomic_store_explicit(&r->tail, t + 1, RELEASE);
}

uint32_t spsc_count(spsc *r)
{
    uint32_t t = atomic_load_explicit(&r->tail, ACQUIRE);
    uint32_t h = atomic_load_explicit(&r->head, ACQUIRE);

    return h - t;
}

int mpsc_init(mpsc *r, uint32_t size, uint32_t start)
{
    if (!is_pow2(size) || size < 2 || size > (1u << 30))
        return -EINVAL;
    r->cell = calloc(size, sizeof(*r->cell));
    if (!r->cell)
        return -ENOMEM;
    r->mask = size - 1;
    /* Cell (i & mask) is free for the producer of index i, for the first
     * `size` indices from `start` -- which may straddle 2^32. */
    for (uint32_t k = 0; k < size; k++)
        atomic_init(&r->cell[(start + k) & r->mask].seq, start + k);
    atomic_init(&r->head, start);
    r->tail = start;
    return 0;
}

void mpsc_destroy(mpsc *r)
{
    free(r->cell);
    r->cell = NULL;
}

bool mpsc_push(mpsc *r, void *item)
{
    uint32_t pos = atomic_load_explicit(&r->head, RELAXED);

    for (;;) {
        mpsc_cell *c = &r->cell[pos & r->mask];
        uint32_t seq = atomic_load_explicit(&c->seq, ACQUIRE);  /* D2 */
        int32_t dif = (int32_t)(seq - pos);

        if (dif == 0) {
            /* The cell is free for index `pos`; whoever moves head past
             * pos owns it.  On failure pos is reloaded by the CAS. */
            if (atomic_compare_exchange_weak_explicit(&r->head, &pos, pos + 1,
                                                      RELAXED, RELAXED)) {
                c->item = item;
                atomic_store_explicit(&c->seq, pos + 1, RELEASE);  /* D1 */
                return true;
            }
        } else if (dif < 0) {
            /* Still holds the item of index pos - size: full. */
            return false;
        } else {
            /* Another producer took pos already; catch up. */
            pos = atomic_load_explicit(&r->head, RELAXED);
        }
    }
}

void *mpsc_pop(mpsc *r)
{
    uint32_t pos = r->tail;
    mpsc_cell *c = &r->cell[pos & r->mask];
    void *item;

    if (atomic_load_explicit(&c->seq, ACQUIRE) != pos + 1)  /* D1 */
        return NULL;
    item = c->item;
    r->tail = pos + 1;
    /* D2: free for the producer of pos + size, after our read of item. */
    atomic_store_explicit(&c->seq, pos + r->mask + 1, RELEASE);
    return item;
}

/* ------------------------------------------------------------------ pool */

/* Owner's view of a request (pool_state), checked on every hand-over. */
enum { REQ_FREE = 0x46524545, REQ_HELD, REQ_QUEUED, REQ_KEPT };

typedef struct pool_worker {
    spsc ring;                              /* producer: owner; consumer: worker */
    _Alignas(64) _Atomic uint32_t sleeping; /* futex word, W1 */
    _Atomic uint64_t handled;
    _Atomic uint64_t sleeps;
    /* Owner only. */
    _Alignas(64) pool_req *free;
    /* Fixed after create. */
    worker_pool *pool;
    unsigned index;
    pool_thread pt;
} pool_worker;

struct worker_pool {
    mpsc done;                               /* producers: workers; consumer: owner */
    _Alignas(64) _Atomic uint32_t published; /* pushes to `done`, mod 2^32; W2 */
    _Alignas(64) _Atomic uint32_t owner_sleeping; /* futex word, W2 */
    _Atomic uint32_t owner_want;             /* owner's target, set before sleeping */
    _Atomic uint32_t consumed;               /* pops from `done`, written by owner */
    _Atomic uint32_t exiting;                /* W3 */
    _Atomic uint32_t interrupted;            /* W3 */
    _Atomic uint64_t owner_sleeps, owner_wakes, worker_wakes, submitted;
    /* Owner only. */
    _Alignas(64) unsigned next;              /* round-robin start */
    unsigned outstanding;                    /* committed, not yet polled */
    /* Fixed after create. */
    unsigned nworkers, ring_size;
    size_t stride;                           /* req_size rounded up to 64 */
    int64_t spin_ns;
    pool_ops ops;
    void *opaque;
    char name[16];
    unsigned char *reqmem;                   /* nworkers * ring_size * stride */
    pool_worker *w;
};

static void futex_wait(_Atomic uint32_t *word, uint32_t val, int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;

    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    /* EAGAIN (word already changed), EINTR and ETIMEDOUT all mean "look
     * again"; the callers re-check their condition. */
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, val, tsp, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word)
{
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Wake a thread that announced it sleeps on `word`; true if it had. */
static bool wake_if_sleeping(_Atomic uint32_t *word)
{
    /* The plain load first keeps the common case (nobody asleep) free of a
     * locked instruction on the other thread's cache line. */
    if (atomic_load(word) && atomic_exchange(word, 0)) {
        futex_wake(word);
        return true;
    }
    return false;
}

static pool_req *req_at(worker_pool *p, unsigned worker, unsigned k)
{
    return (pool_req *)(p->reqmem + ((size_t)worker * p->ring_size + k) * p->stride);
}

/* Worker: wait for a request on our ring; NULL when told to exit. */
static pool_req *worker_idle(pool_worker *w)
{
    worker_pool *p = w->pool;
    pool_req *req;
    int64_t start = time_now_ns();

    for (unsigned spins = 1;; spins++) {
        if ((req = spsc_peek(&w->ring)))
            return req;
        if (atomic_load_explicit(&p->exiting, RELAXED))
            return NULL;
        /* The clock costs ~25 ns here; a pause ~40 ns: look every 16. */
        if (!(spins & 15) && time_now_ns() - start >= p->spin_ns)
            break;
        cpu_relax();
    }
    for (;;) {
        atomic_store(&w->sleeping, 1);                 /* W1, W3 */
        req = spsc_peek(&w->ring);                     /* W1: seq_cst load of head */
        if (req || atomic_load(&p->exiting)) {         /* W3 */
            atomic_store_explicit(&w->sleeping, 0, RELAXED);
            return req;
        }
        atomic_fetch_add_explicit(&w->sleeps, 1, RELAXED);
        /* Unbounded, but interruptible: destroy() sets exiting and wakes us. */
        futex_wait(&w->sleeping, 1, -1);
        atomic_store_explicit(&w->sleeping, 0, RELAXED);
        if ((req = spsc_peek(&w->ring)))
            return req;
        if (atomic_load_explicit(&p->exiting, RELAXED))
            return NULL;
    }
}

/*
 * Are at least `want` finished requests published beyond the `consumed`
 * ones?  Signed: the owner may pop an item before its producer has counted
 * it, so consumed can run one ahead per worker; that item was not "more".
 */
static bool enough(uint32_t published, uint32_t consumed, uint32_t want)
{
    return (int32_t)(published - consumed) >= (int32_t)want;
}

/* Worker: hand a finished request back and wake the owner if it waits for it. */
static void worker_finish(worker_pool *p, pool_req *req)
{
    uint32_t pub;

    /* Cannot fail: the ring has room for every request of the pool.  Spin
     * rather than lose a request if that invariant were ever broken. */
    while (!mpsc_push(&p->done, req))
        sched_yield();
    pub = atomic_fetch_add(&p->published, 1) + 1;     /* W2 */
    if (atomic_load(&p->owner_sleeping)) {            /* W2 */
        /* Acquire via the seq_cst load above: want and consumed are the
         * values the owner wrote before it announced its sleep. */
        uint32_t want = atomic_load_explicit(&p->owner_want, RELAXED);
        uint32_t cons = atomic_load_explicit(&p->consumed, RELAXED);

        if (enough(pub, cons, want) && wake_if_sleeping(&p->owner_sleeping))
            atomic_fetch_add_explicit(&p->owner_wakes, 1, RELAXED);
    }
}

static void *pool_worker_main(void *arg)
{
    pool_worker *w = arg;
    worker_pool *p = w->pool;

    for (;;) {
        pool_req *req = spsc_peek(&w->ring);

        if (!req && !(req = worker_idle(w)))
            break;
        /* Free the slot first: we hold the request, and the owner may queue
         * the next one while we work. */
        spsc_pop(&w->ring);
        p->ops.handler(p->opaque, w->pt.wctx, req);
        atomic_fetch_add_explicit(&w->handled, 1, RELAXED);
        worker_finish(p, req);
        if (atomic_load_explicit(&p->exiting, RELAXED))
            break;
    }
    return NULL;
}

static void pool_teardown(worker_pool *p)
{
    unsigned i;

    atomic_store(&p->exiting, 1);                      /* W3 */
    for (i = 0; i < p->nworkers; i++)
        if (p->w[i].pt.started)
            wake_if_sleeping(&p->w[i].sleeping);
    pool_threads_stop(&p->w[0].pt, sizeof(p->w[0]), p->nworkers, &p->ops, p->opaque);
    for (i = 0; i < p->nworkers; i++)
        spsc_destroy(&p->w[i].ring);
    mpsc_destroy(&p->done);
    free(p->w);
    free(p->reqmem);
    free(p);
}

/* CPUs this process may run on (its affinity mask), at least 1. */
static unsigned online_cpus(void)
{
    cpu_set_t set;
    long n;

    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        return (unsigned)CPU_COUNT(&set);
    n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

static uint32_t roundup_pow2(uint64_t v)
{
    uint32_t r = 1;

    while (r < v)
        r <<= 1;
    return r;
}

worker_pool *pool_create_tuned(unsigned nworkers, unsigned ring_size, size_t req_size,
                               const char *name, const pool_ops *ops, void *opaque,
                               const pool_tuning *tuning, lm_error *err)
{
    pool_tuning t = tuning ? *tuning : POOL_TUNING_DEFAULT;
    worker_pool *p;
    unsigned i, k;

    if (!name)
        name = "pool";
    if (ring_size == 0)
        ring_size = POOL_RING_DEFAULT;
    if (pool_check_args(nworkers, ring_size, req_size, name, ops, err))
        return NULL;
    if (t.spin_ns < 0)
        t.spin_ns = nworkers + 1 <= online_cpus() ? POOL_SPIN_NS : 0;

    p = calloc(1, sizeof(*p));
    if (!p)
        goto oom;
    p->nworkers = nworkers;
    p->ring_size = ring_size;
    p->stride = (req_size + 63) & ~(size_t)63;
    p->spin_ns = t.spin_ns;
    p->ops = *ops;
    p->opaque = opaque;
    snprintf(p->name, sizeof(p->name), "%.10s", name);
    p->w = calloc(nworkers, sizeof(*p->w));
    p->reqmem = aligned_alloc(64, (size_t)nworkers * ring_size * p->stride);
    if (!p->w || !p->reqmem || mpsc_init(&p->done, roundup_pow2(
            (uint64_t)nworkers * ring_size < 2 ? 2 : (uint64_t)nworkers * ring_size),
            t.start_index) < 0) {
        free(p->w);
        free(p->reqmem);
        free(p);
        goto oom;
    }
    memset(p->reqmem, 0, (size_t)nworkers * ring_size * p->stride);

    for (i = 0; i < nworkers; i++) {
        pool_worker *w = &p->w[i];

        w->pool = p;
        w->index = i;
        if (spsc_init(&w->ring, ring_size, t.start_index) < 0) {
            error_set(err, -ENOMEM, "pool %s: out of memory", name);
            goto fail;
        }
        /* Push in reverse so prepare hands out requests in address order. */
        for (k = ring_size; k-- > 0;) {
            pool_req *req = req_at(p, i, k);

            req->pool_worker = i;
            req->pool_state = REQ_FREE;
            req->pool_next = w->free;
            w->free = req;
        }
    }
    if (pool_threads_start(p->w, &p->w[0].pt, sizeof(p->w[0]), nworkers, ops, opaque, p->name,
                           pool_worker_main, err))
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
    unsigned idx = p->next;

    for (unsigned i = 0; i < p->nworkers; i++) {
        pool_worker *w = &p->w[idx];
        pool_req *req = w->free;

        if (++idx == p->nworkers)
            idx = 0;
        if (req) {
            w->free = req->pool_next;
            req->pool_state = REQ_HELD;
            p->next = idx;
            return req;
        }
    }
    return NULL;
}

void pool_submit_commit(worker_pool *p, pool_req *req)
{
    pool_worker *w = &p->w[req->pool_worker];
    bool ok;

    if (req->pool_state != REQ_HELD) {
        util_log("pool %s: commit of a request not obtained from prepare (state %#x)",
                 p->name, req->pool_state);
        abort();
    }
    req->pool_state = REQ_QUEUED;
    p->outstanding++;
    atomic_fetch_add_explicit(&p->submitted, 1, RELAXED);
    /* Cannot fail: the worker owns ring_size requests and we hold one. */
    ok = spsc_push(&w->ring, req);                     /* R1, W1 */
    if (!ok) {
        util_log("pool %s: worker %u ring full with a free request", p->name, req->pool_worker);
        abort();
    }
    if (wake_if_sleeping(&w->sleeping))                /* W1 */
        atomic_fetch_add_explicit(&p->worker_wakes, 1, RELAXED);
}

void pool_req_release(worker_pool *p, pool_req *req)
{
    pool_worker *w = &p->w[req->pool_worker];

    if (req->pool_state != REQ_HELD && req->pool_state != REQ_KEPT) {
        util_log("pool %s: release of a request the owner does not hold (state %#x)",
                 p->name, req->pool_state);
        abort();
    }
    req->pool_state = REQ_FREE;
    req->pool_next = w->free;
    w->free = req;
}

unsigned pool_poll_done(worker_pool *p)
{
    pool_req *req;
    unsigned n = 0;

    while ((req = mpsc_pop(&p->done))) {               /* D1 */
        pool_disposition d = POOL_RECYCLE;

        atomic_store_explicit(&p->consumed, atomic_load_explicit(&p->consumed, RELAXED) + 1,
                              RELAXED);
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
 * Owner: wait until at least `need` finished requests are published and not
 * yet consumed.  0, -ETIMEDOUT at `deadline` (ns, INT64_MAX = none), or
 * -ECANCELED.
 */
static int owner_wait(worker_pool *p, uint32_t need, int64_t deadline)
{
    uint32_t cons = atomic_load_explicit(&p->consumed, RELAXED);  /* ours */

    /* No spinning here: the owner waits for a batch (see wait_for), which
     * lasts several handler runs, and measured spinning through part of it
     * only took CPU from the workers (bench/pool.md). */
    for (;;) {
        int64_t now = time_now_ns();
        int rc = 0;

        atomic_store_explicit(&p->owner_want, need, RELAXED);
        atomic_store(&p->owner_sleeping, 1);               /* W2, W3 (release) */
        if (enough(atomic_load(&p->published), cons, need)) /* W2 */
            goto out;
        if (atomic_load(&p->interrupted)) {                /* W3 */
            rc = -ECANCELED;
            goto out;
        }
        if (now >= deadline) {
            rc = -ETIMEDOUT;
            goto out;
        }
        atomic_fetch_add_explicit(&p->owner_sleeps, 1, RELAXED);
        futex_wait(&p->owner_sleeping, 1, deadline == INT64_MAX ? -1 : deadline - now);
        atomic_store_explicit(&p->owner_sleeping, 0, RELAXED);
        continue;
out:
        atomic_store_explicit(&p->owner_sleeping, 0, RELAXED);
        return rc;
    }
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
    /* Invariant: want - polled <= outstanding, since every poll lowers both
     * sides by one and done() committing more only raises outstanding. */
    polled = pool_poll_done(p);
    while (polled < want) {
        unsigned n;

        rc = owner_wait(p, want - polled, deadline);
        if (rc == -ECANCELED)
            return error_set(err, rc, "pool %s: interrupted", p->name);
        if (rc == -ETIMEDOUT)
            return error_set(err, rc, "pool %s: %u request(s) still running after %lld ms",
                             p->name, p->outstanding, (long long)timeout_ms);
        n = pool_poll_done(p);
        /* Published but not poppable: a worker claimed an earlier cell and
         * was preempted before filling it.  Let it run. */
        if (n == 0)
            sched_yield();
        polled += n;
    }
    return (int)polled;
}

void pool_interrupt(worker_pool *p)
{
    atomic_store(&p->interrupted, 1);                  /* W3 */
    wake_if_sleeping(&p->owner_sleeping);
}

bool pool_interrupted(worker_pool *p)
{
    return atomic_load(&p->interrupted);
}

int64_t pool_spin_ns(const worker_pool *p)
{
    return p->spin_ns;
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
