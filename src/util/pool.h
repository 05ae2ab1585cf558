/*
 * worker_pool: a fixed set of worker threads fed through lockless rings.
 *
 * Why: handing each 4 KiB page to a worker under a mutex, one pending page
 * per worker, costs a cross-CPU wake-up (~30 us here) per page in each
 * direction, which is as long as compressing the page.  This pool keeps a
 * short queue per worker so a worker finds its next request without
 * sleeping, lets workers spin briefly before they sleep, and only makes a
 * wake-up system call when the thread to be woken is really asleep.
 *
 * Shape:
 *
 *            owner thread (single producer)
 *     prepare/commit |                     ^ poll_done / wait_*: done()
 *                    v                     |
 *   worker 0: SPSC request ring  --+       |
 *   worker 1: SPSC request ring  --+--> one MPSC done ring
 *   ...                              (every worker pushes there)
 *
 * Requests are preallocated: each worker owns `ring_size` requests of
 * `req_size` bytes (64-byte aligned, zeroed once at creation).  The caller's
 * request struct embeds pool_req as its FIRST member and is cast back
 * from the pool_req pointer.  Nothing is allocated per request.
 *
 * A request's life (the owner may only touch it while it holds it):
 *   free --prepare--> held by owner --commit--> queued --worker--> handler
 *     ^                                                               |
 *     +--release <-- kept by owner <--KEEP-- done() <-- done ring <---+
 *     +--------------------------RECYCLE-------------------------'
 *
 * Dispatch: pool_submit_prepare() starts at the worker after the last
 * one used (round robin) and takes the first worker that still has a free
 * request; a worker whose requests are all out (queued, running, or finished
 * but not yet polled) is skipped, so one slow worker never stalls the
 * others.  A worker owns exactly as many requests as its ring has slots, so
 * a worker with a free request always has room in its ring.
 *
 * Threads and ownership:
 *   thread   | waits on                   | woken by                | owns
 *   ---------+----------------------------+-------------------------+--------------------
 *   owner    | p->owner_sleeping futex,   | the worker whose push   | free and kept
 *   (one,    | in pool_wait_*() only,  | reaches what the owner  | requests; the done
 *   fixed)   | until its timeout at most  | waits for; interrupt()  | ring's consumer side
 *   worker i | w->sleeping futex when its | commit() on its ring;   | the request it is
 *            | ring stayed empty for the  | destroy()               | running; its ring's
 *            | spin budget                |                         | consumer side
 * Exit: pool_destroy() sets `exiting` and wakes every worker; a worker
 * finishes the request it is running, drops what is still queued and
 * returns; all are joined.
 *
 * The owner is ONE thread for the pool's whole life (it does not have to be
 * the creating thread, but it must not change while requests are out):
 * submit_prepare, submit_commit, poll_done, wait_*, req_release and destroy
 * are owner-only.  pool_interrupt() and pool_get_stats() may be called
 * from any thread.  ops->init and ops->uninit run on the thread that calls
 * create / destroy; ops->handler on a worker; ops->done on the owner.
 *
 * Sleeping and waking -- POOL_SPIN_NS: a worker whose ring is empty
 * spins (pause instruction) for this long before it sleeps on a futex; the
 * owner only makes the FUTEX_WAKE call when the worker really sleeps.  It
 * is the one setting that trades CPU for wake-ups; bench/pool.md has the
 * measurements.  It applies only when every pool thread can have a CPU of
 * its own (nworkers + 1 <= CPUs this process may run on); otherwise workers
 * do not spin, since a spinning thread would hold the CPU that the thread
 * it waits for needs.  The owner does not spin: it waits for a batch of
 * results (pool_wait_any's `want`), which lasts several handler runs,
 * and a worker wakes it once per batch, not per request.
 *
 * Memory ordering, pair by pair (the code repeats each at its site):
 *   R1 request ring head: producer's seq_cst store of head (after writing
 *      the slot and the request) / consumer's seq_cst load of head.  Hands
 *      the request over.
 *   R2 request ring tail: consumer's release store of tail (after reading
 *      the slot) / producer's acquire load of tail.  Lets the slot be reused.
 *   D1 done ring cell sequence: producer's release store after writing the
 *      cell / consumer's acquire load.  Hands the finished request back.
 *   D2 done ring cell sequence: consumer's release store after reading the
 *      cell / producer's acquire load.  Lets the cell be reused.
 *   W1 worker sleep (Dekker): worker {store sleeping=1; load head} and
 *      producer {store head (R1); exchange/load sleeping}, all seq_cst: at
 *      least one side sees the other, so either the worker sees the new
 *      request or the producer sees the sleeper and wakes it.
 *   W2 owner sleep (Dekker): owner {store owner_sleeping=1; load published}
 *      and worker {fetch_add published; load owner_sleeping}, all seq_cst.
 *   W3 exit / interrupt: `exiting` / `interrupted` stored seq_cst before
 *      the wake; the sleeper sets its flag seq_cst and reloads them.
 *
 * Two implementations of this header: pool.c (this design), the one
 * liblivemig has, and bench/pool_mutex.c, the old one-page-per-thread model
 * under a mutex -- the baseline bench/compress and bench/pool compare
 * against, built only by bench/meson.build, not for production.
 *
 * Errors: create reports what failed (thread creation, ops->init).  Waits
 * return -ETIMEDOUT past their timeout and -ECANCELED once the pool was
 * interrupted, with a message.  Handlers cannot fail as far as the pool is
 * concerned: a request that failed carries its error in the caller's struct.
 */
#ifndef UTIL_POOL_H
#define UTIL_POOL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "livemig/livemig.h"

/* ------------------------------------------------------------------ rings */

/*
 * The two rings, usable on their own (the tests drive them directly).
 * Indices are free-running uint32_t; a slot is index & (size - 1), and
 * occupancy is head - tail computed in uint32_t, so crossing 2^32 is just
 * the ordinary case.  `start` is the first index (tests start near the wrap
 * point).  Items are non-NULL pointers.
 */

/* Single producer, single consumer. */
typedef struct spsc {
    _Alignas(64) _Atomic uint32_t head;  /* next index to write; producer */
    _Alignas(64) _Atomic uint32_t tail;  /* next index to read; consumer */
    _Alignas(64) uint32_t mask;          /* size - 1 */
    void **slot;
} spsc;

/* size: a power of two >= 1.  0, or -EINVAL / -ENOMEM. */
int spsc_init(spsc *r, uint32_t size, uint32_t start);
void spsc_destroy(spsc *r);
/* Producer: false when full. */
bool spsc_push(spsc *r, void *item);
/* Consumer: the oldest item, left in place, or NULL when empty. */
void *spsc_peek(spsc *r);
/* Consumer: drop the item peek returned; its slot may be reused at once. */
void spsc_pop(spsc *r);
/* Any thread; exact only on the producer or consumer thread. */
uint32_t spsc_count(spsc *r);

/*
 * Multiple producers, single consumer: a bounded array of cells, each with a
 * sequence number telling whose turn it is (producers claim an index with a
 * CAS on head; the cell's sequence says when it was written and when read).
 */
typedef struct mpsc_cell {
    _Atomic uint32_t seq;  /* == index: free for the producer of `index`;
                            * == index + 1: holds that producer's item */
    void *item;
} mpsc_cell;

typedef struct mpsc {
    _Alignas(64) _Atomic uint32_t head;  /* next index to claim; producers */
    _Alignas(64) uint32_t tail;          /* next index to read; consumer only */
    uint32_t mask;
    mpsc_cell *cell;
} mpsc;

int mpsc_init(mpsc *r, uint32_t size, uint32_t start);
void mpsc_destroy(mpsc *r);
/* Any thread: false when full. */
bool mpsc_push(mpsc *r, void *item);
/*
 * Consumer: the oldest item, or NULL when empty -- or when the producer that
 * claimed the oldest index has not finished writing it yet (items behind it
 * wait; they are returned by a later pop).
 */
void *mpsc_pop(mpsc *r);

/* ------------------------------------------------------------------ pool */

/* Default request ring size per worker (a power of two). */
#define POOL_RING_DEFAULT 4

/*
 * Spin budget, in ns, before an idle worker sleeps on its futex (when the
 * pool's threads fit the CPUs, see above).  About one cross-CPU
 * wake-up here (30 us): spinning longer than a sleep + wake-up would cost
 * cannot win, and an idle pool stops burning a CPU almost at once.
 * Measured in bench/pool.md.
 */
#define POOL_SPIN_NS 20000

#define POOL_MAX_WORKERS 256

typedef struct worker_pool worker_pool;

/*
 * The pool's header of a request; the caller's request struct starts with
 * it.  All fields are the pool's: do not touch them.
 */
typedef struct pool_req {
    struct pool_req *pool_next;     /* owner-side free list link */
    uint32_t pool_worker;           /* the worker this request belongs to */
    uint32_t pool_state;            /* owner's view, for sanity checks */
} pool_req;

/* What done() wants done with the request afterwards. */
typedef enum pool_disposition {
    POOL_RECYCLE = 0,     /* back to the free list now */
    POOL_KEEP = 1,        /* the owner keeps it; pool_req_release() later */
} pool_disposition;

typedef struct pool_ops {
    /*
     * Optional.  Called on the creating thread once per worker before any
     * worker runs; *wctx becomes the worker's private context, passed to
     * its handler (e.g. a zlib stream).  Returns 0 or a negative errno and
     * fills err.
     */
    int (*init)(void *opaque, unsigned worker, void **wctx, lm_error *err);
    /* Optional.  On the destroying thread, after the worker was joined. */
    void (*uninit)(void *opaque, unsigned worker, void *wctx);
    /* Required.  On worker `worker`: do the work described by req. */
    void (*handler)(void *opaque, void *wctx, pool_req *req);
    /* Optional (NULL = recycle).  On the owner, from poll_done / wait_*. */
    pool_disposition (*done)(void *opaque, pool_req *req);
} pool_ops;

/* For tests and benchmarks; POOL_TUNING_DEFAULT is what create uses. */
typedef struct pool_tuning {
    int64_t spin_ns;       /* spin budget; < 0: POOL_SPIN_NS or 0, see above */
    uint32_t start_index;  /* first index of every ring (0) */
} pool_tuning;

#define POOL_TUNING_DEFAULT ((pool_tuning){ .spin_ns = -1, .start_index = 0 })

/*
 * Start `nworkers` (1..POOL_MAX_WORKERS) threads named "<name>/<i>"
 * (name: at most 10 bytes are used).  ring_size: a power of two, 0 =
 * POOL_RING_DEFAULT.  req_size >= sizeof(pool_req).  NULL on error.
 */
worker_pool *pool_create(unsigned nworkers, unsigned ring_size, size_t req_size,
                         const char *name, const pool_ops *ops, void *opaque,
                         lm_error *err);
worker_pool *pool_create_tuned(unsigned nworkers, unsigned ring_size, size_t req_size,
                               const char *name, const pool_ops *ops, void *opaque,
                               const pool_tuning *tuning, lm_error *err);

/*
 * Stop and join the workers and free everything, including requests that
 * are queued (never handled), finished but not polled (done() is not called
 * for them) or kept.  Call pool_wait_done() first to have every result.
 * NULL is a no-op.
 */
void pool_destroy(worker_pool *p);

/*
 * A free request bound to a worker with room, or NULL when every worker has
 * all its requests out.  Contents are what the last user left (zero at
 * first).  Does not poll: call pool_poll_done() to get requests back.
 */
pool_req *pool_submit_prepare(worker_pool *p);
/* Queue a prepared request on its worker (waking it if it sleeps). */
void pool_submit_commit(worker_pool *p, pool_req *req);
/* Give back a request held after prepare (not committed) or kept by done(). */
void pool_req_release(worker_pool *p, pool_req *req);

/* Call done() for every finished request now in the done ring; how many. */
unsigned pool_poll_done(worker_pool *p);

/*
 * Wait until at least min(want, outstanding) requests have finished (want 0
 * means 1), then poll.  Ask for a batch -- e.g. half of what is out -- so
 * that this thread is woken once per batch and the workers still have
 * queued work while it refills.  Returns how many were polled (0 when nothing was
 * outstanding), -ETIMEDOUT after timeout_ms (< 0: no limit; only an
 * interrupt ends the wait then), -ECANCELED once pool_interrupt() was
 * called.
 */
int pool_wait_any(worker_pool *p, unsigned want, int64_t timeout_ms, lm_error *err);

/* Wait for and poll every outstanding request.  0, -ETIMEDOUT, -ECANCELED. */
int pool_wait_done(worker_pool *p, int64_t timeout_ms, lm_error *err);

/*
 * Any thread: make the owner's current and every later wait return
 * -ECANCELED (for a migration that is being cancelled).  Sticky.
 */
void pool_interrupt(worker_pool *p);
bool pool_interrupted(worker_pool *p);

/* The spin budget in use, ns. */
int64_t pool_spin_ns(const worker_pool *p);
/* Owner: requests committed and not yet polled. */
unsigned pool_outstanding(const worker_pool *p);
unsigned pool_nworkers(const worker_pool *p);

typedef struct pool_stats {
    uint64_t submitted;     /* commits */
    uint64_t completed;     /* handler runs finished */
    uint64_t worker_sleeps; /* futex waits by workers */
    uint64_t worker_wakes;  /* FUTEX_WAKE calls made to wake a worker */
    uint64_t owner_sleeps;  /* futex waits by the owner */
    uint64_t owner_wakes;   /* FUTEX_WAKE calls made to wake the owner */
} pool_stats;

/* Any thread; counters are read one by one (each exact, not a snapshot). */
void pool_get_stats(worker_pool *p, pool_stats *st);
/* Requests worker `worker` has finished, for any thread (tests, benchmarks). */
uint64_t pool_worker_handled(worker_pool *p, unsigned worker);

#endif
