/*
 * QEMU's migration commands and events over QMP, for one lm_mig.
 *
 * Design.  This file is a program of the QMP server, not a part of it.  It
 * registers its commands with lm_qmp_register() and sends its events with
 * lm_qmp_event(), exactly as tools/livemig registers "quit", and it reaches
 * the migration only through the public lm_* API.  So it can do nothing a
 * program could not; a program replaces any of these commands by registering
 * its own under the same name; and a new migration feature (postcopy's
 * commands, states and events) is added here without touching the protocol
 * server in qmp.c, which knows nothing about migration.
 *
 * Commands.  One small handler per QEMU command, each an lm_qmp_handler:
 * the arguments arrive as JSON text and are checked against a schema in
 * QEMU's order and words (qmp_args_parse), the reply leaves as malloc'ed
 * JSON text (qmp_reply), and a failure is an lm_error whose message becomes
 * the GenericError desc -- the only class QEMU's migration commands report,
 * so nothing here needs another.  Where the library already said what went
 * wrong, its lm_error is passed through untouched.  "fd:NAME" URIs take the
 * descriptor the requesting client named with getfd through lm_qmp_take_fd(),
 * the public hook for per-client descriptors.
 *
 * Events.  A listener on the lm_mig turns status changes into MIGRATION
 * (only with capability "events", as QEMU), run-state changes into STOP and
 * RESUME, and library notices into events of their own name.  They go out
 * through lm_qmp_event(), which stamps and queues them at once on whatever
 * library thread made the change, so a client still sees STOP before the
 * reply to "stop", as in QEMU, whose events are synchronous.
 *
 * Listener lifetime.  The listener's opaque is this file's state, and the
 * server's owner calls qmp_migration_detach() (lm_remove_listener) before it
 * stops or frees anything.  That is safe because of lm_remove_listener's
 * contract: when it returns, no call to the listener is in progress and none
 * will start -- the library calls listeners from a snapshot of the list and
 * counts the threads inside a snapshot, and removal waits for that count to
 * drop to zero.  So after detaching, no library thread can reach the server
 * through us, and freeing it cannot race with a callback.  The slot goes back
 * to the lm_mig: a program may start and stop servers on one context as
 * often as it likes.  The price is that lm_qmp_stop() must not run inside a
 * listener callback (it would wait for itself) and must run before
 * lm_free(m).
 *
 * Threads.  Handlers run on the server thread, one at a time; listener
 * callbacks run on library threads, possibly several at once.  The only
 * thing they share is the last run state seen, under `lock`.
 */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "control/qmp_json.h"
#include "control/qmp_migration.h"
#include "util/error.h"

struct qmp_migration {
    lm_qmp *q;
    lm_mig *m;
    bool subscribed;             /* our listener is on m (new .. detach) */

    pthread_mutex_t lock;        /* guards runstate: listeners race each other */
    lm_runstate runstate;        /* last seen, to tell STOP from RESUME */
};

/* ---------------------------------------------------------------- events */

/* Any thread.  Takes the reference to `data` (NULL: an event without data). */
static void mig_event(qmp_migration *mig, const char *name, json_t *data)
{
    char *text = NULL;

    if (data) {
        text = json_dumps(data, JSON_COMPACT);
        json_decref(data);
        if (!text) {
            util_log("QMP: out of memory, event %s lost", name);
            return;
        }
    }
    lm_qmp_event(mig->q, name, text);
    free(text);
}

/*
 * Library threads, while subscribed: mig and its server are alive for the
 * whole call (see "Listener lifetime" above).  MIGRATION only with
 * capability "events", as QEMU.
 */
static void mig_on_status(void *opaque, lm_status s)
{
    qmp_migration *mig = opaque;
    bool events = false;

    /* Asked each time: the capability may be switched on at any moment. */
    if (lm_cap_get(mig->m, "events", &events) < 0 || !events)
        return;
    mig_event(mig, "MIGRATION", json_pack("{s:o}", "status", qmp_string(lm_status_name(s))));
}

/* Library threads, while subscribed.  STOP / RESUME when the guest stops or
 * starts running. */
static void mig_on_runstate(void *opaque, lm_runstate rs)
{
    qmp_migration *mig = opaque;
    lm_runstate prev;

    pthread_mutex_lock(&mig->lock);
    prev = mig->runstate;
    mig->runstate = rs;
    pthread_mutex_unlock(&mig->lock);
    /*
     * finish-migrate -> postmigrate is no new stop: no second event.
     * Becoming a destination (inmigrate) is not a STOP either: QEMU's
     * destinations are in that state from startup and never report one,
     * while an lm_mig starts out "running".
     */
    if (prev != LM_RUN_RUNNING && rs == LM_RUN_RUNNING)
        mig_event(mig, "RESUME", NULL);
    else if (prev == LM_RUN_RUNNING && rs != LM_RUN_RUNNING &&
             rs != LM_RUN_INMIGRATE && rs != LM_RUN_PRELAUNCH)
        mig_event(mig, "STOP", NULL);
}

/* Library threads, while subscribed.  Notices are what a supervisor must
 * act on: sent whatever the "events" capability says. */
static void mig_on_notice(void *opaque, const char *name, const char *detail)
{
    mig_event(opaque, name, json_pack("{s:o}", "reason", qmp_string(detail)));
}

static const lm_listener mig_listener = {
    .status_changed = mig_on_status,
    .runstate_changed = mig_on_runstate,
    .notice = mig_on_notice,
};

/* ---------------------------------------------------------------- run state */

static const qmp_arg args_none[] = { { .name = NULL } };

/* A command that takes no arguments: 0, or the complaint about them. */
static int args_none_check(const char *args_json, lm_error *err)
{
    json_t *args = qmp_args_parse(args_json, args_none, err);

    if (!args)
        return err->code;
    json_decref(args);
    return 0;
}

static int cmd_query_status(void *opaque, const char *args_json, char **reply,
                            lm_error *err)
{
    qmp_migration *mig = opaque;
    lm_runstate rs;

    if (args_none_check(args_json, err) < 0)
        return err->code;
    rs = lm_runstate_get(mig->m);
    return qmp_reply(json_pack("{s:o,s:b,s:b}",
                               "status", qmp_string(lm_runstate_name(rs)),
                               "running", rs == LM_RUN_RUNNING,
                               "singlestep", 0), reply, err);
}

static int cmd_stop(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    qmp_migration *mig = opaque;

    if (args_none_check(args_json, err) < 0)
        return err->code;
    return lm_vm_stop(mig->m, err);
}

static int cmd_cont(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    qmp_migration *mig = opaque;

    if (args_none_check(args_json, err) < 0)
        return err->code;
    return lm_vm_start(mig->m, err);
}

/* ---------------------------------------------------------------- migrate */

/*
 * The URI to hand the library.  "fd:NAME" names a descriptor the client
 * passed earlier with getfd, as in QEMU, and the lookup consumes it (QEMU
 * hands it to the migration).  The library takes "fd:N" and dups N, so we
 * pass our number and the caller closes our copy afterwards (*taken).
 * "fd:N" with digits stays a raw descriptor number, as in QEMU.  Returns a
 * malloc'ed URI, or NULL with err set.
 */
static char *mig_resolve_uri(qmp_migration *mig, const char *uri, int *taken,
                             lm_error *err)
{
    const char *name;
    char *out = NULL;
    int fd;

    *taken = -1;
    if (strncmp(uri, "fd:", 3) != 0 || isdigit((unsigned char)uri[3])) {
        out = strdup(uri);
        goto out;
    }
    name = uri + 3;
    fd = lm_qmp_take_fd(mig->q, name);
    if (fd == -ENOENT) {
        error_set(err, -ENOENT, "File descriptor named '%s' has not been found", name);
        return NULL;
    }
    if (fd < 0) {
        error_set(err, fd, "Cannot take file descriptor '%s': %s", name, strerror(-fd));
        return NULL;
    }
    *taken = fd;
    if (asprintf(&out, "fd:%d", fd) < 0)
        out = NULL;
out:
    if (!out)
        error_set(err, -ENOMEM, "Out of memory");
    return out;
}

/* migrate and migrate-incoming once their arguments are checked. */
static int mig_start(qmp_migration *mig, json_t *args, bool incoming, lm_error *err)
{
    const char *uri = json_string_value(json_object_get(args, "uri"));
    int taken, rc;
    char *real = mig_resolve_uri(mig, uri, &taken, err);

    if (!real) {
        rc = err->code;
        goto out;
    }
    rc = incoming ? lm_incoming(mig->m, real, err) : lm_migrate(mig->m, real, err);
out:
    if (taken >= 0)
        close(taken);
    free(real);
    return rc;
}

static const qmp_arg args_migrate[] = {
    { .name = "uri", .type = QMP_STR, .required = true },
    { .name = "blk", .type = QMP_BOOL },
    { .name = "inc", .type = QMP_BOOL },
    { .name = "detach", .type = QMP_BOOL },   /* accepted and ignored, as QEMU */
    { .name = "resume", .type = QMP_BOOL },
    { .name = NULL },
};

static int cmd_migrate(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    qmp_migration *mig = opaque;
    json_t *args = qmp_args_parse(args_json, args_migrate, err);
    int rc;

    if (!args)
        return err->code;
    if (qmp_arg_true(args, "blk") || qmp_arg_true(args, "inc"))
        rc = error_set(err, -ENOTSUP, "Block migration (blk/inc) is not supported: "
                       "livemig migrates RAM and device state only");
    else if (qmp_arg_true(args, "resume"))
        rc = error_set(err, -ENOTSUP, "Resuming a paused migration (resume) is not "
                       "supported: livemig has no postcopy yet");
    else
        rc = mig_start(mig, args, false, err);
    json_decref(args);
    return rc;
}

static const qmp_arg args_uri[] = {
    { .name = "uri", .type = QMP_STR, .required = true },
    { .name = NULL },
};

static int cmd_migrate_incoming(void *opaque, const char *args_json, char **reply,
                                lm_error *err)
{
    json_t *args = qmp_args_parse(args_json, args_uri, err);
    int rc;

    if (!args)
        return err->code;
    rc = mig_start(opaque, args, true, err);
    json_decref(args);
    return rc;
}

static bool mig_status_running(lm_status s)
{
    return !(s == LM_STATUS_NONE || s == LM_STATUS_COMPLETED || s == LM_STATUS_FAILED ||
             s == LM_STATUS_CANCELLED);
}

static int cmd_migrate_start_postcopy(void *opaque, const char *args_json, char **reply,
                                      lm_error *err)
{
    qmp_migration *mig = opaque;

    (void)reply;
    if (args_none_check(args_json, err) < 0)
        return err->code;
    return lm_migrate_start_postcopy(mig->m, err);
}

/* Like QEMU, cancelling when nothing runs is not an error. */
static int cmd_migrate_cancel(void *opaque, const char *args_json, char **reply,
                              lm_error *err)
{
    qmp_migration *mig = opaque;
    lm_stats st;

    if (args_none_check(args_json, err) < 0)
        return err->code;
    memset(&st, 0, sizeof(st));
    lm_query(mig->m, &st);
    if (!mig_status_running(st.status))
        return 0;
    return lm_cancel(mig->m, err);
}

/* ---------------------------------------------------------------- query-migrate */

/*
 * lm_stats.socket_address ("tcp:HOST:PORT", "tcp:[V6]:PORT", "unix:PATH")
 * as QEMU's SocketAddress list.  Other transports have no socket: NULL.
 */
static json_t *mig_socket_address(const char *a)
{
    json_t *addr = NULL;

    if (strncmp(a, "unix:", 5) == 0 && a[5]) {
        addr = json_pack("{s:s,s:o}", "type", "unix", "path", qmp_string(a + 5));
    } else if (strncmp(a, "tcp:", 4) == 0) {
        const char *host = a + 4, *colon = strrchr(host, ':');
        size_t hlen;
        char *h;

        if (!colon || colon == host || !colon[1])
            return NULL;
        hlen = (size_t)(colon - host);
        if (host[0] == '[' && hlen >= 2 && host[hlen - 1] == ']') {
            host++;
            hlen -= 2;
        }
        h = strndup(host, hlen);
        if (!h)
            return NULL;
        addr = json_pack("{s:s,s:o,s:o}", "type", "inet",
                         "host", qmp_string(h), "port", qmp_string(colon + 1));
        free(h);
    }
    return addr ? json_pack("[o]", addr) : NULL;
}

static json_t *mig_ram_info(const lm_stats *st)
{
    /* Members QEMU 7.2 always has; those we do not implement are 0. */
    return json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:f,s:I,s:I,s:I,s:I,"
                     "s:I,s:I,s:I,s:I,s:I}",
                     "transferred", (json_int_t)st->transferred,
                     "remaining", (json_int_t)st->remaining,
                     "total", (json_int_t)st->total,
                     "duplicate", (json_int_t)st->duplicate,
                     "skipped", (json_int_t)0,
                     "normal", (json_int_t)st->normal,
                     "normal-bytes", (json_int_t)st->normal_bytes,
                     "dirty-pages-rate", (json_int_t)st->dirty_pages_rate,
                     "mbps", st->mbps,
                     "dirty-sync-count", (json_int_t)st->dirty_sync_count,
                     "postcopy-requests", (json_int_t)st->postcopy_requests,
                     "page-size", (json_int_t)st->page_size,
                     "multifd-bytes", (json_int_t)st->multifd_bytes,
                     "pages-per-second", (json_int_t)st->pages_per_second,
                     "precopy-bytes", (json_int_t)st->precopy_bytes,
                     "downtime-bytes", (json_int_t)st->downtime_bytes,
                     "postcopy-bytes", (json_int_t)st->postcopy_bytes,
                     "dirty-sync-missed-zero-copy", (json_int_t)0);
}

/*
 * A postcopy destination's fault figures: QEMU's postcopy-blocktime (ms)
 * and 10.1's postcopy-latency (mean, ns) and postcopy-latency-dist (24
 * power-of-two microsecond buckets); the request count, quantiles and
 * maximum are livemig's (x-).
 */
static void mig_postcopy_info(json_t *r, const lm_stats *st)
{
    json_t *dist = json_array();

    for (int k = 0; dist && k < 24; k++)
        json_array_append_new(dist, json_integer((json_int_t)st->postcopy_latency_dist[k]));
    json_object_set_new(r, "postcopy-blocktime", json_integer((json_int_t)st->postcopy_blocktime_ms));
    json_object_set_new(r, "postcopy-latency",
                        json_integer((json_int_t)(st->postcopy_latency_us * 1000)));
    if (dist)
        json_object_set_new(r, "postcopy-latency-dist", dist);
    if (st->postcopy_nvcpus > 0) {
        json_t *vb = json_array();
        for (int v = 0; vb && v < st->postcopy_nvcpus; v++)
            json_array_append_new(vb, json_integer(
                (json_int_t)st->postcopy_vcpu_blocktime_ms[v]));
        if (vb)
            json_object_set_new(r, "postcopy-vcpu-blocktime", vb);
    }
    json_object_set_new(r, "x-postcopy-requests", json_integer((json_int_t)st->postcopy_requests));
    json_object_set_new(r, "x-postcopy-latency-p50-us",
                        json_integer((json_int_t)st->postcopy_latency_p50_us));
    json_object_set_new(r, "x-postcopy-latency-p99-us",
                        json_integer((json_int_t)st->postcopy_latency_p99_us));
    json_object_set_new(r, "x-postcopy-latency-max-us",
                        json_integer((json_int_t)st->postcopy_latency_max_us));
}

/* A destination reports its status and the address it listens on. */
static void mig_info_incoming(json_t *r, const lm_stats *st)
{
    json_t *sa = st->socket_address[0] ? mig_socket_address(st->socket_address) : NULL;

    if (sa)
        json_object_set_new(r, "socket-address", sa);
    if (st->status != LM_STATUS_NONE)
        json_object_set_new(r, "status", qmp_string(lm_status_name(st->status)));
    if (st->status == LM_STATUS_FAILED && st->error_desc[0])
        json_object_set_new(r, "error-desc", qmp_string(st->error_desc));
    if (st->postcopy_requests)
        mig_postcopy_info(r, st);
}

/* Times and "ram" while running and once completed. */
static void mig_info_progress(json_t *r, const lm_stats *st)
{
    json_object_set_new(r, "setup-time", json_integer(st->setup_time));
    json_object_set_new(r, "total-time", json_integer(st->total_time));
    if (st->status == LM_STATUS_COMPLETED)
        json_object_set_new(r, "downtime", json_integer(st->downtime));
    else
        json_object_set_new(r, "expected-downtime", json_integer(st->expected_downtime));
    json_object_set_new(r, "ram", mig_ram_info(st));
    if (st->cpu_throttle_percentage > 0)
        json_object_set_new(r, "cpu-throttle-percentage",
                            json_integer(st->cpu_throttle_percentage));
    if (st->compression)     /* QEMU 7.2's CompressionStats */
        json_object_set_new(r, "compression", json_pack(
            "{s:I, s:I, s:f, s:I, s:f}",
            "pages", (json_int_t)st->compress_pages,
            "busy", (json_int_t)st->compress_busy,
            "busy-rate", st->compress_busy_rate,
            "compressed-size", (json_int_t)st->compressed_size,
            "compression-rate", st->compression_rate));
}

/* A source: everything but the status depends on the status. */
static void mig_info_outgoing(json_t *r, const lm_stats *st)
{
    if (st->status == LM_STATUS_NONE)
        return;
    json_object_set_new(r, "status", qmp_string(lm_status_name(st->status)));
    switch (st->status) {
    case LM_STATUS_ACTIVE:
    case LM_STATUS_DEVICE:
    case LM_STATUS_POSTCOPY_DEVICE:
    case LM_STATUS_POSTCOPY_ACTIVE:
    case LM_STATUS_CANCELLING:
    case LM_STATUS_COMPLETED:
        mig_info_progress(r, st);
        break;
    case LM_STATUS_FAILED:
        if (st->error_desc[0])
            json_object_set_new(r, "error-desc", qmp_string(st->error_desc));
        /* livemig extension: failed after the commit point with no answer;
         * the guest was not resumed (MIGRATION_OUTCOME_UNKNOWN) */
        if (st->outcome_unknown)
            json_object_set_new(r, "x-outcome-unknown", json_true());
        break;
    default:
        break;
    }
    /* livemig extension: which dirty tracker this migration used. */
    if (st->dirty_tracker[0])
        json_object_set_new(r, "x-dirty-tracker", qmp_string(st->dirty_tracker));
}

/*
 * The member set follows QEMU 7.2's, which depends on the status: nothing
 * at all for "none"; only the status for setup and cancelled; times and
 * "ram" while running and once completed; "error-desc" once failed.
 */
static int cmd_query_migrate(void *opaque, const char *args_json, char **reply,
                             lm_error *err)
{
    qmp_migration *mig = opaque;
    json_t *r;
    lm_stats st;

    if (args_none_check(args_json, err) < 0)
        return err->code;
    r = json_object();
    if (!r)
        return error_set(err, -ENOMEM, "Out of memory");
    memset(&st, 0, sizeof(st));
    lm_query(mig->m, &st);
    if (st.incoming)
        mig_info_incoming(r, &st);
    else
        mig_info_outgoing(r, &st);
    return qmp_reply(r, reply, err);
}

/* ---------------------------------------------------------------- capabilities */

static bool mig_cap_known(const char *name)
{
    const char *n;

    for (int i = 0; (n = lm_cap_name(i)); i++)
        if (strcmp(n, name) == 0)
            return true;
    return false;
}

/* One element of migrate-set-capabilities' list, checked as QEMU does. */
static int mig_cap_check(json_t *el, size_t i, lm_error *err)
{
    json_t *cap, *state, *v;
    const char *key, *name;

    if (!json_is_object(el))
        return error_set(err, -EINVAL, "Invalid parameter type for 'capabilities[%zu]', "
                         "expected: object", i);
    cap = json_object_get(el, "capability");
    state = json_object_get(el, "state");
    if (!cap)
        return error_set(err, -EINVAL,
                         "Parameter 'capabilities[%zu].capability' is missing", i);
    if (!json_is_string(cap))
        return error_set(err, -EINVAL, "Invalid parameter type for "
                         "'capabilities[%zu].capability', expected: string", i);
    name = json_string_value(cap);
    if (!mig_cap_known(name))
        return error_set(err, -EINVAL, "Parameter 'capabilities[%zu].capability' does "
                         "not accept value '%s'", i, name);
    if (!state)
        return error_set(err, -EINVAL, "Parameter 'capabilities[%zu].state' is missing", i);
    if (!json_is_boolean(state))
        return error_set(err, -EINVAL, "Invalid parameter type for "
                         "'capabilities[%zu].state', expected: boolean", i);
    json_object_foreach(el, key, v) {
        if (strcmp(key, "capability") != 0 && strcmp(key, "state") != 0)
            return error_set(err, -EINVAL, "Parameter 'capabilities[%zu].%s' is "
                             "unexpected", i, key);
    }
    return 0;
}

static const char *mig_cap_name_at(json_t *list, size_t i)
{
    return json_string_value(json_object_get(json_array_get(list, i), "capability"));
}

/*
 * Set every capability of a checked list in the order given.  A library
 * refusal undoes the ones already set, in reverse, so a capability named
 * twice ends as it started.
 */
static int mig_caps_apply(lm_mig *m, json_t *list, lm_error *err)
{
    size_t n = json_array_size(list), i;
    bool *old = calloc(n ? n : 1, sizeof(*old));
    int rc = 0;

    if (!old)
        return error_set(err, -ENOMEM, "Out of memory");
    for (i = 0; i < n; i++) {
        json_t *el = json_array_get(list, i);
        const char *name = mig_cap_name_at(list, i);

        old[i] = false;
        lm_cap_get(m, name, &old[i]);
        rc = lm_cap_set(m, name, json_is_true(json_object_get(el, "state")), err);
        if (rc < 0)
            goto undo;
    }
    goto out;
undo:
    while (i-- > 0)
        lm_cap_set(m, mig_cap_name_at(list, i), old[i], NULL);
out:
    free(old);
    return rc;
}

static const qmp_arg args_caps[] = {
    { .name = "capabilities", .type = QMP_ARRAY, .required = true },
    { .name = NULL },
};

/*
 * All or nothing: every element is checked before anything is set, and a
 * refusal undoes what was set.  Capabilities are set one at a time in the
 * order given, so if the library checks a dependency at each set, list the
 * capability depended on first.
 */
static int cmd_set_capabilities(void *opaque, const char *args_json, char **reply,
                                lm_error *err)
{
    qmp_migration *mig = opaque;
    json_t *args = qmp_args_parse(args_json, args_caps, err), *list, *el;
    size_t i;
    int rc = 0;

    if (!args)
        return err->code;
    list = json_object_get(args, "capabilities");
    json_array_foreach(list, i, el) {
        rc = mig_cap_check(el, i, err);
        if (rc < 0)
            goto out;
    }
    rc = mig_caps_apply(mig->m, list, err);
out:
    json_decref(args);
    return rc;
}

static int cmd_query_capabilities(void *opaque, const char *args_json, char **reply,
                                  lm_error *err)
{
    qmp_migration *mig = opaque;
    json_t *r;
    const char *name;

    if (args_none_check(args_json, err) < 0)
        return err->code;
    r = json_array();
    for (int i = 0; r && (name = lm_cap_name(i)); i++) {
        bool on = false;

        lm_cap_get(mig->m, name, &on);
        json_array_append_new(r, json_pack("{s:s,s:b}", "capability", name, "state", on));
    }
    return qmp_reply(r, reply, err);
}

/* ---------------------------------------------------------------- parameters */

static int mig_param_index(const char *name)
{
    const char *n;

    for (int i = 0; (n = lm_param_name(i)); i++)
        if (strcmp(n, name) == 0)
            return i;
    return -1;
}

static const char *mig_param_type_name(lm_param_type t)
{
    return t == LM_PARAM_INT ? "integer" : t == LM_PARAM_BOOL ? "boolean" : "string";
}

static bool mig_param_type_ok(lm_param_type t, json_t *v)
{
    switch (t) {
    case LM_PARAM_INT: return json_is_integer(v);
    case LM_PARAM_BOOL: return json_is_boolean(v);
    case LM_PARAM_STR: break;
    }
    /* null clears a string, as QEMU's StrOrNull (tls-creds: null). */
    return json_is_string(v) || json_is_null(v);
}

/*
 * Types first, in the library's order, then anything the library does not
 * name is unexpected: QEMU's order for a flat struct.  *count is how many
 * members were given.
 */
static int mig_params_check(json_t *args, int *count, lm_error *err)
{
    const char *name, *key;
    json_t *v;

    *count = 0;
    for (int i = 0; (name = lm_param_name(i)); i++) {
        v = json_object_get(args, name);
        if (!v)
            continue;
        if (!mig_param_type_ok(lm_param_type_of(i), v))
            return error_set(err, -EINVAL, "Invalid parameter type for '%s', expected: %s",
                             name, mig_param_type_name(lm_param_type_of(i)));
        (*count)++;
    }
    json_object_foreach(args, key, v) {
        if (mig_param_index(key) < 0)
            return error_set(err, -EINVAL, "Parameter '%s' is unexpected", key);
    }
    return 0;
}

typedef struct mig_saved_param {
    int idx;
    int64_t iv;
    bool bv;
    char sv[1024];
} mig_saved_param;

static int mig_param_apply(lm_mig *m, int idx, json_t *v, lm_error *err)
{
    const char *name = lm_param_name(idx);

    switch (lm_param_type_of(idx)) {
    case LM_PARAM_INT:
        return lm_param_set_int(m, name, json_integer_value(v), err);
    case LM_PARAM_BOOL:
        return lm_param_set_bool(m, name, json_is_true(v), err);
    case LM_PARAM_STR:
        return lm_param_set_str(m, name, json_is_string(v) ? json_string_value(v) : "", err);
    }
    return error_set(err, -EINVAL, "Parameter '%s' has an unknown type", name);
}

static void mig_param_restore(lm_mig *m, const mig_saved_param *s)
{
    const char *name = lm_param_name(s->idx);
    lm_error e = { 0 };
    int rc = 0;

    switch (lm_param_type_of(s->idx)) {
    case LM_PARAM_INT: rc = lm_param_set_int(m, name, s->iv, &e); break;
    case LM_PARAM_BOOL: rc = lm_param_set_bool(m, name, s->bv, &e); break;
    case LM_PARAM_STR: rc = lm_param_set_str(m, name, s->sv, &e); break;
    }
    if (rc < 0)
        util_log("QMP: migrate-set-parameters: cannot restore %s: %s", name, e.msg);
}

/*
 * Set the given members in the library's order, remembering each old value
 * first; a refusal restores the ones already set.  `count` is how many there
 * are (from mig_params_check).
 */
static int mig_params_apply(lm_mig *m, json_t *args, int count, lm_error *err)
{
    mig_saved_param *saved = calloc(count ? (size_t)count : 1, sizeof(*saved));
    const char *name;
    int n_set = 0, rc = 0;

    if (!saved)
        return error_set(err, -ENOMEM, "Out of memory");
    for (int i = 0; (name = lm_param_name(i)); i++) {
        mig_saved_param *s = &saved[n_set];
        json_t *v = json_object_get(args, name);

        if (!v)
            continue;
        s->idx = i;
        lm_param_get(m, name, &s->iv, &s->bv, s->sv, sizeof(s->sv));
        rc = mig_param_apply(m, i, v, err);
        if (rc < 0)
            goto undo;
        n_set++;
    }
    goto out;
undo:
    while (n_set-- > 0)
        mig_param_restore(m, &saved[n_set]);
out:
    free(saved);
    return rc;
}

/*
 * Flat members named and typed by the library (lm_param_name /
 * lm_param_type_of), so the schema is the library's, not a table here.
 * All or nothing: types are checked first, then members are set, and a
 * refusal restores the ones already set to their previous values.
 */
static int cmd_set_parameters(void *opaque, const char *args_json, char **reply,
                              lm_error *err)
{
    qmp_migration *mig = opaque;
    json_t *args = qmp_args_parse(args_json, NULL, err);
    int count, rc;

    if (!args)
        return err->code;
    rc = mig_params_check(args, &count, err);
    if (rc == 0)
        rc = mig_params_apply(mig->m, args, count, err);
    json_decref(args);
    return rc;
}

static int cmd_query_parameters(void *opaque, const char *args_json, char **reply,
                                lm_error *err)
{
    qmp_migration *mig = opaque;
    const char *name;
    char sv[1024];
    json_t *r;

    if (args_none_check(args_json, err) < 0)
        return err->code;
    r = json_object();
    for (int i = 0; r && (name = lm_param_name(i)); i++) {
        int64_t iv = 0;
        bool bv = false;

        sv[0] = 0;
        if (lm_param_get(mig->m, name, &iv, &bv, sv, sizeof(sv)) < 0)
            continue;
        switch (lm_param_type_of(i)) {
        case LM_PARAM_INT: json_object_set_new(r, name, json_integer(iv)); break;
        case LM_PARAM_BOOL: json_object_set_new(r, name, json_boolean(bv)); break;
        case LM_PARAM_STR: json_object_set_new(r, name, qmp_string(sv)); break;
        }
    }
    return qmp_reply(r, reply, err);
}

/* ---------------------------------------------------------------- setup */

static const struct {
    const char *name;
    lm_qmp_handler fn;
} mig_commands[] = {
    { "query-status", cmd_query_status },
    { "stop", cmd_stop },
    { "cont", cmd_cont },
    { "migrate", cmd_migrate },
    { "migrate-incoming", cmd_migrate_incoming },
    { "migrate_cancel", cmd_migrate_cancel },      /* QEMU's old spelling */
    { "migrate-cancel", cmd_migrate_cancel },
    { "migrate-start-postcopy", cmd_migrate_start_postcopy },
    { "query-migrate", cmd_query_migrate },
    { "migrate-set-capabilities", cmd_set_capabilities },
    { "query-migrate-capabilities", cmd_query_capabilities },
    { "migrate-set-parameters", cmd_set_parameters },
    { "query-migrate-parameters", cmd_query_parameters },
};

qmp_migration *qmp_migration_new(lm_qmp *q, lm_mig *m, lm_error *err)
{
    qmp_migration *mig = calloc(1, sizeof(*mig));
    int rc;

    if (!mig) {
        error_set(err, -ENOMEM, "QMP: out of memory");
        return NULL;
    }
    mig->q = q;
    mig->m = m;
    pthread_mutex_init(&mig->lock, NULL);
    for (size_t i = 0; i < sizeof(mig_commands) / sizeof(mig_commands[0]); i++) {
        rc = lm_qmp_register(q, mig_commands[i].name, mig_commands[i].fn, mig);
        if (rc < 0) {
            error_set_errno(err, rc, "QMP: cannot register %s", mig_commands[i].name);
            goto fail;
        }
    }
    /* Before subscribing: the first change seen must be told from this one. */
    mig->runstate = lm_runstate_get(m);
    rc = lm_add_listener(m, &mig_listener, mig);
    if (rc < 0) {
        error_set_errno(err, rc, "QMP: cannot subscribe to migration events");
        goto fail;
    }
    mig->subscribed = true;
    return mig;

fail:
    qmp_migration_free(mig);
    return NULL;
}

void qmp_migration_detach(qmp_migration *mig)
{
    if (!mig || !mig->subscribed)
        return;
    if (lm_remove_listener(mig->m, &mig_listener, mig) < 0)
        util_log("QMP: our listener was no longer registered on the context");
    mig->subscribed = false;
}

void qmp_migration_free(qmp_migration *mig)
{
    if (!mig)
        return;
    qmp_migration_detach(mig);
    pthread_mutex_destroy(&mig->lock);
    free(mig);
}
