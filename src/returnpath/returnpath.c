/*
 * The return path, both ends; see returnpath.h for the design and the
 * thread rules.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "returnpath/returnpath.h"
#include "savevm/wire.h"
#include "util/thread.h"
#include "tls/tls.h"
#include "util/error.h"
#include "util/time.h"

/* ---------------------------------------------------------------- destination */

struct rp_writer {
    int fd;
    struct tls_session *tls;    /* borrowed, like fd; NULL without TLS */
    pthread_mutex_t lock;       /* one whole message at a time */
};

rp_writer *rp_writer_new(int fd)
{
    return rp_writer_new_tls(fd, NULL);
}

rp_writer *rp_writer_new_tls(int fd, struct tls_session *tls)
{
    rp_writer *w = calloc(1, sizeof(*w));

    if (!w)
        abort();
    w->fd = fd;
    w->tls = tls;
    pthread_mutex_init(&w->lock, NULL);
    return w;
}

void rp_writer_free(rp_writer *w)
{
    if (!w)
        return;
    pthread_mutex_destroy(&w->lock);
    free(w);
}

/* Write n bytes whole, under w->lock. */
static int wr_all_locked(rp_writer *w, const uint8_t *p, size_t n)
{
    size_t done = 0;

    while (done < n) {
        struct iovec v = { (void *)(p + done), n - done };
        ssize_t r = w->tls ? tls_io_writev(w->fd, w->tls, &v, 1)
                           : send(w->fd, p + done, n - done, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -EIO;
        done += (size_t)r;
    }
    return 0;
}

int rp_send_tail(rp_writer *w, uint16_t type, const void *data, uint16_t len,
                 const void *tail, size_t tail_len)
{
    uint8_t msg[4 + WIRE_RP_MAX_LEN];
    size_t n;
    int ret;

    if (wire_rp_check(type, len) != WIRE_OK)
        return -EINVAL;             /* a caller's bug; never on the wire */
    /* Only RECV_BITMAP has bytes after the message (reference 6.3). */
    if ((type == WIRE_RP_RECV_BITMAP) != (tail_len > 0))
        return -EINVAL;
    n = wire_rp_encode(msg, sizeof(msg), type, data, len);
    pthread_mutex_lock(&w->lock);
    ret = wr_all_locked(w, msg, n);
    if (!ret && tail_len)
        ret = wr_all_locked(w, tail, tail_len);
    pthread_mutex_unlock(&w->lock);
    return ret;
}

int rp_send(rp_writer *w, uint16_t type, const void *data, uint16_t len)
{
    return rp_send_tail(w, type, data, len, NULL, 0);
}

int rp_send_u32(rp_writer *w, uint16_t type, uint32_t value)
{
    uint8_t be[4] = { (uint8_t)(value >> 24), (uint8_t)(value >> 16), (uint8_t)(value >> 8),
                      (uint8_t)value };

    return rp_send(w, type, be, sizeof(be));
}

/* ---------------------------------------------------------------- source */

struct rp_reader {
    int fd;
    struct tls_session *tls;    /* borrowed; NULL without TLS */
    int stop_fd;                /* eventfd: readable = stop */
    rp_reader_ops ops;
    void *opaque;
    pthread_t thread;

    /* reader thread only */
    uint8_t buf[4 + WIRE_RP_MAX_LEN];
    size_t len;
    /* a RECV_BITMAP's trailer being collected (tail != NULL) */
    uint8_t tail_msg[WIRE_RP_MAX_LEN];
    uint16_t tail_msg_len;
    uint8_t *tail;
    uint64_t tail_need, tail_have;

    /* under lock */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int shut_status;            /* -1 until SHUT arrived */
    lm_error err;               /* the reader's own error; code 0 = none */
    bool ended;                 /* the thread left its loop */
};

/* The reader's one error: kept, waiters woken, the owner told. */
static void rd_fail(rp_reader *r, const lm_error *err)
{
    pthread_mutex_lock(&r->lock);
    r->err = *err;
    if (!r->err.code)
        r->err.code = -EIO;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
    if (r->ops.failed)
        r->ops.failed(r->opaque, err);
}

/*
 * RECV_BITMAP's trailer: move what buf holds of it into r->tail; once it
 * is whole, hand it to ops.bitmap.  0 while more is needed or after the
 * handler took it, a negative errno with err filled.
 */
static int rd_take_tail(rp_reader *r, lm_error *err)
{
    uint64_t n = r->tail_need - r->tail_have;
    int ret;

    if (n > r->len)
        n = r->len;
    memcpy(r->tail + r->tail_have, r->buf, n);
    memmove(r->buf, r->buf + n, r->len - n);
    r->len -= n;
    r->tail_have += n;
    /* The size field says how long the rest is: it must be what this side
     * expects before we wait for that many bytes. */
    if (r->tail_have >= 8 && wire_be64(r->tail) != r->tail_need - 16)
        return error_set(err, -EPROTO, "return path: RECV_BITMAP announces a bitmap of %"
                         PRIu64 " bytes, the block's is %" PRIu64, wire_be64(r->tail),
                         r->tail_need - 16);
    if (r->tail_have < r->tail_need)
        return 0;
    ret = r->ops.bitmap(r->opaque, r->tail_msg, r->tail_msg_len, r->tail, r->tail_need, err);
    free(r->tail);
    r->tail = NULL;
    return ret;
}

/* A RECV_BITMAP message: its trailer is next; how long it is the handler
 * knows from the block it names. */
static int rd_start_tail(rp_reader *r, const uint8_t *data, uint16_t len, lm_error *err)
{
    uint64_t bytes = 0;
    int ret;

    if (!r->ops.bitmap || !r->ops.bitmap_bytes)
        return error_set(err, -EPROTO, "return path: unexpected message type %u (%s)",
                         WIRE_RP_RECV_BITMAP, wire_rp_name(WIRE_RP_RECV_BITMAP));
    ret = r->ops.bitmap_bytes(r->opaque, data, len, &bytes, err);
    if (ret)
        return ret;
    assert(bytes >= 16);
    r->tail = malloc(bytes);
    if (!r->tail)
        return error_set(err, -ENOMEM, "return path: RECV_BITMAP of %" PRIu64 " bytes",
                         bytes);
    memcpy(r->tail_msg, data, len);
    r->tail_msg_len = len;
    r->tail_need = bytes;
    r->tail_have = 0;
    return 0;
}

/* One message from the front of buf: RD_MORE when it is not whole yet,
 * RD_TAKEN, RD_SHUT (the destination's last word), or -1 with err. */
enum { RD_TAKEN, RD_MORE, RD_SHUT };

static int rd_take_message(rp_reader *r, lm_error *err)
{
    uint16_t type = (uint16_t)(r->buf[0] << 8 | r->buf[1]);
    uint16_t len = (uint16_t)(r->buf[2] << 8 | r->buf[3]);
    const uint8_t *data = r->buf + 4;
    int ret = 0;

    /* A TLS alert record (content type 21, version 3.x) where a message
     * should be: the destination requires TLS and we do not use it. */
    if (!r->tls && r->buf[0] == 0x15 && r->buf[1] == 0x03) {
        error_set(err, -EPROTO, "the destination answered with a TLS alert: it requires "
                  "TLS (set tls-creds on the source too)");
        return -1;
    }
    /* Known type, its length, at most WIRE_RP_MAX_LEN: buf always has room. */
    if (wire_rp_check(type, len) != WIRE_OK) {
        error_set(err, -EPROTO, "return path: bad message type %u length %u", type, len);
        return -1;
    }
    if (r->len < 4u + len)
        return RD_MORE;
    if (type == WIRE_RP_SHUT) {
        pthread_mutex_lock(&r->lock);
        r->shut_status = (int)wire_be32(data);
        if (r->shut_status < 0)             /* a status >= 2^31: still a failure */
            r->shut_status = 1;
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->lock);
        return RD_SHUT;
    }
    if (type == WIRE_RP_RECV_BITMAP) {
        ret = rd_start_tail(r, data, len, err);
    } else if (r->ops.message) {
        ret = r->ops.message(r->opaque, type, data, len, err);
        if (ret && !err->code)
            error_set(err, ret, "return path: message type %u (%s) refused", type,
                      wire_rp_name(type));
    } else if (type != WIRE_RP_PONG) {
        ret = error_set(err, -EPROTO, "return path: unexpected message type %u (%s)", type,
                        wire_rp_name(type));
    }
    if (ret)
        return -1;
    memmove(r->buf, r->buf + 4 + len, r->len - 4 - len);
    r->len -= 4u + len;
    return RD_TAKEN;
}

/*
 * Take every whole message (and trailer) in buf.  1 after SHUT (the reader
 * is done), 0 to read on, -1 after an error (reported).
 */
static int rd_parse(rp_reader *r)
{
    lm_error err = { 0 };

    while (r->len) {
        int ret;

        if (r->tail)
            ret = rd_take_tail(r, &err) ? -1 : RD_TAKEN;
        else if (r->len < 4)
            return 0;
        else
            ret = rd_take_message(r, &err);
        if (ret == RD_MORE)
            return 0;
        if (ret == RD_SHUT)
            return 1;
        if (ret < 0) {
            rd_fail(r, &err);
            return -1;
        }
    }
    return 0;
}

static void *rd_thread(void *arg)
{
    rp_reader *r = arg;
    lm_error err = { 0 };

    pthread_setname_np(pthread_self(), "lm-rp");
    for (;;) {
        struct pollfd pfd[2] = { { .fd = r->fd, .events = POLLIN },
                                 { .fd = r->stop_fd, .events = POLLIN } };
        ssize_t n;

        /* Bytes GnuTLS already decrypted do not make the socket readable. */
        if (tls_io_pending(r->tls))
            pfd[0].revents = POLLIN;
        else if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            error_set_errno(&err, -errno, "return path poll");
            rd_fail(r, &err);
            break;
        }
        if (pfd[1].revents)
            break;                          /* rp_reader_stop */
        if (!pfd[0].revents)
            continue;
        if (r->tls) {
            struct iovec v = { r->buf + r->len, sizeof(r->buf) - r->len };
            n = tls_io_readv(r->fd, r->tls, &v, 1, true);
        } else {
            n = recv(r->fd, r->buf + r->len, sizeof(r->buf) - r->len, MSG_DONTWAIT);
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n <= 0) {
            if (n == 0)
                error_set(&err, -ECONNRESET, "the destination closed the connection "
                          "without confirming (it failed or was killed)");
            else
                error_set(&err, -errno, "return path read: %s",
                          tls_io_strerror(r->tls, errno));
            rd_fail(r, &err);
            break;
        }
        r->len += (size_t)n;
        if (rd_parse(r))
            break;
    }
    pthread_mutex_lock(&r->lock);
    r->ended = true;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

rp_reader *rp_reader_start(int fd, const rp_reader_ops *ops, void *opaque, lm_error *err)
{
    return rp_reader_start_tls(fd, NULL, ops, opaque, err);
}

rp_reader *rp_reader_start_tls(int fd, struct tls_session *tls, const rp_reader_ops *ops,
                               void *opaque, lm_error *err)
{
    rp_reader *r = calloc(1, sizeof(*r));
    pthread_condattr_t ca;
    int ret;

    if (!r)
        abort();
    r->fd = fd;
    r->tls = tls;
    r->ops = ops ? *ops : (rp_reader_ops){ 0 };
    r->opaque = opaque;
    r->shut_status = -1;
    r->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->stop_fd < 0) {
        error_set_errno(err, -errno, "return path: eventfd");
        free(r);
        return NULL;
    }
    pthread_mutex_init(&r->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cond, &ca);
    pthread_condattr_destroy(&ca);
    ret = thread_start(&r->thread, rd_thread, r);
    if (ret) {
        error_set(err, -ret, "cannot start the return-path thread: %s", strerror(ret));
        close(r->stop_fd);
        pthread_cond_destroy(&r->cond);
        pthread_mutex_destroy(&r->lock);
        free(r);
        return NULL;
    }
    return r;
}

void rp_reader_stop(rp_reader *r)
{
    uint64_t one = 1;

    if (!r)
        return;
    if (write(r->stop_fd, &one, sizeof(one)) < 0) {
        /* only fails when the counter is full: it is readable then */
    }
    pthread_join(r->thread, NULL);
    close(r->stop_fd);
    pthread_cond_destroy(&r->cond);
    pthread_mutex_destroy(&r->lock);
    free(r->tail);
    free(r);
}

/* Under lock: the verdict or the reader's error as the caller reports it. */
static int rd_verdict_locked(rp_reader *r, lm_error *err)
{
    if (r->shut_status > 0)
        return error_set(err, -EIO, "the destination failed to load the migration (it "
                         "reported status %d; see its log)", r->shut_status);
    if (r->err.code) {
        error_copy(err, &r->err);
        return r->err.code;
    }
    return 0;
}

int rp_reader_check(rp_reader *r, int *shut_status, lm_error *err)
{
    int ret;

    pthread_mutex_lock(&r->lock);
    *shut_status = r->shut_status;
    ret = rd_verdict_locked(r, err);
    if (!ret && r->shut_status == 0)
        ret = error_set(err, -EPROTO, "return path: the destination confirmed (SHUT 0) "
                        "before the stream ended");
    pthread_mutex_unlock(&r->lock);
    return ret;
}

int rp_reader_wait_shut(rp_reader *r, int timeout_ms, uint32_t *status, lm_error *err)
{
    struct timespec dl = time_deadline_ms(timeout_ms);
    int ret = 0;

    pthread_mutex_lock(&r->lock);
    while (r->shut_status < 0 && !r->err.code && !r->ended) {
        if (pthread_cond_timedwait(&r->cond, &r->lock, &dl) == ETIMEDOUT) {
            ret = error_set(err, -ETIMEDOUT, "the destination did not confirm within "
                            "%d ms", timeout_ms);
            break;
        }
    }
    if (!ret && r->shut_status >= 0) {
        *status = (uint32_t)r->shut_status;
    } else if (!ret) {
        ret = rd_verdict_locked(r, err);
        if (!ret)
            ret = error_set(err, -ECANCELED, "the return path was stopped");
    }
    pthread_mutex_unlock(&r->lock);
    return ret;
}
