/*
 * The ops dirty tracker: the program's own log behind the tracker
 * interface (lm_set_dirty_tracker_ops; the contract is in livemig.h).
 *
 * This backend only adapts.  What it adds to the program's ops:
 *   - sync hands the program a zeroed scratch bitmap per region, masks the
 *     bits past the region's end and ORs the rest into the caller's bitmap,
 *     counting only bits that were newly set.  So the program may store
 *     whole words (KVM_GET_DIRTY_LOG does) and can never clear a page the
 *     library still has to send.
 *   - cooperative reports (lm_ram_mark_dirty) keep working: this backend
 *     runs the cooperative backend's log beside the program's, on the same
 *     dirty_tracker fields, and sync drains both.  A VMM's own writes to
 *     guest RAM (device emulation) are not in a KVM dirty log.
 *   - lazy arming is optional: with no arm op, start tracks everything
 *     (ops_armed is the region's length from start on); with one, ops_armed
 *     remembers how far the program was asked to track, arm calls only go
 *     forward, and a region's first sync arms whatever is left of it.
 *   - a failing op without a message gets one naming the tracker and block;
 *     a message the program wrote is passed on as it is.
 *
 * Threads: as every backend (dirty_impl.h); every op of the program runs on
 * the tracker's owner thread, the migration thread.  ops_scratch and
 * ops_armed are owner-thread state.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dirty/dirty_impl.h"
#include "util/bitmap.h"
#include "util/error.h"

static int ops_init(dirty_tracker *d, lm_error *err)
{
    int ret = dirty_backend_coop.init(d, err);

    if (ret < 0)
        return ret;
    d->ops_scratch = calloc(d->n ? (size_t)d->n : 1, sizeof(*d->ops_scratch));
    d->ops_armed = calloc(d->n ? (size_t)d->n : 1, sizeof(*d->ops_armed));
    if (!d->ops_scratch || !d->ops_armed) {
        free(d->ops_scratch);
        free(d->ops_armed);
        dirty_backend_coop.fini(d);
        return error_set(err, -ENOMEM, "dirty tracker ops: out of memory");
    }
    for (int r = 0; r < d->n; r++)
        d->ops_scratch[r] = bitmap_new(d->npages[r]);
    return 0;
}

static void ops_fini(dirty_tracker *d)
{
    if (d->ops_scratch)
        for (int r = 0; r < d->n; r++)
            bitmap_free(d->ops_scratch[r]);
    free(d->ops_scratch);
    free(d->ops_armed);
    d->ops_scratch = NULL;
    d->ops_armed = NULL;
    dirty_backend_coop.fini(d);
}

/* The program's error, or one of ours when it left the message empty. */
static int ops_failed(dirty_tracker *d, int ret, const lm_error *e, lm_error *err,
                      const char *what, int r)
{
    if (ret >= 0)
        ret = -EIO;
    if (e->msg[0])
        return error_set(err, ret, "%s", e->msg);
    if (r < 0)
        return error_set(err, ret, "%s: %s failed (%s)", d->name, what, strerror(-ret));
    return error_set(err, ret, "%s: %s of block %d failed (%s)", d->name, what, r,
                     strerror(-ret));
}

static int ops_start(dirty_tracker *d, lm_error *err)
{
    lm_error e = { 0 };
    int ret;

    ret = dirty_backend_coop.start(d, err);
    if (ret < 0)
        return ret;
    for (int r = 0; r < d->n; r++)
        d->ops_armed[r] = d->ops.arm ? 0 : d->regions[r].length;
    ret = d->ops.start(d->ops_opaque, &e);
    if (ret < 0) {
        dirty_backend_coop.stop(d);
        return ops_failed(d, ret, &e, err, "start", -1);
    }
    return 0;
}

static int ops_arm(dirty_tracker *d, int r, uint64_t end, lm_error *err)
{
    lm_error e = { 0 };
    int ret;

    if (end <= d->ops_armed[r])
        return 0;
    ret = d->ops.arm(d->ops_opaque, r, end, &e);
    if (ret < 0)
        return ops_failed(d, ret, &e, err, "arm", r);
    d->ops_armed[r] = end;
    return 0;
}

static int64_t ops_sync(dirty_tracker *d, int r, unsigned long *bitmap, lm_error *err)
{
    unsigned long *s = d->ops_scratch[r];
    uint64_t np = d->npages[r];
    size_t words = BITMAP_WORDS(np);
    lm_error e = { 0 };
    int64_t newly = 0, coop;
    int ret;

    if (d->ops_armed[r] < d->regions[r].length) {
        ret = ops_arm(d, r, d->regions[r].length, err);
        if (ret < 0)
            return ret;
    }
    memset(s, 0, words * sizeof(*s));
    ret = d->ops.sync(d->ops_opaque, r, s, np, &e);
    if (ret < 0)
        return ops_failed(d, ret, &e, err, "sync", r);
    if (np % BITMAP_BITS_PER_LONG)
        s[words - 1] &= (1UL << (np % BITMAP_BITS_PER_LONG)) - 1;
    for (size_t w = 0; w < words; w++) {
        unsigned long add = s[w] & ~bitmap[w];

        if (add) {
            newly += __builtin_popcountl(add);
            bitmap[w] |= add;
        }
    }
    coop = dirty_backend_coop.sync(d, r, bitmap, err);
    if (coop < 0)
        return coop;
    return newly + coop;
}

static void ops_stop(dirty_tracker *d)
{
    d->ops.stop(d->ops_opaque);
    dirty_backend_coop.stop(d);
}

static void ops_mark(dirty_tracker *d, int r, uint64_t offset, uint64_t len)
{
    dirty_backend_coop.mark(d, r, offset, len);
}

const dirty_backend dirty_backend_ops = {
    .name = "ops",
    .init = ops_init,
    .fini = ops_fini,
    .start = ops_start,
    .sync = ops_sync,
    .arm = ops_arm,
    .stop = ops_stop,
    .mark = ops_mark,
};
