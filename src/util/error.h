/*
 * One error type for the whole library: lm_error (public, in livemig.h) is
 * plain caller-owned storage.  error_set() fills it, error_prefix()
 * adds context on the way up ("connect to tcp:...: Connection refused").
 * Passing NULL means "I don't care about the message"; the code is still
 * returned by the caller.  Also the tiny logging helper used on threads that
 * have nobody to return an error to.
 */
#ifndef UTIL_ERROR_H
#define UTIL_ERROR_H

#include <stdarg.h>
#include "livemig/livemig.h"

/* Set err (if non-NULL) and return `code` so callers can `return error_set(...)`. */
int error_set(lm_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int error_setv(lm_error *err, int code, const char *fmt, va_list ap);
/* Like error_set, appending ": strerror(-code)". */
int error_set_errno(lm_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/*
 * Append one item to a "; "-separated list in list[0..size) (a message
 * naming everything that is missing, say); a list that no longer fits ends
 * in "...".  list must be NUL-terminated ("" to start).
 */
void error_list_add(char *list, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prepend "prefix: " to an already set message. */
void error_prefix(lm_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void error_copy(lm_error *dst, const lm_error *src);
static inline void error_clear(lm_error *err) { if (err) { err->code = 0; err->msg[0] = 0; } }

/* stderr, prefixed with "livemig: "; for events no caller can receive. */
void util_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
