/*
 * zlib page compression and decompression on worker pools; the contract is
 * in compress.h.
 *
 * Each worker owns one zlib stream (deflate or inflate state, set up by the
 * pool's init callback on the creating thread) and resets it per page, so a
 * page costs no allocation and each page is an independent zlib stream, as
 * the format requires.
 *
 * Source: a request is the page's bounce copy plus an output buffer one
 * byte shorter than a page.  deflate(Z_FINISH) into it either ends the
 * stream (the compressed form is smaller: send it) or runs out of room
 * (not smaller: send the bounce copy); zlib stops writing at the end of the
 * buffer, so an incompressible page costs no more than one page of output.
 * Finished requests are KEPT by the pool's done callback on a FIFO until
 * poll/flush emits them, so the data handed to emit is the request's own
 * buffer (no copy) and emit runs on the thread that polls.
 *
 * Destination: a request carries a copy of the record's data and the
 * destination pointer; inflate gets avail_out = one page, so it cannot write
 * past the page whatever the input says.  The page is good only if the
 * stream ends exactly there: Z_STREAM_END with no output room left and no
 * input left.  Anything else is a corrupt page, reported with the record's
 * stream offset; the first error is latched and returned by every later
 * submit and wait.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "compress/compress.h"
#include "util/error.h"
#include "util/pool.h"
#include "util/zero.h"

#define PAGE COMPRESS_PAGE_SIZE
#define RELAXED memory_order_relaxed

_Static_assert(PAGE + (PAGE >> 12) + (PAGE >> 14) + (PAGE >> 25) + 13 == COMPRESS_BOUND,
               "COMPRESS_BOUND is zlib's compressBound(4096)");

static int zlib_bound_check(lm_error *err)
{
    /* A zlib whose bound differs would make us reject valid pages. */
    if (compressBound(PAGE) != COMPRESS_BOUND)
        return error_set(err, -ENOTSUP, "zlib %s: compressBound(%d) = %lu, expected %d",
                         zlibVersion(), PAGE, (unsigned long)compressBound(PAGE),
                         COMPRESS_BOUND);
    return 0;
}

/*
 * Get a free request into *out, waiting for workers if all are busy.
 * `drain` (may be NULL) runs after each poll of the pool and must recycle
 * what was kept (the compressor emits there).  *busy is set when none was
 * free even after polling.  0 or a negative errno with err set.
 */
static int get_req(worker_pool *pool, int (*drain)(void *arg), void *arg, pool_req **out,
                   bool *busy, lm_error *err)
{
    pool_req *req = pool_submit_prepare(pool);
    int rc;

    *busy = false;
    while (!req) {
        if (pool_poll_done(pool) == 0 && *busy) {
            /* Only requests in the workers can come back: wait for half of
             * them, not one, so each wake-up of this thread refills
             * several worker slots (see pool.c). */
            rc = pool_wait_any(pool, pool_outstanding(pool) / 2, COMPRESS_WAIT_MS,
                               err);
            if (rc < 0)
                return rc;
        }
        if (drain && (rc = drain(arg)) < 0)
            return error_set(err, rc, "emitting a finished page: %s", strerror(-rc));
        req = pool_submit_prepare(pool);
        if (!req)
            *busy = true;
    }
    *out = req;
    return 0;
}

/* ================================================================== source */

typedef struct comp_req {
    pool_req req;                 /* first: the pool's header */
    struct comp_req *next;        /* owner's FIFO of finished pages */
    uint64_t tag;
    uint32_t len;                 /* of the data to emit */
    bool compressed;
    _Alignas(64) unsigned char page[PAGE];  /* bounce copy */
    unsigned char out[PAGE];      /* zlib output; only PAGE - 1 used */
} comp_req;

struct compressor {
    worker_pool *pool;
    int level;
    comp_req *ready_head, *ready_tail;     /* owner only */
    /* the sink's: where emitted pages go (owner only, during a page/flush) */
    ram_state *sink_ram;
    lm_stream *sink_stream;
    _Atomic uint64_t submitted, busy, pages, compressed_size, not_smaller;
};

static int comp_init(void *opaque, unsigned worker, void **wctx, lm_error *err)
{
    compressor *c = opaque;
    z_stream *zs = calloc(1, sizeof(*zs));
    int r;

    if (!zs)
        return error_set(err, -ENOMEM, "out of memory");
    r = deflateInit(zs, c->level);
    if (r != Z_OK) {
        free(zs);
        return error_set(err, r == Z_MEM_ERROR ? -ENOMEM : -EINVAL,
                         "zlib deflateInit(level %d): %s", c->level, zError(r));
    }
    *wctx = zs;
    return 0;
}

static void comp_uninit(void *opaque, unsigned worker, void *wctx)
{
    z_stream *zs = wctx;

    if (zs) {
        deflateEnd(zs);
        free(zs);
    }
}

static void comp_handler(void *opaque, void *wctx, pool_req *preq)
{
    comp_req *r = (comp_req *)preq;
    z_stream *zs = wctx;
    int rc;

    deflateReset(zs);
    zs->next_in = r->page;
    zs->avail_in = PAGE;
    zs->next_out = r->out;
    zs->avail_out = PAGE - 1;  /* a result that needs a whole page is no gain */
    rc = deflate(zs, Z_FINISH);
    if (rc == Z_STREAM_END) {
        r->compressed = true;
        r->len = (uint32_t)zs->total_out;
    } else {
        /* Z_OK / Z_BUF_ERROR: out of room, i.e. not smaller.  Nothing else
         * can happen with a valid stream; sending the page raw is right
         * in every case. */
        r->compressed = false;
        r->len = PAGE;
    }
}

static pool_disposition comp_done(void *opaque, pool_req *preq)
{
    compressor *c = opaque;
    comp_req *r = (comp_req *)preq;

    r->next = NULL;
    if (c->ready_tail)
        c->ready_tail->next = r;
    else
        c->ready_head = r;
    c->ready_tail = r;
    return POOL_KEEP;
}

static const pool_ops comp_ops = {
    .init = comp_init,
    .uninit = comp_uninit,
    .handler = comp_handler,
    .done = comp_done,
};

compressor *compress_new(int threads, int level, lm_error *err)
{
    return compress_new_tuned(threads, level, 0, NULL, err);
}

compressor *compress_new_tuned(int threads, int level, unsigned ring_size,
                               const pool_tuning *tuning, lm_error *err)
{
    compressor *c;

    if (threads < 1 || threads > COMPRESS_MAX_THREADS) {
        error_set(err, -EINVAL, "compress-threads %d out of range 1..%d", threads,
                  COMPRESS_MAX_THREADS);
        return NULL;
    }
    if (level < 0 || level > 9) {
        error_set(err, -EINVAL, "compress-level %d out of range 0..9", level);
        return NULL;
    }
    if (zlib_bound_check(err) < 0)
        return NULL;
    c = calloc(1, sizeof(*c));
    if (!c) {
        error_set(err, -ENOMEM, "out of memory");
        return NULL;
    }
    c->level = level;
    c->pool = pool_create_tuned((unsigned)threads, ring_size ? ring_size : COMPRESS_RING,
                                sizeof(comp_req), "compress", &comp_ops, c, tuning, err);
    if (!c->pool) {
        free(c);
        return NULL;
    }
    return c;
}

worker_pool *compress_pool_of(compressor *c)
{
    return c->pool;
}

void compress_free(compressor *c)
{
    if (!c)
        return;
    pool_destroy(c->pool);
    free(c);
}

static int emit_ready(compressor *c, compress_emit_fn emit, void *opaque)
{
    int n = 0;

    while (c->ready_head) {
        comp_req *r = c->ready_head;
        int rc;

        c->ready_head = r->next;
        if (!c->ready_head)
            c->ready_tail = NULL;
        if (r->compressed) {
            atomic_fetch_add_explicit(&c->pages, 1, RELAXED);
            atomic_fetch_add_explicit(&c->compressed_size, r->len, RELAXED);
            rc = emit(opaque, r->tag, r->out, r->len, true);
        } else {
            atomic_fetch_add_explicit(&c->not_smaller, 1, RELAXED);
            rc = emit(opaque, r->tag, r->page, PAGE, false);
        }
        pool_req_release(c->pool, &r->req);
        if (rc < 0)
            return rc;
        n++;
    }
    return n;
}

typedef struct drain_arg {
    compressor *c;
    compress_emit_fn emit;
    void *opaque;
} drain_arg;

static int drain_emit(void *arg)
{
    drain_arg *a = arg;
    int rc = emit_ready(a->c, a->emit, a->opaque);

    return rc < 0 ? rc : 0;
}

int compress_submit(compressor *c, const void *page, uint64_t tag,
                    compress_emit_fn emit, void *opaque, lm_error *err)
{
    drain_arg da = { c, emit, opaque };
    pool_req *req = NULL;
    comp_req *r;
    bool busy;
    int rc = get_req(c->pool, drain_emit, &da, &req, &busy, err);

    if (busy)
        atomic_fetch_add_explicit(&c->busy, 1, RELAXED);
    if (rc < 0) {
        error_prefix(err, "compress");
        return rc;
    }
    r = (comp_req *)req;
    memcpy(r->page, page, PAGE);
    r->tag = tag;
    pool_submit_commit(c->pool, &r->req);
    atomic_fetch_add_explicit(&c->submitted, 1, RELAXED);
    return 0;
}

int compress_poll(compressor *c, compress_emit_fn emit, void *opaque)
{
    pool_poll_done(c->pool);
    return emit_ready(c, emit, opaque);
}

int compress_flush(compressor *c, compress_emit_fn emit, void *opaque, lm_error *err)
{
    int rc = pool_wait_done(c->pool, COMPRESS_WAIT_MS, err);

    if (rc < 0) {
        error_prefix(err, "compress");
        return rc;
    }
    rc = emit_ready(c, emit, opaque);
    return rc < 0 ? rc : 0;
}

void compress_interrupt(compressor *c)
{
    pool_interrupt(c->pool);
}

void compress_get_stats(compressor *c, compress_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->submitted = atomic_load_explicit(&c->submitted, RELAXED);
    st->busy = atomic_load_explicit(&c->busy, RELAXED);
    st->pages = atomic_load_explicit(&c->pages, RELAXED);
    st->compressed_size = atomic_load_explicit(&c->compressed_size, RELAXED);
    st->not_smaller = atomic_load_explicit(&c->not_smaller, RELAXED);
    if (st->submitted)
        st->busy_rate = (double)st->busy / (double)st->submitted;
    if (st->compressed_size)
        st->compression_rate = (double)st->pages * PAGE / (double)st->compressed_size;
}

/* ================================================================== destination */

typedef struct decomp_req {
    pool_req req;                 /* first: the pool's header */
    unsigned char *dest;
    uint64_t where;
    uint32_t len;
    int rc;                       /* 0 or -EINVAL, set by the worker */
    char why[120];                /* the zlib-level reason when rc < 0 */
    _Alignas(64) unsigned char in[COMPRESS_BOUND];
} decomp_req;

struct decompressor {
    worker_pool *pool;
    lm_error first;               /* owner only; code 0 = no error yet */
};

static int decomp_init(void *opaque, unsigned worker, void **wctx, lm_error *err)
{
    z_stream *zs = calloc(1, sizeof(*zs));
    int r;

    if (!zs)
        return error_set(err, -ENOMEM, "out of memory");
    r = inflateInit(zs);
    if (r != Z_OK) {
        free(zs);
        return error_set(err, r == Z_MEM_ERROR ? -ENOMEM : -EINVAL,
                         "zlib inflateInit: %s", zError(r));
    }
    *wctx = zs;
    return 0;
}

static void decomp_uninit(void *opaque, unsigned worker, void *wctx)
{
    z_stream *zs = wctx;

    if (zs) {
        inflateEnd(zs);
        free(zs);
    }
}

static void decomp_handler(void *opaque, void *wctx, pool_req *preq)
{
    decomp_req *r = (decomp_req *)preq;
    z_stream *zs = wctx;
    int rc;

    inflateReset(zs);
    zs->next_in = r->in;
    zs->avail_in = r->len;
    zs->next_out = r->dest;
    zs->avail_out = PAGE;  /* the only bound on what is written: one page */
    rc = inflate(zs, Z_FINISH);
    r->rc = -EINVAL;
    if (rc == Z_STREAM_END) {
        if (zs->avail_out != 0)
            snprintf(r->why, sizeof(r->why), "decompressed to %lu bytes, not %d",
                     (unsigned long)zs->total_out, PAGE);
        else if (zs->avail_in != 0)
            snprintf(r->why, sizeof(r->why), "%u bytes after the end of the zlib stream",
                     zs->avail_in);
        else
            r->rc = 0;
    } else if (rc == Z_BUF_ERROR || rc == Z_OK) {
        unsigned char extra;

        /* Out of input or out of room.  A full page does not tell which:
         * ask for one more byte, into a scratch byte, not the page. */
        if (zs->avail_out == 0) {
            zs->next_out = &extra;
            zs->avail_out = 1;
            rc = inflate(zs, Z_FINISH);
        }
        if (zs->avail_out == 0 || rc == Z_STREAM_END)
            snprintf(r->why, sizeof(r->why), "decompresses to more than %d bytes", PAGE);
        else if (rc == Z_BUF_ERROR || rc == Z_OK)
            snprintf(r->why, sizeof(r->why), "stream truncated after %lu bytes of output",
                     (unsigned long)zs->total_out);
        else
            snprintf(r->why, sizeof(r->why), "%s", zs->msg ? zs->msg : zError(rc));
    } else {
        snprintf(r->why, sizeof(r->why), "%s", zs->msg ? zs->msg : zError(rc));
    }
}

static pool_disposition decomp_done(void *opaque, pool_req *preq)
{
    decompressor *d = opaque;
    decomp_req *r = (decomp_req *)preq;

    if (r->rc < 0 && d->first.code == 0)
        error_set(&d->first, r->rc, "corrupt compressed page at byte offset %llu: zlib: %s",
                  (unsigned long long)r->where, r->why);
    return POOL_RECYCLE;
}

static const pool_ops decomp_ops = {
    .init = decomp_init,
    .uninit = decomp_uninit,
    .handler = decomp_handler,
    .done = decomp_done,
};

decompressor *decompress_new(int threads, lm_error *err)
{
    decompressor *d;

    if (threads < 1 || threads > COMPRESS_MAX_THREADS) {
        error_set(err, -EINVAL, "decompress-threads %d out of range 1..%d", threads,
                  COMPRESS_MAX_THREADS);
        return NULL;
    }
    if (zlib_bound_check(err) < 0)
        return NULL;
    d = calloc(1, sizeof(*d));
    if (!d) {
        error_set(err, -ENOMEM, "out of memory");
        return NULL;
    }
    d->pool = pool_create((unsigned)threads, COMPRESS_RING, sizeof(decomp_req),
                          "decompress", &decomp_ops, d, err);
    if (!d->pool) {
        free(d);
        return NULL;
    }
    return d;
}

void decompress_free(decompressor *d)
{
    if (!d)
        return;
    pool_destroy(d->pool);
    free(d);
}

static int decomp_failed(decompressor *d, lm_error *err)
{
    error_copy(err, &d->first);
    return d->first.code;
}

int decompress_submit(decompressor *d, void *dest_page, const void *data, uint32_t len,
                      uint64_t where, lm_error *err)
{
    pool_req *req = NULL;
    decomp_req *r;
    bool busy;
    int rc;

    if (d->first.code)
        return decomp_failed(d, err);
    if (len > COMPRESS_BOUND) {
        error_set(&d->first, -EINVAL,
                  "compressed page at byte offset %llu has length %u > bound %d",
                  (unsigned long long)where, len, COMPRESS_BOUND);
        return decomp_failed(d, err);
    }
    rc = get_req(d->pool, NULL, NULL, &req, &busy, err);
    if (rc < 0) {
        error_prefix(err, "decompress");
        return rc;
    }
    r = (decomp_req *)req;
    /* A page that failed while we waited: stop feeding workers. */
    if (d->first.code) {
        pool_req_release(d->pool, &r->req);
        return decomp_failed(d, err);
    }
    memcpy(r->in, data, len);
    r->len = len;
    r->dest = dest_page;
    r->where = where;
    pool_submit_commit(d->pool, &r->req);
    return 0;
}

int decompress_wait(decompressor *d, lm_error *err)
{
    int rc = pool_wait_done(d->pool, COMPRESS_WAIT_MS, err);

    if (rc < 0) {
        error_prefix(err, "decompress");
        return rc;
    }
    if (d->first.code)
        return decomp_failed(d, err);
    return 0;
}

void decompress_interrupt(decompressor *d)
{
    pool_interrupt(d->pool);
}

/* ------------------------------------------------------------------ the ram section */

/*
 * A finished page, written by the migration thread (emit runs on the thread
 * that polls).  It always carries CONTINUE: pages are only submitted while
 * the stream's last named block is theirs, and the pool is flushed before
 * the block changes (sink_page), so CONTINUE keeps meaning "that one".
 */
static int sink_emit(void *opaque, uint64_t tag, const void *data, uint32_t len, bool compressed)
{
    compressor *c = opaque;
    lm_stream *s = c->sink_stream;

    if (compressed) {
        lm_put_be64(s, tag | RAM_COMPRESS_PAGE | RAM_CONTINUE);
        lm_put_be32(s, len);
        lm_put_buffer(s, data, len);
    } else {
        /* not smaller: a normal page, from the bounce copy */
        lm_put_be64(s, tag | RAM_PAGE | RAM_CONTINUE);
        lm_put_buffer(s, data, RAM_PAGE_SIZE);
    }
    return lm_stream_error(s);
}

static int sink_flush(void *impl, ram_state *r, lm_stream *s, lm_error *err)
{
    compressor *c = impl;

    c->sink_ram = r;
    c->sink_stream = s;
    if (compress_flush(c, sink_emit, c, err)) {
        error_prefix(err, "compress");
        return err->code ? err->code : -EIO;
    }
    return 0;
}

static int sink_page(void *impl, ram_state *r, lm_stream *s, ramblock *b, uint64_t page)
{
    compressor *c = impl;
    const uint8_t *p = b->host + page * RAM_PAGE_SIZE;
    lm_error err = { 0 };

    if (buf_is_zero(p, RAM_PAGE_SIZE)) {
        ram_put_zero(r, s, b, page);
        return RAM_SENT_ZERO;
    }
    if (b != r->last_sent) {
        /* A new block: its first page is a named PAGE record, after every
         * page of the previous block. */
        if (sink_flush(c, r, s, &err)) {
            lm_stream_set_error(s, err.code ? err.code : -EIO, "%s", err.msg);
            return RAM_SENT_STREAM;
        }
        ram_put_page(r, s, b, page);
        return RAM_SENT_STREAM;
    }
    c->sink_ram = r;
    c->sink_stream = s;
    if (compress_submit(c, p, page * RAM_PAGE_SIZE, sink_emit, c, &err) ||
        compress_poll(c, sink_emit, c) < 0)
        lm_stream_set_error(s, err.code ? err.code : -EIO, "compress: %s", err.msg);
    return RAM_SENT_STREAM;
}

static const ram_sink_ops sink_ops = {
    .name = "compress",
    .page = sink_page,
    .flush = sink_flush,
};

ram_sink compress_sink(compressor *c)
{
    return (ram_sink){ &sink_ops, c };
}

/* COMPRESS_PAGE: be32 len then len bytes of one complete zlib stream; any
 * other record is placed as usual. */
static int place_record(void *impl, ram_state *r, lm_stream *s, ramblock *b, uint64_t offset,
                        uint64_t flags, uint64_t at)
{
    decompressor *d = impl;
    uint8_t data[COMPRESS_BOUND];
    uint32_t len;
    lm_error err;

    if (flags != RAM_COMPRESS_PAGE)
        return ram_place_direct(r, s, b, offset, flags, at);
    if (lm_get_be32(s, &len))
        return -1;
    if (len == 0 || len > COMPRESS_BOUND) {
        lm_stream_set_error(s, -EINVAL, "compressed page at byte offset %" PRIu64 " has "
                            "length %u (1..%d)", at, len, COMPRESS_BOUND);
        return -1;
    }
    if (lm_get_buffer(s, data, len))
        return -1;
    if (decompress_submit(d, b->host + offset, data, len, at, &err)) {
        lm_stream_set_error(s, err.code, "%s", err.msg);
        return -1;
    }
    /* counted when submitted: the EOS waits until it is in place */
    ram_received(b, offset / RAM_PAGE_SIZE, 1);
    return 0;
}

static int place_sync(void *impl, ram_state *r, lm_stream *s, uint64_t at)
{
    lm_error err;

    (void)r;
    (void)at;
    if (decompress_wait(impl, &err)) {
        lm_stream_set_error(s, err.code, "%s", err.msg);
        return -1;
    }
    return 0;
}

static const ram_placer_ops placer_ops = {
    .name = "decompress",
    .record = place_record,
    .sync = place_sync,
};

ram_placer decompress_placer(decompressor *d)
{
    return (ram_placer){ &placer_ops, d };
}
