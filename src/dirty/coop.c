/*
 * Cooperative dirty tracker: the program reports its writes.
 *
 * Each region has a log bitmap (one bit per page, 32 KiB per GiB of RAM)
 * allocated for the tracker's whole life, so dirty_mark() never
 * allocates and never takes a lock: it is one atomic OR per 64 pages.
 * sync() drains a region's log into the caller's bitmap with
 * bitmap_move_atomic(), an exchange per non-zero word, so a mark racing
 * with the drain lands either in this sync or in the next one.
 *
 * Ordering: the writer writes the page, then marks it (release); sync's
 * exchange is an acquire, so the migration thread that then reads the page
 * sees the data that was marked.  Marking before writing would be a bug in
 * the caller (the page could be sent before the write and never again).
 *
 * On/off: marks are ignored unless coop_on is set.  start() clears every
 * log, then sets coop_on (release); stop() clears it.  A mark that read
 * coop_on just before a stop can still land after it; the next start()
 * clears it away, so it costs at most one spurious page.
 *
 * The logs are only touched with atomics (also the clearing in start),
 * because markers may run on other threads at any time.
 */
#include <errno.h>
#include <stdlib.h>

#include "dirty/dirty_impl.h"
#include "util/bitmap.h"
#include "util/error.h"

static int coop_init(dirty_tracker *d, lm_error *err)
{
    d->coop_log = calloc(d->n ? (size_t)d->n : 1, sizeof(*d->coop_log));
    if (!d->coop_log)
        return error_set(err, -ENOMEM, "cooperative: out of memory");
    for (int r = 0; r < d->n; r++)
        d->coop_log[r] = bitmap_new(d->npages[r]);
    return 0;
}

static void coop_fini(dirty_tracker *d)
{
    if (!d->coop_log)
        return;
    for (int r = 0; r < d->n; r++)
        bitmap_free(d->coop_log[r]);
    free(d->coop_log);
    d->coop_log = NULL;
}

static int coop_start(dirty_tracker *d, lm_error *err)
{
    for (int r = 0; r < d->n; r++) {
        unsigned long *log = d->coop_log[r];
        size_t words = BITMAP_WORDS(d->npages[r]);

        for (size_t w = 0; w < words; w++)
            __atomic_store_n(&log[w], 0UL, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&d->coop_on, 1, __ATOMIC_RELEASE);
    return 0;
}

static int64_t coop_sync(dirty_tracker *d, int r, unsigned long *bitmap, lm_error *err)
{
    return (int64_t)bitmap_move_atomic(bitmap, d->coop_log[r], d->npages[r]);
}

static void coop_stop(dirty_tracker *d)
{
    __atomic_store_n(&d->coop_on, 0, __ATOMIC_RELEASE);
}

static void coop_mark(dirty_tracker *d, int r, uint64_t offset, uint64_t len)
{
    const dirty_region *reg = &d->regions[r];
    uint64_t first, last;

    if (!__atomic_load_n(&d->coop_on, __ATOMIC_ACQUIRE))
        return;
    /* Clip to the region; a report past its end is the caller's bug, not ours to crash on. */
    if (len == 0 || offset >= reg->length)
        return;
    if (len > reg->length - offset)
        len = reg->length - offset;
    first = offset / reg->page_size;
    last = (offset + len - 1) / reg->page_size;
    bitmap_set_range_atomic(d->coop_log[r], first, last - first + 1);
}

const dirty_backend dirty_backend_coop = {
    .name = "cooperative",
    .init = coop_init,
    .fini = coop_fini,
    .start = coop_start,
    .sync = coop_sync,
    .stop = coop_stop,
    .mark = coop_mark,
};
