/*
 * Dirty-page trackers: the public interface of dirty.h and the choice of
 * backend.
 *
 * This file checks every argument once, keeps the started/stopped state and
 * forwards to a backend table (uffd_wp.c, coop.c; see dirty_impl.h), so the
 * backends only implement mechanisms.
 *
 * Choosing a tracker.  A uffd-wp tracker is only handed out after it has
 * worked here: dirty_new() runs a functional probe on a scratch mapping
 * (start, write one page, sync, check that exactly that page came back,
 * stop) through the very code a migration will use.  Feature bits alone are
 * not enough -- a kernel built without some piece, a seccomp filter or an
 * LSM can refuse any one of the steps, and a tracker that silently reports
 * nothing would migrate a stale guest.  "uffd-wp" fails with the probe's
 * reason; "auto" falls back to cooperative and says why, once per process
 * (the reason is a property of the machine, not of one migration).
 *
 * Threads: see dirty.h.  started is owner-thread state; markers on other
 * threads only look at the backend's own atomic flag.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dirty/dirty_impl.h"
#include "util/error.h"

static dirty_tracker *dirty_create(const dirty_backend *be, const dirty_region *regions,
                                   int n, lm_error *err)
{
    dirty_tracker *d = calloc(1, sizeof(*d));
    int ret;

    if (!d)
        goto oom;
    d->be = be;
    snprintf(d->name, sizeof(d->name), "%s", be->name);
    d->n = n;
    d->regions = calloc(n ? (size_t)n : 1, sizeof(*d->regions));
    d->npages = calloc(n ? (size_t)n : 1, sizeof(*d->npages));
    if (!d->regions || !d->npages)
        goto oom;
    for (int r = 0; r < n; r++) {
        d->regions[r] = regions[r];
        d->npages[r] = regions[r].length / regions[r].page_size;
    }
    ret = be->init(d, err);
    if (ret < 0) {
        free(d->npages);
        free(d->regions);
        free(d);
        return NULL;
    }
    return d;
oom:
    if (d) {
        free(d->npages);
        free(d->regions);
        free(d);
    }
    error_set(err, -ENOMEM, "dirty tracker: out of memory");
    return NULL;
}

/*
 * Prove that uffd-wp works here.  Page 1 is populated before start and
 * must NOT be reported; page 2 is first touched after start (so this also
 * checks WP_UNPOPULATED) and must be the only page reported.
 */
static int uffd_probe(lm_error *err)
{
    long ps = sysconf(_SC_PAGESIZE);
    size_t len = 4 * (size_t)ps;
    volatile uint8_t *mem;
    dirty_region reg;
    dirty_tracker *d = NULL;
    unsigned long map[1] = { 0 };
    int64_t got;
    int ret;

    mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return error_set_errno(err, -errno, "uffd-wp: probe mmap");
    mem[ps] = 1;
    reg = (dirty_region){ .host = (uint8_t *)mem, .length = len, .page_size = (uint64_t)ps };
    d = dirty_create(&dirty_backend_uffd_wp, &reg, 1, err);
    if (!d) {
        ret = err ? err->code : -ENOTSUP;
        goto out;
    }
    ret = dirty_start(d, err);
    if (ret < 0)
        goto out;
    mem[2 * ps] = 1;
    got = dirty_sync(d, 0, map, err);
    if (got < 0) {
        ret = (int)got;
        goto out;
    }
    if (got != 1 || map[0] != 1UL << 2) {
        ret = error_set(err, -ENOTSUP, "uffd-wp: probe write to page 2 was not reported "
                        "exactly (%lld pages, bitmap %#lx)", (long long)got, map[0]);
        goto out;
    }
    ret = 0;
out:
    dirty_free(d);
    munmap((void *)mem, len);
    return ret < 0 ? ret : 0;
}

static int check_regions(const dirty_region *regions, int n, lm_error *err)
{
    if (n < 0 || (n > 0 && !regions))
        return error_set(err, -EINVAL, "dirty tracker: bad region list (%d regions)", n);
    for (int r = 0; r < n; r++) {
        const dirty_region *g = &regions[r];
        uint64_t ps = g->page_size;

        if (ps == 0 || (ps & (ps - 1)))
            return error_set(err, -EINVAL, "dirty tracker: region %d: page size %llu is "
                             "not a power of two", r, (unsigned long long)ps);
        if ((uintptr_t)g->host % ps || g->length % ps)
            return error_set(err, -EINVAL, "dirty tracker: region %d (%p, %llu bytes) is "
                             "not aligned to its page size %llu", r, (void *)g->host,
                             (unsigned long long)g->length, (unsigned long long)ps);
        if (g->length && (!g->host || (uintptr_t)g->host + g->length < (uintptr_t)g->host))
            return error_set(err, -EINVAL, "dirty tracker: region %d (%p, %llu bytes) is "
                             "not a valid address range", r, (void *)g->host,
                             (unsigned long long)g->length);
    }
    return 0;
}

/* The fallback reason is logged once per process: it is the same for every context. */
static int fallback_logged;

dirty_tracker *dirty_new(const char *name, const dirty_region *regions, int n,
                         lm_error *err)
{
    const dirty_backend *be;
    lm_error perr = { 0 };
    dirty_tracker *d;
    bool is_auto = false;

    if (!name || !strcmp(name, "auto")) {
        is_auto = true;
        be = &dirty_backend_uffd_wp;
    } else if (!strcmp(name, "uffd-wp")) {
        be = &dirty_backend_uffd_wp;
    } else if (!strcmp(name, "cooperative")) {
        be = &dirty_backend_coop;
    } else {
        error_set(err, -EINVAL, "unknown dirty tracker '%s' (expected auto, uffd-wp or "
                  "cooperative)", name);
        return NULL;
    }
    if (check_regions(regions, n, err) < 0)
        return NULL;

    if (be == &dirty_backend_uffd_wp) {
        d = NULL;
        if (uffd_probe(&perr) == 0)
            d = dirty_create(be, regions, n, &perr);
        if (d)
            return d;
        if (!is_auto) {
            error_copy(err, &perr);
            return NULL;
        }
        if (!__atomic_exchange_n(&fallback_logged, 1, __ATOMIC_RELAXED))
            util_log("dirty tracker: uffd-wp unavailable (%s), using cooperative", perr.msg);
        be = &dirty_backend_coop;
    }
    return dirty_create(be, regions, n, err);
}

dirty_tracker *dirty_new_ops(const char *name, const lm_dirty_tracker_ops *ops,
                             void *opaque, const dirty_region *regions, int n,
                             lm_error *err)
{
    dirty_tracker *d;

    if (!name || !*name || !ops || !ops->start || !ops->sync || !ops->stop) {
        error_set(err, -EINVAL, "dirty tracker ops: a name and start, sync and stop "
                  "are required");
        return NULL;
    }
    if (check_regions(regions, n, err) < 0)
        return NULL;
    d = dirty_create(&dirty_backend_ops, regions, n, err);
    if (!d)
        return NULL;
    snprintf(d->name, sizeof(d->name), "%s", name);
    d->ops = *ops;
    d->ops_opaque = opaque;
    return d;
}

void dirty_free(dirty_tracker *d)
{
    if (!d)
        return;
    dirty_stop(d);
    d->be->fini(d);
    free(d->npages);
    free(d->regions);
    free(d);
}

const char *dirty_name(const dirty_tracker *d)
{
    return d->name;
}

int dirty_start_unarmed(dirty_tracker *d, lm_error *err)
{
    int ret;

    if (d->started)
        return error_set(err, -EBUSY, "%s: dirty tracking already started", d->name);
    ret = d->be->start(d, err);
    if (ret < 0)
        return ret;
    d->started = true;
    return 0;
}

int dirty_start(dirty_tracker *d, lm_error *err)
{
    int ret = dirty_start_unarmed(d, err);

    if (ret < 0)
        return ret;
    for (int r = 0; r < d->n; r++) {
        ret = dirty_arm(d, r, d->regions[r].length, err);
        if (ret < 0) {
            dirty_stop(d);
            return ret;
        }
    }
    return 0;
}

int dirty_arm(dirty_tracker *d, int r, uint64_t end, lm_error *err)
{
    if (!d || !d->started || r < 0 || r >= d->n || !d->be->arm)
        return 0;
    if (end > d->regions[r].length)
        end = d->regions[r].length;
    return d->be->arm(d, r, end, err);
}

int64_t dirty_sync(dirty_tracker *d, int r, unsigned long *bitmap, lm_error *err)
{
    if (r < 0 || r >= d->n)
        return error_set(err, -EINVAL, "%s: no region %d (have %d)", d->name, r, d->n);
    if (!d->started)
        return error_set(err, -EINVAL, "%s: sync of region %d before start", d->name, r);
    if (!bitmap)
        return error_set(err, -EINVAL, "%s: sync of region %d into no bitmap",
                         d->name, r);
    if (d->regions[r].length == 0)
        return 0;
    return d->be->sync(d, r, bitmap, err);
}

void dirty_stop(dirty_tracker *d)
{
    if (!d || !d->started)
        return;
    d->be->stop(d);
    d->started = false;
}

void dirty_mark(dirty_tracker *d, int r, uint64_t offset, uint64_t len)
{
    if (!d || r < 0 || r >= d->n || !d->be->mark)
        return;
    d->be->mark(d, r, offset, len);
}
