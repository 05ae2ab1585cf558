/*
 * Postcopy's destination RAM: guest memory registered with userfaultfd in
 * MISSING mode, so that the guest can run before all of it arrived.
 *
 * Two halves, both over one uffd_ram:
 *
 *   the placer   (ram.h's ram_placer) installs every page record atomically:
 *                UFFDIO_COPY from a bounce page for PAGE, UFFDIO_ZEROPAGE for
 *                a ZERO record with fill 0.  A vCPU never sees half a page.
 *                A page that is already present (the kernel says EEXIST) is
 *                not touched again: whatever got there first -- the page
 *                requested at fault time, sent on the urgent path -- is never
 *                overwritten by an older copy from the background stream.
 *                Every installed page is marked with ram_received().
 *
 *   the fault thread ("lm-uffd") reads the userfaultfd and turns each fault
 *                on a missing page into one call of `request` (the owner
 *                sends REQ_PAGES / REQ_PAGES_ID on the return path): never
 *                for a page already received, never twice for one page (a
 *                per-block requested bitmap).  The faulting thread sleeps in
 *                the kernel until the placer installs the page (UFFDIO_COPY
 *                wakes it).
 *
 * Threads: uffd_open / uffd_close on the owner (the incoming thread); the
 * placer on the thread that loads the stream (the listen thread in
 * postcopy); `request` on the fault thread, which must not block for long
 * (it queues a message).  received/requested bits are atomic: the placer
 * and the fault thread race on them by design (a fault that comes just
 * after the page was installed finds the bit set and asks for nothing).
 *
 * Ownership: uffd_ram borrows the ram_state (its blocks must stay mapped
 * and registered until uffd_close, which unregisters them: after it the
 * memory is ordinary anonymous memory again).
 *
 * Needs: the userfaultfd syscall (root, or UFFD_USER_MODE_ONLY, see
 * ../shared/reference/linux-mechanisms-measured.md section 2), with the COPY
 * and ZEROPAGE ioctls on anonymous memory.  uffd_open says clearly what is
 * missing.
 */
#ifndef UFFD_UFFD_H
#define UFFD_UFFD_H

#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "ram/ram.h"

typedef struct uffd_ram uffd_ram;

/* The fault thread asks for page `page` of block `b` (not yet received). */
typedef void (*uffd_request_fn)(void *opaque, const ramblock *b, uint64_t page);

/* Register every block of r in MISSING mode.  Pages already present stay
 * (they fault no more); the caller discards what must arrive again.
 * vcpu_tids[0..nvcpus): the guest's vCPU threads, whose waits are counted
 * one by one (the kernel then reports each fault's thread). */
uffd_ram *uffd_open(ram_state *r, const int *vcpu_tids, int nvcpus, lm_error *err);
/* Start the fault thread. */
int uffd_start_faults(uffd_ram *u, uffd_request_fn request, void *opaque, lm_error *err);
/* Stop the fault thread (if started), unregister, close, free. */
void uffd_close(uffd_ram *u);

/* A placer of page records (ram.h), one per thread that places: i is 0
 * (the main stream's) or 1 (the preempt channel's); each has its own
 * bounce page, and both may run at once. */
#define UFFD_PLACERS 2
#define UFFD_BATCH 64       /* pages installed by one UFFDIO_COPY at most */
ram_placer uffd_placer(uffd_ram *u, int i);

/*
 * Unregister every block now (any thread, once; uffd_close does it too):
 * every thread waiting on a missing page wakes and finds ordinary zeroed
 * memory.  Only for a load that failed, so that nothing waits for a page
 * that will never come.
 */
void uffd_release(uffd_ram *u);

/* Counters (any thread): pages installed, already there, faults, requests;
 * fault latency (from the fault thread's request to the page installed) in
 * power-of-two microsecond buckets [2^k, 2^(k+1)), the first from 0 and the
 * last open-ended (QEMU 10.1's postcopy-latency-dist). */
#define UFFD_LAT_BUCKETS 24
typedef struct uffd_stats {
    uint64_t copied, zeroed, present, faults, requests;
    uint64_t lat_count, lat_sum_ns, lat_max_ns;
    uint64_t lat_dist[UFFD_LAT_BUCKETS];
    int nvcpus;
    uint64_t vcpu_blocktime_ns[LM_MAX_VCPUS];
} uffd_stats;
void uffd_get_stats(uffd_ram *u, uffd_stats *st);

#endif
