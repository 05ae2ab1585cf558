/*
 * vCPU and VM state of a kvm_vm as device sections; see kvm_state.h for
 * the devices and their encoding.  Implemented from the kernel's
 * documented KVM API (Documentation/virt/kvm/api.rst).
 */
#include "kvm_state.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "util.h"

#define KST_MAX_MSRS 4096
#define KST_MAX_DEVICES 16

typedef struct kst_dev kst_dev;

/* One device: what it is and how it is read and written. */
struct kst_kind {
    const char *idstr;
    const char *what;                 /* for messages */
    unsigned long get, set;           /* raw kinds: the ioctls */
    int (*save)(kst_dev *d, lm_stream *s);
    int (*load)(kst_dev *d, lm_stream *s);
};

struct kst_dev {
    kvm_state *ks;
    const struct kst_kind *kind;
    size_t size;                      /* raw kinds: bytes of the structure */
};

struct kvm_state {
    kvm_vm *v;
    int vcpu;
    size_t xsave_size;
    bool xsave2;                      /* KVM_GET_XSAVE2 (size > 4096 possible) */
    uint32_t *msrs;                   /* readable and writable indices */
    int nmsrs;
    int msrs_skipped;                 /* listed by KVM but not restorable here */
    int ndevs;
    kst_dev devs[KST_MAX_DEVICES];
    void *buf;                        /* the largest raw structure */
    size_t buf_size;
};

/* ------------------------------------------------------------ raw kinds */

static int raw_save(kst_dev *d, lm_stream *s)
{
    kvm_state *ks = d->ks;
    unsigned long get = d->kind->get;

    if (get == KVM_GET_XSAVE && ks->xsave2)
        get = KVM_GET_XSAVE2;
    memset(ks->buf, 0, d->size);
    if (ioctl(ks->vcpu, get, ks->buf) < 0) {
        int e = errno;
        fprintf(stderr, "livemig vm: %s: reading the %s of vCPU 0: %s\n", d->kind->idstr,
                d->kind->what, strerror(e));
        return -e;
    }
    lm_put_be32(s, (uint32_t)d->size);
    lm_put_buffer(s, ks->buf, d->size);
    return lm_stream_error(s);
}

/* What KVM_SET_SREGS was given, for its error message. */
static void sregs_describe(const struct kvm_sregs *r, char *buf, size_t len)
{
    snprintf(buf, len, "cr0=%#llx cr3=%#llx cr4=%#llx efer=%#llx cs=(selector %#x base %#llx "
             "limit %#x type %u present %u dpl %u db %u s %u l %u g %u)",
             (unsigned long long)r->cr0, (unsigned long long)r->cr3,
             (unsigned long long)r->cr4, (unsigned long long)r->efer, r->cs.selector,
             (unsigned long long)r->cs.base, r->cs.limit, r->cs.type, r->cs.present,
             r->cs.dpl, r->cs.db, r->cs.s, r->cs.l, r->cs.g);
}

static int raw_load(kst_dev *d, lm_stream *s)
{
    kvm_state *ks = d->ks;
    uint64_t at = lm_stream_offset(s);
    uint32_t size;
    char desc[256] = "";

    if (lm_get_be32(s, &size))
        return lm_stream_error(s);
    if (size != d->size) {
        lm_stream_set_error(s, -EINVAL, "%s: %u bytes of %s from the source, but this KVM's "
                            "structure has %zu (byte offset %llu)", d->kind->idstr, size,
                            d->kind->what, d->size, (unsigned long long)at);
        return -EINVAL;
    }
    memset(ks->buf, 0, ks->buf_size);
    if (lm_get_buffer(s, ks->buf, d->size))
        return lm_stream_error(s);
    if (ioctl(ks->vcpu, d->kind->set, ks->buf) < 0) {
        int e = errno;
        if (d->kind->set == KVM_SET_SREGS)
            sregs_describe(ks->buf, desc, sizeof(desc));
        lm_stream_set_error(s, -e, "%s: KVM refused the %s of vCPU 0 (byte offset %llu): "
                            "%s%s%s", d->kind->idstr, d->kind->what, (unsigned long long)at,
                            strerror(e), desc[0] ? "; " : "", desc);
        return -e;
    }
    return 0;
}

/* ------------------------------------------------------------ MSRs */

static struct kvm_msrs *msrs_alloc(int n)
{
    return calloc(1, sizeof(struct kvm_msrs) + (size_t)n * sizeof(struct kvm_msr_entry));
}

static int msrs_save(kst_dev *d, lm_stream *s)
{
    kvm_state *ks = d->ks;
    struct kvm_msrs *m = msrs_alloc(ks->nmsrs);
    int got;

    if (!m)
        return -ENOMEM;
    m->nmsrs = (uint32_t)ks->nmsrs;
    for (int i = 0; i < ks->nmsrs; i++)
        m->entries[i].index = ks->msrs[i];
    got = ioctl(ks->vcpu, KVM_GET_MSRS, m);
    if (got != ks->nmsrs) {
        int e = got < 0 ? errno : EIO;
        fprintf(stderr, "livemig vm: kvm-msrs: reading MSR %#x of vCPU 0 failed (%d of %d "
                "read)%s%s\n", got >= 0 ? ks->msrs[got] : 0, got < 0 ? 0 : got, ks->nmsrs,
                got < 0 ? ": " : "", got < 0 ? strerror(e) : "");
        free(m);
        return -e;
    }
    lm_put_be32(s, (uint32_t)ks->nmsrs);
    for (int i = 0; i < ks->nmsrs; i++) {
        lm_put_be32(s, m->entries[i].index);
        lm_put_be64(s, m->entries[i].data);
    }
    free(m);
    return lm_stream_error(s);
}

static int msrs_load(kst_dev *d, lm_stream *s)
{
    kvm_state *ks = d->ks;
    uint64_t at = lm_stream_offset(s);
    struct kvm_msrs *m;
    uint32_t n;
    int set, rc = 0;

    if (lm_get_be32(s, &n))
        return lm_stream_error(s);
    if (n > KST_MAX_MSRS) {
        lm_stream_set_error(s, -EINVAL, "kvm-msrs: %u MSRs (byte offset %llu), more than %d",
                            n, (unsigned long long)at, KST_MAX_MSRS);
        return -EINVAL;
    }
    m = msrs_alloc((int)n);
    if (!m) {
        lm_stream_set_error(s, -ENOMEM, "kvm-msrs: out of memory");
        return -ENOMEM;
    }
    m->nmsrs = n;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t index;
        uint64_t data;
        if (lm_get_be32(s, &index) || lm_get_be64(s, &data)) {
            rc = lm_stream_error(s);
            goto out;
        }
        m->entries[i].index = index;
        m->entries[i].data = data;
    }
    set = ioctl(ks->vcpu, KVM_SET_MSRS, m);
    if (set < 0) {
        rc = -errno;
        lm_stream_set_error(s, rc, "kvm-msrs: KVM_SET_MSRS of %u MSRs of vCPU 0 (byte offset "
                            "%llu): %s", n, (unsigned long long)at, strerror(-rc));
    } else if ((uint32_t)set < n) {
        rc = -EINVAL;
        lm_stream_set_error(s, rc, "kvm-msrs: KVM refused MSR %#x = %#llx of vCPU 0 (entry "
                            "%d of %u, at byte offset %llu)", m->entries[set].index,
                            (unsigned long long)m->entries[set].data, set + 1, n,
                            (unsigned long long)(at + 4 + (uint64_t)set * 12));
    }
out:
    free(m);
    return rc;
}

/* ------------------------------------------------------------ clock */

static int clock_save(kst_dev *d, lm_stream *s)
{
    struct kvm_clock_data c = { 0 };

    if (ioctl(kvm_vm_fd(d->ks->v), KVM_GET_CLOCK, &c) < 0) {
        int e = errno;
        fprintf(stderr, "livemig vm: kvm-clock: KVM_GET_CLOCK: %s\n", strerror(e));
        return -e;
    }
    lm_put_be64(s, c.clock);
    lm_put_be32(s, c.flags);
    return lm_stream_error(s);
}

static int clock_load(kst_dev *d, lm_stream *s)
{
    struct kvm_clock_data c = { 0 };
    uint64_t at = lm_stream_offset(s);
    uint64_t clock;
    uint32_t flags;

    if (lm_get_be64(s, &clock) || lm_get_be32(s, &flags))
        return lm_stream_error(s);
    c.clock = clock;
    if (ioctl(kvm_vm_fd(d->ks->v), KVM_SET_CLOCK, &c) < 0) {
        int e = errno;
        lm_stream_set_error(s, -e, "kvm-clock: KVM refused clock %llu ns (byte offset %llu): "
                            "%s", (unsigned long long)c.clock, (unsigned long long)at,
                            strerror(e));
        return -e;
    }
    return 0;
}

/* ------------------------------------------------------------ the devices */

static const struct kst_kind kind_regs = { "kvm-regs", "general registers", KVM_GET_REGS,
                                           KVM_SET_REGS, raw_save, raw_load };
static const struct kst_kind kind_xsave = { "kvm-xsave", "XSAVE area", KVM_GET_XSAVE,
                                            KVM_SET_XSAVE, raw_save, raw_load };
static const struct kst_kind kind_fpu = { "kvm-fpu", "FPU state", KVM_GET_FPU, KVM_SET_FPU,
                                          raw_save, raw_load };
static const struct kst_kind kind_xcrs = { "kvm-xcrs", "extended control registers",
                                           KVM_GET_XCRS, KVM_SET_XCRS, raw_save, raw_load };
static const struct kst_kind kind_sregs = { "kvm-sregs", "segment and control registers",
                                            KVM_GET_SREGS, KVM_SET_SREGS, raw_save,
                                            raw_load };
static const struct kst_kind kind_msrs = { "kvm-msrs", "MSRs", 0, 0, msrs_save, msrs_load };
static const struct kst_kind kind_events = { "kvm-events", "pending events",
                                             KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS,
                                             raw_save, raw_load };
static const struct kst_kind kind_mp = { "kvm-mp-state", "MP state", KVM_GET_MP_STATE,
                                         KVM_SET_MP_STATE, raw_save, raw_load };
static const struct kst_kind kind_debug = { "kvm-debugregs", "debug registers",
                                            KVM_GET_DEBUGREGS, KVM_SET_DEBUGREGS, raw_save,
                                            raw_load };
static const struct kst_kind kind_clock = { "kvm-clock", "KVM clock", 0, 0, clock_save,
                                            clock_load };

static void add(kvm_state *ks, const struct kst_kind *k, size_t size)
{
    kst_dev *d = &ks->devs[ks->ndevs++];

    d->ks = ks;
    d->kind = k;
    d->size = size;
    if (size > ks->buf_size)
        ks->buf_size = size;
}

static int has(kvm_state *ks, int cap)
{
    int r = ioctl(kvm_vm_fd(ks->v), KVM_CHECK_EXTENSION, cap);
    return r < 0 ? 0 : r;
}

/* The MSRs KVM lists that this vCPU can read. */
static int probe_msrs(kvm_state *ks, lm_error *err)
{
    struct kvm_msr_list probe = { .nmsrs = 0 }, *list;
    struct kvm_msrs *one;
    int rc = 0;

    if (ioctl(kvm_vm_kvm_fd(ks->v), KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
        return tool_error_errno(err, -errno, "kvm: KVM_GET_MSR_INDEX_LIST");
    if (probe.nmsrs > KST_MAX_MSRS)
        return tool_error(err, -E2BIG, "kvm: KVM lists %u MSRs, more than %d", probe.nmsrs,
                          KST_MAX_MSRS);
    list = calloc(1, sizeof(*list) + (probe.nmsrs + 1) * sizeof(list->indices[0]));
    one = msrs_alloc(1);
    ks->msrs = calloc(probe.nmsrs + 1, sizeof(*ks->msrs));
    if (!list || !one || !ks->msrs) {
        rc = tool_error(err, -ENOMEM, "kvm: out of memory");
        goto out;
    }
    list->nmsrs = probe.nmsrs;
    if (ioctl(kvm_vm_kvm_fd(ks->v), KVM_GET_MSR_INDEX_LIST, list) < 0) {
        rc = tool_error_errno(err, -errno, "kvm: KVM_GET_MSR_INDEX_LIST");
        goto out;
    }
    for (uint32_t i = 0; i < list->nmsrs; i++) {
        one->nmsrs = 1;
        one->entries[0].index = list->indices[i];
        one->entries[0].data = 0;
        /* Readable, and KVM takes its own value back on this VM (some MSRs,
         * e.g. those of an in-kernel LAPIC this VM does not have, read but
         * refuse any write): only then can a destination restore it. */
        if (ioctl(ks->vcpu, KVM_GET_MSRS, one) == 1 && ioctl(ks->vcpu, KVM_SET_MSRS, one) == 1)
            ks->msrs[ks->nmsrs++] = list->indices[i];
        else
            ks->msrs_skipped++;
    }
out:
    free(list);
    free(one);
    return rc;
}

kvm_state *kvm_state_new(kvm_vm *v, lm_error *err)
{
    kvm_state *ks = calloc(1, sizeof(*ks));
    int x2;

    if (!ks) {
        tool_error(err, -ENOMEM, "kvm: out of memory");
        return NULL;
    }
    ks->v = v;
    ks->vcpu = kvm_vm_vcpu_fd(v);
    if (probe_msrs(ks, err) < 0)
        goto fail;

    add(ks, &kind_regs, sizeof(struct kvm_regs));
    if (has(ks, KVM_CAP_XSAVE)) {
        x2 = has(ks, KVM_CAP_XSAVE2);
        ks->xsave2 = x2 > 0;
        ks->xsave_size = x2 > (int)sizeof(struct kvm_xsave) ? (size_t)x2
                                                            : sizeof(struct kvm_xsave);
        add(ks, &kind_xsave, ks->xsave_size);
    } else {
        add(ks, &kind_fpu, sizeof(struct kvm_fpu));
    }
    if (has(ks, KVM_CAP_XCRS))
        add(ks, &kind_xcrs, sizeof(struct kvm_xcrs));
    add(ks, &kind_sregs, sizeof(struct kvm_sregs));
    add(ks, &kind_msrs, 0);
    add(ks, &kind_events, sizeof(struct kvm_vcpu_events));
    add(ks, &kind_mp, sizeof(struct kvm_mp_state));
    if (has(ks, KVM_CAP_DEBUGREGS))
        add(ks, &kind_debug, sizeof(struct kvm_debugregs));
    add(ks, &kind_clock, 0);
    ks->buf = calloc(1, ks->buf_size);
    if (!ks->buf) {
        tool_error(err, -ENOMEM, "kvm: out of memory");
        goto fail;
    }
    return ks;
fail:
    kvm_state_free(ks);
    return NULL;
}

void kvm_state_free(kvm_state *ks)
{
    if (!ks)
        return;
    free(ks->msrs);
    free(ks->buf);
    free(ks);
}

int kvm_state_nmsrs(const kvm_state *ks)
{
    return ks->nmsrs;
}

int kvm_state_msrs_skipped(const kvm_state *ks)
{
    return ks->msrs_skipped;
}

static int dev_save(lm_stream *s, void *opaque)
{
    kst_dev *d = opaque;

    /* the library saves devices only after vm ops stop returned */
    assert(kvm_vm_parked(d->ks->v));
    return d->kind->save(d, s);
}

static int dev_load(lm_stream *s, void *opaque, uint32_t version, int section_type)
{
    kst_dev *d = opaque;

    /* a destination's vCPU has not run: it starts after the whole load */
    assert(kvm_vm_parked(d->ks->v));
    if (version != KVM_STATE_VERSION || section_type != LM_SECTION_FULL) {
        lm_stream_set_error(s, -EINVAL, "%s: unexpected section (version %u, type %d) at "
                            "byte offset %llu", d->kind->idstr, version, section_type,
                            (unsigned long long)lm_stream_offset(s));
        return -EINVAL;
    }
    return d->kind->load(d, s);
}

int kvm_state_register(kvm_state *ks, lm_mig *m, lm_error *err)
{
    static const lm_device_ops ops = { .save = dev_save, .load = dev_load };

    for (int i = 0; i < ks->ndevs; i++) {
        int rc = lm_device_register(m, ks->devs[i].kind->idstr, 0, KVM_STATE_VERSION, &ops,
                                    &ks->devs[i], err);
        if (rc)
            return rc;
    }
    return 0;
}
