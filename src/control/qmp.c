/*
 * QMP server: QEMU's JSON control protocol on a unix socket.
 *
 * This file is the protocol and nothing else: the listening socket, the
 * clients, framing, negotiation, events, dispatch and descriptor passing.
 * It knows nothing about migration.  QEMU's migration commands and events
 * live in qmp_migration.c, which lm_qmp_new() starts, and which uses only
 * what a program uses (lm_qmp_register, lm_qmp_event, lm_qmp_take_fd and the
 * lm_* API), so whatever the built-in commands can do a program's can too.
 *
 * Shape.  One server thread runs a poll() loop over an eventfd (the wake-up:
 * stop requested or events queued), the listening socket and every client.
 * Everything a client owns (its socket, input and output buffers, the file
 * descriptors it passed) is touched only by that thread, so clients need no
 * lock.  lm_qmp.lock guards only what other threads reach: the command
 * table, the event queue, the stop flag and whether clients are served yet.
 *
 * Commands.  Every command but qmp_capabilities is an lm_qmp_handler in one
 * table: the migration commands, then the server's own protocol commands
 * (query-commands, query-version, getfd, closefd), both registered by
 * lm_qmp_new() before the program can register anything, then the
 * program's.  A program command of a built-in's name replaces that entry in
 * place; that is the whole precedence rule, and query-commands lists the
 * table in order.  qmp_capabilities changes the connection's own state, so
 * dispatch handles it and nobody can replace it.  While a handler runs,
 * `serving` says whose request it is; that is how getfd, closefd and
 * lm_qmp_take_fd() find the client's descriptors without an extra argument.
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
 * Events.  lm_qmp_event() runs on any thread (the migration events come from
 * library listeners, see qmp_migration.c).  It builds the event line at once
 * (the timestamp is when it happened, not when it was written), queues it
 * under the lock and pokes the eventfd; the server thread copies the queue
 * to every negotiated client.  Events queued while a command runs are
 * delivered before its reply, as QEMU does: its events are emitted
 * synchronously, so a client sees STOP before the reply to "stop".
 *
 * Listening is the transport's (transport_listen): the same unix socket
 * rules as a migration URI, stale-file removal included.
 *
 * Stop.  lm_qmp_stop() first detaches the migration events from the lm_mig
 * (after that no library thread can reach the server), then raises the flag
 * and pokes the eventfd; the thread delivers the queued events, gives
 * clients up to QMP_STOP_FLUSH_MS to take their pending output (a "quit"
 * reply must get out), closes everything and returns; stop joins it, then
 * closes the listener, removes the socket and frees what the handlers used.
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
#include "control/qmp_json.h"
#include "control/qmp_migration.h"
#include "control/qmp_object.h"
#include "stream/transport.h"
#include "util/thread.h"
#include "util/error.h"
#include "util/time.h"

#ifndef LIVEMIG_VERSION
#error "LIVEMIG_VERSION comes from meson.build (project version)"
#endif

#define QMP_MAX_INPUT      (1u << 20)        /* bytes of one unfinished value */
#define QMP_MAX_OUTPUT     (16u << 20)       /* bytes waiting for one client */
#define QMP_MAX_DEPTH      1024              /* JSON nesting, as QEMU's parser */
#define QMP_MAX_CLIENTS    32                /* more wait in the listen backlog */
#define QMP_MAX_EVENTS     4096              /* queued, not yet delivered */
#define QMP_MAX_FDS        16                /* per client: passed and named */
#define QMP_READ_CHUNK     65536
#define QMP_STOP_FLUSH_MS  1000

/*
 * What we answer to "which QEMU are you": the protocol is QEMU 7.2's, the
 * package is this build of livemig.  The greeting and query-version share
 * it, as in QEMU.  A meson version is dots and digits: no JSON escaping.
 */
#define QMP_VERSION_JSON                                        \
    "{\"qemu\":{\"micro\":0,\"minor\":2,\"major\":7},"          \
    "\"package\":\"livemig " LIVEMIG_VERSION "\"}"

static const char qmp_greeting[] =
    "{\"QMP\":{\"version\":" QMP_VERSION_JSON ",\"capabilities\":[]}}";

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
    transport_listener listen; /* the transport's unix listener (stale-file logic) */
    int wake_fd;         /* eventfd: readable = look at `stopping` and events */
    pthread_t thread;
    qmp_migration *mig;  /* the migration commands' state; freed after the join */

    pthread_mutex_t lock;        /* guards the block below */
    bool stopping;
    qmp_command *cmds;           /* in registration order: query-commands' order */
    int n_cmds, cap_cmds;
    qmp_event *ev_head, **ev_tail;
    int n_events;
    bool open;                   /* accepting clients (lm_qmp_open) */

    /* Server thread only. */
    qmp_client *clients[QMP_MAX_CLIENTS];
    int n_clients;
    bool accept_paused;          /* out of fds: wait for a client to leave */
    qmp_client *serving;         /* whose command runs now; NULL between commands */
};
/* ---------------------------------------------------------------- output */

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
        util_log("QMP: client does not read its replies (%zu bytes waiting), "
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
            util_log("QMP: out of memory for a client's output, dropping it");
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
        util_log("QMP: cannot serialise a reply, dropping the client");
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
        util_log("QMP: out of memory, event %s lost", name);
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
        util_log("QMP: %d events not yet delivered, event %s lost",
                 QMP_MAX_EVENTS, name);
        free(ev->line);
        free(ev);
        return;
    }
    /* An eventfd write only fails if the counter would overflow: never. */
    if (write(q->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        util_log("QMP: cannot wake the server thread: %s", strerror(errno));
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
            util_log("QMP: event %s dropped: its data is not JSON: %s",
                     name, jerr.text);
            return;
        }
    }
    qmp_queue_event(q, name, data);
}

/* ---------------------------------------------------------------- commands */

/* The handler registered under `name`, copied out under the lock. */
static bool qmp_lookup(lm_qmp *q, const char *name, lm_qmp_handler *fn, void **opaque)
{
    bool found = false;

    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < q->n_cmds; i++) {
        if (strcmp(q->cmds[i].name, name) == 0) {
            *fn = q->cmds[i].fn;
            *opaque = q->cmds[i].opaque;
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&q->lock);
    return found;
}

/*
 * Run one command for client c: arguments out as text, the reply parsed
 * back.  NULL with fail->msg set when the command failed; the desc is the
 * handler's message, or "NAME failed: ERRNO" from a handler that gave none.
 */
static json_t *qmp_run(lm_qmp *q, qmp_client *c, const char *name, json_t *args,
                       lm_qmp_handler fn, void *opaque, lm_error *fail)
{
    char *text = json_dumps(args, JSON_COMPACT), *reply = NULL;
    lm_error e = { 0 };
    json_error_t jerr;
    json_t *ret = NULL;
    int rc;

    if (!text) {
        error_set(fail, -ENOMEM, "Out of memory");
        return NULL;
    }
    q->serving = c;
    rc = fn(opaque, text, &reply, &e);
    q->serving = NULL;
    if (rc < 0) {
        if (e.msg[0])
            error_copy(fail, &e);
        else
            error_set(fail, rc, "%s failed: %s", name, strerror(-rc));
        goto out;
    }
    if (!reply) {
        ret = json_object();
        if (!ret)
            error_set(fail, -ENOMEM, "Out of memory");
        goto out;
    }
    ret = json_loads(reply, JSON_DECODE_ANY, &jerr);
    if (!ret)
        error_set(fail, -EINVAL, "Command %s returned invalid JSON: %s", name, jerr.text);
out:
    free(text);
    free(reply);
    return ret;
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
 * The server's own commands.  Their opaque is the server; they run on its
 * thread, from qmp_run, so `serving` is the client that asked.
 */

static const qmp_arg qmp_args_none[] = { { .name = NULL } };

static int qmp_cmd_query_commands(void *opaque, const char *args_json, char **reply,
                                  lm_error *err)
{
    lm_qmp *q = opaque;
    json_t *args = qmp_args_parse(args_json, qmp_args_none, err), *r;

    if (!args)
        return err->code;
    json_decref(args);
    r = json_array();
    if (!r)
        return error_set(err, -ENOMEM, "Out of memory");
    json_array_append_new(r, json_pack("{s:s}", "name", "qmp_capabilities"));
    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < q->n_cmds; i++)
        json_array_append_new(r, json_pack("{s:o}", "name", qmp_string(q->cmds[i].name)));
    pthread_mutex_unlock(&q->lock);
    return qmp_reply(r, reply, err);
}

static int qmp_cmd_query_version(void *opaque, const char *args_json, char **reply,
                                 lm_error *err)
{
    json_t *args = qmp_args_parse(args_json, qmp_args_none, err);

    if (!args)
        return err->code;
    json_decref(args);
    *reply = strdup(QMP_VERSION_JSON);
    return *reply ? 0 : error_set(err, -ENOMEM, "Out of memory");
}

static const qmp_arg qmp_args_fdname[] = {
    { .name = "fdname", .type = QMP_STR, .required = true },
    { .name = NULL },
};

/* Name the descriptor that came with this request (SCM_RIGHTS). */
static int qmp_client_getfd(qmp_client *c, const char *name, lm_error *err)
{
    int fd;

    /* Digits would be read back as a raw number by "fd:N". */
    if (!*name || isdigit((unsigned char)name[0]))
        return error_set(err, -EINVAL,
                         "Parameter 'fdname' expects a name not starting with a digit");
    if (c->n_msgfds == 0)
        return error_set(err, -EINVAL, "No file descriptor supplied via SCM_RIGHTS");
    fd = c->msgfds[0];
    for (int i = 1; i < c->n_msgfds; i++)
        close(c->msgfds[i]);
    c->n_msgfds = 0;

    for (int i = 0; i < c->n_named; i++) {
        if (strcmp(c->named[i].name, name) == 0) {
            close(c->named[i].fd);
            c->named[i].fd = fd;
            return 0;
        }
    }
    if (c->n_named == QMP_MAX_FDS) {
        close(fd);
        return error_set(err, -EMFILE, "Too many named file descriptors (%d); closefd some",
                         QMP_MAX_FDS);
    }
    c->named[c->n_named].name = strdup(name);
    if (!c->named[c->n_named].name) {
        close(fd);
        return error_set(err, -ENOMEM, "Out of memory");
    }
    c->named[c->n_named++].fd = fd;
    return 0;
}

static int qmp_cmd_getfd(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    lm_qmp *q = opaque;
    json_t *args = qmp_args_parse(args_json, qmp_args_fdname, err);
    int rc;

    if (!args)
        return err->code;
    rc = qmp_client_getfd(q->serving, json_string_value(json_object_get(args, "fdname")), err);
    json_decref(args);
    return rc;
}

static int qmp_cmd_closefd(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    lm_qmp *q = opaque;
    json_t *args = qmp_args_parse(args_json, qmp_args_fdname, err);
    const char *name;
    int fd, rc = 0;

    if (!args)
        return err->code;
    name = json_string_value(json_object_get(args, "fdname"));
    fd = qmp_client_take_named(q->serving, name);
    if (fd >= 0)
        close(fd);
    else
        rc = error_set(err, -ENOENT, "File descriptor named '%s' not found", name);
    json_decref(args);
    return rc;
}

static const struct {
    const char *name;
    lm_qmp_handler fn;
} qmp_protocol_commands[] = {
    { "query-commands", qmp_cmd_query_commands },
    { "query-version", qmp_cmd_query_version },
    { "getfd", qmp_cmd_getfd },
    { "closefd", qmp_cmd_closefd },
};

static int qmp_register_protocol(lm_qmp *q, lm_error *err)
{
    size_t n = sizeof(qmp_protocol_commands) / sizeof(qmp_protocol_commands[0]);

    for (size_t i = 0; i < n; i++) {
        int rc = lm_qmp_register(q, qmp_protocol_commands[i].name,
                                 qmp_protocol_commands[i].fn, q);

        if (rc < 0)
            return error_set_errno(err, rc, "QMP: cannot register %s",
                                   qmp_protocol_commands[i].name);
    }
    return 0;
}

/* ---------------------------------------------------------------- dispatch */

/*
 * qmp_capabilities: the one command that is no handler, since it changes the
 * connection's own state; checked in QEMU's order, with QEMU's words.
 */
static void qmp_negotiate(qmp_client *c, json_t *id, json_t *args)
{
    json_t *enable = args ? json_object_get(args, "enable") : NULL, *v;
    const char *key;

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
}

static void qmp_dispatch(lm_qmp *q, qmp_client *c, const char *text, size_t len)
{
    lm_error fail = { 0 };
    lm_qmp_handler fn = NULL;
    void *opaque = NULL;
    json_error_t jerr;
    json_t *req, *id, *exec, *args, *v, *ret;
    const char *key, *name;

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
    name = json_string_value(exec);

    if (strcmp(name, "qmp_capabilities") == 0) {
        qmp_negotiate(c, id, args);
        goto out;
    }
    if (!c->negotiated) {
        qmp_client_error(c, id, "CommandNotFound",
                         "Expecting capabilities negotiation with 'qmp_capabilities'");
        goto out;
    }
    if (!qmp_lookup(q, name, &fn, &opaque)) {
        qmp_client_errorf(c, id, "CommandNotFound", "The command %s has not been found", name);
        goto out;
    }

    /* A handler always gets an object: {} when the request had none. */
    args = args ? json_incref(args) : json_object();
    if (!args) {
        qmp_client_error(c, id, "GenericError", "Out of memory");
        goto out;
    }
    ret = qmp_run(q, c, name, args, fn, opaque, &fail);
    json_decref(args);

    /* Events the command caused go out before its reply, as in QEMU. */
    qmp_deliver_events(q);
    if (ret)
        qmp_client_reply(c, id, ret);
    else
        qmp_client_error(c, id, "GenericError", fail.msg[0] ? fail.msg : "Out of memory");
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
            util_log("QMP: out of memory for a client's input, dropping it");
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
            util_log("QMP: cannot accept a client: %s; waiting for one to leave",
                     strerror(errno));
            q->accept_paused = true;
        }
        return;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        util_log("QMP: out of memory for a new client");
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
    int64_t deadline = time_now_ms() + timeout_ms;

    for (;;) {
        struct pollfd pfd[QMP_MAX_CLIENTS];
        int n = 0;
        int64_t left = deadline - time_now_ms();

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
            util_log("QMP: poll: %s; the server stops", strerror(errno));
            break;
        }
        if (pfd[0].revents & POLLIN) {
            uint64_t v;

            if (read(q->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                util_log("QMP: reading the wake-up eventfd: %s", strerror(errno));
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
        util_log("QMP: cannot wake the server thread: %s", strerror(errno));
}

/* Everything but the thread, the listener and the descriptors. */
static void qmp_free(lm_qmp *q)
{
    qmp_migration_free(q->mig);
    qmp_free_events(q);
    for (int i = 0; i < q->n_cmds; i++)
        free(q->cmds[i].name);
    free(q->cmds);
    pthread_mutex_destroy(&q->lock);
    free(q);
}

lm_qmp *lm_qmp_new(lm_mig *m, const char *uri, lm_error *err)
{
    lm_qmp *q = NULL;
    transport_uri u;
    int rc;

    if (!m || !uri) {
        error_set(err, -EINVAL, "QMP: no migration context or no URI");
        return NULL;
    }
    if (transport_uri_parse(uri, &u, err) < 0) {
        error_prefix(err, "QMP");
        return NULL;
    }
    if (u.kind != URI_UNIX) {
        error_set(err, -EINVAL, "QMP: unsupported URI '%s': only unix:PATH is supported",
                  uri);
        return NULL;
    }
    q = calloc(1, sizeof(*q));
    if (!q) {
        error_set(err, -ENOMEM, "QMP: out of memory");
        return NULL;
    }
    q->listen.fd = -1;
    q->ev_tail = &q->ev_head;
    pthread_mutex_init(&q->lock, NULL);

    q->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->wake_fd < 0) {
        error_set_errno(err, -errno, "QMP: eventfd");
        goto fail;
    }
    /* Replaces a stale socket file; never a live socket or a non-socket. */
    if (transport_listen(&u, &q->listen, err) < 0) {
        error_prefix(err, "QMP");
        goto fail;
    }

    /*
     * The built-in commands, before the program can register any: a program
     * command of the same name then replaces one of them.  Migration first,
     * so query-commands lists the table in the order it always has.
     */
    q->mig = qmp_migration_new(q, m, err);
    if (!q->mig)
        goto fail;
    if (qmp_object_register(q, m, err) < 0)
        goto fail;
    if (qmp_register_protocol(q, err) < 0)
        goto fail;

    rc = thread_start(&q->thread, qmp_thread, q);
    if (rc != 0) {
        error_set_errno(err, -rc, "QMP: cannot start the server thread");
        goto fail;
    }
    return q;

fail:
    /* Detached before q goes: a listener call may be running right now. */
    qmp_migration_detach(q->mig);
    transport_unlisten(&q->listen);
    if (q->wake_fd >= 0)
        close(q->wake_fd);
    qmp_free(q);
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
        util_log("QMP: lm_qmp_stop() called from a command handler; ignored");
        return;
    }
    /*
     * First, so no listener is still adding events to a dying server: when
     * this returns no listener call is in flight and none can start
     * (lm_remove_listener waits out the calls already made), so no library
     * thread can reach q any more and it may be freed below.
     */
    qmp_migration_detach(q->mig);

    pthread_mutex_lock(&q->lock);
    q->stopping = true;
    pthread_mutex_unlock(&q->lock);
    if (write(q->wake_fd, &one, sizeof(one)) < 0)
        util_log("QMP: cannot wake the server thread: %s", strerror(errno));
    pthread_join(q->thread, NULL);

    transport_unlisten(&q->listen);        /* closes, removes the socket file */
    close(q->wake_fd);
    /* No handler runs any more: the commands' state can go too. */
    qmp_free(q);
}
