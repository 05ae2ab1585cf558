/*
 * Small helpers shared by the `livemig` subcommands.
 *
 * The command uses only the public API (livemig.h, qmp.h), so it cannot use
 * the library's internal error helpers; tool_error() fills the same public
 * lm_error type the library uses, so every message in the tool has one
 * shape whether it came from the library or from here.
 */
#ifndef LIVEMIG_TOOL_UTIL_H
#define LIVEMIG_TOOL_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "livemig/livemig.h"

/* Fill err (if non-NULL) and return `code` (a negative errno). */
int tool_error(lm_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The same, appending ": strerror(-code)". */
int tool_error_errno(lm_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static inline int64_t tool_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int64_t tool_now_ms(void) { return tool_now_ns() / 1000000; }

/* "1 GiB", "512 MiB", "12345 bytes": exact binary units when they divide. */
void tool_format_size(uint64_t bytes, char *buf, size_t len);

/* Parse a whole decimal integer in [min, max]; false on junk or range. */
bool tool_parse_int(const char *s, int64_t min, int64_t max, int64_t *out);

/* Parse "N", "max" or -1 (both mean as fast as possible: -1) as pages/s. */
bool tool_parse_rate(const char *s, int64_t *out);

#endif
