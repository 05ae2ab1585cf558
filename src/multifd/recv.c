/*
 * multifd, destination side: one thread per channel reads packets straight
 * into guest RAM; the incoming thread's multifd_recv_sync() is the barrier
 * at every `ram` EOS.  See multifd.h.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "integrity/integrity.h"
#include "multifd/multifd.h"
#include "util/error.h"
#include "util/fault.h"
#include "util/time.h"
#include "util/zero.h"

typedef struct mf_recv_chan {
    multifd_receiver *mr;
    int id;
    transport_conn conn;
    pthread_t thread;
    bool started;
    fsem release;                /* posted by the incoming thread after a sync */
    uint8_t hdr[MULTIFD_HDR_SIZE];
    struct iovec iov[MULTIFD_PAGES];
    _Atomic uint64_t bytes;
    /* pages this channel was told to place since the last SYNC it read;
     * after the final barrier it must stay 0 (multifd_recv_finish) */
    _Atomic uint64_t pages_since_sync;
    mf_codec *codec;             /* NULL without compression */
    uint8_t *cbuf;               /* one packet's compressed payload */
} mf_recv_chan;

struct multifd_receiver {
    int n;
    mf_recv_chan *chans;
    const ram_state *ram;
    int method;
    int main_fd;
    fsem synced;                 /* one post per channel that reached SYNC */
    atomic_bool *abort;
    atomic_bool finishing;       /* the main stream ended: EOF is expected */
    multifd_fail_fn fail;
    void *fail_opaque;
};

static void mr_fail(mf_recv_chan *c, const lm_error *why)
{
    lm_error err;

    if (atomic_load(&c->mr->finishing))
        return;
    if (atomic_load(c->mr->abort)) {     /* an echo of a cancel or earlier failure */
        multifd_recv_kick(c->mr);
        return;
    }
    error_set(&err, why->code, "multifd channel %d: %s", c->id, why->msg);
    c->mr->fail(c->mr->fail_opaque, &err);
    multifd_recv_kick(c->mr);
}

/* Read all of iov; 0, 1 at a clean EOF before the first byte, or -errno. */
static int mr_readv_all(transport_conn *conn, struct iovec *iov, int n, uint64_t *count)
{
    bool any = false;

    while (n > 0) {
        ssize_t r = conn_readv(conn, iov, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return any ? -EPIPE : 1;
        any = true;
        *count += (uint64_t)r;
        while (n > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

/* Read next_packet_size bytes (bounded) and inflate them page by page. */
static int mr_decompress(mf_recv_chan *c, const mf_header *h, const ramblock *b,
                         lm_error *err)
{
    uint8_t *pages[MULTIFD_PAGES];
    struct iovec iov = { c->cbuf, h->next_size };
    uint64_t got = 0;
    int ret;

    if (h->next_size == 0 || h->next_size > mf_codec_bound(c->mr->method))
        return error_set(err, -EPROTO, "packet %" PRIu64 ": compressed size %u out of "
                         "range (1..%zu)", h->packet_num, h->next_size,
                         mf_codec_bound(c->mr->method));
    ret = mr_readv_all(&c->conn, &iov, 1, &got);
    atomic_fetch_add(&c->bytes, got);
    if (ret)
        return error_set(err, ret < 0 ? ret : -EPIPE, "reading packet %" PRIu64 ": the "
                         "channel ended in the middle of a packet", h->packet_num);
    for (uint32_t i = 0; i < h->normal; i++)
        pages[i] = b->host + h->offsets[i];
    if (mf_codec_decompress(c->codec, c->cbuf, h->next_size, pages, h->normal, err)) {
        error_prefix(err, "packet %" PRIu64 " (block '%s')", h->packet_num, b->idstr);
        return -EBADMSG;
    }
    return 0;
}

/*
 * x-integrity: read the packet's checksum trailer and check every page it
 * listed as placed (normal pages hashed in guest RAM, right after their
 * readv or inflate, still in cache; zero pages are known content).  Before
 * ram_received(): a page that fails never counts.  `start` is the byte
 * offset of the packet's header on this channel.
 */
static int mr_verify(mf_recv_chan *c, const mf_header *h, const ramblock *b, uint64_t start,
                     lm_error *err)
{
    uint64_t sums[MULTIFD_PAGES], got = 0;
    uint32_t n = h->normal + h->zero;
    struct iovec iov = { sums, 8 * (size_t)n };
    int ret = mr_readv_all(&c->conn, &iov, 1, &got);

    atomic_fetch_add(&c->bytes, got);
    if (ret)
        return error_set(err, ret < 0 ? ret : -EPIPE, "reading packet %" PRIu64
                         " checksums: the channel ended in the middle of a packet",
                         h->packet_num);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = h->offsets[i];
        uint64_t want = i < h->normal ? integrity_page(b->seed, off, b->host + off)
                                      : integrity_fill(b->seed, off, 0);

        if (be64toh(sums[i]) != want)
            return error_set(err, -EBADMSG, "integrity: page 0x%" PRIx64 " of RAM block "
                             "'%s' does not match its checksum (packet %" PRIu64 " at byte "
                             "offset %" PRIu64 " of the channel, %s page %u): the page was "
                             "corrupted on the way", off, b->idstr, h->packet_num, start,
                             i < h->normal ? "normal" : "zero", i);
    }
    return 0;
}

static int mr_packet(mf_recv_chan *c, mf_header *h, lm_error *err)
{
    const ramblock *b;
    struct iovec hiov = { c->hdr, sizeof(c->hdr) };
    uint64_t got = 0, start = atomic_load(&c->bytes);
    int niov = 0, ret;

    ret = mr_readv_all(&c->conn, &hiov, 1, &got);
    atomic_fetch_add(&c->bytes, got);
    if (ret == 1)
        return 1;
    if (ret)
        return error_set(err, ret, "reading a packet header: %s",
                         ret == -EPIPE ? "the channel ended in the middle of a packet"
                         : conn_strerror(&c->conn, -ret));
    if ((ret = multifd_get_header(c->hdr, h, c->mr->ram, mf_comp_flags(c->mr->method), &b, err)))
        return ret;
    /* Counted before any byte of them is placed: a packet torn after the
     * final barrier must be seen even if it wrote half a page. */
    atomic_fetch_add(&c->pages_since_sync, h->normal + h->zero);
    if (c->codec && h->normal) {
        ret = mr_decompress(c, h, b, err);
        if (ret)
            return ret;
        niov = 0;
        goto zeros;
    }
    for (uint32_t i = 0; i < h->normal; i++) {
        uint8_t *p = b->host + h->offsets[i];
        if (niov && (uint8_t *)c->iov[niov - 1].iov_base + c->iov[niov - 1].iov_len == p) {
            c->iov[niov - 1].iov_len += RAM_PAGE_SIZE;
        } else {
            c->iov[niov].iov_base = p;
            c->iov[niov].iov_len = RAM_PAGE_SIZE;
            niov++;
        }
    }
    if (niov) {
        got = 0;
        ret = mr_readv_all(&c->conn, c->iov, niov, &got);
        atomic_fetch_add(&c->bytes, got);
        if (ret)
            return error_set(err, ret < 0 ? ret : -EPIPE, "reading packet %" PRIu64
                             " pages: the channel ended in the middle of a packet",
                             h->packet_num);
    }
zeros:
    for (uint32_t i = h->normal; i < h->normal + h->zero; i++) {
        uint8_t *p = b->host + h->offsets[i];
        if (!buf_is_zero(p, RAM_PAGE_SIZE))
            memset(p, 0, RAM_PAGE_SIZE);
    }
    if ((h->flags & MULTIFD_FLAG_INTEGRITY) && h->normal + h->zero &&
        (ret = mr_verify(c, h, b, start, err)))
        return ret;
    for (uint32_t i = 0; i < h->normal + h->zero; i++)
        ram_received(b, h->offsets[i] / RAM_PAGE_SIZE, 1);
    return 0;
}

static void *mr_thread(void *arg)
{
    mf_recv_chan *c = arg;
    multifd_receiver *mr = c->mr;
    char name[16];

    snprintf(name, sizeof(name), "lm-mfrecv-%d", c->id);
    pthread_setname_np(pthread_self(), name);
    for (;;) {
        mf_header h;
        lm_error err = { 0 };
        int ret = mr_packet(c, &h, &err);

        if (ret == 1) {
            if (!atomic_load(&mr->finishing)) {
                error_set(&err, -EPIPE, "the source closed the channel before the "
                          "migration ended");
                mr_fail(c, &err);
            }
            break;
        }
        if (ret) {
            mr_fail(c, &err);
            break;
        }
        if (h.flags & MULTIFD_FLAG_SYNC) {
            if (fault_hit("dst", "sync", c->id)) {
                error_set(&err, -EIO, "injected fault at the SYNC barrier");
                mr_fail(c, &err);
                break;
            }
            /* Its pages are in place: the barrier is past them. */
            atomic_store(&c->pages_since_sync, 0);
            fsem_post(&mr->synced);
            if (fsem_wait(&c->release, mr->abort, -1))
                break;
        }
        if (fault_hit("dst", "packet", c->id)) {
            error_set(&err, -EIO, "injected fault after packet %" PRIu64, h.packet_num);
            mr_fail(c, &err);
            break;
        }
    }
    return NULL;
}

multifd_receiver *multifd_recv_start(transport_conn *conns, int n, const ram_state *ram, int method,
                                     int main_fd, atomic_bool *stop, multifd_fail_fn fail,
                                     void *fail_opaque, lm_error *err)
{
    multifd_receiver *mr = calloc(1, sizeof(*mr));

    if (!mr)
        abort();
    mr->n = n;
    mr->method = method;
    mr->main_fd = main_fd;
    mr->ram = ram;
    mr->abort = stop;
    mr->fail = fail;
    mr->fail_opaque = fail_opaque;
    fsem_init(&mr->synced, 0, n + 1);
    mr->chans = calloc((size_t)n, sizeof(*mr->chans));
    if (!mr->chans)
        abort();
    for (int i = 0; i < n; i++) {
        mr->chans[i].mr = mr;
        mr->chans[i].id = i;
        mr->chans[i].conn = conns[i];
        conns[i].fd = -1;
        conns[i].tls = NULL;
        fsem_init(&mr->chans[i].release, 0, n + 1);
    }
    for (int i = 0; i < n && method != MF_NONE; i++) {
        mf_recv_chan *c = &mr->chans[i];
        c->codec = mf_codec_new(method, 0, false, err);
        c->cbuf = malloc(mf_codec_bound(method));
        if (!c->codec || !c->cbuf) {
            multifd_recv_finish(mr, NULL);
            return NULL;
        }
    }
    for (int i = 0; i < n; i++) {
        int ret = pthread_create(&mr->chans[i].thread, NULL, mr_thread, &mr->chans[i]);
        if (ret) {
            error_set(err, -ret, "cannot start multifd receive thread %d: %s", i,
                      strerror(ret));
            multifd_recv_kick(mr);
            multifd_recv_finish(mr, NULL);
            return NULL;
        }
        mr->chans[i].started = true;
    }
    return mr;
}

int multifd_recv_sync(multifd_receiver *mr)
{
    /*
     * Channels parked at an earlier barrier do not read their sockets, and a
     * stalled channel may never deliver its SYNC: so while waiting, watch the
     * main stream.  The source only closes it after our SHUT, which comes
     * after the last barrier, so a hang-up here means the source is gone.
     */
    for (int i = 0; i < mr->n;) {
        int ret = fsem_wait(&mr->synced, mr->abort, 100);
        struct pollfd pfd = { .fd = mr->main_fd, .events = POLLRDHUP };

        if (ret == 0) {
            i++;
            continue;
        }
        if (ret != -ETIMEDOUT)
            return -ECANCELED;
        if (mr->main_fd >= 0 && poll(&pfd, 1, 0) == 1 &&
            (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
            lm_error err;
            error_set(&err, -ECONNRESET, "the source closed the main stream while %d of %d "
                      "channels had not reached the SYNC barrier", mr->n - i, mr->n);
            mr->fail(mr->fail_opaque, &err);
            multifd_recv_kick(mr);
            return -ECANCELED;
        }
    }
    for (int i = 0; i < mr->n; i++)
        fsem_post(&mr->chans[i].release);
    return 0;
}

static int mr_place_sync(void *impl, ram_state *r, lm_stream *s, uint64_t at)
{
    (void)r;
    if (multifd_recv_sync(impl)) {
        lm_stream_set_error(s, -ECANCELED, "multifd: a channel failed (barrier at byte "
                            "offset %" PRIu64 ")", at);
        return -1;
    }
    return 0;
}

static const ram_placer_ops mr_placer_ops = {
    .name = "multifd",
    .sync = mr_place_sync,
};

ram_placer multifd_recv_placer(multifd_receiver *mr)
{
    return (ram_placer){ &mr_placer_ops, mr };
}

void multifd_recv_kick(multifd_receiver *mr)
{
    atomic_store(mr->abort, true);
    for (int i = 0; i < mr->n; i++) {
        conn_shutdown(&mr->chans[i].conn);
        fsem_kick(&mr->chans[i].release);
    }
    fsem_kick(&mr->synced);
}

int multifd_recv_finish(multifd_receiver *mr, lm_error *err)
{
    int ret = 0;

    if (!mr)
        return 0;
    atomic_store(&mr->finishing, true);
    for (int i = 0; i < mr->n; i++) {
        conn_shutdown(&mr->chans[i].conn);
        fsem_post(&mr->chans[i].release);
    }
    /* Join all before closing any socket (a running thread may kick them). */
    for (int i = 0; i < mr->n; i++)
        if (mr->chans[i].started)
            pthread_join(mr->chans[i].thread, NULL);
    for (int i = 0; i < mr->n && !ret; i++) {
        uint64_t late = atomic_load(&mr->chans[i].pages_since_sync);
        if (late)
            ret = error_set(err, -EPROTO, "multifd channel %d: %" PRIu64 " pages arrived "
                            "after the final SYNC barrier (the source sends none there)",
                            i, late);
    }
    for (int i = 0; i < mr->n; i++) {
        conn_close(&mr->chans[i].conn, NULL);
        mf_codec_free(mr->chans[i].codec);
        free(mr->chans[i].cbuf);
    }
    free(mr->chans);
    free(mr);
    return ret;
}

uint64_t multifd_recv_bytes(multifd_receiver *mr)
{
    uint64_t sum = 0;

    for (int i = 0; mr && i < mr->n; i++)
        sum += atomic_load(&mr->chans[i].bytes);
    return sum;
}

/*
 * Read exactly len bytes (peek: leave them queued) before deadline.  With
 * TLS a peek is a read followed by conn_unread, and bytes GnuTLS already
 * holds are taken before the socket is polled.
 */
static int mr_read_deadline(transport_conn *c, void *buf, size_t len, bool peek,
                            int64_t deadline, int cancel_fd)
{
    size_t got = 0;

    while (got < len) {
        struct pollfd pfd[2] = { { .fd = c->fd, .events = POLLIN },
                                 { .fd = cancel_fd, .events = POLLIN } };
        int64_t left = deadline - time_now_ms();
        ssize_t r;

        if (left <= 0)
            return -ETIMEDOUT;
        if (conn_pending(c)) {
            pfd[0].revents = POLLIN;
        } else {
            if (poll(pfd, cancel_fd >= 0 ? 2 : 1, (int)left) < 0 && errno != EINTR)
                return -errno;
            if (cancel_fd >= 0 && pfd[1].revents)
                return -ECANCELED;
        }
        if (!pfd[0].revents)
            continue;
        if (c->tls) {
            r = conn_read_nb(c, (uint8_t *)buf + got, len - got);
            if (r == 0)
                return -EPIPE;
            if (r > 0) {
                got += (size_t)r;
                if (got == len && peek)
                    conn_unread(c, buf, len);
                continue;
            }
        } else if (peek) {
            r = recv(c->fd, buf, len, MSG_PEEK | MSG_DONTWAIT);
            if (r == (ssize_t)len)
                return 0;
            if (r == 0)
                return -EPIPE;
            if (r > 0) {        /* not all there yet: don't spin on it */
                struct timespec ts = { 0, 1000000 };
                nanosleep(&ts, NULL);
                continue;
            }
        } else {
            r = read(c->fd, (uint8_t *)buf + got, len - got);
            if (r == 0)
                return -EPIPE;
            if (r > 0) {
                got += (size_t)r;
                continue;
            }
        }
        if (errno != EINTR && errno != EAGAIN)
            return -errno;
    }
    return 0;
}

int multifd_accept(transport_listener *l, const tls_setup *tls, int n, int cancel_fd,
                   int timeout_ms, transport_conn *main_conn, transport_conn *chans,
                   lm_error *err)
{
    bool have_main = false;
    int have = 0, ret = 0;
    int64_t deadline = 0;

    for (int i = 0; i < n; i++) {
        chans[i].fd = -1;
        chans[i].tls = NULL;
    }
    main_conn->fd = -1;
    main_conn->tls = NULL;
    while (!have_main || have < n) {
        transport_conn c = { .fd = -1 };
        uint8_t magic[4], init[MULTIFD_INIT_SIZE];
        uint8_t id;

        ret = transport_accept(l, &c, cancel_fd, deadline ? (int)(deadline - time_now_ms())
                                                              : -1, err);
        if (ret) {
            if (ret == -ETIMEDOUT)
                error_set(err, ret, "multifd: only %d of %d channels%s connected within "
                          "%d ms", have, n, have_main ? "" : " and no main stream",
                          timeout_ms);
            goto fail;
        }
        if (!deadline)
            deadline = time_now_ms() + timeout_ms;
        ret = conn_tls_wrap(tls, &c, cancel_fd, (int)(deadline - time_now_ms()), err);
        if (ret) {
            conn_close(&c, NULL);
            goto fail;
        }
        ret = mr_read_deadline(&c, magic, 4, true, deadline, cancel_fd);
        if (ret) {
            error_set(err, ret, "multifd: a connection from %s sent nothing usable: %s",
                      c.peer, conn_strerror(&c, -ret));
            conn_close(&c, NULL);
            goto fail;
        }
        if (!memcmp(magic, "QEVM", 4)) {
            if (have_main) {
                ret = error_set(err, -EPROTO, "multifd: a second main stream connection "
                                "from %s", c.peer);
                conn_close(&c, NULL);
                goto fail;
            }
            *main_conn = c;
            have_main = true;
            continue;
        }
        if (magic[0] == 0x16 && magic[1] == 0x03 && !c.tls) {
            ret = error_set(err, -EPROTO, "multifd: the connection from %s starts a TLS "
                            "handshake: the source uses TLS, but tls-creds is not set here",
                            c.peer);
            conn_close(&c, NULL);
            goto fail;
        }
        if (memcmp(magic, "\x11\x22\x33\x44", 4)) {
            ret = error_set(err, -EPROTO, "multifd: a connection from %s is neither the "
                            "main stream nor a channel (first bytes %02x %02x %02x %02x)",
                            c.peer, magic[0], magic[1], magic[2], magic[3]);
            conn_close(&c, NULL);
            goto fail;
        }
        ret = mr_read_deadline(&c, init, sizeof(init), false, deadline, cancel_fd);
        if (!ret && (ret = multifd_check_init(init, n, &id, err)) == 0 &&
            fault_hit("dst", "handshake", id))
            ret = error_set(err, -EPROTO, "multifd channel %u: injected handshake fault",
                            id);
        if (ret) {
            if (!err || !err->msg[0] || ret != -EPROTO)
                error_set(err, ret, "multifd: channel handshake from %s failed: %s",
                          c.peer, conn_strerror(&c, -ret));
            conn_close(&c, NULL);
            goto fail;
        }
        if (chans[id].fd >= 0) {
            ret = error_set(err, -EPROTO, "multifd: channel id %u connected twice", id);
            conn_close(&c, NULL);
            goto fail;
        }
        chans[id] = c;
        have++;
    }
    return 0;
fail:
    conn_close(main_conn, NULL);
    for (int i = 0; i < n; i++)
        conn_close(&chans[i], NULL);
    return ret;
}
