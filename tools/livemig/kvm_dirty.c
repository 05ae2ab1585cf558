/*
 * The KVM dirty log as a livemig dirty tracker; see kvm_dirty.h.
 *
 * Implemented from the kernel's documented API (Documentation/virt/kvm/
 * api.rst: KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, KVM_ENABLE_CAP with
 * KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
 *
 * The bitmap the library hands to sync is already in KVM's format on a
 * 64-bit host: one bit per 4 KiB page, unsigned long words, host endian,
 * (npages + 63) / 64 words -- exactly the ALIGN(npages, BITS_PER_LONG) / 8
 * bytes KVM_GET_DIRTY_LOG writes.  So the get goes straight into it and the
 * clear is given the same buffer: only what was reported is re-protected.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "kvm_dirty.h"
#include "util.h"

#define KVM_DIRTY_PAGE 4096ULL

struct kvm_dirty {
    int vm_fd;
    int n;
    struct kvm_userspace_memory_region *slots;
    bool *logging_added;          /* start turned KVM_MEM_LOG_DIRTY_PAGES on */
    unsigned long *scratch;       /* start's drain, the largest slot's size */
};

static uint64_t slot_pages(const struct kvm_userspace_memory_region *s)
{
    return s->memory_size / KVM_DIRTY_PAGE;
}

static size_t slot_words(const struct kvm_userspace_memory_region *s)
{
    return (size_t)((slot_pages(s) + 8 * sizeof(unsigned long) - 1) /
                    (8 * sizeof(unsigned long)));
}

kvm_dirty *kvm_dirty_new(int vm_fd, const struct kvm_userspace_memory_region *slots,
                         int nslots, lm_error *err)
{
    struct kvm_enable_cap cap = { .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                                  .args = { KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE } };
    size_t words = 1;
    kvm_dirty *k;
    int have;

    if (sizeof(unsigned long) != 8) {
        tool_error(err, -ENOTSUP, "kvm dirty log: needs a 64-bit host (KVM's bitmap "
                   "words are the library's only there)");
        return NULL;
    }
    if (nslots < 0 || (nslots && !slots)) {
        tool_error(err, -EINVAL, "kvm dirty log: bad slot list (%d slots)", nslots);
        return NULL;
    }
    for (int i = 0; i < nslots; i++) {
        if (!slots[i].memory_size || slots[i].memory_size % KVM_DIRTY_PAGE) {
            tool_error(err, -EINVAL, "kvm dirty log: slot %u: size %llu is not a "
                       "non-zero multiple of 4096", slots[i].slot,
                       (unsigned long long)slots[i].memory_size);
            return NULL;
        }
        if (slot_words(&slots[i]) > words)
            words = slot_words(&slots[i]);
    }
    have = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
    if (have < 0) {
        tool_error_errno(err, -errno, "kvm dirty log: KVM_CHECK_EXTENSION");
        return NULL;
    }
    if (!(have & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)) {
        tool_error(err, -ENOTSUP, "kvm dirty log: KVM lacks "
                   "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (reports %d)", have);
        return NULL;
    }
    if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
        tool_error_errno(err, -errno, "kvm dirty log: enabling "
                         "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
        return NULL;
    }
    k = calloc(1, sizeof(*k));
    if (!k)
        goto oom;
    k->vm_fd = vm_fd;
    k->n = nslots;
    k->slots = calloc(nslots ? (size_t)nslots : 1, sizeof(*k->slots));
    k->logging_added = calloc(nslots ? (size_t)nslots : 1, sizeof(*k->logging_added));
    k->scratch = calloc(words, sizeof(*k->scratch));
    if (!k->slots || !k->logging_added || !k->scratch)
        goto oom;
    if (nslots)
        memcpy(k->slots, slots, (size_t)nslots * sizeof(*slots));
    return k;
oom:
    kvm_dirty_free(k);
    tool_error(err, -ENOMEM, "kvm dirty log: out of memory");
    return NULL;
}

void kvm_dirty_free(kvm_dirty *k)
{
    if (!k)
        return;
    free(k->slots);
    free(k->logging_added);
    free(k->scratch);
    free(k);
}

static int set_logging(kvm_dirty *k, int i, bool on, lm_error *err)
{
    struct kvm_userspace_memory_region r = k->slots[i];

    if (on)
        r.flags |= KVM_MEM_LOG_DIRTY_PAGES;
    if (ioctl(k->vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        return tool_error_errno(err, -errno, "kvm dirty log: slot %u: turning dirty "
                                "logging %s", r.slot, on ? "on" : "off");
    return 0;
}

/* Get slot i's log into map (slot_words long) and re-protect what it holds. */
static int get_and_clear(kvm_dirty *k, int i, unsigned long *map, bool *any, lm_error *err)
{
    const struct kvm_userspace_memory_region *s = &k->slots[i];
    struct kvm_dirty_log get = { .slot = s->slot, .dirty_bitmap = map };
    struct kvm_clear_dirty_log clr = { .slot = s->slot, .first_page = 0,
                                       .num_pages = (uint32_t)slot_pages(s),
                                       .dirty_bitmap = map };
    size_t words = slot_words(s);

    *any = false;
    if (ioctl(k->vm_fd, KVM_GET_DIRTY_LOG, &get) < 0)
        return tool_error_errno(err, -errno, "kvm dirty log: KVM_GET_DIRTY_LOG of slot %u",
                                s->slot);
    for (size_t w = 0; w < words && !*any; w++)
        *any = map[w] != 0;
    if (*any && ioctl(k->vm_fd, KVM_CLEAR_DIRTY_LOG, &clr) < 0)
        return tool_error_errno(err, -errno, "kvm dirty log: KVM_CLEAR_DIRTY_LOG of "
                                "slot %u", s->slot);
    return 0;
}

static void kd_stop(void *opaque);

/*
 * Turn logging on where the VMM had it off, then drain what the log holds
 * from before (the first pass sends every page anyway).  No arm op: with
 * manual protection, turning logging on write-protects the whole slot, and
 * a slot created with logging on is already tracked.
 */
static int kd_start(void *opaque, lm_error *err)
{
    kvm_dirty *k = opaque;
    bool any;
    int ret;

    for (int i = 0; i < k->n; i++) {
        k->logging_added[i] = false;
        if (k->slots[i].flags & KVM_MEM_LOG_DIRTY_PAGES)
            continue;
        ret = set_logging(k, i, true, err);
        if (ret < 0) {
            kd_stop(k);
            return ret;
        }
        k->logging_added[i] = true;
    }
    for (int i = 0; i < k->n; i++) {
        memset(k->scratch, 0, slot_words(&k->slots[i]) * sizeof(*k->scratch));
        ret = get_and_clear(k, i, k->scratch, &any, err);
        if (ret < 0) {
            kd_stop(k);
            return ret;
        }
    }
    return 0;
}

static int kd_sync(void *opaque, int block, unsigned long *bitmap, uint64_t npages,
                   lm_error *err)
{
    kvm_dirty *k = opaque;
    bool any;

    if (block < 0 || block >= k->n)
        return tool_error(err, -EINVAL, "kvm dirty log: no slot for RAM block %d (%d slots)",
                          block, k->n);
    if (npages != slot_pages(&k->slots[block]))
        return tool_error(err, -EINVAL, "kvm dirty log: RAM block %d has %llu pages but "
                          "slot %u has %llu", block, (unsigned long long)npages,
                          k->slots[block].slot,
                          (unsigned long long)slot_pages(&k->slots[block]));
    return get_and_clear(k, block, bitmap, &any, err);
}

static void kd_stop(void *opaque)
{
    kvm_dirty *k = opaque;

    for (int i = 0; i < k->n; i++) {
        if (!k->logging_added[i])
            continue;
        set_logging(k, i, false, NULL);   /* nothing to do about a failure here */
        k->logging_added[i] = false;
    }
}

const lm_dirty_tracker_ops kvm_dirty_ops = {
    .start = kd_start,
    .arm = NULL,
    .sync = kd_sync,
    .stop = kd_stop,
};

int kvm_dirty_attach(lm_mig *m, kvm_dirty *k, lm_error *err)
{
    return lm_set_dirty_tracker_ops(m, KVM_DIRTY_TRACKER_NAME, &kvm_dirty_ops, k, err);
}
