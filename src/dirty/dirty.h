/*
 * Dirty-page trackers: which pages of guest RAM were written since the last
 * sync.  Three implementations behind one interface:
 *
 *   uffd-wp      userfaultfd write-protect in async mode (UFFD_FEATURE_WP_ASYNC,
 *                the kernel resolves the fault itself and just marks the PTE
 *                written) read with the PAGEMAP_SCAN ioctl, which reports the
 *                written pages and write-protects them again in one atomic
 *                step.  Needs no cooperation from the writers.  Only sees
 *                writes through this process's mapping.
 *   cooperative  the program reports writes (lm_ram_mark_dirty); they land in
 *                an atomic per-block log that sync moves into the caller's
 *                bitmap.
 *   ops          the program's own log (lm_set_dirty_tracker_ops): every
 *                call is forwarded to its lm_dirty_tracker_ops, whose
 *                contract (livemig.h) is this file's; cooperative reports
 *                are merged in as for "cooperative".
 *
 * Lifetime: dirty_new() when the context picks a tracker; start() (or
 * start_unarmed() and arm()) when a migration begins (after which every page counts as written once more, see
 * below); sync() from the migration thread only; stop() when the migration
 * ends (writes are no longer tracked, protection removed); dirty_free() in
 * lm_free().  dirty_mark() may be called from any thread at any time.
 *
 * The first sync after start() need not report anything: the caller starts
 * with an all-set bitmap, exactly as QEMU does.  (Both trackers in fact
 * report exactly the pages written since start().)
 *
 * Threads and ownership:
 *   new, free            the context's owner; free must not race with mark.
 *   start, arm, sync,    one thread at a time (the migration thread).
 *   stop
 *   mark                 any thread, any time between new and free;
 *                        lock-free, never blocks, never allocates.
 *   The tracker copies the region array; the memory stays the caller's.
 *   `bitmap` in sync is the caller's, written only during the call.
 *
 * Errors: a failed sync may already have re-armed some pages it could not
 * report, so the tracker no longer knows what is dirty: the migration must
 * fail (or stop, start again and resend everything).
 *
 * Limits of uffd-wp: only writes through this process's mapping of the
 * regions are seen (not another process's mapping of shared memory, not
 * pwrite() to a memfd); a region already registered with another
 * userfaultfd (e.g. a second tracker) makes start() fail with EBUSY.
 */
#ifndef DIRTY_DIRTY_H
#define DIRTY_DIRTY_H

#include <stdint.h>
#include "livemig/livemig.h"

typedef struct dirty_region {
    uint8_t *host;       /* page aligned */
    uint64_t length;     /* multiple of page_size */
    uint64_t page_size;  /* 4096 */
} dirty_region;

typedef struct dirty_tracker dirty_tracker;

/*
 * Create a tracker for `n` regions.  name: "uffd-wp", "cooperative" or "auto".
 * "auto" probes uffd-wp (open userfaultfd, API handshake with WP_ASYNC, one
 * PAGEMAP_SCAN with PM_SCAN_CHECK_WPASYNC on a scratch page) and falls back to
 * cooperative.  A named tracker that cannot work here fails with a message
 * saying why (e.g. "uffd-wp: kernel lacks UFFD_FEATURE_WP_ASYNC").
 */
dirty_tracker *dirty_new(const char *name, const dirty_region *regions, int n,
                         lm_error *err);
/*
 * A tracker that forwards to the program's ops (see lm_set_dirty_tracker_ops
 * for their contract; the caller checked the name and the required ops).
 * `name` is copied and is what dirty_name() returns.  No op is called here.
 */
dirty_tracker *dirty_new_ops(const char *name, const lm_dirty_tracker_ops *ops,
                             void *opaque, const dirty_region *regions, int n,
                             lm_error *err);
void dirty_free(dirty_tracker *d);

/* "uffd-wp", "cooperative" or the ops' name: the tracker actually chosen. */
const char *dirty_name(const dirty_tracker *d);

/* Begin tracking all regions (uffd-wp: register + write-protect everything). */
int dirty_start(dirty_tracker *d, lm_error *err);
/*
 * Lazy arming, for a caller whose first pass sends every page anyway.
 * start_unarmed() begins tracking, but with uffd-wp a page is tracked only
 * once its range is armed: dirty_arm(d, r, end) arms region r from where
 * the last arm stopped up to byte `end` (clamped to the region; arming
 * backwards is a no-op), and sync() arms whatever is left of its region
 * first.  Write-protecting costs ~70 ns a page here (~35 ms for 2 GiB), so
 * arming each chunk just before the first pass reads it takes that cost
 * off the critical path.  Invariant the caller keeps: a page is read for
 * sending only after its range was armed, or is still due to be sent
 * after the arm -- a write before the arm is then in what is sent.
 * The cooperative tracker counts from start; arm is a no-op for it.
 * 0 or a negative errno (the migration must fail: tracking is incomplete).
 */
int dirty_start_unarmed(dirty_tracker *d, lm_error *err);
int dirty_arm(dirty_tracker *d, int r, uint64_t end, lm_error *err);

/*
 * OR the pages of region `r` written since the previous sync (or start) into
 * `bitmap` (one bit per page), and re-arm tracking for them.  Returns the
 * number of bits that were newly set in `bitmap`, or a negative errno.
 */
int64_t dirty_sync(dirty_tracker *d, int r, unsigned long *bitmap, lm_error *err);

/* End tracking: unprotect and unregister.  Idempotent. */
void dirty_stop(dirty_tracker *d);

/* Cooperative reports; ignored unless started and cooperative or ops.
 * Lock-free. */
void dirty_mark(dirty_tracker *d, int r, uint64_t offset, uint64_t len);

#endif
