/*
 * The migration context: registration, errors and interrupting waits,
 * queries, and starting / joining the migration thread.  The state machine
 * (statuses, run states, commit, cancel, listeners) is state.c; the work
 * itself is precopy.c (source) and incoming.c (destination); see
 * migration.h for who owns what and how waits are interrupted.
 */
#include <assert.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "migration/migration.h"
#include "cpr/cpr.h"
#include "util/error.h"
#include "util/time.h"




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
    m->tls_objects = tls_registry_new();
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
        dirty_free(m->dirty);
    ram_save_finish(&m->ram);
    ram_load_finish(&m->ram);
    cpr_release(&m->ram);
    tls_setup_release(&m->tls);
    tls_registry_free(m->tls_objects);
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

int lm_set_vcpu_threads(lm_mig *m, const int *tids, int n, lm_error *err)
{
    if (n < 0 || n > LM_MAX_VCPUS)
        return error_set(err, -EINVAL, "%d vCPU threads (at most %d)", n, LM_MAX_VCPUS);
    for (int i = 0; i < n; i++)
        if (tids[i] <= 0)
            return error_set(err, -EINVAL, "vCPU %d: thread id %d", i, tids[i]);
    pthread_mutex_lock(&m->lock);
    memcpy(m->vcpu_tids, tids, (size_t)n * sizeof(*tids));
    m->nvcpus = n;
    pthread_mutex_unlock(&m->lock);
    return 0;
}









/* ------------------------------------------------------------ registration */

static bool mig_idle(lm_mig *m)
{
    bool idle;

    pthread_mutex_lock(&m->lock);
    idle = mig_status_final(m->status) && !m->thread_running;
    pthread_mutex_unlock(&m->lock);
    return idle;
}

int lm_ram_register(lm_mig *m, const char *idstr, void *host, uint64_t length,
                    uint64_t page_size, lm_error *err)
{
    if (m->dirty || !mig_idle(m))
        return error_set(err, -EBUSY, "RAM blocks must be registered before the first "
                         "migration");
    return ram_register(&m->ram, idstr, host, length, page_size, err);
}

int lm_ram_register_fd(lm_mig *m, const char *idstr, void *host, uint64_t length,
                       uint64_t page_size, int fd, uint64_t offset, lm_error *err)
{
    int ret = lm_ram_register(m, idstr, host, length, page_size, err);

    if (ret)
        return ret;
    ret = cpr_register(&m->ram, m->ram.nblocks - 1, fd, offset, err);
    if (ret) {          /* not registered after all: the last one goes again */
        m->ram.nblocks--;
        m->ram.total -= length;
    }
    return ret;
}

int lm_ram_fd(lm_mig *m, const char *idstr, uint64_t *offset)
{
    int i = ram_find(&m->ram, idstr);

    if (i < 0 || m->ram.blocks[i].fd < 0)
        return -1;
    if (offset)
        *offset = m->ram.blocks[i].fd_offset;
    return m->ram.blocks[i].fd;
}

int lm_ram_find(lm_mig *m, const char *idstr)
{
    return ram_find(&m->ram, idstr);
}

void lm_ram_mark_dirty_idx(lm_mig *m, int block, uint64_t offset, uint64_t len)
{
    dirty_tracker *d = atomic_load_explicit(&m->dirty, memory_order_acquire);

    if (d && block >= 0 && block < m->ram.nblocks)
        dirty_mark(d, block, offset, len);
}

void lm_ram_mark_dirty(lm_mig *m, const char *idstr, uint64_t offset, uint64_t len)
{
    lm_ram_mark_dirty_idx(m, ram_find(&m->ram, idstr), offset, len);
}

int lm_set_dirty_tracker(lm_mig *m, const char *name, lm_error *err)
{
    if (strcmp(name, "auto") && strcmp(name, "uffd-wp") && strcmp(name, "cooperative"))
        return error_set(err, -EINVAL, "unknown dirty tracker '%s' (expected auto, "
                         "uffd-wp or cooperative)", name);
    if (m->dirty)
        return error_set(err, -EBUSY, "the dirty tracker is chosen already");
    snprintf(m->tracker_req, sizeof(m->tracker_req), "%s", name);
    m->tracker_has_ops = false;
    return 0;
}

int lm_set_dirty_tracker_ops(lm_mig *m, const char *name, const lm_dirty_tracker_ops *ops,
                             void *opaque, lm_error *err)
{
    size_t len = name ? strlen(name) : 0;

    if (len == 0 || len >= sizeof(m->tracker_req) ||
        strspn(name, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") != len)
        return error_set(err, -EINVAL, "dirty tracker name '%s' must be 1 to %zu bytes of "
                         "[A-Za-z0-9._-]", name ? name : "", sizeof(m->tracker_req) - 1);
    if (!strcmp(name, "auto") || !strcmp(name, "uffd-wp") || !strcmp(name, "cooperative"))
        return error_set(err, -EINVAL, "dirty tracker name '%s' is a built-in tracker's",
                         name);
    if (!ops || !ops->start || !ops->sync || !ops->stop)
        return error_set(err, -EINVAL, "dirty tracker '%s': start, sync and stop are "
                         "required", name);
    if (m->dirty)
        return error_set(err, -EBUSY, "the dirty tracker is chosen already");
    snprintf(m->tracker_req, sizeof(m->tracker_req), "%s", name);
    m->tracker_ops = *ops;
    m->tracker_opaque = opaque;
    m->tracker_has_ops = true;
    return 0;
}

const char *lm_dirty_tracker_name(lm_mig *m)
{
    dirty_tracker *d = atomic_load(&m->dirty);
    return d ? dirty_name(d) : m->tracker_req;
}

/* The tracker is created once, at the first migration, and kept: the
 * program may be marking pages through it at any time. */
static int mig_dirty_get(lm_mig *m, lm_error *err)
{
    dirty_region regs[RAM_MAX_BLOCKS];
    dirty_tracker *d;

    if (m->dirty)
        return 0;
    for (int i = 0; i < m->ram.nblocks; i++) {
        regs[i].host = m->ram.blocks[i].host;
        regs[i].length = m->ram.blocks[i].length;
        regs[i].page_size = RAM_PAGE_SIZE;
    }
    if (m->tracker_has_ops)
        d = dirty_new_ops(m->tracker_req, &m->tracker_ops, m->tracker_opaque, regs,
                          m->ram.nblocks, err);
    else
        d = dirty_new(m->tracker_req, regs, m->ram.nblocks, err);
    if (!d)
        return err && err->code ? err->code : -EINVAL;
    atomic_store_explicit(&m->dirty, d, memory_order_release);
    return 0;
}

int lm_device_register(lm_mig *m, const char *idstr, uint32_t instance, uint32_t version,
                       const lm_device_ops *ops, void *opaque, lm_error *err)
{
    mig_device *d;

    if (!mig_idle(m))
        return error_set(err, -EBUSY, "devices must be registered while no migration runs");
    if (!idstr || !*idstr || strlen(idstr) > 255 || !strcmp(idstr, "ram"))
        return error_set(err, -EINVAL, "bad device id '%s'", idstr ? idstr : "");
    if (!ops || !ops->save || !ops->load || version == 0)
        return error_set(err, -EINVAL, "device '%s': save, load and a version >= 1 "
                         "are required", idstr);
    for (int i = 0; i < m->ndevices; i++)
        if (!strcmp(m->devices[i].idstr, idstr) && m->devices[i].instance == instance)
            return error_set(err, -EEXIST, "device '%s' instance %u already registered",
                             idstr, instance);
    if (m->ndevices == MIG_MAX_DEVICES)
        return error_set(err, -ENOSPC, "too many devices (max %d)", MIG_MAX_DEVICES);
    d = &m->devices[m->ndevices++];
    snprintf(d->idstr, sizeof(d->idstr), "%s", idstr);
    d->instance = instance;
    d->version = version;
    d->ops = *ops;
    d->opaque = opaque;
    d->section_id = (uint32_t)m->ndevices + 1;   /* "ram" is section 1 */
    return 0;
}



/* ------------------------------------------------------------ state */



/* Under lock: keep err (a code of 0 becomes -EIO), unless one is kept and
 * `replace` is false; then it is only logged. */
static void error_keep_locked(lm_mig *m, const lm_error *err, bool replace)
{
    if (m->error.code && !replace) {
        util_log("later error (first one is kept): %s", err->msg);
        return;
    }
    m->error = *err;
    if (!m->error.code)
        m->error.code = -EIO;
    snprintf(m->stats.error_desc, sizeof(m->stats.error_desc), "%s", err->msg);
}

void mig_set_error(lm_mig *m, const lm_error *err)
{
    pthread_mutex_lock(&m->lock);
    error_keep_locked(m, err, false);
    pthread_mutex_unlock(&m->lock);
}

void mig_replace_error(lm_mig *m, const lm_error *err)
{
    pthread_mutex_lock(&m->lock);
    error_keep_locked(m, err, true);
    pthread_mutex_unlock(&m->lock);
}

/* What a shutdown does not reach: channels, pools, a file's I/O. */
static void helpers_interrupt_locked(lm_mig *m)
{
    for (int i = 0; i < MIG_MAX_HELPERS; i++)
        if (m->helpers[i].fn)
            m->helpers[i].fn(m->helpers[i].opaque);
}

void mig_kick(lm_mig *m)
{
    uint64_t one = 1;

    atomic_store(&m->cancel, true);
    if (m->cancel_fd >= 0 && write(m->cancel_fd, &one, sizeof(one)) < 0) {
        /* an eventfd write only fails on overflow, which means it is readable */
    }
    pthread_mutex_lock(&m->conn_lock);
    conn_shutdown(&m->conn);
    helpers_interrupt_locked(m);
    pthread_mutex_unlock(&m->conn_lock);
}

void mig_interrupt_helpers(lm_mig *m)
{
    pthread_mutex_lock(&m->conn_lock);
    helpers_interrupt_locked(m);
    pthread_mutex_unlock(&m->conn_lock);
}

void mig_helper_add(lm_mig *m, void (*fn)(void *), void *opaque)
{
    int i;

    pthread_mutex_lock(&m->conn_lock);
    for (i = 0; i < MIG_MAX_HELPERS && m->helpers[i].fn; i++)
        ;
    assert(i < MIG_MAX_HELPERS);    /* a migration runs at most one of each kind */
    if (i < MIG_MAX_HELPERS) {
        m->helpers[i].fn = fn;
        m->helpers[i].opaque = opaque;
    }
    /* A cancel that came first set m->cancel before it took conn_lock. */
    if (mig_cancelled(m))
        fn(opaque);
    pthread_mutex_unlock(&m->conn_lock);
}

void mig_helper_remove(lm_mig *m, void *opaque)
{
    pthread_mutex_lock(&m->conn_lock);
    for (int i = 0; i < MIG_MAX_HELPERS; i++)
        if (m->helpers[i].fn && m->helpers[i].opaque == opaque)
            m->helpers[i].fn = NULL;
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
    /* Only its owner, the migration thread, closes the connection (others
     * shut it down); its helpers are gone by then. */
    for (int i = 0; i < MIG_MAX_HELPERS; i++)
        assert(!m->helpers[i].fn);
    pthread_mutex_lock(&m->conn_lock);
    conn_close(&m->conn, err);
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
    m->stats.total_time = mig_status_final(status) ? total_time : time_now_ms() - m->start_ms;
    memcpy(m->stats.error_desc, err, sizeof(err));
    memcpy(m->stats.socket_address, addr, sizeof(addr));
    m->stats.incoming = m->incoming;
    pthread_mutex_unlock(&m->lock);
}

mig_paramset mig_params(lm_mig *m)
{
    mig_paramset p;

    pthread_mutex_lock(&m->lock);
    p = m->params;
    pthread_mutex_unlock(&m->lock);
    return p;
}

bool mig_cap(lm_mig *m, enum mig_capability c)
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
    if (!mig_status_final(m->status))
        st->total_time = time_now_ms() - m->start_ms;
    pthread_mutex_unlock(&m->lock);
    snprintf(st->dirty_tracker, sizeof(st->dirty_tracker), "%s", lm_dirty_tracker_name(m));
    st->total = m->ram.total;
    st->page_size = RAM_PAGE_SIZE;
}


/* ------------------------------------------------------------ start / cancel */


/* The mode's checks (src/cpr/): which blocks stay in place, what is refused. */
static int mig_check_cpr(lm_mig *m, const char *uri, bool incoming, lm_error *err)
{
    transport_uri u;
    cpr_config c = { .mode = (cpr_mode)mig_params(m).mode, .incoming = incoming,
                     .ignore_shared = mig_cap(m, MIG_CAP_IGNORE_SHARED) };
    int ret = transport_uri_parse(uri, &u, err);

    if (ret)
        return ret;
    c.uri_kind = u.kind;
    if (mig_cap(m, MIG_CAP_MULTIFD))
        c.conflict = "multifd";
    else if (mig_cap(m, MIG_CAP_MAPPED_RAM))
        c.conflict = "mapped-ram";
    else if (mig_cap(m, MIG_CAP_COMPRESS))
        c.conflict = "compress";
    else if (mig_cap(m, MIG_CAP_POSTCOPY_RAM))
        c.conflict = "postcopy-ram";    /* QEMU: not compatible with ignore-shared */
    return cpr_check(&m->ram, &c, err);
}

static int mig_begin(lm_mig *m, const char *uri, bool incoming, lm_error *err)
{
    int ret;

    if (!mig_idle(m)) {
        pthread_mutex_lock(&m->lock);
        bool ended = mig_status_final(m->status);
        pthread_mutex_unlock(&m->lock);
        if (!ended)
            return error_set(err, -EBUSY, "There's a migration process in progress");
    }
    mig_join(m);
    /* idle and joined: nothing reads the blocks' CPR flags while they are set */
    if ((ret = mig_check_cpr(m, uri, incoming, err)))
        return ret;
    if ((ret = mig_claim_runstate(m, incoming, err)))
        return ret;
    if (m->ram.nblocks == 0 && m->ndevices == 0)
        return error_set(err, -EINVAL, "nothing to migrate: no RAM block or device "
                         "registered");
    ret = transport_uri_parse(uri, &m->uri, err);
    if (ret)
        return ret;
    m->uri.link_timeout_ms = (int)mig_params(m).link_timeout;
    if (!incoming && (ret = mig_dirty_get(m, err)))
        return ret;
    m->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (m->cancel_fd < 0)
        return error_set_errno(err, -errno, "eventfd");
    atomic_store(&m->cancel, false);
    atomic_store(&m->postcopy_start, false);
    m->committed = false;
    m->user_cancel = false;

    pthread_mutex_lock(&m->lock);
    memset(&m->stats, 0, sizeof(m->stats));
    error_clear(&m->error);
    m->incoming = incoming;
    m->stats.incoming = incoming;
    m->start_ms = time_now_ms();
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
        return error_set(err, -ret, "cannot create the migration thread: %s", strerror(ret));
    return 0;
}

/* The tls-* parameters, resolved once for this migration (src/tls/tls.h). */
static int mig_tls_resolve(lm_mig *m, bool incoming, lm_error *err)
{
    mig_paramset p = mig_params(m);
    const char *not_socket = m->uri.kind == URI_EXEC ? "exec:"
                           : m->uri.kind == URI_FILE ? "file:" : NULL;

    tls_setup_release(&m->tls);
    return tls_setup_resolve(m->tls_objects, p.tls_creds, p.tls_hostname, p.tls_authz,
                             incoming ? LM_TLS_SERVER : LM_TLS_CLIENT, not_socket,
                             m->uri.kind == URI_TCP ? m->uri.host : NULL, &m->tls, err);
}

/* Capability / URI combinations refused before anything starts. */
static int mig_check_uri(lm_mig *m, const char *uri, lm_error *err)
{
    transport_uri u;
    int ret = transport_uri_parse(uri, &u, err);

    if (ret)
        return ret;
    mig_paramset p = mig_params(m);
    bool mapped = mig_cap(m, MIG_CAP_MAPPED_RAM);

    if (mapped && u.kind != URI_FILE)
        return error_set(err, -EINVAL, "mapped-ram needs a file: URI, not '%s'", uri);
    if (mapped && p.multifd_compression)
        return error_set(err, -EINVAL, "Cannot use compression with mapped-ram");
    if (mig_cap(m, MIG_CAP_MULTIFD) && !mapped && u.kind != URI_TCP && u.kind != URI_UNIX)
        return error_set(err, -EINVAL, "multifd needs a tcp: or unix: URI (or file: with "
                         "mapped-ram), not '%s'", uri);
    if (mig_cap(m, MIG_CAP_COMPRESS) && (mapped || mig_cap(m, MIG_CAP_MULTIFD)))
        return error_set(err, -EINVAL, "the compress capability cannot be combined with "
                         "multifd or mapped-ram (use multifd-compression)");
    if (p.direct_io && !mapped)
        return error_set(err, -EINVAL, "direct-io needs the mapped-ram capability");
    /* Page checksums travel in page records, multifd packets, postcopy's
     * channels and mapped-ram's tables; COMPRESS_PAGE records carry none. */
    if (mig_cap(m, MIG_CAP_INTEGRITY) && mig_cap(m, MIG_CAP_COMPRESS))
        return error_set(err, -EINVAL, "x-integrity cannot be combined with the compress "
                         "capability yet");
    if (mig_cap(m, MIG_CAP_POSTCOPY_RAM) &&
        (mapped || mig_cap(m, MIG_CAP_COMPRESS)))
        return error_set(err, -EINVAL, "postcopy-ram cannot be combined with %s",
                         mapped ? "mapped-ram" : "the compress capability");
    if (mig_cap(m, MIG_CAP_POSTCOPY_RAM) && u.kind != URI_TCP && u.kind != URI_UNIX &&
        u.kind != URI_FD)
        return error_set(err, -EINVAL, "postcopy-ram needs a return path: a tcp:, unix: or "
                         "fd: (socket) URI, not '%s'", uri);
    if (mig_cap(m, MIG_CAP_POSTCOPY_PREEMPT) && !mig_cap(m, MIG_CAP_POSTCOPY_RAM))
        return error_set(err, -EINVAL, "Postcopy preempt requires postcopy-ram");
    if (mig_cap(m, MIG_CAP_POSTCOPY_PREEMPT) && u.kind == URI_FD)
        return error_set(err, -EINVAL, "postcopy-preempt needs a second connection: a tcp: "
                         "or unix: URI, not '%s'", uri);
    return 0;
}

int lm_migrate_start_postcopy(lm_mig *m, lm_error *err)
{
    int ret = 0;

    pthread_mutex_lock(&m->lock);
    if (!m->caps[MIG_CAP_POSTCOPY_RAM])
        ret = error_set(err, -EINVAL, "Enable postcopy with migrate_set_capability before "
                        "the start of migration");
    else if (m->incoming || (m->status != LM_STATUS_SETUP && m->status != LM_STATUS_ACTIVE))
        ret = error_set(err, -EBUSY, "Postcopy must be started after migration has been "
                        "started");
    else
        atomic_store(&m->postcopy_start, true);
    pthread_mutex_unlock(&m->lock);
    return ret;
}

int lm_migrate(lm_mig *m, const char *uri, lm_error *err)
{
    int ret = mig_check_uri(m, uri, err);

    if (ret || (ret = mig_begin(m, uri, false, err)))
        return ret;
    mig_set_status(m, LM_STATUS_SETUP);
    /* Connect here so "refused" / "bad address" reach the caller directly;
     * the TLS handshake is the migration thread's (it may take a while). */
    ret = mig_tls_resolve(m, false, err);
    if (!ret)
        ret = transport_connect(&m->uri, &m->conn, m->cancel_fd, 10000, err);
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
    if ((ret = mig_tls_resolve(m, true, err)))
        return ret;
    ret = transport_listen(&m->uri, &m->listen, err);
    if (ret)
        return ret;
    pthread_mutex_lock(&m->lock);
    snprintf(m->stats.socket_address, sizeof(m->stats.socket_address), "%s",
             m->listen.address);
    pthread_mutex_unlock(&m->lock);
    mig_set_status(m, LM_STATUS_SETUP);
    ret = mig_spawn(m, incoming_thread, err);
    if (ret) {
        transport_unlisten(&m->listen);
        mig_set_error(m, err);
        mig_set_status(m, LM_STATUS_FAILED);
    }
    return ret;
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
