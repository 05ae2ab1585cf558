/*
 * multifd, source side: the migration thread collects batches of page
 * offsets and hands each to an idle channel thread, which writes header and
 * pages with one vectored write.  Ownership, barriers and the sync protocol
 * are described in multifd.h.
 */
#include <endian.h>
#include <errno.h>
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
#include "util/zero.h"

typedef struct mf_send_chan {
    multifd_sender *ms;
    int id;
    transport_conn conn;
    pthread_t thread;
    bool started;
    fsem sem;                   /* posted for a job, a sync or quit */
    fsem sem_sync;              /* posted when the SYNC packet is out */
    atomic_int pending_job;     /* 1: `next` holds a job and belongs to this thread */
    atomic_int pending_sync;
    mf_batch *batch;            /* the packet being sent; this thread's */
    mf_batch *next;             /* the hand-off slot, see multifd.h */
    uint8_t hdr[MULTIFD_HDR_SIZE];
    struct iovec iov[2 + MULTIFD_PAGES];   /* header, pages, checksums */
    _Atomic uint64_t bytes, packets, normal, zero, comp_bytes;
    mf_codec *codec;            /* NULL without compression */
    uint8_t *cbuf;              /* compressed payload, mf_codec_bound bytes */
    uint8_t *bounce;            /* one page: the guest keeps writing */
    /* x-integrity: the packet's normal pages, copied and hashed, and the
     * be64 checksums of all its pages (the trailer) */
    uint8_t *icopy;
    uint64_t isums[MULTIFD_PAGES];
} mf_send_chan;

struct multifd_sender {
    int n;
    mf_send_chan *chans;
    mf_batch *batch;            /* the migration thread's */
    fsem ready;                 /* counts channels without a pending job */
    int next;
    atomic_bool *abort;
    atomic_bool quit;
    _Atomic uint64_t packet_num;
    zero_detect zd;
    int method;
    bool integrity;
    multifd_fail_fn fail;
    void *fail_opaque;
    uint64_t queued;            /* pages handed in (migration thread only) */
};

static void mf_fail(mf_send_chan *c, int code, const char *what)
{
    lm_error err;

    /* Already aborting (a cancel, or another thread's failure): this error
     * is the echo of the shutdown, not a cause. */
    if (atomic_load(c->ms->abort)) {
        multifd_send_kick(c->ms);
        return;
    }
    error_set(&err, code, "multifd channel %d: %s", c->id, what);
    if (code && code != -EPIPE && code != -ECANCELED)
        error_set(&err, code, "multifd channel %d: %s: %s", c->id, what, strerror(-code));
    c->ms->fail(c->ms->fail_opaque, &err);
    multifd_send_kick(c->ms);
}

/* Write every byte of iov[0..n), advancing it in place. */
static int mf_writev_all(transport_conn *conn, struct iovec *iov, int n)
{
    while (n > 0) {
        ssize_t w = conn_writev(conn, iov, n);

        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/*
 * Replace the page iovecs by the compressed payload.  Each page is copied to
 * a bounce page first: the codec must not see the guest change it mid-read.
 */
static int mf_compress(mf_send_chan *c, mf_header *h, int *niov)
{
    const ramblock *b = c->batch->block;
    size_t len = 0;
    lm_error err;

    for (uint32_t i = 0; i < h->normal; i++) {
        size_t part;

        const uint8_t *page = c->bounce;

        /* with integrity the pages were copied (and hashed) already */
        if (c->icopy)
            page = c->icopy + i * RAM_PAGE_SIZE;
        else
            memcpy(c->bounce, b->host + h->offsets[i], RAM_PAGE_SIZE);
        if (mf_codec_compress(c->codec, page, i + 1 == h->normal, c->cbuf + len,
                              mf_codec_bound(c->ms->method) - len, &part, &err)) {
            util_log("multifd channel %d: %s", c->id, err.msg);
            return -EIO;
        }
        len += part;
    }
    h->next_size = (uint32_t)len;
    c->iov[1].iov_base = c->cbuf;
    c->iov[1].iov_len = len;
    *niov = 2;
    atomic_fetch_add(&c->comp_bytes, len);
    return 0;
}

/* Pages ahead of the zero check; buf_is_zero reads 256 bytes first. */
#define MF_PREFETCH_AHEAD 4

static inline void mf_prefetch_head(const uint8_t *p)
{
    for (int l = 0; l < 256; l += 64)
        __builtin_prefetch(p + l);
}

/*
 * x-integrity: copy the packet's normal pages into c->icopy and hash the
 * copy, which replaces the page iovecs (one iovec: the copy is contiguous);
 * the zero pages' sums are of the zero page.  The trailer c->isums is
 * big-endian, in the header's offset order.  The fault point
 * "corrupt-mfpage" (channel = this channel) flips a byte of the first
 * copied page after hashing.  Returns the iovec count.
 */
static int mf_checksum(mf_send_chan *c, const mf_header *h)
{
    const ramblock *b = c->batch->block;

    for (uint32_t i = 0; i < h->normal + h->zero; i++) {
        uint64_t sum;

        if (i < h->normal) {
            uint8_t *copy = c->icopy + i * RAM_PAGE_SIZE;

            memcpy(copy, b->host + h->offsets[i], RAM_PAGE_SIZE);
            sum = integrity_page(b->seed, h->offsets[i], copy);
        } else {
            sum = integrity_fill(b->seed, h->offsets[i], 0);
        }
        c->isums[i] = htobe64(sum);
    }
    if (h->normal && fault_hit("src", "corrupt-mfpage", c->id))
        c->icopy[RAM_PAGE_SIZE / 2] ^= 0x20;
    if (!h->normal)
        return 1;
    c->iov[1].iov_base = c->icopy;
    c->iov[1].iov_len = h->normal * RAM_PAGE_SIZE;
    return 2;
}

/* Build and write one packet for c->batch (may be empty: a SYNC packet). */
static int mf_send_packet(mf_send_chan *c, uint32_t flags)
{
    multifd_sender *ms = c->ms;
    const mf_batch *b = c->batch;
    mf_header h = { .flags = flags, .pages_alloc = MULTIFD_PAGES };
    uint64_t zeros[MULTIFD_PAGES];
    int niov = 1, ret;

    h.packet_num = atomic_fetch_add(&ms->packet_num, 1);
    if (b && b->num) {
        snprintf(h.idstr, sizeof(h.idstr), "%s", b->block->idstr);
        for (uint32_t i = 0; i < b->num; i++) {
            uint64_t off = b->offsets[i];
            const uint8_t *p = b->block->host + off;

            /* The zero check's first read of a page is a cache miss that
             * the hardware prefetcher (which stops at page boundaries)
             * cannot hide: start a later page's first lines now. */
            if (ms->zd == ZERO_MULTIFD && i + MF_PREFETCH_AHEAD < b->num)
                mf_prefetch_head(b->block->host + b->offsets[i + MF_PREFETCH_AHEAD]);
            if (ms->zd == ZERO_MULTIFD && buf_is_zero(p, RAM_PAGE_SIZE)) {
                zeros[h.zero++] = off;
                continue;
            }
            h.offsets[h.normal++] = off;
            /* Adjacent pages travel as one iovec: fewer, larger copies. */
            if (niov > 1 && (uint8_t *)c->iov[niov - 1].iov_base + c->iov[niov - 1].iov_len == p) {
                c->iov[niov - 1].iov_len += RAM_PAGE_SIZE;
            } else {
                c->iov[niov].iov_base = (void *)p;
                c->iov[niov].iov_len = RAM_PAGE_SIZE;
                niov++;
            }
        }
        memcpy(h.offsets + h.normal, zeros, h.zero * sizeof(zeros[0]));
        h.next_size = h.normal * (uint32_t)RAM_PAGE_SIZE;
        if (ms->integrity)
            niov = mf_checksum(c, &h);
        if (c->codec && h.normal && (ret = mf_compress(c, &h, &niov)))
            return ret;
    }
    if (ms->integrity) {
        h.flags |= MULTIFD_FLAG_INTEGRITY;
        if (h.normal + h.zero) {
            c->iov[niov].iov_base = c->isums;
            c->iov[niov].iov_len = 8 * (h.normal + h.zero);
            niov++;
        }
    }
    multifd_put_header(c->hdr, &h);
    c->iov[0].iov_base = c->hdr;
    c->iov[0].iov_len = MULTIFD_HDR_SIZE;
    if (fault_hit("src", "packet", c->id)) {
        /* Half a header, then the failure: the peer sees a torn packet. */
        c->iov[0].iov_len = MULTIFD_HDR_SIZE / 2;
        mf_writev_all(&c->conn, c->iov, 1);
        return -EIO;
    }
    ret = mf_writev_all(&c->conn, c->iov, niov);
    if (ret)
        return ret;
    atomic_fetch_add(&c->bytes, MULTIFD_HDR_SIZE + (uint64_t)h.next_size +
                     (ms->integrity ? 8 * (uint64_t)(h.normal + h.zero) : 0));
    atomic_fetch_add(&c->packets, 1);
    atomic_fetch_add(&c->normal, h.normal);
    atomic_fetch_add(&c->zero, h.zero);
    return 0;
}

static void *mf_send_thread(void *arg)
{
    mf_send_chan *c = arg;
    multifd_sender *ms = c->ms;
    char name[16];
    int ret;

    snprintf(name, sizeof(name), "lm-mfsend-%d", c->id);
    pthread_setname_np(pthread_self(), name);
    for (;;) {
        if (fsem_wait(&c->sem, ms->abort, -1))
            break;
        if (atomic_load_explicit(&c->pending_job, memory_order_acquire)) {
            mf_batch *job = c->next;

            /* Take the job and free the slot at once, so the migration
             * thread can park the next batch here while this one is on
             * its way: the channel then never sleeps between packets. */
            c->batch->num = 0;
            c->next = c->batch;
            c->batch = job;
            atomic_store_explicit(&c->pending_job, 0, memory_order_release);
            fsem_post(&ms->ready);
            ret = mf_send_packet(c, mf_comp_flags(ms->method));
            if (ret) {
                mf_fail(c, ret, "writing a packet failed");
                break;
            }
        } else if (atomic_load_explicit(&c->pending_sync, memory_order_acquire)) {
            const mf_batch *saved = c->batch;
            if (fault_hit("src", "sync", c->id)) {
                mf_fail(c, -EIO, "injected fault before the SYNC packet");
                break;
            }
            c->batch = NULL;
            ret = mf_send_packet(c, MULTIFD_FLAG_SYNC | mf_comp_flags(ms->method));
            c->batch = (mf_batch *)saved;
            atomic_store_explicit(&c->pending_sync, 0, memory_order_release);
            if (ret) {
                mf_fail(c, ret, "writing the SYNC packet failed");
                break;
            }
            fsem_post(&c->sem_sync);
        } else if (atomic_load(&ms->quit)) {
            break;
        }
    }
    return NULL;
}

/*
 * Each channel's handshake goes out as soon as it is connected, before the
 * next one connects: the destination classifies connections by their first
 * bytes, one after the other, so a channel that connected but stays silent
 * would hold up every connection queued behind it (with 32 or more channels
 * the listen backlog fills and the later connects time out).
 */
int multifd_send_connect(const transport_uri *u, const tls_setup *tls, int n, int cancel_fd,
                         int timeout_ms, transport_conn *conns, lm_error *err)
{
    int ret = 0, i;

    for (i = 0; i < n; i++) {
        conns[i].fd = -1;
        conns[i].tls = NULL;
    }
    for (i = 0; i < n; i++) {
        uint8_t init[MULTIFD_INIT_SIZE];
        struct iovec iov = { init, sizeof(init) };

        if (fault_hit("src", "connect", i))
            ret = error_set(err, -ECONNREFUSED, "injected connect failure");
        else
            ret = transport_connect(u, &conns[i], cancel_fd, timeout_ms, err);
        if (ret)
            goto fail;
        /* TLS first: the handshake below is the first thing inside it. */
        if ((ret = conn_tls_wrap(tls, &conns[i], cancel_fd, timeout_ms, err)))
            goto fail;
        multifd_put_init(init, (uint8_t)i);
        if (fault_hit("src", "handshake", i))
            init[0] ^= 0xff;
        if ((ret = mf_writev_all(&conns[i], &iov, 1))) {
            error_set(err, ret, "sending the handshake failed: %s",
                      conn_strerror(&conns[i], -ret));
            goto fail;
        }
    }
    return 0;
fail:
    error_prefix(err, "multifd channel %d", i);
    for (int j = 0; j < n; j++)
        conn_close(&conns[j], NULL);
    return ret;
}

multifd_sender *multifd_send_start(transport_conn *conns, int n, zero_detect zd,
                                   int method, int level, bool integrity,
                                   atomic_bool *stop, multifd_fail_fn fail,
                                   void *fail_opaque, lm_error *err)
{
    multifd_sender *ms = calloc(1, sizeof(*ms));

    if (!ms)
        abort();
    ms->n = n;
    ms->zd = zd;
    ms->method = method;
    ms->integrity = integrity;
    ms->abort = stop;
    ms->fail = fail;
    ms->fail_opaque = fail_opaque;
    ms->chans = calloc((size_t)n, sizeof(*ms->chans));
    ms->batch = calloc(1, sizeof(*ms->batch));
    if (!ms->chans || !ms->batch)
        abort();
    fsem_init(&ms->ready, (unsigned)n, n + 1);
    for (int i = 0; i < n; i++) {
        mf_send_chan *c = &ms->chans[i];

        c->ms = ms;
        c->id = i;
        c->conn = conns[i];
        c->bytes = MULTIFD_INIT_SIZE;        /* its handshake, sent at connect */
        conns[i].fd = -1;
        conns[i].tls = NULL;
        fsem_init(&c->sem, 0, n + 1);
        fsem_init(&c->sem_sync, 0, n + 1);
        c->batch = calloc(1, sizeof(*c->batch));
        c->next = calloc(1, sizeof(*c->next));
        if (!c->batch || !c->next)
            abort();
        if (integrity && !(c->icopy = aligned_alloc(RAM_PAGE_SIZE,
                                                    MULTIFD_PAGES * RAM_PAGE_SIZE)))
            abort();
    }
    for (int i = 0; i < n && method != MF_NONE; i++) {
        mf_send_chan *c = &ms->chans[i];

        c->codec = mf_codec_new(method, level, true, err);
        c->cbuf = malloc(mf_codec_bound(method));
        c->bounce = aligned_alloc(RAM_PAGE_SIZE, RAM_PAGE_SIZE);
        if (!c->codec || !c->cbuf || !c->bounce) {
            multifd_send_finish(ms);     /* no thread started: closes the sockets */
            return NULL;
        }
    }
    for (int i = 0; i < n; i++) {
        int ret = pthread_create(&ms->chans[i].thread, NULL, mf_send_thread, &ms->chans[i]);
        if (ret) {
            error_set(err, -ret, "cannot start multifd channel thread %d: %s", i,
                      strerror(ret));
            multifd_send_kick(ms);
            multifd_send_finish(ms);
            return NULL;
        }
        ms->chans[i].started = true;
    }
    return ms;
}

static int mf_hand_off(multifd_sender *ms)
{
    mf_send_chan *c = NULL;
    mf_batch *tmp;

    if (fsem_wait(&ms->ready, ms->abort, -1))
        return -ECANCELED;
    for (int k = 0; k < ms->n; k++) {
        int i = (ms->next + k) % ms->n;
        if (!atomic_load_explicit(&ms->chans[i].pending_job, memory_order_acquire)) {
            c = &ms->chans[i];
            ms->next = (i + 1) % ms->n;
            break;
        }
    }
    if (!c)     /* cannot happen: a ready token means an idle channel */
        return -EIO;
    tmp = c->next;
    c->next = ms->batch;
    ms->batch = tmp;
    atomic_store_explicit(&c->pending_job, 1, memory_order_release);
    fsem_post(&c->sem);
    return 0;
}

int multifd_send_page(multifd_sender *ms, const ramblock *b, uint64_t offset)
{
    mf_batch *bt = ms->batch;

    if (atomic_load(ms->abort))
        return -ECANCELED;
    if (bt->num && (bt->block != b || bt->num == MULTIFD_PAGES)) {
        int ret = mf_hand_off(ms);
        if (ret)
            return ret;
        bt = ms->batch;
    }
    bt->block = b;
    bt->offsets[bt->num++] = offset;
    ms->queued++;
    return 0;
}

int multifd_send_sync(multifd_sender *ms)
{
    int ret;

    if (ms->batch->num && (ret = mf_hand_off(ms)))
        return ret;
    for (int i = 0; i < ms->n; i++) {
        atomic_store_explicit(&ms->chans[i].pending_sync, 1, memory_order_release);
        fsem_post(&ms->chans[i].sem);
    }
    for (int i = 0; i < ms->n; i++)
        if (fsem_wait(&ms->chans[i].sem_sync, ms->abort, -1))
            return -ECANCELED;
    return 0;
}

void multifd_send_kick(multifd_sender *ms)
{
    atomic_store(ms->abort, true);
    for (int i = 0; i < ms->n; i++) {
        mf_send_chan *c = &ms->chans[i];
        conn_shutdown(&c->conn);
        fsem_kick(&c->sem);
        fsem_kick(&c->sem_sync);
    }
    fsem_kick(&ms->ready);
}

void multifd_send_finish(multifd_sender *ms)
{
    if (!ms)
        return;
    atomic_store(&ms->quit, true);
    for (int i = 0; i < ms->n; i++)
        fsem_post(&ms->chans[i].sem);
    /* Join every thread before closing any socket: a thread still running
     * may be kicking (shutting down) all of them. */
    for (int i = 0; i < ms->n; i++)
        if (ms->chans[i].started)
            pthread_join(ms->chans[i].thread, NULL);
    for (int i = 0; i < ms->n; i++) {
        mf_send_chan *c = &ms->chans[i];
        conn_close(&c->conn, NULL);
        free(c->batch);
        free(c->next);
        mf_codec_free(c->codec);
        free(c->cbuf);
        free(c->bounce);
        free(c->icopy);
    }
    free(ms->chans);
    free(ms->batch);
    free(ms);
}

/* The sink (ram.h): with legacy zero detection this thread writes ZERO
 * records on the main stream, otherwise every page goes to the channels
 * (which check for zeros with "multifd", or send all in full with "none"). */
static int mf_sink_page(void *impl, ram_state *r, lm_stream *s, ramblock *b, uint64_t page)
{
    multifd_sender *ms = impl;
    int ret;

    if (ms->zd == ZERO_LEGACY && buf_is_zero(b->host + page * RAM_PAGE_SIZE, RAM_PAGE_SIZE)) {
        ram_put_zero(r, s, b, page);
        return RAM_SENT_ZERO;
    }
    ret = multifd_send_page(ms, b, page * RAM_PAGE_SIZE);
    return ret ? ret : RAM_SENT_AWAY;
}

/* Before each EOS: per-section sync, QEMU 7.2's placement. */
static int mf_sink_flush(void *impl, ram_state *r, lm_stream *s, lm_error *err)
{
    (void)r;
    (void)s;
    if (multifd_send_sync(impl))
        return error_set(err, -ECANCELED, "multifd: a channel failed");
    return 0;
}

static const ram_sink_ops mf_sink_ops = {
    .name = "multifd",
    .page = mf_sink_page,
    .flush = mf_sink_flush,
};

ram_sink multifd_send_sink(multifd_sender *ms)
{
    return (ram_sink){ &mf_sink_ops, ms };
}

void multifd_send_stats(multifd_sender *ms, multifd_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->queued_pages = ms ? ms->queued : 0;
    for (int i = 0; ms && i < ms->n; i++) {
        st->bytes += atomic_load(&ms->chans[i].bytes);
        st->packets += atomic_load(&ms->chans[i].packets);
        st->normal_pages += atomic_load(&ms->chans[i].normal);
        st->zero_pages += atomic_load(&ms->chans[i].zero);
        st->compressed_bytes += atomic_load(&ms->chans[i].comp_bytes);
    }
}
