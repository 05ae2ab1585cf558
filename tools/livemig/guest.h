/*
 * The demo guest: anonymous RAM, a version table, and writer threads ("vCPUs")
 * that keep rewriting pages so that every page can be checked afterwards.
 *
 * Model.  Page i holds the content page_fill(i, versions[i]) (verify.h).
 * Writer k owns the pages with i % vcpus == k, so no two writers ever touch
 * the same page or the same table entry.  A write picks one of its pages by
 * the pattern, bumps the table entry, rewrites the whole page and then calls
 * the write hook (cooperative dirty tracking reports the page there: after
 * the write, never before).
 *
 * Pausing.  The writers run only while the guest is started (guest_vm_start)
 * and nobody holds it (guest_hold, used by verification).  A stopper sets an
 * atomic `park` flag that writers test between two page writes, wakes any
 * writer sleeping for its rate limit or throttle, and waits until all of them
 * have counted themselves parked.  So guest_vm_stop() returns with no write in
 * flight after at most one page write (~1 us) plus one wake-up, which is what
 * a migration's downtime pays.  The wait is bounded (GUEST_STOP_TIMEOUT_MS).
 *
 * Threads and ownership:
 *   caller (any thread)  guest_new/free, vm_start/stop, hold/release,
 *                        throttle, set_rate, verify, getters.  vm_stop and
 *                        hold may be called concurrently from different
 *                        threads (the migration thread and the QMP thread);
 *                        g->lock serializes them.
 *   writer k             owns pages i % vcpus == k and versions[i] while the
 *                        guest runs; parks on g->park_cv; exits when
 *                        g->exiting (guest_free joins it).
 *   The RAM and the version table may be read or written by anyone else
 *   (migration, device state load, verification) only while the writers are
 *   paused.  guest_new allocates both; guest_free frees them.
 */
#ifndef LIVEMIG_TOOL_GUEST_H
#define LIVEMIG_TOOL_GUEST_H

#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "rambackend.h"
#include "verify.h"

#define GUEST_RATE_MAX (-1)
#define GUEST_STOP_TIMEOUT_MS 5000

enum guest_pattern {
    GUEST_PATTERN_RANDOM,       /* uniform over the writer's pages */
    GUEST_PATTERN_SEQUENTIAL,   /* the writer's pages in order, wrapping */
    GUEST_PATTERN_HOTSET,       /* 90% of writes to the first 10% of them */
};

int guest_pattern_parse(const char *s);
const char *guest_pattern_name(enum guest_pattern p);

struct guest_config {
    uint64_t mem;                 /* bytes, a non-zero multiple of GUEST_PAGE_SIZE */
    unsigned vcpus;               /* writer threads, 1..pages */
    int64_t rate;                 /* pages/s for the whole guest; 0 idle; GUEST_RATE_MAX */
    enum guest_pattern pattern;
    enum guest_fill fill;
    uint64_t seed;                /* writers' page choice */
    uint64_t working_set;         /* bytes from the start the writers write; 0 = all */
    bool incoming;                /* destination: zeroed RAM, prefaulted, no fill */
    enum guest_backend backend;
    const char *mem_path;         /* GUEST_MEM_FILE */
};

/* Called by a writer after each complete page write. */
typedef void (*guest_write_hook)(void *opaque, uint64_t page);

struct guest;

/*
 * Allocate RAM and the table and prepare the initial content: fill every
 * page at version 1 (random/text), leave it zero (fill zero), or for an
 * incoming guest prefault zeroed RAM with MADV_POPULATE_WRITE.  Writers are
 * not running yet.
 *
 * Backends.  memfd: a new memfd, mapped shared; an incoming memfd guest
 * allocates nothing: it reserves address space (PROT_NONE, MAP_NORESERVE)
 * for the cpr-transfer source's memfd to be mapped over (guest_ram_fd -1).
 * file: PATH is opened (created 0600 and sized if absent) and mapped
 * shared; an incoming file guest takes the file's content as it is (no
 * fill, no prefault): cpr-reboot's restore, whose state file says what the
 * pages hold.
 */
int guest_new(struct guest **out, const struct guest_config *cfg, lm_error *err);

/* Set before guest_start_writers; the hook runs on writer threads. */
void guest_set_write_hook(struct guest *g, guest_write_hook fn, void *opaque);

/* Create the writer threads, stopped (they write after guest_vm_start). */
int guest_start_writers(struct guest *g, lm_error *err);

/* The writers' kernel thread ids (the guest's vCPUs, for postcopy's
 * per-vCPU blocktime): how many (at most max), or -1. */
int guest_writer_tids(struct guest *g, int *tids, int max);

/* Stop and join the writers, free RAM and table.  NULL is fine. */
void guest_free(struct guest *g);

/*
 * Run-state control, as vm ops.  guest_vm_stop returns 0 when every writer is
 * parked, or -ETIMEDOUT (message in err) if one did not park in time.
 */
int guest_vm_stop(struct guest *g, lm_error *err);
void guest_vm_start(struct guest *g);
bool guest_vm_running(struct guest *g);
/* Writers sleep `percent`% of every 10 ms slice (0..99). */
void guest_throttle(struct guest *g, int percent);

/* Keep the writers parked regardless of run state (nests).  See vm_stop. */
int guest_hold(struct guest *g, lm_error *err);
void guest_release(struct guest *g);

void guest_set_rate(struct guest *g, int64_t rate);
int64_t guest_rate(struct guest *g);
uint64_t guest_writes(struct guest *g);
/* Writers sleeping right now for their rate limit, throttle or idling. */
unsigned guest_napping(struct guest *g);
/* How long the last guest_vm_stop took to park every writer, in ns. */
int64_t guest_last_stop_ns(struct guest *g);

const struct guest_config *guest_config(struct guest *g);
uint8_t *guest_ram(struct guest *g);
/* The descriptor behind guest RAM (memfd / file backends), else -1. */
int guest_ram_fd(struct guest *g);
uint64_t guest_pages(struct guest *g);
/* The version table (device state).  Touch only while writers are paused. */
uint32_t *guest_versions(struct guest *g);
enum guest_fill guest_fill(struct guest *g);
/* Adopt the source's fill kind (device-state load, writers paused). */
void guest_set_fill(struct guest *g, enum guest_fill f);

/*
 * Check every page against the table, in parallel, with the writers held;
 * they resume afterwards if they were running.  time_ms is set.
 */
int guest_verify(struct guest *g, struct verify_report *r, lm_error *err);

#endif
