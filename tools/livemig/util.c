/*
 * Helpers for the `livemig` command: error filling, number parsing and
 * printing.  Nothing here keeps state.
 */
#include "util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int error_vset(lm_error *err, int code, bool with_errno, const char *fmt,
                      va_list ap)
{
    if (!err)
        return code;
    err->code = code;
    int n = vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    if (with_errno && n >= 0 && (size_t)n < sizeof(err->msg))
        snprintf(err->msg + n, sizeof(err->msg) - n, ": %s", strerror(-code));
    return code;
}

int tool_error(lm_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(err, code, false, fmt, ap);
    va_end(ap);
    return code;
}

int tool_error_errno(lm_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(err, code, true, fmt, ap);
    va_end(ap);
    return code;
}

void tool_format_size(uint64_t bytes, char *buf, size_t len)
{
    static const char *const unit[] = { "KiB", "MiB", "GiB", "TiB" };
    int u = -1;
    uint64_t v = bytes;

    while (u < 3 && v >= 1024 && v % 1024 == 0) {
        v /= 1024;
        u++;
    }
    if (u < 0)
        snprintf(buf, len, "%llu bytes", (unsigned long long)bytes);
    else
        snprintf(buf, len, "%llu %s", (unsigned long long)v, unit[u]);
}

bool tool_parse_int(const char *s, int64_t min, int64_t max, int64_t *out)
{
    char *end;
    long long v;

    if (!s || !*s)
        return false;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return false;
    *out = v;
    return true;
}

bool tool_parse_rate(const char *s, int64_t *out)
{
    if (s && !strcmp(s, "max")) {
        *out = -1;
        return true;
    }
    return tool_parse_int(s, -1, INT64_MAX / 2, out);   /* -1 = max, as in QMP */
}
