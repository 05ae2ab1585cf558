/*
 * The source's migration thread: precopy.
 *
 *   setup     header, configuration, OPEN_RETURN_PATH (sockets), start dirty
 *             tracking, every page marked dirty, the ram START section.
 *   iterate   PART sections of at most ~50 ms each, until the dirty-bitmap
 *             walk wraps (one pass); then sync the bitmap from the tracker
 *             and decide: go on, throttle (auto-converge), or switch over.
 *   complete  stop the guest, final sync, END section with every remaining
 *             page, device state (FULL sections), EOF; then wait for the
 *             destination's SHUT on the return path: that is the moment the
 *             guest runs there, so downtime = stop .. SHUT, measured.
 *
 * Switch-over rule.  QEMU stops the guest as soon as the remainder fits in
 * the downtime budget.  We keep iterating live while an extra pass still
 * shrinks the remainder, and stop when it is tiny (sendable in
 * PC_SWITCHOVER_SMALL_MS) or stopped shrinking (less than 20% smaller than
 * at the previous pass that also fitted).  An idle guest therefore stops
 * with nothing left to send, and a dirtying one at its smallest remainder.
 *
 * Failure and cancel.  Any error or lm_cancel ends the thread through one
 * path (precopy_finish): tracking stopped, throttle released, the guest
 * restarted if we had stopped it, the socket shut down and closed, status
 * failed / cancelled with the first error kept.  Once the last byte was
 * sent (`committed`), cancel is refused: the destination may already run.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <endian.h>

#include "migration/migration.h"
#include "compress/compress.h"
#include "cpr/cpr.h"
#include "mappedram/mappedram.h"
#include "multifd/multifd.h"
#include "postcopy/postcopy.h"
#include "returnpath/returnpath.h"
#include "savevm/savevm.h"
#include "util/bitmap.h"
#include "util/error.h"
#include "util/time.h"

#define RAM_SECTION_ID 1
#define PC_SECTION_MAX_MS 50           /* one PART section, like QEMU's MAX_WAIT */
#define PC_CHUNK_BYTES (256 * 1024)    /* rate-limit / time check granularity */
#define PC_SWITCHOVER_SMALL_MS 1       /* "tiny remainder" for the switch-over rule */

typedef struct precopy {
    lm_mig *m;
    lm_stream *s;
    ram_state *ram;
    dirty_tracker *dirty;
    mig_paramset p;
    bool vm_stopped;            /* we entered finish-migrate */
    bool eof_queued;            /* past the commit point: EOF is in the stream */
    uint64_t eof_at;            /* stream offset of the EOF byte */
    lm_runstate prev_runstate;  /* to restore on failure; running = restart */
    int throttle;               /* percent currently applied */
    int64_t stop_ns;
    int64_t start_ms;

    /* rate limit: 100 ms windows of max_bandwidth/10 bytes */
    int64_t win_ns;
    uint64_t win_bytes;
    /* bandwidth of the last pass, bytes per ms */
    int64_t pass_ns;
    uint64_t pass_bytes;
    double bw;
    uint64_t prev_fit;          /* remainder at the previous pass that fitted */
    /* auto-converge / dirty rate period (>= 1 s) */
    int64_t period_ms;
    uint64_t period_dirtied, period_bytes;
    int high_count;
    /* mbps window */
    int64_t rate_ns;
    uint64_t rate_bytes, rate_pages;

    uint64_t setup_bytes;
    rp_reader *rpr;             /* the return path's reader thread, on sockets */
    int dest_status;            /* SHUT value, -1 until received */
    lm_stats st;
    multifd_sender *mfs;
    mapped_ram_file *mapped;
    compressor *comp;
    ram_sink sink;                      /* where every page leaves, chosen at setup */
    multifd_stats mf_final;             /* kept when the channels are gone */
    uint64_t mapped_final;              /* mapped-ram page bytes, kept likewise */
    bool multifd_file;                  /* mapped-ram pages written by multifd channels */

    /* postcopy (capability postcopy-ram; see "postcopy" below) */
    postcopy_requests *req;             /* pages asked for: the reader pushes, we pop */
    int wake_fd;                        /* eventfd: a request or the package's PONG came */
    atomic_bool in_postcopy;            /* the package is going: requests are legal */
    atomic_bool pkg_loaded;             /* PONG(PC_PING_PACKAGE) arrived */
    bool postcopy_committed;            /* the destination runs the guest */
    uint64_t switch_bytes;              /* pc_bytes at the switch */
    int64_t package_ns;                 /* when the package was on the wire */
    uint64_t prev_remaining;            /* dirty bytes at the previous pass's end */
    int passes;
    int64_t fc_ms;                      /* pc_forecast's window: start, pages sent */
    uint64_t fc_sent;
    int fc_hot;                         /* windows in a row that were re-dirtied */
    /* postcopy-preempt: the reader thread writes each requested page here
     * (its own stream and CONTINUE context); the migration thread only
     * opens and closes it */
    transport_conn pconn;
    lm_stream *ps;                      /* under ps_lock once the reader runs */
    unsigned long *psent[RAM_MAX_BLOCKS]; /* pages the reader sent on it (atomic) */
    const ramblock *ps_last;
    _Atomic uint64_t ps_bytes;          /* written on it (the reader stores, we read) */
    pthread_mutex_t ps_lock;            /* the reader's sends vs. the closing EOS */
    bool ps_closed;                     /* under ps_lock: EOS written, no more pages */
} precopy;

static void pc_mf_stats(precopy *pc, multifd_stats *mf)
{
    if (pc->mfs)
        multifd_send_stats(pc->mfs, mf);
    else
        *mf = pc->mf_final;
}

/* Bytes sent on all channels: the main stream plus multifd. */
static uint64_t pc_bytes(precopy *pc)
{
    multifd_stats mf;

    pc_mf_stats(pc, &mf);
    return stream_bytes(pc->s) + mf.bytes + mapped_ram_bytes(pc->mapped) +
           pc->mapped_final + atomic_load(&pc->ps_bytes);
}

#define PC_PEER_REASON_MS 2000

static int pc_stream_err(precopy *pc, lm_error *err)
{
    int e = lm_stream_error(pc->s);

    if (!e)
        return 0;
    if (mig_cancelled(pc->m))
        return error_set(err, -ECANCELED, "migration cancelled");
    /*
     * A destination that refuses us says why on the return path, which its
     * reader takes, while our write may break first: with TLS an alert
     * after the handshake (tls-authz), without it the bare TLS alert of a
     * destination that requires TLS (an -EPROTO from the reader).  The
     * reader ends soon on a broken connection: give it a moment, and report
     * the destination's reason over our EPIPE / reset.
     */
    if (pc->rpr && (pc->m->conn.tls || e == -EPIPE || e == -ECONNRESET)) {
        lm_error rerr = { 0 };
        uint32_t status;
        int r = rp_reader_wait_shut(pc->rpr, PC_PEER_REASON_MS, &status, &rerr);

        if (r < 0 && r != -ETIMEDOUT && r != -ECANCELED && rerr.msg[0] &&
            (pc->m->conn.tls || r == -EPROTO))
            return error_set(err, r, "%s", rerr.msg);
    }
    return error_set(err, e, "%s", lm_stream_error_msg(pc->s));
}

static void pc_publish(precopy *pc)
{
    int64_t now = time_now_ns();
    uint64_t bytes = pc_bytes(pc);
    uint64_t pages = pc->ram->zero_pages + pc->ram->normal_pages;

    if (now - pc->rate_ns >= 100 * 1000000LL) {
        double secs = (double)(now - pc->rate_ns) / 1e9;
        pc->st.mbps = (double)(bytes - pc->rate_bytes) * 8 / 1e6 / secs;
        pc->st.pages_per_second = (uint64_t)((double)(pages - pc->rate_pages) / secs);
        pc->rate_ns = now;
        pc->rate_bytes = bytes;
        pc->rate_pages = pages;
    }
    multifd_stats mf;

    pc_mf_stats(pc, &mf);
    pc->st.multifd_bytes = mf.bytes;
    /* mapped-ram with multifd: the channels' page writes, as QEMU 9+ counts */
    if (pc->multifd_file)
        pc->st.multifd_bytes += mapped_ram_bytes(pc->mapped) + pc->mapped_final;
    pc->st.transferred = bytes;
    pc->st.remaining = pc->ram->dirty * RAM_PAGE_SIZE;
    pc->st.duplicate = pc->ram->zero_pages + mf.zero_pages;
    pc->st.normal = pc->ram->normal_pages - mf.zero_pages;
    pc->st.normal_bytes = pc->st.normal * RAM_PAGE_SIZE;
    if (mf.compressed_bytes) {
        /* multifd-compression: the same figures, from the channels' codecs
         * (no worker ever waits for another, so busy stays 0) */
        pc->st.compression = true;
        pc->st.compress_pages = mf.normal_pages;
        pc->st.compressed_size = mf.compressed_bytes;
        pc->st.compression_rate = (double)(mf.normal_pages * RAM_PAGE_SIZE) /
                                  (double)mf.compressed_bytes;
    }
    if (pc->comp) {
        compress_stats cs;
        compress_get_stats(pc->comp, &cs);
        pc->st.compression = true;
        pc->st.compress_pages = cs.pages;
        pc->st.compress_busy = cs.busy;
        pc->st.compress_busy_rate = cs.busy_rate;
        pc->st.compressed_size = cs.compressed_size;
        pc->st.compression_rate = cs.compression_rate;
    }
    pc->st.cpu_throttle_percentage = pc->throttle;
    if (pc->switch_bytes)
        pc->st.postcopy_bytes = bytes - pc->switch_bytes;
    if (pc->vm_stopped)
        pc->st.downtime_bytes = bytes - pc->st.precopy_bytes;
    else
        pc->st.precopy_bytes = bytes;
    mig_publish(pc->m, &pc->st);
}

/* ------------------------------------------------------------ return path */

/* The reader thread stopped with an error (the destination went away, sent
 * garbage): fail the migration at once, not at the next section. */
static void pc_rp_failed(void *opaque, const lm_error *err)
{
    /* After a cancel or another failure, which shut the socket down, the
     * reader seeing it closed is the echo, not a cause. */
    if (!mig_cancelled(opaque))
        mig_fail(opaque, err);
}

/* PING's value inside the package, after the device state, before RUN: its
 * PONG says the destination loaded the package (QEMU 10.2's 0x42). */
#define PC_PING_PACKAGE 0x42

static void pc_wake(precopy *pc)
{
    uint64_t one = 1;

    if (write(pc->wake_fd, &one, sizeof(one)) < 0) {
        /* only when the counter is full: it is readable then */
    }
}

/* Reader thread: PONG and, in postcopy, the destination's page requests. */
static int pc_rp_message(void *opaque, uint16_t type, const uint8_t *data, uint16_t len,
                         lm_error *err)
{
    precopy *pc = opaque;
    postcopy_request rq;
    int ret;

    switch (type) {
    case WIRE_RP_PONG:
        if (wire_be32(data) == PC_PING_PACKAGE && atomic_load(&pc->in_postcopy)) {
            atomic_store(&pc->pkg_loaded, true);
            pc_wake(pc);
        }
        return 0;
    case WIRE_RP_REQ_PAGES_ID:
    case WIRE_RP_REQ_PAGES:
        if (!pc->req || !atomic_load(&pc->in_postcopy))
            return error_set(err, -EPROTO, "the destination asked for a page (return-path "
                             "message %u) but this migration is not in postcopy", type);
        ret = postcopy_requests_add(pc->req, type, data, len, &rq, err);
        if (ret)
            return ret;
        if (pc->psent[0]) {
            /* preempt: the page leaves now, on its own channel, whatever
             * the migration thread is busy with (the guest is stopped: its
             * memory does not change under the send).  After the closing
             * EOS every page is out anyway. */
            pthread_mutex_lock(&pc->ps_lock);
            if (pc->ps && !pc->ps_closed) {
                ram_put_urgent(pc->ram, pc->ps, &pc->ps_last, rq.block, rq.page);
                ret = stream_flush(pc->ps);
                atomic_store(&pc->ps_bytes, stream_bytes(pc->ps));
                /* told before the wake: the migration thread takes only the bit */
                bitmap_test_and_set_atomic(pc->psent[rq.block - pc->ram->blocks], rq.page);
            }
            pthread_mutex_unlock(&pc->ps_lock);
            if (ret)
                return error_set(err, ret, "postcopy preempt channel: %s",
                                 lm_stream_error_msg(pc->ps));
        }
        pc_wake(pc);        /* the migration thread takes the page's bit */
        return 0;
    default:
        return error_set(err, -EPROTO, "unexpected return-path message %u (%u bytes)",
                         type, len);
    }
}

static void pc_rp_failed_pc(void *opaque, const lm_error *err)
{
    pc_rp_failed(((precopy *)opaque)->m, err);
}

static const rp_reader_ops pc_rp_ops = { .message = pc_rp_message, .failed = pc_rp_failed_pc };

/* Between sections: the reader's error, or the destination's early verdict. */
static int pc_rp_check(precopy *pc, lm_error *err)
{
    int status, ret = rp_reader_check(pc->rpr, &status, err);

    if (status > 0)
        pc->dest_status = status;
    return ret;
}

/* ------------------------------------------------------------ rate limiting */

/*
 * Bytes as the rate limit counts them: what went on the wire (compressed,
 * for multifd) plus what is queued but not written yet, at the compression
 * ratio seen so far -- without the backlog the limit would be overrun by the
 * channels' queue.
 * mapped-ram page bytes count when queued.
 */
static uint64_t pc_rate_bytes(precopy *pc)
{
    multifd_stats mf;
    uint64_t done;

    double per_page = RAM_PAGE_SIZE;

    pc_mf_stats(pc, &mf);
    done = mf.normal_pages + mf.zero_pages;
    /* with compression the backlog will go out at the ratio seen so far */
    if (mf.compressed_bytes && mf.normal_pages)
        per_page = (double)mf.compressed_bytes / (double)mf.normal_pages;
    return stream_bytes(pc->s) + mf.bytes + mapped_ram_bytes(pc->mapped) +
           (uint64_t)((double)(mf.queued_pages > done ? mf.queued_pages - done : 0) * per_page);
}

/* Sleep out the rest of the 100 ms window if it is used up.  Interruptible. */
static int pc_rate_limit(precopy *pc, lm_error *err)
{
    int64_t now = time_now_ns(), limit = pc->p.max_bandwidth;
    uint64_t sent = pc_rate_bytes(pc) - pc->win_bytes;

    if (now - pc->win_ns >= 100 * 1000000LL) {
        pc->win_ns = now;
        pc->win_bytes = pc_rate_bytes(pc);
        return 0;
    }
    if (limit <= 0 || sent < (uint64_t)limit / 10)
        return 0;
    if (stream_flush(pc->s))
        return pc_stream_err(pc, err);
    struct pollfd pfd = { .fd = pc->m->cancel_fd, .events = POLLIN };
    int ms = (int)((pc->win_ns + 100 * 1000000LL - now + 999999) / 1000000);
    if (ms > 0)
        poll(&pfd, 1, ms);
    pc->win_ns = time_now_ns();
    pc->win_bytes = pc_rate_bytes(pc);
    return 0;
}

/* ------------------------------------------------------------ phases */

/* What mig_kick calls for each helper (migration.h, "interrupt of helpers"). */
static void pc_kick_multifd(void *ms) { multifd_send_kick(ms); }
static void pc_kick_mapped(void *mr) { mapped_ram_interrupt(mr); }
static void pc_kick_compress(void *c) { compress_interrupt(c); }

static int pc_multifd_start(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;
    int n = (int)pc->p.multifd_channels, ret = 0;
    transport_conn conns[MULTIFD_MAX_CHANNELS];

    if ((ret = multifd_send_connect(&m->uri, &m->tls, n, m->cancel_fd, 10000, conns, err)))
        return ret;
    int method = (int)pc->p.multifd_compression;
    int level = (int)(method == MF_ZLIB ? pc->p.multifd_zlib_level : pc->p.multifd_zstd_level);
    pc->mfs = multifd_send_start(conns, n, (zero_detect)pc->p.zero_page_detection, method,
                                 level, pc->ram->integrity, &m->cancel, mig_fail, m, err);
    if (!pc->mfs)
        return err->code ? err->code : -EIO;
    mig_helper_add(m, pc_kick_multifd, pc->mfs);
    pc->sink = multifd_send_sink(pc->mfs);
    return 0;
}

static int pc_setup(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;
    int ret;

    /* x-integrity: announced in the configuration (a peer without it
     * refuses the stream there), then a checksum with every page. */
    pc->ram->integrity = mig_cap(m, MIG_CAP_INTEGRITY);
    /* TLS (when tls-creds is set) before the first byte of the stream. */
    if ((ret = conn_tls_wrap(&m->tls, &m->conn, m->cancel_fd, 10000, err)))
        return ret;
    stream_set_tls(pc->s, m->conn.tls);
    /* cpr-transfer: the descriptors of guest RAM go first (src/cpr/); they
     * travel as SCM_RIGHTS, which a TLS session cannot carry */
    if (pc->p.mode == CPR_MODE_TRANSFER && m->conn.tls)
        return error_set(err, -EINVAL, "mode cpr-transfer cannot be combined with TLS "
                         "(tls-creds): the descriptors are passed by the kernel");
    if (pc->p.mode == CPR_MODE_TRANSFER &&
        (ret = cpr_send(pc->ram, m->conn.fd, m->cancel_fd, err)))
        return ret;
    savevm_put_header(pc->s, mig_cap(m, MIG_CAP_MAPPED_RAM), mig_cap(m, MIG_CAP_IGNORE_SHARED),
                      pc->ram->integrity);
    if (m->conn.is_socket) {
        savevm_put_command(pc->s, WIRE_CMD_OPEN_RETURN_PATH, 0, NULL);
        if (mig_cap(m, MIG_CAP_POSTCOPY_RAM)) {
            pc->req = postcopy_requests_new(pc->ram);
            pc->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
            if (pc->wake_fd < 0)
                return error_set_errno(err, -errno, "eventfd");
        }
        pc->rpr = rp_reader_start_tls(m->conn.fd, m->conn.tls, &pc_rp_ops, pc, err);
        if (!pc->rpr)
            return err->code ? err->code : -EIO;
    }
    if (mig_cap(m, MIG_CAP_POSTCOPY_RAM)) {
        /* This side's page sizes: a destination with others refuses here. */
        uint64_t advise[2] = { htobe64(RAM_PAGE_SIZE), htobe64(RAM_PAGE_SIZE) };

        if (!pc->rpr)
            return error_set(err, -EINVAL, "postcopy-ram needs a return path (%s is not a "
                             "socket)", m->conn.peer);
        savevm_put_command(pc->s, WIRE_CMD_POSTCOPY_ADVISE, sizeof(advise), advise);
    }
    /* The main stream's header is on the wire before any channel connects:
     * QEMU 7.2 destinations take the first connection as the main one. */
    if (stream_flush(pc->s))
        return pc_stream_err(pc, err);
    if (mig_cap(m, MIG_CAP_MAPPED_RAM)) {
        int n = mig_cap(m, MIG_CAP_MULTIFD) ? (int)pc->p.multifd_channels : 1;
        pc->multifd_file = mig_cap(m, MIG_CAP_MULTIFD);
        mapped_ram_file *mr = mapped_ram_open(m->uri.path, m->uri.offset, m->conn.fd, n,
                                              pc->p.direct_io, true, err);
        if (!mr)
            return err->code ? err->code : -EIO;
        pc->mapped = mr;
        mig_helper_add(m, pc_kick_mapped, mr);
        pc->sink = mapped_ram_sink(mr, pc->p.zero_page_detection != ZERO_NONE);
    } else if (mig_cap(m, MIG_CAP_MULTIFD) && (ret = pc_multifd_start(pc, err))) {
        return ret;
    } else if (mig_cap(m, MIG_CAP_COMPRESS)) {
        pc->comp = compress_new((int)pc->p.compress_threads, (int)pc->p.compress_level,
                                err);
        if (!pc->comp)
            return err->code ? err->code : -EIO;
        mig_helper_add(m, pc_kick_compress, pc->comp);
        pc->sink = compress_sink(pc->comp);
    }
    /* Unarmed: the first pass arms the tracker chunk by chunk as it goes
     * (ram_save_start), instead of write-protecting all RAM here first. */
    ret = dirty_start_unarmed(pc->dirty, err);
    if (ret)
        return ret;
    ram_save_start(pc->ram, pc->dirty);
    savevm_section_header(pc->s, WIRE_VM_SECTION_START, RAM_SECTION_ID, "ram", 0,
                          RAM_SECTION_VERSION);
    ram_save_setup(pc->ram, &pc->sink, pc->s);
    savevm_section_footer(pc->s, RAM_SECTION_ID);
    for (int i = 0; i < m->ndevices; i++) {
        mig_device *d = &m->devices[i];
        if (!d->ops.save_iterate)
            continue;
        savevm_section_header(pc->s, WIRE_VM_SECTION_START, d->section_id, d->idstr,
                              d->instance, d->version);
        ret = d->ops.save_setup ? d->ops.save_setup(pc->s, d->opaque) : 0;
        if (ret)
            return error_set(err, ret, "device '%s': setup failed", d->idstr);
        savevm_section_footer(pc->s, d->section_id);
    }
    stream_flush(pc->s);
    pc->setup_bytes = pc_bytes(pc);
    return pc_stream_err(pc, err);
}

/* One PART section.  Sets *wrapped when the bitmap walk completed a pass. */
static int pc_part(precopy *pc, bool *wrapped, lm_error *err)
{
    lm_mig *m = pc->m;
    int64_t t0 = time_now_ns();
    int ret;

    *wrapped = false;
    savevm_section_header(pc->s, WIRE_VM_SECTION_PART, RAM_SECTION_ID, NULL, 0, 0);
    while (!*wrapped) {
        *wrapped = ram_save_some(pc->ram, &pc->sink, pc->s, PC_CHUNK_BYTES);
        if ((ret = pc_rate_limit(pc, err)))
            return ret;
        if (mig_cancelled(m) || lm_stream_error(pc->s))
            break;
        if (time_now_ns() - t0 > PC_SECTION_MAX_MS * 1000000LL)
            break;
    }
    ram_put_eos(pc->ram, &pc->sink, pc->s);
    savevm_section_footer(pc->s, RAM_SECTION_ID);
    for (int i = 0; i < m->ndevices; i++) {
        mig_device *d = &m->devices[i];
        if (!d->ops.save_iterate)
            continue;
        savevm_section_header(pc->s, WIRE_VM_SECTION_PART, d->section_id, NULL, 0, 0);
        if ((ret = d->ops.save_iterate(pc->s, d->opaque)))
            return error_set(err, ret, "device '%s': iterate failed", d->idstr);
        savevm_section_footer(pc->s, d->section_id);
    }
    if (mig_cancelled(m))
        return error_set(err, -ECANCELED, "migration cancelled");
    if (pc->rpr && (ret = pc_rp_check(pc, err)))
        return ret;
    return pc_stream_err(pc, err);
}

static void pc_set_throttle(precopy *pc, int pct)
{
    if (pct == pc->throttle)
        return;
    pc->throttle = pct;
    if (pc->m->vm.throttle)
        pc->m->vm.throttle(pc->m->vm_opaque, pct);
}

/*
 * After a sync: dirty-rate bookkeeping and auto-converge, over periods of at
 * least one second as QEMU does (two periods in which the guest dirtied more
 * than throttle-trigger-threshold% of what we sent raise the throttle).
 */
static void pc_period(precopy *pc, uint64_t newly_dirty)
{
    int64_t now = time_now_ms(), el = now - pc->period_ms;
    uint64_t xfer, dirtied;

    pc->period_dirtied += newly_dirty;
    if (el < 1000)
        return;
    dirtied = pc->period_dirtied * RAM_PAGE_SIZE;
    xfer = pc_bytes(pc) - pc->period_bytes;
    pc->st.dirty_pages_rate = (uint64_t)((double)pc->period_dirtied * 1000.0 / (double)el);
    if (mig_cap(pc->m, MIG_CAP_AUTO_CONVERGE) &&
        (double)dirtied > (double)xfer * (double)pc->p.throttle_trigger_threshold / 100.0 &&
        ++pc->high_count >= 2) {
        int pct = pc->throttle ? pc->throttle + (int)pc->p.cpu_throttle_increment
                               : (int)pc->p.cpu_throttle_initial;
        if (pct > pc->p.max_cpu_throttle)
            pct = (int)pc->p.max_cpu_throttle;
        pc_set_throttle(pc, pct);
        pc->high_count = 0;
    }
    pc->period_ms = now;
    pc->period_dirtied = 0;
    pc->period_bytes = pc_bytes(pc);
}

/* End of a pass: sync, measure, decide.  Sets *switchover. */
static int pc_pass_done(precopy *pc, bool *switchover, lm_error *err)
{
    int64_t now = time_now_ns(), el = now - pc->pass_ns;
    uint64_t sent = pc_bytes(pc) - pc->pass_bytes, remaining;
    int64_t newly = ram_sync(pc->ram, pc->dirty, err);
    double bw, expected;

    if (newly < 0)
        return (int)newly;
    pc->st.dirty_sync_count++;
    pc_period(pc, (uint64_t)newly);
    if (el > 0 && sent > 0)
        pc->bw = (double)sent / ((double)el / 1e6);
    bw = pc->p.avail_switchover_bandwidth > 0 ? (double)pc->p.avail_switchover_bandwidth / 1000
                                              : pc->bw;
    pc->pass_ns = time_now_ns();
    pc->pass_bytes = pc_bytes(pc);

    remaining = pc->ram->dirty * RAM_PAGE_SIZE;
    expected = bw > 0 ? (double)remaining / bw : 1e12;
    pc->st.expected_downtime = (int64_t)expected;
    *switchover = false;
    pc->passes++;
    /* x-postcopy-after: precopy is not converging (over the limit, and the
     * remainder did not shrink by a fifth in the last pass) or ran too long */
    if (mig_cap(pc->m, MIG_CAP_POSTCOPY_RAM) && pc->p.postcopy_after > 0 &&
        expected > (double)pc->p.downtime_limit &&
        ((pc->passes >= 2 && (double)remaining >= 0.8 * (double)pc->prev_remaining) ||
         time_now_ms() - pc->start_ms >= pc->p.postcopy_after)) {
        util_log("precopy does not converge (%" PRIu64 " MiB left after pass %d, %.0f ms "
                 "to send): switching to postcopy (x-postcopy-after)",
                 remaining >> 20, pc->passes, expected);
        atomic_store(&pc->m->postcopy_start, true);
    }
    pc->prev_remaining = remaining;
    if (expected <= (double)pc->p.downtime_limit) {
        if (expected <= PC_SWITCHOVER_SMALL_MS ||
            (pc->prev_fit && (double)remaining >= 0.8 * (double)pc->prev_fit))
            *switchover = true;
        pc->prev_fit = remaining ? remaining : 1;
    } else {
        pc->prev_fit = 0;
    }
    return 0;
}

/*
 * x-postcopy-after's early forecast, inside a pass: every 250 ms, a bitmap
 * sync says how many of the pages sent in that window the guest has
 * written again already.  When that is most of them (4 in 5) in two
 * windows in a row, the guest dirties what is sent as fast as it is sent:
 * no pass will ever leave less behind than it started with, so waiting for
 * the pass's end only sends pages twice.  (A sync in the middle of a pass
 * is an ordinary one: the bits join the bitmap, the walk sends them when it
 * gets there or next pass.)
 */
#define PC_FORECAST_MS 250

static int pc_forecast(precopy *pc, lm_error *err)
{
    int64_t now = time_now_ms();
    uint64_t sent = pc->ram->zero_pages + pc->ram->normal_pages, window;
    int64_t newly;

    if (!pc->req || pc->p.postcopy_after <= 0 || atomic_load(&pc->m->postcopy_start))
        return 0;
    if (!pc->fc_ms) {
        pc->fc_ms = now;
        pc->fc_sent = sent;
        return 0;
    }
    if (now - pc->fc_ms < PC_FORECAST_MS)
        return 0;
    window = sent - pc->fc_sent;
    newly = ram_sync(pc->ram, pc->dirty, err);
    if (newly < 0)
        return (int)newly;
    pc->st.dirty_sync_count++;
    if (window > 1024 && (uint64_t)newly * 5 >= window * 4)
        pc->fc_hot++;
    else
        pc->fc_hot = 0;
    if (pc->fc_hot >= 2) {
        util_log("precopy cannot converge: of %" PRIu64 " pages sent in the last %lld ms the "
                 "guest wrote %" PRId64 " again: switching to postcopy (x-postcopy-after)",
                 window, (long long)(now - pc->fc_ms), newly);
        atomic_store(&pc->m->postcopy_start, true);
    }
    pc->fc_ms = now;
    pc->fc_sent = sent;
    return 0;
}

static bool pc_postcopy_wanted(precopy *pc)
{
    return pc->req && atomic_load(&pc->m->postcopy_start);
}

/* Until switch-over, or until postcopy was asked for (then *postcopy). */
static int pc_iterate(precopy *pc, bool *postcopy, lm_error *err)
{
    int ret;

    pc->pass_ns = pc->win_ns = pc->rate_ns = time_now_ns();
    pc->period_ms = time_now_ms();
    pc->pass_bytes = pc->rate_bytes = pc->period_bytes = pc_bytes(pc);
    pc->win_bytes = pc_rate_bytes(pc);
    for (;;) {
        bool wrapped, switchover = false;

        pc->p = mig_params(pc->m);   /* live-changeable parameters */
        if ((ret = pc_part(pc, &wrapped, err)))
            return ret;
        stream_flush(pc->s);
        if ((ret = pc_stream_err(pc, err)))
            return ret;
        if (wrapped && (ret = pc_pass_done(pc, &switchover, err)))
            return ret;
        if (!wrapped && (ret = pc_forecast(pc, err)))
            return ret;
        /* Asked for, postcopy wins even over a switch-over that is due:
         * migrate-start-postcopy is an order, as in QEMU. */
        if (pc_postcopy_wanted(pc)) {
            *postcopy = true;
            return 0;
        }
        if (switchover)
            return 0;
        pc_publish(pc);
    }
}

/*
 * VMDESCRIPTION after EOF, as QEMU writes it: tools such as an analyzer can
 * skip each device section by its size without knowing the device.  Every
 * device is described as one opaque buffer (QEMU does the same for devices
 * that are not VMState-described).
 */
static void pc_put_vmdesc(precopy *pc, const uint64_t *sizes)
{
    lm_mig *m = pc->m;
    json_t *root = json_object(), *devs = json_array();
    char *text;

    json_object_set_new(root, "page_size", json_integer((json_int_t)RAM_PAGE_SIZE));
    for (int i = 0; i < m->ndevices; i++) {
        const mig_device *d = &m->devices[i];
        json_t *dev = json_object(), *fields = json_array(), *f = json_object();

        if (d->ops.save_iterate)
            continue;
        json_object_set_new(f, "name", json_string("data"));
        json_object_set_new(f, "type", json_string("buffer"));
        json_object_set_new(f, "size", json_integer((json_int_t)sizes[i]));
        json_array_append_new(fields, f);
        json_object_set_new(dev, "name", json_string(d->idstr));
        json_object_set_new(dev, "instance_id", json_integer(d->instance));
        json_object_set_new(dev, "vmsd_name", json_string(d->idstr));
        json_object_set_new(dev, "version", json_integer(d->version));
        json_object_set_new(dev, "fields", fields);
        json_array_append_new(devs, dev);
    }
    json_object_set_new(root, "devices", devs);
    text = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!text) {
        lm_stream_set_error(pc->s, -ENOMEM, "cannot build the VMDESCRIPTION");
        return;
    }
    lm_put_u8(pc->s, WIRE_VM_VMDESCRIPTION);
    lm_put_be32(pc->s, (uint32_t)strlen(text));
    lm_put_buffer(pc->s, text, strlen(text));
    free(text);
}

/* Switch-over begins: the guest stops (status device). */
static void pc_stop_guest(precopy *pc)
{
    lm_mig *m = pc->m;

    /* Only a running guest is stopped (and restarted on failure), as QEMU's
     * vm_was_running: a paused or never-started guest stays as it was. */
    pc->prev_runstate = lm_runstate_get(m);
    if (pc->prev_runstate == LM_RUN_RUNNING && m->vm.stop)
        m->vm.stop(m->vm_opaque);
    pc->stop_ns = time_now_ns();
    pc->vm_stopped = true;
    mig_set_runstate(m, LM_RUN_FINISH_MIGRATE);
    mig_set_status(m, LM_STATUS_DEVICE);
    pc->st.precopy_bytes = pc_bytes(pc);
}

/* Wait for the destination's answer to the whole stream (SHUT): 0 when it
 * runs the guest, whatever `ret` (our own error after EOF) said. */
static int pc_wait_verdict(precopy *pc, int ret, lm_error *err)
{
    lm_error rerr = { 0 };
    uint32_t status;
    int rret = rp_reader_wait_shut(pc->rpr, (int)mig_params(pc->m).switchover_confirm_timeout,
                                   &status, &rerr);

    if (!rret)
        pc->dest_status = (int)status;
    if (!rret && status == 0) {
        if (ret)
            util_log("after EOF (%s); the destination confirmed it runs the guest", err->msg);
        return 0;
    }
    if (!rret)
        return error_set(err, -EIO, "the destination failed to load the migration (it "
                         "reported status %u; see its log)", status);
    if (!ret) {
        *err = rerr;
        ret = rret;
    }
    return ret;
}

static int pc_complete(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;
    int64_t newly;
    int ret;

    pc_stop_guest(pc);
    newly = ram_sync(pc->ram, pc->dirty, err);
    if (newly < 0)
        return (int)newly;
    pc->st.dirty_sync_count++;
    savevm_section_header(pc->s, WIRE_VM_SECTION_END, RAM_SECTION_ID, NULL, 0, 0);
    while (!ram_save_some(pc->ram, &pc->sink, pc->s, UINT64_MAX) && !lm_stream_error(pc->s))
        ;
    ram_put_eos(pc->ram, &pc->sink, pc->s);
    savevm_section_footer(pc->s, RAM_SECTION_ID);
    /* mapped-ram: every page write is done (the EOS synced): the bitmaps last */
    if (pc->mapped && !lm_stream_error(pc->s) &&
        (ret = mapped_ram_put_bitmaps(pc->mapped, pc->ram, err)))
        return ret;
    uint64_t sizes[MIG_MAX_DEVICES];
    for (int i = 0; i < m->ndevices; i++) {
        mig_device *d = &m->devices[i];
        uint8_t type = d->ops.save_iterate ? WIRE_VM_SECTION_END : WIRE_VM_SECTION_FULL;
        uint64_t at;

        savevm_section_header(pc->s, type, d->section_id, d->idstr, d->instance, d->version);
        at = lm_stream_offset(pc->s);
        if ((ret = d->ops.save(pc->s, d->opaque)))
            return error_set(err, ret, "device '%s': save failed", d->idstr);
        sizes[i] = lm_stream_offset(pc->s) - at;
        savevm_section_footer(pc->s, d->section_id);
    }
    /*
     * Commit point: once EOF is on its way the destination may resume the
     * guest, so from here lm_cancel is refused (mig_commit, exclusive with it
     * pairs with the check in lm_cancel).  Before it, a cancel means the
     * destination never sees EOF and never runs.
     */
    if (!mig_commit(m))
        return error_set(err, -ECANCELED, "migration cancelled");
    pc->eof_queued = true;
    pc->eof_at = lm_stream_offset(pc->s);
    savevm_put_eof(pc->s);
    pc_put_vmdesc(pc, sizes);
    stream_flush(pc->s);
    ret = pc_stream_err(pc, err);
    /* A saved file is complete only when it is durable. */
    if (!ret && m->conn.seekable && fdatasync(m->conn.fd))
        ret = error_set_errno(err, -errno, "fdatasync of the migration file");
    pc_publish(pc);
    if (!pc->rpr)
        goto out;
    /*
     * From here the destination's answer decides, even after an error of
     * ours (the VMDESCRIPTION's write failing, say): EOF may have reached it.
     * SHUT 0: it runs the guest, whatever failed here; SHUT != 0: it failed
     * and never will; no answer in time: the outcome is unknown.
     */
    ret = pc_wait_verdict(pc, ret, err);
out:
    if (ret)
        return ret;
    pc->st.downtime = (time_now_ns() - pc->stop_ns + 999999) / 1000000;
    return 0;
}

/* ------------------------------------------------------------ postcopy */

/*
 * Postcopy, the source's half (../shared/reference/qemu-migration-format.md
 * section 6.2 has QEMU's sequence; this is it):
 *
 *   switch   guest stopped (status device), the multifd channels idle from
 *            now on -- the last PART's EOS was their SYNC, and the
 *            destination reads nothing past that EOS before every page of
 *            it is in place, so no precopy page can land after a postcopy
 *            one; it ends them at the first postcopy command --, a last
 *            bitmap sync, END of the iterable devices, RAM_DISCARD for
 *            every page still dirty, then PACKAGED: LISTEN, every other
 *            device's FULL section, PING(0x42), RUN.  Status
 *            postcopy-device.
 *   stream   PART sections of background pages (max-postcopy-bandwidth),
 *            each requested page first, as soon as the reader queued it.
 *   commit   PONG(0x42): the destination loaded the package and is about to
 *            run the guest.  Before it any failure resumes the guest here
 *            (the destination never ran it -- but see docs/format.md for
 *            the one window QEMU 10.2 has too: a PONG lost with the link);
 *            after it (postcopy-active) neither side has all of the guest.
 *            EOF is never written before it.
 *   end      every page sent: END, EOF (no VMDESCRIPTION, as QEMU), then
 *            the destination's SHUT once it has every page.
 */

static void pc_be32(uint8_t *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, 4);
}

/* Wait up to ms for a request, the package's PONG or a cancel. */
static void pc_wait_wake(precopy *pc, int ms)
{
    struct pollfd pfd[2] = { { .fd = pc->wake_fd, .events = POLLIN },
                             { .fd = pc->m->cancel_fd, .events = POLLIN } };
    uint64_t v;

    if (poll(pfd, 2, ms) > 0 && pfd[0].revents && read(pc->wake_fd, &v, sizeof(v)) < 0) {
        /* EAGAIN: another look drained it */
    }
}

/* Every page asked for so far, before anything else.  Returns pages sent. */
static int pc_serve_requests(precopy *pc)
{
    postcopy_request rq;
    int n = 0;

    while (postcopy_requests_pop(pc->req, &rq)) {
        pc->st.postcopy_requests++;
        /* sent already by the reader on the preempt channel -- or not, if
         * it came before the channel was open: then here */
        if (pc->psent[0] &&
            bitmap_test_and_clear_atomic(pc->psent[rq.block - pc->ram->blocks], rq.page))
            ram_take_requested(pc->ram, rq.block, rq.page);
        /* A clear bit: sent after the switch, ahead of us in this stream. */
        else if (ram_save_requested(pc->ram, &pc->sink, pc->s, rq.block, rq.page))
            n++;
    }
    if (n)
        stream_flush(pc->s);
    return n;
}

/* The package: LISTEN, the device state, PING(0x42), RUN -- in memory
 * first, since PACKAGED states its length before it. */
static int pc_put_package(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;
    lm_stream *pkg = stream_new_mem_writer();
    uint8_t ping[4], lenbuf[4];
    const uint8_t *data;
    size_t len;
    int ret = 0;

    savevm_put_command(pkg, WIRE_CMD_POSTCOPY_LISTEN, 0, NULL);
    for (int i = 0; i < m->ndevices && !ret; i++) {
        mig_device *d = &m->devices[i];

        if (d->ops.save_iterate)
            continue;       /* its END went before the discards */
        savevm_section_header(pkg, WIRE_VM_SECTION_FULL, d->section_id, d->idstr,
                              d->instance, d->version);
        if ((ret = d->ops.save(pkg, d->opaque)))
            error_set(err, ret, "device '%s': save failed", d->idstr);
        savevm_section_footer(pkg, d->section_id);
    }
    pc_be32(ping, PC_PING_PACKAGE);
    savevm_put_command(pkg, WIRE_CMD_PING, 4, ping);
    savevm_put_command(pkg, WIRE_CMD_POSTCOPY_RUN, 0, NULL);
    if (!ret && lm_stream_error(pkg))
        ret = error_set(err, lm_stream_error(pkg), "postcopy package: %s",
                        lm_stream_error_msg(pkg));
    data = stream_mem_data(pkg, &len);
    if (!ret && len > UINT32_MAX)
        ret = error_set(err, -EFBIG, "postcopy package: %zu bytes of device state (at most "
                        "4 GiB)", len);
    if (!ret) {
        pc_be32(lenbuf, (uint32_t)len);
        savevm_put_command(pc->s, WIRE_CMD_PACKAGED, 4, lenbuf);
        lm_put_buffer(pc->s, data, len);
    }
    stream_free(pkg);
    return ret;
}

static void pc_kick_preempt(void *opaque)
{
    conn_shutdown(&((precopy *)opaque)->pconn);
}

/* postcopy-preempt: a second connection to the destination, before the
 * package, so it is there when the destination's LISTEN takes it; like
 * QEMU's it carries bare page records, no header. */
static int pc_open_preempt(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;
    lm_stream *s;
    int ret = transport_connect(&m->uri, &pc->pconn, m->cancel_fd, 10000, err);

    if (ret) {
        error_prefix(err, "postcopy-preempt: cannot open the preempt channel");
        return ret;
    }
    mig_helper_add(m, pc_kick_preempt, pc);
    /* TLS: its own session, as every channel (QEMU's placement too) */
    if ((ret = conn_tls_wrap(&m->tls, &pc->pconn, m->cancel_fd, 10000, err))) {
        error_prefix(err, "postcopy-preempt");
        return ret;
    }
    s = stream_new_writer(pc->pconn.fd, true);
    stream_set_tls(s, pc->pconn.tls);
    pthread_mutex_lock(&pc->ps_lock);
    pc->ps = s;                 /* the reader sends on it from now on */
    pthread_mutex_unlock(&pc->ps_lock);
    return 0;
}

/*
 * Before EOF on the main stream: an EOS on the preempt channel after its
 * last page, so that the destination, which checks at EOF that every page
 * arrived, first drains this channel up to here (a requested page may have
 * gone only this way).
 */
static int pc_end_preempt(precopy *pc, lm_error *err)
{
    int ret;

    if (!pc->ps)
        return 0;
    pthread_mutex_lock(&pc->ps_lock);
    lm_put_be64(pc->ps, RAM_EOS);
    ret = stream_flush(pc->ps);
    pc->ps_closed = true;
    pthread_mutex_unlock(&pc->ps_lock);
    return ret ? error_set(err, ret, "postcopy preempt channel: %s",
                           lm_stream_error_msg(pc->ps)) : 0;
}

static void pc_close_preempt(precopy *pc)
{
    if (pc->pconn.fd >= 0 && !pc->ps)       /* connected, TLS failed */
        mig_helper_remove(pc->m, pc);
    if (!pc->ps) {
        conn_close(&pc->pconn, NULL);
        return;
    }
    mig_helper_remove(pc->m, pc);
    conn_close(&pc->pconn, NULL);
    stream_free(pc->ps);
    pc->ps = NULL;
}

static void pc_free_psent(precopy *pc)
{
    for (int i = 0; i < RAM_MAX_BLOCKS; i++) {
        bitmap_free(pc->psent[i]);
        pc->psent[i] = NULL;
    }
}

static int pc_postcopy_switch(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;
    int64_t newly;
    int ret;

    pc_stop_guest(pc);
    /* The channels stay connected but idle until the end: the destination
     * ends them itself at the first postcopy command (a channel closed
     * first would look like a source gone). */
    pc->sink = ram_stream_sink();
    newly = ram_sync(pc->ram, pc->dirty, err);
    if (newly < 0)
        return (int)newly;
    pc->st.dirty_sync_count++;
    for (int i = 0; i < m->ndevices; i++) {
        mig_device *d = &m->devices[i];

        if (!d->ops.save_iterate)
            continue;
        savevm_section_header(pc->s, WIRE_VM_SECTION_END, d->section_id, d->idstr,
                              d->instance, d->version);
        if ((ret = d->ops.save(pc->s, d->opaque)))
            return error_set(err, ret, "device '%s': save failed", d->idstr);
        savevm_section_footer(pc->s, d->section_id);
    }
    postcopy_put_discards(pc->ram, pc->s);
    if (mig_cap(m, MIG_CAP_POSTCOPY_PREEMPT))
        for (int i = 0; i < pc->ram->nblocks; i++)
            pc->psent[i] = bitmap_new(pc->ram->blocks[i].npages);
    /* From here the destination may fault (its device loads read RAM). */
    atomic_store(&pc->in_postcopy, true);
    if ((ret = pc_put_package(pc, err)))
        return ret;
    if (stream_flush(pc->s))
        return pc_stream_err(pc, err);
    /* The preempt channel after the package: the destination takes it at
     * LISTEN (its TLS handshake needs the destination there).  Requests
     * before it is open go on the main stream. */
    if (mig_cap(m, MIG_CAP_POSTCOPY_PREEMPT) && (ret = pc_open_preempt(pc, err)))
        return ret;
    pc->switch_bytes = pc_bytes(pc);
    pc->package_ns = time_now_ns();
    mig_set_status(m, LM_STATUS_POSTCOPY_DEVICE);
    util_log("postcopy: switched with %" PRIu64 " MiB left to send", pc->ram->dirty >> 8);
    return 0;
}

/* PONG(0x42) came: the commit point of postcopy. */
static int pc_postcopy_commit(precopy *pc, lm_error *err)
{
    if (!mig_commit(pc->m))
        return error_set(err, -ECANCELED, "migration cancelled");
    pc->postcopy_committed = true;
    pc->st.downtime = (time_now_ns() - pc->stop_ns + 999999) / 1000000;
    /* where the downtime went: here (sync, discards, device state, the
     * preempt channel), then there (its discards, device load, faults) */
    util_log("postcopy: downtime %lld ms: %.1f ms to send the package, %.1f ms until the "
             "destination confirmed it", (long long)pc->st.downtime,
             (double)(pc->package_ns - pc->stop_ns) / 1e6,
             (double)(time_now_ns() - pc->package_ns) / 1e6);
    mig_set_status(pc->m, LM_STATUS_POSTCOPY_ACTIVE);
    return 0;
}

/*
 * Background pages within max-postcopy-bandwidth (100 ms windows, as
 * precopy's limit).  False when this window is used up: it then waits for
 * the window's end, or less when a request comes -- requested pages are
 * never held back by the limit.
 */
static bool pc_postcopy_budget(precopy *pc)
{
    int64_t now = time_now_ns(), limit = pc->p.max_postcopy_bandwidth;

    if (now - pc->win_ns >= 100 * 1000000LL) {
        pc->win_ns = now;
        pc->win_bytes = pc_rate_bytes(pc);
        return true;
    }
    if (limit <= 0 || pc_rate_bytes(pc) - pc->win_bytes < (uint64_t)limit / 10)
        return true;
    pc_wait_wake(pc, (int)((pc->win_ns + 100 * 1000000LL - now + 999999) / 1000000));
    return false;
}

static int pc_postcopy_stream(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;
    int64_t section_ns = time_now_ns();
    int64_t confirm_by = time_now_ms() + mig_params(m).switchover_confirm_timeout;
    int ret;

    savevm_section_header(pc->s, WIRE_VM_SECTION_PART, RAM_SECTION_ID, NULL, 0, 0);
    for (;;) {
        pc->p = mig_params(m);
        if (mig_cancelled(m))
            return error_set(err, -ECANCELED, "migration cancelled");
        if ((ret = pc_rp_check(pc, err)) || (ret = pc_stream_err(pc, err)))
            return ret;
        pc_serve_requests(pc);
        if (!pc->postcopy_committed && atomic_load(&pc->pkg_loaded) &&
            (ret = pc_postcopy_commit(pc, err)))
            return ret;
        if (pc->ram->dirty == 0) {
            if (pc->postcopy_committed)
                break;
            if (time_now_ms() > confirm_by)
                return error_set(err, -ETIMEDOUT, "postcopy: the destination did not confirm "
                                 "that it loaded the device state within %lld ms "
                                 "(switchover-confirm-timeout)",
                                 (long long)pc->p.switchover_confirm_timeout);
            stream_flush(pc->s);
            pc_wait_wake(pc, 100);
            continue;
        }
        if (!pc_postcopy_budget(pc))
            continue;
        ram_save_some(pc->ram, &pc->sink, pc->s, PC_CHUNK_BYTES);
        /* Without preempt, out at once: a request then waits behind one
         * chunk, not a buffer.  With it, requests do not wait here: the
         * stream flushes itself when its iovecs are full (~2 MiB). */
        if (!pc->psent[0])
            stream_flush(pc->s);
        if (time_now_ns() - section_ns > PC_SECTION_MAX_MS * 1000000LL) {
            ram_put_eos(pc->ram, &pc->sink, pc->s);
            savevm_section_footer(pc->s, RAM_SECTION_ID);
            savevm_section_header(pc->s, WIRE_VM_SECTION_PART, RAM_SECTION_ID, NULL, 0, 0);
            section_ns = time_now_ns();
            pc_publish(pc);
        }
    }
    ram_put_eos(pc->ram, &pc->sink, pc->s);
    savevm_section_footer(pc->s, RAM_SECTION_ID);
    savevm_section_header(pc->s, WIRE_VM_SECTION_END, RAM_SECTION_ID, NULL, 0, 0);
    ram_put_eos(pc->ram, &pc->sink, pc->s);
    savevm_section_footer(pc->s, RAM_SECTION_ID);
    if ((ret = pc_end_preempt(pc, err)))
        return ret;
    pc->eof_queued = true;
    pc->eof_at = lm_stream_offset(pc->s);
    savevm_put_eof(pc->s);
    stream_flush(pc->s);
    ret = pc_stream_err(pc, err);
    pc_publish(pc);
    return pc_wait_verdict(pc, ret, err);
}

static int pc_postcopy(precopy *pc, lm_error *err)
{
    int ret = pc_postcopy_switch(pc, err);

    return ret ? ret : pc_postcopy_stream(pc, err);
}

/* After the commit of postcopy, a failure: say what it means, keep the
 * guest stopped for good (nobody has all of it). */
static void pc_report_split(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;

    pthread_mutex_lock(&m->lock);
    if (m->error.code)
        *err = m->error;
    pthread_mutex_unlock(&m->lock);
    error_prefix(err, "postcopy failed after the destination started the guest: neither "
                 "side has all of its memory (%" PRIu64 " pages were never sent); it stays "
                 "stopped here, run state internal-error", pc->ram->dirty);
    pc->vm_stopped = false;
    mig_set_runstate(m, LM_RUN_INTERNAL_ERROR);
    util_log("%s", err->msg);
}

/*
 * After a failure: may the destination be running the guest?  Design note
 * 10: only a definite answer gives the guest back once EOF may have left.
 * Definite are a failure before EOF left this process (the destination
 * cannot have the whole stream), a destination that reported it failed
 * (SHUT with a non-zero status: it never starts the guest after that), and
 * a file, which nobody runs.  A timeout, a closed or reset connection, a
 * failing exec: command or any other error after EOF left is no answer.
 */
static bool pc_outcome_unknown(precopy *pc)
{
    if (!pc->eof_queued || pc->m->conn.seekable || pc->dest_status > 0)
        return false;
    return stream_written(pc->s) > pc->eof_at;
}

/* The outcome is unknown: say so everywhere, keep the guest stopped. */
static void pc_report_unknown(precopy *pc, lm_error *err)
{
    lm_mig *m = pc->m;

    /* The first error (a channel's, say) is the cause; ours may be its echo. */
    pthread_mutex_lock(&m->lock);
    if (m->error.code)
        *err = m->error;
    pthread_mutex_unlock(&m->lock);
    error_prefix(err, "switch-over outcome unknown: the whole stream was sent and the "
                 "destination may be running the guest, which stays stopped here "
                 "('cont' only if the destination does not run it, or 'quit')");
    pc->vm_stopped = false;             /* nothing will restart it */
    pc->st.outcome_unknown = true;
    mig_set_runstate(m, LM_RUN_POSTMIGRATE);
    util_log("%s", err->msg);
}

/* Undo finish-migrate after a failure. */
static void pc_restore_guest(precopy *pc)
{
    lm_mig *m = pc->m;

    if (!pc->vm_stopped)
        return;
    pc->vm_stopped = false;
    if (pc->prev_runstate == LM_RUN_RUNNING && m->vm.start)
        m->vm.start(m->vm_opaque);
    mig_set_runstate(m, pc->prev_runstate);
}

static void pc_finish(precopy *pc, int ret, lm_error *err)
{
    lm_mig *m = pc->m;
    lm_error cerr = { 0 };

    pc_set_throttle(pc, 0);
    /* First, so that shutting the socket below is no news to it (and the
     * preempt channel it writes is ours again). */
    rp_reader_stop(pc->rpr);
    pc->rpr = NULL;
    pc_close_preempt(pc);
    pc_free_psent(pc);
    if (ret) {
        /* the socket shut (the peer sees the end), every helper interrupted */
        mig_kick(m);
        if (pc->postcopy_committed)
            pc_report_split(pc, err);
        else if (pc_outcome_unknown(pc))
            pc_report_unknown(pc, err);
        else
            pc_restore_guest(pc);
    }
    pc->sink = ram_stream_sink();       /* what it pointed to goes now */
    if (pc->mfs) {
        multifd_stats mf;
        mig_helper_remove(m, pc->mfs);
        multifd_send_stats(pc->mfs, &mf);
        pc->mf_final = mf;
        multifd_send_finish(pc->mfs);
        pc->mfs = NULL;
    }
    if (pc->comp) {
        pc_publish(pc);     /* the compression figures, while the pool exists */
        mig_helper_remove(m, pc->comp);
        compress_free(pc->comp);
        pc->comp = NULL;
    }
    if (pc->mapped) {
        pc->mapped_final = mapped_ram_bytes(pc->mapped);   /* all synced by now */
        mig_helper_remove(m, pc->mapped);
        mapped_ram_close(pc->mapped);
        pc->mapped = NULL;
    }
    ram_save_finish(pc->ram);
    mig_conn_close(m, &cerr);
    if (!ret && cerr.code && pc->dest_status == 0) {
        /* The destination confirmed it runs the guest: that stands. */
        util_log("after the destination's confirmation: %s", cerr.msg);
    } else if (!ret && cerr.code) {     /* e.g. exec: command exited non-zero */
        ret = cerr.code;
        *err = cerr;
        if (pc->postcopy_committed)
            pc_report_split(pc, err);
        else if (pc_outcome_unknown(pc))
            pc_report_unknown(pc, err);
        else
            pc_restore_guest(pc);
    }
    pc_publish(pc);
    if (!ret) {
        /* Completed: report averages over the whole migration, as QEMU does. */
        lm_stats avg = pc->st;
        double secs = (double)(time_now_ms() - pc->start_ms) / 1000.0;
        if (secs > 0) {
            avg.mbps = (double)pc_bytes(pc) * 8 / 1e6 / secs;
            avg.pages_per_second = (uint64_t)((double)(pc->ram->zero_pages +
                                                       pc->ram->normal_pages) / secs);
        }
        mig_publish(m, &avg);
        mig_set_runstate(m, LM_RUN_POSTMIGRATE);
        mig_set_status(m, LM_STATUS_COMPLETED);
    } else if (mig_user_cancelled(m) && !mig_has_error(m)) {
        mig_set_status(m, LM_STATUS_CANCELLED);
    } else {
        /* A channel's failure was recorded first; our -ECANCELED is its echo. */
        if (pc->st.outcome_unknown || pc->postcopy_committed)
            mig_replace_error(m, err);  /* it says what matters most now */
        else if (!(ret == -ECANCELED && mig_has_error(m)))
            mig_set_error(m, err);
        mig_set_status(m, LM_STATUS_FAILED);
        if (pc->st.outcome_unknown)
            mig_notice(m, "MIGRATION_OUTCOME_UNKNOWN", err->msg);
    }
    /*
     * Last, after the final status: unregistering uffd-wp from a large guest
     * clears every PTE's protection (~40 ms per GiB here) and is cleanup,
     * not migration -- QEMU also stops dirty logging after COMPLETED.  A
     * guest restarted above meanwhile only takes in-kernel (async) faults.
     * The next lm_migrate joins this thread before it touches the tracker.
     */
    dirty_stop(pc->dirty);
    postcopy_requests_free(pc->req);
    pc->req = NULL;
    if (pc->wake_fd >= 0)
        close(pc->wake_fd);
}

void *precopy_thread(void *arg)
{
    lm_mig *m = arg;
    precopy pc = { .m = m, .ram = &m->ram, .dirty = m->dirty, .dest_status = -1,
                   .wake_fd = -1, .pconn = { .fd = -1 } };
    bool postcopy = false;
    lm_error err = { 0 };
    int64_t t0 = time_now_ms();
    int ret;

    pc.start_ms = t0;
    pc.rate_ns = time_now_ns();
    pthread_mutex_init(&pc.ps_lock, NULL);
    pthread_setname_np(pthread_self(), "lm-migrate");
    mig_thread_enter(m);
    pc.p = mig_params(m);
    pc.s = stream_new_writer(m->conn.fd, m->conn.is_socket);
    ret = pc_setup(&pc, &err);
    pc.st.setup_time = time_now_ms() - t0;
    if (!ret) {
        mig_set_status(m, LM_STATUS_ACTIVE);
        pc_publish(&pc);
        ret = pc_iterate(&pc, &postcopy, &err);
    }
    if (!ret)
        ret = postcopy ? pc_postcopy(&pc, &err) : pc_complete(&pc, &err);
    if (ret && mig_cancelled(m) && !err.code)
        error_set(&err, -ECANCELED, "migration cancelled");
    pc_finish(&pc, ret, &err);
    stream_free(pc.s);
    pthread_mutex_destroy(&pc.ps_lock);
    return NULL;
}
