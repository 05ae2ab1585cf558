/*
 * tcpcopy -- the machine's own single-stream TCP ceiling, for bench/precopy.
 *
 * bench/precopy reports livemig's migration throughput as a ratio to what a
 * plain program reaches on the same loopback in the same run.  This is that
 * plain program: one TCP connection, two processes, no framing, no copies
 * beyond the kernel's.
 *
 *   tcpcopy recv [HOST]            listen on HOST (default 127.0.0.1), port
 *                                  chosen by the kernel; prints "port N",
 *                                  accepts one connection and reads it to
 *                                  EOF into a 1 MiB buffer
 *   tcpcopy send HOST PORT BYTES   connects and writes BYTES from a 1 MiB
 *                                  buffer in 1 MiB write() calls, then
 *                                  half-closes and waits for the
 *                                  receiver's EOF
 *
 * Both buffers are written in full before the clock starts, so neither side
 * pays first-touch page faults inside the measurement (they cost ~1.5-11 us
 * per page on this machine; see the QEMU baseline's notes).  The receiver's
 * time runs from accept() to EOF, the sender's from connect() to the
 * receiver's close, so each covers the whole transfer.  Each prints one
 * JSON line: {"role", "bytes", "seconds", "cpu_seconds"} (CPU from
 * getrusage, user + system).
 *
 * Every blocking call waits at most IO_TIMEOUT_MS (poll), so a dead peer
 * ends the program with an error instead of hanging the benchmark.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* accept4; meson passes -D_GNU_SOURCE */
#endif
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
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

/* A 1 MiB buffer with every byte written (so every page is populated). */
static unsigned char *block_new(void)
{
    unsigned char *b = aligned_alloc(4096, BLOCK);
    uint64_t x = 0x9e3779b97f4a7c15ull;

    if (!b) {
        fprintf(stderr, "tcpcopy: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < BLOCK; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b[i] = (unsigned char)x;
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
            fprintf(stderr, "tcpcopy: %s: no progress for %d ms\n", what, IO_TIMEOUT_MS);
            return -1;
        }
        if (errno != EINTR) {
            fprintf(stderr, "tcpcopy: %s: poll: %s\n", what, strerror(errno));
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
        fprintf(stderr, "tcpcopy: %s:%s: %s\n", host, port, gai_strerror(rc));
        return NULL;
    }
    return res;
}

static void report(const char *role, uint64_t bytes, double secs, double cpu)
{
    printf("{\"role\": \"%s\", \"bytes\": %llu, \"seconds\": %.6f, \"cpu_seconds\": %.3f}\n",
           role, (unsigned long long)bytes, secs, cpu);
    fflush(stdout);
}

static int run_recv(const char *host)
{
    struct addrinfo *ai = resolve(host, "0", 1);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    unsigned char *buf = block_new();
    uint64_t total = 0;
    int ls = -1, c = -1, rc = 1, port;
    double t0, c0;

    if (!ai)
        goto out;
    ls = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0 || bind(ls, ai->ai_addr, ai->ai_addrlen) < 0 || listen(ls, 1) < 0 ||
        getsockname(ls, (struct sockaddr *)&ss, &sl) < 0) {
        fprintf(stderr, "tcpcopy: listen on %s: %s\n", host, strerror(errno));
        goto out;
    }
    port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
    printf("port %d\n", port);
    fflush(stdout);
    if (wait_fd(ls, POLLIN, "accept") < 0)
        goto out;
    c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) {
        fprintf(stderr, "tcpcopy: accept: %s\n", strerror(errno));
        goto out;
    }
    t0 = now_s();
    c0 = cpu_s();
    for (;;) {
        ssize_t n;

        if (wait_fd(c, POLLIN, "read") < 0)
            goto out;
        n = read(c, buf, BLOCK);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "tcpcopy: read: %s\n", strerror(errno));
            goto out;
        }
        total += (uint64_t)n;
    }
    report("recv", total, now_s() - t0, cpu_s() - c0);
    rc = 0;
out:
    if (c >= 0)
        close(c);
    if (ls >= 0)
        close(ls);
    if (ai)
        freeaddrinfo(ai);
    free(buf);
    return rc;
}

static int run_send(const char *host, const char *port, uint64_t bytes)
{
    struct addrinfo *ai = resolve(host, port, 0);
    unsigned char *buf = block_new();
    uint64_t left = bytes;
    int s = -1, rc = 1;
    double t0, c0;
    char tail;

    if (!ai)
        goto out;
    s = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        fprintf(stderr, "tcpcopy: socket: %s\n", strerror(errno));
        goto out;
    }
    t0 = now_s();
    c0 = cpu_s();
    if (connect(s, ai->ai_addr, ai->ai_addrlen) < 0) {
        fprintf(stderr, "tcpcopy: connect %s:%s: %s\n", host, port, strerror(errno));
        goto out;
    }
    while (left > 0) {
        size_t len = left < BLOCK ? (size_t)left : BLOCK;
        ssize_t n;

        if (wait_fd(s, POLLOUT, "write") < 0)
            goto out;
        n = write(s, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "tcpcopy: write: %s\n", strerror(errno));
            goto out;
        }
        left -= (uint64_t)n;
    }
    /* The transfer is over when the receiver has read everything and closed. */
    if (shutdown(s, SHUT_WR) < 0 || wait_fd(s, POLLIN, "receiver close") < 0 ||
        read(s, &tail, 1) != 0) {
        fprintf(stderr, "tcpcopy: receiver did not close cleanly\n");
        goto out;
    }
    report("send", bytes, now_s() - t0, cpu_s() - c0);
    rc = 0;
out:
    if (s >= 0)
        close(s);
    if (ai)
        freeaddrinfo(ai);
    free(buf);
    return rc;
}

static int usage(void)
{
    fprintf(stderr, "usage: tcpcopy recv [HOST]\n"
                    "       tcpcopy send HOST PORT BYTES\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "recv") == 0 && argc <= 3)
        return run_recv(argc == 3 ? argv[2] : "127.0.0.1");
    if (argc == 5 && strcmp(argv[1], "send") == 0) {
        char *end;
        unsigned long long n;

        errno = 0;
        n = strtoull(argv[4], &end, 10);
        if (errno || *end || n == 0)
            return usage();
        return run_send(argv[2], argv[3], n);
    }
    return usage();
}
