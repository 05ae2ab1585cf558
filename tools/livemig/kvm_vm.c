/*
 * A minimal KVM virtual machine; see kvm_vm.h for what it is and its
 * threads.  Implemented from the kernel's documented KVM API
 * (Documentation/virt/kvm/api.rst).
 *
 * The vCPU thread's states, under v->lock:
 *   run_req   the owner wants the guest running (kvm_vm_run / kvm_vm_pause)
 *   parked    the thread is outside KVM_RUN, waiting on v->cond, with no
 *             I/O pending completion: what kvm_vm_pause waits for
 *   dead      the guest stopped for good (v->error says why)
 * Invariant: parked implies the last KVM_RUN left nothing to complete (the
 * thread re-enters with immediate_exit = 1 after an I/O or MMIO exit before
 * it parks).
 *
 * Kick: kvm_vm_pause sets run_req = false and run->immediate_exit = 1
 * under the lock, then sends SIGUSR2 until the thread parks.  A thread
 * about to enter KVM_RUN set immediate_exit = 0 under the lock only while
 * run_req held, so either KVM_RUN sees immediate_exit = 1 and returns at
 * once, or the signal interrupts it.
 */
#include "kvm_vm.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

#define COM1_BASE 0x3f8
#define COM1_LSR (COM1_BASE + 5)
#define LSR_THR_EMPTY 0x60         /* THRE | TEMT */
#define PAUSE_TIMEOUT_S 10
#define TSS_ADDR 0xfffbd000UL      /* above any RAM here; needed by VMX real mode */
#define KICK_SIGNAL SIGUSR2

struct kvm_vm {
    int kvm, fd, vcpu;
    struct kvm_run *run;
    size_t run_size;
    uint8_t *ram;
    uint64_t ram_size;
    bool ram_owned;             /* mapped here (no RAM given to kvm_vm_new) */
    struct kvm_userspace_memory_region slot;
    int serial_fd;

    pthread_t thread;
    bool thread_started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool run_req, parked, dead, quit, halted;
    char error[256];

    _Atomic uint64_t exits, serial_bytes;
};

static void kick_handler(int sig)
{
    (void)sig;
}

int kvm_vm_kvm_fd(const kvm_vm *v) { return v->kvm; }
int kvm_vm_fd(const kvm_vm *v) { return v->fd; }
int kvm_vm_vcpu_fd(const kvm_vm *v) { return v->vcpu; }
uint8_t *kvm_vm_ram(const kvm_vm *v) { return v->ram; }
uint64_t kvm_vm_ram_size(const kvm_vm *v) { return v->ram_size; }
const struct kvm_userspace_memory_region *kvm_vm_slot(const kvm_vm *v) { return &v->slot; }

/* The vCPU sees what KVM supports (grown until KVM_GET_SUPPORTED_CPUID fits). */
static int set_cpuid(kvm_vm *v, lm_error *err)
{
    struct kvm_cpuid2 *c = NULL;
    int n = 64, rc;

    for (;;) {
        free(c);
        c = calloc(1, sizeof(*c) + (size_t)n * sizeof(c->entries[0]));
        if (!c)
            return tool_error(err, -ENOMEM, "kvm: out of memory");
        c->nent = (uint32_t)n;
        if (ioctl(v->kvm, KVM_GET_SUPPORTED_CPUID, c) == 0)
            break;
        if (errno != E2BIG || n >= 4096) {
            rc = tool_error_errno(err, -errno, "kvm: KVM_GET_SUPPORTED_CPUID");
            free(c);
            return rc;
        }
        n *= 2;
    }
    rc = ioctl(v->vcpu, KVM_SET_CPUID2, c) < 0
             ? tool_error_errno(err, -errno, "kvm: KVM_SET_CPUID2") : 0;
    free(c);
    return rc;
}

kvm_vm *kvm_vm_new(uint8_t *ram, uint64_t ram_size, int serial_fd, lm_error *err)
{
    struct sigaction sa = { .sa_handler = kick_handler };
    kvm_vm *v;
    int mmap_size;

    if (!ram_size || ram_size % 4096) {
        tool_error(err, -EINVAL, "kvm: RAM size %llu is not a non-zero multiple of 4096",
                   (unsigned long long)ram_size);
        return NULL;
    }
    v = calloc(1, sizeof(*v));
    if (!v) {
        tool_error(err, -ENOMEM, "kvm: out of memory");
        return NULL;
    }
    v->kvm = v->fd = v->vcpu = -1;
    v->serial_fd = serial_fd;
    v->parked = true;
    pthread_mutex_init(&v->lock, NULL);
    pthread_cond_init(&v->cond, NULL);

    v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (v->kvm < 0) {
        tool_error_errno(err, -ENODEV, "kvm: cannot open /dev/kvm (%s)", strerror(errno));
        goto fail;
    }
    if (ioctl(v->kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
        tool_error(err, -ENODEV, "kvm: /dev/kvm has API version %d, not %d",
                   ioctl(v->kvm, KVM_GET_API_VERSION, 0), KVM_API_VERSION);
        goto fail;
    }
    v->fd = ioctl(v->kvm, KVM_CREATE_VM, 0);
    if (v->fd < 0) {
        tool_error(err, -ENODEV, "kvm: KVM_CREATE_VM: %s", strerror(errno));
        goto fail;
    }
    v->ram_owned = !ram;
    v->ram = ram ? ram : mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE |
                              MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (v->ram == MAP_FAILED) {
        v->ram = NULL;
        tool_error_errno(err, -errno, "kvm: mapping %llu bytes of guest RAM",
                         (unsigned long long)ram_size);
        goto fail;
    }
    v->ram_size = ram_size;
    v->slot = (struct kvm_userspace_memory_region){
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = ram_size,
        .userspace_addr = (uintptr_t)v->ram };
    if (ioctl(v->fd, KVM_SET_USER_MEMORY_REGION, &v->slot) < 0) {
        tool_error_errno(err, -errno, "kvm: KVM_SET_USER_MEMORY_REGION of %llu bytes",
                         (unsigned long long)ram_size);
        goto fail;
    }
    (void)ioctl(v->fd, KVM_SET_TSS_ADDR, TSS_ADDR);   /* VMX only; harmless elsewhere */
    v->vcpu = ioctl(v->fd, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0) {
        tool_error_errno(err, -errno, "kvm: KVM_CREATE_VCPU");
        goto fail;
    }
    mmap_size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size <= 0) {
        tool_error_errno(err, -errno, "kvm: KVM_GET_VCPU_MMAP_SIZE");
        goto fail;
    }
    v->run_size = (size_t)mmap_size;
    v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    if (v->run == MAP_FAILED) {
        v->run = NULL;
        tool_error_errno(err, -errno, "kvm: mapping the vCPU's kvm_run");
        goto fail;
    }
    if (set_cpuid(v, err) < 0)
        goto fail;
    sigemptyset(&sa.sa_mask);
    if (sigaction(KICK_SIGNAL, &sa, NULL) < 0) {
        tool_error_errno(err, -errno, "kvm: installing the vCPU kick handler");
        goto fail;
    }
    return v;
fail:
    kvm_vm_free(v);
    return NULL;
}

void kvm_vm_free(kvm_vm *v)
{
    if (!v)
        return;
    if (v->thread_started) {
        pthread_mutex_lock(&v->lock);
        v->quit = true;
        v->run_req = false;
        if (v->run)
            __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        pthread_cond_broadcast(&v->cond);
        pthread_mutex_unlock(&v->lock);
        /* the thread exits at its next look at quit; a signal ends a KVM_RUN */
        for (;;) {
            struct timespec ts;
            pthread_kill(v->thread, KICK_SIGNAL);
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 10 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            if (pthread_timedjoin_np(v->thread, NULL, &ts) == 0)
                break;
        }
    }
    if (v->run)
        munmap(v->run, v->run_size);
    if (v->vcpu >= 0)
        close(v->vcpu);
    if (v->fd >= 0)
        close(v->fd);
    if (v->kvm >= 0)
        close(v->kvm);
    if (v->ram && v->ram_owned)
        munmap(v->ram, v->ram_size);
    pthread_cond_destroy(&v->cond);
    pthread_mutex_destroy(&v->lock);
    free(v);
}

int kvm_vm_load(kvm_vm *v, const char *path, lm_error *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    uint64_t room = v->ram_size > KVM_VM_BOOT_ADDR ? v->ram_size - KVM_VM_BOOT_ADDR : 0;
    struct stat st;
    uint64_t done = 0;
    int rc = 0;

    if (fd < 0)
        return tool_error_errno(err, -errno, "--boot: cannot open '%s'", path);
    if (fstat(fd, &st) < 0) {
        rc = tool_error_errno(err, -errno, "--boot: '%s'", path);
        goto out;
    }
    if (!S_ISREG(st.st_mode) || st.st_size == 0) {
        rc = tool_error(err, -EINVAL, "--boot: '%s' is not a non-empty regular file", path);
        goto out;
    }
    if ((uint64_t)st.st_size > room) {
        rc = tool_error(err, -EFBIG, "--boot: '%s' has %lld bytes; only %llu fit between "
                        "0x7c00 and the end of RAM", path, (long long)st.st_size,
                        (unsigned long long)room);
        goto out;
    }
    while (done < (uint64_t)st.st_size) {
        ssize_t n = read(fd, v->ram + KVM_VM_BOOT_ADDR + done, (size_t)st.st_size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rc = n < 0 ? tool_error_errno(err, -errno, "--boot: reading '%s'", path)
                       : tool_error(err, -EIO, "--boot: '%s' shrank while read", path);
            goto out;
        }
        done += (uint64_t)n;
    }
out:
    close(fd);
    return rc;
}

int kvm_vm_reset(kvm_vm *v, lm_error *err)
{
    struct kvm_sregs sregs;
    struct kvm_regs regs = { .rip = KVM_VM_BOOT_ADDR, .rflags = 0x2, .rdx = 0x80,
                             .rsi = v->ram_size > UINT32_MAX ? UINT32_MAX : v->ram_size };

    if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0)
        return tool_error_errno(err, -errno, "kvm: KVM_GET_SREGS");
    /* reset state is real mode with CS at the reset vector's segment: move
     * CS to 0 (and the others already are) */
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0)
        return tool_error_errno(err, -errno, "kvm: KVM_SET_SREGS");
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0)
        return tool_error_errno(err, -errno, "kvm: KVM_SET_REGS");
    return 0;
}

/* ------------------------------------------------------------ the vCPU thread */

static void serial_out(kvm_vm *v, uint8_t c)
{
    while (v->serial_fd >= 0 && write(v->serial_fd, &c, 1) < 0 && errno == EINTR)
        ;
    atomic_fetch_add(&v->serial_bytes, 1);
}

static void handle_io(kvm_vm *v)
{
    struct kvm_run *r = v->run;
    uint8_t *data = (uint8_t *)r + r->io.data_offset;

    for (uint32_t i = 0; i < r->io.count; i++, data += r->io.size) {
        if (r->io.direction == KVM_EXIT_IO_OUT) {
            if (r->io.port == COM1_BASE)
                serial_out(v, data[0]);
        } else {
            memset(data, 0xff, r->io.size);
            if (r->io.port == COM1_LSR)
                data[0] = LSR_THR_EMPTY;
        }
    }
}

static void vcpu_die(kvm_vm *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void vcpu_die(kvm_vm *v, const char *fmt, ...)
{
    va_list ap;

    pthread_mutex_lock(&v->lock);
    va_start(ap, fmt);
    vsnprintf(v->error, sizeof(v->error), fmt, ap);
    va_end(ap);
    v->dead = true;
    pthread_mutex_unlock(&v->lock);
    fprintf(stderr, "livemig vm: vCPU 0 stopped: %s\n", v->error);
}

/* One KVM_RUN and its exit.  Returns true when an I/O or MMIO exit left an
 * operation for the next KVM_RUN to complete. */
static bool vcpu_run_once(kvm_vm *v)
{
    struct kvm_run *r = v->run;

    if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
        if (errno != EINTR && errno != EAGAIN)
            vcpu_die(v, "KVM_RUN: %s", strerror(errno));
        return false;
    }
    atomic_fetch_add(&v->exits, 1);
    switch (r->exit_reason) {
    case KVM_EXIT_IO:
        handle_io(v);
        return true;
    case KVM_EXIT_MMIO:
        if (!r->mmio.is_write)
            memset(r->mmio.data, 0xff, sizeof(r->mmio.data));
        return true;
    case KVM_EXIT_HLT:
        pthread_mutex_lock(&v->lock);
        v->halted = true;
        pthread_mutex_unlock(&v->lock);
        return false;
    case KVM_EXIT_INTR:
        return false;
    case KVM_EXIT_SHUTDOWN:
        vcpu_die(v, "the guest shut down (a triple fault)");
        return false;
    case KVM_EXIT_INTERNAL_ERROR:
        vcpu_die(v, "KVM internal error, suberror %u", r->internal.suberror);
        return false;
    case KVM_EXIT_FAIL_ENTRY:
        vcpu_die(v, "KVM failed to enter the guest, hardware reason %#llx",
                 (unsigned long long)r->fail_entry.hardware_entry_failure_reason);
        return false;
    default:
        vcpu_die(v, "unexpected KVM exit reason %u", r->exit_reason);
        return false;
    }
}

static void *vcpu_main(void *arg)
{
    kvm_vm *v = arg;
    bool pending = false;
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, KICK_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);

    pthread_mutex_lock(&v->lock);
    for (;;) {
        if (v->quit)
            break;
        if (!v->run_req || v->dead || v->halted) {
            if (pending) {
                /* complete the exit's I/O before anyone reads the state */
                __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
                pthread_mutex_unlock(&v->lock);
                (void)vcpu_run_once(v);     /* returns at once: EINTR */
                pending = false;
                pthread_mutex_lock(&v->lock);
                continue;
            }
            v->parked = true;
            pthread_cond_broadcast(&v->cond);
            pthread_cond_wait(&v->cond, &v->lock);
            continue;
        }
        v->parked = false;
        __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&v->lock);
        pending = vcpu_run_once(v);
        pthread_mutex_lock(&v->lock);
    }
    v->parked = true;
    pthread_cond_broadcast(&v->cond);
    pthread_mutex_unlock(&v->lock);
    return NULL;
}

int kvm_vm_start_thread(kvm_vm *v, lm_error *err)
{
    sigset_t set, old;
    int rc;

    /* the thread starts with the kick blocked and unblocks it itself */
    sigemptyset(&set);
    sigaddset(&set, KICK_SIGNAL);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    rc = pthread_create(&v->thread, NULL, vcpu_main, v);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc)
        return tool_error(err, -rc, "kvm: cannot start the vCPU thread: %s", strerror(rc));
    pthread_setname_np(v->thread, "lm-vcpu0");
    v->thread_started = true;
    return 0;
}

void kvm_vm_run(kvm_vm *v)
{
    pthread_mutex_lock(&v->lock);
    v->run_req = true;
    v->halted = false;      /* a started guest runs on after its HLT */
    pthread_cond_broadcast(&v->cond);
    pthread_mutex_unlock(&v->lock);
}

int kvm_vm_pause(kvm_vm *v, lm_error *err)
{
    int64_t deadline = tool_now_ns() + PAUSE_TIMEOUT_S * 1000000000LL;
    int rc = 0;

    pthread_mutex_lock(&v->lock);
    v->run_req = false;
    __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    while (v->thread_started && !v->parked) {
        struct timespec tick;
        if (tool_now_ns() >= deadline) {
            rc = tool_error(err, -ETIMEDOUT, "kvm: the vCPU did not stop within %d s",
                            PAUSE_TIMEOUT_S);
            break;
        }
        pthread_kill(v->thread, KICK_SIGNAL);
        clock_gettime(CLOCK_REALTIME, &tick);
        tick.tv_nsec += 1000 * 1000;
        if (tick.tv_nsec >= 1000000000) {
            tick.tv_sec++;
            tick.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&v->cond, &v->lock, &tick);
    }
    pthread_mutex_unlock(&v->lock);
    return rc;
}

int kvm_vm_set_slot_flags(kvm_vm *v, uint32_t flags, lm_error *err)
{
    struct kvm_userspace_memory_region r = v->slot;

    r.flags = flags;
    if (ioctl(v->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        return tool_error_errno(err, -errno, "kvm: setting slot 0's flags to %#x", flags);
    v->slot = r;
    return 0;
}

int kvm_vm_wait_halted(kvm_vm *v, int timeout_ms, lm_error *err)
{
    int64_t deadline = tool_now_ns() + (int64_t)timeout_ms * 1000000;
    int rc = 0;

    pthread_mutex_lock(&v->lock);
    while (!v->halted && !v->dead) {
        struct timespec tick;
        if (tool_now_ns() >= deadline) {
            rc = tool_error(err, -ETIMEDOUT, "kvm: the guest did not halt within %d ms",
                            timeout_ms);
            break;
        }
        clock_gettime(CLOCK_REALTIME, &tick);
        tick.tv_nsec += 10 * 1000 * 1000;
        if (tick.tv_nsec >= 1000000000) {
            tick.tv_sec++;
            tick.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&v->cond, &v->lock, &tick);
    }
    if (!rc && v->dead)
        rc = tool_error(err, -EIO, "kvm: the vCPU stopped: %s", v->error);
    pthread_mutex_unlock(&v->lock);
    return rc;
}

bool kvm_vm_running(kvm_vm *v)
{
    pthread_mutex_lock(&v->lock);
    bool r = v->run_req;
    pthread_mutex_unlock(&v->lock);
    return r;
}

bool kvm_vm_parked(kvm_vm *v)
{
    pthread_mutex_lock(&v->lock);
    bool p = v->parked;
    pthread_mutex_unlock(&v->lock);
    return p;
}

bool kvm_vm_halted(kvm_vm *v)
{
    pthread_mutex_lock(&v->lock);
    bool h = v->halted;
    pthread_mutex_unlock(&v->lock);
    return h;
}

uint64_t kvm_vm_exits(kvm_vm *v) { return atomic_load(&v->exits); }
uint64_t kvm_vm_serial_bytes(kvm_vm *v) { return atomic_load(&v->serial_bytes); }

void kvm_vm_error(kvm_vm *v, char *buf, size_t len)
{
    pthread_mutex_lock(&v->lock);
    snprintf(buf, len, "%s", v->error);
    pthread_mutex_unlock(&v->lock);
}
