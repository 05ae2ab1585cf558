/*
 * The migration context: registration, state machine, listeners, queries,
 * and starting / cancelling / joining the migration thread.  The work itself
 * is in precopy.c (source) and incoming.c (destination); see migration.h for
 * who owns what and how waits are interrupted.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "mappedram/mappedram.h"
#include "migration/migration.h"
#include "util/error.h"
#include "util/time.h"

static const char *const status_names[] = {
    [LM_STATUS_NONE] = "none",
    [LM_STATUS_SETUP] = "setup",
    [LM_STATUS_ACTIVE] = "active",
    [LM_STATUS_DEVICE] = "device",
    [LM_STATUS_COMPLETED] = "completed",
    [LM_STATUS_FAILED] = "failed",
    [LM_STATUS_CANCELLING] = "cancelling",
    [LM_STATUS_CANCELLED] = "cancelled",
};

static const char *const runstate_names[] = {
    [LM_RUN_PRELAUNCH] = "prelaunch",
    [LM_RUN_INMIGRATE] = "inmigrate",
    [LM_RUN_RUNNING] = "running",
    [LM_RUN_PAUSED] = "paused",
    [LM_RUN_FINISH_MIGRATE] = "finish-migrate",
    [LM_RUN_POSTMIGRATE] = "postmigrate",
};

const char *lm_status_name(lm_status s)
{
    return (unsigned)s < sizeof(status_names) / sizeof(status_names[0]) ? status_names[s]
                                                                        : "unknown";
}

const char *lm_runstate_name(lm_runstate s)
{
    return (unsigned)s < sizeof(runstate_names) / sizeof(runstate_names[0])
               ? runstate_names[s] : "unknown";
}

static bool status_final(lm_status s)
{
    return s == LM_STATUS_NONE || s == LM_STATUS_COMPLETED || s == LM_STATUS_FAILED ||
           s == LM_STATUS_CANCELLED;
}

lm_mig *lm_new(void)
{
    lm_mig *m = calloc(1, sizeof(*m));
    pthread_condattr_t ca;

    if (!m)
        abort();
    pthread_mutex_init(&m->lock, NULL);
    pthread_mutex_init(&m->conn_lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&m->cond, &ca);
    pthread_condattr_destroy(&ca);
    params_init(&m->params);
    m->runstate = LM_RUN_PRELAUNCH;
    m->autostart = true;
    m->conn.fd = -1;
    m->listen.fd = -1;
    m->cancel_fd = -1;
    snprintf(m->tracker_req, sizeof(m->tracker_req), "auto");
    return m;
}

/* Join a finished (or finishing) thread.  Caller does not hold the lock. */
static void mig_join(lm_mig *m)
{
    bool running;

    pthread_mutex_lock(&m->lock);
    running = m->thread_running;
    m->thread_running = false;
    pthread_mutex_unlock(&m->lock);
    if (running)
        pthread_join(m->thread, NULL);
    if (m->cancel_fd >= 0) {
        close(m->cancel_fd);
        m->cancel_fd = -1;
    }
}

void lm_free(lm_mig *m)
{
    if (!m)
        return;
    lm_cancel(m, NULL);
    /* Also wake a thread that finished its migration but still drains or
     * waits on its connection (the destination after SHUT). */
    mig_kick(m);
    mig_join(m);
    if (m->dirty)
        lm_dirty_free(m->dirty);
    ram_save_finish(&m->ram);
    ram_load_finish(&m->ram);
    pthread_mutex_destroy(&m->lock);
    pthread_mutex_destroy(&m->conn_lock);
    pthread_cond_destroy(&m->cond);
    free(m);
}

/* ------------------------------------------------------------ guest */

void lm_set_vm_ops(lm_mig *m, const lm_vm_ops *ops, void *opaque)
{
    m->vm = *ops;
    m->vm_opaque = opaque;
}

lm_runstate lm_runstate_get(lm_mig *m)
{
    lm_runstate r;

    pthread_mutex_lock(&m->lock);
    r = m->runstate;
    pthread_mutex_unlock(&m->lock);
    return r;
}

/* A thread finished calling its listener snapshot (see lm_remove_listener). */
static void mig_listeners_done(lm_mig *m)
{
    pthread_mutex_lock(&m->lock);
    if (--m->listener_calls == 0)
        pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
}

/* Called with m->lock held, just after m->runstate changed to r: tells the
 * listeners, and returns with the lock released. */
static void mig_runstate_changed_unlock(lm_mig *m, lm_runstate r)
{
    lm_listeners ls = m->listeners;

    m->listener_calls++;
    pthread_mutex_unlock(&m->lock);
    for (int i = 0; i < ls.n; i++)
        if (ls.l[i].runstate_changed)
            ls.l[i].runstate_changed(ls.opaque[i], r);
    mig_listeners_done(m);
}

void mig_set_runstate(lm_mig *m, lm_runstate r)
{
    pthread_mutex_lock(&m->lock);
    if (m->runstate == r) {
        pthread_mutex_unlock(&m->lock);
        return;
    }
    m->runstate = r;
    mig_runstate_changed_unlock(m, r);
}

void lm_runstate_set_running(lm_mig *m)
{
    mig_set_runstate(m, LM_RUN_RUNNING);
}

void lm_runstate_set_inmigrate(lm_mig *m)
{
    mig_set_runstate(m, LM_RUN_INMIGRATE);
}

/*
 * stop / cont as QEMU's qmp_stop / qmp_cont.  On a destination that is
 * waiting for or loading a migration (inmigrate) they only decide whether the
 * guest starts once the stream has arrived (QEMU's autostart): `stop` there
 * means "leave it paused", `cont` "start it".  The guest itself never runs
 * before the whole stream is in.
 */
int lm_vm_stop(lm_mig *m, lm_error *err)
{
    lm_runstate r;

    (void)err;
    pthread_mutex_lock(&m->lock);
    r = m->runstate;
    if (r == LM_RUN_INMIGRATE)
        m->autostart = false;
    pthread_mutex_unlock(&m->lock);
    if (r != LM_RUN_RUNNING)
        return 0;
    if (m->vm.stop)
        m->vm.stop(m->vm_opaque);
    mig_set_runstate(m, LM_RUN_PAUSED);
    return 0;
}

int lm_vm_start(lm_mig *m, lm_error *err)
{
    lm_runstate r;

    pthread_mutex_lock(&m->lock);
    r = m->runstate;
    if (r == LM_RUN_INMIGRATE)
        m->autostart = true;
    if (r == LM_RUN_RUNNING || r == LM_RUN_INMIGRATE) {
        pthread_mutex_unlock(&m->lock);
        return 0;
    }
    if (r == LM_RUN_FINISH_MIGRATE) {
        pthread_mutex_unlock(&m->lock);
        return lm_error_set(err, -EBUSY, "Guest is being switched over");
    }
    /* Running from here, before ops->start returns: a concurrent
     * lm_incoming (which takes only a guest that never ran) sees it. */
    m->runstate = LM_RUN_RUNNING;
    pthread_mutex_unlock(&m->lock);
    if (m->vm.start)
        m->vm.start(m->vm_opaque);
    pthread_mutex_lock(&m->lock);
    mig_runstate_changed_unlock(m, LM_RUN_RUNNING);
    return 0;
}

/* ------------------------------------------------------------ registration */

static bool mig_idle(lm_mig *m)
{
    bool idle;

    pthread_mutex_lock(&m->lock);
    idle = status_final(m->status) && !m->thread_running;
    pthread_mutex_unlock(&m->lock);
    return idle;
}

int lm_ram_register(lm_mig *m, const char *idstr, void *host, uint64_t length,
                    uint64_t page_size, lm_error *err)
{
    if (m->dirty || !mig_idle(m))
        return lm_error_set(err, -EBUSY, "RAM blocks must be registered before the first "
                            "migration");
    return ram_register(&m->ram, idstr, host, length, page_size, err);
}

int lm_ram_find(lm_mig *m, const char *idstr)
{
    return ram_find(&m->ram, idstr);
}

void lm_ram_mark_dirty_idx(lm_mig *m, int block, uint64_t offset, uint64_t len)
{
    lm_dirty *d = atomic_load_explicit(&m->dirty, memory_order_acquire);

    if (d && block >= 0 && block < m->ram.nblocks)
        lm_dirty_mark(d, block, offset, len);
}

void lm_ram_mark_dirty(lm_mig *m, const char *idstr, uint64_t offset, uint64_t len)
{
    lm_ram_mark_dirty_idx(m, ram_find(&m->ram, idstr), offset, len);
}

int lm_set_dirty_tracker(lm_mig *m, const char *name, lm_error *err)
{
    if (strcmp(name, "auto") && strcmp(name, "uffd-wp") && strcmp(name, "cooperative"))
        return lm_error_set(err, -EINVAL, "unknown dirty tracker '%s' (expected auto, "
                            "uffd-wp or cooperative)", name);
    if (m->dirty)
        return lm_error_set(err, -EBUSY, "the dirty tracker is chosen already");
    snprintf(m->tracker_req, sizeof(m->tracker_req), "%s", name);
    return 0;
}

const char *lm_dirty_tracker_name(lm_mig *m)
{
    lm_dirty *d = atomic_load(&m->dirty);
    return d ? lm_dirty_name(d) : m->tracker_req;
}

/* The tracker is created once, at the first migration, and kept: the
 * program may be marking pages through it at any time. */
static int mig_dirty_get(lm_mig *m, lm_error *err)
{
    lm_dirty_region regs[LM_RAM_MAX_BLOCKS];
    lm_dirty *d;

    if (m->dirty)
        return 0;
    for (int i = 0; i < m->ram.nblocks; i++) {
        regs[i].host = m->ram.blocks[i].host;
        regs[i].length = m->ram.blocks[i].length;
        regs[i].page_size = LM_PAGE_SIZE;
    }
    d = lm_dirty_new(m->tracker_req, regs, m->ram.nblocks, err);
    if (!d)
        return err && err->code ? err->code : -EINVAL;
    atomic_store_explicit(&m->dirty, d, memory_order_release);
    return 0;
}

int lm_device_register(lm_mig *m, const char *idstr, uint32_t instance, uint32_t version,
                       const lm_device_ops *ops, void *opaque, lm_error *err)
{
    lm_device *d;

    if (!mig_idle(m))
        return lm_error_set(err, -EBUSY, "devices must be registered while no migration runs");
    if (!idstr || !*idstr || strlen(idstr) > 255 || !strcmp(idstr, "ram"))
        return lm_error_set(err, -EINVAL, "bad device id '%s'", idstr ? idstr : "");
    if (!ops || !ops->save || !ops->load || version == 0)
        return lm_error_set(err, -EINVAL, "device '%s': save, load and a version >= 1 "
                            "are required", idstr);
    for (int i = 0; i < m->ndevices; i++)
        if (!strcmp(m->devices[i].idstr, idstr) && m->devices[i].instance == instance)
            return lm_error_set(err, -EEXIST, "device '%s' instance %u already registered",
                                idstr, instance);
    if (m->ndevices == LM_MAX_DEVICES)
        return lm_error_set(err, -ENOSPC, "too many devices (max %d)", LM_MAX_DEVICES);
    d = &m->devices[m->ndevices++];
    snprintf(d->idstr, sizeof(d->idstr), "%s", idstr);
    d->instance = instance;
    d->version = version;
    d->ops = *ops;
    d->opaque = opaque;
    d->section_id = (uint32_t)m->ndevices + 1;   /* "ram" is section 1 */
    return 0;
}

int lm_add_listener(lm_mig *m, const lm_listener *l, void *opaque)
{
    int ret = 0;

    pthread_mutex_lock(&m->lock);
    if (m->listeners.n == LM_MAX_LISTENERS) {
        ret = -ENOSPC;
    } else {
        m->listeners.l[m->listeners.n] = *l;
        m->listeners.opaque[m->listeners.n] = opaque;
        m->listeners.n++;
    }
    pthread_mutex_unlock(&m->lock);
    return ret;
}

int lm_remove_listener(lm_mig *m, const lm_listener *l, void *opaque)
{
    int ret = -ENOENT;

    pthread_mutex_lock(&m->lock);
    for (int i = 0; i < m->listeners.n; i++) {
        if (m->listeners.opaque[i] != opaque ||
            m->listeners.l[i].status_changed != l->status_changed ||
            m->listeners.l[i].runstate_changed != l->runstate_changed ||
            m->listeners.l[i].notice != l->notice)
            continue;
        for (int j = i + 1; j < m->listeners.n; j++) {
            m->listeners.l[j - 1] = m->listeners.l[j];
            m->listeners.opaque[j - 1] = m->listeners.opaque[j];
        }
        m->listeners.n--;
        ret = 0;
        break;
    }
    /* Snapshots taken before the removal may still call it: wait them out. */
    while (m->listener_calls > 0)
        pthread_cond_wait(&m->cond, &m->lock);
    pthread_mutex_unlock(&m->lock);
    return ret;
}

/* ------------------------------------------------------------ state */

void mig_set_status(lm_mig *m, lm_status s)
{
    lm_listeners ls;

    pthread_mutex_lock(&m->lock);
    if (m->status == s) {
        pthread_mutex_unlock(&m->lock);
        return;
    }
    m->status = s;
    m->stats.status = s;
    if (status_final(s))
        m->stats.total_time = lm_now_ms() - m->start_ms;
    pthread_cond_broadcast(&m->cond);
    ls = m->listeners;
    m->listener_calls++;
    pthread_mutex_unlock(&m->lock);
    for (int i = 0; i < ls.n; i++)
        if (ls.l[i].status_changed)
            ls.l[i].status_changed(ls.opaque[i], s);
    mig_listeners_done(m);
}

void mig_notice(lm_mig *m, const char *name, const char *detail)
{
    lm_listeners ls;

    pthread_mutex_lock(&m->lock);
    ls = m->listeners;
    m->listener_calls++;
    pthread_mutex_unlock(&m->lock);
    for (int i = 0; i < ls.n; i++)
        if (ls.l[i].notice)
            ls.l[i].notice(ls.opaque[i], name, detail);
    mig_listeners_done(m);
}

void mig_set_error(lm_mig *m, const lm_error *err)
{
    pthread_mutex_lock(&m->lock);
    if (!m->error.code) {
        m->error = *err;
        if (!m->error.code)
            m->error.code = -EIO;
        snprintf(m->stats.error_desc, sizeof(m->stats.error_desc), "%s", err->msg);
    } else {
        lm_log("later error (first one is kept): %s", err->msg);
    }
    pthread_mutex_unlock(&m->lock);
}

void mig_replace_error(lm_mig *m, const lm_error *err)
{
    pthread_mutex_lock(&m->lock);
    m->error = *err;
    if (!m->error.code)
        m->error.code = -EIO;
    snprintf(m->stats.error_desc, sizeof(m->stats.error_desc), "%s", err->msg);
    pthread_mutex_unlock(&m->lock);
}

void mig_kick(lm_mig *m)
{
    uint64_t one = 1;

    atomic_store(&m->cancel, true);
    if (m->cancel_fd >= 0 && write(m->cancel_fd, &one, sizeof(one)) < 0) {
        /* an eventfd write only fails on overflow, which means it is readable */
    }
    pthread_mutex_lock(&m->conn_lock);
    lm_conn_shutdown(&m->conn);
    /* A file cannot be shut down: wake the mapped-ram I/O waits instead
     * (mig_set_mapped publishes the pointer under conn_lock). */
    mapped_ram_interrupt(m->mapped);
    pthread_mutex_unlock(&m->conn_lock);
}

void mig_set_mapped(lm_mig *m, struct lm_mapped_ram *mr)
{
    pthread_mutex_lock(&m->conn_lock);
    m->mapped = mr;
    /* A cancel that came first set m->cancel before it took conn_lock. */
    if (mr && mig_cancelled(m))
        mapped_ram_interrupt(mr);
    pthread_mutex_unlock(&m->conn_lock);
}

void mig_fail(void *opaque, const lm_error *err)
{
    lm_mig *m = opaque;

    mig_set_error(m, err);
    mig_kick(m);
}

bool mig_has_error(lm_mig *m)
{
    bool has;

    pthread_mutex_lock(&m->lock);
    has = m->error.code != 0;
    pthread_mutex_unlock(&m->lock);
    return has;
}

bool mig_user_cancelled(lm_mig *m)
{
    bool c;

    pthread_mutex_lock(&m->lock);
    c = m->user_cancel;
    pthread_mutex_unlock(&m->lock);
    return c;
}

bool mig_cancelled(lm_mig *m)
{
    return atomic_load(&m->cancel);
}

void mig_conn_close(lm_mig *m, lm_error *err)
{
    pthread_mutex_lock(&m->conn_lock);
    lm_conn_close(&m->conn, err);
    pthread_mutex_unlock(&m->conn_lock);
}

void mig_publish(lm_mig *m, const lm_stats *st)
{
    pthread_mutex_lock(&m->lock);
    lm_status status = m->stats.status;
    char err[LM_ERROR_MAX], addr[sizeof(st->socket_address)];
    int64_t total_time = m->stats.total_time;

    memcpy(err, m->stats.error_desc, sizeof(err));
    memcpy(addr, m->stats.socket_address, sizeof(addr));
    m->stats = *st;
    m->stats.status = status;
    m->stats.total_time = status_final(status) ? total_time : lm_now_ms() - m->start_ms;
    memcpy(m->stats.error_desc, err, sizeof(err));
    memcpy(m->stats.socket_address, addr, sizeof(addr));
    m->stats.incoming = m->incoming;
    pthread_mutex_unlock(&m->lock);
}

lm_params mig_params(lm_mig *m)
{
    lm_params p;

    pthread_mutex_lock(&m->lock);
    p = m->params;
    pthread_mutex_unlock(&m->lock);
    return p;
}

bool mig_cap(lm_mig *m, enum lm_cap c)
{
    bool on;

    pthread_mutex_lock(&m->lock);
    on = m->caps[c];
    pthread_mutex_unlock(&m->lock);
    return on;
}

void lm_query(lm_mig *m, lm_stats *st)
{
    pthread_mutex_lock(&m->lock);
    *st = m->stats;
    st->status = m->status;
    if (!status_final(m->status))
        st->total_time = lm_now_ms() - m->start_ms;
    pthread_mutex_unlock(&m->lock);
    snprintf(st->dirty_tracker, sizeof(st->dirty_tracker), "%s", lm_dirty_tracker_name(m));
    st->total = m->ram.total;
    st->page_size = LM_PAGE_SIZE;
}

lm_status lm_wait(lm_mig *m, int timeout_ms)
{
    struct timespec dl = lm_deadline_ms(timeout_ms < 0 ? 0 : timeout_ms);
    lm_status s;
    bool done;

    pthread_mutex_lock(&m->lock);
    while (!status_final(m->status)) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&m->cond, &m->lock);
        } else if (pthread_cond_timedwait(&m->cond, &m->lock, &dl) == ETIMEDOUT) {
            break;
        }
    }
    s = m->status;
    done = status_final(s);
    pthread_mutex_unlock(&m->lock);
    (void)done;
    return s;
}

/* ------------------------------------------------------------ start / cancel */

/*
 * Which run states may start which direction, as QEMU decides it.  Only a
 * guest that never ran may receive a migration (QEMU: the process was
 * started with -incoming); a load into a guest that runs, or ran, would
 * overwrite live memory under its writers.  A destination that is waiting
 * for (or failed to receive) a migration has no guest to send.  The
 * destination's state is claimed (inmigrate) here, under the lock, so a
 * concurrent lm_vm_start cannot start the guest between check and load.
 */
static int mig_claim_runstate(lm_mig *m, bool incoming, lm_error *err)
{
    lm_runstate r;

    pthread_mutex_lock(&m->lock);
    r = m->runstate;
    if (incoming && r != LM_RUN_PRELAUNCH && r != LM_RUN_INMIGRATE) {
        pthread_mutex_unlock(&m->lock);
        return lm_error_set(err, -EBUSY, "cannot receive a migration: this guest is '%s' "
                            "(only a guest that never ran can be a destination; start the "
                            "program as one, e.g. with --incoming defer)",
                            lm_runstate_name(r));
    }
    if (!incoming && r == LM_RUN_INMIGRATE) {
        pthread_mutex_unlock(&m->lock);
        return lm_error_set(err, -EBUSY, "Guest is waiting for an incoming migration");
    }
    if (incoming && r == LM_RUN_PRELAUNCH) {
        m->runstate = LM_RUN_INMIGRATE;
        mig_runstate_changed_unlock(m, LM_RUN_INMIGRATE);
        return 0;
    }
    pthread_mutex_unlock(&m->lock);
    return 0;
}

static int mig_begin(lm_mig *m, const char *uri, bool incoming, lm_error *err)
{
    int ret;

    if (!mig_idle(m)) {
        pthread_mutex_lock(&m->lock);
        bool ended = status_final(m->status);
        pthread_mutex_unlock(&m->lock);
        if (!ended)
            return lm_error_set(err, -EBUSY, "There's a migration process in progress");
    }
    mig_join(m);
    if ((ret = mig_claim_runstate(m, incoming, err)))
        return ret;
    if (m->ram.nblocks == 0 && m->ndevices == 0)
        return lm_error_set(err, -EINVAL, "nothing to migrate: no RAM block or device "
                            "registered");
    ret = lm_uri_parse(uri, &m->uri, err);
    if (ret)
        return ret;
    if (!incoming && (ret = mig_dirty_get(m, err)))
        return ret;
    m->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (m->cancel_fd < 0)
        return lm_error_set_errno(err, -errno, "eventfd");
    atomic_store(&m->cancel, false);
    m->committed = false;
    m->user_cancel = false;

    pthread_mutex_lock(&m->lock);
    memset(&m->stats, 0, sizeof(m->stats));
    lm_error_clear(&m->error);
    m->incoming = incoming;
    m->stats.incoming = incoming;
    m->start_ms = lm_now_ms();
    pthread_mutex_unlock(&m->lock);
    return 0;
}

static int mig_spawn(lm_mig *m, void *(*fn)(void *), lm_error *err)
{
    sigset_t all, old;
    int ret;

    /* The thread must not take SIGPIPE for a dead exec: peer or similar;
     * it inherits this mask. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_mutex_lock(&m->lock);
    ret = pthread_create(&m->thread, NULL, fn, m);
    if (!ret)
        m->thread_running = true;
    pthread_mutex_unlock(&m->lock);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (ret)
        return lm_error_set(err, -ret, "cannot create the migration thread: %s", strerror(ret));
    return 0;
}

/* Capability / URI combinations refused before anything starts. */
static int mig_check_uri(lm_mig *m, const char *uri, lm_error *err)
{
    lm_uri u;
    int ret = lm_uri_parse(uri, &u, err);

    if (ret)
        return ret;
    lm_params p = mig_params(m);
    bool mapped = mig_cap(m, LM_CAP_MAPPED_RAM);

    if (mapped && u.kind != LM_URI_FILE)
        return lm_error_set(err, -EINVAL, "mapped-ram needs a file: URI, not '%s'", uri);
    if (mapped && p.multifd_compression)
        return lm_error_set(err, -EINVAL, "Cannot use compression with mapped-ram");
    if (mig_cap(m, LM_CAP_MULTIFD) && !mapped && u.kind != LM_URI_TCP && u.kind != LM_URI_UNIX)
        return lm_error_set(err, -EINVAL, "multifd needs a tcp: or unix: URI (or file: with "
                            "mapped-ram), not '%s'", uri);
    if (mig_cap(m, LM_CAP_COMPRESS) && (mapped || mig_cap(m, LM_CAP_MULTIFD)))
        return lm_error_set(err, -EINVAL, "the compress capability cannot be combined with "
                            "multifd or mapped-ram (use multifd-compression)");
    if (p.direct_io && !mapped)
        return lm_error_set(err, -EINVAL, "direct-io needs the mapped-ram capability");
    return 0;
}

int lm_migrate(lm_mig *m, const char *uri, lm_error *err)
{
    int ret = mig_check_uri(m, uri, err);

    if (ret || (ret = mig_begin(m, uri, false, err)))
        return ret;
    mig_set_status(m, LM_STATUS_SETUP);
    /* Connect here so "refused" / "bad address" reach the caller directly. */
    ret = lm_transport_connect(&m->uri, &m->conn, m->cancel_fd, 10000, err);
    if (ret) {
        mig_set_error(m, err);
        mig_set_status(m, LM_STATUS_FAILED);
        return ret;
    }
    ret = mig_spawn(m, precopy_thread, err);
    if (ret) {
        mig_conn_close(m, NULL);
        mig_set_error(m, err);
        mig_set_status(m, LM_STATUS_FAILED);
    }
    return ret;
}

int lm_incoming(lm_mig *m, const char *uri, lm_error *err)
{
    int ret = mig_check_uri(m, uri, err);

    if (ret || (ret = mig_begin(m, uri, true, err)))
        return ret;
    ret = lm_transport_listen(&m->uri, &m->listen, err);
    if (ret)
        return ret;
    pthread_mutex_lock(&m->lock);
    snprintf(m->stats.socket_address, sizeof(m->stats.socket_address), "%s",
             m->listen.address);
    pthread_mutex_unlock(&m->lock);
    mig_set_status(m, LM_STATUS_SETUP);
    ret = mig_spawn(m, incoming_thread, err);
    if (ret) {
        lm_transport_unlisten(&m->listen);
        mig_set_error(m, err);
        mig_set_status(m, LM_STATUS_FAILED);
    }
    return ret;
}

int lm_cancel(lm_mig *m, lm_error *err)
{
    bool active, committed;

    pthread_mutex_lock(&m->lock);
    active = !status_final(m->status);
    committed = m->committed;
    if (active && !committed) {
        atomic_store(&m->cancel, true);
        m->user_cancel = true;
    }
    pthread_mutex_unlock(&m->lock);
    if (!active)
        return 0;
    if (committed)
        return lm_error_set(err, -EBUSY, m->incoming
                            ? "too late to cancel: the whole stream arrived and the guest "
                              "is starting here"
                            : "too late to cancel: the destination has the whole "
                              "stream and may be running the guest");
    if (!m->incoming)
        mig_set_status(m, LM_STATUS_CANCELLING);
    mig_kick(m);
    return 0;
}

int64_t lm_parse_size(const char *s)
{
    char *end;
    unsigned long long v;
    int shift = 0;

    if (!s || !*s)
        return -1;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || end == s)
        return -1;
    switch (*end) {
    case 0: break;
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    default: return -1;
    }
    if (*end == 'i' && shift)
        end++;
    if ((*end == 'b' || *end == 'B') && shift)
        end++;
    if (*end)
        return -1;
    if (shift && v > (unsigned long long)(INT64_MAX >> shift))
        return -1;
    return (int64_t)(v << shift);
}
