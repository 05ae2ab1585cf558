/*
 * The KVM dirty-log tracker (kvm_dirty.c) against a real KVM VM: a tiny
 * real-mode guest writes a few pages and halts, and the tracker's sync must
 * report exactly those pages; after the clear a second run writes other
 * pages (one of them again) and only those come back.  Then a whole
 * in-process migration of a running KVM guest, with the KVM log as the
 * only tracker: the destination's memory must equal the stopped source's.
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
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "kvm_dirty.h"
#include "kvm_vm.h"

#define PAGE 4096ULL
#define GUEST_PAGES 64ULL          /* one 64-bit word of dirty bitmap */
#define MARK_OFF 0x10              /* where the guest writes in each page */
#define MARK_VAL 0x77
#define CODE_PAGE (KVM_VM_BOOT_ADDR / PAGE)   /* the guest's code: only read */

/* The VM (kvm_vm.h, the one `livemig vm` runs) and the tracker on its slot. */
struct vm {
    kvm_vm *kv;
    uint8_t *mem;
    struct kvm_userspace_memory_region slot;
    kvm_dirty *kd;
};

static void vm_close(struct vm *v)
{
    kvm_dirty_free(v->kd);
    kvm_vm_free(v->kv);
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

    memset(v, 0, sizeof(*v));
    v->kv = kvm_vm_new(NULL, GUEST_PAGES * PAGE, -1, &err);
    if (!v->kv) {
        if (err.code == -ENODEV)
            vm_skip(v, "%s", err.msg);
        fail_msg("kvm_vm_new: %s", err.msg);
    }
    if (slot_flags && kvm_vm_set_slot_flags(v->kv, slot_flags, &err))
        fail_msg("%s", err.msg);
    v->mem = kvm_vm_ram(v->kv);
    v->slot = *kvm_vm_slot(v->kv);
    v->kd = kvm_dirty_new(kvm_vm_fd(v->kv), &v->slot, 1, &err);
    if (!v->kd) {
        if (err.code == -ENOTSUP)
            vm_skip(v, "%s", err.msg);
        fail_msg("kvm_dirty_new: %s", err.msg);
    }
    if (kvm_vm_start_thread(v->kv, &err))
        fail_msg("%s", err.msg);
}

/* Put `code` at 0x7c00, reset the vCPU there. */
static void vm_boot(struct vm *v, const uint8_t *code, size_t len)
{
    lm_error err = { 0 };

    memcpy(v->mem + KVM_VM_BOOT_ADDR, code, len);
    if (kvm_vm_reset(v->kv, &err))
        fail_msg("%s", err.msg);
}

/*
 * Put code at 0x7c00 that writes MARK_VAL at MARK_OFF of each page in
 * `pages`, then halts, and run it to the hlt.  Per page (10 bytes):
 *   mov ax, page * 0x100      B8 lo hi     (the page's real-mode segment)
 *   mov ds, ax                8E D8
 *   mov byte [MARK_OFF], val  C6 06 10 00 77
 * The code page itself is only read.
 */
static void vm_run_writes(struct vm *v, const int *pages, int n)
{
    uint8_t code[512], *c = code;
    lm_error err = { 0 };

    for (int i = 0; i < n; i++) {
        uint16_t seg = (uint16_t)(pages[i] * (PAGE / 16));

        assert_true(pages[i] > 0 && (uint64_t)pages[i] < GUEST_PAGES && pages[i] != CODE_PAGE);
        *c++ = 0xb8, *c++ = (uint8_t)seg, *c++ = (uint8_t)(seg >> 8);
        *c++ = 0x8e, *c++ = 0xd8;
        *c++ = 0xc6, *c++ = 0x06, *c++ = MARK_OFF, *c++ = 0x00, *c++ = MARK_VAL;
    }
    *c++ = 0xf4;   /* hlt */
    vm_boot(v, code, (size_t)(c - code));
    kvm_vm_run(v->kv);
    if (kvm_vm_wait_halted(v->kv, 10000, &err))
        fail_msg("%s", err.msg);
    if (kvm_vm_pause(v->kv, &err))
        fail_msg("%s", err.msg);
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
    assert_null(kvm_dirty_new(kvm_vm_fd(v.kv), &bad, 1, &err));
    assert_int_equal(err.code, -EINVAL);
    /* the tracker by its name on a context */
    lm_mig *m = lm_new();
    assert_int_equal(kvm_dirty_attach(m, v.kd, &err), 0);
    assert_string_equal(lm_dirty_tracker_name(m), KVM_DIRTY_TRACKER_NAME);
    lm_free(m);
    vm_close(&v);
}

/* ------------------------------------------------------------ migration */

/*
 * A running guest for a migration: the vCPU thread (kvm_vm.c) runs, until
 * stopped, a loop that increments one byte in every page 1..GUEST_PAGES-1,
 * forever
 *   again: mov bx, 0x100          BB 00 01
 *   next:  mov ds, bx             8E DB
 *          inc byte [MARK_OFF]    FE 06 10 00
 *          add bx, 0x100          81 C3 00 01
 *          cmp bx, 64 * 0x100     81 FB 00 40
 *          jb next                72 F0
 *          jmp again              EB EB
 * so every page is dirtied again all the time.  vm stop is kvm_vm_pause.
 */
static void vm_ops_stop(void *opaque)
{
    struct vm *v = opaque;
    volatile uint8_t *last = v->mem + (GUEST_PAGES - 1) * PAGE + MARK_OFF;
    uint8_t seen = *last;
    lm_error err = { 0 };

    /*
     * On a busy machine the vCPU thread may not have been scheduled since
     * the last pass (the whole migration takes a few ms): let the guest
     * write once more here, after the last pass's sync, so that the final
     * sync has something to report.  Bounded: the test checks the resend.
     */
    for (int i = 0; i < 5000 && *last == seen; i++)
        usleep(1000);
    if (kvm_vm_pause(v->kv, &err))
        fail_msg("%s", err.msg);
}

static void vm_ops_start(void *opaque)
{
    struct vm *v = opaque;

    kvm_vm_run(v->kv);
}

static void test_migrate_running_guest(void **state)
{
    static const uint8_t loop[] = { 0xbb, 0x00, 0x01, 0x8e, 0xdb, 0xfe, 0x06, MARK_OFF, 0x00,
                                    0x81, 0xc3, 0x00, 0x01, 0x81, 0xfb, 0x00,
                                    (uint8_t)GUEST_PAGES, 0x72, 0xf0, 0xeb, 0xeb };
    const lm_vm_ops ops = { .stop = vm_ops_stop, .start = vm_ops_start };
    lm_mig *src, *dst;
    uint8_t *dmem;
    lm_error err = { 0 };
    lm_stats st;
    struct vm v;

    vm_open(&v, 0);
    vm_boot(&v, loop, sizeof(loop));

    src = lm_new();
    dst = lm_new();
    dmem = mmap(NULL, GUEST_PAGES * PAGE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(dmem != MAP_FAILED);
    if (lm_ram_register(src, KVM_VM_RAM_IDSTR, v.mem, GUEST_PAGES * PAGE, PAGE, &err) ||
        lm_ram_register(dst, KVM_VM_RAM_IDSTR, dmem, GUEST_PAGES * PAGE, PAGE, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(kvm_dirty_attach(src, v.kd, &err), 0);
    lm_set_vm_ops(src, &ops, &v);
    lm_runstate_set_running(src);
    kvm_vm_run(v.kv);
    /* the guest is running and dirtying before the migration starts */
    for (int i = 0; i < 5000 && v.mem[(GUEST_PAGES - 1) * PAGE + MARK_OFF] == 0; i++)
        usleep(1000);
    assert_int_not_equal(v.mem[(GUEST_PAGES - 1) * PAGE + MARK_OFF], 0);

    assert_int_equal(lm_incoming(dst, "tcp:127.0.0.1:0", &err), 0);
    lm_query(dst, &st);
    if (lm_migrate(src, st.socket_address, &err))
        fail_msg("migrate: %s", err.msg);
    assert_int_equal(lm_wait(src, 60000), LM_STATUS_COMPLETED);
    assert_int_equal(lm_wait(dst, 60000), LM_STATUS_COMPLETED);
    /* the source guest is stopped: its memory is final */
    assert_int_equal(lm_runstate_get(src), LM_RUN_POSTMIGRATE);
    assert_false(kvm_vm_running(v.kv));
    lm_query(src, &st);
    print_message("# running KVM guest migrated: %llu syncs, %llu pages sent for %llu, "
                  "%llu vCPU exits\n", (unsigned long long)st.dirty_sync_count,
                  (unsigned long long)(st.normal + st.duplicate),
                  (unsigned long long)GUEST_PAGES, (unsigned long long)kvm_vm_exits(v.kv));
    assert_string_equal(st.dirty_tracker, KVM_DIRTY_TRACKER_NAME);
    assert_true(st.dirty_sync_count >= 2);
    /* pages the guest wrote during the migration were sent again */
    assert_true(st.normal + st.duplicate > GUEST_PAGES);
    assert_memory_equal(v.mem, dmem, GUEST_PAGES * PAGE);

    lm_free(src);
    lm_free(dst);
    munmap(dmem, GUEST_PAGES * PAGE);
    vm_close(&v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_slot_logging),
        cmocka_unit_test(test_slot_logging_by_start),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_migrate_running_guest),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
