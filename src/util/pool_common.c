/*
 * The parts of lm_pool creation shared by pool.c and pool_mutex.c
 * (pool_common.h says why they are shared).
 */
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "util/error.h"
#include "util/pool_common.h"

static bool is_pow2(uint32_t v)
{
    return v && !(v & (v - 1));
}

int pool_check_args(unsigned nworkers, unsigned ring_size, size_t req_size, const char *name,
                    const lm_pool_ops *ops, lm_error *err)
{
    if (nworkers < 1 || nworkers > LM_POOL_MAX_WORKERS)
        return lm_error_set(err, -EINVAL, "pool %s: %u workers (must be 1..%d)", name,
                            nworkers, LM_POOL_MAX_WORKERS);
    if (!is_pow2(ring_size) || ring_size > 65536)
        return lm_error_set(err, -EINVAL, "pool %s: ring size %u is not a power of two in "
                            "1..65536", name, ring_size);
    if (req_size < sizeof(lm_pool_req) || req_size > (1u << 30))
        return lm_error_set(err, -EINVAL, "pool %s: request size %zu out of range", name,
                            req_size);
    if (!ops || !ops->handler)
        return lm_error_set(err, -EINVAL, "pool %s: no handler", name);
    return 0;
}

int pool_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg, const char *name,
                      unsigned index, lm_error *err)
{
    char tname[32];
    sigset_t all, old;
    int r;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    r = pthread_create(thread, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r)
        return lm_error_set_errno(err, -r, "pool %s: cannot start worker %u", name, index);
    snprintf(tname, sizeof(tname), "%s/%u", name, index);
    tname[15] = 0;  /* the kernel's limit */
    pthread_setname_np(*thread, tname);  /* cosmetic: ignore failure */
    return 0;
}
