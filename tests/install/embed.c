/*
 * embed.c -- a program that embeds the installed livemig, as a VMM would.
 *
 * tests/install/check_install.sh compiles it against an installed tree with
 * nothing but `cc embed.c $(pkg-config --cflags --libs livemig)` and runs it,
 * so it may use only what is installed: the public headers and the library.
 * It is also the example of docs/embedding.md: a source and a destination
 * context in one process, each with one RAM block, one device and vm ops;
 * the destination listens (lm_incoming), the source migrates to it
 * (lm_migrate), both are waited for and queried, and the destination's RAM
 * and device must equal the source's.
 *
 * Prints one line per step; exit 0 on success, 1 with the reason.
 */
#define _DEFAULT_SOURCE         /* MAP_ANONYMOUS under -std=c11 */

#include <livemig/livemig.h>
#include <livemig/qmp.h>       /* every installed header compiles on its own */
#include <livemig/analyze.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MEM (4u << 20)          /* 4 MiB of guest RAM */
#define PAGE 4096u

struct guest {
    const char *name;
    unsigned char *ram;
    uint32_t device_reg;        /* the device state: one register */
    int running;
};

static int fail(const char *what, const lm_error *err)
{
    fprintf(stderr, "embed: %s: %s\n", what, err ? err->msg : "failed");
    return 1;
}

/* vm ops: the library stops the source for switch-over, starts the
 * destination once its whole stream is in. */
static void vm_stop(void *opaque)
{
    ((struct guest *)opaque)->running = 0;
}

static void vm_start(void *opaque)
{
    ((struct guest *)opaque)->running = 1;
}

static const lm_vm_ops vm_ops = { .stop = vm_stop, .start = vm_start };

/* The device: saved once with the guest stopped, loaded once. */
static int dev_save(lm_stream *s, void *opaque)
{
    lm_put_be32(s, ((struct guest *)opaque)->device_reg);
    return lm_stream_error(s);
}

static int dev_load(lm_stream *s, void *opaque, uint32_t version, int section_type)
{
    struct guest *g = opaque;

    (void)section_type;         /* a non-iterable device: always FULL */
    if (version != 1) {
        lm_stream_set_error(s, -22, "device version %u, expected 1", (unsigned)version);
        return -22;
    }
    lm_get_be32(s, &g->device_reg);
    return lm_stream_error(s);
}

static const lm_device_ops dev_ops = { .save = dev_save, .load = dev_load };

/* Steps 1-3 of livemig.h for one side. */
static lm_mig *guest_new(struct guest *g, const char *name, lm_error *err)
{
    lm_mig *m = lm_new();

    g->name = name;
    g->ram = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g->ram == MAP_FAILED) {
        snprintf(err->msg, sizeof(err->msg), "mmap failed");
        lm_free(m);
        return NULL;
    }
    if (lm_ram_register(m, "pc.ram", g->ram, MEM, PAGE, err) ||
        lm_device_register(m, "regs", 0, 1, &dev_ops, g, err) ||
        /* the program reports its writes (lm_ram_mark_dirty) */
        lm_set_dirty_tracker(m, "cooperative", err) ||
        lm_param_set_int(m, "downtime-limit", 500, err)) {
        lm_free(m);
        munmap(g->ram, MEM);
        return NULL;
    }
    lm_set_vm_ops(m, &vm_ops, g);
    return m;
}

int main(void)
{
    struct guest src = { 0 }, dst = { 0 };
    lm_error err = { 0 };
    lm_stats st;
    lm_mig *ms, *md;
    int64_t limit = 0;
    int rc = 1;

    if (!(ms = guest_new(&src, "source", &err)))
        return fail("source", &err);
    if (!(md = guest_new(&dst, "destination", &err))) {
        lm_free(ms);
        return fail("destination", &err);
    }
    if (lm_param_get(ms, "downtime-limit", &limit, NULL, NULL, 0) || limit != 500) {
        fprintf(stderr, "embed: downtime-limit reads back %lld\n", (long long)limit);
        goto out;
    }
    printf("contexts ready: RAM %u bytes, parameter downtime-limit = %lld\n",
           MEM, (long long)limit);

    /* The source guest runs: it wrote its memory and reports the writes. */
    for (uint32_t i = 0; i < MEM; i += 64)
        src.ram[i] = (unsigned char)(i / PAGE + 1);
    lm_ram_mark_dirty(ms, "pc.ram", 0, MEM);
    src.device_reg = 0xc0ffee;
    src.running = 1;
    lm_runstate_set_running(ms);

    /* Destination first: port 0 picks a free port, lm_query says which. */
    if (lm_incoming(md, "tcp:127.0.0.1:0", &err)) {
        fail("lm_incoming", &err);
        goto out;
    }
    lm_query(md, &st);
    printf("destination listens on %s\n", st.socket_address);
    if (lm_migrate(ms, st.socket_address, &err)) {
        fail("lm_migrate", &err);
        goto out;
    }
    if (lm_wait(ms, 60000) != LM_STATUS_COMPLETED ||
        lm_wait(md, 60000) != LM_STATUS_COMPLETED) {
        lm_query(ms, &st);
        fprintf(stderr, "embed: source %s: %s\n", lm_status_name(st.status), st.error_desc);
        lm_query(md, &st);
        fprintf(stderr, "embed: destination %s: %s\n", lm_status_name(st.status),
                st.error_desc);
        goto out;
    }
    lm_query(ms, &st);
    printf("migration %s: %llu bytes in %lld ms, downtime %lld ms\n",
           lm_status_name(st.status), (unsigned long long)st.transferred,
           (long long)st.total_time, (long long)st.downtime);

    if (memcmp(src.ram, dst.ram, MEM) || dst.device_reg != 0xc0ffee ||
        !dst.running || src.running ||
        lm_runstate_get(md) != LM_RUN_RUNNING || lm_runstate_get(ms) != LM_RUN_POSTMIGRATE) {
        fprintf(stderr, "embed: the destination is not the source's copy "
                "(device 0x%x, running %d/%d)\n", (unsigned)dst.device_reg,
                src.running, dst.running);
        goto out;
    }
    printf("destination runs an exact copy (run state %s)\n",
           lm_runstate_name(lm_runstate_get(md)));
    rc = 0;
out:
    lm_free(ms);
    lm_free(md);
    munmap(src.ram, MEM);
    munmap(dst.ram, MEM);
    return rc;
}
