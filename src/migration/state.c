/*
 * The state machine of a migration endpoint: its status (QEMU's
 * MigrationStatus) and the guest's run state, which moves between them are
 * legal and from which thread, and the listeners told of each change.
 *
 * Everything that changes either state goes through mig_set_status() or
 * mig_set_runstate(), which check the move against the tables below under
 * m->lock (an illegal move is a bug: an assertion in debug builds; in a
 * release build it is logged and refused).  Three rules are kept in one
 * place each, here:
 *
 *   commit   mig_commit(): the point after which the other side may run the
 *            guest.  Exclusive with lm_cancel() under m->lock: whichever
 *            comes first wins, so a cancelled migration never commits and a
 *            committed one is never cancelled.
 *   cancel   lm_cancel(): refused after the commit point; otherwise sets the
 *            cancel flag and interrupts every wait (mig_kick, migration.c).
 *   claim    mig_claim_runstate(): which run state may start which direction
 *            (only a guest that never ran may receive a migration).
 *
 * A move that loses a race with a cancel (the thread's ACTIVE -> DEVICE
 * after lm_cancel set CANCELLING) is not made and not an error: the thread
 * sees the cancel flag at its next check and ends CANCELLED.
 *
 * Restoring the guest after a failure is the source's alone
 * (precopy.c, pc_restore_guest); the destination never starts a guest on
 * failure (incoming.c has one path that starts it, after mig_commit).
 */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

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
    [LM_STATUS_POSTCOPY_DEVICE] = "postcopy-device",
    [LM_STATUS_POSTCOPY_ACTIVE] = "postcopy-active",
};

static const char *const runstate_names[] = {
    [LM_RUN_PRELAUNCH] = "prelaunch",
    [LM_RUN_INMIGRATE] = "inmigrate",
    [LM_RUN_RUNNING] = "running",
    [LM_RUN_PAUSED] = "paused",
    [LM_RUN_FINISH_MIGRATE] = "finish-migrate",
    [LM_RUN_POSTMIGRATE] = "postmigrate",
    [LM_RUN_INTERNAL_ERROR] = "internal-error",
};

#define NSTATUS ((int)(sizeof(status_names) / sizeof(status_names[0])))
#define NRUNSTATE ((int)(sizeof(runstate_names) / sizeof(runstate_names[0])))

/*
 * Who may make a move: CALLER is any thread of the program (lm_migrate,
 * lm_incoming, lm_cancel, stop / cont); THREAD is the migration's own thread
 * (precopy_thread on a source, incoming_thread on a destination), checked by
 * an assertion.  SRC / DST: on which side the move exists.
 */
enum { CALLER = 1, THREAD = 2, SRC = 4, DST = 8, BOTH = SRC | DST };

static const unsigned char status_moves[NSTATUS][NSTATUS] = {
    /* a new migration, on a context with none running */
    [LM_STATUS_NONE][LM_STATUS_SETUP] = CALLER | BOTH,
    [LM_STATUS_COMPLETED][LM_STATUS_SETUP] = CALLER | BOTH,
    [LM_STATUS_FAILED][LM_STATUS_SETUP] = CALLER | BOTH,
    [LM_STATUS_CANCELLED][LM_STATUS_SETUP] = CALLER | BOTH,
    /* connected / accepted: pages flow */
    [LM_STATUS_SETUP][LM_STATUS_ACTIVE] = THREAD | BOTH,
    /* the source stopped the guest: last pages and device state */
    [LM_STATUS_ACTIVE][LM_STATUS_DEVICE] = THREAD | SRC,
    /* the end */
    [LM_STATUS_ACTIVE][LM_STATUS_COMPLETED] = THREAD | DST,
    [LM_STATUS_DEVICE][LM_STATUS_COMPLETED] = THREAD | SRC,
    [LM_STATUS_SETUP][LM_STATUS_FAILED] = CALLER | THREAD | BOTH,
    [LM_STATUS_ACTIVE][LM_STATUS_FAILED] = THREAD | BOTH,
    [LM_STATUS_DEVICE][LM_STATUS_FAILED] = THREAD | SRC,
    [LM_STATUS_CANCELLING][LM_STATUS_FAILED] = THREAD | SRC,
    /* lm_cancel on a source, then its thread ends */
    [LM_STATUS_SETUP][LM_STATUS_CANCELLING] = CALLER | SRC,
    [LM_STATUS_ACTIVE][LM_STATUS_CANCELLING] = CALLER | SRC,
    [LM_STATUS_DEVICE][LM_STATUS_CANCELLING] = CALLER | SRC,
    [LM_STATUS_CANCELLING][LM_STATUS_CANCELLED] = THREAD | SRC,
    /* postcopy, source: the package sent (device state, RUN), then the
     * destination's confirmation that it loaded it (the commit point) */
    [LM_STATUS_DEVICE][LM_STATUS_POSTCOPY_DEVICE] = THREAD | SRC,
    [LM_STATUS_POSTCOPY_DEVICE][LM_STATUS_POSTCOPY_ACTIVE] = THREAD | SRC,
    [LM_STATUS_POSTCOPY_DEVICE][LM_STATUS_FAILED] = THREAD | SRC,
    [LM_STATUS_POSTCOPY_DEVICE][LM_STATUS_CANCELLING] = CALLER | SRC,
    /* postcopy, destination: LISTEN (the listen thread takes the stream) */
    [LM_STATUS_ACTIVE][LM_STATUS_POSTCOPY_ACTIVE] = THREAD | DST,
    [LM_STATUS_POSTCOPY_ACTIVE][LM_STATUS_COMPLETED] = THREAD | BOTH,
    [LM_STATUS_POSTCOPY_ACTIVE][LM_STATUS_FAILED] = THREAD | BOTH,
};

static const unsigned char runstate_moves[NRUNSTATE][NRUNSTATE] = {
    /* a context starts in prelaunch: the program says what it is */
    [LM_RUN_PRELAUNCH][LM_RUN_INMIGRATE] = CALLER | DST,
    [LM_RUN_PRELAUNCH][LM_RUN_RUNNING] = CALLER | BOTH,
    /* the destination's guest arrived: started, or left paused (autostart) */
    [LM_RUN_INMIGRATE][LM_RUN_RUNNING] = THREAD | DST,
    [LM_RUN_INMIGRATE][LM_RUN_PAUSED] = THREAD | DST,
    /* stop / cont */
    [LM_RUN_RUNNING][LM_RUN_PAUSED] = CALLER | BOTH,
    [LM_RUN_PAUSED][LM_RUN_RUNNING] = CALLER | BOTH,
    [LM_RUN_POSTMIGRATE][LM_RUN_RUNNING] = CALLER | SRC,
    /* switch-over, from whatever state the guest was in */
    [LM_RUN_PRELAUNCH][LM_RUN_FINISH_MIGRATE] = THREAD | SRC,
    [LM_RUN_RUNNING][LM_RUN_FINISH_MIGRATE] = THREAD | SRC,
    [LM_RUN_PAUSED][LM_RUN_FINISH_MIGRATE] = THREAD | SRC,
    [LM_RUN_POSTMIGRATE][LM_RUN_FINISH_MIGRATE] = THREAD | SRC,
    /* completed, or the outcome unknown: the guest stays stopped */
    [LM_RUN_FINISH_MIGRATE][LM_RUN_POSTMIGRATE] = THREAD | SRC,
    /* failed before the commit point: back to the state it was in */
    [LM_RUN_FINISH_MIGRATE][LM_RUN_PRELAUNCH] = THREAD | SRC,
    [LM_RUN_FINISH_MIGRATE][LM_RUN_RUNNING] = THREAD | SRC,
    [LM_RUN_FINISH_MIGRATE][LM_RUN_PAUSED] = THREAD | SRC,
    /* postcopy failed after the destination ran the guest: nobody has all
     * of it, and nothing moves out of this state (cont is refused) */
    [LM_RUN_FINISH_MIGRATE][LM_RUN_INTERNAL_ERROR] = THREAD | SRC,
    [LM_RUN_RUNNING][LM_RUN_INTERNAL_ERROR] = THREAD | DST,
    [LM_RUN_PAUSED][LM_RUN_INTERNAL_ERROR] = THREAD | DST,
};

const char *lm_status_name(lm_status s)
{
    return (unsigned)s < (unsigned)NSTATUS ? status_names[s] : "unknown";
}

const char *lm_runstate_name(lm_runstate s)
{
    return (unsigned)s < (unsigned)NRUNSTATE ? runstate_names[s] : "unknown";
}

bool mig_status_final(lm_status s)
{
    return s == LM_STATUS_NONE || s == LM_STATUS_COMPLETED || s == LM_STATUS_FAILED ||
           s == LM_STATUS_CANCELLED;
}

/* ------------------------------------------------------------ threads */

void mig_thread_enter(lm_mig *m)
{
    pthread_mutex_lock(&m->lock);
    m->thread_self = pthread_self();
    m->thread_self_valid = true;
    pthread_mutex_unlock(&m->lock);
}

/* Under m->lock: is the calling thread the migration's own? */
static bool on_thread_locked(const lm_mig *m)
{
    return m->thread_self_valid && pthread_equal(m->thread_self, pthread_self());
}

/*
 * Under m->lock: may `who` move from a to b in a table of `n` states?  An
 * illegal move is a bug of this library: asserted in debug builds, logged
 * and refused otherwise.
 */
static bool move_ok(lm_mig *m, const unsigned char *table, int n, int a, int b,
                    const char *what, const char *(*name)(int))
{
    unsigned rule = a >= 0 && a < n && b >= 0 && b < n ? table[a * n + b] : 0;
    unsigned side = m->incoming ? DST : SRC;

    if ((rule & side) && (!(rule & THREAD) || (rule & CALLER) || on_thread_locked(m)))
        return true;
    util_log("internal error: illegal %s move %s -> %s (%s, %s thread)", what, name(a),
             name(b), m->incoming ? "destination" : "source",
             on_thread_locked(m) ? "migration" : "a caller");
    assert(!"illegal state move");
    return false;
}

static const char *status_name_i(int s) { return lm_status_name((lm_status)s); }
static const char *runstate_name_i(int r) { return lm_runstate_name((lm_runstate)r); }

/* ------------------------------------------------------------ listeners */

/* A thread finished calling its listener snapshot (see lm_remove_listener). */
static void listeners_done(lm_mig *m)
{
    pthread_mutex_lock(&m->lock);
    if (--m->listener_calls == 0)
        pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
}

/* Called with m->lock held: snapshot the listeners, release the lock.  The
 * caller calls them, then listeners_done(). */
static mig_listeners listeners_take_unlock(lm_mig *m)
{
    mig_listeners ls = m->listeners;

    m->listener_calls++;
    pthread_mutex_unlock(&m->lock);
    return ls;
}

/* Called with m->lock held, just after m->runstate changed to r. */
static void runstate_changed_unlock(lm_mig *m, lm_runstate r)
{
    mig_listeners ls = listeners_take_unlock(m);

    for (int i = 0; i < ls.n; i++)
        if (ls.l[i].runstate_changed)
            ls.l[i].runstate_changed(ls.opaque[i], r);
    listeners_done(m);
}

int lm_add_listener(lm_mig *m, const lm_listener *l, void *opaque)
{
    int ret = 0;

    pthread_mutex_lock(&m->lock);
    if (m->listeners.n == MIG_MAX_LISTENERS) {
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

void mig_notice(lm_mig *m, const char *name, const char *detail)
{
    mig_listeners ls;

    pthread_mutex_lock(&m->lock);
    ls = listeners_take_unlock(m);
    for (int i = 0; i < ls.n; i++)
        if (ls.l[i].notice)
            ls.l[i].notice(ls.opaque[i], name, detail);
    listeners_done(m);
}

/* ------------------------------------------------------------ status */

/* Called with m->lock held for a checked move: make it, tell everyone,
 * return with the lock released. */
static void status_move_unlock(lm_mig *m, lm_status s)
{
    mig_listeners ls;

    m->status = s;
    m->stats.status = s;
    if (mig_status_final(s))
        m->stats.total_time = time_now_ms() - m->start_ms;
    pthread_cond_broadcast(&m->cond);
    ls = listeners_take_unlock(m);
    for (int i = 0; i < ls.n; i++)
        if (ls.l[i].status_changed)
            ls.l[i].status_changed(ls.opaque[i], s);
    listeners_done(m);
}

bool mig_set_status(lm_mig *m, lm_status s)
{
    pthread_mutex_lock(&m->lock);
    if (m->status == s) {
        pthread_mutex_unlock(&m->lock);
        return true;
    }
    /* A cancel got there first: the thread's next step is not made. */
    if (m->status == LM_STATUS_CANCELLING && !status_moves[m->status][s]) {
        pthread_mutex_unlock(&m->lock);
        return false;
    }
    if (!move_ok(m, &status_moves[0][0], NSTATUS, m->status, s, "status", status_name_i)) {
        pthread_mutex_unlock(&m->lock);
        return false;
    }
    status_move_unlock(m, s);
    return true;
}

lm_status lm_wait(lm_mig *m, int timeout_ms)
{
    struct timespec dl = time_deadline_ms(timeout_ms < 0 ? 0 : timeout_ms);
    lm_status s;

    pthread_mutex_lock(&m->lock);
    while (!mig_status_final(m->status)) {
        if (timeout_ms < 0)
            pthread_cond_wait(&m->cond, &m->lock);
        else if (pthread_cond_timedwait(&m->cond, &m->lock, &dl) == ETIMEDOUT)
            break;
    }
    s = m->status;
    pthread_mutex_unlock(&m->lock);
    return s;
}

/* ------------------------------------------------------------ run state */

lm_runstate lm_runstate_get(lm_mig *m)
{
    lm_runstate r;

    pthread_mutex_lock(&m->lock);
    r = m->runstate;
    pthread_mutex_unlock(&m->lock);
    return r;
}

void mig_set_runstate(lm_mig *m, lm_runstate r)
{
    pthread_mutex_lock(&m->lock);
    if (m->runstate == r ||
        !move_ok(m, &runstate_moves[0][0], NRUNSTATE, m->runstate, r, "run state",
                 runstate_name_i)) {
        pthread_mutex_unlock(&m->lock);
        return;
    }
    m->runstate = r;
    runstate_changed_unlock(m, r);
}

/* The program's own declarations are only taken from prelaunch: after
 * that the library's moves decide (a public call is not an assertion). */
static void runstate_declare(lm_mig *m, lm_runstate r, const char *fn)
{
    pthread_mutex_lock(&m->lock);
    if (m->runstate == r) {
        pthread_mutex_unlock(&m->lock);
        return;
    }
    if (m->runstate != LM_RUN_PRELAUNCH) {
        util_log("%s: ignored, the guest is '%s' (only a new context, in prelaunch, declares "
                 "its state)", fn, lm_runstate_name(m->runstate));
        pthread_mutex_unlock(&m->lock);
        return;
    }
    m->runstate = r;
    runstate_changed_unlock(m, r);
}

void lm_runstate_set_running(lm_mig *m)
{
    runstate_declare(m, LM_RUN_RUNNING, "lm_runstate_set_running");
}

void lm_runstate_set_inmigrate(lm_mig *m)
{
    runstate_declare(m, LM_RUN_INMIGRATE, "lm_runstate_set_inmigrate");
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
    (void)err;
    pthread_mutex_lock(&m->lock);
    if (m->runstate == LM_RUN_INMIGRATE)
        m->autostart = false;
    if (m->runstate != LM_RUN_RUNNING) {
        pthread_mutex_unlock(&m->lock);
        return 0;
    }
    pthread_mutex_unlock(&m->lock);
    if (m->vm.stop)
        m->vm.stop(m->vm_opaque);
    /* Paused unless a switch-over took the guest meanwhile: it records the
     * state it found and restores that one if it fails. */
    pthread_mutex_lock(&m->lock);
    if (m->runstate == LM_RUN_RUNNING) {
        m->runstate = LM_RUN_PAUSED;
        runstate_changed_unlock(m, LM_RUN_PAUSED);
    } else {
        pthread_mutex_unlock(&m->lock);
    }
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
        return error_set(err, -EBUSY, "Guest is being switched over");
    }
    if (r == LM_RUN_INTERNAL_ERROR) {
        pthread_mutex_unlock(&m->lock);
        return error_set(err, -EBUSY, "the guest cannot run: a postcopy migration failed "
                         "after the destination started it, so its memory is split "
                         "between the two sides");
    }
    if (!move_ok(m, &runstate_moves[0][0], NRUNSTATE, r, LM_RUN_RUNNING, "run state",
                 runstate_name_i)) {
        pthread_mutex_unlock(&m->lock);
        return error_set(err, -EBUSY, "the guest cannot be started from '%s'",
                         lm_runstate_name(r));
    }
    /* Running from here, before ops->start returns: a concurrent
     * lm_incoming (which takes only a guest that never ran) sees it. */
    m->runstate = LM_RUN_RUNNING;
    pthread_mutex_unlock(&m->lock);
    if (m->vm.start)
        m->vm.start(m->vm_opaque);
    pthread_mutex_lock(&m->lock);
    runstate_changed_unlock(m, LM_RUN_RUNNING);
    return 0;
}

/*
 * Which run states may start which direction, as QEMU decides it.  Only a
 * guest that never ran may receive a migration (QEMU: the process was
 * started with -incoming); a load into a guest that runs, or ran, would
 * overwrite live memory under its writers.  A destination that is waiting
 * for (or failed to receive) a migration has no guest to send.  The
 * destination's state is claimed (inmigrate) here, under the lock, so a
 * concurrent lm_vm_start cannot start the guest between check and load.
 */
int mig_claim_runstate(lm_mig *m, bool incoming, lm_error *err)
{
    lm_runstate r;

    pthread_mutex_lock(&m->lock);
    r = m->runstate;
    if (incoming && r != LM_RUN_PRELAUNCH && r != LM_RUN_INMIGRATE) {
        pthread_mutex_unlock(&m->lock);
        return error_set(err, -EBUSY, "cannot receive a migration: this guest is '%s' "
                         "(only a guest that never ran can be a destination; start the "
                         "program as one, e.g. with --incoming defer)",
                         lm_runstate_name(r));
    }
    if (!incoming && r == LM_RUN_INMIGRATE) {
        pthread_mutex_unlock(&m->lock);
        return error_set(err, -EBUSY, "Guest is waiting for an incoming migration");
    }
    if (incoming && r == LM_RUN_PRELAUNCH) {
        m->runstate = LM_RUN_INMIGRATE;
        runstate_changed_unlock(m, LM_RUN_INMIGRATE);
        return 0;
    }
    pthread_mutex_unlock(&m->lock);
    return 0;
}

/* ------------------------------------------------------------ commit / cancel */

bool mig_commit(lm_mig *m)
{
    bool committed;

    pthread_mutex_lock(&m->lock);
    assert(on_thread_locked(m));
    if (!mig_cancelled(m))
        m->committed = true;
    committed = m->committed;
    pthread_mutex_unlock(&m->lock);
    return committed;
}

int lm_cancel(lm_mig *m, lm_error *err)
{
    bool active, committed, incoming;
    lm_status status;

    pthread_mutex_lock(&m->lock);
    status = m->status;
    active = !mig_status_final(m->status);
    committed = m->committed;
    incoming = m->incoming;
    if (!active || committed) {
        pthread_mutex_unlock(&m->lock);
        if (!active)
            return 0;
        if (status == LM_STATUS_POSTCOPY_ACTIVE)
            return error_set(err, -EBUSY, "too late to cancel: in postcopy the "
                             "destination runs the guest and only the migration's end "
                             "gives it all of its memory");
        return error_set(err, -EBUSY, incoming
                         ? "too late to cancel: the whole stream arrived and the guest "
                         "is starting here"
                         : "too late to cancel: the destination has the whole "
                         "stream and may be running the guest");
    }
    /* Flag and (source) CANCELLING under one hold of the lock: the thread
     * cannot commit, nor move past CANCELLING, once either is seen. */
    atomic_store(&m->cancel, true);
    m->user_cancel = true;
    if (!incoming && m->status != LM_STATUS_CANCELLING)
        status_move_unlock(m, LM_STATUS_CANCELLING);
    else
        pthread_mutex_unlock(&m->lock);
    mig_kick(m);
    return 0;
}
