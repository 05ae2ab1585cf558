/*
 * `livemig vm`: a minimal KVM VMM (kvm_vm.h) built on the public API,
 * serving the same QMP socket as `livemig guest`.
 *
 * Glue between the VM and the library:
 *
 *   RAM           one block "pc.ram" = KVM memory slot 0, guest physical 0.
 *   device state  kvm_state.h: one device per kind of vCPU / VM state.
 *   dirty log     the KVM dirty bitmap with manual protect (kvm_dirty.h),
 *                 the only tracker: the guest's writes are all vCPU writes,
 *                 and this VMM writes guest RAM only before the guest runs.
 *   vm ops        stop = pause the vCPU (out of KVM_RUN, I/O completed),
 *                 start = run it; with --check, the first start after an
 *                 incoming migration first checks the test guest's pattern
 *                 (vmcheck.h) and exits 3, the guest never run, if it is
 *                 broken.  No throttle: auto-converge cannot slow this guest.
 *   QMP           the migration commands (built in), quit (host.h),
 *                 pmemsave {val, size, filename} as QEMU's, x-vm-check,
 *                 x-vm-info.
 *
 * Threads: main (sets up, waits in tool_host_wait), the vCPU thread
 * (kvm_vm.c), the QMP thread (handlers), the library's threads (vm ops,
 * device callbacks, the dirty log).  Teardown: QMP (no more handlers), the
 * library (joins its threads, which may still call vm ops), then the dirty
 * log, the state and the VM (joins the vCPU thread).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <jansson.h>

#include "livemig/livemig.h"
#include "livemig/qmp.h"

#include "commands.h"
#include "host.h"
#include "rambackend.h"
#include "kvm_dirty.h"
#include "kvm_state.h"
#include "kvm_vm.h"
#include "util.h"
#include "vmcheck.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define VM_NAME "livemig vm"

struct vmctx {
    struct tool_host h;
    kvm_vm *vm;
    kvm_state *state;
    kvm_dirty *dirty;
    int serial_fd;
    bool check_on_arrival;
    uint8_t *ram;               /* --mem-backend's mapping (NULL: the VM's own) */
    int ram_fd;                 /* its descriptor, -1 for none */
    uint64_t ram_size;
};

/* ---------------------------------------------------------------- vm ops */

static void vm_stop(void *opaque)
{
    struct vmctx *vc = opaque;
    lm_error err = { 0 };

    if (kvm_vm_pause(vc->vm, &err))
        fprintf(stderr, VM_NAME ": %s\n", err.msg);
}

/* The test guest's pattern, checked; a broken one must not run. */
static void vm_check(struct vmctx *vc)
{
    struct vmcheck_report r;

    vmcheck_run(kvm_vm_ram(vc->vm), kvm_vm_ram_size(vc->vm), &r);
    fprintf(stderr, VM_NAME ": arrival check: %s\n", r.msg);
    if (!r.ok)
        _exit(3);
}

static void vm_start(void *opaque)
{
    struct vmctx *vc = opaque;

    /* In postcopy the vCPU runs (and faults) before the last page: the
     * check then waits for the end (vm_late_arrival). */
    if (tool_host_check_at_start(&vc->h, vc->check_on_arrival))
        vm_check(vc);
    kvm_vm_run(vc->vm);
}

/* Postcopy's arrival check, on the main thread once every page is here:
 * the vCPU paused for a consistent snapshot, then it runs on. */
static void vm_late_arrival(struct tool_host *h)
{
    struct vmctx *vc = (struct vmctx *)h;      /* h is its first member */
    lm_error err = { 0 };

    if (kvm_vm_pause(vc->vm, &err)) {
        fprintf(stderr, VM_NAME ": arrival check: cannot pause the vCPU: %s\n", err.msg);
        return;
    }
    vm_check(vc);
    kvm_vm_run(vc->vm);
}

/* ---------------------------------------------------------------- QMP */

static int qmp_pmemsave(void *opaque, const char *args_json, char **reply_json,
                        lm_error *err)
{
    struct vmctx *vc = opaque;
    json_t *a = tool_host_args(args_json, err);
    json_t *val, *size, *file;
    uint64_t addr, len, ram = kvm_vm_ram_size(vc->vm), done = 0;
    int fd = -1, rc = 0;

    if (!a)
        return -EINVAL;
    val = json_object_get(a, "val");
    size = json_object_get(a, "size");
    file = json_object_get(a, "filename");
    if (!json_is_integer(val) || !json_is_integer(size) || !json_is_string(file)) {
        rc = tool_error(err, -EINVAL, "pmemsave needs 'val' (address), 'size' (integers) "
                        "and 'filename' (string)");
        goto out;
    }
    addr = (uint64_t)json_integer_value(val);
    len = (uint64_t)json_integer_value(size);
    if (json_integer_value(val) < 0 || json_integer_value(size) < 0 || addr > ram ||
        len > ram - addr) {
        rc = tool_error(err, -EINVAL, "pmemsave: [%lld, +%lld) is not inside the guest's "
                        "%llu bytes of RAM", (long long)json_integer_value(val),
                        (long long)json_integer_value(size), (unsigned long long)ram);
        goto out;
    }
    fd = open(json_string_value(file), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        rc = tool_error_errno(err, -errno, "pmemsave: cannot open '%s'",
                              json_string_value(file));
        goto out;
    }
    while (done < len) {
        ssize_t n = write(fd, kvm_vm_ram(vc->vm) + addr + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = tool_error_errno(err, -errno, "pmemsave: writing '%s'",
                                  json_string_value(file));
            goto out;
        }
        done += (uint64_t)n;
    }
    *reply_json = NULL;
out:
    if (fd >= 0 && close(fd) < 0 && !rc)
        rc = tool_error_errno(err, -errno, "pmemsave: closing '%s'", json_string_value(file));
    json_decref(a);
    return rc;
}

static int qmp_check(void *opaque, const char *args_json, char **reply_json, lm_error *err)
{
    struct vmctx *vc = opaque;
    struct vmcheck_report r;

    if (lm_runstate_get(vc->h.m) == LM_RUN_INMIGRATE)
        return tool_error(err, -EBUSY, "an incoming migration is loading guest RAM; check "
                          "after it completes");
    if (kvm_vm_running(vc->vm) && !kvm_vm_halted(vc->vm))
        return tool_error(err, -EBUSY, "the guest is running: 'stop' it first (a check of "
                          "running memory is a check of a moving target)");
    vmcheck_run(kvm_vm_ram(vc->vm), kvm_vm_ram_size(vc->vm), &r);
    return tool_host_reply(json_pack("{s:b, s:I, s:I, s:I, s:I, s:s}", "ok", r.ok,
                                     "pass", (json_int_t)r.pass, "cursor", (json_int_t)r.cursor,
                                     "pages", (json_int_t)r.pages, "ahead", (json_int_t)r.ahead,
                                     "message", r.msg), reply_json, err);
}

static int qmp_info(void *opaque, const char *args_json, char **reply_json, lm_error *err)
{
    struct vmctx *vc = opaque;
    const uint8_t *hdr = kvm_vm_ram(vc->vm) + VMCHECK_HDR;
    uint32_t w[3];
    char error[256];

    memcpy(w, hdr, sizeof(w));      /* a racy read of a running guest: a hint */
    kvm_vm_error(vc->vm, error, sizeof(error));
    return tool_host_reply(json_pack("{s:I, s:b, s:b, s:I, s:I, s:I, s:I, s:s, s:b, s:I, s:I}",
                                     "mem", (json_int_t)kvm_vm_ram_size(vc->vm),
                                     "running", kvm_vm_running(vc->vm),
                                     "halted", kvm_vm_halted(vc->vm),
                                     "exits", (json_int_t)kvm_vm_exits(vc->vm),
                                     "serial-bytes", (json_int_t)kvm_vm_serial_bytes(vc->vm),
                                     "msrs", (json_int_t)kvm_state_nmsrs(vc->state),
                                     "msrs-not-restorable",
                                     (json_int_t)kvm_state_msrs_skipped(vc->state),
                                     "error", error,
                                     "pattern-guest", w[0] == VMCHECK_MAGIC,
                                     "pass", (json_int_t)w[1], "cursor", (json_int_t)w[2]),
                           reply_json, err);
}

/* ---------------------------------------------------------------- command */

static void vm_usage(FILE *f)
{
    fprintf(f,
        "Usage: livemig vm --mem SIZE (--boot FILE | --incoming URI|defer) [options]\n"
        "\n"
        "Run a minimal KVM virtual machine: one vCPU started in real mode at\n"
        "0000:7C00 with no firmware, RAM from guest physical 0, COM1 output.\n"
        "\n"
        "Options:\n"
        "  --mem SIZE             guest RAM, K/M/G suffixes (default 16M)\n"
        "  --boot FILE            a flat binary or 512-byte boot sector, loaded at 0x7c00\n"
        "                         (ESI = RAM size in bytes at entry)\n"
        "  --serial FILE          COM1 output to FILE (default stdout)\n"
        "  --qmp unix:PATH        serve QMP on this socket\n"
        "  --incoming URI|defer   be a migration destination; 'defer' waits for\n"
        "                         QMP migrate-incoming\n"
        "  --check                on arrival, check the test guest's page pattern before\n"
        "                         the guest runs (exit 3 if it is broken)\n"
        "  --mem-backend B        anon | memfd | file:PATH (default anon); memfd and\n"
        "                         file are what the CPR modes hand over (mode\n"
        "                         cpr-transfer / cpr-reboot), as for livemig guest\n"
        "  -h, --help             show this help\n"
        "\n"
        "QMP commands besides the migration ones: quit, pmemsave {val, size,\n"
        "filename}, x-vm-check (the test guest's pattern; guest stopped), x-vm-info.\n"
        "\n"
        "Exit status: 0 after quit or SIGINT/SIGTERM; 1 on an error or a failed\n"
        "incoming migration; 2 usage; 3 the arrival check found a broken pattern.\n");
}

struct vm_args {
    uint64_t mem;
    const char *boot, *serial, *qmp, *incoming;
    bool check;
    enum guest_backend backend;
    const char *mem_path;
};

static int vm_parse(int argc, char **argv, struct vm_args *a, lm_error *err)
{
    static const struct option opts[] = {
        { "mem", required_argument, NULL, 'm' },
        { "boot", required_argument, NULL, 'b' },
        { "serial", required_argument, NULL, 's' },
        { "qmp", required_argument, NULL, 'q' },
        { "incoming", required_argument, NULL, 'i' },
        { "check", no_argument, NULL, 'c' },
        { "mem-backend", required_argument, NULL, 'B' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int opt;
    int64_t v;

    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'm':
            v = lm_parse_size(optarg);
            if (v < (1 << 20) || v % 4096 || (uint64_t)v > (1ULL << 32) - (1ULL << 28))
                return tool_error(err, -EINVAL, "--mem: '%s' is not a size from 1M to 3840M "
                                  "that is a multiple of 4096", optarg);
            a->mem = (uint64_t)v;
            break;
        case 'b':
            a->boot = optarg;
            break;
        case 's':
            a->serial = optarg;
            break;
        case 'q':
            if (strncmp(optarg, "unix:", 5) || !optarg[5])
                return tool_error(err, -EINVAL, "--qmp: '%s' is not unix:PATH", optarg);
            a->qmp = optarg;
            break;
        case 'i':
            a->incoming = optarg;
            break;
        case 'c':
            a->check = true;
            break;
        case 'B':
            if (tool_mem_backend_parse(optarg, &a->backend, &a->mem_path, err))
                return err->code;
            break;
        case 'h':
            return 1;
        default:
            return -EINVAL;
        }
    }
    if (optind < argc)
        return tool_error(err, -EINVAL, "unexpected argument '%s'", argv[optind]);
    if (!a->boot && !a->incoming)
        return tool_error(err, -EINVAL, "--boot FILE is needed (unless --incoming brings "
                          "the guest)");
    if (a->incoming && !strcmp(a->incoming, "defer") && !a->qmp)
        return tool_error(err, -EINVAL, "--incoming defer needs --qmp (migrate-incoming "
                          "comes over QMP)");
    return 0;
}

static int vm_setup(struct vmctx *vc, const struct vm_args *a, lm_error *err)
{
    static const lm_vm_ops vm_ops = { .stop = vm_stop, .start = vm_start };
    int rc;

    if (a->serial) {
        vc->serial_fd = open(a->serial, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC,
                             0644);
        if (vc->serial_fd < 0)
            return tool_error_errno(err, -errno, "--serial: cannot open '%s'", a->serial);
    }
    if (a->backend != GUEST_MEM_ANON) {
        rc = tool_ram_map(a->backend, a->mem_path, a->mem, a->incoming != NULL, &vc->ram,
                          &vc->ram_fd, err);
        if (rc)
            return rc;
        vc->ram_size = a->mem;
    }
    vc->vm = kvm_vm_new(vc->ram, a->mem, vc->serial_fd, err);
    if (!vc->vm)
        return err->code ? err->code : -EIO;
    /* a destination's RAM is prefaulted (as livemig guest's, and QEMU's prealloc=on), so
     * loading does not pay first-touch faults; postcopy discards it anyway */
    if (a->incoming && a->backend == GUEST_MEM_ANON &&
        madvise(kvm_vm_ram(vc->vm), a->mem, MADV_POPULATE_WRITE) < 0 && errno != EINVAL)
        return tool_error_errno(err, -errno, "cannot prefault the VM's RAM");
    if (a->boot && !a->incoming) {
        rc = kvm_vm_load(vc->vm, a->boot, err);
        if (rc)
            return rc;
    }
    rc = kvm_vm_reset(vc->vm, err);
    if (rc)
        return rc;
    vc->state = kvm_state_new(vc->vm, err);
    if (!vc->state)
        return err->code ? err->code : -EIO;
    vc->dirty = kvm_dirty_new(kvm_vm_fd(vc->vm), kvm_vm_slot(vc->vm), 1, err);
    if (!vc->dirty)
        return err->code ? err->code : -EIO;

    vc->h.m = lm_new();
    /* an incoming memfd VM: fd -1, the source's memfd comes (cpr-transfer) */
    if (a->backend == GUEST_MEM_ANON)
        rc = lm_ram_register(vc->h.m, KVM_VM_RAM_IDSTR, kvm_vm_ram(vc->vm), a->mem, 4096, err);
    else
        rc = lm_ram_register_fd(vc->h.m, KVM_VM_RAM_IDSTR, kvm_vm_ram(vc->vm), a->mem, 4096,
                                vc->ram_fd, 0, err);
    if (rc)
        return rc;
    rc = kvm_state_register(vc->state, vc->h.m, err);
    if (rc)
        return rc;
    rc = kvm_dirty_attach(vc->h.m, vc->dirty, err);
    if (rc)
        return rc;
    lm_set_vm_ops(vc->h.m, &vm_ops, vc);
    if (lm_add_listener(vc->h.m, &tool_host_listener, &vc->h) < 0)
        return tool_error(err, -ENOSPC, "cannot add a migration listener");
    rc = kvm_vm_start_thread(vc->vm, err);
    if (rc)
        return rc;

    if (a->qmp) {
        vc->h.q = lm_qmp_new(vc->h.m, a->qmp, err);
        if (!vc->h.q)
            return err->code ? err->code : -EIO;
        if (lm_qmp_register(vc->h.q, "quit", tool_host_qmp_quit, &vc->h) ||
            lm_qmp_register(vc->h.q, "pmemsave", qmp_pmemsave, vc) ||
            lm_qmp_register(vc->h.q, "x-vm-check", qmp_check, vc) ||
            lm_qmp_register(vc->h.q, "x-vm-info", qmp_info, vc))
            return tool_error(err, -ENOMEM, "cannot register the VM's QMP commands");
        lm_qmp_open(vc->h.q);
    }

    if (!a->incoming) {
        kvm_vm_run(vc->vm);
        lm_runstate_set_running(vc->h.m);
        return 0;
    }
    if (strcmp(a->incoming, "defer"))
        return lm_incoming(vc->h.m, a->incoming, err);
    lm_runstate_set_inmigrate(vc->h.m);
    return 0;
}

int cmd_vm(int argc, char **argv)
{
    struct vm_args a = { .mem = 16ULL << 20 };
    struct vmctx vc = { .h.name = VM_NAME, .h.late_arrival = vm_late_arrival,
                        .serial_fd = STDOUT_FILENO, .ram_fd = -1 };
    lm_error err = { 0 };
    int rc, ret = 1;

    rc = vm_parse(argc, argv, &a, &err);
    if (rc > 0) {
        vm_usage(stdout);
        return 0;
    }
    if (rc < 0) {
        if (err.msg[0])
            fprintf(stderr, VM_NAME ": %s\n", err.msg);
        fprintf(stderr, "Try 'livemig vm --help'.\n");
        return 2;
    }
    tool_host_block_signals(&vc.h);
    vc.h.incoming = a.incoming != NULL;
    vc.check_on_arrival = a.check;

    if (vm_setup(&vc, &a, &err)) {
        fprintf(stderr, VM_NAME ": %s\n", err.msg[0] ? err.msg : "setup failed");
        goto out;
    }
    ret = tool_host_wait(&vc.h);
out:
    if (vc.h.q)
        lm_qmp_stop(vc.h.q);
    if (vc.vm && kvm_vm_pause(vc.vm, &err))
        fprintf(stderr, VM_NAME ": %s\n", err.msg);
    if (vc.h.m)
        lm_free(vc.h.m);
    kvm_dirty_free(vc.dirty);
    kvm_state_free(vc.state);
    kvm_vm_free(vc.vm);
    if (vc.ram)
        munmap(vc.ram, vc.ram_size);
    if (vc.ram_fd >= 0)
        close(vc.ram_fd);
    if (vc.serial_fd != STDOUT_FILENO)
        close(vc.serial_fd);
    return ret;
}
