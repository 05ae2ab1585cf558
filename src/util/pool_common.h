/*
 * What both worker_pool implementations (pool.c, bench/pool_mutex.c; see
 * pool.h) do the same way: checking create()'s arguments, and the workers'
 * threads and per-worker contexts from start to join.  One copy, so a
 * caller can never pass to one model what the other refuses, and both name
 * and mask their threads alike.  Private to the pool (and to the bench's
 * mutex model, which is a pool too).
 */
#ifndef UTIL_POOL_COMMON_H
#define UTIL_POOL_COMMON_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/pool.h"

/* The checks of pool_create; 0 or -EINVAL with err filled. */
int pool_check_args(unsigned nworkers, unsigned ring_size, size_t req_size, const char *name,
                    const pool_ops *ops, lm_error *err);

/* The thread part of a worker; each implementation's worker struct has one. */
typedef struct pool_thread {
    pthread_t thread;
    void *wctx;             /* ops->init's context, passed to the handler */
    bool inited, started;   /* what pool_threads_stop must undo */
} pool_thread;

/*
 * For n workers `stride` bytes apart starting at w0, whose pool_thread
 * members start at pt0: run ops->init for each, then start each thread
 * running fn(worker), named "<name>/<i>" and with every signal blocked (the
 * program's handlers run elsewhere).  0, or a negative errno with err filled
 * -- what did start is recorded for pool_threads_stop.
 */
int pool_threads_start(void *w0, pool_thread *pt0, size_t stride, unsigned n,
                       const pool_ops *ops, void *opaque, const char *name,
                       void *(*fn)(void *), lm_error *err);
/*
 * Each model's one wait, owner only: until at least min(want, outstanding)
 * requests finished (then polled), the absolute CLOCK_MONOTONIC `deadline`
 * in ns (INT64_MAX: none) passed, or the pool was interrupted.  Returns how
 * many were polled, -ETIMEDOUT (message names timeout_ms) or -ECANCELED.
 * pool_common.c builds pool_wait_any / pool_wait_done on it.
 */
int pool_wait_for(worker_pool *p, unsigned want, int64_t deadline, int64_t timeout_ms,
                  lm_error *err);

/* Join the started threads (the caller has told them to exit), then
 * ops->uninit every inited context. */
void pool_threads_stop(pool_thread *pt0, size_t stride, unsigned n, const pool_ops *ops,
                       void *opaque);

#endif
