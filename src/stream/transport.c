/*
 * Transports: a migration URI becomes one file descriptor (see transport.h).
 *
 * Design.  Parsing is pure (no system calls), so a bad URI is reported
 * before anything is opened.  Opening is done per kind, each in a couple of
 * small functions; everything that blocks goes through wait_fd(), the one
 * poll() loop that watches the descriptor, the caller's cancel_fd and a
 * CLOCK_MONOTONIC deadline.  The descriptors handed out are blocking (the
 * stream layer does blocking I/O and is woken by shutdown(2)), and every
 * descriptor this file creates is close-on-exec.
 *
 * Choices worth knowing:
 *
 *  - tcp: TCP_NODELAY is ON (Nagle off).  The stream layer already batches
 *    ~2 MiB per system call, so Nagle has nothing left to merge and only
 *    delays the tail of a flush until the previous segment is acked.
 *    Measured on this machine (loopback, write then wait for a 1-byte
 *    reply): two 30-byte writes took 44 ms per round with Nagle and 30 us
 *    without; 1 MB + 100 B took 454 us with Nagle and 191 us without.
 *    Socket buffers are left to kernel autotuning.
 *
 *  - tcp: getaddrinfo() without AI_ADDRCONFIG, numeric hosts with
 *    AI_NUMERICHOST.  Every returned address is tried in order, so an
 *    address of an unconfigured family just fails fast; AI_ADDRCONFIG would
 *    instead hide "localhost" on hosts that only have a loopback interface.
 *    Name resolution itself is bounded by the resolver's own timeout, not by
 *    timeout_ms.
 *
 *  - unix: a non-blocking connect to a listener whose backlog is full fails
 *    with EAGAIN (AF_UNIX has no "in progress" state to poll for), so that
 *    case retries every UNIX_RETRY_MS, still watching cancel_fd and the
 *    deadline.
 *
 *  - exec: the child's stdin (outgoing) or stdout (incoming) is one end of
 *    an AF_UNIX socketpair, not a pipe.  To the command it reads and writes
 *    like a pipe, but on our side shutdown(2) wakes a thread blocked on a
 *    stuck command, so exec is as cancellable as tcp (conn_shutdown).
 *    is_socket is still false: the command is not a livemig peer, so the
 *    migration must not open a return path on it.  A write after the command
 *    died raises SIGPIPE like a pipe would; the caller blocks or ignores it.
 *    The child runs in its own process group
 *    with an empty signal mask and default SIGPIPE; if it has not exited
 *    EXEC_REAP_TIMEOUT_MS after we close our end, the whole group (the shell
 *    and what it started) gets SIGKILL.  posix_spawn (vfork-like in glibc)
 *    keeps this safe in a multi-threaded process.
 *
 *  - fd: the descriptor is dup'ed (F_DUPFD_CLOEXEC) and made blocking; the
 *    file description is shared with the caller's fd, so that flag change
 *    is visible to it too.  A descriptor opened in the wrong direction
 *    (O_RDONLY for outgoing, O_WRONLY for incoming) is refused at once.
 *
 *  - file: opened with O_NONBLOCK and then switched back to blocking, so a
 *    FIFO without a reader fails (ENXIO) instead of hanging in open().
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "stream/transport.h"
#include "tls/tls.h"
#include "util/error.h"
#include "util/time.h"

/* Room for every connection of one migration (the main stream and up to 64
 * multifd channels) even if the destination has not accepted any yet: a
 * connection that finds the accept queue full is dropped and retried by the
 * kernel only after 1 s, then 3 s, ... */
#define LISTEN_BACKLOG       128
#define EXEC_REAP_TIMEOUT_MS 10000
#define UNIX_RETRY_MS        10
#define NAME_MAX_LEN         LM_ERROR_MAX

extern char **environ;

/* ---------------------------------------------------------------- names */

/* Printable names are cut to fit, never overflowed. */
static void copy_trunc(char *dst, size_t size, const char *src)
{
    size_t n = strnlen(src, size - 1);

    memcpy(dst, src, n);
    dst[n] = 0;
}

/* dst = a b c, cut to fit. */
static void join3(char *dst, size_t size, const char *a, const char *b, const char *c)
{
    size_t n;

    copy_trunc(dst, size, a);
    n = strlen(dst);
    copy_trunc(dst + n, size - n, b);
    n += strlen(dst + n);
    copy_trunc(dst + n, size - n, c);
}

/* The canonical printable form of a URI, for messages. */
static void uri_name(const transport_uri *u, char *buf, size_t len)
{
    char tail[48] = "";

    switch (u->kind) {
    case URI_TCP:
        /* host and port are short: a 512-byte name never cuts them */
        if (strchr(u->host, ':'))
            snprintf(tail, sizeof(tail), "]:%s", u->port);
        else
            snprintf(tail, sizeof(tail), ":%s", u->port);
        join3(buf, len, strchr(u->host, ':') ? "tcp:[" : "tcp:", u->host, tail);
        break;
    case URI_UNIX:
        join3(buf, len, "unix:", u->path, "");
        break;
    case URI_FD:
        snprintf(tail, sizeof(tail), "fd:%d", u->fd);
        join3(buf, len, tail, "", "");
        break;
    case URI_EXEC:
        join3(buf, len, "exec:", u->cmd, "");
        break;
    case URI_FILE:
        if (u->offset)
            snprintf(tail, sizeof(tail), ",offset=%llu", (unsigned long long)u->offset);
        join3(buf, len, "file:", u->path, tail);
        break;
    default:
        snprintf(tail, sizeof(tail), "(transport %d)", (int)u->kind);
        join3(buf, len, tail, "", "");
        break;
    }
}

/* "ADDR:PORT" or "[ADDR6]:PORT" for an inet address. */
static void sockaddr_name(const struct sockaddr *sa, socklen_t salen, char *buf,
                          size_t len)
{
    char host[NI_MAXHOST], serv[NI_MAXSERV];
    int r;

    r = getnameinfo(sa, salen, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV);
    if (r != 0)
        r = snprintf(buf, len, "(address family %d)", (int)sa->sa_family);
    else if (sa->sa_family == AF_INET6)
        r = snprintf(buf, len, "[%s]:%s", host, serv);
    else
        r = snprintf(buf, len, "%s:%s", host, serv);
    (void)r;
}

static void set_peer(transport_conn *c, const char *name)
{
    copy_trunc(c->peer, sizeof(c->peer), name);
}

/* ---------------------------------------------------------------- parsing */

static int bad_uri(lm_error *err, const char *s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int bad_uri(lm_error *err, const char *s, const char *fmt, ...)
{
    char why[LM_ERROR_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    return error_set(err, -EINVAL, "bad migration URI '%s': %s", s, why);
}

/* Decimal digits only, no sign, no spaces; false on overflow past `max`. */
static bool parse_decimal(const char *p, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;

    if (!*p)
        return false;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        if (v > (max - (uint64_t)(*p - '0')) / 10)
            return false;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    *out = v;
    return true;
}

/* Copy [p, p+n) into dst[size] with a NUL; false if it does not fit. */
static bool copy_part(char *dst, size_t size, const char *p, size_t n)
{
    if (n >= size)
        return false;
    memcpy(dst, p, n);
    dst[n] = 0;
    return true;
}

static int parse_tcp(const char *s, const char *rest, transport_uri *u, lm_error *err)
{
    const char *host, *port;
    size_t hostlen;
    uint64_t pnum;

    if (rest[0] == '[') {
        const char *close = strchr(rest, ']');
        if (!close)
            return bad_uri(err, s, "missing ']' after the IPv6 address");
        host = rest + 1;
        hostlen = (size_t)(close - host);
        if (close[1] != ':')
            return bad_uri(err, s, "expected ':PORT' after ']'");
        port = close + 2;
    } else {
        const char *colon = strrchr(rest, ':');
        if (!colon)
            return bad_uri(err, s, "expected tcp:HOST:PORT");
        host = rest;
        hostlen = (size_t)(colon - rest);
        /* "tcp:::1:80" is ambiguous; the bracket form is the only IPv6 form. */
        if (memchr(host, ':', hostlen))
            return bad_uri(err, s, "an IPv6 address must be in brackets, as in "
                           "tcp:[::1]:PORT");
        port = colon + 1;
    }
    if (rest[0] == '[' && hostlen == 0)
        return bad_uri(err, s, "empty IPv6 address in '[]'");
    if (!copy_part(u->host, sizeof(u->host), host, hostlen))
        return bad_uri(err, s, "host name too long (at most %zu bytes)",
                       sizeof(u->host) - 1);
    if (!parse_decimal(port, 65535, &pnum))
        return bad_uri(err, s, "invalid port '%s' (expected 0 to 65535)", port);
    snprintf(u->port, sizeof(u->port), "%u", (unsigned)pnum);
    u->kind = URI_TCP;
    return 0;
}

static int parse_file(const char *s, const char *rest, transport_uri *u, lm_error *err)
{
    const char *comma = strrchr(rest, ',');
    size_t pathlen = strlen(rest);

    /*
     * Only a trailing ",offset=N" is an option; any other comma belongs to
     * the path, so "file:/tmp/a,b" still names a file.
     */
    if (comma && strncmp(comma, ",offset=", 8) == 0) {
        if (!parse_decimal(comma + 8, INT64_MAX, &u->offset))
            return bad_uri(err, s, "invalid offset '%s' (expected a decimal "
                           "byte count)", comma + 8);
        pathlen = (size_t)(comma - rest);
    }
    if (pathlen == 0)
        return bad_uri(err, s, "empty file path");
    if (!copy_part(u->path, sizeof(u->path), rest, pathlen))
        return bad_uri(err, s, "file path too long (at most %zu bytes)",
                       sizeof(u->path) - 1);
    u->kind = URI_FILE;
    return 0;
}

int transport_uri_parse(const char *s, transport_uri *u, lm_error *err)
{
    struct sockaddr_un sa;

    memset(u, 0, sizeof(*u));
    u->fd = -1;
    if (!s)
        return error_set(err, -EINVAL, "bad migration URI: none given");

    if (strncmp(s, "tcp:", 4) == 0)
        return parse_tcp(s, s + 4, u, err);

    if (strncmp(s, "unix:", 5) == 0) {
        size_t n = strlen(s + 5);
        if (n == 0)
            return bad_uri(err, s, "empty socket path");
        /* sun_path must hold the path and its NUL */
        if (n >= sizeof(sa.sun_path))
            return bad_uri(err, s, "unix path too long (%zu bytes, at most %zu)",
                           n, sizeof(sa.sun_path) - 1);
        memcpy(u->path, s + 5, n + 1);
        u->kind = URI_UNIX;
        return 0;
    }

    if (strncmp(s, "fd:", 3) == 0) {
        uint64_t v;
        if (!parse_decimal(s + 3, INT_MAX, &v))
            return bad_uri(err, s, "invalid file descriptor number '%s'", s + 3);
        u->fd = (int)v;
        u->kind = URI_FD;
        return 0;
    }

    if (strncmp(s, "exec:", 5) == 0) {
        size_t n = strlen(s + 5);
        if (n == 0)
            return bad_uri(err, s, "empty command");
        if (!copy_part(u->cmd, sizeof(u->cmd), s + 5, n))
            return bad_uri(err, s, "command too long (at most %zu bytes)",
                           sizeof(u->cmd) - 1);
        u->kind = URI_EXEC;
        return 0;
    }

    if (strncmp(s, "file:", 5) == 0)
        return parse_file(s, s + 5, u, err);

    return bad_uri(err, s, "unknown transport (expected tcp:, unix:, fd:, "
                   "exec: or file:)");
}

/* ---------------------------------------------------------------- waiting */

static int64_t deadline_after(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : time_now_ms() + timeout_ms;
}

/* Milliseconds left for poll(): -1 = forever, 0 = expired. */
static int deadline_left(int64_t deadline)
{
    int64_t left;

    if (deadline < 0)
        return -1;
    left = deadline - time_now_ms();
    if (left <= 0)
        return 0;
    return left > INT_MAX ? INT_MAX : (int)left;
}

/*
 * Wait until `fd` reports one of `events` (fd < 0: just wait for cancel or
 * the deadline).  Returns 0, -ECANCELED (cancel_fd readable; it is not
 * consumed, so every waiter sees it), -ETIMEDOUT, or another -errno.
 * Cancel is checked before readiness: a cancelled migration must not go on
 * just because its peer was quick.
 */
static int wait_fd(int fd, short events, int cancel_fd, int64_t deadline)
{
    for (;;) {
        struct pollfd p[2] = {
            { .fd = fd, .events = events },
            { .fd = cancel_fd, .events = POLLIN },
        };
        int left = deadline_left(deadline);
        int n = poll(p, 2, left);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[1].revents & POLLNVAL)
            return -EBADF;
        if (p[1].revents)
            return -ECANCELED;
        if (p[0].revents)
            return 0;
        if (left == 0 || deadline_left(deadline) == 0)
            return -ETIMEDOUT;
    }
}

/* Map a wait_fd() failure to the message every caller wants. */
static int wait_error(lm_error *err, int r, const char *name, const char *step,
                      int timeout_ms)
{
    if (r == -ETIMEDOUT)
        return error_set(err, r, "%s: %s: timed out after %d ms", name, step,
                         timeout_ms);
    if (r == -ECANCELED)
        return error_set(err, r, "%s: %s: cancelled", name, step);
    if (r == -EBADF)
        return error_set(err, r, "%s: %s: cancel descriptor is not open",
                         name, step);
    return error_set_errno(err, r, "%s: %s: poll", name, step);
}

static int set_blocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0)
        return -errno;
    if ((fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
        return -errno;
    return 0;
}

static void conn_init(transport_conn *c)
{
    memset(c, 0, sizeof(*c));
    c->fd = -1;
}

/* ---------------------------------------------------------------- tcp */

static int tcp_resolve(const transport_uri *u, bool passive, struct addrinfo **res,
                       const char *name, lm_error *err)
{
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
        .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0),
    };
    const char *node = u->host[0] ? u->host : NULL;
    int r;

    hints.ai_flags |= AI_NUMERICHOST;
    r = getaddrinfo(node, u->port, &hints, res);
    if (r == EAI_NONAME && node) {
        hints.ai_flags &= ~AI_NUMERICHOST;
        r = getaddrinfo(node, u->port, &hints, res);
    }
    if (r == 0)
        return 0;
    if (r == EAI_SYSTEM)
        return error_set_errno(err, -errno, "%s: cannot resolve '%s'", name,
                               u->host);
    return error_set(err, -EHOSTUNREACH, "%s: cannot resolve '%s': %s", name,
                     u->host, gai_strerror(r));
}

/*
 * Nagle off: see the top of the file for the measurement.  And a silent
 * link noticed in about link_ms instead of TCP's ~15 minutes: keepalive
 * probes every third of it once the connection is idle for a third of it,
 * three unanswered ones end it; TCP_USER_TIMEOUT ends it when sent data
 * stays unacknowledged that long (and caps the probing too).
 */
static void tcp_tune(int fd, int link_ms)
{
    int one = 1;

    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (link_ms > 0) {
        int third = link_ms / 3000 > 0 ? link_ms / 3000 : 1, cnt = 3;
        unsigned int ut = (unsigned int)link_ms;

        (void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
        (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &third, sizeof(third));
        (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &third, sizeof(third));
        (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
        (void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ut, sizeof(ut));
    }
}

static int tcp_connect(const transport_uri *u, transport_conn *c, int cancel_fd, int timeout_ms,
                       lm_error *err)
{
    char name[NAME_MAX_LEN], peer[NI_MAXHOST + NI_MAXSERV + 8] = "tcp:";
    int64_t deadline = deadline_after(timeout_ms);
    struct addrinfo *res = NULL, *ai;
    int fd = -1, ret, last = -EHOSTUNREACH;

    uri_name(u, name, sizeof(name));
    ret = tcp_resolve(u, false, &res, name, err);
    if (ret < 0)
        return ret;

    /* Try each address; a refusal moves on, a cancel or timeout ends it all. */
    for (ai = res; ai; ai = ai->ai_next) {
        int soerr = 0;
        socklen_t len = sizeof(soerr);

        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            last = -errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            goto connected;
        if (errno != EINPROGRESS) {
            last = -errno;
            goto next;
        }
        ret = wait_fd(fd, POLLOUT, cancel_fd, deadline);
        if (ret < 0) {
            ret = wait_error(err, ret, name, "connect", timeout_ms);
            goto out;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
            soerr = errno;
        if (soerr == 0)
            goto connected;
        last = -soerr;
next:
        close(fd);
        fd = -1;
    }
    ret = error_set_errno(err, last, "%s: connect", name);
    goto out;

connected:
    ret = set_blocking(fd);
    if (ret < 0) {
        error_set_errno(err, ret, "%s: connect", name);
        goto out;
    }
    tcp_tune(fd, u->link_timeout_ms);
    sockaddr_name(ai->ai_addr, ai->ai_addrlen, peer + 4, sizeof(peer) - 4);
    set_peer(c, peer);
    c->fd = fd;
    c->is_socket = true;
    fd = -1;
    ret = 0;
out:
    if (fd >= 0)
        close(fd);
    freeaddrinfo(res);
    return ret;
}

static int tcp_listen(transport_listener *l, lm_error *err)
{
    char name[NAME_MAX_LEN], addr[NI_MAXHOST + NI_MAXSERV + 8] = "tcp:";
    struct addrinfo *res = NULL, *ai;
    struct sockaddr_storage ss;
    socklen_t sslen = sizeof(ss);
    const char *step = "bind";
    int fd = -1, ret, last = -EADDRNOTAVAIL, one = 1;

    uri_name(&l->uri, name, sizeof(name));
    ret = tcp_resolve(&l->uri, true, &res, name, err);
    if (ret < 0)
        return ret;

    /* One listening socket, on the first address that works. */
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            last = -errno;
            step = "socket";
            continue;
        }
        /* A restart must not wait out TIME_WAIT of the previous run. */
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            if (listen(fd, LISTEN_BACKLOG) == 0)
                break;
            step = "listen";
        } else {
            step = "bind";
        }
        last = -errno;
        close(fd);
        fd = -1;
    }
    if (fd < 0) {
        ret = error_set_errno(err, last, "%s: %s", name, step);
        goto out;
    }
    if (getsockname(fd, (struct sockaddr *)&ss, &sslen) < 0) {
        ret = error_set_errno(err, -errno, "%s: getsockname", name);
        goto out;
    }
    /* Report the port really bound, so port 0 tells the caller where to go. */
    snprintf(l->uri.port, sizeof(l->uri.port), "%u",
             ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                      : ntohs(((struct sockaddr_in *)&ss)->sin_port));
    sockaddr_name((struct sockaddr *)&ss, sslen, addr + 4, sizeof(addr) - 4);
    copy_trunc(l->address, sizeof(l->address), addr);
    l->fd = fd;
    fd = -1;
    ret = 0;
out:
    if (fd >= 0)
        close(fd);
    freeaddrinfo(res);
    return ret;
}

/* ---------------------------------------------------------------- unix */

static int unix_addr(const transport_uri *u, struct sockaddr_un *sa, const char *name,
                     lm_error *err)
{
    size_t n = strlen(u->path);

    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    /* Checked by the parser too; an transport_uri may also be built by hand. */
    if (n == 0 || n >= sizeof(sa->sun_path))
        return error_set(err, -ENAMETOOLONG, "%s: unix path too long (%zu "
                         "bytes, at most %zu)", name, n,
                         sizeof(sa->sun_path) - 1);
    memcpy(sa->sun_path, u->path, n + 1);
    return 0;
}

static int unix_connect(const transport_uri *u, transport_conn *c, int cancel_fd, int timeout_ms,
                        lm_error *err)
{
    char name[NAME_MAX_LEN];
    int64_t deadline = deadline_after(timeout_ms);
    struct sockaddr_un sa;
    int fd = -1, ret;

    uri_name(u, name, sizeof(name));
    ret = unix_addr(u, &sa, name, err);
    if (ret < 0)
        return ret;

    for (;;) {
        int64_t retry_at;

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return error_set_errno(err, -errno, "%s: socket", name);
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            break;
        if (errno != EAGAIN && errno != EINTR) {
            ret = error_set_errno(err, -errno, "%s: connect", name);
            goto out;
        }
        close(fd);
        fd = -1;
        /* Backlog full: nothing to poll for but cancel; retry shortly. */
        retry_at = time_now_ms() + UNIX_RETRY_MS;
        if (deadline >= 0 && deadline < retry_at)
            retry_at = deadline;
        ret = wait_fd(-1, 0, cancel_fd, retry_at);
        if (ret == -ETIMEDOUT && deadline_left(deadline) != 0)
            continue;
        ret = wait_error(err, ret, name, "connect", timeout_ms);
        goto out;
    }
    ret = set_blocking(fd);
    if (ret < 0) {
        error_set_errno(err, ret, "%s: connect", name);
        goto out;
    }
    set_peer(c, name);
    c->fd = fd;
    c->is_socket = true;
    fd = -1;
    ret = 0;
out:
    if (fd >= 0)
        close(fd);
    return ret;
}

/*
 * bind() said EADDRINUSE.  A socket file nobody answers on is left over
 * from a dead process: remove it (returns 1: try again).  A live one, or
 * something that is not a socket, is not ours to remove.
 */
static int unix_reclaim(const struct sockaddr_un *sa, const char *name,
                        lm_error *err)
{
    struct stat st;
    int fd, r;

    if (lstat(sa->sun_path, &st) < 0)
        return errno == ENOENT ? 1 : error_set_errno(err, -errno, "%s: bind: "
                                                     "stat", name);
    if (!S_ISSOCK(st.st_mode))
        return error_set(err, -EADDRINUSE, "%s: bind: Address already in use "
                         "(the path exists and is not a socket)", name);

    /*
     * Probe.  Side effect: a live listener sees one connection that closes
     * without data.  A full backlog (EAGAIN) also means someone is there.
     */
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return error_set_errno(err, -errno, "%s: socket", name);
    r = connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0 ? 0 : errno;
    close(fd);
    if (r == 0 || r == EAGAIN)
        return error_set(err, -EADDRINUSE, "%s: bind: Address already in use "
                         "(another process is listening on it)", name);
    if (r != ECONNREFUSED && r != ENOENT)
        return error_set_errno(err, -r, "%s: bind: Address already in use; "
                               "probing it failed", name);
    /*
     * Stale.  Between the probe and unlink() another process could bind the
     * path anew; that window is inherent to path-named sockets.
     */
    if (unlink(sa->sun_path) < 0 && errno != ENOENT)
        return error_set_errno(err, -errno, "%s: removing stale socket", name);
    return 1;
}

static int unix_listen(transport_listener *l, lm_error *err)
{
    char name[NAME_MAX_LEN];
    struct sockaddr_un sa;
    int fd = -1, ret, tries;

    uri_name(&l->uri, name, sizeof(name));
    ret = unix_addr(&l->uri, &sa, name, err);
    if (ret < 0)
        return ret;

    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return error_set_errno(err, -errno, "%s: socket", name);
    /* Two tries: the second bind follows the removal of a stale file. */
    for (tries = 0;; tries++) {
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            break;
        if (errno != EADDRINUSE || tries == 1) {
            ret = error_set_errno(err, -errno, "%s: bind", name);
            goto out;
        }
        ret = unix_reclaim(&sa, name, err);
        if (ret < 0)
            goto out;
    }
    /* Owner-only before listen: nobody else can connect, not even in a
     * window (a bound socket that does not listen yet refuses everyone).
     * What arrives on it can be guest RAM or, in cpr-transfer, the very
     * descriptors of guest RAM (src/cpr/). */
    if (sa.sun_path[0] && chmod(sa.sun_path, 0600) < 0) {
        ret = error_set_errno(err, -errno, "%s: chmod 0600", name);
        unlink(sa.sun_path);
        goto out;
    }
    if (listen(fd, LISTEN_BACKLOG) < 0) {
        ret = error_set_errno(err, -errno, "%s: listen", name);
        unlink(sa.sun_path);
        goto out;
    }
    copy_trunc(l->address, sizeof(l->address), name);
    l->fd = fd;
    fd = -1;
    ret = 0;
out:
    if (fd >= 0)
        close(fd);
    return ret;
}

/* ---------------------------------------------------------------- fd: */

/* Open, and open in the direction the migration needs. */
static int fd_check(const transport_uri *u, bool outgoing, const char *name, lm_error *err)
{
    int fl;

    if (u->fd < 0 || (fl = fcntl(u->fd, F_GETFL)) < 0)
        return error_set_errno(err, -EBADF, "%s", name);
    if (outgoing && (fl & O_ACCMODE) == O_RDONLY)
        return error_set(err, -EBADF, "%s: descriptor is not open for writing",
                         name);
    if (!outgoing && (fl & O_ACCMODE) == O_WRONLY)
        return error_set(err, -EBADF, "%s: descriptor is not open for reading",
                         name);
    return 0;
}

static int fd_open(const transport_uri *u, transport_conn *c, bool outgoing, lm_error *err)
{
    char name[NAME_MAX_LEN];
    struct stat st;
    int fd = -1, ret;

    uri_name(u, name, sizeof(name));
    ret = fd_check(u, outgoing, name, err);
    if (ret < 0)
        return ret;
    /* >= 3: keep a handed-over descriptor off stdin/stdout/stderr. */
    fd = fcntl(u->fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0)
        return error_set_errno(err, -errno, "%s: dup", name);
    if (fstat(fd, &st) < 0) {
        ret = error_set_errno(err, -errno, "%s: fstat", name);
        goto out;
    }
    ret = set_blocking(fd);
    if (ret < 0) {
        error_set_errno(err, ret, "%s: clearing O_NONBLOCK", name);
        goto out;
    }
    set_peer(c, name);
    c->fd = fd;
    c->is_socket = S_ISSOCK(st.st_mode);
    c->seekable = S_ISREG(st.st_mode);
    fd = -1;
out:
    if (fd >= 0)
        close(fd);
    return ret;
}

/* ---------------------------------------------------------------- exec: */

static int exec_spawn(const transport_uri *u, transport_conn *c, bool outgoing, lm_error *err)
{
    char name[NAME_MAX_LEN];
    char *argv[] = { "sh", "-c", (char *)u->cmd, NULL };
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    sigset_t none, dfl;
    int sv[2], ret;
    pid_t pid;

    uri_name(u, name, sizeof(name));
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return error_set_errno(err, -errno, "%s: socketpair", name);

    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&attr);
    /*
     * dup2 first: if sv[1] happens to be 0 (stdin was closed) the /dev/null
     * open below must not clobber it before it is copied.  dup2 clears
     * close-on-exec on the target, even when sv[1] is already that number.
     */
    posix_spawn_file_actions_adddup2(&fa, sv[1], outgoing ? STDIN_FILENO
                                                          : STDOUT_FILENO);
    if (!outgoing)
        posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null",
                                         O_RDONLY, 0);
    sigemptyset(&none);
    sigemptyset(&dfl);
    sigaddset(&dfl, SIGPIPE);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &dfl);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK |
                                    POSIX_SPAWN_SETSIGDEF);

    ret = posix_spawn(&pid, "/bin/sh", &fa, &attr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    close(sv[1]);
    if (ret != 0) {
        close(sv[0]);
        return error_set_errno(err, -ret, "%s: starting /bin/sh", name);
    }
    set_peer(c, name);
    c->fd = sv[0];
    c->is_socket = false;   /* no return path: see the top of the file */
    c->child = pid;
    return 0;
}

/*
 * Wait up to timeout_ms for `pid` to exit, then reap it.  A pidfd makes the
 * wait a plain poll; without one (old kernel, seccomp) fall back to polling
 * waitpid(WNOHANG) every few ms, which only happens on close.
 */
static int child_wait(pid_t pid, int timeout_ms, int *status)
{
    int64_t deadline = deadline_after(timeout_ms);
    int pidfd = -1;
    pid_t r;

#ifdef SYS_pidfd_open
    pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
#endif
    if (pidfd >= 0) {
        int w = wait_fd(pidfd, POLLIN, -1, deadline);
        close(pidfd);
        if (w < 0)
            return w;
    } else {
        const struct timespec nap = { 0, 5 * 1000 * 1000 };
        for (;;) {
            r = waitpid(pid, status, WNOHANG);
            if (r == pid)
                return 0;
            if (r < 0 && errno != EINTR)
                return -errno;
            if (deadline_left(deadline) == 0)
                return -ETIMEDOUT;
            nanosleep(&nap, NULL);
        }
    }
    do {
        r = waitpid(pid, status, 0);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

static int exec_reap(transport_conn *c, lm_error *err)
{
    pid_t pid = c->child;
    int status = 0, r;

    c->child = 0;
    r = child_wait(pid, EXEC_REAP_TIMEOUT_MS, &status);
    if (r == -ETIMEDOUT) {
        /* Its own process group: this also ends what the shell started. */
        kill(-pid, SIGKILL);
        do {
            r = waitpid(pid, &status, 0);
        } while (r < 0 && errno == EINTR);
        return error_set(err, -ETIMEDOUT, "%s did not exit within %d s after "
                         "its channel was closed; killed",
                         c->peer, EXEC_REAP_TIMEOUT_MS / 1000);
    }
    if (r < 0)
        return error_set_errno(err, r, "%s: waiting for the command", c->peer);
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
        return error_set(err, -EIO, "%s exited with status %d", c->peer,
                         WEXITSTATUS(status));
    if (WIFSIGNALED(status))
        return error_set(err, -EIO, "%s was killed by signal %d (%s)", c->peer,
                         WTERMSIG(status), strsignal(WTERMSIG(status)));
    return 0;
}

/* ---------------------------------------------------------------- file: */

static int file_open(const transport_uri *u, transport_conn *c, bool outgoing, lm_error *err)
{
    char name[NAME_MAX_LEN];
    struct stat st;
    int flags, fd, ret;

    uri_name(u, name, sizeof(name));
    /* An offset means the caller lays out the file: do not cut what is before. */
    flags = outgoing ? O_WRONLY | O_CREAT | (u->offset ? 0 : O_TRUNC) : O_RDONLY;
    fd = open(u->path, flags | O_CLOEXEC | O_NONBLOCK, 0600);
    if (fd < 0)
        return error_set_errno(err, -errno, "%s: open", name);
    if (fstat(fd, &st) < 0) {
        ret = error_set_errno(err, -errno, "%s: fstat", name);
        goto out;
    }
    /* O_RDONLY opens a directory; reading it would fail later and vaguely. */
    if (S_ISDIR(st.st_mode)) {
        ret = error_set_errno(err, -EISDIR, "%s", name);
        goto out;
    }
    ret = set_blocking(fd);
    if (ret < 0) {
        error_set_errno(err, ret, "%s: clearing O_NONBLOCK", name);
        goto out;
    }
    if (u->offset && lseek(fd, (off_t)u->offset, SEEK_SET) < 0) {
        ret = error_set_errno(err, -errno, "%s: seek to offset %llu", name,
                              (unsigned long long)u->offset);
        goto out;
    }
    set_peer(c, name);
    c->fd = fd;
    c->seekable = S_ISREG(st.st_mode);
    return 0;
out:
    close(fd);
    return ret;
}

/* ---------------------------------------------------------------- API */

int transport_connect(const transport_uri *u, transport_conn *c, int cancel_fd, int timeout_ms,
                      lm_error *err)
{
    conn_init(c);
    switch (u->kind) {
    case URI_TCP:
        return tcp_connect(u, c, cancel_fd, timeout_ms, err);
    case URI_UNIX:
        return unix_connect(u, c, cancel_fd, timeout_ms, err);
    case URI_FD:
        return fd_open(u, c, true, err);
    case URI_EXEC:
        return exec_spawn(u, c, true, err);
    case URI_FILE:
        return file_open(u, c, true, err);
    }
    return error_set(err, -EINVAL, "unknown transport kind %d", (int)u->kind);
}

int transport_listen(const transport_uri *u, transport_listener *l, lm_error *err)
{
    char name[NAME_MAX_LEN];
    struct stat st;

    memset(l, 0, sizeof(*l));
    l->uri = *u;
    l->fd = -1;
    uri_name(u, name, sizeof(name));
    copy_trunc(l->address, sizeof(l->address), name);

    switch (u->kind) {
    case URI_TCP:
        return tcp_listen(l, err);
    case URI_UNIX:
        return unix_listen(l, err);
    case URI_FD:
        /* Nothing to listen on, but a bad descriptor is reported now. */
        return fd_check(u, false, name, err);
    case URI_EXEC:
        return 0;
    case URI_FILE:
        if (stat(u->path, &st) < 0)
            return error_set_errno(err, -errno, "%s", name);
        return 0;
    }
    return error_set(err, -EINVAL, "unknown transport kind %d", (int)u->kind);
}

static int sock_accept(transport_listener *l, transport_conn *c, int cancel_fd, int timeout_ms,
                       lm_error *err)
{
    int64_t deadline = deadline_after(timeout_ms);
    struct sockaddr_storage ss;
    socklen_t sslen;
    char peer[NI_MAXHOST + NI_MAXSERV + 8] = "tcp:";
    int fd, r;

    if (l->fd < 0)
        return error_set(err, -EBADF, "%s: accept: not listening", l->address);
    for (;;) {
        r = wait_fd(l->fd, POLLIN, cancel_fd, deadline);
        if (r < 0)
            return wait_error(err, r, l->address, "accept", timeout_ms);
        sslen = sizeof(ss);
        fd = accept4(l->fd, (struct sockaddr *)&ss, &sslen, SOCK_CLOEXEC);
        if (fd >= 0)
            break;
        /* The connection went away between poll and accept: wait again. */
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
            errno == ECONNABORTED || errno == EPROTO)
            continue;
        return error_set_errno(err, -errno, "%s: accept", l->address);
    }
    /* Linux does not pass O_NONBLOCK from the listener: fd is blocking. */
    if (l->uri.kind == URI_TCP) {
        tcp_tune(fd, l->uri.link_timeout_ms);
        sockaddr_name((struct sockaddr *)&ss, sslen, peer + 4, sizeof(peer) - 4);
        set_peer(c, peer);
    } else {
        set_peer(c, l->address);
    }
    c->fd = fd;
    c->is_socket = true;
    return 0;
}

int transport_accept(transport_listener *l, transport_conn *c, int cancel_fd, int timeout_ms,
                     lm_error *err)
{
    conn_init(c);
    switch (l->uri.kind) {
    case URI_TCP:
    case URI_UNIX:
        return sock_accept(l, c, cancel_fd, timeout_ms, err);
    case URI_FD:
        return fd_open(&l->uri, c, false, err);
    case URI_EXEC:
        return exec_spawn(&l->uri, c, false, err);
    case URI_FILE:
        return file_open(&l->uri, c, false, err);
    }
    return error_set(err, -EINVAL, "unknown transport kind %d", (int)l->uri.kind);
}

void transport_unlisten(transport_listener *l)
{
    if (l->fd < 0)
        return;
    /* Only while we hold the socket: a second call must not unlink a successor's. */
    if (l->uri.kind == URI_UNIX)
        unlink(l->uri.path);
    close(l->fd);
    l->fd = -1;
}

void conn_shutdown(transport_conn *c)
{
    /* exec: is a socketpair too, even though is_socket is false */
    if (c->fd >= 0 && (c->is_socket || c->child > 0))
        (void)shutdown(c->fd, SHUT_RDWR);
}

int conn_close(transport_conn *c, lm_error *err)
{
    int ret = 0;

    if (c->fd >= 0) {
        tls_session_close(c->tls);
        /* Linux releases the descriptor even when close() fails. */
        if (close(c->fd) < 0 && errno != EINTR)
            ret = error_set_errno(err, -errno, "%s: close", c->peer);
        c->fd = -1;
    }
    c->tls = NULL;
    /* Our end is closed, so the command sees EOF (or EPIPE) and can finish. */
    if (c->child > 0) {
        int r = exec_reap(c, ret < 0 ? NULL : err);
        if (ret == 0)
            ret = r;
    }
    return ret;
}

/* ---------------------------------------------------------------- I/O */

int conn_tls_wrap(const tls_setup *s, transport_conn *c, int cancel_fd, int timeout_ms,
                  lm_error *err)
{
    if (!tls_setup_on(s))
        return 0;
    if (!c->is_socket)
        return error_set(err, -EINVAL, "%s: TLS needs a socket", c->peer);
    return tls_wrap(s, c->fd, c->peer, cancel_fd, timeout_ms, &c->tls, err);
}

ssize_t conn_writev(transport_conn *c, const struct iovec *iov, int n)
{
    struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };

    if (c->tls)
        return tls_io_writev(c->fd, c->tls, iov, n);
    if (c->is_socket)
        return sendmsg(c->fd, &m, MSG_NOSIGNAL);
    return writev(c->fd, iov, n);
}

ssize_t conn_readv(transport_conn *c, const struct iovec *iov, int n)
{
    return c->tls ? tls_io_readv(c->fd, c->tls, iov, n, false) : readv(c->fd, iov, n);
}

ssize_t conn_read(transport_conn *c, void *buf, size_t len)
{
    struct iovec v = { buf, len };

    return conn_readv(c, &v, 1);
}

ssize_t conn_read_nb(transport_conn *c, void *buf, size_t len)
{
    struct iovec v = { buf, len };

    if (c->tls)
        return tls_io_readv(c->fd, c->tls, &v, 1, true);
    return recv(c->fd, buf, len, MSG_DONTWAIT);
}

bool conn_pending(const transport_conn *c)
{
    return c->tls && tls_io_pending(c->tls);
}

void conn_unread(transport_conn *c, const void *buf, size_t len)
{
    assert(c->tls);
    tls_io_unread(c->tls, buf, len);
}

const char *conn_strerror(const transport_conn *c, int errnum)
{
    return tls_io_strerror(c->tls, errnum);
}
