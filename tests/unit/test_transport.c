/*
 * Unit tests for src/stream/transport.c: URI parsing and every transport
 * opened for real on this machine (loopback tcp v4/v6, unix sockets, fd:,
 * exec: through /bin/sh, file:).
 *
 * No sleeps as synchronisation: data is checked with poll-bounded reads,
 * helper threads are joined with pthread_timedjoin_np, and every blocking
 * call under test gets a timeout that fails the test rather than hanging.
 * Timing checks only bound from above (plus a loose lower bound for the
 * timeouts, which the code guarantees with a monotonic deadline).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "stream/transport.h"
#include "util/time.h"

#define IO_TIMEOUT_MS 5000

/* ---------------------------------------------------------------- helpers */

static char tmpdir[256];

static int setup_tmpdir(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/lm-test-transport-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown_tmpdir(void **state)
{
    char cmd[512];
    (void)state;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void tmp_path(char *buf, size_t len, const char *leaf)
{
    int n = snprintf(buf, len, "%s/%s", tmpdir, leaf);
    assert_true(n > 0 && (size_t)n < len);
}

static void parse_ok(const char *s, transport_uri *u)
{
    lm_error err = { 0 };
    int r = transport_uri_parse(s, u, &err);
    if (r != 0)
        fail_msg("parse '%s': %s", s, err.msg);
}

/* Every key word must be in the message. */
static void assert_msg_has(const lm_error *err, ...)
{
    va_list ap;
    const char *w;

    va_start(ap, err);
    while ((w = va_arg(ap, const char *)) != NULL) {
        if (!strstr(err->msg, w))
            fail_msg("message '%s' lacks '%s'", err->msg, w);
    }
    va_end(ap);
}

/* Write everything or fail. */
static void write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        assert_true(n > 0);
        p += n;
        len -= (size_t)n;
    }
}

/* Read exactly len bytes, each wait bounded. */
static void read_exact(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        ssize_t n;
        assert_int_equal(poll(&pf, 1, IO_TIMEOUT_MS), 1);
        n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        assert_true(n > 0);
        p += n;
        len -= (size_t)n;
    }
}

/* Read to EOF (bounded); returns the length. */
static size_t read_to_eof(int fd, char *buf, size_t cap)
{
    size_t got = 0;
    for (;;) {
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        ssize_t n;
        assert_int_equal(poll(&pf, 1, IO_TIMEOUT_MS), 1);
        n = read(fd, buf + got, cap - got);
        if (n < 0 && errno == EINTR)
            continue;
        assert_true(n >= 0);
        if (n == 0)
            return got;
        got += (size_t)n;
        assert_true(got < cap);
    }
}

static void slurp_file(const char *path, char *buf, size_t cap, size_t *len)
{
    int fd = open(path, O_RDONLY);
    ssize_t n;
    assert_true(fd >= 0);
    n = read(fd, buf, cap);
    assert_true(n >= 0);
    *len = (size_t)n;
    close(fd);
}

static void spit_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    write_all(fd, data, strlen(data));
    close(fd);
}

static bool is_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFD);
    assert_true(fl >= 0);
    return fl & FD_CLOEXEC;
}

/* A number that is certainly not an open descriptor right now. */
static int closed_fd(void)
{
    int fd = dup(0);
    assert_true(fd >= 0);
    close(fd);
    return fd;
}

/* Send a few bytes each way over a connected pair. */
static void ping_pong(int a, int b)
{
    char buf[16];

    write_all(a, "ping", 4);
    read_exact(b, buf, 4);
    assert_memory_equal(buf, "ping", 4);
    write_all(b, "pong!", 5);
    read_exact(a, buf, 5);
    assert_memory_equal(buf, "pong!", 5);
}

/* A thread that writes an eventfd after delay_ms: "cancel while blocked". */
struct canceller {
    pthread_t thread;
    int efd;
    int delay_ms;
};

static void *canceller_main(void *arg)
{
    struct canceller *k = arg;
    struct timespec ts = { k->delay_ms / 1000, (long)(k->delay_ms % 1000) * 1000000 };
    uint64_t one = 1;

    nanosleep(&ts, NULL);
    if (write(k->efd, &one, sizeof(one)) != sizeof(one))
        abort();
    return NULL;
}

static void canceller_start(struct canceller *k, int delay_ms)
{
    k->efd = eventfd(0, EFD_CLOEXEC);
    assert_true(k->efd >= 0);
    k->delay_ms = delay_ms;
    assert_int_equal(pthread_create(&k->thread, NULL, canceller_main, k), 0);
}

static void canceller_join(struct canceller *k)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    assert_int_equal(pthread_timedjoin_np(k->thread, NULL, &ts), 0);
    close(k->efd);
}

/* Listen on uri, connect to the reported address, accept; both conns open. */
static void open_pair(const char *uri, transport_listener *l, transport_conn *out,
                      transport_conn *in)
{
    transport_uri u, cu;
    lm_error err = { 0 };

    parse_ok(uri, &u);
    if (transport_listen(&u, l, &err) != 0)
        fail_msg("listen %s: %s", uri, err.msg);
    parse_ok(l->address, &cu);
    if (transport_connect(&cu, out, -1, IO_TIMEOUT_MS, &err) != 0)
        fail_msg("connect %s: %s", l->address, err.msg);
    if (transport_accept(l, in, -1, IO_TIMEOUT_MS, &err) != 0)
        fail_msg("accept %s: %s", l->address, err.msg);
}

/* ---------------------------------------------------------------- parsing */

static void test_parse_good(void **state)
{
    transport_uri u;
    (void)state;

    parse_ok("tcp:127.0.0.1:4444", &u);
    assert_int_equal(u.kind, URI_TCP);
    assert_string_equal(u.host, "127.0.0.1");
    assert_string_equal(u.port, "4444");

    parse_ok("tcp:localhost:0", &u);
    assert_string_equal(u.host, "localhost");
    assert_string_equal(u.port, "0");

    parse_ok("tcp:[::1]:65535", &u);
    assert_string_equal(u.host, "::1");
    assert_string_equal(u.port, "65535");

    parse_ok("tcp::080", &u);           /* any address; port canonicalised */
    assert_string_equal(u.host, "");
    assert_string_equal(u.port, "80");

    parse_ok("unix:/run/x.sock", &u);
    assert_int_equal(u.kind, URI_UNIX);
    assert_string_equal(u.path, "/run/x.sock");

    parse_ok("fd:7", &u);
    assert_int_equal(u.kind, URI_FD);
    assert_int_equal(u.fd, 7);

    parse_ok("exec:cat > /tmp/f, x:y", &u);
    assert_int_equal(u.kind, URI_EXEC);
    assert_string_equal(u.cmd, "cat > /tmp/f, x:y");

    parse_ok("file:/tmp/f", &u);
    assert_int_equal(u.kind, URI_FILE);
    assert_string_equal(u.path, "/tmp/f");
    assert_int_equal(u.offset, 0);

    parse_ok("file:/tmp/f,offset=4096", &u);
    assert_string_equal(u.path, "/tmp/f");
    assert_int_equal(u.offset, 4096);

    parse_ok("file:/tmp/a,b", &u);      /* a comma that is not an option */
    assert_string_equal(u.path, "/tmp/a,b");
    assert_int_equal(u.offset, 0);
}

static void test_parse_bad(void **state)
{
    static const struct {
        const char *uri;
        const char *word;
    } cases[] = {
        { "foo", "unknown transport (expected tcp:, unix:, fd:, exec: or file:)" },
        { "", "unknown transport" },
        { "TCP:1.2.3.4:5", "unknown transport" },
        { "tcp:1.2.3.4", "expected tcp:HOST:PORT" },
        { "tcp:1.2.3.4:", "invalid port" },
        { "tcp:1.2.3.4:65536", "invalid port '65536'" },
        { "tcp:1.2.3.4:-1", "invalid port" },
        { "tcp:1.2.3.4:12a", "invalid port" },
        { "tcp:1.2.3.4:99999999999999999999999", "invalid port" },
        { "tcp:::1:4444", "brackets" },
        { "tcp:[::1:4444", "missing ']'" },
        { "tcp:[::1]4444", "expected ':PORT'" },
        { "tcp:[]:4444", "empty IPv6" },
        { "unix:", "empty socket path" },
        { "fd:", "invalid file descriptor number" },
        { "fd:abc", "invalid file descriptor number 'abc'" },
        { "fd:-1", "invalid file descriptor number" },
        { "fd:99999999999", "invalid file descriptor number" },
        { "exec:", "empty command" },
        { "file:", "empty file path" },
        { "file:,offset=5", "empty file path" },
        { "file:/x,offset=abc", "invalid offset 'abc'" },
        { "file:/x,offset=", "invalid offset" },
        { "file:/x,offset=-1", "invalid offset" },
        { "file:/x,offset=99999999999999999999", "invalid offset" },
    };
    char longunix[300], longhost[400], expect[400];
    lm_error err;
    transport_uri u;
    size_t i;
    (void)state;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        memset(&err, 0, sizeof(err));
        if (transport_uri_parse(cases[i].uri, &u, &err) != -EINVAL)
            fail_msg("'%s' parsed", cases[i].uri);
        assert_int_equal(err.code, -EINVAL);
        snprintf(expect, sizeof(expect), "bad migration URI '%s': ", cases[i].uri);
        assert_msg_has(&err, expect, cases[i].word, NULL);
    }

    /* sun_path holds 107 bytes and the NUL */
    memset(longunix, 0, sizeof(longunix));
    memcpy(longunix, "unix:/", 6);
    memset(longunix + 6, 'a', 107 - 1);
    parse_ok(longunix, &u);
    assert_int_equal(strlen(u.path), 107);
    longunix[5 + 108 - 1] = 'b';         /* 108 bytes: no room for the NUL */
    memset(&err, 0, sizeof(err));
    assert_int_equal(transport_uri_parse(longunix, &u, &err), -EINVAL);
    assert_msg_has(&err, "unix path too long", "108 bytes", NULL);

    memset(longhost, 'h', sizeof(longhost));
    memcpy(longhost, "tcp:", 4);
    memcpy(longhost + sizeof(longhost) - 4, ":80", 4);
    memset(&err, 0, sizeof(err));
    assert_int_equal(transport_uri_parse(longhost, &u, &err), -EINVAL);
    assert_msg_has(&err, "host name too long", NULL);

    memset(&err, 0, sizeof(err));
    assert_int_equal(transport_uri_parse(NULL, &u, &err), -EINVAL);
    assert_msg_has(&err, "bad migration URI", NULL);
}

/* ---------------------------------------------------------------- tcp */

static void check_tcp_pair(transport_conn *out, transport_conn *in)
{
    int nodelay = 0;
    socklen_t len = sizeof(nodelay);

    assert_true(out->is_socket && in->is_socket);
    assert_false(out->seekable || in->seekable);
    assert_int_equal(out->child, 0);
    assert_true(is_cloexec(out->fd) && is_cloexec(in->fd));
    assert_int_equal(fcntl(out->fd, F_GETFL) & O_NONBLOCK, 0);
    assert_int_equal(fcntl(in->fd, F_GETFL) & O_NONBLOCK, 0);
    assert_int_equal(getsockopt(out->fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &len), 0);
    assert_int_not_equal(nodelay, 0);
    ping_pong(out->fd, in->fd);
}

static void test_tcp_v4(void **state)
{
    transport_listener l;
    transport_conn out, in;
    lm_error err = { 0 };
    transport_uri u;
    char uri[64];
    (void)state;

    open_pair("tcp:127.0.0.1:0", &l, &out, &in);
    assert_true(strncmp(l.address, "tcp:127.0.0.1:", 14) == 0);
    assert_true(atoi(l.address + 14) > 0);
    assert_string_equal(l.uri.port, l.address + 14);
    assert_string_equal(out.peer, l.address);
    assert_true(strncmp(in.peer, "tcp:127.0.0.1:", 14) == 0);
    check_tcp_pair(&out, &in);

    /* closing the source gives EOF at the destination */
    assert_int_equal(conn_close(&out, &err), 0);
    assert_int_equal(out.fd, -1);
    {
        char buf[4];
        assert_int_equal(read_to_eof(in.fd, buf, sizeof(buf)), 0);
    }
    assert_int_equal(conn_close(&in, &err), 0);
    assert_int_equal(conn_close(&in, &err), 0);       /* twice is harmless */

    /* a host name works too */
    snprintf(uri, sizeof(uri), "tcp:localhost:%s", l.uri.port);
    parse_ok(uri, &u);
    if (transport_connect(&u, &out, -1, IO_TIMEOUT_MS, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(transport_accept(&l, &in, -1, IO_TIMEOUT_MS, &err), 0);
    ping_pong(out.fd, in.fd);
    assert_int_equal(conn_close(&out, &err), 0);
    assert_int_equal(conn_close(&in, &err), 0);

    transport_unlisten(&l);
    assert_int_equal(l.fd, -1);
    transport_unlisten(&l);
}

static void test_tcp_v6(void **state)
{
    transport_listener l;
    transport_conn out, in;
    lm_error err = { 0 };
    transport_uri u;
    int r;
    (void)state;

    parse_ok("tcp:[::1]:0", &u);
    r = transport_listen(&u, &l, &err);
    if (r == -EADDRNOTAVAIL || r == -EAFNOSUPPORT || r == -EHOSTUNREACH) {
        print_message("# ::1 unavailable (%s), skipping\n", err.msg);
        skip();
    }
    if (r != 0)
        fail_msg("%s", err.msg);
    assert_true(strncmp(l.address, "tcp:[::1]:", 10) == 0);
    assert_true(atoi(l.address + 10) > 0);

    parse_ok(l.address, &u);
    assert_string_equal(u.host, "::1");
    if (transport_connect(&u, &out, -1, IO_TIMEOUT_MS, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(transport_accept(&l, &in, -1, IO_TIMEOUT_MS, &err), 0);
    assert_string_equal(out.peer, l.address);
    assert_true(strncmp(in.peer, "tcp:[::1]:", 10) == 0);
    check_tcp_pair(&out, &in);
    assert_int_equal(conn_close(&out, &err), 0);
    assert_int_equal(conn_close(&in, &err), 0);
    transport_unlisten(&l);
}

static void test_tcp_address_in_use(void **state)
{
    transport_listener l, l2;
    lm_error err = { 0 };
    transport_uri u;
    char expect[256];
    (void)state;

    parse_ok("tcp:127.0.0.1:0", &u);
    assert_int_equal(transport_listen(&u, &l, &err), 0);
    parse_ok(l.address, &u);
    assert_int_equal(transport_listen(&u, &l2, &err), -EADDRINUSE);
    assert_int_equal(l2.fd, -1);
    snprintf(expect, sizeof(expect), "%s: bind: Address already in use", l.address);
    assert_msg_has(&err, expect, NULL);
    transport_unlisten(&l2);
    transport_unlisten(&l);
}

static void test_tcp_refused(void **state)
{
    struct sockaddr_in sa = { .sin_family = AF_INET,
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(sa);
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    char uri[64], expect[256];
    int s;
    (void)state;

    /* A port that is bound but not listening: nobody else can take it. */
    s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    assert_int_equal(bind(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&sa, &len), 0);
    snprintf(uri, sizeof(uri), "tcp:127.0.0.1:%u", ntohs(sa.sin_port));
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err),
                     -ECONNREFUSED);
    assert_int_equal(c.fd, -1);
    snprintf(expect, sizeof(expect), "%s: connect: Connection refused", uri);
    assert_msg_has(&err, expect, NULL);
    assert_int_equal(conn_close(&c, &err), 0);
    close(s);
}

/*
 * A listener with backlog 0 that nobody accepts from: once its queue is
 * full the kernel drops further SYNs, so a new connect stays pending.
 * Returns the listener and fills fillers[].
 */
static int full_listener(char *uri, size_t urilen, int *fillers, int nfill)
{
    struct sockaddr_in sa = { .sin_family = AF_INET,
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(sa);
    int s, i;

    s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    assert_int_equal(bind(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(s, 0), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&sa, &len), 0);
    snprintf(uri, urilen, "tcp:127.0.0.1:%u", ntohs(sa.sin_port));
    for (i = 0; i < nfill; i++) {
        fillers[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        assert_true(fillers[i] >= 0);
        (void)connect(fillers[i], (struct sockaddr *)&sa, sizeof(sa));
    }
    return s;
}

static void test_tcp_connect_timeout(void **state)
{
    int fillers[4], s, i;
    char uri[64], expect[256];
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    int64_t t0, dt;
    (void)state;

    s = full_listener(uri, sizeof(uri), fillers, 4);
    parse_ok(uri, &u);
    t0 = time_now_ms();
    assert_int_equal(transport_connect(&u, &c, -1, 200, &err), -ETIMEDOUT);
    dt = time_now_ms() - t0;
    assert_true(dt >= 190 && dt < 5000);
    snprintf(expect, sizeof(expect), "%s: connect: timed out after 200 ms", uri);
    assert_msg_has(&err, expect, NULL);
    assert_int_equal(c.fd, -1);
    for (i = 0; i < 4; i++)
        close(fillers[i]);
    close(s);
}

static void test_tcp_connect_cancel(void **state)
{
    struct canceller k;
    int fillers[4], s, i;
    char uri[64];
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    int64_t t0, dt;
    (void)state;

    s = full_listener(uri, sizeof(uri), fillers, 4);
    parse_ok(uri, &u);
    canceller_start(&k, 50);
    t0 = time_now_ms();
    assert_int_equal(transport_connect(&u, &c, k.efd, 20000, &err), -ECANCELED);
    dt = time_now_ms() - t0;
    assert_true(dt < 5000);
    assert_msg_has(&err, uri, "connect: cancelled", NULL);
    canceller_join(&k);
    for (i = 0; i < 4; i++)
        close(fillers[i]);
    close(s);
}

static void test_accept_cancel(void **state)
{
    struct canceller k;
    transport_listener l;
    transport_conn c;
    lm_error err = { 0 };
    transport_uri u;
    int64_t t0, dt;
    uint64_t one = 1;
    (void)state;

    parse_ok("tcp:127.0.0.1:0", &u);
    assert_int_equal(transport_listen(&u, &l, &err), 0);

    /* cancelled while blocked */
    canceller_start(&k, 50);
    t0 = time_now_ms();
    assert_int_equal(transport_accept(&l, &c, k.efd, 20000, &err), -ECANCELED);
    dt = time_now_ms() - t0;
    assert_true(dt < 5000);
    assert_msg_has(&err, l.address, "accept: cancelled", NULL);
    assert_int_equal(c.fd, -1);
    canceller_join(&k);

    /* cancelled before, with no limit: returns at once, and wins over a
     * connection that is already waiting */
    k.efd = eventfd(0, EFD_CLOEXEC);
    assert_true(k.efd >= 0);
    assert_int_equal(write(k.efd, &one, sizeof(one)), (ssize_t)sizeof(one));
    {
        transport_conn out;
        transport_uri cu;
        parse_ok(l.address, &cu);
        assert_int_equal(transport_connect(&cu, &out, -1, IO_TIMEOUT_MS, &err), 0);
        assert_int_equal(transport_accept(&l, &c, k.efd, -1, &err), -ECANCELED);
        /* and without the cancel the same connection is accepted */
        assert_int_equal(transport_accept(&l, &c, -1, IO_TIMEOUT_MS, &err), 0);
        ping_pong(out.fd, c.fd);
        assert_int_equal(conn_close(&out, &err), 0);
        assert_int_equal(conn_close(&c, &err), 0);
    }
    close(k.efd);
    transport_unlisten(&l);
}

static void test_accept_timeout(void **state)
{
    transport_listener l;
    transport_conn c;
    lm_error err = { 0 };
    transport_uri u;
    int64_t t0, dt;
    char path[300], uri[320];
    (void)state;

    parse_ok("tcp:127.0.0.1:0", &u);
    assert_int_equal(transport_listen(&u, &l, &err), 0);
    t0 = time_now_ms();
    assert_int_equal(transport_accept(&l, &c, -1, 100, &err), -ETIMEDOUT);
    dt = time_now_ms() - t0;
    assert_true(dt >= 95 && dt < 5000);
    assert_msg_has(&err, l.address, "accept: timed out after 100 ms", NULL);
    transport_unlisten(&l);

    /* zero means "only if one is already waiting" */
    tmp_path(path, sizeof(path), "to.sock");
    snprintf(uri, sizeof(uri), "unix:%s", path);
    parse_ok(uri, &u);
    assert_int_equal(transport_listen(&u, &l, &err), 0);
    assert_int_equal(transport_accept(&l, &c, -1, 0, &err), -ETIMEDOUT);
    transport_unlisten(&l);
}

/* conn_shutdown wakes a thread blocked reading the connection. */
struct blocked_reader {
    pthread_t thread;
    int fd;
    ssize_t result;
};

static void *blocked_reader_main(void *arg)
{
    struct blocked_reader *b = arg;
    char c;
    b->result = read(b->fd, &c, 1);
    return NULL;
}

static void shutdown_wakes_reader(transport_conn *c)
{
    struct blocked_reader b = { .fd = c->fd, .result = -2 };
    struct timespec ts;

    assert_int_equal(pthread_create(&b.thread, NULL, blocked_reader_main, &b), 0);
    conn_shutdown(c);
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    assert_int_equal(pthread_timedjoin_np(b.thread, NULL, &ts), 0);
    assert_int_equal(b.result, 0);
}

static void test_conn_shutdown(void **state)
{
    transport_listener l;
    transport_conn out, in;
    lm_error err = { 0 };
    transport_uri u;
    (void)state;

    open_pair("tcp:127.0.0.1:0", &l, &out, &in);
    shutdown_wakes_reader(&in);
    assert_int_equal(conn_close(&in, &err), 0);
    assert_int_equal(conn_close(&out, &err), 0);
    transport_unlisten(&l);

    /* exec: too (a command that never writes back to us) */
    parse_ok("exec:cat > /dev/null", &u);
    assert_int_equal(transport_connect(&u, &out, -1, IO_TIMEOUT_MS, &err), 0);
    shutdown_wakes_reader(&out);
    if (conn_close(&out, &err) != 0)
        fail_msg("%s", err.msg);
}

/* ---------------------------------------------------------------- unix */

static void test_unix(void **state)
{
    char path[300], uri[320];
    struct stat st;
    transport_listener l;
    transport_conn out, in;
    lm_error err = { 0 };
    (void)state;

    tmp_path(path, sizeof(path), "a.sock");
    snprintf(uri, sizeof(uri), "unix:%s", path);
    open_pair(uri, &l, &out, &in);
    assert_string_equal(l.address, uri);
    assert_true(out.is_socket && in.is_socket);
    assert_true(is_cloexec(out.fd) && is_cloexec(in.fd) && is_cloexec(l.fd));
    assert_int_equal(fcntl(out.fd, F_GETFL) & O_NONBLOCK, 0);
    assert_int_equal(fcntl(in.fd, F_GETFL) & O_NONBLOCK, 0);
    ping_pong(out.fd, in.fd);
    assert_int_equal(conn_close(&out, &err), 0);
    assert_int_equal(conn_close(&in, &err), 0);

    assert_int_equal(lstat(path, &st), 0);
    transport_unlisten(&l);
    assert_int_equal(lstat(path, &st), -1);
    assert_int_equal(errno, ENOENT);
}

static void test_unix_connect_missing(void **state)
{
    char path[300], uri[320];
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    (void)state;

    tmp_path(path, sizeof(path), "nobody.sock");
    snprintf(uri, sizeof(uri), "unix:%s", path);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), -ENOENT);
    assert_msg_has(&err, uri, "connect: No such file or directory", NULL);
}

static void test_unix_stale_and_live(void **state)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    char path[300], uri[320], buf[8];
    struct stat st;
    transport_listener l, l2;
    transport_conn out, in;
    lm_error err = { 0 };
    transport_uri u;
    size_t n;
    int s;
    (void)state;

    tmp_path(path, sizeof(path), "stale.sock");
    snprintf(uri, sizeof(uri), "unix:%s", path);

    /* a socket file left behind by a process that is gone */
    s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    strcpy(sa.sun_path, path);
    assert_int_equal(bind(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(s);
    assert_int_equal(lstat(path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));

    open_pair(uri, &l, &out, &in);
    ping_pong(out.fd, in.fd);
    assert_int_equal(conn_close(&out, &err), 0);
    assert_int_equal(conn_close(&in, &err), 0);

    /* a live one is refused and left alone */
    parse_ok(uri, &u);
    assert_int_equal(transport_listen(&u, &l2, &err), -EADDRINUSE);
    assert_msg_has(&err, uri, "Address already in use", "listening", NULL);
    assert_int_equal(l2.fd, -1);
    assert_int_equal(transport_connect(&u, &out, -1, IO_TIMEOUT_MS, &err), 0);
    /* the probe of the refused listen arrives first: it closes at once */
    assert_int_equal(transport_accept(&l, &in, -1, IO_TIMEOUT_MS, &err), 0);
    assert_int_equal(read_to_eof(in.fd, buf, sizeof(buf)), 0);
    assert_int_equal(conn_close(&in, &err), 0);
    assert_int_equal(transport_accept(&l, &in, -1, IO_TIMEOUT_MS, &err), 0);
    ping_pong(out.fd, in.fd);
    assert_int_equal(conn_close(&out, &err), 0);
    assert_int_equal(conn_close(&in, &err), 0);
    transport_unlisten(&l);

    /* a regular file in the way is never removed */
    spit_file(path, "keep");
    assert_int_equal(transport_listen(&u, &l2, &err), -EADDRINUSE);
    assert_msg_has(&err, uri, "Address already in use", "not a socket", NULL);
    slurp_file(path, buf, sizeof(buf), &n);
    assert_int_equal(n, 4);
    assert_memory_equal(buf, "keep", 4);
}

/* ---------------------------------------------------------------- fd: */

static void test_fd(void **state)
{
    int sv[2], bad;
    char uri[32], path[300];
    transport_listener l;
    transport_conn c;
    lm_error err = { 0 };
    transport_uri u;
    (void)state;

    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    assert_int_equal(fcntl(sv[0], F_SETFL, O_NONBLOCK), 0);
    snprintf(uri, sizeof(uri), "fd:%d", sv[0]);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_true(c.fd >= 3 && c.fd != sv[0]);
    assert_true(c.is_socket);
    assert_false(c.seekable);
    assert_true(is_cloexec(c.fd));
    assert_int_equal(fcntl(c.fd, F_GETFL) & O_NONBLOCK, 0);   /* made blocking */
    assert_string_equal(c.peer, uri);
    ping_pong(c.fd, sv[1]);
    assert_int_equal(conn_close(&c, &err), 0);
    assert_true(fcntl(sv[0], F_GETFD) >= 0);     /* the caller keeps its own */

    /* incoming: accept hands out a dup as well */
    assert_int_equal(transport_listen(&u, &l, &err), 0);
    assert_int_equal(l.fd, -1);
    assert_string_equal(l.address, uri);
    assert_int_equal(transport_accept(&l, &c, -1, IO_TIMEOUT_MS, &err), 0);
    ping_pong(sv[1], c.fd);
    assert_int_equal(conn_close(&c, &err), 0);
    transport_unlisten(&l);
    close(sv[0]);
    close(sv[1]);

    /* a regular file is seekable and not a socket */
    tmp_path(path, sizeof(path), "fdfile");
    spit_file(path, "x");
    sv[0] = open(path, O_RDWR | O_CLOEXEC);
    assert_true(sv[0] >= 0);
    snprintf(uri, sizeof(uri), "fd:%d", sv[0]);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_false(c.is_socket);
    assert_true(c.seekable);
    assert_int_equal(conn_close(&c, &err), 0);
    close(sv[0]);

    /* wrong direction */
    assert_int_equal(pipe2(sv, O_CLOEXEC), 0);
    snprintf(uri, sizeof(uri), "fd:%d", sv[0]);   /* read end */
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), -EBADF);
    assert_msg_has(&err, uri, "not open for writing", NULL);
    snprintf(uri, sizeof(uri), "fd:%d", sv[1]);   /* write end */
    parse_ok(uri, &u);
    assert_int_equal(transport_listen(&u, &l, &err), -EBADF);
    assert_msg_has(&err, uri, "not open for reading", NULL);
    close(sv[0]);
    close(sv[1]);

    /* not open at all: reported by connect and already by listen */
    bad = closed_fd();
    snprintf(uri, sizeof(uri), "fd:%d", bad);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), -EBADF);
    assert_msg_has(&err, uri, ": Bad file descriptor", NULL);
    assert_int_equal(c.fd, -1);
    memset(&err, 0, sizeof(err));
    assert_int_equal(transport_listen(&u, &l, &err), -EBADF);
    assert_msg_has(&err, uri, ": Bad file descriptor", NULL);
}

/* ---------------------------------------------------------------- exec: */

static void test_exec_out(void **state)
{
    char path[300], uri[400], buf[64];
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    size_t n;
    (void)state;

    tmp_path(path, sizeof(path), "exec-out");
    snprintf(uri, sizeof(uri), "exec:cat > '%s'", path);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_true(c.child > 0);
    assert_false(c.is_socket);        /* no return path over a command */
    assert_false(c.seekable);
    assert_true(is_cloexec(c.fd));
    assert_string_equal(c.peer, uri);
    write_all(c.fd, "hello, exec", 11);
    if (conn_close(&c, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(c.child, 0);
    assert_int_equal(c.fd, -1);
    slurp_file(path, buf, sizeof(buf), &n);
    assert_int_equal(n, 11);
    assert_memory_equal(buf, "hello, exec", 11);
}

static void test_exec_in(void **state)
{
    char buf[64];
    transport_listener l;
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    (void)state;

    parse_ok("exec:printf abc", &u);
    assert_int_equal(transport_listen(&u, &l, &err), 0);
    assert_int_equal(l.fd, -1);
    assert_string_equal(l.address, "exec:printf abc");
    assert_int_equal(transport_accept(&l, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_true(c.child > 0);
    assert_int_equal(read_to_eof(c.fd, buf, sizeof(buf)), 3);
    assert_memory_equal(buf, "abc", 3);
    if (conn_close(&c, &err) != 0)
        fail_msg("%s", err.msg);
    transport_unlisten(&l);
}

static void test_exec_fail(void **state)
{
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    (void)state;

    parse_ok("exec:exit 3", &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_int_equal(conn_close(&c, &err), -EIO);
    assert_msg_has(&err, "exec:exit 3 exited with status 3", NULL);
    assert_int_equal(c.child, 0);
    memset(&err, 0, sizeof(err));
    assert_int_equal(conn_close(&c, &err), 0);        /* already reaped */

    parse_ok("exec:kill -TERM $$", &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_int_equal(conn_close(&c, &err), -EIO);
    assert_msg_has(&err, "exec:kill -TERM $$ was killed by signal 15", NULL);

    /* a command that is gone: EOF when reading, EPIPE when writing */
    parse_ok("exec:true", &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    {
        struct pollfd pf = { .fd = c.fd, .events = POLLIN };
        char x;
        /* the child closing its end shows here as EOF */
        assert_int_equal(poll(&pf, 1, IO_TIMEOUT_MS), 1);
        assert_int_equal(recv(c.fd, &x, 1, 0), 0);
        assert_int_equal(send(c.fd, "x", 1, MSG_NOSIGNAL), -1);
        assert_int_equal(errno, EPIPE);
    }
    assert_int_equal(conn_close(&c, &err), 0);
}

/*
 * A command that ignores EOF is killed, with what it started, 10 s after
 * close.  The grandchild holds the write end of a FIFO (after writing one
 * byte, so we know it has it); the FIFO reports hang-up only once every
 * writer is dead.
 */
static void test_exec_hung(void **state)
{
    char fifo[300], uri[400], x;
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    int64_t t0, dt;
    struct pollfd pf;
    int rd;
    (void)state;

    tmp_path(fifo, sizeof(fifo), "hung.fifo");
    assert_int_equal(mkfifo(fifo, 0600), 0);
    rd = open(fifo, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    assert_true(rd >= 0);
    snprintf(uri, sizeof(uri), "exec:{ printf x; exec sleep 60; } > '%s' & wait", fifo);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    read_exact(rd, &x, 1);
    assert_int_equal(x, 'x');

    t0 = time_now_ms();
    assert_int_equal(conn_close(&c, &err), -ETIMEDOUT);
    dt = time_now_ms() - t0;
    assert_true(dt >= 9900 && dt < 15000);
    assert_msg_has(&err, uri, "did not exit within 10 s", "killed", NULL);
    assert_int_equal(c.child, 0);

    pf = (struct pollfd){ .fd = rd, .events = POLLIN };
    assert_int_equal(poll(&pf, 1, IO_TIMEOUT_MS), 1);
    assert_true(pf.revents & POLLHUP);
    assert_int_equal(read(rd, &x, 1), 0);
    close(rd);
}

/* ---------------------------------------------------------------- file: */

static void test_file(void **state)
{
    char path[300], uri[400], buf[64];
    transport_listener l;
    lm_error err = { 0 };
    transport_conn c;
    transport_uri u;
    size_t n;
    struct stat st;
    (void)state;

    tmp_path(path, sizeof(path), "stream.bin");
    spit_file(path, "old contents that must go away");
    snprintf(uri, sizeof(uri), "file:%s", path);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_true(c.seekable);
    assert_false(c.is_socket);
    assert_true(is_cloexec(c.fd));
    assert_int_equal(fcntl(c.fd, F_GETFL) & O_NONBLOCK, 0);
    write_all(c.fd, "0123456789", 10);
    assert_int_equal(conn_close(&c, &err), 0);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_size, 10);             /* truncated */
    assert_int_equal(st.st_mode & 0777, 0600);

    assert_int_equal(transport_listen(&u, &l, &err), 0);
    assert_int_equal(transport_accept(&l, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_true(c.seekable);
    assert_int_equal(read_to_eof(c.fd, buf, sizeof(buf)), 10);
    assert_memory_equal(buf, "0123456789", 10);
    assert_int_equal(conn_close(&c, &err), 0);
    transport_unlisten(&l);

    /* with an offset: write in place, read from there */
    snprintf(uri, sizeof(uri), "file:%s,offset=4", path);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), 0);
    write_all(c.fd, "ab", 2);
    assert_int_equal(conn_close(&c, &err), 0);
    slurp_file(path, buf, sizeof(buf), &n);
    assert_int_equal(n, 10);
    assert_memory_equal(buf, "0123ab6789", 10);

    assert_int_equal(transport_listen(&u, &l, &err), 0);
    assert_int_equal(transport_accept(&l, &c, -1, IO_TIMEOUT_MS, &err), 0);
    assert_int_equal(read_to_eof(c.fd, buf, sizeof(buf)), 6);
    assert_memory_equal(buf, "ab6789", 6);
    assert_int_equal(conn_close(&c, &err), 0);
    transport_unlisten(&l);

    /* a missing file is reported when listening */
    tmp_path(path, sizeof(path), "missing.bin");
    snprintf(uri, sizeof(uri), "file:%s", path);
    parse_ok(uri, &u);
    assert_int_equal(transport_listen(&u, &l, &err), -ENOENT);
    assert_msg_has(&err, uri, "No such file or directory", NULL);

    /* a directory is refused when it is opened */
    snprintf(uri, sizeof(uri), "file:%s", tmpdir);
    parse_ok(uri, &u);
    assert_int_equal(transport_listen(&u, &l, &err), 0);
    assert_int_equal(transport_accept(&l, &c, -1, IO_TIMEOUT_MS, &err), -EISDIR);
    assert_msg_has(&err, uri, "Is a directory", NULL);
    assert_int_equal(c.fd, -1);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), -EISDIR);
    transport_unlisten(&l);

    /* an output directory that does not exist */
    tmp_path(path, sizeof(path), "no/such/dir");
    snprintf(uri, sizeof(uri), "file:%s", path);
    parse_ok(uri, &u);
    assert_int_equal(transport_connect(&u, &c, -1, IO_TIMEOUT_MS, &err), -ENOENT);
    assert_msg_has(&err, uri, "open: No such file or directory", NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_good),
        cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_tcp_v4),
        cmocka_unit_test(test_tcp_v6),
        cmocka_unit_test(test_tcp_address_in_use),
        cmocka_unit_test(test_tcp_refused),
        cmocka_unit_test(test_tcp_connect_timeout),
        cmocka_unit_test(test_tcp_connect_cancel),
        cmocka_unit_test(test_accept_cancel),
        cmocka_unit_test(test_accept_timeout),
        cmocka_unit_test(test_conn_shutdown),
        cmocka_unit_test(test_unix),
        cmocka_unit_test(test_unix_connect_missing),
        cmocka_unit_test(test_unix_stale_and_live),
        cmocka_unit_test(test_fd),
        cmocka_unit_test(test_exec_out),
        cmocka_unit_test(test_exec_in),
        cmocka_unit_test(test_exec_fail),
        cmocka_unit_test(test_exec_hung),
        cmocka_unit_test(test_file),
    };
    return cmocka_run_group_tests(tests, setup_tmpdir, teardown_tmpdir);
}
