/*
 * Error and log helpers; see error.h.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "util/error.h"

int error_setv(lm_error *err, int code, const char *fmt, va_list ap)
{
    if (err) {
        err->code = code ? code : -EINVAL;
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    }
    return code ? code : -EINVAL;
}

int error_set(lm_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    code = error_setv(err, code, fmt, ap);
    va_end(ap);
    return code;
}

int error_set_errno(lm_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    code = error_setv(err, code, fmt, ap);
    va_end(ap);
    if (err) {
        size_t n = strlen(err->msg);
        snprintf(err->msg + n, sizeof(err->msg) - n, ": %s", strerror(-code));
    }
    return code;
}

void error_prefix(lm_error *err, const char *fmt, ...)
{
    char old[LM_ERROR_MAX];
    size_t n;
    va_list ap;

    if (!err)
        return;
    memcpy(old, err->msg, sizeof(old));
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    n = strlen(err->msg);
    /* "prefix: old", cut at the buffer's end */
    if (n + 2 < sizeof(err->msg)) {
        memcpy(err->msg + n, ": ", 3);
        n += 2;
        size_t k = strnlen(old, sizeof(old));
        if (k > sizeof(err->msg) - n - 1)
            k = sizeof(err->msg) - n - 1;
        memcpy(err->msg + n, old, k);
        err->msg[n + k] = 0;
    }
}

void error_copy(lm_error *dst, const lm_error *src)
{
    if (dst && src)
        *dst = *src;
}

void util_log(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    fprintf(stderr, "livemig: %s\n", buf);
}

void error_list_add(char *list, size_t size, const char *fmt, ...)
{
    size_t used = strnlen(list, size);
    va_list ap;
    int n;

    if (used + 8 >= size)
        return;                         /* full: its "..." says so already */
    if (used)
        used += (size_t)snprintf(list + used, size - used, "; ");
    va_start(ap, fmt);
    n = vsnprintf(list + used, size - used, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= size - used)
        memcpy(list + size - 4, "...", 4);
}
