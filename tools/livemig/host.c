/*
 * The part of `livemig guest` and `livemig vm` that is the same; see
 * host.h.
 */
#include "host.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

#include "util.h"

static void host_wake(struct tool_host *h)
{
    pthread_kill(h->main_thread, SIGUSR1);
}

void tool_host_block_signals(struct tool_host *h)
{
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    h->main_thread = pthread_self();
}

static void on_status(void *opaque, lm_status s)
{
    struct tool_host *h = opaque;

    if (s != LM_STATUS_NONE && h->incoming)
        atomic_store(&h->incoming_seen, true);
    if (s == LM_STATUS_COMPLETED || s == LM_STATUS_FAILED || s == LM_STATUS_CANCELLED)
        host_wake(h);
}

const lm_listener tool_host_listener = { .status_changed = on_status };

bool tool_host_arriving(struct tool_host *h)
{
    bool arriving = h->incoming && !atomic_load(&h->arrival_started) &&
                    (atomic_load(&h->incoming_seen) ||
                     lm_runstate_get(h->m) == LM_RUN_INMIGRATE);
    return arriving && !atomic_exchange(&h->arrival_started, true);
}

bool tool_host_defer_arrival(struct tool_host *h)
{
    lm_stats st;

    lm_query(h->m, &st);
    if (st.status != LM_STATUS_POSTCOPY_ACTIVE)
        return false;
    atomic_store(&h->postcopy_arrival, true);
    return true;
}

bool tool_host_check_at_start(struct tool_host *h, bool wanted)
{
    return tool_host_arriving(h) && wanted && !tool_host_defer_arrival(h);
}

int tool_host_reply(json_t *o, char **reply_json, lm_error *err)
{
    *reply_json = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (o && !*reply_json)
        return tool_error(err, -ENOMEM, "out of memory");
    return 0;
}

json_t *tool_host_args(const char *args_json, lm_error *err)
{
    json_error_t je;
    json_t *a = json_loads(args_json ? args_json : "{}", 0, &je);
    if (!json_is_object(a)) {
        json_decref(a);
        tool_error(err, -EINVAL, "arguments must be a JSON object");
        return NULL;
    }
    return a;
}

int tool_host_qmp_quit(void *opaque, const char *args_json, char **reply_json, lm_error *err)
{
    struct tool_host *h = opaque;

    atomic_store(&h->quit, true);
    host_wake(h);
    *reply_json = NULL;
    return 0;
}

int tool_host_wait(struct tool_host *h)
{
    sigset_t set;
    struct timespec tick = { 1, 0 };

    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGUSR1);
    for (;;) {
        int sig = sigtimedwait(&set, NULL, &tick);
        if (sig == SIGINT || sig == SIGTERM || atomic_load(&h->quit))
            return 0;
        if (atomic_load(&h->postcopy_arrival)) {
            lm_stats st;
            lm_query(h->m, &st);
            if (st.status == LM_STATUS_COMPLETED) {
                if (h->late_arrival)
                    h->late_arrival(h);
                atomic_store(&h->postcopy_arrival, false);
            } else if (st.status == LM_STATUS_FAILED) {
                fprintf(stderr, "%s: incoming postcopy migration failed after the guest "
                        "started: %s\n", h->name, st.error_desc);
                return 1;
            }
        }
        /* Before the arrival, a failure can only be the incoming migration's
         * (after it, this guest may itself be migrated away, and that
         * failing is no reason to exit). */
        if (h->incoming && atomic_load(&h->incoming_seen) &&
            !atomic_load(&h->arrival_started)) {
            lm_stats st;
            lm_query(h->m, &st);
            if (st.status == LM_STATUS_FAILED || st.status == LM_STATUS_CANCELLED) {
                fprintf(stderr, "%s: incoming migration failed: %s\n", h->name,
                        st.error_desc[0] ? st.error_desc : lm_status_name(st.status));
                return 1;
            }
        }
    }
}
