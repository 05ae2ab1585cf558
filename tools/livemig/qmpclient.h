/*
 * A small QMP client over a unix socket: connect, negotiate, execute
 * commands, collect events.  Used by `livemig migrate` and `livemig demo`
 * (and works against QEMU too: it speaks plain QMP).
 *
 * Every wait is bounded by the caller's timeout; nothing blocks forever.
 * Messages are read line by line (a QMP server ends each message with a
 * newline).  Events that arrive while a command waits for its reply are
 * queued in arrival order and handed out by qmpc_next_event().  Command
 * replies are matched by the "id" the client sends.
 *
 * Threads: a qmpc belongs to one thread at a time; there is no locking.
 * Ownership: qmpc_execute steals `args`; *ret is a new reference the caller
 * must json_decref; qmpc_next_event returns a reference the caller owns.
 */
#ifndef LIVEMIG_TOOL_QMPCLIENT_H
#define LIVEMIG_TOOL_QMPCLIENT_H

#include <stdbool.h>
#include <jansson.h>

#include "livemig/livemig.h"

struct qmpc;

/* Returns false when there is no point waiting any longer (e.g. the server
 * process died); used while waiting for the socket to appear. */
typedef bool (*qmpc_alive_fn)(void *opaque, lm_error *err);

/*
 * Connect to `path` (a plain path, or "unix:PATH"), read the greeting and
 * negotiate capabilities.  Retries while the socket does not exist yet or
 * refuses, until timeout_ms; `alive` (may be NULL) can cut the wait short.
 */
int qmpc_connect(struct qmpc **out, const char *path, int timeout_ms,
                 qmpc_alive_fn alive, void *alive_opaque, lm_error *err);

/*
 * Run `cmd` with `args` (stolen; NULL for none).  On success returns 0 and,
 * if ret is not NULL, sets *ret to the "return" value.  A QMP error reply
 * returns -EREMOTEIO with "<cmd>: <desc>" in err; a closed connection
 * -ECONNRESET; no reply within timeout_ms -ETIMEDOUT.
 */
int qmpc_execute(struct qmpc *c, const char *cmd, json_t *args, json_t **ret,
                 int timeout_ms, lm_error *err);

/* Wait up to timeout_ms for input and queue whatever events arrive. */
int qmpc_poll(struct qmpc *c, int timeout_ms, lm_error *err);

/* The oldest queued event (caller owns it), or NULL. */
json_t *qmpc_next_event(struct qmpc *c);

void qmpc_close(struct qmpc *c);

#endif
