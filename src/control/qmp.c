/*
 * QMP server: QEMU's JSON control protocol on a unix socket, for one lm_mig.
 *
 * Shape.  One server thread runs a poll() loop over an eventfd (the wake-up:
 * stop requested or events queued), the listening socket and every client.
 * Everything a client owns (its socket, input and output buffers, the file
 * descriptors it passed) is touched only by that thread, so clients need no
 * lock.  lm_qmp.lock guards only what other threads reach: the registered
 * commands, the event queue, the stop flag and the last run state seen.
 * The server is a plain client of the public API: it never sees lm_mig's
 * insides, so it cannot do anything a program could not.
 *
 * Input.  QMP is a stream of JSON values without framing; QEMU's clients send
 * one per line but nothing requires it.  A small scanner per client follows
 * nesting depth and string/escape state across reads and cuts a value out as
 * soon as its closing brace arrives; jansson then parses exactly that slice,
 * so several requests in one read and requests split over many reads both
 * work.  The scanner resumes where it stopped (linear cost for a slow
 * sender).  An unfinished value longer than QMP_MAX_INPUT, or nested deeper
 * than QMP_MAX_DEPTH, gets an error and the client is dropped: it is not
 * speaking QMP and we cannot resynchronise inside its value.
 *
 * Output.  Replies and events are appended to the client's output buffer and
 * written without blocking; poll(POLLOUT) finishes the job.  A client that
 * stops reading is dropped once QMP_MAX_OUTPUT bytes wait for it, so a stuck
 * client can neither stall the others nor grow memory without bound.
 *
 * Events.  Library listeners and lm_qmp_event() run on any thread.  They build
 * the event line at once (the timestamp is when it happened, not when it was
 * written), queue it under the lock and poke the eventfd; the server thread
 * copies the queue to every negotiated client.  Events queued while a command
 * runs are delivered before its reply, as QEMU does: its events are emitted
 * synchronously, so a client sees STOP before the reply to "stop".
 *
 * Listener lifetime.  The server subscribes to its lm_mig with the server
 * itself as the listener's opaque, and lm_qmp_stop() unsubscribes
 * (lm_remove_listener) before it frees anything.  That is safe because of
 * lm_remove_listener's contract: when it returns, no call to the listener is
 * in progress and none will start -- the library calls listeners from a
 * snapshot of the list and counts the threads inside a snapshot
 * (listener_calls, under m->lock), and removal waits for that count to drop
 * to zero.  So after the removal nothing outside this file can reach the
 * server, and freeing it cannot race with a callback.  The slot goes back to
 * the lm_mig: a program may start and stop servers on one context as often
 * as it likes.  The price is that lm_qmp_stop() must not run inside a
 * listener callback (it would wait for itself) and must run before
 * lm_free(m).
 *
 * Listening is the transport's (lm_transport_listen): the same unix socket
 * rules as a migration URI, stale-file removal included.
 *
 * Stop.  lm_qmp_stop() raises the flag and pokes the eventfd; the thread
 * delivers the queued events, gives clients up to QMP_STOP_FLUSH_MS to take
 * their pending output (a "quit" reply must get out), closes everything and
 * returns; stop joins it, then closes the listener and removes the socket.
 */
#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "livemig/qmp.h"
#include "stream/transport.h"
#include "util/error.h"
#include "util/time.h"

#ifndef LIVEMIG_VERSION
#error "LIVEMIG_VERSION comes from meson.build (project version)"
#endif

/* The greeting's and query-version's package: this build, meson's version. */
#define QMP_PACKAGE        "livemig " LIVEMIG_VERSION
#define QMP_MAX_INPUT      (1u << 20)        /* bytes of one unfinished value */
#define QMP_MAX_OUTPUT     (16u << 20)       /* bytes waiting for one client */
#define QMP_MAX_DEPTH      1024              /* JSON nesting, as QEMU's parser */
#define QMP_MAX_CLIENTS    32                /* more wait in the listen backlog */
#define QMP_MAX_EVENTS     4096              /* queued, not yet delivered */
#define QMP_MAX_FDS        16                /* per client: passed and named */
#define QMP_READ_CHUNK     65536
#define QMP_STOP_FLUSH_MS  1000

static const char qmp_greeting[] =
    "{\"QMP\":{\"version\":{\"qemu\":{\"micro\":0,\"minor\":2,\"major\":7},"
    "\"package\":\"" QMP_PACKAGE "\"},\"capabilities\":[]}}";

/* ---------------------------------------------------------------- types */

typedef struct qmp_named_fd {
    char *name;
    int fd;
} qmp_named_fd;

/* One connection.  Owned by the server thread; nobody else sees it. */
typedef struct qmp_client {
    int fd;
    bool negotiated;     /* qmp_capabilities done: commands and events */
    bool eof;            /* peer stopped sending: close once output is out */
    bool dead;           /* close at the end of this round */
    bool broken;         /* the socket failed: do not even try to flush */

    /*
     * Input.  [0, in_len) is unconsumed; bytes before `scan` were already
     * scanned, and when in_value the value being cut starts at vstart.
     */
    char *in;
    size_t in_len, in_cap, scan, vstart;
    bool in_value, in_str, esc, scalar;
    int depth;

    /* Output: [out_off, out_len) waits to be written. */
    char *out;
    size_t out_off, out_len, out_cap;

    /* Descriptors from the last read that carried SCM_RIGHTS (for getfd). */
    int msgfds[QMP_MAX_FDS];
    int n_msgfds;
    /* Named by getfd; closefd and lm_qmp_take_fd take them out. */
    qmp_named_fd named[QMP_MAX_FDS];
    int n_named;
} qmp_client;

typedef struct qmp_command {
    char *name;
    lm_qmp_handler fn;
    void *opaque;
} qmp_command;

typedef struct qmp_event {
    struct qmp_event *next;
    char *line;          /* serialised, without the newline */
} qmp_event;

struct lm_qmp {
    lm_mig *m;
    lm_listen listen;    /* the transport's unix listener (stale-file logic) */
    int wake_fd;         /* eventfd: readable = look at `stopping` and events */
    pthread_t thread;
    bool subscribed;             /* our listener is on m (new .. stop) */

    pthread_mutex_t lock;        /* guards the block below */
    bool stopping;
    qmp_command *cmds;
    int n_cmds, cap_cmds;
    qmp_event *ev_head, **ev_tail;
    int n_events;
    lm_runstate runstate;        /* last seen, to tell STOP from RESUME */
    bool open;                   /* accepting clients (lm_qmp_open) */

    /* Server thread only. */
    qmp_client *clients[QMP_MAX_CLIENTS];
    int n_clients;
    bool accept_paused;          /* out of fds: wait for a client to leave */
    qmp_client *serving;         /* whose command runs now; NULL between commands */
};

/* ---------------------------------------------------------------- output */

/* A JSON string even from bytes that are not UTF-8 (library messages, paths). */
static json_t *qmp_string(const char *s)
{
    json_t *v;
    char *copy;

    if (!s)
        s = "";
    v = json_string(s);
    if (v)
        return v;
    copy = strdup(s);
    if (!copy)
        return NULL;
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    v = json_string(copy);
    free(copy);
    return v;
}

static void qmp_client_flush(qmp_client *c)
{
    while (!c->broken && c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return;
        } else {
            /* The peer went away; what it did not read is lost anyway. */
            c->broken = true;
            c->dead = true;
        }
    }
    c->out_off = c->out_len = 0;
}

/* Queue `len` bytes and a newline: every QMP message is one line. */
static void qmp_client_write_line(qmp_client *c, const char *s, size_t len)
{
    size_t pending = c->out_len - c->out_off;

    if (c->broken)
        return;
    if (pending + len + 1 > QMP_MAX_OUTPUT) {
        lm_log("QMP: client does not read its replies (%zu bytes waiting), "
               "dropping it", pending);
        c->broken = true;
        c->dead = true;
        return;
    }
    if (c->out_len + len + 1 > c->out_cap && c->out_off > 0) {
        memmove(c->out, c->out + c->out_off, pending);
        c->out_off = 0;
        c->out_len = pending;
    }
    if (c->out_len + len + 1 > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        char *p;

        while (cap < c->out_len + len + 1)
            cap *= 2;
        p = realloc(c->out, cap);
        if (!p) {
            lm_log("QMP: out of memory for a client's output, dropping it");
            c->broken = true;
            c->dead = true;
            return;
        }
        c->out = p;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, s, len);
    c->out[c->out_len + len] = '\n';
    c->out_len += len + 1;
}

/* Serialise and queue a message; takes the reference to `msg`. */
static void qmp_client_write_json(qmp_client *c, json_t *msg)
{
    char *s = msg ? json_dumps(msg, JSON_COMPACT) : NULL;

    json_decref(msg);
    if (!s) {
        lm_log("QMP: cannot serialise a reply, dropping the client");
        c->dead = true;
        return;
    }
    qmp_client_write_line(c, s, strlen(s));
    free(s);
}

static void qmp_client_reply(qmp_client *c, json_t *id, json_t *ret)
{
    json_t *msg = json_object();

    if (msg) {
        json_object_set_new(msg, "return", ret);
        if (id)
            json_object_set(msg, "id", id);
    } else {
        json_decref(ret);
    }
    qmp_client_write_json(c, msg);
}

static void qmp_client_error(qmp_client *c, json_t *id, const char *cls,
                             const char *desc)
{
    json_t *msg = json_object(), *e = json_object();

    if (msg && e) {
        json_object_set_new(e, "class", qmp_string(cls));
        json_object_set_new(e, "desc", qmp_string(desc));
        json_object_set_new(msg, "error", e);
        e = NULL;
        if (id)
            json_object_set(msg, "id", id);
    }
    json_decref(e);
    qmp_client_write_json(c, msg);
}

static void qmp_client_errorf(qmp_client *c, json_t *id, const char *cls,
                              const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void qmp_client_errorf(qmp_client *c, json_t *id, const char *cls,
                              const char *fmt, ...)
{
    char desc[LM_ERROR_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(desc, sizeof(desc), fmt, ap);
    va_end(ap);
    qmp_client_error(c, id, cls, desc);
}

/* ---------------------------------------------------------------- events */

/* Build an event line; takes the reference to `data` (NULL: no "data"). */
static char *qmp_event_line(const char *name, json_t *data)
{
    struct timespec ts;
    json_t *ev;
    char *line = NULL;

    /* Wall clock, as QEMU: clients correlate events across machines. */
    clock_gettime(CLOCK_REALTIME, &ts);
    ev = json_pack("{s:{s:I,s:I},s:o}",
                   "timestamp",
                   "seconds", (json_int_t)ts.tv_sec,
                   "microseconds", (json_int_t)(ts.tv_nsec / 1000),
                   "event", qmp_string(name));
    if (ev && data) {
        json_object_set_new(ev, "data", data);
        data = NULL;
    }
    if (ev)
        line = json_dumps(ev, JSON_COMPACT);
    json_decref(ev);
    json_decref(data);
    return line;
}

/* Any thread.  Takes the reference to `data`. */
static void qmp_queue_event(lm_qmp *q, const char *name, json_t *data)
{
    qmp_event *ev = calloc(1, sizeof(*ev));
    uint64_t one = 1;
    bool queued = false;

    if (ev)
        ev->line = qmp_event_line(name, data);
    else
        json_decref(data);
    if (!ev || !ev->line) {
        lm_log("QMP: out of memory, event %s lost", name);
        free(ev);
        return;
    }
    pthread_mutex_lock(&q->lock);
    if (q->n_events < QMP_MAX_EVENTS) {
        *q->ev_tail = ev;
        q->ev_tail = &ev->next;
        q->n_events++;
        queued = true;
    }
    pthread_mutex_unlock(&q->lock);
    if (!queued) {
        lm_log("QMP: %d events not yet delivered, event %s lost",
               QMP_MAX_EVENTS, name);
        free(ev->line);
        free(ev);
        return;
    }
    /* An eventfd write only fails if the counter would overflow: never. */
    if (write(q->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        lm_log("QMP: cannot wake the server thread: %s", strerror(errno));
}

/* Drop undelivered events.  Only once no other thread can queue any. */
static void qmp_free_events(lm_qmp *q)
{
    qmp_event *ev, *next;

    for (ev = q->ev_head; ev; ev = next) {
        next = ev->next;
        free(ev->line);
        free(ev);
    }
    q->ev_head = NULL;
    q->ev_tail = &q->ev_head;
    q->n_events = 0;
}

/* Server thread: copy queued events to every negotiated client. */
static void qmp_deliver_events(lm_qmp *q)
{
    qmp_event *ev, *next;

    pthread_mutex_lock(&q->lock);
    ev = q->ev_head;
    q->ev_head = NULL;
    q->ev_tail = &q->ev_head;
    q->n_events = 0;
    pthread_mutex_unlock(&q->lock);

    if (!ev)
        return;
    for (; ev; ev = next) {
        next = ev->next;
        for (int i = 0; i < q->n_clients; i++) {
            qmp_client *c = q->clients[i];
            if (c->negotiated && !c->dead)
                qmp_client_write_line(c, ev->line, strlen(ev->line));
        }
        free(ev->line);
        free(ev);
    }
    for (int i = 0; i < q->n_clients; i++)
        qmp_client_flush(q->clients[i]);
}

void lm_qmp_event(lm_qmp *q, const char *name, const char *data_json)
{
    json_t *data = NULL;
    json_error_t jerr;

    if (!q || !name || !*name)
        return;
    if (data_json) {
        data = json_loads(data_json, JSON_DECODE_ANY, &jerr);
        if (!data) {
            lm_log("QMP: event %s dropped: its data is not JSON: %s",
                   name, jerr.text);
            return;
        }
    }
    qmp_queue_event(q, name, data);
}

/*
 * Library threads, while subscribed: q is alive for the whole call, since
 * lm_qmp_stop() unsubscribes -- and lm_remove_listener() waits for calls in
 * progress -- before it frees q (see top of file).
 * MIGRATION only with capability "events", as QEMU.
 */
static void qmp_on_status(void *opaque, lm_status s)
{
    lm_qmp *q = opaque;
    bool events = false;

    /* Asked each time: the capability may be switched on at any moment. */
    if (lm_cap_get(q->m, "events", &events) < 0 || !events)
        return;
    qmp_queue_event(q, "MIGRATION", json_pack("{s:o}", "status",
                                              qmp_string(lm_status_name(s))));
}

/* Library threads, while subscribed.  STOP / RESUME when the guest stops or
 * starts running. */
static void qmp_on_runstate(void *opaque, lm_runstate rs)
{
    lm_qmp *q = opaque;
    lm_runstate prev;

    pthread_mutex_lock(&q->lock);
    prev = q->runstate;
    q->runstate = rs;
    pthread_mutex_unlock(&q->lock);
    /*
     * finish-migrate -> postmigrate is no new stop: no second event.
     * Becoming a destination (inmigrate) is not a STOP either: QEMU's
     * destinations are in that state from startup and never report one,
     * while an lm_mig starts out "running".
     */
    if (prev != LM_RUN_RUNNING && rs == LM_RUN_RUNNING)
        qmp_queue_event(q, "RESUME", NULL);
    else if (prev == LM_RUN_RUNNING && rs != LM_RUN_RUNNING &&
             rs != LM_RUN_INMIGRATE && rs != LM_RUN_PRELAUNCH)
        qmp_queue_event(q, "STOP", NULL);
}

/* Library threads, while subscribed.  Notices are what a supervisor must
 * act on: sent whatever the "events" capability says. */
static void qmp_on_notice(void *opaque, const char *name, const char *detail)
{
    qmp_queue_event(opaque, name, json_pack("{s:o}", "reason", qmp_string(detail)));
}

static const lm_listener qmp_listener = {
    .status_changed = qmp_on_status,
    .runstate_changed = qmp_on_runstate,
    .notice = qmp_on_notice,
};

/* After this returns no listener callback runs on q, or ever will. */
static void qmp_unsubscribe(lm_qmp *q)
{
    if (!q->subscribed)
        return;
    if (lm_remove_listener(q->m, &qmp_listener, q) < 0)
        lm_log("QMP: our listener was no longer registered on the context");
    q->subscribed = false;
}

/* ---------------------------------------------------------------- commands */

/* One command being executed; handlers fill cls/desc when they fail. */
typedef struct qmp_call {
    lm_qmp *q;
    qmp_client *c;
    const char *name;
    json_t *args;        /* never NULL: {} when the request had none */
    const char *cls;
    char desc[LM_ERROR_MAX];
} qmp_call;

static json_t *qmp_fail(qmp_call *call, const char *cls, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static json_t *qmp_fail(qmp_call *call, const char *cls, const char *fmt, ...)
{
    va_list ap;

    call->cls = cls;
    va_start(ap, fmt);
    vsnprintf(call->desc, sizeof(call->desc), fmt, ap);
    va_end(ap);
    return NULL;
}

/* A library error as QEMU reports its own: GenericError with the message. */
static json_t *qmp_fail_lm(qmp_call *call, int rc, const lm_error *e)
{
    if (e->msg[0])
        return qmp_fail(call, "GenericError", "%s", e->msg);
    return qmp_fail(call, "GenericError", "%s failed: %s", call->name,
                    strerror(rc < 0 ? -rc : EINVAL));
}

typedef enum qmp_type { QMP_STR, QMP_BOOL, QMP_INT, QMP_ARRAY } qmp_type;

typedef struct qmp_arg {
    const char *name;
    qmp_type type;
    bool required;
} qmp_arg;

static const char *qmp_type_name(qmp_type t)
{
    switch (t) {
    case QMP_STR: return "string";
    case QMP_BOOL: return "boolean";
    case QMP_INT: return "integer";
    case QMP_ARRAY: return "array";
    }
    return "?";
}

static bool qmp_type_ok(json_t *v, qmp_type t)
{
    switch (t) {
    case QMP_STR: return json_is_string(v);
    case QMP_BOOL: return json_is_boolean(v);
    case QMP_INT: return json_is_integer(v);
    case QMP_ARRAY: return json_is_array(v);
    }
    return false;
}

/*
 * Check arguments against a schema in QEMU's order: members in schema
 * order (missing, then wrong type), then anything left over is unexpected.
 */
static bool qmp_args_check(qmp_call *call, const qmp_arg *schema)
{
    const char *key;
    json_t *v;

    for (const qmp_arg *a = schema; a->name; a++) {
        v = json_object_get(call->args, a->name);
        if (!v) {
            if (a->required) {
                qmp_fail(call, "GenericError", "Parameter '%s' is missing", a->name);
                return false;
            }
            continue;
        }
        if (!qmp_type_ok(v, a->type)) {
            qmp_fail(call, "GenericError",
                     "Invalid parameter type for '%s', expected: %s",
                     a->name, qmp_type_name(a->type));
            return false;
        }
    }
    json_object_foreach(call->args, key, v) {
        const qmp_arg *a = schema;
        while (a->name && strcmp(a->name, key) != 0)
            a++;
        if (!a->name) {
            qmp_fail(call, "GenericError", "Parameter '%s' is unexpected", key);
            return false;
        }
    }
    return true;
}

static bool qmp_arg_true(qmp_call *call, const char *name)
{
    return json_is_true(json_object_get(call->args, name));
}

static json_t *qmp_cmd_query_status(qmp_call *call)
{
    lm_runstate rs = lm_runstate_get(call->q->m);

    return json_pack("{s:o,s:b,s:b}",
                     "status", qmp_string(lm_runstate_name(rs)),
                     "running", rs == LM_RUN_RUNNING,
                     "singlestep", 0);
}

static json_t *qmp_cmd_stop(qmp_call *call)
{
    lm_error e = { 0 };
    int rc = lm_vm_stop(call->q->m, &e);

    return rc < 0 ? qmp_fail_lm(call, rc, &e) : json_object();
}

static json_t *qmp_cmd_cont(qmp_call *call)
{
    lm_error e = { 0 };
    int rc = lm_vm_start(call->q->m, &e);

    return rc < 0 ? qmp_fail_lm(call, rc, &e) : json_object();
}

/*
 * The descriptor c named `name`, taken out of its table (the caller owns it
 * now), or -1.
 */
static int qmp_client_take_named(qmp_client *c, const char *name)
{
    for (int i = 0; i < c->n_named; i++) {
        if (strcmp(c->named[i].name, name) == 0) {
            int fd = c->named[i].fd;

            free(c->named[i].name);
            c->named[i] = c->named[--c->n_named];
            return fd;
        }
    }
    return -1;
}

int lm_qmp_take_fd(lm_qmp *q, const char *name)
{
    int fd;

    if (!q || !name)
        return -EINVAL;
    /* The thread first: `serving` is the server thread's alone. */
    if (!pthread_equal(pthread_self(), q->thread) || !q->serving)
        return -EPERM;
    fd = qmp_client_take_named(q->serving, name);
    return fd >= 0 ? fd : -ENOENT;
}

/*
 * "fd:NAME" names a descriptor passed earlier with getfd, as in QEMU; it is
 * consumed by the lookup (QEMU hands it to the migration), through the same
 * lm_qmp_take_fd a program's command would use.  The library takes "fd:N"
 * and dups N, so we pass our number and close our copy afterwards (*taken).
 * "fd:N" with digits stays a raw descriptor number, as in QEMU.
 */
static bool qmp_resolve_uri(qmp_call *call, const char *uri, char *buf,
                            size_t len, int *taken)
{
    const char *name;
    int fd;

    *taken = -1;
    if (strncmp(uri, "fd:", 3) != 0 || isdigit((unsigned char)uri[3])) {
        snprintf(buf, len, "%s", uri);
        return true;
    }
    name = uri + 3;
    fd = lm_qmp_take_fd(call->q, name);
    if (fd >= 0) {
        *taken = fd;
        snprintf(buf, len, "fd:%d", fd);
        return true;
    }
    if (fd == -ENOENT)
        qmp_fail(call, "GenericError", "File descriptor named '%s' has not been found", name);
    else
        qmp_fail(call, "GenericError", "Cannot take file descriptor '%s': %s", name,
                 strerror(-fd));
    return false;
}

static const qmp_arg qmp_args_migrate[] = {
    { .name = "uri", .type = QMP_STR, .required = true },
    { .name = "blk", .type = QMP_BOOL },
    { .name = "inc", .type = QMP_BOOL },
    { .name = "detach", .type = QMP_BOOL },   /* accepted and ignored, as QEMU */
    { .name = "resume", .type = QMP_BOOL },
    { .name = NULL },
};

static json_t *qmp_do_migrate(qmp_call *call, bool incoming)
{
    const char *uri = json_string_value(json_object_get(call->args, "uri"));
    size_t len = strlen(uri) + 32;
    char *buf = malloc(len);
    lm_error e = { 0 };
    json_t *ret = NULL;
    int rc, taken;

    if (!buf)
        return qmp_fail(call, "GenericError", "Out of memory");
    if (!qmp_resolve_uri(call, uri, buf, len, &taken))
        goto out;
    rc = incoming ? lm_incoming(call->q->m, buf, &e) : lm_migrate(call->q->m, buf, &e);
    ret = rc < 0 ? qmp_fail_lm(call, rc, &e) : json_object();
out:
    if (taken >= 0)
        close(taken);
    free(buf);
    return ret;
}

static json_t *qmp_cmd_migrate(qmp_call *call)
{
    if (qmp_arg_true(call, "blk") || qmp_arg_true(call, "inc"))
        return qmp_fail(call, "GenericError",
                        "Block migration (blk/inc) is not supported: "
                        "livemig migrates RAM and device state only");
    if (qmp_arg_true(call, "resume"))
        return qmp_fail(call, "GenericError",
                        "Resuming a paused migration (resume) is not supported: "
                        "livemig has no postcopy yet");
    return qmp_do_migrate(call, false);
}

static json_t *qmp_cmd_migrate_incoming(qmp_call *call)
{
    return qmp_do_migrate(call, true);
}

static bool qmp_status_running(lm_status s)
{
    return s == LM_STATUS_SETUP || s == LM_STATUS_ACTIVE ||
           s == LM_STATUS_DEVICE || s == LM_STATUS_CANCELLING;
}

/* Like QEMU, cancelling when nothing runs is not an error. */
static json_t *qmp_cmd_migrate_cancel(qmp_call *call)
{
    lm_stats st;
    lm_error e = { 0 };
    int rc;

    memset(&st, 0, sizeof(st));
    lm_query(call->q->m, &st);
    if (!qmp_status_running(st.status))
        return json_object();
    rc = lm_cancel(call->q->m, &e);
    return rc < 0 ? qmp_fail_lm(call, rc, &e) : json_object();
}

/*
 * lm_stats.socket_address ("tcp:HOST:PORT", "tcp:[V6]:PORT", "unix:PATH")
 * as QEMU's SocketAddress list.  Other transports have no socket: NULL.
 */
static json_t *qmp_socket_address(const char *a)
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

static json_t *qmp_ram_info(const lm_stats *st)
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
                     "postcopy-requests", (json_int_t)0,
                     "page-size", (json_int_t)st->page_size,
                     "multifd-bytes", (json_int_t)st->multifd_bytes,
                     "pages-per-second", (json_int_t)st->pages_per_second,
                     "precopy-bytes", (json_int_t)st->precopy_bytes,
                     "downtime-bytes", (json_int_t)st->downtime_bytes,
                     "postcopy-bytes", (json_int_t)0,
                     "dirty-sync-missed-zero-copy", (json_int_t)0);
}

/*
 * The member set follows QEMU 7.2's, which depends on the status: nothing
 * at all for "none"; only the status for setup and cancelled; times and
 * "ram" while running and once completed; "error-desc" once failed.  A
 * destination reports its status and the address it listens on.
 */
static json_t *qmp_cmd_query_migrate(qmp_call *call)
{
    json_t *r = json_object();
    lm_stats st;

    if (!r)
        return qmp_fail(call, "GenericError", "Out of memory");
    memset(&st, 0, sizeof(st));
    lm_query(call->q->m, &st);

    if (st.incoming) {
        json_t *sa = st.socket_address[0] ? qmp_socket_address(st.socket_address) : NULL;
        if (sa)
            json_object_set_new(r, "socket-address", sa);
        if (st.status != LM_STATUS_NONE)
            json_object_set_new(r, "status", qmp_string(lm_status_name(st.status)));
        if (st.status == LM_STATUS_FAILED && st.error_desc[0])
            json_object_set_new(r, "error-desc", qmp_string(st.error_desc));
        return r;
    }
    if (st.status == LM_STATUS_NONE)
        return r;

    json_object_set_new(r, "status", qmp_string(lm_status_name(st.status)));
    switch (st.status) {
    case LM_STATUS_ACTIVE:
    case LM_STATUS_DEVICE:
    case LM_STATUS_CANCELLING:
    case LM_STATUS_COMPLETED:
        json_object_set_new(r, "setup-time", json_integer(st.setup_time));
        json_object_set_new(r, "total-time", json_integer(st.total_time));
        if (st.status == LM_STATUS_COMPLETED)
            json_object_set_new(r, "downtime", json_integer(st.downtime));
        else
            json_object_set_new(r, "expected-downtime", json_integer(st.expected_downtime));
        json_object_set_new(r, "ram", qmp_ram_info(&st));
        if (st.cpu_throttle_percentage > 0)
            json_object_set_new(r, "cpu-throttle-percentage",
                                json_integer(st.cpu_throttle_percentage));
        if (st.compression)     /* QEMU 7.2's CompressionStats */
            json_object_set_new(r, "compression", json_pack(
                "{s:I, s:I, s:f, s:I, s:f}",
                "pages", (json_int_t)st.compress_pages,
                "busy", (json_int_t)st.compress_busy,
                "busy-rate", st.compress_busy_rate,
                "compressed-size", (json_int_t)st.compressed_size,
                "compression-rate", st.compression_rate));
        break;
    case LM_STATUS_FAILED:
        if (st.error_desc[0])
            json_object_set_new(r, "error-desc", qmp_string(st.error_desc));
        /* livemig extension: failed after the commit point with no answer;
         * the guest was not resumed (MIGRATION_OUTCOME_UNKNOWN) */
        if (st.outcome_unknown)
            json_object_set_new(r, "x-outcome-unknown", json_true());
        break;
    default:
        break;
    }
    /* livemig extension: which dirty tracker this migration used. */
    if (st.dirty_tracker[0])
        json_object_set_new(r, "x-dirty-tracker", qmp_string(st.dirty_tracker));
    return r;
}

static bool qmp_cap_known(const char *name)
{
    const char *n;

    for (int i = 0; (n = lm_cap_name(i)); i++)
        if (strcmp(n, name) == 0)
            return true;
    return false;
}

/*
 * All or nothing: every element is checked before anything is set, and a
 * library refusal undoes the ones already set (in reverse, so a capability
 * named twice ends as it started).  Capabilities are set one at a time in
 * the order given, so if the library checks a dependency at each set, list
 * the capability depended on first.
 */
static json_t *qmp_cmd_set_capabilities(qmp_call *call)
{
    json_t *list = json_object_get(call->args, "capabilities"), *el;
    size_t n = json_array_size(list), i;
    bool *old = NULL;
    lm_error e = { 0 };
    int rc;

    json_array_foreach(list, i, el) {
        const char *key, *name;
        json_t *v, *cap, *state;

        if (!json_is_object(el))
            return qmp_fail(call, "GenericError",
                            "Invalid parameter type for 'capabilities[%zu]', expected: object", i);
        cap = json_object_get(el, "capability");
        state = json_object_get(el, "state");
        if (!cap)
            return qmp_fail(call, "GenericError",
                            "Parameter 'capabilities[%zu].capability' is missing", i);
        if (!json_is_string(cap))
            return qmp_fail(call, "GenericError",
                            "Invalid parameter type for 'capabilities[%zu].capability', "
                            "expected: string", i);
        name = json_string_value(cap);
        if (!qmp_cap_known(name))
            return qmp_fail(call, "GenericError",
                            "Parameter 'capabilities[%zu].capability' does not accept value '%s'",
                            i, name);
        if (!state)
            return qmp_fail(call, "GenericError",
                            "Parameter 'capabilities[%zu].state' is missing", i);
        if (!json_is_boolean(state))
            return qmp_fail(call, "GenericError",
                            "Invalid parameter type for 'capabilities[%zu].state', "
                            "expected: boolean", i);
        json_object_foreach(el, key, v) {
            if (strcmp(key, "capability") != 0 && strcmp(key, "state") != 0)
                return qmp_fail(call, "GenericError",
                                "Parameter 'capabilities[%zu].%s' is unexpected", i, key);
        }
    }

    old = calloc(n ? n : 1, sizeof(*old));
    if (!old)
        return qmp_fail(call, "GenericError", "Out of memory");
    for (i = 0; i < n; i++) {
        el = json_array_get(list, i);
        const char *name = json_string_value(json_object_get(el, "capability"));

        old[i] = false;
        lm_cap_get(call->q->m, name, &old[i]);
        rc = lm_cap_set(call->q->m, name, json_is_true(json_object_get(el, "state")), &e);
        if (rc < 0) {
            while (i-- > 0) {
                el = json_array_get(list, i);
                lm_cap_set(call->q->m, json_string_value(json_object_get(el, "capability")),
                           old[i], NULL);
            }
            free(old);
            return qmp_fail_lm(call, rc, &e);
        }
    }
    free(old);
    return json_object();
}

static json_t *qmp_cmd_query_capabilities(qmp_call *call)
{
    json_t *r = json_array();
    const char *name;

    for (int i = 0; r && (name = lm_cap_name(i)); i++) {
        bool on = false;

        lm_cap_get(call->q->m, name, &on);
        json_array_append_new(r, json_pack("{s:s,s:b}", "capability", name,
                                           "state", on));
    }
    return r ? r : qmp_fail(call, "GenericError", "Out of memory");
}

static int qmp_param_index(const char *name)
{
    const char *n;

    for (int i = 0; (n = lm_param_name(i)); i++)
        if (strcmp(n, name) == 0)
            return i;
    return -1;
}

typedef struct qmp_saved_param {
    int idx;
    int64_t iv;
    bool bv;
    char sv[1024];
} qmp_saved_param;

static int qmp_param_apply(lm_mig *m, int idx, json_t *v, lm_error *e)
{
    const char *name = lm_param_name(idx);

    switch (lm_param_type_of(idx)) {
    case LM_PARAM_INT:
        return lm_param_set_int(m, name, json_integer_value(v), e);
    case LM_PARAM_BOOL:
        return lm_param_set_bool(m, name, json_is_true(v), e);
    case LM_PARAM_STR:
        /* null clears a string, as QEMU's StrOrNull (tls-creds: null). */
        return lm_param_set_str(m, name, json_is_string(v) ? json_string_value(v) : "", e);
    }
    return lm_error_set(e, -EINVAL, "Parameter '%s' has an unknown type", name);
}

static void qmp_param_restore(lm_mig *m, const qmp_saved_param *s)
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
        lm_log("QMP: migrate-set-parameters: cannot restore %s: %s", name, e.msg);
}

/*
 * Flat members named and typed by the library (lm_param_name /
 * lm_param_type_of).  All or nothing: types are checked first, then members
 * are set in the library's order, and a refusal restores the ones already
 * set to their previous values.
 */
static json_t *qmp_cmd_set_parameters(qmp_call *call)
{
    lm_mig *m = call->q->m;
    qmp_saved_param *saved = NULL;
    const char *name, *key;
    json_t *v, *ret = NULL;
    lm_error e = { 0 };
    int count = 0, n_set = 0, rc;

    for (int i = 0; (name = lm_param_name(i)); i++) {
        bool ok;

        v = json_object_get(call->args, name);
        if (!v)
            continue;
        switch (lm_param_type_of(i)) {
        case LM_PARAM_INT: ok = json_is_integer(v); break;
        case LM_PARAM_BOOL: ok = json_is_boolean(v); break;
        default: ok = json_is_string(v) || json_is_null(v); break;
        }
        if (!ok)
            return qmp_fail(call, "GenericError",
                            "Invalid parameter type for '%s', expected: %s", name,
                            lm_param_type_of(i) == LM_PARAM_INT ? "integer" :
                            lm_param_type_of(i) == LM_PARAM_BOOL ? "boolean" : "string");
        count++;
    }
    json_object_foreach(call->args, key, v) {
        if (qmp_param_index(key) < 0)
            return qmp_fail(call, "GenericError", "Parameter '%s' is unexpected", key);
    }

    saved = calloc(count ? (size_t)count : 1, sizeof(*saved));
    if (!saved)
        return qmp_fail(call, "GenericError", "Out of memory");
    for (int i = 0; (name = lm_param_name(i)); i++) {
        qmp_saved_param *s = &saved[n_set];

        v = json_object_get(call->args, name);
        if (!v)
            continue;
        s->idx = i;
        lm_param_get(m, name, &s->iv, &s->bv, s->sv, sizeof(s->sv));
        rc = qmp_param_apply(m, i, v, &e);
        if (rc < 0) {
            while (n_set-- > 0)
                qmp_param_restore(m, &saved[n_set]);
            ret = qmp_fail_lm(call, rc, &e);
            goto out;
        }
        n_set++;
    }
    ret = json_object();
out:
    free(saved);
    return ret;
}

static json_t *qmp_cmd_query_parameters(qmp_call *call)
{
    json_t *r = json_object();
    const char *name;
    char sv[1024];

    for (int i = 0; r && (name = lm_param_name(i)); i++) {
        int64_t iv = 0;
        bool bv = false;

        sv[0] = 0;
        if (lm_param_get(call->q->m, name, &iv, &bv, sv, sizeof(sv)) < 0)
            continue;
        switch (lm_param_type_of(i)) {
        case LM_PARAM_INT: json_object_set_new(r, name, json_integer(iv)); break;
        case LM_PARAM_BOOL: json_object_set_new(r, name, json_boolean(bv)); break;
        case LM_PARAM_STR: json_object_set_new(r, name, qmp_string(sv)); break;
        }
    }
    return r ? r : qmp_fail(call, "GenericError", "Out of memory");
}

static json_t *qmp_cmd_query_version(qmp_call *call)
{
    return json_pack("{s:{s:i,s:i,s:i},s:s}",
                     "qemu", "micro", 0, "minor", 2, "major", 7,
                     "package", QMP_PACKAGE);
}

/* getfd: name the descriptor that came with this request (SCM_RIGHTS). */
static json_t *qmp_cmd_getfd(qmp_call *call)
{
    qmp_client *c = call->c;
    const char *name = json_string_value(json_object_get(call->args, "fdname"));
    int fd;

    /* Digits would be read back as a raw number by "fd:N". */
    if (!*name || isdigit((unsigned char)name[0]))
        return qmp_fail(call, "GenericError",
                        "Parameter 'fdname' expects a name not starting with a digit");
    if (c->n_msgfds == 0)
        return qmp_fail(call, "GenericError", "No file descriptor supplied via SCM_RIGHTS");
    fd = c->msgfds[0];
    for (int i = 1; i < c->n_msgfds; i++)
        close(c->msgfds[i]);
    c->n_msgfds = 0;

    for (int i = 0; i < c->n_named; i++) {
        if (strcmp(c->named[i].name, name) == 0) {
            close(c->named[i].fd);
            c->named[i].fd = fd;
            return json_object();
        }
    }
    if (c->n_named == QMP_MAX_FDS) {
        close(fd);
        return qmp_fail(call, "GenericError",
                        "Too many named file descriptors (%d); closefd some", QMP_MAX_FDS);
    }
    c->named[c->n_named].name = strdup(name);
    if (!c->named[c->n_named].name) {
        close(fd);
        return qmp_fail(call, "GenericError", "Out of memory");
    }
    c->named[c->n_named++].fd = fd;
    return json_object();
}

static json_t *qmp_cmd_closefd(qmp_call *call)
{
    const char *name = json_string_value(json_object_get(call->args, "fdname"));
    int fd = qmp_client_take_named(call->c, name);

    if (fd < 0)
        return qmp_fail(call, "GenericError", "File descriptor named '%s' not found", name);
    close(fd);
    return json_object();
}

static json_t *qmp_cmd_query_commands(qmp_call *call);

static const qmp_arg qmp_args_none[] = { { .name = NULL } };
static const qmp_arg qmp_args_uri[] = {
    { .name = "uri", .type = QMP_STR, .required = true },
    { .name = NULL },
};
static const qmp_arg qmp_args_caps[] = {
    { .name = "capabilities", .type = QMP_ARRAY, .required = true },
    { .name = NULL },
};
static const qmp_arg qmp_args_fdname[] = {
    { .name = "fdname", .type = QMP_STR, .required = true },
    { .name = NULL },
};

typedef struct qmp_builtin {
    const char *name;
    json_t *(*fn)(qmp_call *call);
    const qmp_arg *args;     /* NULL: the handler checks its own */
} qmp_builtin;

static const qmp_builtin qmp_builtins[] = {
    { "query-status", qmp_cmd_query_status, qmp_args_none },
    { "stop", qmp_cmd_stop, qmp_args_none },
    { "cont", qmp_cmd_cont, qmp_args_none },
    { "migrate", qmp_cmd_migrate, qmp_args_migrate },
    { "migrate-incoming", qmp_cmd_migrate_incoming, qmp_args_uri },
    { "migrate_cancel", qmp_cmd_migrate_cancel, qmp_args_none },
    { "migrate-cancel", qmp_cmd_migrate_cancel, qmp_args_none },
    { "query-migrate", qmp_cmd_query_migrate, qmp_args_none },
    { "migrate-set-capabilities", qmp_cmd_set_capabilities, qmp_args_caps },
    { "query-migrate-capabilities", qmp_cmd_query_capabilities, qmp_args_none },
    { "migrate-set-parameters", qmp_cmd_set_parameters, NULL },
    { "query-migrate-parameters", qmp_cmd_query_parameters, qmp_args_none },
    { "query-commands", qmp_cmd_query_commands, qmp_args_none },
    { "query-version", qmp_cmd_query_version, qmp_args_none },
    { "getfd", qmp_cmd_getfd, qmp_args_fdname },
    { "closefd", qmp_cmd_closefd, qmp_args_fdname },
};

#define QMP_N_BUILTINS ((int)(sizeof(qmp_builtins) / sizeof(qmp_builtins[0])))

static const qmp_builtin *qmp_builtin_find(const char *name)
{
    for (int i = 0; i < QMP_N_BUILTINS; i++)
        if (strcmp(qmp_builtins[i].name, name) == 0)
            return &qmp_builtins[i];
    return NULL;
}

static json_t *qmp_cmd_query_commands(qmp_call *call)
{
    lm_qmp *q = call->q;
    json_t *r = json_array();

    if (!r)
        return qmp_fail(call, "GenericError", "Out of memory");
    json_array_append_new(r, json_pack("{s:s}", "name", "qmp_capabilities"));
    for (int i = 0; i < QMP_N_BUILTINS; i++)
        json_array_append_new(r, json_pack("{s:s}", "name", qmp_builtins[i].name));
    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < q->n_cmds; i++)
        if (!qmp_builtin_find(q->cmds[i].name))
            json_array_append_new(r, json_pack("{s:o}", "name", qmp_string(q->cmds[i].name)));
    pthread_mutex_unlock(&q->lock);
    return r;
}

/* A program's command: arguments out as text, the reply parsed back. */
static json_t *qmp_call_registered(qmp_call *call, lm_qmp_handler fn, void *opaque)
{
    char *args = json_dumps(call->args, JSON_COMPACT), *reply = NULL;
    lm_error e = { 0 };
    json_error_t jerr;
    json_t *ret;
    int rc;

    if (!args)
        return qmp_fail(call, "GenericError", "Out of memory");
    rc = fn(opaque, args, &reply, &e);
    free(args);
    if (rc < 0) {
        free(reply);
        return qmp_fail_lm(call, rc, &e);
    }
    if (!reply)
        return json_object();
    ret = json_loads(reply, JSON_DECODE_ANY, &jerr);
    free(reply);
    if (!ret)
        return qmp_fail(call, "GenericError", "Command %s returned invalid JSON: %s",
                        call->name, jerr.text);
    return ret;
}

/* ---------------------------------------------------------------- dispatch */

static void qmp_dispatch(lm_qmp *q, qmp_client *c, const char *text, size_t len)
{
    const qmp_builtin *b = NULL;
    qmp_call call = { .q = q, .c = c, .cls = "GenericError" };
    lm_qmp_handler fn = NULL;
    void *opaque = NULL;
    json_error_t jerr;
    json_t *req, *id, *exec, *args, *v, *ret;
    const char *key;

    req = json_loadb(text, len, JSON_DECODE_ANY, &jerr);
    if (!req) {
        qmp_client_errorf(c, NULL, "GenericError", "JSON parse error, %s", jerr.text);
        return;
    }
    if (!json_is_object(req)) {
        qmp_client_error(c, NULL, "GenericError", "QMP input must be a JSON object");
        goto out;
    }
    id = json_object_get(req, "id");
    exec = json_object_get(req, "execute");
    args = json_object_get(req, "arguments");
    if (!exec) {
        qmp_client_error(c, id, "GenericError", "Missing 'execute' in QMP input");
        goto out;
    }
    if (!json_is_string(exec)) {
        qmp_client_error(c, id, "GenericError", "QMP input member 'execute' must be a string");
        goto out;
    }
    if (args && !json_is_object(args)) {
        qmp_client_error(c, id, "GenericError", "QMP input member 'arguments' must be an object");
        goto out;
    }
    json_object_foreach(req, key, v) {
        if (strcmp(key, "execute") && strcmp(key, "arguments") && strcmp(key, "id")) {
            qmp_client_errorf(c, id, "GenericError", "QMP input member '%s' is unexpected", key);
            goto out;
        }
    }
    call.name = json_string_value(exec);

    if (strcmp(call.name, "qmp_capabilities") == 0) {
        json_t *enable = args ? json_object_get(args, "enable") : NULL;

        if (c->negotiated) {
            qmp_client_error(c, id, "CommandNotFound",
                             "Capabilities negotiation is already complete, command ignored");
        } else if (args && (json_object_size(args) > (enable ? 1u : 0u))) {
            json_object_foreach(args, key, v)
                if (strcmp(key, "enable") != 0)
                    break;
            qmp_client_errorf(c, id, "GenericError", "Parameter '%s' is unexpected", key);
        } else if (enable && !json_is_array(enable)) {
            qmp_client_error(c, id, "GenericError",
                             "Invalid parameter type for 'enable', expected: array");
        } else if (json_array_size(enable) > 0) {
            qmp_client_error(c, id, "GenericError",
                             "This monitor does not support Out-Of-Band (OOB)");
        } else {
            c->negotiated = true;
            qmp_client_reply(c, id, json_object());
        }
        goto out;
    }
    if (!c->negotiated) {
        qmp_client_error(c, id, "CommandNotFound",
                         "Expecting capabilities negotiation with 'qmp_capabilities'");
        goto out;
    }

    /* A program's command may replace a built-in one of the same name. */
    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < q->n_cmds; i++) {
        if (strcmp(q->cmds[i].name, call.name) == 0) {
            fn = q->cmds[i].fn;
            opaque = q->cmds[i].opaque;
            break;
        }
    }
    pthread_mutex_unlock(&q->lock);
    if (!fn)
        b = qmp_builtin_find(call.name);
    if (!fn && !b) {
        qmp_client_errorf(c, id, "CommandNotFound", "The command %s has not been found",
                          call.name);
        goto out;
    }

    call.args = args ? json_incref(args) : json_object();
    if (!call.args) {
        qmp_client_error(c, id, "GenericError", "Out of memory");
        goto out;
    }
    q->serving = c;
    if (fn)
        ret = qmp_call_registered(&call, fn, opaque);
    else if (b->args && !qmp_args_check(&call, b->args))
        ret = NULL;
    else
        ret = b->fn(&call);
    q->serving = NULL;
    json_decref(call.args);

    /* Events the command caused go out before its reply, as in QEMU. */
    qmp_deliver_events(q);
    if (ret)
        qmp_client_reply(c, id, ret);
    else
        qmp_client_error(c, id, call.desc[0] ? call.cls : "GenericError",
                         call.desc[0] ? call.desc : "Out of memory");
out:
    json_decref(req);
}

/* ---------------------------------------------------------------- input */

static bool qmp_is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/* What ends a bare top-level token (a number, a keyword or garbage). */
static bool qmp_ends_token(char ch)
{
    switch (ch) {
    case '{': case '}': case '[': case ']': case '"': case ',': case ':':
        return true;
    default:
        return qmp_is_space(ch);
    }
}

static void qmp_value_done(lm_qmp *q, qmp_client *c, size_t end)
{
    c->in_value = c->scalar = c->in_str = c->esc = false;
    c->depth = 0;
    qmp_dispatch(q, c, c->in + c->vstart, end - c->vstart);
}

/*
 * Cut complete values out of the input and dispatch them, then drop the
 * consumed bytes.  Invariant between calls: in[0, scan) has been scanned and
 * the state flags describe the input up to `scan`; when in_value, the value
 * begins at vstart (which is then 0 after compaction).
 */
static void qmp_client_scan(lm_qmp *q, qmp_client *c)
{
    size_t i = c->scan, keep;

    while (i < c->in_len && !c->dead) {
        char ch = c->in[i];

        if (c->in_str) {
            if (c->esc)
                c->esc = false;
            else if (ch == '\\')
                c->esc = true;
            else if (ch == '"') {
                c->in_str = false;
                if (c->depth == 0) {          /* a bare string at top level */
                    qmp_value_done(q, c, ++i);
                    continue;
                }
            }
            i++;
            continue;
        }
        if (c->scalar) {
            if (qmp_ends_token(ch)) {
                qmp_value_done(q, c, i);      /* and look at ch again */
                continue;
            }
            i++;
            continue;
        }
        if (!c->in_value) {
            if (qmp_is_space(ch)) {
                i++;
                continue;
            }
            c->in_value = true;
            c->vstart = i;
            switch (ch) {
            case '{': case '[':
                c->depth = 1;
                break;
            case '"':
                c->in_str = true;
                break;
            case '}': case ']': case ',': case ':':
                /* Stray punctuation: a one-byte value jansson will reject. */
                qmp_value_done(q, c, ++i);
                continue;
            default:
                c->scalar = true;
                break;
            }
            i++;
            continue;
        }
        switch (ch) {
        case '"':
            c->in_str = true;
            break;
        case '{': case '[':
            if (++c->depth > QMP_MAX_DEPTH) {
                qmp_client_errorf(c, NULL, "GenericError",
                                  "JSON parse error, nesting deeper than %d levels",
                                  QMP_MAX_DEPTH);
                c->dead = true;
            }
            break;
        case '}': case ']':
            if (--c->depth == 0) {
                qmp_value_done(q, c, ++i);
                continue;
            }
            break;
        }
        i++;
    }

    /* Nothing consumed is the common case for a slow sender: no copy then. */
    keep = c->in_value ? c->vstart : i;
    if (keep > 0)
        memmove(c->in, c->in + keep, c->in_len - keep);
    c->in_len -= keep;
    c->scan = i - keep;
    if (c->in_value)
        c->vstart = 0;
}

static void qmp_client_take_fds(qmp_client *c, struct msghdr *msg)
{
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR(msg, cm)) {
        size_t n;
        int *fds;

        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        /* As QEMU: a read that carries descriptors replaces unclaimed ones. */
        for (int i = 0; i < c->n_msgfds; i++)
            close(c->msgfds[i]);
        c->n_msgfds = 0;
        n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        fds = (int *)CMSG_DATA(cm);
        for (size_t i = 0; i < n; i++) {
            int fd;

            memcpy(&fd, &fds[i], sizeof(fd));
            if (c->n_msgfds < QMP_MAX_FDS)
                c->msgfds[c->n_msgfds++] = fd;
            else
                close(fd);
        }
    }
}

static void qmp_client_read(lm_qmp *q, qmp_client *c)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * QMP_MAX_FDS)];
    } cbuf;
    struct msghdr msg = { 0 };
    struct iovec iov;
    ssize_t n;

    /* Doubling: a value that arrives in small reads costs linear copying. */
    if (c->in_cap - c->in_len < QMP_READ_CHUNK / 4) {
        size_t cap = c->in_cap ? c->in_cap * 2 : QMP_READ_CHUNK;
        char *p = realloc(c->in, cap);

        if (!p) {
            lm_log("QMP: out of memory for a client's input, dropping it");
            c->dead = true;
            return;
        }
        c->in = p;
        c->in_cap = cap;
    }
    iov.iov_base = c->in + c->in_len;
    iov.iov_len = c->in_cap - c->in_len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.buf;
    msg.msg_controllen = sizeof(cbuf.buf);

    n = recvmsg(c->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        c->broken = true;
        c->dead = true;
        return;
    }
    if (msg.msg_controllen > 0)
        qmp_client_take_fds(c, &msg);
    if (n == 0) {
        /* The peer is done sending; answer what it sent, then close. */
        c->eof = true;
        if (c->scalar)
            qmp_value_done(q, c, c->in_len);
        qmp_client_flush(c);
        return;
    }
    c->in_len += (size_t)n;
    qmp_client_scan(q, c);
    if (!c->dead && c->in_len > QMP_MAX_INPUT) {
        qmp_client_errorf(c, NULL, "GenericError",
                          "QMP input too large: more than %u bytes without a complete "
                          "JSON value", QMP_MAX_INPUT);
        c->dead = true;
    }
    qmp_client_flush(c);
}

/* ---------------------------------------------------------------- clients */

static void qmp_client_free(qmp_client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    for (int i = 0; i < c->n_msgfds; i++)
        close(c->msgfds[i]);
    for (int i = 0; i < c->n_named; i++) {
        close(c->named[i].fd);
        free(c->named[i].name);
    }
    free(c->in);
    free(c->out);
    free(c);
}

static void qmp_accept(lm_qmp *q)
{
    qmp_client *c;
    int fd = accept4(q->listen.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

    if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            /* Still readable: stop polling it or we would spin. */
            lm_log("QMP: cannot accept a client: %s; waiting for one to leave",
                   strerror(errno));
            q->accept_paused = true;
        }
        return;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        lm_log("QMP: out of memory for a new client");
        close(fd);
        return;
    }
    c->fd = fd;
    q->clients[q->n_clients++] = c;
    qmp_client_write_line(c, qmp_greeting, sizeof(qmp_greeting) - 1);
    qmp_client_flush(c);
}

/* Close clients that are done; keeps the order of the rest. */
static void qmp_reap(lm_qmp *q)
{
    int j = 0;

    for (int i = 0; i < q->n_clients; i++) {
        qmp_client *c = q->clients[i];
        bool pending = c->out_len > c->out_off;

        if (c->dead) {
            qmp_client_flush(c);      /* one last try for the error reply */
        } else if (!(c->eof && !pending)) {
            q->clients[j++] = c;
            continue;
        }
        qmp_client_free(c);
        q->accept_paused = false;
    }
    q->n_clients = j;
}

/* Give clients a bounded time to take what is queued for them. */
static void qmp_flush_all(lm_qmp *q, int timeout_ms)
{
    int64_t deadline = lm_now_ms() + timeout_ms;

    for (;;) {
        struct pollfd pfd[QMP_MAX_CLIENTS];
        int n = 0;
        int64_t left = deadline - lm_now_ms();

        for (int i = 0; i < q->n_clients; i++) {
            qmp_client *c = q->clients[i];

            qmp_client_flush(c);
            if (!c->broken && c->out_len > c->out_off) {
                pfd[n].fd = c->fd;
                pfd[n].events = POLLOUT;
                pfd[n].revents = 0;
                n++;
            }
        }
        if (n == 0 || left <= 0)
            return;
        if (poll(pfd, (nfds_t)n, (int)left) < 0 && errno != EINTR)
            return;
    }
}

static void *qmp_thread(void *arg)
{
    lm_qmp *q = arg;
    struct pollfd pfd[2 + QMP_MAX_CLIENTS];
    qmp_client *polled[QMP_MAX_CLIENTS];

    for (;;) {
        int np = q->n_clients;
        bool stop = false, open;

        pthread_mutex_lock(&q->lock);
        open = q->open;
        pthread_mutex_unlock(&q->lock);
        pfd[0] = (struct pollfd){ .fd = q->wake_fd, .events = POLLIN };
        /* A negative fd is ignored by poll: full or out of descriptors. */
        pfd[1] = (struct pollfd){
            .fd = (open && q->n_clients < QMP_MAX_CLIENTS && !q->accept_paused) ? q->listen.fd
                                                                                : -1,
            .events = POLLIN,
        };
        for (int i = 0; i < np; i++) {
            qmp_client *c = q->clients[i];

            polled[i] = c;
            pfd[2 + i] = (struct pollfd){
                .fd = c->fd,
                .events = (short)((c->eof ? 0 : POLLIN) |
                                  (c->out_len > c->out_off ? POLLOUT : 0)),
            };
        }
        /* No timeout: stop and events come through wake_fd. */
        if (poll(pfd, (nfds_t)(2 + np), -1) < 0) {
            if (errno == EINTR)
                continue;
            lm_log("QMP: poll: %s; the server stops", strerror(errno));
            break;
        }
        if (pfd[0].revents & POLLIN) {
            uint64_t v;

            if (read(q->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                lm_log("QMP: reading the wake-up eventfd: %s", strerror(errno));
            pthread_mutex_lock(&q->lock);
            stop = q->stopping;
            pthread_mutex_unlock(&q->lock);
            qmp_deliver_events(q);
            if (stop)
                break;
        }
        for (int i = 0; i < np; i++) {
            qmp_client *c = polled[i];
            short re = pfd[2 + i].revents;

            if (c->dead)
                continue;
            if (re & POLLOUT)
                qmp_client_flush(c);
            if (!c->eof && (re & (POLLIN | POLLHUP | POLLERR)))
                qmp_client_read(q, c);
            else if (c->eof && (re & (POLLHUP | POLLERR)) && !(re & POLLOUT)) {
                c->broken = true;     /* half-closed peer that went away */
                c->dead = true;
            }
        }
        qmp_reap(q);
        if (pfd[1].fd >= 0 && (pfd[1].revents & POLLIN))
            qmp_accept(q);
    }

    qmp_deliver_events(q);
    qmp_flush_all(q, QMP_STOP_FLUSH_MS);
    for (int i = 0; i < q->n_clients; i++)
        qmp_client_free(q->clients[i]);
    q->n_clients = 0;
    return NULL;
}

/* ---------------------------------------------------------------- start / stop */

lm_qmp *lm_qmp_start(lm_mig *m, const char *uri, lm_error *err)
{
    lm_qmp *q = lm_qmp_new(m, uri, err);

    if (q)
        lm_qmp_open(q);
    return q;
}

void lm_qmp_open(lm_qmp *q)
{
    uint64_t one = 1;

    pthread_mutex_lock(&q->lock);
    q->open = true;
    pthread_mutex_unlock(&q->lock);
    if (write(q->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        lm_log("QMP: cannot wake the server thread: %s", strerror(errno));
}

lm_qmp *lm_qmp_new(lm_mig *m, const char *uri, lm_error *err)
{
    lm_qmp *q = NULL;
    sigset_t all, old;
    lm_uri u;
    int rc;

    if (!m || !uri) {
        lm_error_set(err, -EINVAL, "QMP: no migration context or no URI");
        return NULL;
    }
    if (lm_uri_parse(uri, &u, err) < 0) {
        lm_error_prefix(err, "QMP");
        return NULL;
    }
    if (u.kind != LM_URI_UNIX) {
        lm_error_set(err, -EINVAL, "QMP: unsupported URI '%s': only unix:PATH is supported",
                     uri);
        return NULL;
    }
    q = calloc(1, sizeof(*q));
    if (!q) {
        lm_error_set(err, -ENOMEM, "QMP: out of memory");
        return NULL;
    }
    q->m = m;
    q->listen.fd = -1;
    q->ev_tail = &q->ev_head;
    pthread_mutex_init(&q->lock, NULL);

    q->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->wake_fd < 0) {
        lm_error_set_errno(err, -errno, "QMP: eventfd");
        goto fail;
    }
    /* Replaces a stale socket file; never a live socket or a non-socket. */
    if (lm_transport_listen(&u, &q->listen, err) < 0) {
        lm_error_prefix(err, "QMP");
        goto fail;
    }

    q->runstate = lm_runstate_get(m);
    rc = lm_add_listener(m, &qmp_listener, q);
    if (rc < 0) {
        lm_error_set_errno(err, rc, "QMP: cannot subscribe to migration events");
        goto fail;
    }
    q->subscribed = true;

    /* Signals belong to the program's threads, not to the server. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&q->thread, NULL, qmp_thread, q);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        lm_error_set_errno(err, -rc, "QMP: cannot start the server thread");
        goto fail;
    }
    return q;

fail:
    /* Unsubscribed before q goes: a listener call may be running right now. */
    qmp_unsubscribe(q);
    qmp_free_events(q);
    lm_transport_unlisten(&q->listen);
    if (q->wake_fd >= 0)
        close(q->wake_fd);
    pthread_mutex_destroy(&q->lock);
    free(q);
    return NULL;
}

int lm_qmp_register(lm_qmp *q, const char *name, lm_qmp_handler fn, void *opaque)
{
    int rc = 0;

    if (!q || !name || !*name || !fn || strcmp(name, "qmp_capabilities") == 0)
        return -EINVAL;
    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < q->n_cmds; i++) {
        if (strcmp(q->cmds[i].name, name) == 0) {
            q->cmds[i].fn = fn;
            q->cmds[i].opaque = opaque;
            goto out;
        }
    }
    if (q->n_cmds == q->cap_cmds) {
        int cap = q->cap_cmds ? q->cap_cmds * 2 : 8;
        qmp_command *p = realloc(q->cmds, (size_t)cap * sizeof(*p));

        if (!p) {
            rc = -ENOMEM;
            goto out;
        }
        q->cmds = p;
        q->cap_cmds = cap;
    }
    q->cmds[q->n_cmds].name = strdup(name);
    if (!q->cmds[q->n_cmds].name) {
        rc = -ENOMEM;
        goto out;
    }
    q->cmds[q->n_cmds].fn = fn;
    q->cmds[q->n_cmds].opaque = opaque;
    q->n_cmds++;
out:
    pthread_mutex_unlock(&q->lock);
    return rc;
}

void lm_qmp_stop(lm_qmp *q)
{
    uint64_t one = 1;

    if (!q)
        return;
    if (pthread_equal(pthread_self(), q->thread)) {
        /* Joining ourselves would hang; the program must stop from outside. */
        lm_log("QMP: lm_qmp_stop() called from a command handler; ignored");
        return;
    }
    /*
     * First, so no listener is still adding events to a dying server: when
     * this returns no listener call is in flight on q and none can start
     * (lm_remove_listener waits out the calls already made), so no library
     * thread can reach q any more and it may be freed below.
     */
    qmp_unsubscribe(q);

    pthread_mutex_lock(&q->lock);
    q->stopping = true;
    pthread_mutex_unlock(&q->lock);
    if (write(q->wake_fd, &one, sizeof(one)) < 0)
        lm_log("QMP: cannot wake the server thread: %s", strerror(errno));
    pthread_join(q->thread, NULL);

    lm_transport_unlisten(&q->listen);     /* closes, removes the socket file */
    close(q->wake_fd);

    qmp_free_events(q);
    for (int i = 0; i < q->n_cmds; i++)
        free(q->cmds[i].name);
    free(q->cmds);
    pthread_mutex_destroy(&q->lock);
    free(q);
}
