/*
 * mcopy -- the machine's own N-stream TCP ceiling, for bench/multifd.
 *
 * bench/multifd reports livemig's multifd throughput as a ratio to what a
 * plain program reaches with the same number of connections on the same
 * link in the same run.  This is that program: N TCP connections between
 * two processes, one thread per connection on each side, no framing, no
 * copies beyond the kernel's.
 *
 *   mcopy recv HOST N [SPAN]       listen on HOST (port chosen by the
 *                                  kernel), print "port P", accept N
 *                                  connections and read each to EOF into
 *                                  its own 1 MiB buffer
 *   mcopy send HOST PORT N BYTES [SPAN]
 *                                  open N connections and write BYTES in
 *                                  total (split evenly, the remainder on
 *                                  the first) in 1 MiB write() calls, then
 *                                  half-close each and wait for the
 *                                  receiver's EOF
 *
 * SPAN (bytes, both sides): each stream's buffer is SPAN / N bytes instead
 * of 1 MiB, and successive calls walk through it (wrapping), so the bytes
 * come from and go to main memory as a migration's do, not from a buffer
 * that stays in the CPU's cache.  Without SPAN this is the cache-hot
 * ceiling the targets are stated against; with SPAN = the guest
 * size it is a memory-to-memory copy of the same bytes.
 *
 * Every buffer is written in full before the clock starts, so no side pays
 * first-touch page faults inside the measurement.  The receiver's time runs
 * from its first accept() to the last EOF, the sender's from before its
 * first connect() to the last receiver close, so each covers the whole
 * transfer.  Each prints one JSON line: {"role", "streams", "bytes",
 * "seconds", "cpu_seconds"} (CPU from getrusage: every thread, user +
 * system).
 *
 * Threads: main accepts (recv) or connects (send) and then joins; stream
 * thread i owns connection i and buffer i and reports its byte count and
 * status through its own slot, read by main after the join.  Every
 * blocking call waits at most IO_TIMEOUT_MS (poll), so a dead peer ends
 * the program with an error instead of hanging the benchmark.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1u << 20)
#define IO_TIMEOUT_MS 30000
#define MAX_STREAMS 64

typedef struct stream {
    int fd;
    size_t span;                /* this stream's buffer size */
    unsigned char *buf;         /* filled by main before the clock starts */
    uint64_t bytes;             /* send: to write; recv: read so far */
    int failed;                 /* set by the thread, read after join */
    pthread_t thread;
} stream;

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* A buffer of `len` bytes (a multiple of BLOCK) with every byte written
 * (so every page is populated). */
static unsigned char *block_new(size_t len)
{
    unsigned char *b = aligned_alloc(4096, len);
    uint64_t x = 0x9e3779b97f4a7c15ull;

    if (!b) {
        fprintf(stderr, "mcopy: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < len; i += sizeof(x)) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(b + i, &x, sizeof(x));
    }
    return b;
}

/* Wait for `events` on fd; 0 when ready, -1 (message printed) otherwise. */
static int wait_fd(int fd, short events, const char *what)
{
    struct pollfd p = { .fd = fd, .events = events };

    for (;;) {
        int n = poll(&p, 1, IO_TIMEOUT_MS);

        if (n > 0)
            return 0;
        if (n == 0) {
            fprintf(stderr, "mcopy: %s: no progress for %d ms\n", what, IO_TIMEOUT_MS);
            return -1;
        }
        if (errno != EINTR) {
            fprintf(stderr, "mcopy: %s: poll: %s\n", what, strerror(errno));
            return -1;
        }
    }
}

static struct addrinfo *resolve(const char *host, const char *port, int passive)
{
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC };
    struct addrinfo *res = NULL;
    int rc;

    if (passive)
        hints.ai_flags = AI_PASSIVE;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "mcopy: %s:%s: %s\n", host, port, gai_strerror(rc));
        return NULL;
    }
    return res;
}

static void report(const char *role, int n, uint64_t bytes, double secs, double cpu)
{
    printf("{\"role\": \"%s\", \"streams\": %d, \"bytes\": %llu, \"seconds\": %.6f, "
           "\"cpu_seconds\": %.3f}\n", role, n, (unsigned long long)bytes, secs, cpu);
    fflush(stdout);
}

static void *recv_thread(void *arg)
{
    stream *st = arg;
    unsigned char *buf = st->buf;
    size_t at = 0;

    for (;;) {
        ssize_t r;

        if (wait_fd(st->fd, POLLIN, "read") < 0)
            goto fail;
        if (at + BLOCK > st->span)
            at = 0;
        r = read(st->fd, buf + at, BLOCK);
        if (r == 0)
            break;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "mcopy: read: %s\n", strerror(errno));
            goto fail;
        }
        st->bytes += (uint64_t)r;
        at += (size_t)r;
    }
    return NULL;
fail:
    st->failed = 1;
    return NULL;
}

static void *send_thread(void *arg)
{
    stream *st = arg;
    unsigned char *buf = st->buf;
    uint64_t left = st->bytes;
    size_t at = 0;
    char tail;

    while (left > 0) {
        size_t len = left < BLOCK ? (size_t)left : BLOCK;
        ssize_t w;

        if (wait_fd(st->fd, POLLOUT, "write") < 0)
            goto fail;
        if (at + len > st->span)
            at = 0;
        w = send(st->fd, buf + at, len, MSG_NOSIGNAL);   /* EPIPE, not SIGPIPE */
        if (w < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "mcopy: send: %s\n", strerror(errno));
            goto fail;
        }
        left -= (uint64_t)w;
        at += (size_t)w;
    }
    /* This stream is over when the receiver has read everything and closed. */
    if (shutdown(st->fd, SHUT_WR) < 0 || wait_fd(st->fd, POLLIN, "receiver close") < 0 ||
        read(st->fd, &tail, 1) != 0) {
        fprintf(stderr, "mcopy: receiver did not close cleanly\n");
        goto fail;
    }
    return NULL;
fail:
    st->failed = 1;
    return NULL;
}

/* Join the first `started` threads; 0 if none failed. */
static int join_all(stream *st, int started)
{
    int failed = 0;

    for (int i = 0; i < started; i++) {
        pthread_join(st[i].thread, NULL);
        failed |= st[i].failed;
    }
    return failed ? -1 : 0;
}

/*
 * End streams [0, n): shutting the sockets down first makes any thread still
 * running (a failed start) return from its I/O, so the join cannot hang.
 */
static void streams_close(stream *st, int n, int started)
{
    for (int i = 0; i < n; i++)
        if (st[i].fd >= 0)
            shutdown(st[i].fd, SHUT_RDWR);
    join_all(st, started);
    for (int i = 0; i < n; i++) {
        if (st[i].fd >= 0)
            close(st[i].fd);
        free(st[i].buf);
    }
}

static int run_recv(const char *host, int n, size_t span)
{
    struct addrinfo *ai = resolve(host, "0", 1);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    stream st[MAX_STREAMS];
    uint64_t total = 0;
    int ls = -1, rc = 1, port, started = 0, ret;
    double t0 = 0, c0 = 0;

    memset(st, 0, sizeof(st));
    for (int i = 0; i < n; i++) {
        st[i].fd = -1;
        st[i].span = span;
        st[i].buf = block_new(span);
    }
    if (!ai)
        goto out;
    ls = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0 || bind(ls, ai->ai_addr, ai->ai_addrlen) < 0 || listen(ls, n) < 0 ||
        getsockname(ls, (struct sockaddr *)&ss, &sl) < 0) {
        fprintf(stderr, "mcopy: listen on %s: %s\n", host, strerror(errno));
        goto out;
    }
    port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
    printf("port %d\n", port);
    fflush(stdout);
    for (int i = 0; i < n; i++) {
        int err;

        if (wait_fd(ls, POLLIN, "accept") < 0)
            goto out;
        st[i].fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (st[i].fd < 0) {
            fprintf(stderr, "mcopy: accept: %s\n", strerror(errno));
            goto out;
        }
        if (i == 0) {
            t0 = now_s();
            c0 = cpu_s();
        }
        err = pthread_create(&st[i].thread, NULL, recv_thread, &st[i]);
        if (err) {
            fprintf(stderr, "mcopy: pthread_create: %s\n", strerror(err));
            goto out;
        }
        started++;
    }
    ret = join_all(st, started);
    started = 0;
    if (ret == 0) {
        for (int i = 0; i < n; i++)
            total += st[i].bytes;
        report("recv", n, total, now_s() - t0, cpu_s() - c0);
        rc = 0;
    }
out:
    streams_close(st, n, started);
    if (ls >= 0)
        close(ls);
    if (ai)
        freeaddrinfo(ai);
    return rc;
}

static int run_send(const char *host, const char *port, int n, uint64_t bytes, size_t span)
{
    struct addrinfo *ai = resolve(host, port, 0);
    stream st[MAX_STREAMS];
    int rc = 1, started = 0, ret;
    double t0, c0;

    memset(st, 0, sizeof(st));
    for (int i = 0; i < n; i++) {
        st[i].fd = -1;
        st[i].span = span;
        st[i].buf = block_new(span);
        st[i].bytes = bytes / (uint64_t)n + (i == 0 ? bytes % (uint64_t)n : 0);
    }
    if (!ai)
        goto out;
    t0 = now_s();
    c0 = cpu_s();
    for (int i = 0; i < n; i++) {
        int err;

        st[i].fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (st[i].fd < 0 || connect(st[i].fd, ai->ai_addr, ai->ai_addrlen) < 0) {
            fprintf(stderr, "mcopy: connect %s:%s: %s\n", host, port, strerror(errno));
            goto out;
        }
        err = pthread_create(&st[i].thread, NULL, send_thread, &st[i]);
        if (err) {
            fprintf(stderr, "mcopy: pthread_create: %s\n", strerror(err));
            goto out;
        }
        started++;
    }
    ret = join_all(st, started);
    started = 0;
    if (ret == 0) {
        report("send", n, bytes, now_s() - t0, cpu_s() - c0);
        rc = 0;
    }
out:
    streams_close(st, n, started);
    if (ai)
        freeaddrinfo(ai);
    return rc;
}

static int usage(void)
{
    fprintf(stderr, "usage: mcopy recv HOST N [SPAN]\n"
                    "       mcopy send HOST PORT N BYTES [SPAN]\n"
                    "       (1 <= N <= %d)\n", MAX_STREAMS);
    return 2;
}

static int parse_n(const char *s)
{
    char *end;
    long n;

    errno = 0;
    n = strtol(s, &end, 10);
    if (errno || *end || n < 1 || n > MAX_STREAMS)
        return -1;
    return (int)n;
}

/* Each stream's buffer: SPAN / n rounded down to whole blocks, at least one;
 * 0 when the argument is malformed. */
static size_t parse_span(const char *s, int n)
{
    char *end;
    unsigned long long v;

    if (!s)
        return BLOCK;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || *end || v == 0)
        return 0;
    v = v / (unsigned long long)n / BLOCK * BLOCK;
    return v ? (size_t)v : BLOCK;
}

int main(int argc, char **argv)
{
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "recv") == 0) {
        int n = parse_n(argv[3]);
        size_t span = n < 0 ? 0 : parse_span(argc == 5 ? argv[4] : NULL, n);

        return n < 0 || !span ? usage() : run_recv(argv[2], n, span);
    }
    if ((argc == 6 || argc == 7) && strcmp(argv[1], "send") == 0) {
        int n = parse_n(argv[4]);
        size_t span = n < 0 ? 0 : parse_span(argc == 7 ? argv[6] : NULL, n);
        char *end;
        unsigned long long bytes;

        errno = 0;
        bytes = strtoull(argv[5], &end, 10);
        if (n < 0 || !span || errno || *end || bytes == 0)
            return usage();
        return run_send(argv[2], argv[3], n, bytes, span);
    }
    return usage();
}
