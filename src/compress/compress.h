/*
 * Page compression for the `compress` capability: QEMU 7.2's
 * compress-threads format, on worker pools (util/pool.h).
 *
 * Wire format (reference section 7.2): a compressed page is one complete,
 * independent zlib stream (deflateReset + Z_FINISH per page, at
 * compress-level), decompressing to exactly COMPRESS_PAGE_SIZE bytes.
 * This module only turns pages into such streams and back; the ram section
 * writes and parses the records (`be64 offset|COMPRESS_PAGE[|CONTINUE]`,
 * `be32 len`, data).
 *
 * Source side (compressor):
 *   The migration thread -- the only thread that may call anything here but
 *   compress_interrupt() and compress_get_stats() -- submits pages;
 *   submit copies the page into a request's bounce buffer at once (the guest
 *   keeps writing) and queues it on a worker.  Finished pages come back
 *   through compress_poll() / compress_flush(), which call `emit` ON
 *   THE CALLING THREAD, in completion order (not page order, as in QEMU),
 *   so the migration thread alone writes the stream.  A page whose zlib form
 *   would not be smaller than the page is emitted with compressed=false and
 *   data = the bounce copy (send it as a normal page).  Zero pages should be
 *   sent as ZERO records by the caller and never submitted.
 *
 *   Buffers: `page` passed to submit is read during the call only.  `data`
 *   passed to emit is valid during the emit call only.
 *
 *   Submit blocks while every worker is busy (QEMU's compress-wait-thread
 *   =true), emitting finished pages meanwhile -- that is what frees a
 *   request, so submit takes `emit` too.  The wait is bounded:
 *   COMPRESS_WAIT_MS without enough pages finishing is an error, and
 *   compress_interrupt() from any thread ends it at once with
 *   -ECANCELED.  compress_poll() emits what is finished without waiting
 *   (one load when nothing is): calling it after each submit keeps results
 *   flowing while the workers are not all busy.
 *
 * Destination side (decompressor):
 *   The loading thread submits (dest_page, data, len, where); the data is
 *   copied into the request and a worker inflates it straight into
 *   dest_page, writing nothing outside those COMPRESS_PAGE_SIZE bytes.
 *   decompress_wait() returns once every submitted page is written (all
 *   its writes are visible to the caller then) and reports the first error.
 *   Two submissions for the same dest_page must be separated by a wait
 *   (they could finish in either order); so must a submission and any
 *   other write to that page.
 *
 * Errors name the stream position given as `where`:
 *   "corrupt compressed page at byte offset N: zlib: <reason>"
 *   "compressed page at byte offset N has length L > bound B"
 */
#ifndef COMPRESS_COMPRESS_H
#define COMPRESS_COMPRESS_H

#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "ram/ram.h"

#define COMPRESS_PAGE_SIZE 4096
/* zlib's compressBound(4096): the largest len a destination accepts. */
#define COMPRESS_BOUND 4110
#define COMPRESS_MAX_THREADS 255
/*
 * Requests per worker (the pool's ring size).  The migration thread sleeps
 * once per batch of half of what is out, so a worker's queue depth bounds
 * how many pages it handles per wake-up: 16 measured 17x (1 thread) to 37x
 * (2 threads) fewer context switches than the mutex model, 4 only 4x-10x
 * (bench/pool.md).  Memory: ~8 KiB per request.
 */
#define COMPRESS_RING 16
/* How long submit / flush / wait may go without any page finishing. */
#define COMPRESS_WAIT_MS 30000

/* ------------------------------------------------------------------ source */

typedef struct compressor compressor;

/*
 * Called on the thread that polls, once per finished page.  Return 0, or a
 * negative errno to stop the poll (the page is consumed either way).
 */
typedef int (*compress_emit_fn)(void *opaque, uint64_t tag, const void *data,
                                uint32_t len, bool compressed);

/* threads: 1..COMPRESS_MAX_THREADS; level: 0..9 (zlib). */
compressor *compress_new(int threads, int level, lm_error *err);
/*
 * For benchmarks: the same with the pool's ring size (0 = COMPRESS_RING)
 * and tuning (spin budget; NULL = default) chosen, and access to the pool
 * (for pool_get_stats).
 */
struct pool_tuning;
struct worker_pool;
compressor *compress_new_tuned(int threads, int level, unsigned ring_size,
                               const struct pool_tuning *tuning, lm_error *err);
struct worker_pool *compress_pool_of(compressor *c);
/* Stops the workers; pages not yet emitted are dropped.  NULL is a no-op. */
void compress_free(compressor *c);

/*
 * Queue a copy of the page (COMPRESS_PAGE_SIZE bytes) tagged `tag` (the
 * caller's: e.g. block index and offset), emitting finished pages while it
 * waits for room.  0, -ECANCELED (interrupted), -ETIMEDOUT, or emit's
 * error; err says which.
 */
int compress_submit(compressor *c, const void *page, uint64_t tag,
                    compress_emit_fn emit, void *opaque, lm_error *err);

/* Emit every page finished so far.  Number emitted, or emit's error. */
int compress_poll(compressor *c, compress_emit_fn emit, void *opaque);

/*
 * Wait for every submitted page and emit them all: call before each dirty
 * bitmap sync and at the end of each ram section, so a page's record is in
 * the stream before the page can be sent again.  0 or a negative errno.
 */
int compress_flush(compressor *c, compress_emit_fn emit, void *opaque, lm_error *err);

/* Any thread: end current and later waits with -ECANCELED.  Sticky. */
void compress_interrupt(compressor *c);

/* query-migrate's "compression" object; cumulative since compress_new. */
typedef struct compress_stats {
    uint64_t pages;            /* pages emitted compressed */
    uint64_t busy;             /* submissions that found no free worker */
    double busy_rate;          /* busy / submitted */
    uint64_t compressed_size;  /* bytes of zlib data emitted */
    double compression_rate;   /* pages * page size / compressed_size (0 if none) */
    uint64_t submitted;        /* pages submitted */
    uint64_t not_smaller;      /* emitted uncompressed: zlib form not smaller */
} compress_stats;

/* Any thread. */
void compress_get_stats(compressor *c, compress_stats *st);

/*
 * The sink (ram.h) of the `compress` capability: zero pages as ZERO
 * records, a block's first page as a named PAGE record, every other page
 * compressed by the pool and written -- by the migration thread, as it
 * polls -- as a COMPRESS_PAGE record with CONTINUE (or PAGE when zlib does
 * not make it smaller); the pool is flushed before each EOS and each block
 * change.  Valid while c lives.
 */
ram_sink compress_sink(compressor *c);

/* ------------------------------------------------------------------ destination */

typedef struct decompressor decompressor;

/* threads: 1..COMPRESS_MAX_THREADS. */
decompressor *decompress_new(int threads, lm_error *err);
/* Stops the workers (pages in flight may be half written).  NULL is a no-op. */
void decompress_free(decompressor *d);

/*
 * Decompress `len` bytes of `data` (copied before return) into dest_page
 * (COMPRESS_PAGE_SIZE bytes, written by a worker until the next wait).
 * `where` is the record's byte offset in the stream, for messages.  Returns
 * 0, or the error: len > COMPRESS_BOUND, an earlier page's failure found
 * on the way, -ECANCELED, -ETIMEDOUT.
 */
int decompress_submit(decompressor *d, void *dest_page, const void *data, uint32_t len,
                      uint64_t where, lm_error *err);

/* Wait for every submitted page; 0 or the first error (which stays latched). */
int decompress_wait(decompressor *d, lm_error *err);

/* Any thread: end current and later waits with -ECANCELED.  Sticky. */
void decompress_interrupt(decompressor *d);

/* The placer (ram.h): COMPRESS_PAGE records into the pool, the rest placed
 * directly; every EOS waits until each page is in place. */
ram_placer decompress_placer(decompressor *d);

#endif
