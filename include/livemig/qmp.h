/*
 * livemig QMP server: a QEMU-compatible control socket for one lm_mig.
 *
 * The server speaks QMP as QEMU 7.2 does (greeting, capabilities negotiation,
 * {"execute":...} / {"return":...} / {"error":{"class","desc"}}, "id" echoed,
 * events with wall-clock timestamps, one message per line), so scripts
 * written for QEMU's migration commands work unchanged.  The greeting and
 * query-version report QEMU 7.2 and, as the package, this livemig build's
 * version.
 *
 * Two layers, one calling convention.  The protocol server itself handles
 * qmp_capabilities, query-commands, query-version and getfd / closefd.
 * QEMU's migration commands (migrate, migrate-incoming, migrate_cancel /
 * migrate-cancel, query-migrate, migrate-set-capabilities,
 * query-migrate-capabilities, migrate-set-parameters,
 * query-migrate-parameters, query-status, stop, cont) and events (MIGRATION,
 * only with capability "events" as in QEMU; STOP; RESUME; the library's
 * notices) are built in too, but as a user of this header: lm_qmp_new()
 * registers them with lm_qmp_register(), they send events with
 * lm_qmp_event() and take "fd:NAME" descriptors with lm_qmp_take_fd(), and
 * they reach the migration only through the public lm_* API.  So a
 * program's own commands (quit, x-guest-verify, ...) can do whatever the
 * migration commands do.  Every command but qmp_capabilities is an
 * lm_qmp_handler, and a program may replace any of them.
 *
 * Several clients may be connected at once (up to 32; more wait in the
 * listen backlog); each negotiates on its own and gets every event after
 * that.  A client that sends garbage gets errors; one that sends an
 * unfinished value over 1 MiB, nests deeper than 1024, or leaves 16 MiB of
 * replies unread is disconnected.  None of this affects other clients.
 *
 * Threads: one server thread owns the listening socket and every client
 * connection; command handlers (built-in and registered) run on it, one at a
 * time, so a slow handler delays every client.  lm_qmp_event() and
 * lm_qmp_register() may be called from any thread; lm_qmp_take_fd() only
 * from a handler.
 */
#ifndef LIVEMIG_QMP_H
#define LIVEMIG_QMP_H

#include "livemig/livemig.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lm_qmp lm_qmp;

/*
 * A command, run on the server thread: a program's, and every built-in one
 * but qmp_capabilities.  `args_json` is the "arguments" object as JSON text
 * ("{}" when absent); it is only valid during the call, and checking it is
 * the handler's job.  On success return 0 and set *reply_json to a
 * malloc'ed JSON value (NULL means {}); the server frees it (also on
 * failure).  On failure return a negative errno and fill err; err->msg
 * becomes the error "desc" ("NAME failed: <strerror>" when it is empty) and
 * the class is GenericError, the only one a QEMU command reports (the
 * protocol's CommandNotFound is the server's).  A handler may call
 * lm_qmp_event(), lm_qmp_take_fd() and any lm_* function, but not
 * lm_qmp_stop() (it would join its own thread): a "quit" handler tells the
 * program's own thread to stop the server instead; its reply and queued
 * events are still flushed to clients by lm_qmp_stop().
 */
typedef int (*lm_qmp_handler)(void *opaque, const char *args_json,
                              char **reply_json, lm_error *err);

/*
 * Listen on `uri` (unix:PATH only) and start the server thread.  A stale
 * socket file (nobody answering) is replaced; a live one, or a path that is
 * not a socket, is an error.  Subscribes to `m` with lm_add_listener for the
 * migration events (one of its listener slots, given back by lm_qmp_stop,
 * which must therefore run before lm_free(m) and never from inside a
 * listener callback).  Returns NULL and fills err on failure.
 */
lm_qmp *lm_qmp_start(lm_mig *m, const char *uri, lm_error *err);

/*
 * lm_qmp_start in two steps, for a program that adds commands: lm_qmp_new()
 * listens and starts the thread but serves nobody (connections wait in the
 * kernel's backlog) until lm_qmp_open(), so no client ever sees the command
 * set before the program's own commands are registered.
 */
lm_qmp *lm_qmp_new(lm_mig *m, const char *uri, lm_error *err);
void lm_qmp_open(lm_qmp *q);

/*
 * Add or replace a command (0, or -EINVAL / -ENOMEM).  The built-in ones are
 * registered by lm_qmp_new() before the program can register anything, so
 * a program command of the same name replaces a built-in one (in place:
 * query-commands lists it once, where the built-in was); qmp_capabilities
 * cannot be replaced.  Takes effect for the next request.
 */
int lm_qmp_register(lm_qmp *q, const char *name, lm_qmp_handler fn, void *opaque);

/*
 * Take a descriptor that the client whose command is running passed earlier
 * with "getfd" under `name` (QMP's way to hand over a socket or a pipe: the
 * descriptor rides on a request as SCM_RIGHTS, getfd names it, a later
 * command refers to it, as "fd:NAME" in migrate's URI).  Named descriptors
 * belong to the client that passed them, so this is valid only in a command
 * handler, on the server thread, during the call: the server knows whose
 * request it is running.  On success returns the descriptor, which is now
 * the caller's to close, and the name is forgotten (as QEMU's monitor hands
 * a named descriptor over).  Returns -ENOENT when this client named no
 * descriptor so, -EPERM outside a handler or on another thread, -EINVAL for
 * NULL arguments.
 */
int lm_qmp_take_fd(lm_qmp *q, const char *name);

/*
 * Send an event to every client that finished negotiation.  `data_json` is
 * the "data" member as JSON text, or NULL for an event without data (like
 * STOP).  Never blocks: the event is stamped and queued now, written by the
 * server thread.  Invalid JSON is logged and dropped.
 */
void lm_qmp_event(lm_qmp *q, const char *name, const char *data_json);

/*
 * Stop the server: delivers queued events, gives clients up to one second to
 * read what is pending, closes all clients, joins the thread and removes the
 * socket file (if it is still ours).  `m` stays usable; after this, its
 * status changes reach no QMP client.  Frees q; NULL is a no-op.
 */
void lm_qmp_stop(lm_qmp *q);

#ifdef __cplusplus
}
#endif
#endif
