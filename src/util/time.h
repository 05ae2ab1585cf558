/*
 * Monotonic time in the units the code needs.  CLOCK_MONOTONIC everywhere:
 * durations and deadlines must not jump with the wall clock.
 */
#ifndef UTIL_TIME_H
#define UTIL_TIME_H

#include <stdint.h>
#include <time.h>

static inline int64_t time_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int64_t time_now_us(void) { return time_now_ns() / 1000; }
static inline int64_t time_now_ms(void) { return time_now_ns() / 1000000; }

/* Absolute CLOCK_MONOTONIC timespec `ms` from now, for timed waits. */
static inline struct timespec time_deadline_ms(int64_t ms)
{
    int64_t ns = time_now_ns() + ms * 1000000;
    struct timespec ts = { .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };
    return ts;
}

#endif
