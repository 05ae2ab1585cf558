/*
 * What `livemig guest` and `livemig vm` share as programs that host a
 * guest in a migration context and serve QMP: the QMP reply/argument
 * helpers, the `quit` command, the listener that notices an incoming
 * migration, and the main thread's wait.
 *
 * A command fills a struct tool_host, calls tool_host_block_signals()
 * before it creates any thread, adds tool_host_listener (opaque = the
 * host) to its context and registers tool_host_qmp_quit as "quit", then
 * sleeps in tool_host_wait().  Its vm ops' start() asks
 * tool_host_arriving() whether this start is the first after an incoming
 * migration began (the place to check the guest before it runs).
 *
 * Threads: main parses, sets up and waits in sigtimedwait() for SIGINT /
 * SIGTERM, or for SIGUSR1, which the quit handler and the listener send it
 * (pthread_kill) to say "look at the flags".  SIGINT/SIGTERM/SIGUSR1 are
 * blocked in every thread, so only that wait ever takes them.
 */
#ifndef LIVEMIG_TOOL_HOST_H
#define LIVEMIG_TOOL_HOST_H

#include <pthread.h>
#include <stdbool.h>

#include <jansson.h>

#include "livemig/livemig.h"
#include "livemig/qmp.h"

struct tool_host {
    const char *name;              /* "livemig guest", for messages */
    lm_mig *m;
    lm_qmp *q;
    bool incoming;                 /* started as a destination */
    pthread_t main_thread;

    _Atomic bool quit;             /* QMP quit */
    _Atomic bool incoming_seen;    /* an incoming migration has begun */
    _Atomic bool arrival_started;  /* the first start() after it ran */
    /* Postcopy: the guest starts before its last page has arrived, so a
     * check of its memory waits for the migration's end: start() calls
     * tool_host_defer_arrival(), and tool_host_wait() calls late_arrival
     * on the main thread once the migration completed. */
    _Atomic bool postcopy_arrival;
    void (*late_arrival)(struct tool_host *h);
};

/* Before any thread exists: block SIGINT, SIGTERM, SIGUSR1; main_thread = self. */
void tool_host_block_signals(struct tool_host *h);

/* Status listener (opaque = the host). */
extern const lm_listener tool_host_listener;

/* True exactly once: on the first start() of a destination after an
 * incoming migration began (the listener may not have run yet, so the
 * run state "inmigrate" counts too). */
bool tool_host_arriving(struct tool_host *h);

/* In start() after tool_host_arriving(): true when this arrival is a
 * postcopy one (the check is then late_arrival's, at the end). */
bool tool_host_defer_arrival(struct tool_host *h);
/* start()'s question, whole: is this the arrival, and is its check (when
 * `wanted`) to run now, before the guest runs?  A postcopy arrival answers
 * no and leaves the check to late_arrival. */
bool tool_host_check_at_start(struct tool_host *h, bool wanted);

/* QMP helpers: a reply from a JSON value (consumed; NULL = {}), and the
 * arguments as an object (NULL with a message when they are not one). */
int tool_host_reply(json_t *o, char **reply_json, lm_error *err);
json_t *tool_host_args(const char *args_json, lm_error *err);

/* The "quit" command (opaque = the host). */
int tool_host_qmp_quit(void *opaque, const char *args_json, char **reply_json,
                       lm_error *err);

/*
 * Sleep until quit, a signal, or (on a destination, before the arrival or
 * during a postcopy one) a failed incoming migration; the exit status: 0,
 * or 1 after that failure (its message printed).
 */
int tool_host_wait(struct tool_host *h);

#endif
