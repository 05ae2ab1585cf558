/*
 * Private to src/dirty/: the tracker object and the backend interface.
 *
 * dirty.c owns the public functions (argument checks, the started/stopped
 * state, the "auto" choice); each backend (uffd_wp.c, coop.c, ops.c) fills one
 * dirty_backend table and keeps its own state in the dirty_tracker fields
 * marked for it.  Backends are called only after dirty.c checked the
 * arguments, and only in the order init, (start, (arm | sync)*, stop)*, fini.
 *
 * Threads: init/fini/start/sync/stop run on the tracker's owner (the
 * context's caller for new/free, the migration thread for the rest); mark
 * runs on any thread at any time between init and fini.
 */
#ifndef DIRTY_DIRTY_IMPL_H
#define DIRTY_DIRTY_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "dirty/dirty.h"

struct dirty_uffd;

typedef struct dirty_backend {
    const char *name;
    /* Check that the backend works here and allocate its state. */
    int (*init)(dirty_tracker *d, lm_error *err);
    void (*fini)(dirty_tracker *d);
    int (*start)(dirty_tracker *d, lm_error *err);
    /* OR region r's written pages into bitmap; newly set count or -errno. */
    int64_t (*sync)(dirty_tracker *d, int r, unsigned long *bitmap, lm_error *err);
    /* Start tracking writes to region r's bytes [armed so far, end); NULL
     * when the backend tracks everything from start() on. */
    int (*arm)(dirty_tracker *d, int r, uint64_t end, lm_error *err);
    void (*stop)(dirty_tracker *d);
    /* NULL when the backend ignores cooperative reports. */
    void (*mark)(dirty_tracker *d, int r, uint64_t offset, uint64_t len);
} dirty_backend;

struct dirty_tracker {
    const dirty_backend *be;
    char name[32];               /* be->name, or the ops tracker's own */
    dirty_region *regions;       /* owned copy of the caller's array */
    uint64_t *npages;            /* pages per region */
    int n;
    bool started;                /* owner thread only */

    /* uffd-wp backend */
    struct dirty_uffd *uffd;

    /*
     * cooperative backend: one log bitmap per region, written by any thread
     * with bitmap_set_range_atomic and drained by sync.  coop_on is read
     * by markers with an acquire load: it is set (release) only after the
     * logs were cleared, so a mark that sees it lands in a live log.
     */
    unsigned long **coop_log;
    int coop_on;

    /*
     * ops backend (ops.c): the program's table and, per region, a scratch
     * bitmap its sync fills and how far its arm was asked to track.  It
     * also uses the coop_* fields above for lm_ram_mark_dirty reports.
     * Owner thread only.
     */
    lm_dirty_tracker_ops ops;
    void *ops_opaque;
    unsigned long **ops_scratch;
    uint64_t *ops_armed;
};

extern const dirty_backend dirty_backend_uffd_wp;
extern const dirty_backend dirty_backend_coop;
extern const dirty_backend dirty_backend_ops;

#endif
