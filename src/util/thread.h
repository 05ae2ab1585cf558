/*
 * Starting a library thread: with every signal blocked, so that signals
 * stay the program's business (a SIGPIPE from a dead peer, SIGINT at the
 * terminal, the tool's SIGUSR1 wake-ups) and never land on a migration,
 * channel, pool or server thread.  The new thread inherits the mask; the
 * caller's own mask is restored before this returns.
 */
#ifndef UTIL_THREAD_H
#define UTIL_THREAD_H

#include <pthread.h>
#include <signal.h>

/* pthread_create's result (0 or an errno value, positive). */
static inline int thread_start(pthread_t *t, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    int ret;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    ret = pthread_create(t, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ret;
}

#endif
