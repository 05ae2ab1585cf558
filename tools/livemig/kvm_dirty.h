/*
 * The KVM dirty log as a livemig dirty tracker: what a VMM built on the
 * public API (livemig.h) hands to lm_set_dirty_tracker_ops so that a
 * migration sends again exactly the pages its vCPUs wrote.
 *
 * It uses the dirty *bitmap* (KVM_GET_DIRTY_LOG) with manual protection
 * (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): a get does not re-protect, so each
 * sync is get, then KVM_CLEAR_DIRTY_LOG of exactly the pages the get
 * returned.  A vCPU write between the two lands on a page that is being
 * reported anyway (the library reads it after sync returns); a write after
 * the clear faults and is logged for the next sync.  That is the library's
 * sync contract.  Never the dirty ring: it overflows on some kernels
 * (docs/architecture.md, dirty tracking).
 *
 * The VMM gives one KVM memory slot per RAM block, in the order the blocks
 * were registered with lm_ram_register (block i <-> slots[i]), each slot's
 * memory_size equal to the block's length, and its userspace_addr the
 * block's host address.  Slots may be created with or without
 * KVM_MEM_LOG_DIRTY_PAGES: start() turns logging on for those without it
 * (KVM_SET_USER_MEMORY_REGION, flags only) and stop() turns it off again,
 * so a VMM that is not migrating pays nothing.  The VMM must not change
 * these slots while a migration runs.
 *
 * Only vCPU writes are in KVM's log.  The VMM's own writes to guest RAM
 * (device emulation, DMA) must still be reported with lm_ram_mark_dirty();
 * the library merges both.
 *
 * Threads: kvm_dirty_new/free on the VMM's thread, before the first
 * lm_migrate and after lm_free; the ops on the migration thread (livemig.h).
 */
#ifndef LIVEMIG_TOOL_KVM_DIRTY_H
#define LIVEMIG_TOOL_KVM_DIRTY_H

#include <linux/kvm.h>

#include "livemig/livemig.h"

typedef struct kvm_dirty kvm_dirty;

/* The name the tracker reports (query-migrate's x-dirty-tracker). */
#define KVM_DIRTY_TRACKER_NAME "kvm-dirty-log"

/*
 * Check that `vm_fd` has KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and enable it
 * (KVM_ENABLE_CAP), and copy the slot table.  NULL with a message in err
 * (code -ENOTSUP when the capability is missing).  The VM fd stays the
 * caller's.
 */
kvm_dirty *kvm_dirty_new(int vm_fd, const struct kvm_userspace_memory_region *slots,
                         int nslots, lm_error *err);
void kvm_dirty_free(kvm_dirty *k);

/* The ops, with opaque = the kvm_dirty. */
extern const lm_dirty_tracker_ops kvm_dirty_ops;

/* lm_set_dirty_tracker_ops(m, KVM_DIRTY_TRACKER_NAME, &kvm_dirty_ops, k, err). */
int kvm_dirty_attach(lm_mig *m, kvm_dirty *k, lm_error *err);

#endif
