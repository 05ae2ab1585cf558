/*
 * QMP requests: one server (lm_qmp_start on a unix socket in a temporary
 * directory) for the whole run; each input is sent by a fresh client after
 * the greeting, its write end is shut, and the replies are read until the
 * server closes (it does once a client stopped sending and its output is
 * out).  Not closing within 5 s is a hang.  `migrate` and
 * `migrate-incoming` are replaced by a stub that only parses its
 * arguments: a fuzzed URI must not write files or open sockets.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "fuzz_util.h"
#include "livemig/livemig.h"
#include "livemig/qmp.h"

#define WAIT_MS 5000

static char sock_path[108];
static char dir[64];
static lm_mig *mig;
static lm_qmp *qmp;

static int cmd_stub(void *opaque, const char *args_json, char **reply_json, lm_error *err)
{
    json_error_t jerr;
    json_t *v = json_loads(args_json, 0, &jerr);

    if (!v) {
        snprintf(err->msg, sizeof(err->msg), "bad arguments");
        return -EINVAL;
    }
    json_decref(v);
    snprintf(err->msg, sizeof(err->msg), "not in the fuzzer");
    return -ENOTSUP;
}

static void vm_nop(void *opaque)
{
}

static const lm_vm_ops vm_ops = { .stop = vm_nop, .start = vm_nop };

static void cleanup(void)
{
    lm_qmp_stop(qmp);
    lm_free(mig);
    unlink(sock_path);
    rmdir(dir);
}

static void init(void)
{
    lm_error err = { 0 };
    char uri[128];

    snprintf(dir, sizeof(dir), "/tmp/lmfuzz-qmp-XXXXXX");
    if (!mkdtemp(dir))
        abort();
    snprintf(sock_path, sizeof(sock_path), "%s/qmp.sock", dir);
    snprintf(uri, sizeof(uri), "unix:%s", sock_path);
    mig = lm_new();
    lm_set_vm_ops(mig, &vm_ops, NULL);
    qmp = lm_qmp_start(mig, uri, &err);
    if (!qmp) {
        fprintf(stderr, "lm_qmp_start: %s\n", err.msg);
        abort();
    }
    if (lm_qmp_register(qmp, "migrate", cmd_stub, NULL) ||
        lm_qmp_register(qmp, "migrate-incoming", cmd_stub, NULL))
        abort();
    atexit(cleanup);
}

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read until the server closes; abort when it does not within WAIT_MS. */
static void drain(int fd, int64_t deadline, const char *what)
{
    static char buf[65536];

    for (;;) {
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        int64_t left = deadline - now_ms();
        ssize_t n;

        if (left <= 0) {
            fprintf(stderr, "qmp: server still open %d ms after %s\n", WAIT_MS, what);
            abort();
        }
        if (poll(&pfd, 1, (int)left) <= 0)
            continue;
        n = read(fd, buf, sizeof(buf));
        if (n <= 0)
            return;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int64_t deadline;
    size_t done = 0;
    int fd;

    if (!ready) {
        init();
        ready = 1;
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        abort();
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock_path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
        abort();
    deadline = now_ms() + WAIT_MS;
    /* Send while reading, so that replies never fill the socket both ways. */
    while (done < size) {
        struct pollfd pfd = { .fd = fd, .events = POLLIN | POLLOUT };
        static char buf[65536];
        int64_t left = deadline - now_ms();

        if (left <= 0) {
            fprintf(stderr, "qmp: input not taken within %d ms\n", WAIT_MS);
            abort();
        }
        if (poll(&pfd, 1, (int)left) <= 0)
            continue;
        if (pfd.revents & POLLIN) {
            if (read(fd, buf, sizeof(buf)) <= 0)
                break;          /* the server closed on us (limits): fine */
        }
        if (pfd.revents & POLLOUT) {
            ssize_t n = send(fd, data + done, size - done, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    continue;
                break;          /* EPIPE / ECONNRESET: closed on us */
            }
            done += (size_t)n;
        }
        if (pfd.revents & (POLLHUP | POLLERR))
            break;
    }
    shutdown(fd, SHUT_WR);
    drain(fd, now_ms() + WAIT_MS, "the client's end of input");
    close(fd);
    return 0;
}
