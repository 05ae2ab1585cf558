/*
 * QMP client: a non-blocking unix socket, a line buffer, and poll(2) with a
 * deadline around every read and write, so a server that hangs or dies
 * turns into a timeout or a "connection closed" error instead of a hang.
 *
 * Each command carries an "id" (a counter); the reply with that id ends the
 * wait.  Replies without an id are accepted too (an old server), and
 * replies with another id -- a command of ours that timed out earlier --
 * are dropped.  Events are queued in a JSON array, oldest first.
 */
#include "qmpclient.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

#define QMPC_MAX_LINE (64u << 20)     /* a larger message means a broken peer */
#define QMPC_RETRY_NS 10000000        /* connect retry while the socket appears */

struct qmpc {
    int fd;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char *buf;                        /* unparsed input, not NUL-terminated */
    size_t len, cap;
    json_t *events;                   /* array, oldest first */
    uint64_t next_id;
};

static int64_t deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? INT64_MAX : tool_now_ms() + timeout_ms;
}

static int remaining_ms(int64_t deadline)
{
    if (deadline == INT64_MAX)
        return -1;
    int64_t left = deadline - tool_now_ms();
    return left < 0 ? 0 : left > INT32_MAX ? INT32_MAX : (int)left;
}

/* Read whatever is available, waiting until `deadline` for the first byte. */
static int qmpc_read_some(struct qmpc *c, int64_t deadline, lm_error *err)
{
    for (;;) {
        struct pollfd p = { .fd = c->fd, .events = POLLIN };
        int n = poll(&p, 1, remaining_ms(deadline));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return tool_error_errno(err, -errno, "QMP %s: poll", c->path);
        if (n == 0)
            return -ETIMEDOUT;       /* caller words the message */
        if (c->cap - c->len < 65536) {
            if (c->cap >= QMPC_MAX_LINE)
                return tool_error(err, -EPROTO, "QMP %s: message longer than %u bytes",
                                  c->path, QMPC_MAX_LINE);
            size_t ncap = c->cap ? c->cap * 2 : 131072;
            char *nb = realloc(c->buf, ncap);
            if (!nb)
                return tool_error(err, -ENOMEM, "out of memory");
            c->buf = nb;
            c->cap = ncap;
        }
        ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r < 0)
            return tool_error_errno(err, -errno, "QMP %s: read", c->path);
        if (r == 0)
            return tool_error(err, -ECONNRESET, "QMP %s: connection closed by the server",
                              c->path);
        c->len += (size_t)r;
        return 0;
    }
}

/*
 * Take one complete message out of the buffer: 1 with *msg set, 0 when no
 * full line is buffered yet, negative on bad JSON.
 */
static int qmpc_take_msg(struct qmpc *c, json_t **msg, lm_error *err)
{
    for (;;) {
        char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;
        if (!nl)
            return 0;
        size_t linelen = (size_t)(nl - c->buf);
        size_t used = linelen + 1;
        while (linelen && (c->buf[linelen - 1] == '\r' || c->buf[linelen - 1] == ' '))
            linelen--;
        json_error_t je;
        json_t *m = linelen ? json_loadb(c->buf, linelen, 0, &je) : NULL;
        int rc = 0;
        if (linelen && (!m || !json_is_object(m))) {
            rc = tool_error(err, -EPROTO, "QMP %s: not a JSON object: %.*s%s", c->path,
                            (int)(linelen > 200 ? 200 : linelen), c->buf,
                            linelen > 200 ? "..." : "");
            json_decref(m);
        }
        memmove(c->buf, c->buf + used, c->len - used);
        c->len -= used;
        if (rc)
            return rc;
        if (m) {
            *msg = m;
            return 1;
        }
        /* blank line: keep looking */
    }
}

/* The next message, waiting until `deadline`.  -ETIMEDOUT has no message. */
static int qmpc_read_msg(struct qmpc *c, int64_t deadline, json_t **msg, lm_error *err)
{
    for (;;) {
        int rc = qmpc_take_msg(c, msg, err);
        if (rc)
            return rc < 0 ? rc : 0;
        rc = qmpc_read_some(c, deadline, err);
        if (rc)
            return rc;
    }
}

static int qmpc_send(struct qmpc *c, json_t *msg, int64_t deadline, lm_error *err)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    int rc = 0;

    if (!text)
        return tool_error(err, -ENOMEM, "QMP %s: cannot encode a command", c->path);
    size_t len = strlen(text), off = 0;
    text[len] = '\n';               /* replaces the NUL; we send len + 1 bytes */
    while (off < len + 1) {
        ssize_t n = send(c->fd, text + off, len + 1 - off, MSG_NOSIGNAL);
        if (n >= 0) {
            off += (size_t)n;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN) {
            rc = tool_error_errno(err, -errno, "QMP %s: send", c->path);
            goto out;
        }
        struct pollfd p = { .fd = c->fd, .events = POLLOUT };
        int pr = poll(&p, 1, remaining_ms(deadline));
        if (pr == 0) {
            rc = tool_error(err, -ETIMEDOUT, "QMP %s: server does not read its socket",
                            c->path);
            goto out;
        }
    }
out:
    free(text);
    return rc;
}

static void qmpc_queue_event(struct qmpc *c, json_t *m)
{
    json_array_append_new(c->events, m);
}

int qmpc_connect(struct qmpc **out, const char *path, int timeout_ms,
                 qmpc_alive_fn alive, void *alive_opaque, lm_error *err)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct qmpc *c;
    int64_t deadline = deadline_of(timeout_ms);
    json_t *greeting = NULL;
    int rc = 0;

    *out = NULL;
    if (!strncmp(path, "unix:", 5))
        path += 5;
    if (strlen(path) >= sizeof(sa.sun_path))
        return tool_error(err, -ENAMETOOLONG, "QMP socket path too long: %s", path);
    c = calloc(1, sizeof(*c));
    if (!c)
        return tool_error(err, -ENOMEM, "out of memory");
    c->fd = -1;
    c->events = json_array();
    c->next_id = 1;
    snprintf(c->path, sizeof(c->path), "%s", path);
    memcpy(sa.sun_path, path, strlen(path) + 1);

    for (;;) {
        c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0) {
            rc = tool_error_errno(err, -errno, "QMP %s: socket", path);
            goto out;
        }
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            break;
        int e = errno;
        close(c->fd);
        c->fd = -1;
        /* Not there yet (the server is still starting): retry; else give up. */
        if (e != ENOENT && e != ECONNREFUSED && e != EAGAIN && e != EINTR) {
            rc = tool_error_errno(err, -e, "QMP %s: connect", path);
            goto out;
        }
        if (alive && !alive(alive_opaque, err)) {
            rc = err && err->code ? err->code : -ESRCH;
            goto out;
        }
        if (tool_now_ms() >= deadline) {
            rc = tool_error(err, -ETIMEDOUT, "QMP %s: no server within %d ms (%s)", path,
                            timeout_ms, strerror(e));
            goto out;
        }
        struct timespec ts = { 0, QMPC_RETRY_NS };
        nanosleep(&ts, NULL);
    }
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);

    rc = qmpc_read_msg(c, deadline, &greeting, err);
    if (rc == -ETIMEDOUT)
        tool_error(err, rc, "QMP %s: no greeting within %d ms", path, timeout_ms);
    if (rc)
        goto out;
    if (!json_object_get(greeting, "QMP")) {
        rc = tool_error(err, -EPROTO, "QMP %s: the server did not send a QMP greeting", path);
        goto out;
    }
    rc = qmpc_execute(c, "qmp_capabilities", NULL, NULL, remaining_ms(deadline), err);
out:
    json_decref(greeting);
    if (rc) {
        qmpc_close(c);
        return rc;
    }
    *out = c;
    return 0;
}

int qmpc_execute(struct qmpc *c, const char *cmd, json_t *args, json_t **ret,
                 int timeout_ms, lm_error *err)
{
    int64_t deadline = deadline_of(timeout_ms);
    uint64_t id = c->next_id++;
    json_t *msg = json_pack("{s:s, s:I}", "execute", cmd, "id", (json_int_t)id);
    int rc;

    if (ret)
        *ret = NULL;
    if (!msg) {
        json_decref(args);
        return tool_error(err, -ENOMEM, "out of memory");
    }
    if (args)
        json_object_set_new(msg, "arguments", args);
    rc = qmpc_send(c, msg, deadline, err);
    json_decref(msg);
    if (rc)
        return rc;

    for (;;) {
        json_t *m = NULL;
        rc = qmpc_read_msg(c, deadline, &m, err);
        if (rc == -ETIMEDOUT)
            return tool_error(err, rc, "QMP %s: no reply to '%s' within %d ms", c->path, cmd,
                              timeout_ms);
        if (rc)
            return rc;
        if (json_object_get(m, "event")) {
            qmpc_queue_event(c, m);
            continue;
        }
        json_t *rid = json_object_get(m, "id");
        if (rid && (!json_is_integer(rid) || (uint64_t)json_integer_value(rid) != id)) {
            json_decref(m);          /* a late reply to an abandoned command */
            continue;
        }
        json_t *e = json_object_get(m, "error");
        if (e) {
            const char *desc = json_string_value(json_object_get(e, "desc"));
            rc = tool_error(err, -EREMOTEIO, "%s: %s", cmd, desc ? desc : "error without desc");
            json_decref(m);
            return rc;
        }
        json_t *r = json_object_get(m, "return");
        if (!r) {
            json_decref(m);          /* neither reply nor event: ignore */
            continue;
        }
        if (ret)
            *ret = json_incref(r);
        json_decref(m);
        return 0;
    }
}

int qmpc_poll(struct qmpc *c, int timeout_ms, lm_error *err)
{
    json_t *m;
    int rc;

    if (!c->len || !memchr(c->buf, '\n', c->len)) {
        rc = qmpc_read_some(c, deadline_of(timeout_ms), err);
        if (rc == -ETIMEDOUT)
            return 0;
        if (rc)
            return rc;
    }
    while ((rc = qmpc_take_msg(c, &m, err)) > 0) {
        if (json_object_get(m, "event"))
            qmpc_queue_event(c, m);
        else
            json_decref(m);
    }
    return rc;
}

json_t *qmpc_next_event(struct qmpc *c)
{
    if (!json_array_size(c->events))
        return NULL;
    json_t *e = json_incref(json_array_get(c->events, 0));
    json_array_remove(c->events, 0);
    return e;
}

void qmpc_close(struct qmpc *c)
{
    if (!c)
        return;
    if (c->fd >= 0)
        close(c->fd);
    json_decref(c->events);
    free(c->buf);
    free(c);
}
