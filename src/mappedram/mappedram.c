/*
 * mapped-ram file layout and its parallel page I/O; see mappedram.h.
 *
 * The owner blocks in exactly two places, both worker_pool waits without a
 * timeout: mr_submit() when every worker has all its requests out (the
 * file is slower than the scan), and mapped_ram_sync() until every queued
 * request is done.  mapped_ram_interrupt() ends both at once, and from then
 * on mr_submit() queues nothing more, so a cancelled save stops writing
 * after the requests already running (at most one chunk per worker) instead
 * of draining the queue or finishing the pass.
 */
#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "integrity/integrity.h"
#include "mappedram/mappedram.h"
#include "util/bitmap.h"
#include "util/error.h"
#include "util/pool.h"
#include "util/zero.h"

typedef struct mr_req {
    pool_req req;               /* first: the pool's header */
    uint8_t *host;
    size_t len;
    uint64_t off;               /* absolute file offset */
    int err;                    /* 0 or -errno, set by the worker */
    /* x-integrity: the run's block and first page, and the block's checksum
     * table (the worker fills or checks the run's entries); bad = the page
     * of the run that failed (err -EBADMSG) */
    const ramblock *blk;
    uint64_t page0, bad;
    uint64_t *sums;
} mr_req;

/* Where a block lives in the file, and (source) which pages it holds. */
typedef struct mr_block {
    uint64_t bitmap_off, pages_off;     /* absolute file offsets */
    unsigned long *file_bmap;
    /* x-integrity: every page's checksum (host order), written after the
     * bitmap at table_off, followed by the sum over bitmap and table */
    uint64_t table_off;
    uint64_t *sums;
} mr_block;

struct mapped_ram_file {
    mr_block blk[RAM_MAX_BLOCKS];       /* by block index in ram_state */
    bool zero_check;                    /* source: zero pages get a clear bit */
    bool integrity;                     /* x-integrity (ram_state's, at START) */
    char path[4096];
    int flags;                  /* open flags of the workers' descriptors */
    bool write;
    uint64_t base;
    int main_fd;
    worker_pool *pool;
    int err;                    /* first I/O error (owner only) */
    uint64_t bytes;             /* page bytes queued (owner only) */
    uint64_t err_off;
    const ramblock *err_blk;    /* -EBADMSG: the page that failed its checksum */
    uint64_t err_page;
    /* the run being collected (source) */
    uint8_t *run_host;
    size_t run_len;
    uint64_t run_off;
    const ramblock *run_blk;
    uint64_t run_page0;
    uint64_t *run_sums;
};

/* ------------------------------------------------------------ the pool */

static int mr_worker_init(void *opaque, unsigned worker, void **wctx, lm_error *err)
{
    mapped_ram_file *mr = opaque;
    int fd = open(mr->path, mr->flags | O_CLOEXEC);

    if (fd < 0) {
        if (errno == EINVAL && (mr->flags & O_DIRECT))
            return error_set(err, -EINVAL, "direct-io: the file system refuses O_DIRECT "
                             "for %s", mr->path);
        return error_set_errno(err, -errno, "mapped-ram: cannot open %s", mr->path);
    }
    *wctx = (void *)(intptr_t)fd;
    (void)worker;
    return 0;
}

static void mr_worker_uninit(void *opaque, unsigned worker, void *wctx)
{
    close((int)(intptr_t)wctx);
}

static void mr_handler(void *opaque, void *wctx, pool_req *preq)
{
    mapped_ram_file *mr = opaque;
    mr_req *r = (mr_req *)preq;
    int fd = (int)(intptr_t)wctx;
    size_t done = 0;

    r->err = 0;
    while (done < r->len) {
        ssize_t n = mr->write ? pwrite(fd, r->host + done, r->len - done, (off_t)(r->off + done))
                              : pread(fd, r->host + done, r->len - done, (off_t)(r->off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            r->err = n < 0 ? -errno : -EPIPE;   /* EOF inside the pages region */
            return;
        }
        done += (size_t)n;
    }
    /* x-integrity: each page of the run hashed right after its I/O (still
     * in cache): the source records its sum, the destination checks it
     * before the page counts.  A source page the guest wrote after the
     * pwrite is dirty and is written again with a new sum (the last pass
     * runs with the guest stopped), so file and table end up agreeing. */
    for (size_t i = 0; r->sums && i < r->len / RAM_PAGE_SIZE; i++) {
        uint64_t page = r->page0 + i;
        uint64_t sum = integrity_page(r->blk->seed, page * RAM_PAGE_SIZE,
                                      r->host + i * RAM_PAGE_SIZE);
        if (mr->write) {
            r->sums[page] = sum;
        } else if (r->sums[page] != sum) {
            r->err = -EBADMSG;
            r->bad = i;
            return;
        }
    }
}

static pool_disposition mr_done(void *opaque, pool_req *preq)
{
    mapped_ram_file *mr = opaque;
    mr_req *r = (mr_req *)preq;

    if (r->err && !mr->err) {
        mr->err = r->err;
        mr->err_off = r->off;
        if (r->err == -EBADMSG) {
            mr->err_off = r->off + r->bad * RAM_PAGE_SIZE;
            mr->err_blk = r->blk;
            mr->err_page = r->page0 + r->bad;
        }
    }
    return POOL_RECYCLE;
}

static const pool_ops mr_ops = {
    .init = mr_worker_init,
    .uninit = mr_worker_uninit,
    .handler = mr_handler,
    .done = mr_done,
};

mapped_ram_file *mapped_ram_open(const char *path, uint64_t base, int main_fd, int channels,
                                 bool direct, bool write, lm_error *err)
{
    mapped_ram_file *mr = calloc(1, sizeof(*mr));

    if (!mr)
        abort();
    if (direct && (base & (RAM_PAGE_SIZE - 1))) {
        error_set(err, -EINVAL, "direct-io needs a file offset aligned to 4096 (offset=%"
                  PRIu64 ")", base);
        free(mr);
        return NULL;
    }
    snprintf(mr->path, sizeof(mr->path), "%s", path);
    mr->flags = (write ? O_WRONLY : O_RDONLY) | (direct ? O_DIRECT : 0);
    mr->write = write;
    mr->base = base;
    mr->main_fd = main_fd;
    mr->pool = pool_create((unsigned)channels, 0, sizeof(mr_req), "lm-mapram", &mr_ops, mr,
                           err);
    if (!mr->pool) {
        free(mr);
        return NULL;
    }
    return mr;
}

uint64_t mapped_ram_bytes(const mapped_ram_file *mr)
{
    return mr ? mr->bytes : 0;
}

void mapped_ram_interrupt(mapped_ram_file *mr)
{
    if (mr)
        pool_interrupt(mr->pool);
}

void mapped_ram_close(mapped_ram_file *mr)
{
    if (!mr)
        return;
    if (!pool_interrupted(mr->pool))
        pool_wait_done(mr->pool, 60000, NULL);
    pool_destroy(mr->pool);
    for (int i = 0; i < RAM_MAX_BLOCKS; i++) {
        bitmap_free(mr->blk[i].file_bmap);
        free(mr->blk[i].sums);
    }
    free(mr);
}

static mr_block *mr_blk(mapped_ram_file *mr, const ram_state *r, const ramblock *b)
{
    ptrdiff_t i = b - r->blocks;

    assert(i >= 0 && i < r->nblocks);
    return &mr->blk[i];
}

/* Queue one run.  Waits for a free request when every worker is busy.
 * 0, or -ECANCELED once interrupted (then nothing is queued). */
static int mr_submit(mapped_ram_file *mr, uint8_t *host, size_t len, uint64_t off,
                     const ramblock *b, uint64_t page0, uint64_t *sums)
{
    pool_req *preq;

    /* A free request would be taken even after a cancel: check first. */
    if (pool_interrupted(mr->pool))
        return -ECANCELED;
    while (!(preq = pool_submit_prepare(mr->pool))) {
        int ret = pool_wait_any(mr->pool, 1, -1, NULL);
        if (ret < 0)
            return ret;
    }
    mr_req *r = (mr_req *)preq;
    r->host = host;
    r->len = len;
    r->off = off;
    r->err = 0;
    r->blk = b;
    r->page0 = page0;
    r->sums = sums;
    mr->bytes += len;   /* counted when queued: the rate limit sees it at once */
    pool_submit_commit(mr->pool, preq);
    pool_poll_done(mr->pool);
    return 0;
}

static int mr_flush_run(mapped_ram_file *mr)
{
    int ret = 0;

    if (mr->run_len)
        ret = mr_submit(mr, mr->run_host, mr->run_len, mr->run_off, mr->run_blk, mr->run_page0,
                        mr->run_sums);
    mr->run_len = 0;
    return ret;
}

static int mr_error(mapped_ram_file *mr, int ret, lm_error *err)
{
    if (mr->err == -EBADMSG)
        return error_set(err, mr->err, "integrity: page 0x%" PRIx64 " of RAM block '%s' does "
                         "not match its checksum (file offset %" PRIu64 "): the file is "
                         "corrupt", (uint64_t)(mr->err_page * RAM_PAGE_SIZE), mr->err_blk->idstr,
                         mr->err_off);
    if (mr->err)
        return error_set(err, mr->err, "mapped-ram: %s at file offset %" PRIu64 ": %s",
                         mr->write ? "write" : "read", mr->err_off,
                         mr->err == -EPIPE ? "the file ends inside a pages region"
                         : strerror(-mr->err));
    if (ret)
        return error_set(err, ret, "mapped-ram: I/O interrupted");
    return 0;
}

int mapped_ram_sync(mapped_ram_file *mr, lm_error *err)
{
    int ret = mr_flush_run(mr);

    if (!ret)
        ret = pool_wait_done(mr->pool, -1, NULL);
    return mr_error(mr, ret, err);
}

/* ------------------------------------------------------------ source */

static uint64_t mr_bitmap_bytes(const ramblock *b)
{
    return BITMAP_WORDS(b->npages) * sizeof(unsigned long);
}

/* x-integrity: a be64 checksum per page, then one over bitmap and table. */
static uint64_t mr_table_bytes(const mapped_ram_file *mr, const ramblock *b)
{
    return mr->integrity ? 8 * b->npages + 8 : 0;
}

/* Sink, START: the block's header, then the stream resumes after its pages. */
static void mr_sink_block(void *impl, ram_state *r, lm_stream *s, ramblock *b)
{
    mapped_ram_file *mr = impl;
    mr_block *k = mr_blk(mr, r, b);
    uint64_t here = mr->base + lm_stream_offset(s);

    mr->integrity = r->integrity;
    k->bitmap_off = here + MAPPED_RAM_HDR_SIZE;
    k->table_off = k->bitmap_off + mr_bitmap_bytes(b);
    k->pages_off = (k->table_off + mr_table_bytes(mr, b) + MAPPED_RAM_ALIGN - 1) &
                   ~(MAPPED_RAM_ALIGN - 1);
    bitmap_free(k->file_bmap);
    k->file_bmap = bitmap_new(b->npages);
    free(k->sums);
    k->sums = NULL;
    if (mr->integrity && !(k->sums = calloc(b->npages, sizeof(*k->sums))))
        abort();
    lm_put_be32(s, MAPPED_RAM_VERSION);
    lm_put_be64(s, RAM_PAGE_SIZE);
    lm_put_be64(s, k->bitmap_off);
    lm_put_be64(s, k->pages_off);
    /* The bitmap is written at the end; the stream resumes after the pages. */
    stream_seek(s, k->pages_off + b->length - mr->base);
}

/* Sink: a page goes to its own slot; adjacent slots make one write. */
static int mr_sink_page(void *impl, ram_state *r, lm_stream *s, ramblock *b, uint64_t page)
{
    mapped_ram_file *mr = impl;
    mr_block *k = mr_blk(mr, r, b);
    uint64_t off = k->pages_off + page * RAM_PAGE_SIZE;
    uint8_t *host = b->host + page * RAM_PAGE_SIZE;

    (void)s;
    if (mr->zero_check && buf_is_zero(host, RAM_PAGE_SIZE)) {
        /* Its old bytes may stay in the file; a clear bit means "zero". */
        bitmap_clear(k->file_bmap, page);
        if (k->sums)
            k->sums[page] = integrity_fill(b->seed, page * RAM_PAGE_SIZE, 0);
        return RAM_SENT_ZERO;
    }
    bitmap_set(k->file_bmap, page);
    if (mr->run_len && mr->run_host + mr->run_len == host && mr->run_off + mr->run_len == off &&
        mr->run_len < MAPPED_RAM_CHUNK) {
        mr->run_len += RAM_PAGE_SIZE;
        return RAM_SENT_AWAY;
    }
    if (mr_flush_run(mr))
        return RAM_SENT_AWAY;   /* interrupted: mapped_ram_sync reports it */
    mr->run_host = host;
    mr->run_off = off;
    mr->run_len = RAM_PAGE_SIZE;
    mr->run_blk = b;
    mr->run_page0 = page;
    mr->run_sums = k->sums;
    return RAM_SENT_AWAY;
}

/* Sink, before each EOS: a page written in this pass is on its way to disk
 * before the same page can be queued again in the next. */
static int mr_sink_flush(void *impl, ram_state *r, lm_stream *s, lm_error *err)
{
    (void)r;
    (void)s;
    return mapped_ram_sync(impl, err);
}

static const ram_sink_ops mr_sink_ops = {
    .name = "mapped-ram",
    .block = mr_sink_block,
    .page = mr_sink_page,
    .flush = mr_sink_flush,
};

ram_sink mapped_ram_sink(mapped_ram_file *mr, bool zero_check)
{
    mr->zero_check = zero_check;
    return (ram_sink){ &mr_sink_ops, mr };
}

/*
 * x-integrity: the block's checksum table (be64 per page) and, last, the
 * sum over the bitmap and the table as written, so a flipped bitmap bit or
 * table entry is found before any page is trusted.
 */
static uint64_t mr_meta_sum(const ramblock *b, const void *bmap, size_t blen,
                            const void *table, size_t tlen)
{
    return integrity_buf(table, tlen, integrity_buf(bmap, blen, b->seed));
}

static int mr_put_table(mapped_ram_file *mr, const ramblock *b, const mr_block *k,
                        lm_error *err)
{
    size_t tlen = 8 * b->npages;
    uint64_t *table = malloc(tlen + 8);
    int ret = 0;

    if (!table)
        abort();
    for (uint64_t p = 0; p < b->npages; p++)
        table[p] = htobe64(k->sums[p]);
    table[b->npages] = htobe64(mr_meta_sum(b, k->file_bmap, mr_bitmap_bytes(b), table, tlen));
    if (pwrite(mr->main_fd, table, tlen + 8, (off_t)k->table_off) != (ssize_t)(tlen + 8))
        ret = error_set_errno(err, -errno, "mapped-ram: writing the checksum table of '%s'",
                              b->idstr);
    free(table);
    return ret;
}

int mapped_ram_put_bitmaps(mapped_ram_file *mr, ram_state *r, lm_error *err)
{
    for (int i = 0; i < r->nblocks; i++) {
        ramblock *b = &r->blocks[i];
        mr_block *k = &mr->blk[i];
        size_t len = mr_bitmap_bytes(b);

        if (pwrite(mr->main_fd, k->file_bmap, len, (off_t)k->bitmap_off) != (ssize_t)len)
            return error_set_errno(err, -errno, "mapped-ram: writing the bitmap of '%s'",
                                   b->idstr);
        if (k->sums && mr_put_table(mr, b, k, err))
            return -EIO;
    }
    return 0;
}

/* ------------------------------------------------------------ destination */

/*
 * x-integrity, destination: read the block's checksum table after its
 * bitmap and check the sum over both first (a flipped bitmap bit is caught
 * here); a page the bitmap leaves out is zero, so its entry must be the zero
 * page's.  The workers check each present page against the table.
 */
static int mr_get_table(mapped_ram_file *mr, lm_stream *s, const ramblock *b, mr_block *k,
                        const unsigned long *bmap, uint64_t bmap_off, uint64_t at)
{
    size_t tlen = 8 * b->npages;
    uint64_t table_off = bmap_off + mr_bitmap_bytes(b), *table = malloc(tlen + 8);

    if (!table)
        abort();
    if (pread(mr->main_fd, table, tlen + 8, (off_t)table_off) != (ssize_t)(tlen + 8)) {
        lm_stream_set_error(s, -EINVAL, "mapped-ram: block '%s' (header at byte offset %"
                            PRIu64 "): cannot read its checksum table at file offset %"
                            PRIu64, b->idstr, at, table_off);
        goto fail;
    }
    if (be64toh(table[b->npages]) != mr_meta_sum(b, bmap, mr_bitmap_bytes(b), table, tlen)) {
        lm_stream_set_error(s, -EBADMSG, "integrity: the bitmap or checksum table of RAM "
                            "block '%s' (bitmap at file offset %" PRIu64 ", table at %" PRIu64
                            ") does not match its checksum: the file is corrupt", b->idstr,
                            bmap_off, table_off);
        goto fail;
    }
    free(k->sums);
    k->sums = table;
    for (uint64_t p = 0; p < b->npages; p++) {
        table[p] = be64toh(table[p]);
        if (!bitmap_test(bmap, p) && table[p] != integrity_fill(b->seed, p * RAM_PAGE_SIZE, 0)) {
            lm_stream_set_error(s, -EBADMSG, "integrity: page 0x%" PRIx64 " of RAM block "
                                "'%s' is absent from the bitmap (zero) but its checksum is "
                                "not the zero page's (table at file offset %" PRIu64 ")",
                                (uint64_t)(p * RAM_PAGE_SIZE), b->idstr, table_off);
            return -1;
        }
    }
    return 0;
fail:
    free(table);
    return -1;
}

/* Placer, START: check the block's header, read its bitmap, queue the reads
 * of every present page, seek past the pages region. */
static int mr_place_block(void *impl, ram_state *r, lm_stream *s, ramblock *b)
{
    mapped_ram_file *mr = impl;
    uint64_t at = lm_stream_offset(s), here = mr->base + at + MAPPED_RAM_HDR_SIZE;
    uint32_t version;
    uint64_t page_size, bmap_off, pages_off, bytes = mr_bitmap_bytes(b);
    struct stat st;
    unsigned long *bmap;

    if (lm_get_be32(s, &version) || lm_get_be64(s, &page_size) || lm_get_be64(s, &bmap_off) ||
        lm_get_be64(s, &pages_off))
        return -1;
#define BAD(...) do { lm_stream_set_error(s, -EINVAL, "mapped-ram: block '%s' (header at " \
                      "byte offset %" PRIu64 "): " __VA_ARGS__); return -1; } while (0)
    if (version == 0 || version > MAPPED_RAM_VERSION)
        BAD("unsupported version %u", b->idstr, at, version);
    if (page_size != RAM_PAGE_SIZE)
        BAD("page size %" PRIu64 ", expected 4096", b->idstr, at, page_size);
    if (bmap_off < here || bmap_off > UINT64_MAX - bytes)
        BAD("bitmap offset %" PRIu64 " overlaps the stream", b->idstr, at, bmap_off);
    if (pages_off & (RAM_PAGE_SIZE - 1))
        BAD("pages offset %" PRIu64 " is not page aligned", b->idstr, at, pages_off);
    mr->integrity = r->integrity;
    if (pages_off < bmap_off + bytes + mr_table_bytes(mr, b) || pages_off > UINT64_MAX - b->length)
        BAD("pages offset %" PRIu64 " overlaps the bitmap%s (%" PRIu64 " bytes at %" PRIu64 ")",
            b->idstr, at, pages_off, mr->integrity ? " and checksum table" : "",
            bytes + mr_table_bytes(mr, b), bmap_off);
    if (fstat(mr->main_fd, &st) == 0 && (uint64_t)st.st_size < pages_off + b->length)
        BAD("the file is truncated: its pages region ends at %" PRIu64 " but the file has %"
            PRIu64 " bytes", b->idstr, at, pages_off + b->length, (uint64_t)st.st_size);
    bmap = bitmap_new(b->npages);
    if (pread(mr->main_fd, bmap, bytes, (off_t)bmap_off) != (ssize_t)bytes) {
        bitmap_free(bmap);
        BAD("cannot read the bitmap at file offset %" PRIu64, b->idstr, at, bmap_off);
    }
    if (b->npages % BITMAP_BITS_PER_LONG &&
        bmap[b->npages / BITMAP_BITS_PER_LONG] >> (b->npages % BITMAP_BITS_PER_LONG)) {
        bitmap_free(bmap);
        BAD("the bitmap at file offset %" PRIu64 " has pages past the block's end", b->idstr,
            at, bmap_off);
    }
#undef BAD
    if (mr->integrity && mr_get_table(mr, s, b, mr_blk(mr, r, b), bmap, bmap_off, at)) {
        bitmap_free(bmap);
        return -1;
    }
    /* Each run of present pages, in chunks of at most 1 MiB. */
    for (uint64_t p = bitmap_next_set(bmap, b->npages, 0); p < b->npages;) {
        uint64_t end = bitmap_next_clear(bmap, b->npages, p);
        uint64_t max = p + MAPPED_RAM_CHUNK / RAM_PAGE_SIZE;
        if (end > max)
            end = max;
        if (mr_submit(mr, b->host + p * RAM_PAGE_SIZE, (end - p) * RAM_PAGE_SIZE,
                      pages_off + p * RAM_PAGE_SIZE, b, p, mr_blk(mr, r, b)->sums) < 0) {
            bitmap_free(bmap);
            lm_stream_set_error(s, -ECANCELED, "mapped-ram: loading interrupted");
            return -1;
        }
        p = bitmap_next_set(bmap, b->npages, end);
    }
    bitmap_free(bmap);
    stream_seek(s, pages_off + b->length - mr->base);
    return lm_stream_error(s) ? -1 : 0;
}

/* Placer, after the block list: all of RAM is in once the reads are done;
 * pages the bitmaps leave out are zero by definition. */
static int mr_place_blocks_done(void *impl, ram_state *r, lm_stream *s)
{
    lm_error err;

    if (mapped_ram_sync(impl, &err)) {
        lm_stream_set_error(s, err.code, "%s", err.msg);
        return -1;
    }
    for (int i = 0; i < r->nblocks; i++)
        ram_received(&r->blocks[i], 0, r->blocks[i].npages);
    return 0;
}

/* Placer: no page record ever travels in a mapped-ram stream. */
static int mr_place_record(void *impl, ram_state *r, lm_stream *s, ramblock *b,
                           uint64_t offset, uint64_t flags, uint64_t at)
{
    (void)impl;
    (void)r;
    (void)b;
    (void)offset;
    lm_stream_set_error(s, -EINVAL, "ram: page record (flags 0x%" PRIx64 ") in a mapped-ram "
                        "stream at byte offset %" PRIu64, flags, at);
    return -1;
}

static const ram_placer_ops mr_placer_ops = {
    .name = "mapped-ram",
    .block = mr_place_block,
    .blocks_done = mr_place_blocks_done,
    .record = mr_place_record,
};

ram_placer mapped_ram_placer(mapped_ram_file *mr)
{
    return (ram_placer){ &mr_placer_ops, mr };
}
