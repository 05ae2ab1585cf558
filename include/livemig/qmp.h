/*
 * livemig QMP server: a QEMU-compatible control socket for one lm_mig.
 *
 * The server speaks QMP as QEMU does (greeting, capabilities negotiation,
 * {"execute":...} / {"return":...} / {"error":{"class","desc"}}, events with
 * timestamps), so scripts written for QEMU's migration commands work
 * unchanged.  It serves the migration commands itself (migrate,
 * migrate-incoming, migrate_cancel / migrate-cancel, query-migrate,
 * migrate-set-capabilities, query-migrate-capabilities,
 * migrate-set-parameters, query-migrate-parameters, query-status, stop, cont)
 * and emits MIGRATION, STOP and RESUME events.  The program adds its own
 * commands (quit, x-guest-verify, ...) with lm_qmp_register().
 *
 * Threads: one server thread owns the listening socket and every client
 * connection; command handlers (built-in and registered) run on it, one at a
 * time.  lm_qmp_event() may be called from any thread.
 */
#ifndef LIVEMIG_QMP_H
#define LIVEMIG_QMP_H

#include "livemig/livemig.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lm_qmp lm_qmp;

/*
 * A program-defined command.  `args_json` is the "arguments" object as JSON
 * text ("{}" when absent).  On success return 0 and set *reply_json to a
 * malloc'ed JSON value (NULL means {}); the server frees it.  On failure
 * return a negative errno and fill err; err->msg becomes the error "desc" and
 * the class is GenericError.
 */
typedef int (*lm_qmp_handler)(void *opaque, const char *args_json,
                              char **reply_json, lm_error *err);

/* Listen on `uri` (unix:PATH) and start the server thread. */
lm_qmp *lm_qmp_start(lm_mig *m, const char *uri, lm_error *err);

/* Add or replace a command.  Call before clients may use it. */
int lm_qmp_register(lm_qmp *q, const char *name, lm_qmp_handler fn, void *opaque);

/* Send an event to every client that finished negotiation. */
void lm_qmp_event(lm_qmp *q, const char *name, const char *data_json);

/* Stop the server: closes all clients, joins the thread, removes the socket. */
void lm_qmp_stop(lm_qmp *q);

#ifdef __cplusplus
}
#endif
#endif
