/*
 * Buffered stream with zero-copy page references; see stream.h for the
 * design and the invariants.
 */
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <endian.h>

#include "stream/stream.h"
#include "tls/tls.h"
#include "util/error.h"

static lm_stream *stream_alloc(int fd, bool is_socket, bool writer)
{
    lm_stream *s = calloc(1, sizeof(*s));

    if (!s)
        abort();
    s->fd = fd;
    s->is_socket = is_socket;
    s->writer = writer;
    s->buf_cap = STREAM_BUF_SIZE;
    s->buf = malloc(s->buf_cap);
    if (!s->buf)
        abort();
    if (writer) {
        s->iov = calloc(STREAM_IOV_MAX, sizeof(*s->iov));
        if (!s->iov)
            abort();
    }
    return s;
}

lm_stream *stream_new_writer(int fd, bool is_socket)
{
    return stream_alloc(fd, is_socket, true);
}

lm_stream *stream_new_reader(int fd, bool is_socket)
{
    return stream_alloc(fd, is_socket, false);
}

lm_stream *stream_new_mem(const void *data, size_t len)
{
    lm_stream *s = calloc(1, sizeof(*s));

    if (!s)
        abort();
    s->fd = -1;
    s->mem = data;
    s->mem_len = len;
    return s;
}

lm_stream *stream_new_mem_writer(void)
{
    lm_stream *s = stream_alloc(-1, false, true);

    s->mem_writer = true;
    return s;
}

const uint8_t *stream_mem_data(const lm_stream *s, size_t *len)
{
    assert(s->mem_writer);
    *len = s->len;
    return s->buf;
}

lm_stream *stream_hand_over(lm_stream *s)
{
    lm_stream *n = stream_alloc(s->fd, s->is_socket, false);
    size_t left = s->rlen - s->rpos;

    assert(!s->writer && !s->mem && !s->err);
    memcpy(n->buf, s->buf + s->rpos, left);
    n->rlen = left;
    n->pos = s->pos;
    n->io_bytes = s->io_bytes;
    n->tls = s->tls;            /* the session goes with the descriptor */
    s->rpos = s->rlen = 0;
    s->fd = -1;
    s->tls = NULL;
    return n;
}

void stream_free(lm_stream *s)
{
    if (!s)
        return;
    free(s->buf);
    free(s->iov);
    free(s);
}

/* ------------------------------------------------------------ errors */

static void stream_verror(lm_stream *s, int code, const char *fmt, va_list ap)
{
    if (s->err)
        return;
    s->err = code ? code : -EIO;
    vsnprintf(s->errmsg, sizeof(s->errmsg), fmt, ap);
}

void lm_stream_set_error(lm_stream *s, int code, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    stream_verror(s, code, fmt, ap);
    va_end(ap);
}

int lm_stream_error(lm_stream *s)
{
    return s->err;
}

const char *lm_stream_error_msg(lm_stream *s)
{
    return s->err ? s->errmsg : "";
}

uint64_t lm_stream_offset(lm_stream *s)
{
    return s->pos;
}

/* ------------------------------------------------------------ writing */

/* Close the run of copied bytes that is not yet described by an iovec. */
static void stream_close_segment(lm_stream *s)
{
    if (s->len > s->seg) {
        s->iov[s->niov].iov_base = s->buf + s->seg;
        s->iov[s->niov].iov_len = s->len - s->seg;
        s->niov++;
        s->seg = s->len;
    }
}

void stream_set_tls(lm_stream *s, struct tls_session *tls)
{
    s->tls = tls;
}

static ssize_t stream_writev(lm_stream *s, struct iovec *iov, int n)
{
    if (s->tls)
        return tls_io_writev(s->fd, s->tls, iov, n);
    if (s->is_socket) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        /* MSG_NOSIGNAL: a dead peer is an error to report, not a SIGPIPE. */
        return sendmsg(s->fd, &msg, MSG_NOSIGNAL);
    }
    return writev(s->fd, iov, n);
}

int stream_flush(lm_stream *s)
{
    struct iovec *iov = s->iov;
    int n;

    if (s->mem_writer)
        return s->err;      /* everything stays in buf */
    if (!s->writer || s->err)
        goto out;
    stream_close_segment(s);
    n = s->niov;
    while (n > 0) {
        ssize_t w = stream_writev(s, iov, n > STREAM_IOV_MAX ? STREAM_IOV_MAX : n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            lm_stream_set_error(s, -errno, "write failed at stream offset %llu: %s",
                                (unsigned long long)s->io_bytes,
                                tls_io_strerror(s->tls, errno));
            break;
        }
        s->io_bytes += (uint64_t)w;
        /* Skip what was written; a partial iovec is advanced in place. */
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0 && w > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
out:
    if (s->writer) {
        s->niov = 0;
        s->len = s->seg = 0;
    }
    return s->err;
}

size_t stream_pending(const lm_stream *s)
{
    return (size_t)(s->pos - s->io_bytes);
}

/* A memory writer's buffer grows (doubling) to hold `more` bytes. */
static void stream_mem_grow(lm_stream *s, size_t more)
{
    size_t cap = s->buf_cap;

    while (cap - s->len < more)
        cap *= 2;
    s->buf = realloc(s->buf, cap);
    if (!s->buf)
        abort();
    s->buf_cap = cap;
}

void lm_put_buffer(lm_stream *s, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    while (len > 0 && !s->err) {
        size_t room = s->buf_cap - s->len;
        if (room < len && s->mem_writer) {
            stream_mem_grow(s, len);
            continue;
        }
        if (room == 0 || s->niov >= STREAM_IOV_MAX - 1) {
            stream_flush(s);
            continue;
        }
        if (room > len)
            room = len;
        memcpy(s->buf + s->len, p, room);
        s->len += room;
        s->pos += room;
        p += room;
        len -= room;
    }
}

uint8_t *stream_put_copy(lm_stream *s, const void *p, size_t len)
{
    uint8_t *copy;

    assert(len <= s->buf_cap);
    if (s->err)
        return NULL;
    if (s->buf_cap - s->len < len && s->mem_writer)
        stream_mem_grow(s, len);
    /* lm_put_buffer's rule for the iovec list, and room for all of it */
    if (s->buf_cap - s->len < len || s->niov >= STREAM_IOV_MAX - 1)
        stream_flush(s);
    if (s->err)
        return NULL;
    copy = s->buf + s->len;
    memcpy(s->buf + s->len, p, len);
    s->len += len;
    s->pos += len;
    return copy;
}

void stream_put_page(lm_stream *s, const void *p, size_t len)
{
    if (s->err)
        return;
    if (s->mem_writer) {        /* no descriptor to hand references to */
        lm_put_buffer(s, p, len);
        return;
    }
    /* Room for the pending copied segment and this page. */
    if (s->niov >= STREAM_IOV_MAX - 2)
        stream_flush(s);
    stream_close_segment(s);
    s->iov[s->niov].iov_base = (void *)p;
    s->iov[s->niov].iov_len = len;
    s->niov++;
    s->pos += len;
}

void lm_put_u8(lm_stream *s, uint8_t v) { lm_put_buffer(s, &v, 1); }
void lm_put_be16(lm_stream *s, uint16_t v) { v = htobe16(v); lm_put_buffer(s, &v, 2); }
void lm_put_be32(lm_stream *s, uint32_t v) { v = htobe32(v); lm_put_buffer(s, &v, 4); }
void lm_put_be64(lm_stream *s, uint64_t v) { v = htobe64(v); lm_put_buffer(s, &v, 8); }

void stream_put_counted(lm_stream *s, const char *str)
{
    size_t n = strlen(str);

    if (n > 255) {
        lm_stream_set_error(s, -EINVAL, "name '%.40s...' longer than 255 bytes", str);
        return;
    }
    lm_put_u8(s, (uint8_t)n);
    lm_put_buffer(s, str, n);
}

/* ------------------------------------------------------------ reading */

static void stream_eof_error(lm_stream *s, size_t want)
{
    lm_stream_set_error(s, -EPIPE,
                        "stream truncated at byte offset %llu (needed %zu more bytes; "
                        "the peer closed the connection or the file ended)",
                        (unsigned long long)s->pos, want);
}

/*
 * Read into (dst, dlen) and then into the buffer, in one readv.  Returns
 * bytes read, 0 at EOF, -1 with the error latched.
 */
static ssize_t stream_readv(lm_stream *s, void *dst, size_t dlen)
{
    struct iovec iov[2];
    int n = 0;
    ssize_t r;

    if (dlen) {
        iov[n].iov_base = dst;
        iov[n].iov_len = dlen;
        n++;
    }
    iov[n].iov_base = s->buf;
    iov[n].iov_len = s->buf_cap;
    n++;
    do {
        r = s->tls ? tls_io_readv(s->fd, s->tls, iov, n, false) : readv(s->fd, iov, n);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        lm_stream_set_error(s, -errno, "read failed at byte offset %llu: %s",
                            (unsigned long long)s->pos, tls_io_strerror(s->tls, errno));
    return r;
}

/* Refill the (empty) buffer.  0 on EOF. */
static ssize_t stream_fill(lm_stream *s)
{
    ssize_t r;

    if (s->mem) {
        return 0;
    }
    s->rpos = s->rlen = 0;
    r = stream_readv(s, NULL, 0);
    if (r > 0) {
        s->rlen = (size_t)r;
        s->io_bytes += (uint64_t)r;
    }
    return r;
}

int lm_get_buffer(lm_stream *s, void *buf, size_t len)
{
    uint8_t *p = buf;

    if (s->err)
        return -1;
    if (s->mem) {
        if (s->mem_len - s->pos < len) {
            stream_eof_error(s, len - (size_t)(s->mem_len - s->pos));
            return -1;
        }
        memcpy(buf, s->mem + s->pos, len);
        s->pos += len;
        return 0;
    }
    while (len > 0) {
        size_t avail = s->rlen - s->rpos;
        ssize_t r;

        if (avail) {
            if (avail > len)
                avail = len;
            memcpy(p, s->buf + s->rpos, avail);
            s->rpos += avail;
            s->pos += avail;
            p += avail;
            len -= avail;
            continue;
        }
        if (len < 512) {
            r = stream_fill(s);
        } else {
            /* Large item, empty buffer: read straight into place. */
            s->rpos = s->rlen = 0;
            r = stream_readv(s, p, len);
            if (r > 0) {
                size_t direct = (size_t)r < len ? (size_t)r : len;
                s->io_bytes += (uint64_t)r;
                s->pos += direct;
                p += direct;
                len -= direct;
                s->rlen = (size_t)r - direct;
            }
        }
        if (r == 0) {
            stream_eof_error(s, len);
            return -1;
        }
        if (r < 0)
            return -1;
    }
    return 0;
}

void stream_seek(lm_stream *s, uint64_t pos)
{
    off_t delta;

    if (s->err)
        return;
    if (s->mem) {
        if (pos > s->mem_len)
            stream_eof_error(s, (size_t)(pos - s->mem_len));
        else
            s->pos = pos;
        return;
    }
    if (s->writer) {
        if (stream_flush(s))
            return;
        delta = (off_t)(pos - s->pos);
    } else {
        /* the descriptor is ahead of pos by what is still buffered */
        delta = (off_t)(pos - s->pos) - (off_t)(s->rlen - s->rpos);
        s->rpos = s->rlen = 0;
    }
    if (lseek(s->fd, delta, SEEK_CUR) < 0) {
        lm_stream_set_error(s, -errno, "seek to stream offset %llu failed: %s",
                            (unsigned long long)pos, strerror(errno));
        return;
    }
    if (s->writer) {
        s->skipped += pos - s->pos;
        s->io_bytes = pos;
    }
    s->pos = pos;
}

int stream_peek_u8(lm_stream *s)
{
    if (s->err)
        return -1;
    if (s->mem)
        return s->pos < s->mem_len ? s->mem[s->pos] : -1;
    if (s->rpos == s->rlen && stream_fill(s) <= 0)
        return -1;
    return s->buf[s->rpos];
}

bool stream_at_eof(lm_stream *s)
{
    if (s->err)
        return false;
    if (s->mem)
        return s->pos >= s->mem_len;
    return s->rpos == s->rlen && stream_fill(s) == 0;
}

int lm_get_u8(lm_stream *s, uint8_t *v)
{
    if (s->rpos < s->rlen && !s->err) {   /* fast path: one buffered byte */
        *v = s->buf[s->rpos++];
        s->pos++;
        return 0;
    }
    return lm_get_buffer(s, v, 1);
}

int lm_get_be16(lm_stream *s, uint16_t *v)
{
    if (lm_get_buffer(s, v, 2))
        return -1;
    *v = be16toh(*v);
    return 0;
}

int lm_get_be32(lm_stream *s, uint32_t *v)
{
    if (lm_get_buffer(s, v, 4))
        return -1;
    *v = be32toh(*v);
    return 0;
}

int lm_get_be64(lm_stream *s, uint64_t *v)
{
    if (s->rpos + 8 <= s->rlen && !s->err) {
        memcpy(v, s->buf + s->rpos, 8);
        s->rpos += 8;
        s->pos += 8;
        *v = be64toh(*v);
        return 0;
    }
    if (lm_get_buffer(s, v, 8))
        return -1;
    *v = be64toh(*v);
    return 0;
}

int stream_get_counted(lm_stream *s, char *str)
{
    uint8_t n;

    if (lm_get_u8(s, &n) || lm_get_buffer(s, str, n)) {
        str[0] = 0;
        return -1;
    }
    str[n] = 0;
    return 0;
}
