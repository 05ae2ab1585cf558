/*
 * The destination's incoming thread.
 *
 *   accept    on the listening socket (or open fd/exec/file), interruptible
 *             by lm_cancel through cancel_fd.
 *   load      loadvm_run over the whole stream: "ram" and every registered
 *             device as section handlers; OPEN_RETURN_PATH and PING commands.
 *   resume    only after the EOF record: vm ops start (the program may check
 *             the guest there), run state running, then SHUT(0) on the return
 *             path -- the source measures downtime up to that message.
 *   drain     read until the source closes, so the SHUT is never lost to a
 *             reset caused by closing a socket with unread bytes.
 *
 * On any error the guest is NOT started: status failed, the error names what
 * was wrong and where, SHUT(1) goes back if a return path is open.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <endian.h>

#include "migration/incoming.h"
#include "util/bitmap.h"
#include "cpr/cpr.h"
#include "util/error.h"
#include "util/time.h"

#define IN_DRAIN_MS 10000
#define IN_CHANNELS_MS 30000     /* all channels must arrive within this */

/* Stop the helpers of the load (decompression pool, mapped-ram I/O workers,
 * multifd channels): interrupted on failure, drained on success.  0, or the
 * error of a helper that broke the stream's rules after its end. */
int in_workers_finish(incoming *in, bool failed, lm_error *err)
{
    int ret;

    if (failed)
        mig_interrupt_helpers(in->m);
    in->placer = ram_direct_placer();
    if (in->decomp) {
        mig_helper_remove(in->m, in->decomp);
        decompress_free(in->decomp);
        in->decomp = NULL;
    }
    if (in->mapped) {
        mig_helper_remove(in->m, in->mapped);
        mapped_ram_close(in->mapped);
        in->mapped = NULL;
    }
    if (!in->mfr)
        return 0;
    mig_helper_remove(in->m, in->mfr);
    in->mf_bytes = multifd_recv_bytes(in->mfr);
    ret = multifd_recv_finish(in->mfr, failed ? NULL : err);
    in->mfr = NULL;
    return ret;
}

/* What mig_kick calls for each helper (migration.h, "interrupt of helpers"). */
static void in_kick_multifd(void *mr) { multifd_recv_kick(mr); }
static void in_kick_mapped(void *mr) { mapped_ram_interrupt(mr); }
static void in_kick_decomp(void *d) { decompress_interrupt(d); }

/*
 * The transport the pages come by decides the placer: a mapped-ram file,
 * the decompression pool, the multifd channels, or (none of these) the
 * main stream placed directly.  The accepted channels pass to multifd.
 */
static int in_setup_placer(incoming *in, transport_conn *chans, int n, lm_error *err)
{
    lm_mig *m = in->m;
    mig_paramset p = mig_params(m);

    /* x-integrity: every placer checks each page's checksum (ram.h) */
    m->ram.integrity = mig_cap(m, MIG_CAP_INTEGRITY);
    if (mig_cap(m, MIG_CAP_MAPPED_RAM)) {
        int nch = mig_cap(m, MIG_CAP_MULTIFD) ? (int)p.multifd_channels : 1;

        in->mapped = mapped_ram_open(m->uri.path, m->uri.offset, m->conn.fd, nch, p.direct_io,
                                     false, err);
        if (!in->mapped)
            return err->code ? err->code : -EIO;
        mig_helper_add(m, in_kick_mapped, in->mapped);
        in->placer = mapped_ram_placer(in->mapped);
    } else if (mig_cap(m, MIG_CAP_COMPRESS)) {
        in->decomp = decompress_new((int)p.decompress_threads, err);
        if (!in->decomp)
            return err->code ? err->code : -EIO;
        mig_helper_add(m, in_kick_decomp, in->decomp);
        in->placer = decompress_placer(in->decomp);
    } else if (mig_cap(m, MIG_CAP_MULTIFD)) {
        in->mfr = multifd_recv_start(chans, n, &m->ram, (int)p.multifd_compression, m->conn.fd,
                                     &m->cancel, mig_fail, m, err);
        if (!in->mfr)
            return err->code ? err->code : -EIO;
        mig_helper_add(m, in_kick_multifd, in->mfr);
        in->placer = multifd_recv_placer(in->mfr);
    }
    return 0;
}

void in_publish(incoming *in)
{
    if (in->mfr)
        in->mf_bytes = multifd_recv_bytes(in->mfr);
    in->st.multifd_bytes = in->mf_bytes;
    in->st.transferred = lm_stream_offset(postcopy_in_stream(in)) + in->mf_bytes;
    postcopy_in_stats(in, &in->st);
    in->st.duplicate = 0;
    mig_publish(in->m, &in->st);
}

/* A return-path message whose payload is one be32 (SHUT, PONG); the wire
 * table checks that the type takes exactly that. */
static int in_rp_send(incoming *in, uint16_t type, uint32_t value)
{
    return in->rpw ? rp_send_u32(in->rpw, type, value) : -ENOTCONN;
}

/* OPEN_RETURN_PATH: a second one changes nothing, as in QEMU. */
static int in_open_rp(const loadvm_cmd *c, void *opaque)
{
    incoming *in = opaque;

    (void)c;
    if (!in->m->conn.is_socket)
        return -ENOTSUP;    /* a return path needs a bidirectional channel */
    if (!in->rpw)
        in->rpw = rp_writer_new_tls(in->m->conn.fd, in->m->conn.tls);
    return 0;
}

/* PING(value): PONG(value) on the return path, which must be open. */
static int in_ping(const loadvm_cmd *c, void *opaque)
{
    incoming *in = opaque;

    assert(c->len == 4);    /* the wire table's length for PING, checked */
    if (!in->rpw)
        return -ENOTCONN;
    return in_rp_send(in, WIRE_RP_PONG, wire_be32(c->data));
}

static int in_load_ram(lm_stream *s, void *opaque, uint32_t version, int type)
{
    incoming *in = opaque;
    int ret = ram_load(&in->m->ram, &in->placer, s, type);
    int64_t now = time_now_ns();

    if (now - in->last_publish_ns > 100 * 1000000LL) {
        in->last_publish_ns = now;
        in_publish(in);
    }
    (void)version;
    return ret ? -EINVAL : 0;
}

static bool in_autostart(lm_mig *m)
{
    bool on;

    pthread_mutex_lock(&m->lock);
    on = m->autostart;
    pthread_mutex_unlock(&m->lock);
    return on;
}

/* At EOF: every block listed, the END section, every page received. */
static int in_check_ram(void *opaque, char *why, size_t len)
{
    incoming *in = opaque;

    return ram_load_check(&in->m->ram, why, len);
}

/* Read and discard until the source closes (bounded). */
static void in_drain(incoming *in)
{
    int64_t deadline = time_now_ms() + IN_DRAIN_MS;
    char buf[4096];

    while (time_now_ms() < deadline) {
        struct pollfd pfd = { .fd = in->m->conn.fd, .events = POLLIN };
        if (!conn_pending(&in->m->conn) &&
            poll(&pfd, 1, (int)(deadline - time_now_ms())) <= 0)
            return;
        ssize_t r = conn_read_nb(&in->m->conn, buf, sizeof(buf));
        if (r <= 0 && !(r < 0 && (errno == EINTR || errno == EAGAIN)))
            return;
    }
}

/*
 * Postcopy failed after RUN: the guest ran here with part of its memory and
 * the rest is gone with the source's stream.  It is stopped for good (its
 * threads waiting on missing pages were released onto zeroed memory), so
 * nobody mistakes it for a whole guest.
 */
static void in_split(incoming *in, lm_error *err)
{
    lm_mig *m = in->m;
    uint64_t missing = 0;

    for (int i = 0; i < m->ram.nblocks; i++)
        missing += m->ram.blocks[i].npages - bitmap_count(m->ram.blocks[i].rmap,
                                                          m->ram.blocks[i].npages);
    error_prefix(err, "postcopy failed after the guest started here: %" PRIu64 " pages never "
                 "arrived and neither side has all of its memory; the guest is stopped, run "
                 "state internal-error", missing);
    if (m->vm.stop)
        m->vm.stop(m->vm_opaque);
    mig_set_runstate(m, LM_RUN_INTERNAL_ERROR);
    util_log("%s", err->msg);
}

void *incoming_thread(void *arg)
{
    lm_mig *m = arg;
    incoming in = { .m = m };
    loadvm *lv = calloc(1, sizeof(*lv));
    lm_error err = { 0 };
    bool after_run = false;
    int ret, pc;

    if (!lv)
        abort();
    pthread_setname_np(pthread_self(), "lm-incoming");
    mig_thread_enter(m);
    {
        /* Accept into a local and publish it under conn_lock: lm_cancel may
         * be shutting m->conn down concurrently. */
        transport_conn c = { .fd = -1 }, chans[MULTIFD_MAX_CHANNELS];
        int n = (int)mig_params(m).multifd_channels;

        if (mig_cap(m, MIG_CAP_MULTIFD) && !mig_cap(m, MIG_CAP_MAPPED_RAM))
            ret = multifd_accept(&m->listen, &m->tls, n, m->cancel_fd, IN_CHANNELS_MS, &c,
                                 chans, &err);
        else if ((ret = transport_accept(&m->listen, &c, m->cancel_fd, -1, &err)) == 0 &&
                 (ret = conn_tls_wrap(&m->tls, &c, m->cancel_fd, IN_CHANNELS_MS, &err)) < 0)
            conn_close(&c, NULL);       /* refused before any byte of the stream */
        pthread_mutex_lock(&m->conn_lock);
        m->conn = c;
        pthread_mutex_unlock(&m->conn_lock);
        /* cpr-transfer: map the source's RAM before the stream (src/cpr/) */
        if (!ret && mig_params(m).mode == CPR_MODE_TRANSFER)
            ret = cpr_receive(&m->ram, m->conn.fd, m->cancel_fd, &err);
        if (!ret)
            ret = in_setup_placer(&in, chans, n, &err);
    }
    /* postcopy-preempt: the source opens one more connection at the
     * switch, accepted at LISTEN (postcopy_in.c closes the listener). */
    if (!mig_cap(m, MIG_CAP_POSTCOPY_PREEMPT) || ret)
        transport_unlisten(&m->listen);
    if (ret) {
        if (ret == -ECANCELED)
            error_set(&err, ret, "incoming migration cancelled before a source connected");
        goto fail;
    }
    if (mig_cancelled(m)) {   /* a cancel that raced with accept */
        ret = error_set(&err, -ECANCELED, "incoming migration cancelled");
        goto fail;
    }
    mig_set_status(m, LM_STATUS_ACTIVE);
    in.s = stream_new_reader(m->conn.fd, m->conn.is_socket);
    stream_set_tls(in.s, m->conn.tls);
    lv->mapped_ram = mig_cap(m, MIG_CAP_MAPPED_RAM);
    lv->ignore_shared = mig_cap(m, MIG_CAP_IGNORE_SHARED);
    lv->integrity = mig_cap(m, MIG_CAP_INTEGRITY);
    loadvm_set_command(lv, WIRE_CMD_OPEN_RETURN_PATH, in_open_rp, &in);
    loadvm_set_command(lv, WIRE_CMD_PING, in_ping, &in);
    loadvm_add_handler(lv, "ram", 0, RAM_SECTION_VERSION, in_load_ram, &in)->check =
        in_check_ram;
    for (int i = 0; i < m->ndevices; i++)
        loadvm_add_handler(lv, m->devices[i].idstr, m->devices[i].instance,
                           m->devices[i].version, m->devices[i].ops.load,
                           m->devices[i].opaque);
    in.lv = lv;
    postcopy_in_register(&in);
    ram_load_start(&m->ram);
    ret = loadvm_run(lv, in.s);
    /* Only postcopy's RUN ends the main thread's load before EOF. */
    assert(ret <= 0 || ret == LOADVM_QUIT);
    pc = postcopy_in_finish(&in, ret < 0 ? -1 : 0, &after_run, &err);
    if (pc < 0) {
        ret = pc;
        if (mig_user_cancelled(m) && !after_run)
            error_set(&err, -ECANCELED, "incoming migration cancelled");
        goto fail;
    }
    if (pc == 0)
        goto arrived;       /* postcopy: the guest runs since RUN */
    assert(ret <= 0);
    if (ret) {
        ret = lm_stream_error(in.s);
        if (mig_cancelled(m))
            error_set(&err, -ECANCELED, "incoming migration cancelled");
        else
            error_set(&err, ret, "%s", lm_stream_error_msg(in.s));
        goto fail;
    }
    /* The last EOS was a multifd barrier: every page is in place. */
    if ((ret = in_workers_finish(&in, false, &err)))
        goto fail;
    in_publish(&in);
    /*
     * Commit point of the destination: a cancel that got here first wins
     * (the guest never runs); after it lm_cancel is refused, as on the
     * source (mig_commit, state.c).
     */
    if (!mig_commit(m)) {
        error_set(&err, -ECANCELED, "incoming migration cancelled");
        ret = -ECANCELED;
        goto fail;
    }

    /* Everything arrived: this is the only path that starts the guest, unless
     * `stop` during the load asked for it to stay paused (QEMU's autostart). */
    if (in_autostart(m)) {
        if (m->vm.start)
            m->vm.start(m->vm_opaque);
        mig_set_runstate(m, LM_RUN_RUNNING);
    } else {
        mig_set_runstate(m, LM_RUN_PAUSED);
    }
arrived:
    in_publish(&in);
    if (in.rpw && in_rp_send(&in, WIRE_RP_SHUT, 0))
        util_log("could not confirm to the source (return path write failed); the guest "
                 "runs here anyway");
    mig_set_status(m, LM_STATUS_COMPLETED);
    if (in.rpw)
        in_drain(&in);
    rp_writer_free(in.rpw);             /* before the connection it borrows */
    mig_conn_close(m, NULL);
    postcopy_in_free(&in);
    transport_unlisten(&m->listen);     /* preempt's, if it was never needed */
    stream_free(in.s);
    free(lv);
    return NULL;

fail:
    if (after_run)
        in_split(&in, &err);
    in_workers_finish(&in, true, NULL);
    cpr_incoming_failed(&m->ram);      /* the guest never ran: give its memory back */
    if (in.rpw)
        in_rp_send(&in, WIRE_RP_SHUT, 1);
    if (in.s)
        in_publish(&in);
    rp_writer_free(in.rpw);
    mig_conn_close(m, NULL);
    if (after_run)
        mig_replace_error(m, &err);
    else
        mig_set_error(m, &err);
    mig_set_status(m, LM_STATUS_FAILED);
    postcopy_in_free(&in);
    transport_unlisten(&m->listen);
    stream_free(in.s);
    free(lv);
    return NULL;
}
