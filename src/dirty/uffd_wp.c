/*
 * uffd-wp dirty tracker: userfaultfd write-protect in async mode, read back
 * with the PAGEMAP_SCAN ioctl.
 *
 * How it works.  start() opens a userfaultfd with UFFD_FEATURE_WP_ASYNC and
 * registers every region in write-protect mode; arm() write-protects a
 * region from where the previous arm stopped (dirty.c arms everything at
 * start, or leaves it to the caller's first pass, see dirty.h).
 * From then on the first write to a page takes a fault that the kernel
 * resolves by itself (no handler thread, ~0.6 us on this machine): it clears
 * the page's uffd-wp bit, which PAGEMAP_SCAN reports as PAGE_IS_WRITTEN.
 * sync() runs PAGEMAP_SCAN over one region with PM_SCAN_WP_MATCHING, which
 * returns the written pages and write-protects them again in the same page
 * table walk, so a write racing with the scan is either in this scan's
 * result or faults again and shows up in the next one.  Nothing is lost
 * and the writers never wait for us.
 *
 * WP_UNPOPULATED makes the kernel protect pages that were never touched
 * (it leaves a marker in the page table), so the first write to fresh
 * memory is reported too.  PM_SCAN_CHECK_WPASYNC makes the scan fail with
 * EPERM instead of silently reporting nothing if a region is not registered
 * for async write-protect -- a tracker that fails silently would send a
 * stale guest.
 *
 * The kernel may stop a scan early (its output vector is full, or it ends
 * at an internal chunk boundary), so sync() loops from walk_end until the
 * whole region was walked; a region reported twice is harmless because
 * marking a bit twice counts it once.
 *
 * stop() unregisters (which also drops the protection) and closes the
 * userfaultfd: later writes cost nothing.  start() can be called again.
 *
 * Limit: tracking is per mapping.  Writes by another process through its
 * own mapping of shared memory, or by pwrite() to a memfd, are not seen.
 *
 * State: everything lives in struct dirty_uffd, owned by the tracker's
 * owner thread; this backend has no cooperative mark().
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>

#include "dirty/dirty_impl.h"
#include "util/bitmap.h"
#include "util/error.h"

/*
 * Debian 12 ships 6.1 uapi headers, older than the 6.7+ kernels that have
 * async write-protect and PAGEMAP_SCAN.  These are the stable uapi values;
 * the guards let newer headers win.
 */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef PAGEMAP_SCAN
struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};

struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_WRITTEN (1 << 1)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif

/*
 * Regions per PAGEMAP_SCAN call (24 bytes each).  4096 covers a 1% random
 * dirtying of 1.6 GiB in one call; more regions just take more calls.
 */
#define SCAN_VEC_LEN 4096
/* Retries of an ioctl interrupted by a signal before giving up. */
#define EINTR_RETRIES 1000

struct dirty_uffd {
    int uffd;                  /* -1 when stopped */
    int pagemap_fd;            /* /proc/self/pagemap, for the tracker's life */
    uint64_t features;         /* what start() asks UFFDIO_API for */
    int registered;            /* regions [0, registered) are registered */
    uint64_t *armed;           /* per region: bytes [0, armed) write-protected */
    struct page_region *vec;   /* SCAN_VEC_LEN entries, reused by every sync */
};

/*
 * A new userfaultfd.  The syscall is refused to unprivileged users when
 * vm.unprivileged_userfaultfd is 0; /dev/userfaultfd may still be open to
 * them, and failing both, a user-mode-only uffd is enough because async
 * write faults are resolved in the kernel without ever reaching uffd.
 */
static int uffd_open(lm_error *err)
{
    int fd, dev, e_sys, e_dev;

#ifdef SYS_userfaultfd
    fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    e_sys = errno;
#else
    e_sys = ENOSYS;
#endif
    dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        e_dev = errno;
        close(dev);
        if (fd >= 0)
            return fd;
    } else {
        e_dev = errno;
    }
#ifdef SYS_userfaultfd
    fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd >= 0)
        return fd;
#endif
    return error_set(err, -e_sys, "uffd-wp: userfaultfd(): %s; /dev/userfaultfd: %s",
                     strerror(e_sys), strerror(e_dev));
}

/* Open a uffd and do the API handshake for `features`; the fd or -errno. */
static int uffd_open_api(uint64_t features, uint64_t *supported, lm_error *err)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    int fd = uffd_open(err);

    if (fd < 0)
        return fd;
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int e = -errno;
        close(fd);
        return error_set_errno(err, e, "uffd-wp: UFFDIO_API (features 0x%llx)",
                               (unsigned long long)features);
    }
    if (supported)
        *supported = api.features;
    return fd;
}

static int uffd_init(dirty_tracker *d, lm_error *err)
{
    struct dirty_uffd *u;
    uint64_t have = 0;
    long psize = sysconf(_SC_PAGESIZE);
    int fd, ret;

    for (int r = 0; r < d->n; r++)
        if (psize <= 0 || d->regions[r].page_size % (uint64_t)psize)
            return error_set(err, -EINVAL,
                             "uffd-wp: region %d: page size %llu is not a multiple "
                             "of the kernel page size %ld", r,
                             (unsigned long long)d->regions[r].page_size, psize);

    /*
     * A handshake with no features reports what the kernel supports.  It
     * uses a throwaway fd because a uffd accepts only one handshake.
     */
    fd = uffd_open_api(0, &have, err);
    if (fd < 0)
        return fd;
    close(fd);
    if (!(have & UFFD_FEATURE_WP_ASYNC))
        return error_set(err, -ENOTSUP, "uffd-wp: kernel lacks UFFD_FEATURE_WP_ASYNC "
                         "(needs Linux 6.7 or later)");
    if (!(have & UFFD_FEATURE_WP_UNPOPULATED))
        return error_set(err, -ENOTSUP, "uffd-wp: kernel lacks UFFD_FEATURE_WP_UNPOPULATED");

    u = calloc(1, sizeof(*u));
    if (!u)
        return error_set(err, -ENOMEM, "uffd-wp: out of memory");
    u->uffd = -1;
    u->features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    /* Needed to protect shared memory (memfd, hugetlbfs) guest RAM. */
    if (have & UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
        u->features |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    u->vec = calloc(SCAN_VEC_LEN, sizeof(*u->vec));
    u->armed = calloc((size_t)(d->n ? d->n : 1), sizeof(*u->armed));
    if (!u->vec || !u->armed) {
        ret = error_set(err, -ENOMEM, "uffd-wp: out of memory");
        goto out;
    }
    u->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (u->pagemap_fd < 0) {
        ret = error_set_errno(err, -errno, "uffd-wp: open /proc/self/pagemap");
        goto out;
    }
    d->uffd = u;
    return 0;
out:
    free(u->vec);
    free(u->armed);
    free(u);
    return ret;
}

static void uffd_fini(dirty_tracker *d)
{
    struct dirty_uffd *u = d->uffd;

    if (!u)
        return;
    close(u->pagemap_fd);
    free(u->vec);
    free(u->armed);
    free(u);
    d->uffd = NULL;
}

/* Unregister regions [0, registered) and close the uffd. */
static void uffd_teardown(dirty_tracker *d)
{
    struct dirty_uffd *u = d->uffd;

    for (int r = 0; r < u->registered; r++) {
        struct uffdio_range range = {
            .start = (uintptr_t)d->regions[r].host,
            .len = d->regions[r].length,
        };
        /* Unregistering also clears the protection of every page. */
        if (range.len && ioctl(u->uffd, UFFDIO_UNREGISTER, &range) < 0)
            util_log("uffd-wp: unregister region %d: %s", r, strerror(errno));
    }
    u->registered = 0;
    if (u->uffd >= 0)
        close(u->uffd);
    u->uffd = -1;
}

static int uffd_start(dirty_tracker *d, lm_error *err)
{
    struct dirty_uffd *u = d->uffd;
    int ret;

    ret = uffd_open_api(u->features, NULL, err);
    if (ret < 0)
        return ret;
    u->uffd = ret;
    u->registered = 0;

    for (int r = 0; r < d->n; r++) {
        struct uffdio_register reg = {
            .range = { .start = (uintptr_t)d->regions[r].host, .len = d->regions[r].length },
            .mode = UFFDIO_REGISTER_MODE_WP,
        };
        if (!reg.range.len) {
            u->registered = r + 1;
            continue;
        }
        if (ioctl(u->uffd, UFFDIO_REGISTER, &reg) < 0) {
            int e = errno;
            /* The two usual causes, spelled out: they are not obvious from errno. */
            const char *hint = e == EINVAL ? " (this kernel cannot write-protect this kind "
                                             "of memory)"
                             : e == EBUSY ? " (already tracked by another userfaultfd)" : "";
            ret = error_set(err, -e, "uffd-wp: register region %d (%p, %llu bytes): %s%s",
                            r, (void *)d->regions[r].host,
                            (unsigned long long)d->regions[r].length, strerror(e), hint);
            goto out;
        }
        u->registered = r + 1;
        if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) {
            ret = error_set(err, -ENOTSUP, "uffd-wp: region %d (%p) cannot be "
                            "write-protected (memory type not supported)",
                            r, (void *)d->regions[r].host);
            goto out;
        }
    }

    /* Nothing is protected yet: dirty.c arms (all at once, or lazily). */
    memset(u->armed, 0, (size_t)d->n * sizeof(u->armed[0]));
    return 0;
out:
    uffd_teardown(d);
    return ret;
}

/*
 * Write-protect region r's bytes [armed, end): from here on a write there is
 * tracked.  This page-table walk is the tracker's main fixed cost (~70 ns a
 * page here), which is why it can be spread over the first pass.
 */
static int uffd_arm(dirty_tracker *d, int r, uint64_t end, lm_error *err)
{
    struct dirty_uffd *u = d->uffd;
    const dirty_region *reg = &d->regions[r];
    struct uffdio_writeprotect wp = {
        .range = { .start = (uintptr_t)reg->host + u->armed[r], .len = end - u->armed[r] },
        .mode = UFFDIO_WRITEPROTECT_MODE_WP,
    };
    int tries = 0, ret;

    if (end <= u->armed[r])
        return 0;
    /* EAGAIN: the address space is changing under us; retry, bounded. */
    while ((ret = ioctl(u->uffd, UFFDIO_WRITEPROTECT, &wp)) < 0 &&
           (errno == EAGAIN || errno == EINTR) && ++tries < EINTR_RETRIES)
        ;
    if (ret < 0)
        return error_set_errno(err, -errno, "uffd-wp: write-protect region %d (%p + %llu, "
                               "%llu bytes)", r, (void *)reg->host,
                               (unsigned long long)u->armed[r],
                               (unsigned long long)wp.range.len);
    u->armed[r] = end;
    return 0;
}

/* Set bits [first, end) of map; return how many were clear before. */
static uint64_t mark_range_count(unsigned long *map, uint64_t first, uint64_t end)
{
    uint64_t newly = 0;

    while (first < end) {
        uint64_t w = first / BITMAP_BITS_PER_LONG;
        unsigned lo = first % BITMAP_BITS_PER_LONG;
        uint64_t n = BITMAP_BITS_PER_LONG - lo;

        if (n > end - first)
            n = end - first;
        unsigned long mask = (n == BITMAP_BITS_PER_LONG ? ~0UL : ((1UL << n) - 1)) << lo;

        newly += (uint64_t)__builtin_popcountl(mask & ~map[w]);
        map[w] |= mask;
        first += n;
    }
    return newly;
}

static int64_t uffd_sync(dirty_tracker *d, int r, unsigned long *bitmap, lm_error *err)
{
    struct dirty_uffd *u = d->uffd;
    const dirty_region *reg = &d->regions[r];
    uint64_t base = (uintptr_t)reg->host, end = base + reg->length;
    uint64_t ps = reg->page_size, npages = d->npages[r];
    struct pm_scan_arg arg = {
        .size = sizeof(arg),
        .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        .start = base,
        .end = end,
        .vec = (uintptr_t)u->vec,
        .vec_len = SCAN_VEC_LEN,
        .category_mask = PAGE_IS_WRITTEN,
        .return_mask = PAGE_IS_WRITTEN,
    };
    int64_t newly = 0;
    int eintr = 0, ret;

    /* A page not armed yet would be reported only if present; arm the rest
     * first so that every page is tracked from this scan on. */
    if ((ret = uffd_arm(d, r, reg->length, err)) < 0)
        return ret;
    while (arg.start < end) {
        long n = ioctl(u->pagemap_fd, PAGEMAP_SCAN, &arg);

        if (n < 0) {
            if (errno == EINTR && ++eintr < EINTR_RETRIES)
                continue;
            if (errno == EPERM)
                return error_set(err, -EPERM, "uffd-wp: PAGEMAP_SCAN of region %d: "
                                 "memory is not registered for async write-protect", r);
            return error_set_errno(err, -errno, "uffd-wp: PAGEMAP_SCAN of region %d", r);
        }
        for (long i = 0; i < n; i++) {
            uint64_t s = u->vec[i].start, e = u->vec[i].end;
            uint64_t first, last;

            /* Distrust the kernel's output as much as any input. */
            if (s < base)
                s = base;
            if (e > end)
                e = end;
            if (s >= e)
                continue;
            first = (s - base) / ps;
            last = (e - base + ps - 1) / ps;
            if (last > npages)
                last = npages;
            newly += (int64_t)mark_range_count(bitmap, first, last);
        }
        /*
         * walk_end is where the kernel stopped; it may be short of `end`
         * even when the vector is not full.  No progress means a bug (ours
         * or the kernel's): fail rather than spin.
         */
        if (arg.walk_end <= arg.start || arg.walk_end > end)
            return error_set(err, -EIO, "uffd-wp: PAGEMAP_SCAN of region %d made no "
                             "progress at %#llx (walk_end %#llx)", r,
                             (unsigned long long)arg.start,
                             (unsigned long long)arg.walk_end);
        arg.start = arg.walk_end;
    }
    return newly;
}

static void uffd_stop(dirty_tracker *d)
{
    uffd_teardown(d);
}

const dirty_backend dirty_backend_uffd_wp = {
    .name = "uffd-wp",
    .init = uffd_init,
    .fini = uffd_fini,
    .start = uffd_start,
    .sync = uffd_sync,
    .arm = uffd_arm,
    .stop = uffd_stop,
    .mark = NULL,
};
