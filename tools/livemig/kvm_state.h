/*
 * The state of a kvm_vm (kvm_vm.h) that a guest can observe, as livemig
 * device sections: everything KVM lets a VMM read and write for this VM's
 * one vCPU and the VM itself, one device per kind of state, so that
 * `livemig analyze` names each and a load error names the one KVM refused.
 *
 * Devices, in registration order, which is the order the destination sets
 * them (general registers before the FPU and the control registers, MSRs
 * after those, events and MP state late, as KVM's documentation of each
 * ioctl implies), every one version 1, instance = vCPU index (0):
 *
 *   kvm-regs       KVM_GET_REGS / KVM_SET_REGS           struct kvm_regs
 *   kvm-xsave      KVM_GET_XSAVE(2) / KVM_SET_XSAVE       the XSAVE area (with KVM_CAP_XSAVE)
 *   kvm-fpu        KVM_GET_FPU / KVM_SET_FPU             struct kvm_fpu (without it)
 *   kvm-xcrs       KVM_GET_XCRS / KVM_SET_XCRS           (with KVM_CAP_XCRS)
 *   kvm-sregs      KVM_GET_SREGS / KVM_SET_SREGS         segments, control registers, EFER
 *   kvm-msrs       KVM_GET_MSRS / KVM_SET_MSRS           the MSRs of KVM_GET_MSR_INDEX_LIST
 *                                                        that this vCPU can read and KVM
 *                                                        takes back (probed at start: e.g.
 *                                                        an in-kernel LAPIC's, which this
 *                                                        VM lacks, read but refuse writes)
 *   kvm-events     KVM_GET_VCPU_EVENTS / SET             pending exception, interrupt, NMI, ...
 *   kvm-mp-state   KVM_GET_MP_STATE / SET
 *   kvm-debugregs  KVM_GET_DEBUGREGS / SET               (with KVM_CAP_DEBUGREGS)
 *   kvm-clock      KVM_GET_CLOCK / KVM_SET_CLOCK         instance 0, the VM's kvmclock
 *
 * Encoding, all big-endian on the wire:
 *   raw kinds (all but kvm-msrs and kvm-clock): be32 size, then the
 *     kernel's structure as KVM_GET_* fills it on x86-64 (its own layout,
 *     little-endian); the loader requires exactly its own size.
 *   kvm-msrs:  be32 count (at most 4096), then count x (be32 index, be64 value).
 *   kvm-clock: be64 clock (ns), be32 the source's flags (informational).
 * No in-kernel irqchip or PIT is created, so there is none of their state.
 *
 * Load errors name the device, the vCPU and what KVM refused (for sregs
 * the control registers and CS; for MSRs the index and value of the first
 * one refused), and fail the load: the destination's guest never runs.
 *
 * Threads: the callbacks run on the library's migration / incoming thread
 * while the vCPU is paused (vm ops stop) or not yet started.
 */
#ifndef LIVEMIG_TOOL_KVM_STATE_H
#define LIVEMIG_TOOL_KVM_STATE_H

#include "livemig/livemig.h"

#include "kvm_vm.h"

#define KVM_STATE_VERSION 1

typedef struct kvm_state kvm_state;

/* Probe what this host's KVM has (XSAVE size, readable MSRs). */
kvm_state *kvm_state_new(kvm_vm *v, lm_error *err);
void kvm_state_free(kvm_state *ks);

/* lm_device_register every device above on m. */
int kvm_state_register(kvm_state *ks, lm_mig *m, lm_error *err);

/* How many MSRs travel, and how many KVM lists that cannot (x-vm-info). */
int kvm_state_nmsrs(const kvm_state *ks);
int kvm_state_msrs_skipped(const kvm_state *ks);

#endif
