/*
 * Postcopy, the destination's half: the commands that make RAM missing
 * again and hand the stream to a second thread, so that the guest runs
 * while the rest of its memory arrives
 * (../shared/reference/qemu-migration-format.md, sections 6.1 and 6.4).
 *
 *   POSTCOPY_ADVISE  before any page: this side's page sizes checked, ALL
 *                    of RAM discarded (nothing built here may survive).
 *   RAM_DISCARD      pages sent in precopy and written since: dropped, their
 *                    received bits cleared.  The first one (or PACKAGED)
 *                    also ends multifd: the last PART's EOS was its barrier,
 *                    so every page a channel carried is in place, and a
 *                    channel that carries one more fails the load.
 *   PACKAGED         the package (LISTEN, device state, PING, RUN) read whole
 *                    and loaded by a nested run of the same loader
 *                    (loadvm_run_records, scope PACKAGE).
 *   LISTEN           (in the package) RAM registered with userfaultfd in
 *                    MISSING mode, the fault thread started, and the main
 *                    stream handed to the listen thread, which loads the
 *                    rest of RAM through the uffd placer (UFFDIO_COPY /
 *                    ZEROPAGE, never over a page already there) while this
 *                    thread loads the devices -- which may read guest RAM
 *                    and fault: that is why the package exists.
 *   RUN              (in the package, after LISTEN) the commit point of the
 *                    destination: the guest starts, and the nested and the
 *                    outer loop end (LOADVM_QUIT).
 *
 * Out of order is refused with the byte offset: any of them before ADVISE,
 * ADVISE after the first page, LISTEN or RUN outside a package, LISTEN
 * twice, RUN before LISTEN, a package in a package, a package above
 * PCI_PACKAGE_MAX, and (on the listen thread) any postcopy command or a
 * device section on the main stream after LISTEN.
 *
 * The threads, their hand-offs and the exit codes are migration/incoming.h's
 * table (the contract of this file and incoming.c).
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <endian.h>

#include "migration/incoming.h"
#include "postcopy/postcopy.h"
#include "uffd/uffd.h"
#include "util/thread.h"
#include "util/error.h"
#include "util/fault.h"
#include "util/time.h"

/* Device state of one guest: 1 GiB is far beyond any (a 2 GiB demo guest
 * has 2 MiB), and below what a hostile length could make us allocate. */
#define PCI_PACKAGE_MAX (1u << 30)

enum pci_state { PCI_ADVISED = 1, PCI_DISCARDING, PCI_LISTENING, PCI_RUNNING };

struct postcopy_in {
    incoming *in;
    _Atomic int state;
    bool in_package;            /* main thread: inside PACKAGED's nested loop */
    lm_stream *outer;           /* main thread: the stream PACKAGED came on */
    lm_stream *listen_s;        /* from LISTEN: the main stream, the listen thread's */
    loadvm *lv_listen;
    uffd_ram *uffd;
    uffd_stats final;           /* kept when uffd is closed */
    pthread_t listen;
    bool listen_started;
    _Atomic bool listen_failed;

    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool main_done, main_failed;     /* under lock: the package is over */
    bool preempt_drained;       /* under lock: the preempt channel's EOS was read */
    bool preempt_gone;          /* under lock: its thread is ending */

    int listen_ret;             /* the listen thread's, read after the join */
    lm_error listen_err;
    const ramblock *last_req;   /* fault thread: the block REQ_PAGES refers to */

    /* postcopy-preempt: requested pages on their own connection */
    transport_conn pconn;       /* fd -1 when none */
    lm_stream *preempt_s;
    pthread_t preempt;
    bool preempt_started, preempt_helper;
    _Atomic bool finishing;     /* every page is in: the channel may go */
    _Atomic bool preempt_failed;
    lm_error preempt_err;       /* written before preempt_failed */
    _Atomic int first_failure;  /* which thread failed first: its error is the cause */
};

enum { PCI_FAIL_NONE, PCI_FAIL_LISTEN, PCI_FAIL_PREEMPT };

static void pci_first_failure(postcopy_in *pci, int who)
{
    int none = PCI_FAIL_NONE;

    atomic_compare_exchange_strong(&pci->first_failure, &none, who);
}

/* How long LISTEN waits for the source's preempt connection, which it
 * opens at the switch, before the package. */
#define PCI_PREEMPT_MS 10000

/* Refuse a command: the message with its byte offset latched on c->s. */
static int pci_fail(const loadvm_cmd *c, int code, const char *fmt, ...)
{
    char msg[LM_ERROR_MAX - 64];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    lm_stream_set_error(c->s, code, "%s (command at byte offset %" PRIu64 ")", msg, c->at);
    return code;
}

static int pci_fail_err(const loadvm_cmd *c, const lm_error *err)
{
    return pci_fail(c, err->code ? err->code : -EIO, "%s", err->msg);
}

/* Multifd ends at the first postcopy command after precopy's last PART. */
static int pci_end_multifd(incoming *in, const loadvm_cmd *c)
{
    lm_error err = { 0 };

    if (in->mfr && in_workers_finish(in, false, &err))
        return pci_fail_err(c, &err);
    return 0;
}

static int pci_advise(const loadvm_cmd *c, void *opaque)
{
    incoming *in = opaque;
    postcopy_in *pci;
    lm_error err = { 0 };

    if (in->pci)
        return pci_fail(c, -EINVAL, "POSTCOPY_ADVISE twice");
    if (in->m->ram.seen_block_list)
        return pci_fail(c, -EINVAL, "POSTCOPY_ADVISE after the ram section began (it "
                        "would discard pages that arrived)");
    if (!in->rpw)
        return pci_fail(c, -ENOTCONN, "postcopy needs the return path (OPEN_RETURN_PATH "
                        "first)");
    if (in->m->ram.ignore_shared)
        return pci_fail(c, -ENOTSUP, "postcopy cannot be combined with x-ignore-shared here "
                        "(ADVISE would discard the memory left in place)");
    if (in->mapped || in->decomp)
        return pci_fail(c, -ENOTSUP, "postcopy cannot be combined with %s here",
                        in->mapped ? "mapped-ram" : "the compress capability");
    if (postcopy_check_advise(c->data, c->len, &err))
        return pci_fail_err(c, &err);
    if (c->len == 0)
        return 0;           /* dirty-bitmaps postcopy only: no RAM to pull */
    if (postcopy_discard_all(&in->m->ram, &err))
        return pci_fail_err(c, &err);
    pci = calloc(1, sizeof(*pci));
    if (!pci)
        abort();
    pci->in = in;
    pthread_mutex_init(&pci->lock, NULL);
    pthread_cond_init(&pci->cond, NULL);
    pci->pconn.fd = -1;
    atomic_store(&pci->state, PCI_ADVISED);
    in->pci = pci;
    return 0;
}

static int pci_discard(const loadvm_cmd *c, void *opaque)
{
    incoming *in = opaque;
    postcopy_in *pci = in->pci;
    postcopy_range ranges[POSTCOPY_DISCARD_MAX_RANGES];
    lm_error err = { 0 };
    int n, ret;

    if (!pci)
        return pci_fail(c, -EINVAL, "POSTCOPY_RAM_DISCARD before POSTCOPY_ADVISE");
    if (pci->in_package || atomic_load(&pci->state) > PCI_DISCARDING)
        return pci_fail(c, -EINVAL, "POSTCOPY_RAM_DISCARD inside the package");
    if ((ret = pci_end_multifd(in, c)))
        return ret;
    if (postcopy_parse_discard(&in->m->ram, c->data, c->len, ranges, &n, &err) ||
        postcopy_apply_discard(ranges, n, &err))
        return pci_fail_err(c, &err);
    atomic_store(&pci->state, PCI_DISCARDING);
    return 0;
}

static int pci_packaged(const loadvm_cmd *c, void *opaque)
{
    incoming *in = opaque;
    postcopy_in *pci = in->pci;
    uint32_t len = wire_be32(c->data);
    uint64_t start = lm_stream_offset(c->s);
    uint8_t *blob;
    lm_stream *pkg;
    int ret;

    if (!pci)
        return pci_fail(c, -EINVAL, "PACKAGED before POSTCOPY_ADVISE");
    if (pci->in_package)
        return pci_fail(c, -EINVAL, "PACKAGED inside a package");
    if (len == 0 || len > PCI_PACKAGE_MAX)
        return pci_fail(c, -EINVAL, "PACKAGED of %u bytes (1 to %u)", len, PCI_PACKAGE_MAX);
    if ((ret = pci_end_multifd(in, c)))
        return ret;
    blob = malloc(len);
    if (!blob)
        return pci_fail(c, -ENOMEM, "PACKAGED of %u bytes: out of memory", len);
    if (lm_get_buffer(c->s, blob, len)) {
        free(blob);
        return -EIO;        /* the stream's own "ended after N bytes" */
    }
    /* Tests: the destination fails (0) or dies (1) with the package read,
     * before it confirms it: the source must take its guest back. */
    if (fault_hit("dst", "package", 0)) {
        free(blob);
        return pci_fail(c, -EIO, "fault injected: dst:package:0");
    }
    if (fault_hit("dst", "package", 1))
        _exit(1);
    pkg = stream_new_mem(blob, len);
    pci->outer = c->s;
    pci->in_package = true;
    ret = loadvm_run_records(c->lv, pkg, LOADVM_PACKAGE);
    pci->in_package = false;
    if (ret == LOADVM_END)
        ret = pci_fail(c, -EINVAL, "the package (%u bytes from byte offset %" PRIu64 ") "
                       "ended without POSTCOPY_RUN", len, start);
    else if (ret < 0 && atomic_load(&pci->listen_failed))
        /* Both, since either may be the cause: a device load that read
         * guest RAM finds zeros once the page stream failed and released
         * the faults; or the package failed on its own and the stream just
         * ended with it. */
        ret = pci_fail(c, lm_stream_error(pkg) ? lm_stream_error(pkg) : -EIO,
                       "in the package that starts at byte offset %" PRIu64 " (offsets "
                       "from there): %s; and the page stream failed meanwhile: %s", start,
                       lm_stream_error_msg(pkg), pci->listen_err.msg);
    else if (ret < 0)
        ret = pci_fail(c, lm_stream_error(pkg) ? lm_stream_error(pkg) : -EIO,
                       "in the package that starts at byte offset %" PRIu64 " (offsets "
                       "from there): %s", start, lm_stream_error_msg(pkg));
    stream_free(pkg);
    free(blob);
    return ret;
}

/* ---------------------------------------------------------------- LISTEN */

/* What the listen thread's loader refuses: postcopy's commands, and
 * device state outside the package (two threads must never load one). */
static int pci_refuse_cmd(const loadvm_cmd *c, void *opaque)
{
    (void)opaque;
    return pci_fail(c, -EINVAL, "command %u on the main stream after POSTCOPY_LISTEN "
                    "(it belongs before the package or in it)", c->cmd);
}

static int pci_refuse_device(lm_stream *s, void *opaque, uint32_t version, int type)
{
    const loadvm_handler *h = opaque;

    (void)version;
    (void)type;
    lm_stream_set_error(s, -EINVAL, "device section '%s' after POSTCOPY_LISTEN, near byte "
                        "offset %" PRIu64 ": device state belongs in the package",
                        h->idstr, lm_stream_offset(s));
    return -EINVAL;
}

static int pci_refuse_ram(lm_stream *s, void *opaque, uint32_t version, int type)
{
    (void)opaque;
    (void)version;
    (void)type;
    lm_stream_set_error(s, -EINVAL, "a ram section inside the package after POSTCOPY_LISTEN "
                        "(near byte offset %" PRIu64 "): pages go on the main stream",
                        lm_stream_offset(s));
    return -EINVAL;
}

/* The fault thread: ask for the page (REQ_PAGES_ID when the block changes). */
static void pci_request(void *opaque, const ramblock *b, uint64_t page)
{
    incoming *in = opaque;
    postcopy_in *pci = in->pci;
    uint8_t buf[13 + 255];
    uint64_t start = htobe64(page * RAM_PAGE_SIZE);
    uint32_t len = htobe32((uint32_t)RAM_PAGE_SIZE);
    uint16_t n = 12, type = WIRE_RP_REQ_PAGES;
    int ret;

    memcpy(buf, &start, 8);
    memcpy(buf + 8, &len, 4);
    if (b != pci->last_req) {
        size_t namelen = strlen(b->idstr);

        buf[12] = (uint8_t)namelen;
        memcpy(buf + 13, b->idstr, namelen);
        n = (uint16_t)(13 + namelen);
        type = WIRE_RP_REQ_PAGES_ID;
        pci->last_req = b;
    }
    ret = rp_send(in->rpw, type, buf, n);
    if (ret)
        util_log("postcopy: asking for page 0x%" PRIx64 " of '%s' failed: %s",
                 (uint64_t)(page * RAM_PAGE_SIZE), b->idstr, strerror(-ret));
}

/* The listen thread, at the main stream's EOF: every page is here; wait
 * until the main thread is out of the package, then count its devices. */
static int pci_listen_at_eof(loadvm *lv, lm_stream *s, void *opaque)
{
    incoming *in = opaque;
    postcopy_in *pci = in->pci;
    bool failed;

    pthread_mutex_lock(&pci->lock);
    while (!pci->main_done ||
           (pci->preempt_started && !pci->preempt_drained && !pci->preempt_gone)) {
        struct timespec dl = time_deadline_ms(100);

        pthread_cond_timedwait(&pci->cond, &pci->lock, &dl);
        if (mig_cancelled(in->m))
            break;
    }
    failed = pci->main_failed || !pci->main_done;
    pthread_mutex_unlock(&pci->lock);
    if (failed) {
        lm_stream_set_error(s, -ECANCELED, "the stream ended but loading the package's "
                            "device state did not finish");
        return -1;
    }
    loadvm_merge_done(lv, in->lv);
    return 0;
}

static void *pci_listen_thread(void *arg)
{
    incoming *in = arg;
    postcopy_in *pci = in->pci;
    int ret;

    pthread_setname_np(pthread_self(), "lm-listen");
    ret = loadvm_run_records(pci->lv_listen, pci->listen_s, LOADVM_MAIN);
    if (ret != LOADVM_EOF) {
        int code = lm_stream_error(pci->listen_s);

        error_set(&pci->listen_err, code ? code : -EIO, "%s",
                  code ? lm_stream_error_msg(pci->listen_s) : "the page stream stopped");
        pci_first_failure(pci, PCI_FAIL_LISTEN);
        atomic_store(&pci->listen_failed, true);
        /* No page will come any more: whoever waits for one (the main
         * thread in a device load, the guest) must not wait for ever. */
        uffd_release(pci->uffd);
        ret = -1;
    }
    pci->listen_ret = ret;
    return NULL;
}

/*
 * The preempt channel's thread ("lm-preempt"): bare page records, placed
 * with the second uffd placer, until the channel is shut down.  Before the
 * end, losing it is losing the pages the guest waits for: the whole
 * migration is stopped (mig_kick), with this channel's error.
 */
static void *pci_preempt_thread(void *arg)
{
    incoming *in = arg;
    postcopy_in *pci = in->pci;
    ram_placer pl = uffd_placer(pci->uffd, 1);
    const ramblock *last = NULL;

    pthread_setname_np(pthread_self(), "lm-preempt");
    /* Each EOS: every page the source sent here so far is in (it writes
     * one before EOF on the main stream, which waits for it). */
    while (ram_load_records(&in->m->ram, &last, &pl, pci->preempt_s) == 0) {
        pthread_mutex_lock(&pci->lock);
        pci->preempt_drained = true;
        pthread_cond_broadcast(&pci->cond);
        pthread_mutex_unlock(&pci->lock);
    }
    if (!atomic_load(&pci->finishing)) {
        int code = lm_stream_error(pci->preempt_s);

        error_set(&pci->preempt_err, code ? code : -EIO, "postcopy preempt channel: %s",
                  lm_stream_error_msg(pci->preempt_s));
        pci_first_failure(pci, PCI_FAIL_PREEMPT);
        atomic_store(&pci->preempt_failed, true);
        uffd_release(pci->uffd);
        mig_kick(in->m);
    }
    pthread_mutex_lock(&pci->lock);
    pci->preempt_gone = true;
    pthread_cond_broadcast(&pci->cond);
    pthread_mutex_unlock(&pci->lock);
    return NULL;
}

static void pci_kick_preempt(void *opaque)
{
    postcopy_in *pci = opaque;

    conn_shutdown(&pci->pconn);
}

/* LISTEN with postcopy-preempt: take the source's second connection. */
static int pci_open_preempt(incoming *in, const loadvm_cmd *c)
{
    postcopy_in *pci = in->pci;
    lm_mig *m = in->m;
    lm_error err = { 0 };
    int ret;

    ret = transport_accept(&m->listen, &pci->pconn, m->cancel_fd, PCI_PREEMPT_MS, &err);
    transport_unlisten(&m->listen);
    if (ret)
        return pci_fail(c, ret, "postcopy-preempt: no preempt connection from the source "
                        "(is postcopy-preempt on there too?): %s", err.msg);
    mig_helper_add(m, pci_kick_preempt, pci);
    pci->preempt_helper = true;
    if ((ret = conn_tls_wrap(&m->tls, &pci->pconn, m->cancel_fd, PCI_PREEMPT_MS, &err)))
        return pci_fail(c, ret, "postcopy-preempt: %s", err.msg);
    pci->preempt_s = stream_new_reader(pci->pconn.fd, true);
    stream_set_tls(pci->preempt_s, pci->pconn.tls);
    ret = thread_start(&pci->preempt, pci_preempt_thread, in);
    if (ret)
        return pci_fail(c, -ret, "cannot start the postcopy preempt thread: %s",
                        strerror(ret));
    pci->preempt_started = true;
    return 0;
}

static void pci_close_preempt(incoming *in)
{
    postcopy_in *pci = in->pci;

    atomic_store(&pci->finishing, true);
    if (pci->preempt_started) {
        conn_shutdown(&pci->pconn);
        pthread_join(pci->preempt, NULL);
        pci->preempt_started = false;
    }
    if (pci->preempt_helper) {
        mig_helper_remove(in->m, pci);
        pci->preempt_helper = false;
    }
    conn_close(&pci->pconn, NULL);
}

static int pci_listen(const loadvm_cmd *c, void *opaque)
{
    incoming *in = opaque;
    postcopy_in *pci = in->pci;
    lm_error err = { 0 };
    loadvm *lv = c->lv, *ll;
    int ret;

    if (!pci)
        return pci_fail(c, -EINVAL, "POSTCOPY_LISTEN before POSTCOPY_ADVISE");
    if (!pci->in_package)
        return pci_fail(c, -EINVAL, "POSTCOPY_LISTEN outside a package");
    if (atomic_load(&pci->state) >= PCI_LISTENING)
        return pci_fail(c, -EINVAL, "POSTCOPY_LISTEN twice");
    if ((ret = pci_end_multifd(in, c)))
        return ret;
    {
        int tids[LM_MAX_VCPUS], n;

        pthread_mutex_lock(&in->m->lock);
        n = in->m->nvcpus;
        memcpy(tids, in->m->vcpu_tids, sizeof(tids));
        pthread_mutex_unlock(&in->m->lock);
        pci->uffd = uffd_open(&in->m->ram, tids, n, &err);
    }
    if (!pci->uffd || uffd_start_faults(pci->uffd, pci_request, in, &err))
        return pci_fail_err(c, &err);
    in->placer = uffd_placer(pci->uffd, 0);
    if (mig_cap(in->m, MIG_CAP_POSTCOPY_PREEMPT) && (ret = pci_open_preempt(in, c)))
        return ret;

    /* The listen thread's loader: a copy, so that the two threads share no
     * parse state; it loads RAM and answers PINGs, nothing else. */
    ll = malloc(sizeof(*ll));
    if (!ll)
        abort();
    *ll = *lv;
    for (int i = 0; i < ll->nhandlers; i++) {
        loadvm_handler *h = &ll->handlers[i];

        if (strcmp(h->idstr, "ram") || h->instance != 0) {
            h->load = pci_refuse_device;
            h->opaque = h;
        } else {
            lv->handlers[i].load = pci_refuse_ram;
        }
    }
    loadvm_set_command(ll, WIRE_CMD_POSTCOPY_ADVISE, pci_refuse_cmd, NULL);
    loadvm_set_command(ll, WIRE_CMD_POSTCOPY_RAM_DISCARD, pci_refuse_cmd, NULL);
    loadvm_set_command(ll, WIRE_CMD_PACKAGED, pci_refuse_cmd, NULL);
    loadvm_set_command(ll, WIRE_CMD_POSTCOPY_LISTEN, pci_refuse_cmd, NULL);
    loadvm_set_command(ll, WIRE_CMD_POSTCOPY_RUN, pci_refuse_cmd, NULL);
    ll->at_eof = pci_listen_at_eof;
    ll->at_eof_opaque = in;
    pci->lv_listen = ll;
    pci->listen_s = stream_hand_over(pci->outer);
    atomic_store(&pci->state, PCI_LISTENING);
    mig_set_status(in->m, LM_STATUS_POSTCOPY_ACTIVE);

    ret = thread_start(&pci->listen, pci_listen_thread, in);
    if (ret)
        return pci_fail(c, -ret, "cannot start the postcopy listen thread: %s",
                        strerror(ret));
    pci->listen_started = true;
    return 0;
}

/* ---------------------------------------------------------------- RUN */

static int pci_run(const loadvm_cmd *c, void *opaque)
{
    incoming *in = opaque;
    postcopy_in *pci = in->pci;
    lm_mig *m = in->m;
    bool autostart;

    if (!pci)
        return pci_fail(c, -EINVAL, "POSTCOPY_RUN before POSTCOPY_ADVISE");
    if (!pci->in_package)
        return pci_fail(c, -EINVAL, "POSTCOPY_RUN outside a package");
    if (atomic_load(&pci->state) != PCI_LISTENING)
        return pci_fail(c, -EINVAL, "POSTCOPY_RUN before POSTCOPY_LISTEN");
    if (atomic_load(&pci->listen_failed))   /* listen_err is written before it */
        return pci_fail(c, -EIO, "POSTCOPY_RUN after the page stream failed: %s",
                        pci->listen_err.msg);
    /* The destination's commit point: from here the guest runs here. */
    if (!mig_commit(m))
        return pci_fail(c, -ECANCELED, "incoming migration cancelled");
    atomic_store(&pci->state, PCI_RUNNING);
    pthread_mutex_lock(&m->lock);
    autostart = m->autostart;
    pthread_mutex_unlock(&m->lock);
    if (autostart) {
        if (m->vm.start)
            m->vm.start(m->vm_opaque);
        mig_set_runstate(m, LM_RUN_RUNNING);
    } else {
        mig_set_runstate(m, LM_RUN_PAUSED);
    }
    return LOADVM_QUIT;
}

/* ---------------------------------------------------------------- the end */

void postcopy_in_register(incoming *in)
{
    loadvm_set_command(in->lv, WIRE_CMD_POSTCOPY_ADVISE, pci_advise, in);
    loadvm_set_command(in->lv, WIRE_CMD_POSTCOPY_RAM_DISCARD, pci_discard, in);
    loadvm_set_command(in->lv, WIRE_CMD_PACKAGED, pci_packaged, in);
    loadvm_set_command(in->lv, WIRE_CMD_POSTCOPY_LISTEN, pci_listen, in);
    loadvm_set_command(in->lv, WIRE_CMD_POSTCOPY_RUN, pci_run, in);
}

int postcopy_in_finish(incoming *in, int main_ret, bool *after_run, lm_error *err)
{
    postcopy_in *pci = in->pci;

    *after_run = false;
    if (!pci || !pci->listen_started)
        return 1;
    if (main_ret < 0) {
        /* The package failed: the listen thread must stop reading (only
         * reading: SHUT(1) still goes back), and nothing may wait for a
         * page. */
        pthread_mutex_lock(&in->m->conn_lock);
        if (in->m->conn.fd >= 0)
            shutdown(in->m->conn.fd, SHUT_RD);
        pthread_mutex_unlock(&in->m->conn_lock);
        uffd_release(pci->uffd);
    }
    pthread_mutex_lock(&pci->lock);
    pci->main_done = true;
    pci->main_failed = main_ret < 0;
    pthread_cond_broadcast(&pci->cond);
    pthread_mutex_unlock(&pci->lock);
    pthread_join(pci->listen, NULL);
    pci->listen_started = false;
    pci_close_preempt(in);
    *after_run = atomic_load(&pci->state) == PCI_RUNNING;
    if (atomic_load(&pci->preempt_failed) && pci->first_failure == PCI_FAIL_PREEMPT) {
        *err = pci->preempt_err;        /* the cause; the main stream's end is its echo */
        return err->code ? err->code : -EIO;
    }
    if (main_ret < 0) {
        int code = lm_stream_error(in->s);

        return error_set(err, code ? code : -EIO, "%s", lm_stream_error_msg(in->s));
    }
    if (pci->listen_ret != LOADVM_EOF) {
        *err = pci->listen_err;
        return err->code ? err->code : -EIO;
    }
    uffd_get_stats(pci->uffd, &pci->final);
    uffd_close(pci->uffd);      /* every page is here: ordinary memory again */
    pci->uffd = NULL;
    return 0;
}

lm_stream *postcopy_in_stream(incoming *in)
{
    return in->pci && in->pci->listen_s ? in->pci->listen_s : in->s;
}

/* The microsecond value at fraction q of the samples, interpolated inside
 * its power-of-two bucket. */
static uint64_t pci_quantile(const uint64_t *dist, uint64_t count, double q)
{
    double target = q * (double)count, cum = 0;

    for (int k = 0; k < UFFD_LAT_BUCKETS; k++) {
        double lo = k ? (double)(1ull << k) : 0, hi = (double)(2ull << k);

        if (dist[k] && cum + (double)dist[k] >= target)
            return (uint64_t)(lo + (hi - lo) * (target - cum) / (double)dist[k]);
        cum += (double)dist[k];
    }
    return 0;
}

void postcopy_in_stats(incoming *in, lm_stats *st)
{
    postcopy_in *pci = in->pci;
    uffd_stats u;

    if (!pci)
        return;
    if (pci->uffd)
        uffd_get_stats(pci->uffd, &u);
    else
        u = pci->final;
    st->postcopy_requests = u.requests;
    st->postcopy_faults = u.lat_count;
    st->postcopy_latency_us = u.lat_count ? u.lat_sum_ns / u.lat_count / 1000 : 0;
    st->postcopy_latency_max_us = u.lat_max_ns / 1000;
    st->postcopy_latency_p50_us = pci_quantile(u.lat_dist, u.lat_count, 0.50);
    st->postcopy_latency_p99_us = pci_quantile(u.lat_dist, u.lat_count, 0.99);
    st->postcopy_blocktime_ms = u.lat_sum_ns / 1000000;
    memcpy(st->postcopy_latency_dist, u.lat_dist, sizeof(st->postcopy_latency_dist));
    st->postcopy_nvcpus = u.nvcpus;
    for (int v = 0; v < u.nvcpus; v++)
        st->postcopy_vcpu_blocktime_ms[v] = u.vcpu_blocktime_ns[v] / 1000000;
}

void postcopy_in_free(incoming *in)
{
    postcopy_in *pci = in->pci;

    if (!pci)
        return;
    assert(!pci->listen_started);
    pci_close_preempt(in);
    uffd_close(pci->uffd);
    stream_free(pci->preempt_s);
    stream_free(pci->listen_s);
    free(pci->lv_listen);
    pthread_mutex_destroy(&pci->lock);
    pthread_cond_destroy(&pci->cond);
    free(pci);
    in->pci = NULL;
}
