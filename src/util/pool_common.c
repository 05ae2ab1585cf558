/*
 * The parts of worker_pool creation shared by pool.c and bench/pool_mutex.c
 * (pool_common.h says why they are shared).
 */
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "util/thread.h"
#include "util/error.h"
#include "util/time.h"
#include "util/pool_common.h"

static bool is_pow2(uint32_t v)
{
    return v && !(v & (v - 1));
}

int pool_check_args(unsigned nworkers, unsigned ring_size, size_t req_size, const char *name,
                    const pool_ops *ops, lm_error *err)
{
    if (nworkers < 1 || nworkers > POOL_MAX_WORKERS)
        return error_set(err, -EINVAL, "pool %s: %u workers (must be 1..%d)", name,
                         nworkers, POOL_MAX_WORKERS);
    if (!is_pow2(ring_size) || ring_size > 65536)
        return error_set(err, -EINVAL, "pool %s: ring size %u is not a power of two in "
                         "1..65536", name, ring_size);
    if (req_size < sizeof(pool_req) || req_size > (1u << 30))
        return error_set(err, -EINVAL, "pool %s: request size %zu out of range", name,
                         req_size);
    if (!ops || !ops->handler)
        return error_set(err, -EINVAL, "pool %s: no handler", name);
    return 0;
}

/* The same in both models: the defaults are create_tuned's. */
worker_pool *pool_create(unsigned nworkers, unsigned ring_size, size_t req_size,
                         const char *name, const pool_ops *ops, void *opaque,
                         lm_error *err)
{
    return pool_create_tuned(nworkers, ring_size, req_size, name, ops, opaque, NULL, err);
}

static pool_thread *pt_at(pool_thread *pt0, size_t stride, unsigned i)
{
    return (pool_thread *)((char *)pt0 + (size_t)i * stride);
}

int pool_threads_start(void *w0, pool_thread *pt0, size_t stride, unsigned n,
                       const pool_ops *ops, void *opaque, const char *name,
                       void *(*fn)(void *), lm_error *err)
{
    unsigned i;
    int r;

    for (i = 0; i < n; i++) {
        pool_thread *pt = pt_at(pt0, stride, i);

        if (ops->init && (r = ops->init(opaque, i, &pt->wctx, err)) < 0) {
            error_prefix(err, "pool %s: worker %u", name, i);
            return r;
        }
        pt->inited = true;
    }
    for (i = 0; i < n; i++) {
        pool_thread *pt = pt_at(pt0, stride, i);
        char tname[32];

        r = thread_start(&pt->thread, fn, (char *)w0 + (size_t)i * stride);
        if (r)
            return error_set_errno(err, -r, "pool %s: cannot start worker %u", name, i);
        pt->started = true;
        snprintf(tname, sizeof(tname), "%s/%u", name, i);
        tname[15] = 0;  /* the kernel's limit */
        pthread_setname_np(pt->thread, tname);  /* cosmetic: ignore failure */
    }
    return 0;
}

void pool_threads_stop(pool_thread *pt0, size_t stride, unsigned n, const pool_ops *ops,
                       void *opaque)
{
    for (unsigned i = 0; i < n; i++)
        if (pt_at(pt0, stride, i)->started)
            pthread_join(pt_at(pt0, stride, i)->thread, NULL);
    for (unsigned i = 0; i < n; i++)
        if (pt_at(pt0, stride, i)->inited && ops->uninit)
            ops->uninit(opaque, i, pt_at(pt0, stride, i)->wctx);
}

static int64_t deadline_of(int64_t timeout_ms)
{
    return timeout_ms < 0 ? INT64_MAX : time_now_ns() + timeout_ms * 1000000;
}

int pool_wait_any(worker_pool *p, unsigned want, int64_t timeout_ms, lm_error *err)
{
    return pool_wait_for(p, want, deadline_of(timeout_ms), timeout_ms, err);
}

int pool_wait_done(worker_pool *p, int64_t timeout_ms, lm_error *err)
{
    int64_t deadline = deadline_of(timeout_ms);

    /* A loop because done() may commit more work. */
    while (pool_outstanding(p)) {
        int rc = pool_wait_for(p, pool_outstanding(p), deadline, timeout_ms, err);

        if (rc < 0)
            return rc;
    }
    return 0;
}
