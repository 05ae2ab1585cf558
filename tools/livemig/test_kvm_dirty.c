/*
 * The KVM dirty-log tracker (kvm_dirty.c) against a real KVM VM: a tiny
 * real-mode guest writes a few pages and halts, and the tracker's sync must
 * report exactly those pages; after the clear a second run writes other
 * pages (one of them again) and only those come back.
 *
 * Guest code is emulated on the test machines (~1 us an instruction), so
 * the guest is a handful of instructions per page.  The test skips, saying
 * why, when /dev/kvm, a VM or KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is missing.
 * The dirty ring is never used (it overflows on some kernels).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "kvm_dirty.h"

#define PAGE 4096ULL
#define GUEST_PAGES 64ULL          /* one 64-bit word of dirty bitmap */
#define MARK_OFF 0x10              /* where the guest writes in each page */
#define MARK_VAL 0x77

struct vm {
    int kvm, fd, vcpu;
    struct kvm_run *run;
    size_t run_size;
    uint8_t *mem;
    struct kvm_userspace_memory_region slot;
    kvm_dirty *kd;
};

static void vm_close(struct vm *v)
{
    kvm_dirty_free(v->kd);
    if (v->run)
        munmap(v->run, v->run_size);
    if (v->vcpu >= 0)
        close(v->vcpu);
    if (v->fd >= 0)
        close(v->fd);
    if (v->kvm >= 0)
        close(v->kvm);
    if (v->mem)
        munmap(v->mem, GUEST_PAGES * PAGE);
}

/* Skip (does not return) with the reason, after cleaning up. */
static void vm_skip(struct vm *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void vm_skip(struct vm *v, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    print_message("# SKIP: %s\n", msg);
    vm_close(v);
    skip();
}

/* A VM with one slot of GUEST_PAGES at guest physical 0 and one vCPU. */
static void vm_open(struct vm *v, uint32_t slot_flags)
{
    lm_error err = { 0 };
    int mmap_size;

    memset(v, 0, sizeof(*v));
    v->kvm = v->fd = v->vcpu = -1;
    v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (v->kvm < 0)
        vm_skip(v, "/dev/kvm: %s", strerror(errno));
    v->fd = ioctl(v->kvm, KVM_CREATE_VM, 0);
    if (v->fd < 0)
        vm_skip(v, "KVM_CREATE_VM: %s", strerror(errno));
    v->mem = mmap(NULL, GUEST_PAGES * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(v->mem != MAP_FAILED);
    v->slot = (struct kvm_userspace_memory_region){
        .slot = 0, .flags = slot_flags, .guest_phys_addr = 0,
        .memory_size = GUEST_PAGES * PAGE, .userspace_addr = (uintptr_t)v->mem };
    if (ioctl(v->fd, KVM_SET_USER_MEMORY_REGION, &v->slot) < 0)
        fail_msg("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
    v->kd = kvm_dirty_new(v->fd, &v->slot, 1, &err);
    if (!v->kd) {
        if (err.code == -ENOTSUP)
            vm_skip(v, "%s", err.msg);
        fail_msg("kvm_dirty_new: %s", err.msg);
    }
    /* real mode on VMX without unrestricted guest needs a TSS; harmless elsewhere */
    (void)ioctl(v->fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);
    v->vcpu = ioctl(v->fd, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0)
        fail_msg("KVM_CREATE_VCPU: %s", strerror(errno));
    mmap_size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    assert_true(mmap_size > 0);
    v->run_size = (size_t)mmap_size;
    v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    assert_true(v->run != MAP_FAILED);
}

/*
 * Put code at guest physical 0 that writes MARK_VAL at MARK_OFF of each
 * page in `pages`, then halts, and run it to the hlt.  Per page (10 bytes):
 *   mov ax, page * 0x100      B8 lo hi     (the page's real-mode segment)
 *   mov ds, ax                8E D8
 *   mov byte [MARK_OFF], val  C6 06 10 00 77
 * The code page itself is only read.
 */
static void vm_run_writes(struct vm *v, const int *pages, int n)
{
    uint8_t *c = v->mem;
    struct kvm_sregs sregs;
    struct kvm_regs regs = { .rip = 0, .rflags = 0x2 };
    int exits = 0;

    for (int i = 0; i < n; i++) {
        uint16_t seg = (uint16_t)(pages[i] * (PAGE / 16));

        assert_true(pages[i] > 0 && (uint64_t)pages[i] < GUEST_PAGES);
        *c++ = 0xb8, *c++ = (uint8_t)seg, *c++ = (uint8_t)(seg >> 8);
        *c++ = 0x8e, *c++ = 0xd8;
        *c++ = 0xc6, *c++ = 0x06, *c++ = MARK_OFF, *c++ = 0x00, *c++ = MARK_VAL;
    }
    *c++ = 0xf4;   /* hlt */

    if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0)
        fail_msg("KVM_GET_SREGS: %s", strerror(errno));
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0)
        fail_msg("KVM_SET_SREGS: %s", strerror(errno));
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0)
        fail_msg("KVM_SET_REGS: %s", strerror(errno));
    for (;;) {
        if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR && exits++ < 100)
                continue;
            fail_msg("KVM_RUN: %s", strerror(errno));
        }
        if (v->run->exit_reason == KVM_EXIT_HLT)
            break;
        if (exits++ >= 100)
            fail_msg("guest did not reach hlt (last exit reason %u)", v->run->exit_reason);
        if (v->run->exit_reason != KVM_EXIT_INTR)
            fail_msg("guest exit reason %u (internal error suberror %u), not hlt",
                     v->run->exit_reason, v->run->internal.suberror);
    }
    for (int i = 0; i < n; i++)
        assert_int_equal(v->mem[(uint64_t)pages[i] * PAGE + MARK_OFF], MARK_VAL);
}

static unsigned long pages_mask(const int *pages, int n)
{
    unsigned long m = 0;

    for (int i = 0; i < n; i++)
        m |= 1UL << pages[i];
    return m;
}

/* What one sync reports, through the ops exactly as the library calls them. */
static unsigned long sync_word(struct vm *v)
{
    unsigned long map[GUEST_PAGES / 64] = { 0 };
    lm_error err = { 0 };

    if (kvm_dirty_ops.sync(v->kd, 0, map, GUEST_PAGES, &err) < 0)
        fail_msg("sync: %s", err.msg);
    return map[0];
}

static void check_exact_pages(uint32_t slot_flags)
{
    static const int run1[] = { 3, 5, 17, 40 };
    static const int run2[] = { 5, 8, 63 };
    struct vm v;
    lm_error err = { 0 };
    unsigned long got;

    vm_open(&v, slot_flags);
    /* userspace writes (the code, the test's memset) are not in KVM's log */
    memset(v.mem + 50 * PAGE, 1, PAGE);
    if (kvm_dirty_ops.start(v.kd, &err) < 0)
        fail_msg("start: %s", err.msg);
    assert_int_equal(sync_word(&v), 0);

    vm_run_writes(&v, run1, 4);
    got = sync_word(&v);
    print_message("# run 1 wrote pages 3 5 17 40: sync reported %#lx\n", got);
    assert_int_equal(got, pages_mask(run1, 4));
    /* cleared: nothing new without guest writes */
    assert_int_equal(sync_word(&v), 0);

    /* page 5 again: the clear re-protected it */
    vm_run_writes(&v, run2, 3);
    got = sync_word(&v);
    print_message("# run 2 wrote pages 5 8 63: sync reported %#lx\n", got);
    assert_int_equal(got, pages_mask(run2, 3));
    assert_int_equal(sync_word(&v), 0);
    kvm_dirty_ops.stop(v.kd);

    /* a second migration on the same VM: start drains, then counts afresh */
    vm_run_writes(&v, run1, 2);
    if (kvm_dirty_ops.start(v.kd, &err) < 0)
        fail_msg("start again: %s", err.msg);
    assert_int_equal(sync_word(&v), 0);
    vm_run_writes(&v, run2 + 1, 2);
    assert_int_equal(sync_word(&v), pages_mask(run2 + 1, 2));
    kvm_dirty_ops.stop(v.kd);
    vm_close(&v);
}

/* The slot was created with KVM_MEM_LOG_DIRTY_PAGES. */
static void test_slot_logging(void **state)
{
    check_exact_pages(KVM_MEM_LOG_DIRTY_PAGES);
}

/* The slot logs nothing until start turns logging on (and stop off). */
static void test_slot_logging_by_start(void **state)
{
    check_exact_pages(0);
}

/* Errors the library would see from sync, with messages. */
static void test_errors(void **state)
{
    struct vm v;
    lm_error err = { 0 };
    unsigned long map[2] = { 0 };
    struct kvm_userspace_memory_region bad;

    vm_open(&v, KVM_MEM_LOG_DIRTY_PAGES);
    assert_int_equal(kvm_dirty_ops.start(v.kd, &err), 0);
    assert_int_equal(kvm_dirty_ops.sync(v.kd, 1, map, GUEST_PAGES, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "no slot for RAM block 1"));
    assert_int_equal(kvm_dirty_ops.sync(v.kd, 0, map, GUEST_PAGES * 2, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "has 128 pages but slot 0 has 64"));
    kvm_dirty_ops.stop(v.kd);
    bad = v.slot;
    bad.memory_size = 100;
    assert_null(kvm_dirty_new(v.fd, &bad, 1, &err));
    assert_int_equal(err.code, -EINVAL);
    /* the tracker by its name on a context */
    lm_mig *m = lm_new();
    assert_int_equal(kvm_dirty_attach(m, v.kd, &err), 0);
    assert_string_equal(lm_dirty_tracker_name(m), KVM_DIRTY_TRACKER_NAME);
    lm_free(m);
    vm_close(&v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_slot_logging),
        cmocka_unit_test(test_slot_logging_by_start),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
