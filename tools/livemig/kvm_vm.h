/*
 * A minimal KVM virtual machine: what `livemig vm` runs and what the KVM
 * dirty-log test drives.  One VM, one RAM block at guest physical 0 in one
 * memory slot, one vCPU, no in-kernel irqchip, no PIT, no firmware.
 *
 * Boot: kvm_vm_load() copies a flat binary (or a 512-byte boot sector) to
 * 0x7c00 and kvm_vm_reset() puts the vCPU in real mode there: CS:IP =
 * 0000:7C00, RFLAGS = 2, DL = 0x80 (the boot drive, as a BIOS leaves it)
 * and ESI = the RAM size in bytes (this VMM's own convention, which its
 * test guest reads).  CPUID is what KVM supports (KVM_GET_SUPPORTED_CPUID).
 *
 * Devices: only COM1's transmit side.  A guest byte written to port 0x3f8
 * goes to the serial descriptor; reading the line status (0x3fd) says
 * "transmitter empty"; every other port reads 0xff and ignores writes, and
 * so does MMIO outside RAM.  HLT with no irqchip can never be woken, so a
 * halted vCPU just stays halted (until stopped and started again, when it
 * runs on after the HLT, as KVM leaves RIP there).  A shutdown (triple
 * fault), an internal error or a failed entry ends the vCPU's run: the
 * error is kept (kvm_vm_error) and the vCPU stays parked.
 *
 * Threads.  kvm_vm_new / kvm_vm_free, kvm_vm_load and kvm_vm_reset run on
 * the owner's thread with no vCPU thread running.  kvm_vm_start_thread
 * starts the vCPU thread ("lm-vcpu0"), parked.  kvm_vm_run / kvm_vm_pause
 * may be called from any thread (the library's vm ops call them from its
 * migration and incoming threads): pause returns only when the vCPU is out
 * of KVM_RUN with every pending I/O completed (KVM_RUN with immediate_exit,
 * as the KVM API asks before state is read), so vCPU state read after it is
 * final.  The vCPU is kicked out of KVM_RUN with immediate_exit plus a
 * SIGUSR2 to its thread (the handler does nothing; the thread alone has it
 * unblocked).  The thread is joined by kvm_vm_free.  vCPU state ioctls
 * (kvm_state.c) run only while the vCPU is paused.
 */
#ifndef LIVEMIG_TOOL_KVM_VM_H
#define LIVEMIG_TOOL_KVM_VM_H

#include <stdbool.h>
#include <stdint.h>

#include <linux/kvm.h>

#include "livemig/livemig.h"

#define KVM_VM_BOOT_ADDR 0x7c00
#define KVM_VM_RAM_IDSTR "pc.ram"

typedef struct kvm_vm kvm_vm;

/*
 * Open /dev/kvm, create the VM with `ram_size` bytes of RAM (a multiple of
 * 4096) in slot 0 and one vCPU.  The RAM is `ram` when given (the caller's:
 * a memfd or a file mapped shared, or a reservation a cpr-transfer will
 * map over -- KVM follows the mapping that is there when the vCPU touches
 * it; the caller unmaps it after kvm_vm_free), else zeroed anonymous memory
 * of its own.  `serial_fd` receives COM1's output (not closed by
 * kvm_vm_free; -1 drops it).  NULL with a message in err; code -ENODEV
 * when /dev/kvm or a VM cannot be had at all.
 */
kvm_vm *kvm_vm_new(uint8_t *ram, uint64_t ram_size, int serial_fd, lm_error *err);
void kvm_vm_free(kvm_vm *v);

int kvm_vm_kvm_fd(const kvm_vm *v);
int kvm_vm_fd(const kvm_vm *v);
int kvm_vm_vcpu_fd(const kvm_vm *v);
uint8_t *kvm_vm_ram(const kvm_vm *v);
uint64_t kvm_vm_ram_size(const kvm_vm *v);
const struct kvm_userspace_memory_region *kvm_vm_slot(const kvm_vm *v);

/* Re-register slot 0 with these flags (KVM_MEM_LOG_DIRTY_PAGES or 0);
 * only before kvm_dirty_new copies the slot. */
int kvm_vm_set_slot_flags(kvm_vm *v, uint32_t flags, lm_error *err);

/* Copy the file at `path` to guest physical 0x7c00 (it must fit in RAM). */
int kvm_vm_load(kvm_vm *v, const char *path, lm_error *err);
/* Real mode at 0000:7C00 (see above). */
int kvm_vm_reset(kvm_vm *v, lm_error *err);

/* The vCPU thread, parked until kvm_vm_run. */
int kvm_vm_start_thread(kvm_vm *v, lm_error *err);
void kvm_vm_run(kvm_vm *v);
/* 0 once parked; -ETIMEDOUT (message in err) if it did not park in 10 s. */
int kvm_vm_pause(kvm_vm *v, lm_error *err);

/* Wait until the running guest executes HLT (or its vCPU stops for good):
 * 0, or -ETIMEDOUT / -EIO with a message. */
int kvm_vm_wait_halted(kvm_vm *v, int timeout_ms, lm_error *err);

bool kvm_vm_running(kvm_vm *v);          /* asked to run (not paused) */
bool kvm_vm_parked(kvm_vm *v);           /* out of KVM_RUN, nothing pending */
bool kvm_vm_halted(kvm_vm *v);           /* the guest executed HLT */
uint64_t kvm_vm_exits(kvm_vm *v);        /* KVM_RUN returns so far */
uint64_t kvm_vm_serial_bytes(kvm_vm *v); /* bytes the guest wrote to COM1 */
/* Why the vCPU stopped for good, or "" (copied into buf). */
void kvm_vm_error(kvm_vm *v, char *buf, size_t len);

#endif
