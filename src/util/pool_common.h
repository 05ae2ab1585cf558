/*
 * What both lm_pool implementations (pool.c, pool_mutex.c; see pool.h) do
 * the same way: checking create()'s arguments, and starting a worker
 * thread.  One copy, so a caller can never pass in one build what the other
 * refuses, and both name and mask their threads alike.  Private to the pool.
 */
#ifndef LM_UTIL_POOL_COMMON_H
#define LM_UTIL_POOL_COMMON_H

#include <pthread.h>
#include <stddef.h>

#include "util/pool.h"

/* The checks of lm_pool_create; 0 or -EINVAL with err filled. */
int pool_check_args(unsigned nworkers, unsigned ring_size, size_t req_size, const char *name,
                    const lm_pool_ops *ops, lm_error *err);

/*
 * Start worker `index` of pool `name` running fn(arg), named "<name>/<index>"
 * and with every signal blocked (the program's handlers run elsewhere).
 * 0 or a negative errno with err filled.
 */
int pool_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg, const char *name,
                      unsigned index, lm_error *err);

#endif
