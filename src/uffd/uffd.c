/*
 * userfaultfd MISSING-mode RAM for postcopy's destination; see uffd.h.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "uffd/uffd.h"
#include "util/thread.h"
#include "util/bitmap.h"
#include "util/error.h"

#define UFFD_MSGS 64            /* faults taken per read() */

struct uffd_ram {
    ram_state *ram;
    int fd;
    int stop_fd;
    bool registered[RAM_MAX_BLOCKS];
    unsigned long *requested[RAM_MAX_BLOCKS];   /* atomic bits */
    /* one per placer, each used by one thread (the listen thread, the
     * preempt channel's): its own bounce page */
    struct uffd_placer_ctx {
        uffd_ram *u;
        uint8_t *bounce;        /* UFFD_BATCH pages */
        /* the run being gathered: pages [off, off + n pages) of block b,
         * claimed, their bytes in bounce; `at` the first record's offset */
        ramblock *b;
        uint64_t off, at;
        uint32_t n;
    } placers[UFFD_PLACERS];

    pthread_t thread;
    bool thread_started;
    uffd_request_fn request;
    void *request_opaque;

    _Atomic uint64_t copied, zeroed, present, faults, requests;
    /* fault latency: when each page was asked for (the fault thread), and
     * what the placer saw when it installed a requested page */
    _Atomic uint64_t *req_ns[RAM_MAX_BLOCKS];
    _Atomic uint64_t lat_count, lat_sum_ns, lat_max_ns, lat_dist[UFFD_LAT_BUCKETS];
    _Atomic bool released;
    /* per vCPU thread: the page it waits for (0 none, else key+1) since
     * when, and its waits so far; a thread waits on one fault at a time */
    int nvcpus;
    int vcpu_tids[LM_MAX_VCPUS];
    struct {
        _Atomic uint64_t key, since_ns, blocktime_ns;
    } vcpu[LM_MAX_VCPUS];
};

static uint64_t uffd_key(ptrdiff_t bi, uint64_t page)
{
    return ((uint64_t)bi << 48 | page) + 1;
}

static uint64_t uffd_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A requested page was installed: one latency sample. */
static void uffd_latency(uffd_ram *u, ptrdiff_t bi, uint64_t page)
{
    uint64_t t0 = atomic_load_explicit(&u->req_ns[bi][page], memory_order_relaxed);
    uint64_t ns, us, max;
    int k = 0;

    if (!t0)
        return;     /* background copy raced the request's bookkeeping */
    ns = uffd_now_ns() - t0;
    us = ns / 1000;
    while (k < UFFD_LAT_BUCKETS - 1 && us >= (2ull << k))
        k++;
    atomic_fetch_add(&u->lat_dist[k], 1);
    atomic_fetch_add(&u->lat_count, 1);
    atomic_fetch_add(&u->lat_sum_ns, ns);
    max = atomic_load(&u->lat_max_ns);
    while (ns > max && !atomic_compare_exchange_weak(&u->lat_max_ns, &max, ns))
        ;
}

/* The syscall first (root); a process without the capability gets only
 * user-mode faults (UFFD_USER_MODE_ONLY): the kernel's own accesses to a
 * missing page then fail with EFAULT instead of waiting -- say so. */
static int uffd_new_fd(lm_error *err)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

    if (fd >= 0)
        return fd;
    if (errno == EPERM) {
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
        if (fd >= 0) {
            util_log("userfaultfd: user-mode faults only (no CAP_SYS_PTRACE): a system call "
                     "reading a missing guest page fails instead of waiting");
            return fd;
        }
    }
    return error_set_errno(err, -errno, "userfaultfd: cannot create one (postcopy needs it: "
                           "root, or vm.unprivileged_userfaultfd=1)");
}

static ptrdiff_t uffd_block_index(const uffd_ram *u, const ramblock *b)
{
    return b - u->ram->blocks;
}

uffd_ram *uffd_open(ram_state *r, const int *vcpu_tids, int nvcpus, lm_error *err)
{
    uffd_ram *u = calloc(1, sizeof(*u));
    struct uffdio_api api = { .api = UFFD_API,
                              .features = nvcpus > 0 ? UFFD_FEATURE_THREAD_ID : 0 };

    if (!u)
        abort();
    assert(nvcpus >= 0 && nvcpus <= LM_MAX_VCPUS);
    u->nvcpus = nvcpus;
    if (nvcpus)
        memcpy(u->vcpu_tids, vcpu_tids, (size_t)nvcpus * sizeof(*vcpu_tids));
    u->ram = r;
    u->fd = -1;
    u->stop_fd = -1;
    for (int i = 0; i < UFFD_PLACERS; i++) {
        u->placers[i].u = u;
        u->placers[i].bounce = aligned_alloc(RAM_PAGE_SIZE, UFFD_BATCH * RAM_PAGE_SIZE);
        if (!u->placers[i].bounce)
            abort();
    }
    u->fd = uffd_new_fd(err);
    if (u->fd < 0)
        goto fail;
    if (ioctl(u->fd, UFFDIO_API, &api) < 0) {
        error_set_errno(err, -errno, "userfaultfd: UFFDIO_API");
        goto fail;
    }
    for (int i = 0; i < r->nblocks; i++) {
        ramblock *b = &r->blocks[i];
        struct uffdio_register reg = {
            .range = { .start = (uintptr_t)b->host, .len = b->length },
            .mode = UFFDIO_REGISTER_MODE_MISSING,
        };
        const uint64_t need = (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE);

        if (!b->rmap) {
            error_set(err, -EINVAL, "userfaultfd: RAM block '%s' has no received bitmap "
                      "(ram_load_start first)", b->idstr);
            goto fail;
        }
        if (ioctl(u->fd, UFFDIO_REGISTER, &reg) < 0) {
            error_set_errno(err, -errno, "userfaultfd: cannot register RAM block '%s'",
                            b->idstr);
            goto fail;
        }
        u->registered[i] = true;
        if ((reg.ioctls & need) != need) {
            error_set(err, -ENOTSUP, "userfaultfd: RAM block '%s' does not support "
                      "UFFDIO_COPY and UFFDIO_ZEROPAGE", b->idstr);
            goto fail;
        }
        u->requested[i] = bitmap_new(b->npages);
        u->req_ns[i] = calloc(b->npages, sizeof(*u->req_ns[i]));
        if (!u->req_ns[i])
            abort();
    }
    return u;
fail:
    uffd_close(u);
    return NULL;
}

/* ------------------------------------------------------------ the placer */

/*
 * Pages are claimed before they are installed.  Two placers may carry the
 * same page (the background stream and the preempt channel), so each first
 * claims it by setting its received bit: the one that finds it set drops
 * its copy -- the page is there or being installed, and the first copy to
 * land is as new as any (the source is stopped).  A page that the kernel
 * says is present although nobody claimed it was never discarded: an
 * error.  A claimed page counts as received before its ioctl returns;
 * nobody reads the bit as "installed" before the stream that carried it is
 * drained (the completeness check runs after both), and a fault on it in
 * between only wakes and faults again until the ioctl is done.
 *
 * Runs: adjacent page records of one block are gathered (at most
 * UFFD_BATCH) and installed with one UFFDIO_COPY -- a system call per page
 * was a fifth of the listen thread's time.  A run is installed as soon as
 * the next record would have to wait for the socket, the next one is not
 * adjacent, a page in it is being waited for, or at the section's EOS, so
 * a page never waits for pages that have not arrived.
 */
static bool uffd_claim(ramblock *b, uint64_t page)
{
    assert(page < b->npages);
    return bitmap_test_and_set_atomic(b->rmap, page);
}

/* Installed pages [page, page + n) of b: counters, and end the waits. */
static void uffd_installed(uffd_ram *u, ramblock *b, uint64_t page, uint32_t n, bool zero)
{
    ptrdiff_t bi = uffd_block_index(u, b);

    atomic_fetch_add(zero ? &u->zeroed : &u->copied, n);
    for (uint64_t p = page; p < page + n; p++) {
        if (!bitmap_test_atomic(u->requested[bi], p))
            continue;
        uint64_t key = uffd_key(bi, p), now = uffd_now_ns();

        uffd_latency(u, bi, p);
        /* every vCPU that waited for this page is free now */
        for (int v = 0; v < u->nvcpus; v++) {
            uint64_t k = key;
            if (atomic_load(&u->vcpu[v].key) == key &&
                atomic_compare_exchange_strong(&u->vcpu[v].key, &k, 0))
                atomic_fetch_add(&u->vcpu[v].blocktime_ns,
                                 now - atomic_load(&u->vcpu[v].since_ns));
        }
    }
}

static int uffd_fail(lm_stream *s, int err, ramblock *b, uint64_t offset, uint64_t at)
{
    if (err == EEXIST)
        lm_stream_set_error(s, -EEXIST, "postcopy: page 0x%" PRIx64 " of RAM block '%s' "
                            "(record at byte offset %" PRIu64 ") was present before it "
                            "arrived: its memory was not discarded", offset, b->idstr, at);
    else
        lm_stream_set_error(s, -err, "postcopy: installing page 0x%" PRIx64 " of RAM block "
                            "'%s' (record at byte offset %" PRIu64 ") failed: %s", offset,
                            b->idstr, at, strerror(err));
    return -1;
}

/* Install the gathered run with one UFFDIO_COPY. */
static int uffd_flush(struct uffd_placer_ctx *pc, lm_stream *s)
{
    uint32_t n = pc->n;

    if (!n)
        return 0;
    pc->n = 0;
    struct uffdio_copy c = { .dst = (uintptr_t)(pc->b->host + pc->off),
                             .src = (uintptr_t)pc->bounce, .len = n * RAM_PAGE_SIZE };
    if (ioctl(pc->u->fd, UFFDIO_COPY, &c) < 0) {
        int e = errno;
        /* c.copy: bytes installed before the page that failed */
        uint64_t done = c.copy > 0 ? (uint64_t)c.copy : 0;
        return uffd_fail(s, e, pc->b, pc->off + done, pc->at);
    }
    uffd_installed(pc->u, pc->b, pc->off / RAM_PAGE_SIZE, n, false);
    return 0;
}

static int uffd_place_zero(struct uffd_placer_ctx *pc, lm_stream *s, ramblock *b,
                           uint64_t offset, uint8_t fill, uint64_t at)
{
    uintptr_t dst = (uintptr_t)(b->host + offset);
    int ret;

    if (!uffd_claim(b, offset / RAM_PAGE_SIZE)) {
        atomic_fetch_add(&pc->u->present, 1);
        return 0;
    }
    if (fill == 0) {
        struct uffdio_zeropage z = { .range = { .start = dst, .len = RAM_PAGE_SIZE } };
        ret = ioctl(pc->u->fd, UFFDIO_ZEROPAGE, &z);
    } else {
        struct uffdio_copy c = { .dst = dst, .src = (uintptr_t)pc->bounce,
                                 .len = RAM_PAGE_SIZE };
        memset(pc->bounce, fill, RAM_PAGE_SIZE);
        ret = ioctl(pc->u->fd, UFFDIO_COPY, &c);
    }
    if (ret < 0)
        return uffd_fail(s, errno, b, offset, at);
    uffd_installed(pc->u, b, offset / RAM_PAGE_SIZE, 1, fill == 0);
    return 0;
}

static int uffd_place_record(void *impl, ram_state *r, lm_stream *s, ramblock *b,
                             uint64_t offset, uint64_t flags, uint64_t at)
{
    struct uffd_placer_ctx *pc = impl;
    uint64_t page = offset / RAM_PAGE_SIZE;
    /* placer 0 is the main stream's, 1 the preempt channel's (uffd.h) */
    const char *channel = pc == &pc->u->placers[0] ? "main stream" : "preempt channel";
    uint8_t fill;

    switch (flags) {
    case RAM_PAGE:
        if (pc->n && (b != pc->b || offset != pc->off + pc->n * RAM_PAGE_SIZE ||
                      pc->n == UFFD_BATCH) && uffd_flush(pc, s))
            return -1;
        if (!uffd_claim(b, page)) {
            /* there, or coming on the other channel: read it past */
            atomic_fetch_add(&pc->u->present, 1);
            if (pc->n && uffd_flush(pc, s))
                return -1;
            return lm_get_buffer(s, pc->bounce, RAM_PAGE_SIZE) ||
                   ram_verify_page(r, s, b, offset, pc->bounce, channel, at) ? -1 : 0;
        }
        if (!pc->n) {
            pc->b = b;
            pc->off = offset;
            pc->at = at;
        }
        /* x-integrity: checked in the bounce buffer, before the ioctl, so a
         * corrupt page is never installed and no guest thread reads it */
        if (lm_get_buffer(s, pc->bounce + pc->n * RAM_PAGE_SIZE, RAM_PAGE_SIZE) ||
            ram_verify_page(r, s, b, offset, pc->bounce + pc->n * RAM_PAGE_SIZE, channel, at))
            return -1;
        pc->n++;
        /* no page waits for one that is not here yet, nor a fault for a run */
        if (pc->n == UFFD_BATCH || stream_buffered(s) < RAM_PAGE_SIZE + 300 ||
            bitmap_test_atomic(pc->u->requested[uffd_block_index(pc->u, b)], page))
            return uffd_flush(pc, s);
        return 0;
    case RAM_ZERO:
        if (uffd_flush(pc, s) || lm_get_u8(s, &fill) ||
            ram_verify_fill(r, s, b, offset, fill, channel, at))
            return -1;
        return uffd_place_zero(pc, s, b, offset, fill, at);
    default:
        lm_stream_set_error(s, -EINVAL, "postcopy: compressed page at byte offset %" PRIu64
                            " (only ZERO and PAGE records are placed in postcopy)", at);
        return -1;
    }
}

/* EOS: the run goes in before the section ends. */
static int uffd_place_sync(void *impl, ram_state *r, lm_stream *s, uint64_t at)
{
    (void)r;
    (void)at;
    return uffd_flush(impl, s);
}

static const ram_placer_ops uffd_placer_ops = {
    .name = "postcopy",
    .record = uffd_place_record,
    .sync = uffd_place_sync,
};

ram_placer uffd_placer(uffd_ram *u, int i)
{
    assert(i >= 0 && i < UFFD_PLACERS);
    return (ram_placer){ &uffd_placer_ops, &u->placers[i] };
}

/* ------------------------------------------------------------ the fault thread */

static ramblock *uffd_find(uffd_ram *u, uint64_t addr, uint64_t *page)
{
    for (int i = 0; i < u->ram->nblocks; i++) {
        ramblock *b = &u->ram->blocks[i];
        uintptr_t base = (uintptr_t)b->host;

        if (addr >= base && addr < base + b->length) {
            *page = (addr - base) / RAM_PAGE_SIZE;
            return b;
        }
    }
    return NULL;
}

/* A vCPU thread waits for this page from now (placement ends the wait). */
static void uffd_vcpu_waits(uffd_ram *u, uint32_t tid, ptrdiff_t bi, uint64_t page)
{
    for (int v = 0; v < u->nvcpus; v++) {
        if ((uint32_t)u->vcpu_tids[v] != tid)
            continue;
        atomic_store(&u->vcpu[v].since_ns, uffd_now_ns());
        atomic_store(&u->vcpu[v].key, uffd_key(bi, page));
        return;
    }
}

static void uffd_fault(uffd_ram *u, uint64_t addr, uint32_t tid)
{
    uint64_t page;
    ramblock *b = uffd_find(u, addr, &page);
    ptrdiff_t i;

    atomic_fetch_add(&u->faults, 1);
    if (!b)
        return;     /* not guest RAM: cannot happen, nothing else is registered */
    i = uffd_block_index(u, b);
    if (u->nvcpus && !bitmap_test_atomic(b->rmap, page))
        uffd_vcpu_waits(u, tid, i, page);
    if (bitmap_test_atomic(b->rmap, page)) {
        /* Installed between the fault and now: the COPY woke it already,
         * unless it raced ahead of the fault's queueing; a wake is harmless. */
        struct uffdio_range wr = { .start = (uintptr_t)b->host + page * RAM_PAGE_SIZE,
                                   .len = RAM_PAGE_SIZE };
        (void)ioctl(u->fd, UFFDIO_WAKE, &wr);
        return;
    }
    if (!bitmap_test_and_set_atomic(u->requested[i], page))
        return;     /* asked for already: its page is on the way */
    atomic_store_explicit(&u->req_ns[i][page], uffd_now_ns(), memory_order_relaxed);
    atomic_fetch_add(&u->requests, 1);
    u->request(u->request_opaque, b, page);
}

static void *uffd_thread(void *arg)
{
    uffd_ram *u = arg;
    struct uffd_msg msgs[UFFD_MSGS];

    pthread_setname_np(pthread_self(), "lm-uffd");
    for (;;) {
        struct pollfd pfd[2] = { { .fd = u->fd, .events = POLLIN },
                                 { .fd = u->stop_fd, .events = POLLIN } };
        ssize_t n;

        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            util_log("userfaultfd: poll: %s", strerror(errno));
            break;
        }
        if (pfd[1].revents)
            break;
        n = read(u->fd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            util_log("userfaultfd: read: %s", strerror(errno));
            break;
        }
        for (ssize_t k = 0; k < n / (ssize_t)sizeof(msgs[0]); k++)
            if (msgs[k].event == UFFD_EVENT_PAGEFAULT)
                uffd_fault(u, msgs[k].arg.pagefault.address & RAM_PAGE_MASK,
                           u->nvcpus ? msgs[k].arg.pagefault.feat.ptid : 0);
    }
    return NULL;
}

int uffd_start_faults(uffd_ram *u, uffd_request_fn request, void *opaque, lm_error *err)
{
    int ret;

    u->request = request;
    u->request_opaque = opaque;
    u->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (u->stop_fd < 0)
        return error_set_errno(err, -errno, "userfaultfd: eventfd");
    ret = thread_start(&u->thread, uffd_thread, u);
    if (ret)
        return error_set(err, -ret, "cannot start the userfaultfd thread: %s", strerror(ret));
    u->thread_started = true;
    return 0;
}

void uffd_release(uffd_ram *u)
{
    if (atomic_exchange(&u->released, true))
        return;
    for (int i = 0; i < u->ram->nblocks; i++) {
        ramblock *b = &u->ram->blocks[i];
        struct uffdio_range range = { .start = (uintptr_t)b->host, .len = b->length };

        if (u->registered[i])
            (void)ioctl(u->fd, UFFDIO_UNREGISTER, &range);
    }
}

void uffd_close(uffd_ram *u)
{
    uint64_t one = 1;

    if (!u)
        return;
    if (u->thread_started) {
        if (write(u->stop_fd, &one, sizeof(one)) < 0) {
            /* only fails when the counter is full: it is readable then */
        }
        pthread_join(u->thread, NULL);
    }
    /* Unregistering wakes any thread still waiting on a missing page: it
     * then finds ordinary (zero) memory there. */
    uffd_release(u);
    for (int i = 0; i < u->ram->nblocks; i++) {
        bitmap_free(u->requested[i]);
        free((void *)u->req_ns[i]);
    }
    if (u->stop_fd >= 0)
        close(u->stop_fd);
    if (u->fd >= 0)
        close(u->fd);
    for (int i = 0; i < UFFD_PLACERS; i++)
        free(u->placers[i].bounce);
    free(u);
}

void uffd_get_stats(uffd_ram *u, uffd_stats *st)
{
    st->copied = atomic_load(&u->copied);
    st->zeroed = atomic_load(&u->zeroed);
    st->present = atomic_load(&u->present);
    st->faults = atomic_load(&u->faults);
    st->requests = atomic_load(&u->requests);
    st->lat_count = atomic_load(&u->lat_count);
    st->lat_sum_ns = atomic_load(&u->lat_sum_ns);
    st->lat_max_ns = atomic_load(&u->lat_max_ns);
    for (int k = 0; k < UFFD_LAT_BUCKETS; k++)
        st->lat_dist[k] = atomic_load(&u->lat_dist[k]);
    st->nvcpus = u->nvcpus;
    for (int v = 0; v < u->nvcpus; v++)
        st->vcpu_blocktime_ns[v] = atomic_load(&u->vcpu[v].blocktime_ns);
}
