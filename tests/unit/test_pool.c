/*
 * Unit tests of the worker_pool API (util/pool.h), run against both
 * implementations: the ring pool of liblivemig (src/util/pool.c; test
 * `pool`) and the benchmarks' mutex model (bench/pool_mutex.c; test
 * `pool_mutex`, built by bench/meson.build).  The rings themselves are
 * tested by test_pool_ring.c.
 *
 * Nothing here assumes how many requests a worker owns (ring_size in the
 * ring pool, always 1 in the mutex model): capacity() asks the pool, by
 * preparing requests until there are none and giving them back.
 *
 * Every request comes back once with its handler's result (also with the
 * ring indices starting near 2^32); a worker stuck in its handler does not
 * stop the others from getting work; destroy works with work queued,
 * running, finished-unpolled, kept and held; wait_done is bounded by its
 * timeout and ended by pool_interrupt() from another thread; the
 * producer makes no wake-up call while workers spin (ring pool only: the
 * mutex model reports a spin budget of 0) and one per sleeping worker
 * otherwise; create reports bad arguments and init failures.
 *
 * No test sleeps to synchronise: threads meet on atomics and condition
 * variables, and every wait has a deadline that fails the test.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "util/pool.h"
#include "util/time.h"

#define WRAP_START (UINT32_MAX - 5u)
#define DEADLINE_MS 20000

/* ------------------------------------------------------------------ pool */

typedef struct job {
    pool_req req;        /* first */
    uint64_t in, out;
    unsigned worker;     /* who ran it */
    uint64_t seq;        /* owner's submission number */
} job;

/* Per-worker context and test-wide state. */
typedef struct wctx {
    unsigned index;
} wctx;

typedef struct fixture {
    /* Gate that a handler on `gated_worker` waits at until opened. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool gate_open;
    int gated_worker;          /* -1: none */
    atomic_int in_gate;
    atomic_bool gate_timeout;
    /* Results, checked by done(). */
    uint64_t done_count, done_sum;
    bool *seen;
    size_t nseen;
    bool bad;
    pool_disposition disposition;
    job *kept[64];
    unsigned nkept;
    atomic_int inits, uninits;
    int fail_init_worker;      /* -1: none */
    uint64_t spin_work_ns;
} fixture;

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static int fx_init(void *opaque, unsigned worker, void **ctx, lm_error *err)
{
    fixture *f = opaque;
    wctx *w;

    if ((int)worker == f->fail_init_worker) {
        err->code = -EIO;
        snprintf(err->msg, sizeof(err->msg), "no luck");
        return -EIO;
    }
    w = calloc(1, sizeof(*w));
    w->index = worker;
    *ctx = w;
    atomic_fetch_add(&f->inits, 1);
    return 0;
}

static void fx_uninit(void *opaque, unsigned worker, void *ctx)
{
    fixture *f = opaque;

    assert_int_equal(((wctx *)ctx)->index, worker);
    free(ctx);
    atomic_fetch_add(&f->uninits, 1);
}

static void fx_handler(void *opaque, void *ctx, pool_req *req)
{
    fixture *f = opaque;
    job *j = (job *)req;
    wctx *w = ctx;

    j->worker = w->index;
    if ((int)w->index == f->gated_worker) {
        struct timespec ts = time_deadline_ms(DEADLINE_MS);

        atomic_fetch_add(&f->in_gate, 1);
        pthread_mutex_lock(&f->lock);
        while (!f->gate_open)
            if (pthread_cond_timedwait(&f->cond, &f->lock, &ts) == ETIMEDOUT) {
                atomic_store(&f->gate_timeout, true);
                break;
            }
        pthread_mutex_unlock(&f->lock);
    }
    if (f->spin_work_ns) {
        int64_t end = time_now_ns() + (int64_t)f->spin_work_ns;

        while (time_now_ns() < end)
            ;
    }
    j->out = mix(j->in);
}

static pool_disposition fx_done(void *opaque, pool_req *req)
{
    fixture *f = opaque;
    job *j = (job *)req;

    if (j->out != mix(j->in))
        f->bad = true;
    if (f->seen) {
        if (j->seq >= f->nseen || f->seen[j->seq])
            f->bad = true;
        else
            f->seen[j->seq] = true;
    }
    f->done_count++;
    f->done_sum += j->out;
    if (f->disposition == POOL_KEEP && f->nkept < 64)
        f->kept[f->nkept++] = j;
    return f->disposition;
}

static const pool_ops fx_ops = {
    .init = fx_init, .uninit = fx_uninit, .handler = fx_handler, .done = fx_done,
};

static void fx_setup(fixture *f)
{
    pthread_condattr_t ca;

    memset(f, 0, sizeof(*f));
    pthread_mutex_init(&f->lock, NULL);
    /* The gate's deadline comes from time_deadline_ms(): CLOCK_MONOTONIC. */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&f->cond, &ca);
    pthread_condattr_destroy(&ca);
    f->gated_worker = -1;
    f->fail_init_worker = -1;
}

static void fx_open_gate(fixture *f)
{
    pthread_mutex_lock(&f->lock);
    f->gate_open = true;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
}

static void fx_teardown(fixture *f)
{
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->cond);
    free(f->seen);
}

/* Submit n jobs, waiting when all workers are busy; returns the expected sum. */
static uint64_t submit_n(worker_pool *p, uint64_t n, uint64_t first_seq)
{
    uint64_t sum = 0;
    lm_error err = { 0 };

    for (uint64_t i = 0; i < n; i++) {
        job *j;

        while (!(j = (job *)pool_submit_prepare(p))) {
            int rc = pool_wait_any(p, 1, DEADLINE_MS, &err);

            if (rc < 0)
                fail_msg("wait_any: %s", err.msg);
        }
        j->seq = first_seq + i;
        j->in = mix(j->seq + 12345);
        j->out = 0;
        sum += mix(j->in);
        pool_submit_commit(p, &j->req);
    }
    return sum;
}

/*
 * Requests the owner can hold at once now: prepare until there is none,
 * then give them all back.  With nothing out, that is every request the
 * pool has (ring_size per worker in the ring pool, 1 in the mutex model).
 */
static unsigned capacity(worker_pool *p)
{
    pool_req *held = NULL;
    unsigned n = 0;

    for (pool_req *r; (r = pool_submit_prepare(p)); n++) {
        /* The pool's link is free while we hold the request. */
        r->pool_next = held;
        held = r;
    }
    while (held) {
        pool_req *r = held;

        held = r->pool_next;
        pool_req_release(p, r);
    }
    return n;
}

static void run_all(unsigned nworkers, unsigned ring, uint32_t start, int64_t spin_ns, uint64_t n)
{
    fixture f;
    lm_error err = { 0 };
    pool_tuning t = { .spin_ns = spin_ns, .start_index = start };
    pool_stats st;
    worker_pool *p;
    uint64_t sum;

    fx_setup(&f);
    f.seen = calloc(n, 1);
    f.nseen = n;
    p = pool_create_tuned(nworkers, ring, sizeof(job), "test", &fx_ops, &f, &t, &err);
    assert_non_null(p);
    assert_int_equal(atomic_load(&f.inits), nworkers);
    sum = submit_n(p, n, 0);
    assert_int_equal(pool_wait_done(p, DEADLINE_MS, &err), 0);
    assert_int_equal(pool_outstanding(p), 0);
    assert_false(f.bad);
    assert_int_equal(f.done_count, n);
    assert_int_equal(f.done_sum, sum);
    for (uint64_t i = 0; i < n; i++)
        assert_true(f.seen[i]);
    pool_get_stats(p, &st);
    assert_int_equal(st.submitted, n);
    assert_int_equal(st.completed, n);
    pool_destroy(p);
    assert_int_equal(atomic_load(&f.uninits), nworkers);
    fx_teardown(&f);
}

static void test_pool_all_done(void **state)
{
    run_all(1, 0, 0, POOL_SPIN_NS, 20000);
    run_all(2, 4, 0, POOL_SPIN_NS, 20000);
    run_all(3, 2, 0, POOL_SPIN_NS, 20000);
    /* No spinning at all: every idle moment is a sleep, so every commit
     * and completion races with a sleeper announcing itself. */
    run_all(2, 4, 0, 0, 20000);
    run_all(1, 1, 0, 0, 20000);
}

static void test_pool_wrap(void **state)
{
    /* The request rings and the done ring all start 5 before 2^32. */
    run_all(1, 4, WRAP_START, POOL_SPIN_NS, 5000);
    run_all(2, 4, WRAP_START, 0, 5000);
    run_all(4, 8, UINT32_MAX, POOL_SPIN_NS, 5000);
}

static void test_pool_slow_worker(void **state)
{
    fixture f;
    lm_error err = { 0 };
    worker_pool *p;
    const uint64_t n = 5000;
    unsigned ring;  /* requests per worker */
    uint64_t sum;

    fx_setup(&f);
    f.gated_worker = 0;  /* worker 0 blocks in its first handler */
    p = pool_create(2, 4, sizeof(job), "slow", &fx_ops, &f, &err);
    assert_non_null(p);
    ring = capacity(p) / 2;
    assert_true(ring >= 1);
    sum = submit_n(p, n, 0);
    /* Everything was submitted with worker 0 stuck: it got only the
     * requests it owns, worker 1 all the rest, which it can finish. */
    while (pool_outstanding(p) > ring)
        assert_true(pool_wait_any(p, 1, DEADLINE_MS, &err) > 0);
    assert_int_equal(pool_outstanding(p), ring);
    /* Worker 0 may not even have reached its first handler yet. */
    for (int64_t deadline = time_now_ms() + DEADLINE_MS; atomic_load(&f.in_gate) == 0;) {
        assert_true(time_now_ms() < deadline);
        sched_yield();
    }
    assert_int_equal(atomic_load(&f.in_gate), 1);
    assert_int_equal(pool_worker_handled(p, 0), 0);
    assert_int_equal(pool_worker_handled(p, 1), n - ring);
    print_message("# worker 1 ran %llu of %llu while worker 0 was stuck\n",
                  (unsigned long long)pool_worker_handled(p, 1), (unsigned long long)n);
    fx_open_gate(&f);
    assert_int_equal(pool_wait_done(p, DEADLINE_MS, &err), 0);
    assert_false(atomic_load(&f.gate_timeout));
    assert_int_equal(f.done_count, n);
    assert_int_equal(f.done_sum, sum);
    assert_int_equal(pool_worker_handled(p, 0) + pool_worker_handled(p, 1), n);
    assert_int_equal(pool_worker_handled(p, 0), ring);
    pool_destroy(p);
    fx_teardown(&f);
}

static void test_pool_destroy_outstanding(void **state)
{
    for (int variant = 0; variant < 3; variant++) {
        fixture f;
        lm_error err = { 0 };
        worker_pool *p;
        job *held;
        unsigned kept;

        fx_setup(&f);
        f.spin_work_ns = 200000;  /* 0.2 ms per request: plenty still queued */
        f.disposition = POOL_KEEP;
        /* 4 workers: even with one request each (mutex model) some can be
         * kept, one held and the rest still out at destroy. */
        p = pool_create(4, 4, sizeof(job), "destroy", &fx_ops, &f, &err);
        assert_non_null(p);
        kept = capacity(p) >= 8 ? 3 : 2;
        if (variant >= 1) {
            /* Some finished and kept, maybe one more waiting unpolled. */
            submit_n(p, kept, 0);
            assert_true(pool_wait_any(p, kept, DEADLINE_MS, &err) >= (int)kept);
            assert_int_equal(f.nkept, kept);
        }
        if (variant == 2) {
            held = (job *)pool_submit_prepare(p);     /* held, never committed */
            assert_non_null(held);
        }
        /* Fill every remaining request: queued and running at destroy. */
        for (job *j; (j = (job *)pool_submit_prepare(p));) {
            j->in = 1;
            pool_submit_commit(p, &j->req);
        }
        assert_true(pool_outstanding(p) > 0);
        pool_destroy(p);      /* must neither hang nor leak (ASan) */
        assert_int_equal(atomic_load(&f.uninits), 4);
        fx_teardown(&f);
    }
}

static void test_pool_keep_release(void **state)
{
    fixture f;
    lm_error err = { 0 };
    worker_pool *p;
    unsigned cap;

    fx_setup(&f);
    f.disposition = POOL_KEEP;
    p = pool_create(2, 2, sizeof(job), "keep", &fx_ops, &f, &err);
    assert_non_null(p);
    cap = capacity(p);
    assert_true(cap >= 2 && cap <= 4);
    /* Submitting exactly what the pool has never needs a request back. */
    submit_n(p, cap, 0);
    assert_int_equal(pool_wait_done(p, DEADLINE_MS, &err), 0);
    assert_int_equal(f.nkept, cap);
    /* Every request is kept: nothing to prepare. */
    assert_null(pool_submit_prepare(p));
    pool_req_release(p, &f.kept[0]->req);
    job *j = (job *)pool_submit_prepare(p);
    assert_ptr_equal(j, f.kept[0]);
    pool_req_release(p, &j->req);     /* give back a held one */
    for (unsigned i = 1; i < cap; i++)
        pool_req_release(p, &f.kept[i]->req);
    f.disposition = POOL_RECYCLE;
    submit_n(p, 100, 0);
    assert_int_equal(pool_wait_done(p, DEADLINE_MS, &err), 0);
    assert_int_equal(f.done_count, cap + 100);
    pool_destroy(p);
    fx_teardown(&f);
}

typedef struct interrupter {
    worker_pool *p;
    atomic_bool fired;
    atomic_bool gave_up;
} interrupter;

static void *interrupt_main(void *arg)
{
    interrupter *it = arg;
    pool_stats st;
    int64_t deadline = time_now_ms() + DEADLINE_MS;

    /* Wait until the owner is really asleep in its futex, then interrupt. */
    do {
        if (time_now_ms() > deadline) {
            atomic_store(&it->gave_up, true);
            break;
        }
        sched_yield();
        pool_get_stats(it->p, &st);
    } while (st.owner_sleeps == 0);
    atomic_store(&it->fired, true);
    pool_interrupt(it->p);
    return NULL;
}

static void test_pool_wait_bounded(void **state)
{
    fixture f;
    lm_error err = { 0 };
    worker_pool *p;
    interrupter it = { 0 };
    pthread_t th;
    int64_t t0, ms;
    char want[96];
    unsigned n;

    fx_setup(&f);
    f.gated_worker = 0;
    p = pool_create(1, 4, sizeof(job), "bounded", &fx_ops, &f, &err);
    assert_non_null(p);
    /* As many as fit without waiting (the only worker blocks at once). */
    n = capacity(p) < 2 ? capacity(p) : 2;
    assert_true(n >= 1);
    submit_n(p, n, 0);

    /* Bounded by its timeout, with a message. */
    t0 = time_now_ms();
    assert_int_equal(pool_wait_done(p, 150, &err), -ETIMEDOUT);
    ms = time_now_ms() - t0;
    assert_true(ms >= 150 && ms < 5000);
    snprintf(want, sizeof(want), "pool bounded: %u request(s) still running after 150 ms", n);
    assert_non_null(strstr(err.msg, want));
    assert_int_equal(pool_wait_any(p, 1, 0, &err), -ETIMEDOUT);

    /* Unbounded, ended by an interrupt from another thread. */
    it.p = p;
    assert_int_equal(pthread_create(&th, NULL, interrupt_main, &it), 0);
    assert_int_equal(pool_wait_done(p, -1, &err), -ECANCELED);
    pthread_join(th, NULL);
    assert_false(atomic_load(&it.gave_up));
    assert_true(atomic_load(&it.fired));
    assert_non_null(strstr(err.msg, "interrupted"));
    assert_true(pool_interrupted(p));
    /* Sticky. */
    assert_int_equal(pool_wait_any(p, 1, 1000, &err), -ECANCELED);

    fx_open_gate(&f);
    pool_destroy(p);
    assert_false(atomic_load(&f.gate_timeout));
    fx_teardown(&f);
}

static void test_pool_wakeups(void **state)
{
    fixture f;
    lm_error err = { 0 };
    pool_tuning t = { .spin_ns = 10LL * 1000000000, .start_index = 0 };
    pool_stats st;
    worker_pool *p;
    int64_t deadline;

    /* Workers that spin (10 s budget) never sleep while work keeps coming,
     * so the producer never makes a wake-up call.  The mutex model has no
     * spin (it reports a budget of 0): that half does not apply to it. */
    fx_setup(&f);
    p = pool_create_tuned(2, 4, sizeof(job), "spin", &fx_ops, &f, &t, &err);
    assert_non_null(p);
    if (pool_spin_ns(p) == t.spin_ns) {
        submit_n(p, 2000, 0);
        assert_int_equal(pool_wait_done(p, DEADLINE_MS, &err), 0);
        pool_get_stats(p, &st);
        assert_int_equal(st.worker_sleeps, 0);
        assert_int_equal(st.worker_wakes, 0);
    } else {
        assert_int_equal(pool_spin_ns(p), 0);
        print_message("# this pool model does not spin: spin half skipped\n");
    }
    pool_destroy(p);      /* ends the spin at once */
    fx_teardown(&f);

    /* With no spin the worker sleeps as soon as it is idle; a commit to a
     * sleeping worker wakes it -- exactly one call. */
    fx_setup(&f);
    t.spin_ns = 0;
    p = pool_create_tuned(1, 4, sizeof(job), "sleep", &fx_ops, &f, &t, &err);
    assert_non_null(p);
    for (int round = 0; round < 20; round++) {
        pool_stats before;

        deadline = time_now_ms() + DEADLINE_MS;
        do {
            assert_true(time_now_ms() < deadline);
            sched_yield();
            pool_get_stats(p, &before);
        } while (before.worker_sleeps < (uint64_t)round + 1);
        submit_n(p, 1, 0);
        assert_int_equal(pool_wait_done(p, DEADLINE_MS, &err), 0);
        pool_get_stats(p, &st);
        assert_int_equal(st.worker_wakes, before.worker_wakes + 1);
    }
    pool_destroy(p);
    fx_teardown(&f);
}

static void test_pool_create_errors(void **state)
{
    fixture f;
    lm_error err = { 0 };
    pool_ops no_handler = fx_ops;

    fx_setup(&f);
    assert_null(pool_create(0, 4, sizeof(job), "x", &fx_ops, &f, &err));
    assert_int_equal(err.code, -EINVAL);
    assert_non_null(strstr(err.msg, "0 workers"));
    assert_null(pool_create(1, 3, sizeof(job), "x", &fx_ops, &f, &err));
    assert_non_null(strstr(err.msg, "ring size 3"));
    assert_null(pool_create(1, 4, 4, "x", &fx_ops, &f, &err));
    assert_non_null(strstr(err.msg, "request size"));
    no_handler.handler = NULL;
    assert_null(pool_create(1, 4, sizeof(job), "x", &no_handler, &f, &err));
    assert_non_null(strstr(err.msg, "no handler"));

    /* init fails on worker 2: the two that succeeded are uninit'ed. */
    f.fail_init_worker = 2;
    assert_null(pool_create(3, 4, sizeof(job), "x", &fx_ops, &f, &err));
    assert_int_equal(err.code, -EIO);
    assert_string_equal(err.msg, "pool x: worker 2: no luck");
    assert_int_equal(atomic_load(&f.inits), 2);
    assert_int_equal(atomic_load(&f.uninits), 2);
    fx_teardown(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_all_done),
        cmocka_unit_test(test_pool_wrap),
        cmocka_unit_test(test_pool_slow_worker),
        cmocka_unit_test(test_pool_destroy_outstanding),
        cmocka_unit_test(test_pool_keep_release),
        cmocka_unit_test(test_pool_wait_bounded),
        cmocka_unit_test(test_pool_wakeups),
        cmocka_unit_test(test_pool_create_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
