/*
 * The migration context (struct lm_mig) and what its threads share.
 *
 * One lm_mig is one endpoint: the source of an outgoing migration or the
 * destination of an incoming one (a context can do one, then another).
 * Everything lives here; there are no process globals, so several contexts
 * coexist in one process (the unit tests run both ends in one binary).
 *
 * Threads and ownership
 * ---------------------
 *   caller threads   register blocks and devices (before any migration),
 *                    set caps/params, query, cancel, wait.
 *   migration thread (source, precopy.c) owns the stream, the RAM save state
 *                    (dirty bitmaps, scan position), the dirty tracker's sync
 *                    side, and the connection until it exits.
 *   incoming thread  (destination, incoming.c) owns the listening socket, the
 *                    connection, the read stream and the load state.
 *
 *   m->lock protects: status, runstate, stats, error, params, caps,
 *   listeners, the `thread_running` flag.  Threads never hold it across I/O
 *   or across a vm op / listener call (listeners are called after unlock,
 *   from the thread that changed the state).
 *
 * Waking
 * ------
 *   Every blocking point of a migration thread can be interrupted by
 *   lm_cancel(): it sets `cancel` (atomic), writes `cancel_fd` (an eventfd
 *   that connect/accept/rate-limit sleeps poll on) and shuts the connection
 *   down, so a blocked read/write returns at once.  A thread that fails
 *   records the first error (later ones are only logged) and does the same.
 *   lm_wait() sleeps on m->cond, which every status change broadcasts.
 *   The thread is joined by the next lm_migrate/lm_incoming, lm_wait after
 *   the end, or lm_free.
 */
#ifndef MIGRATION_MIGRATION_H
#define MIGRATION_MIGRATION_H

#include <pthread.h>
#include <stdatomic.h>

#include "livemig/livemig.h"
#include "stream/stream.h"
#include "stream/transport.h"
#include "dirty/dirty.h"
#include "ram/ram.h"
#include "tls/tls.h"

#define MIG_MAX_LISTENERS 8
#define MIG_MAX_DEVICES 64
#define MIG_MAX_HELPERS 4

enum mig_capability {
    MIG_CAP_EVENTS,
    MIG_CAP_AUTO_CONVERGE,
    MIG_CAP_MULTIFD,
    MIG_CAP_MAPPED_RAM,
    MIG_CAP_COMPRESS,
    MIG_CAP_POSTCOPY_RAM,
    MIG_CAP_RETURN_PATH,      /* accepted for QEMU's scripts: sockets always have one */
    MIG_CAP_POSTCOPY_PREEMPT,
    MIG_CAP_IGNORE_SHARED,             /* x-ignore-shared (src/cpr/cpr.h) */
    MIG_CAP_INTEGRITY,        /* livemig's own: page checksums (src/integrity/) */
    MIG_CAP__MAX,
};

typedef struct mig_paramset {
    int64_t downtime_limit;            /* ms */
    int64_t max_bandwidth;             /* bytes/s, 0 = unlimited */
    int64_t avail_switchover_bandwidth;/* bytes/s, 0 = use measured */
    int64_t cpu_throttle_initial;
    int64_t cpu_throttle_increment;
    int64_t max_cpu_throttle;
    int64_t throttle_trigger_threshold;
    int64_t multifd_channels;
    int64_t multifd_compression;       /* index into its choices: none, zlib, zstd */
    int64_t multifd_zlib_level;
    int64_t multifd_zstd_level;
    int64_t zero_page_detection;       /* zero_detect: none, legacy, multifd */
    int64_t direct_io;                 /* bool: O_DIRECT for mapped-ram page I/O */
    int64_t compress_level;
    int64_t compress_threads;
    int64_t decompress_threads;
    int64_t switchover_confirm_timeout;/* ms the source waits for the destination's answer */
    int64_t link_timeout;              /* ms after which a silent tcp link fails; 0 = kernel's */
    int64_t max_postcopy_bandwidth;    /* bytes/s after the postcopy switch, 0 = unlimited */
    int64_t postcopy_after;            /* ms; >0: switch to postcopy by itself (see params.c) */
    int64_t mode;                      /* cpr_mode: normal, cpr-reboot, cpr-transfer */
    /* free strings (params.c: the table's strsize); "" = off */
    char tls_creds[TLS_ID_MAX];        /* id of a tls-creds-* object */
    char tls_hostname[TLS_HOSTNAME_MAX];
    char tls_authz[TLS_ID_MAX];        /* id of an authz-simple object */
} mig_paramset;

/* Copied by value under the lock, then called without it. */
typedef struct mig_listeners {
    lm_listener l[MIG_MAX_LISTENERS];
    void *opaque[MIG_MAX_LISTENERS];
    int n;
} mig_listeners;

typedef struct mig_device {
    char idstr[256];
    uint32_t instance, version;
    uint32_t section_id;
    lm_device_ops ops;
    void *opaque;
} mig_device;

struct lm_mig {
    pthread_mutex_t lock;
    pthread_cond_t cond;

    /* --- under lock --- */
    lm_status status;
    bool incoming;
    lm_runstate runstate;
    bool autostart;                    /* destination: start the guest on arrival */
    mig_paramset params;
    bool caps[MIG_CAP__MAX];
    lm_stats stats;                    /* published snapshot for lm_query */
    lm_error error;                    /* first error of the current migration */
    bool thread_running;               /* a thread exists and is not yet joined */
    int64_t start_ms;                  /* lm_migrate / lm_incoming time */
    mig_listeners listeners;
    int listener_calls;                /* threads calling a snapshot right now */

    /* --- set before a migration, read-only while one runs --- */
    lm_vm_ops vm;
    void *vm_opaque;
    int vcpu_tids[LM_MAX_VCPUS];       /* lm_set_vcpu_threads */
    int nvcpus;
    ram_state ram;                     /* blocks; save/load state is the thread's */
    mig_device devices[MIG_MAX_DEVICES];
    int ndevices;
    char tracker_req[32];              /* "auto", "uffd-wp", "cooperative", ops' name */
    bool tracker_has_ops;              /* lm_set_dirty_tracker_ops: tracker_ops */
    lm_dirty_tracker_ops tracker_ops;
    void *tracker_opaque;
    dirty_tracker *_Atomic dirty;      /* created at first migration, freed by lm_free */
    tls_registry *tls_objects;         /* object-add's objects (own lock); lm_new..lm_free */

    /* --- the running migration --- */
    pthread_t thread;
    pthread_t thread_self;             /* under lock: set by the thread itself */
    bool thread_self_valid;
    atomic_bool cancel;
    atomic_bool postcopy_start;        /* lm_migrate_start_postcopy asked for the switch */
    bool committed;                    /* under lock: EOF sent, cancel refused */
    bool user_cancel;                  /* under lock: lm_cancel asked (vs. a failure) */
    int cancel_fd;                     /* eventfd, readable once cancelled */
    transport_uri uri;
    tls_setup tls;                     /* tls-* parameters resolved by lm_migrate /
                                          lm_incoming; held until the next one or lm_free */
    transport_conn conn;               /* owned by the thread; shutdown by anyone */
    pthread_mutex_t conn_lock;         /* guards conn.fd against close vs shutdown */
    /* under conn_lock: what mig_kick interrupts besides the connection --
     * the running helpers (multifd channels, worker pools, a mapped-ram
     * file), each added by the thread that starts it and removed before it
     * is freed */
    struct { void (*fn)(void *); void *opaque; } helpers[MIG_MAX_HELPERS];
    transport_listener listen;
};

/* ---- state.c: the state machine (its tables say which move is legal
 * from which thread; an illegal one asserts in debug builds) ---- */

/* Move to `s` (broadcast, listeners).  false when the move was not made: a
 * cancel got there first (CANCELLING holds until the thread ends). */
bool mig_set_status(lm_mig *m, lm_status s);
void mig_set_runstate(lm_mig *m, lm_runstate r);
bool mig_status_final(lm_status s);
/* The migration thread, first thing: who "the thread" of the tables is. */
void mig_thread_enter(lm_mig *m);
/* Which run state may start which direction; claims inmigrate. */
int mig_claim_runstate(lm_mig *m, bool incoming, lm_error *err);
/*
 * The commit point (the thread, once): true, and lm_cancel refused from
 * then on, unless a cancel came first.  Source: before EOF is written;
 * destination: after the loader accepted EOF, before the guest starts.
 */
bool mig_commit(lm_mig *m);

/* ---- migration.c: state shared by both directions ---- */

/* Tell the listeners' notice callbacks (see lm_listener). */
void mig_notice(lm_mig *m, const char *name, const char *detail);
/* Record the first error of this migration (later ones are logged only). */
void mig_set_error(lm_mig *m, const lm_error *err);
/* Replace it: the error that includes the first one and says more. */
void mig_replace_error(lm_mig *m, const lm_error *err);
/*
 * The interrupt of helpers, in one place: a helper the migration thread
 * starts (multifd channels, a worker pool, a mapped-ram file) is added with
 * the function that makes every wait of it return; mig_kick calls them all,
 * under conn_lock.  Added after a cancel came first, it is interrupted at
 * once.  The thread removes it before freeing it: when mig_helper_remove
 * returns, no call of fn(opaque) is in progress or will start.
 */
void mig_helper_add(lm_mig *m, void (*fn)(void *), void *opaque);
void mig_helper_remove(lm_mig *m, void *opaque);
/* Interrupt the helpers only: the connection stays up (the destination
 * still has a SHUT(1) to send). */
void mig_interrupt_helpers(lm_mig *m);
/* Interrupt every blocking wait of the migration thread: the connection
 * shut down and every helper interrupted. */
void mig_kick(lm_mig *m);
/* A helper thread (multifd channel) failed: record the error, then kick. */
void mig_fail(void *m, const lm_error *err);
bool mig_has_error(lm_mig *m);
bool mig_user_cancelled(lm_mig *m);
bool mig_cancelled(lm_mig *m);
/* Publish counters for lm_query (takes the lock briefly). */
void mig_publish(lm_mig *m, const lm_stats *st);
mig_paramset mig_params(lm_mig *m);
bool mig_cap(lm_mig *m, enum mig_capability c);
/* Close the connection under conn_lock (so a concurrent kick is safe). */
void mig_conn_close(lm_mig *m, lm_error *err);

/* ---- params.c ---- */
void params_init(mig_paramset *p);

/* ---- precopy.c / incoming.c: thread entry points ---- */
void *precopy_thread(void *arg);
void *incoming_thread(void *arg);

/* Return-path messages (WIRE_RP_*) and main-stream commands (WIRE_CMD_*): see
 * savevm/wire.h, the one definition of the wire grammar. */

#endif
