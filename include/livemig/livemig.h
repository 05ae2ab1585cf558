/*
 * livemig -- live migration of a running guest's RAM and device state.
 *
 * This is the whole public contract of the library.  A program (a VMM, a
 * save/restore tool, the `livemig` command) does this:
 *
 *   1. lm_new()                         one context per migration endpoint;
 *                                       there are no globals, so a source and a
 *                                       destination can live in one process.
 *   2. lm_ram_register()                for each RAM block;
 *      lm_device_register()             for each piece of device state;
 *      lm_set_vm_ops()                  how to stop / start / throttle the guest;
 *      lm_set_dirty_tracker()           "auto", "uffd-wp" or "cooperative",
 *      or lm_set_dirty_tracker_ops()    the program's own dirty log.
 *   3. lm_cap_set() / lm_param_set_*()  optional tuning (QEMU's names).
 *   4. lm_migrate(URI) on the source,   or lm_incoming(URI) on the destination.
 *      Both return at once; the work runs on a library thread.
 *   5. lm_query() for statistics, lm_wait() for the end, lm_cancel() to abort,
 *      lm_add_listener() to be told of status and run-state changes.
 *   6. lm_free().
 *
 * Threads: every function here may be called from any thread except the
 * device-state callbacks' stream functions (lm_put_* / lm_get_*), which are
 * only valid inside the callback that received the stream.  Listeners are
 * called from library threads with no library lock held; they must not block.
 *
 * Errors: functions that can fail return 0 on success or a negative errno and,
 * when `err` is not NULL, fill it with a message that says what was wrong.
 */
#ifndef LIVEMIG_LIVEMIG_H
#define LIVEMIG_LIVEMIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- errors */

#define LM_ERROR_MAX 512

/* A caller-owned error: plain storage, nothing to free. */
typedef struct lm_error {
    int code;                 /* negative errno, 0 when no error was set */
    char msg[LM_ERROR_MAX];   /* NUL-terminated, human readable */
} lm_error;

/* ---------------------------------------------------------------- context */

typedef struct lm_mig lm_mig;

/* Create an idle migration context.  Never returns NULL (aborts on OOM). */
lm_mig *lm_new(void);

/* Destroy a context.  Cancels and joins any migration still running. */
void lm_free(lm_mig *m);

/* ---------------------------------------------------------------- guest */

/*
 * How the library controls the guest.  All optional; a missing stop/start
 * means the guest is assumed to be always stopped (a save of static state).
 *   stop      returns only when no guest thread can write guest RAM.
 *   start     resumes the guest.
 *   throttle  slow the guest down to (100 - percent)% of its speed; 0 = full
 *             speed.  Called by auto-converge from the migration thread.
 */
typedef struct lm_vm_ops {
    void (*stop)(void *opaque);
    void (*start)(void *opaque);
    void (*throttle)(void *opaque, int percent);
} lm_vm_ops;

void lm_set_vm_ops(lm_mig *m, const lm_vm_ops *ops, void *opaque);

/*
 * The guest's vCPU threads, by kernel thread id (gettid()), vCPU i first:
 * in postcopy the destination then accounts how long each of them waited
 * for missing pages (query-migrate's postcopy-vcpu-blocktime).  At most
 * LM_MAX_VCPUS; call before lm_incoming, again to replace the list.
 * -EINVAL for a bad count or id.
 */
#define LM_MAX_VCPUS 64
int lm_set_vcpu_threads(lm_mig *m, const int *tids, int n, lm_error *err);

/* Run states, named as QEMU's query-status names them. */
typedef enum lm_runstate {
    LM_RUN_PRELAUNCH,      /* "prelaunch": destination before any migration */
    LM_RUN_INMIGRATE,      /* "inmigrate": destination while loading */
    LM_RUN_RUNNING,        /* "running" */
    LM_RUN_PAUSED,         /* "paused": stopped by the user */
    LM_RUN_FINISH_MIGRATE, /* "finish-migrate": source stopped for switch-over */
    LM_RUN_POSTMIGRATE,    /* "postmigrate": source after a completed migration */
    /* "internal-error": a postcopy failed after the destination started the
     * guest, so neither side holds all of it; `cont` is refused on both */
    LM_RUN_INTERNAL_ERROR,
} lm_runstate;

const char *lm_runstate_name(lm_runstate s);
lm_runstate lm_runstate_get(lm_mig *m);

/* Stop / resume the guest through its vm ops (QMP stop / cont). */
int lm_vm_stop(lm_mig *m, lm_error *err);
int lm_vm_start(lm_mig *m, lm_error *err);

/*
 * A context starts in run state "prelaunch".  A program whose guest is
 * running calls lm_runstate_set_running() (ops->start is not called); one that
 * will receive a migration later (QEMU's "-incoming defer") calls
 * lm_runstate_set_inmigrate() so query-status says so.  lm_incoming() sets
 * inmigrate itself.
 */
void lm_runstate_set_running(lm_mig *m);
void lm_runstate_set_inmigrate(lm_mig *m);

/* ---------------------------------------------------------------- RAM */

/*
 * Register a RAM block.  `idstr` (at most 255 bytes) names it on the wire and
 * must be the same on both sides; `host` is page aligned and `length` a
 * multiple of `page_size` (4096 today).  The library never frees `host`.
 * Register before lm_migrate / lm_incoming; blocks cannot be removed.
 */
int lm_ram_register(lm_mig *m, const char *idstr, void *host, uint64_t length,
                    uint64_t page_size, lm_error *err);

/*
 * Register a RAM block whose memory is a file descriptor's, so that the CPR
 * modes can hand it over instead of copying it (parameter "mode",
 * capability "x-ignore-shared"; docs/format.md section 8).
 *
 *   fd >= 0   `host` is [offset, offset + length) of `fd` mapped MAP_SHARED
 *             by the program: a memfd, or a shared file (tmpfs under
 *             /dev/shm, a DAX device, ...).  The library keeps its own dup
 *             of fd (closed by lm_free); the program may close its copy.
 *             A memfd (or an unlinked file) dies with its last holder, so
 *             cpr-reboot refuses it; cpr-transfer takes either.
 *   fd == -1  a cpr-transfer destination's block: `host` is address space
 *             the program reserved (e.g. mmap PROT_NONE, MAP_NORESERVE),
 *             which costs no memory.  When the source's descriptor arrives,
 *             the library checks its size and maps it over `host` with
 *             MAP_FIXED, so `host` stays the block's address; if the load
 *             fails before the guest runs the reservation is put back.
 *             Only mode cpr-transfer can give such a block memory (any
 *             other migration refuses it); offset must be 0.
 *
 * offset is page aligned.  Otherwise as lm_ram_register.
 */
int lm_ram_register_fd(lm_mig *m, const char *idstr, void *host, uint64_t length,
                       uint64_t page_size, int fd, uint64_t offset, lm_error *err);

/*
 * The descriptor behind block `idstr` (the registered one, or the one a
 * cpr-transfer source handed over), and its offset; -1 for anonymous
 * memory or a block still waiting.  Owned by the library: dup it to keep
 * it past lm_free.  Call it while no migration runs (a cpr-transfer
 * destination sets it on its incoming thread).
 */
int lm_ram_fd(lm_mig *m, const char *idstr, uint64_t *offset);

/*
 * Dirty tracking.  "uffd-wp": userfaultfd write-protect in async mode read
 * with PAGEMAP_SCAN; needs no help from the writers but only sees writes made
 * by this process through the registered mapping.  "cooperative": the program
 * reports every write with lm_ram_mark_dirty(), as a VMM does from a KVM dirty
 * log.  "auto" (the default) picks the first that works.
 */
int lm_set_dirty_tracker(lm_mig *m, const char *name, lm_error *err);

/* The tracker in use ("uffd-wp" / "cooperative" / the ops' name), or the
 * requested one. */
const char *lm_dirty_tracker_name(lm_mig *m);

/*
 * A dirty log of the program's own (a VMM's KVM_GET_DIRTY_LOG, a device
 * model's log, ...) as the tracker, named `name` (1 to 31 bytes of
 * [A-Za-z0-9._-], not "auto", "uffd-wp" or "cooperative").  The name is what
 * lm_dirty_tracker_name() and lm_stats.dirty_tracker (QMP query-migrate's
 * "x-dirty-tracker") report.  Like lm_set_dirty_tracker(), it must be
 * called before the first lm_migrate (-EBUSY after), and a later call of
 * either replaces the choice.  `ops` is copied; `opaque` must stay valid
 * until lm_free.  Only a source uses a tracker: a destination never calls
 * these ops.
 *
 * Threads.  start, arm, sync and stop are called on the migration thread
 * only, one at a time, never from inside another library call the program
 * made.  lm_ram_mark_dirty() keeps working beside the ops (for writes the
 * log does not see, e.g. a VMM's own device emulation writing guest RAM);
 * both are merged.
 *
 * Per migration (lm_migrate):
 *   start   once, before the first page is read.  From its return on,
 *           every write to every registered block must be logged (but see
 *           arm).  0, or a negative errno and a message in err: the
 *           migration fails with that message and stop is not called.
 *   arm     optional.  NULL: start tracks everything.  Otherwise start
 *           need not track anything yet; arm(block, end) asks to track
 *           bytes [0, end) of the block from now on, with `end` growing
 *           (page aligned, at most the block's length).  The library calls
 *           it before its first pass reads those pages (so a write before
 *           arm is in what is sent), and with end = length before the
 *           block's first sync.  0, or a negative errno and a message in
 *           err: the migration fails with it (stop is called).
 *   sync    many times: report the pages of `block` (lm_ram_find's index,
 *           registration order) written since the last sync of that block
 *           returned (or since start / arm returned), and every page
 *           written while the previous sync ran that it did not report;
 *           then re-arm them, so the next write is logged again.  A log
 *           with get-then-clear semantics (KVM manual protect) satisfies
 *           this as long as it only clears what it reported.  The last
 *           sync runs after lm_vm_ops.stop returned: it must report
 *           everything up to then.  Reporting an unwritten page only costs
 *           its resend; missing a written page corrupts the destination.
 *           `bitmap` is (npages + LONG_BIT - 1) / LONG_BIT unsigned longs,
 *           page i in bit i % LONG_BIT of word i / LONG_BIT (host endian),
 *           pages of 4096 bytes: page i = bytes [4096 i, 4096 (i + 1)).  It
 *           is ZEROED by the library before each call and valid only during
 *           it; set the bits of written pages (or store whole words: it is
 *           the layout KVM_GET_DIRTY_LOG writes on 64-bit hosts).  Bits at
 *           or past npages are ignored.  The library ORs the result into its
 *           own bitmap, so a clear bit never un-dirties a page.  0, or a
 *           negative errno with a message in err: the tracker no longer
 *           knows what is dirty, so the migration fails with the message
 *           (the guest keeps running on the source) and stop is called.
 *   stop    once, after the migration ended (completed, failed or
 *           cancelled), if start succeeded: end logging.  Must not fail.
 */
typedef struct lm_dirty_tracker_ops {
    int (*start)(void *opaque, lm_error *err);
    int (*arm)(void *opaque, int block, uint64_t end, lm_error *err);   /* may be NULL */
    int (*sync)(void *opaque, int block, unsigned long *bitmap, uint64_t npages,
                lm_error *err);
    void (*stop)(void *opaque);
} lm_dirty_tracker_ops;

/* start, sync and stop are required (-EINVAL otherwise). */
int lm_set_dirty_tracker_ops(lm_mig *m, const char *name, const lm_dirty_tracker_ops *ops,
                             void *opaque, lm_error *err);

/*
 * Cooperative tracking: report that [offset, offset+len) of block `idstr`
 * was written.  Call it AFTER the write is complete: a page marked before it
 * is written could be sent half-written and then forgotten.  Lock-free and
 * safe from any thread; a no-op when no migration is tracking.
 */
void lm_ram_mark_dirty(lm_mig *m, const char *idstr, uint64_t offset, uint64_t len);

/* Faster form of the above: `block` is the index returned by lm_ram_find. */
int lm_ram_find(lm_mig *m, const char *idstr);
void lm_ram_mark_dirty_idx(lm_mig *m, int block, uint64_t offset, uint64_t len);

/* ---------------------------------------------------------------- device state */

typedef struct lm_stream lm_stream;

/*
 * Device state in ordinary sections.  A non-iterable device has only
 * save/load: save runs once with the guest stopped and goes out as a FULL
 * section.  An iterable device (save_iterate != NULL) gets START at setup,
 * PART sections while the guest runs and END at switch-over; load is called
 * once per section with the section type (LM_SECTION_*).
 * Every callback returns 0 or a negative errno; stream errors are latched in
 * the stream, so a callback may write or read a whole record and check
 * lm_stream_error() once at the end.
 */
enum { LM_SECTION_START = 1, LM_SECTION_PART = 2, LM_SECTION_END = 3, LM_SECTION_FULL = 4 };

typedef struct lm_device_ops {
    int (*save)(lm_stream *s, void *opaque);                 /* FULL or END */
    int (*load)(lm_stream *s, void *opaque, uint32_t version, int section_type);
    int (*save_setup)(lm_stream *s, void *opaque);           /* iterable: START */
    int (*save_iterate)(lm_stream *s, void *opaque);         /* iterable: PART */
    uint64_t (*pending)(void *opaque);                       /* iterable: bytes left */
} lm_device_ops;

int lm_device_register(lm_mig *m, const char *idstr, uint32_t instance,
                       uint32_t version, const lm_device_ops *ops, void *opaque,
                       lm_error *err);

/* Stream access for device callbacks.  Integers are big-endian on the wire. */
void lm_put_u8(lm_stream *s, uint8_t v);
void lm_put_be16(lm_stream *s, uint16_t v);
void lm_put_be32(lm_stream *s, uint32_t v);
void lm_put_be64(lm_stream *s, uint64_t v);
void lm_put_buffer(lm_stream *s, const void *buf, size_t len);
/* Getters return 0, or -1 after a short or failed read (error latched). */
int lm_get_u8(lm_stream *s, uint8_t *v);
int lm_get_be16(lm_stream *s, uint16_t *v);
int lm_get_be32(lm_stream *s, uint32_t *v);
int lm_get_be64(lm_stream *s, uint64_t *v);
int lm_get_buffer(lm_stream *s, void *buf, size_t len);
/* 0, or the first error's negative errno.  The message names the byte offset. */
int lm_stream_error(lm_stream *s);
const char *lm_stream_error_msg(lm_stream *s);
/* Report a load error from a device callback (latched like an I/O error). */
void lm_stream_set_error(lm_stream *s, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Byte offset of the next read or write in the stream. */
uint64_t lm_stream_offset(lm_stream *s);

/* ---------------------------------------------------------------- capabilities & parameters */

/*
 * Capabilities and parameters use QEMU's names ("auto-converge",
 * "downtime-limit", ...).  lm_cap_name(i) / lm_param_name(i) enumerate them
 * (NULL past the end).  Setting one while a migration runs is refused for
 * capabilities and allowed for parameters that QEMU lets change live
 * (max-bandwidth, downtime-limit, cpu-throttle-*).  livemig's own
 * capability "x-integrity" (off by default, set on both sides) makes the
 * library checksum every page on the wire and in files and check each one
 * on arrival, failing the load on a mismatch (docs/format.md section 9).
 */
const char *lm_cap_name(int i);
int lm_cap_set(lm_mig *m, const char *name, bool on, lm_error *err);
int lm_cap_get(lm_mig *m, const char *name, bool *on);

typedef enum lm_param_type { LM_PARAM_INT, LM_PARAM_BOOL, LM_PARAM_STR } lm_param_type;

const char *lm_param_name(int i);
lm_param_type lm_param_type_of(int i);
int lm_param_set_int(lm_mig *m, const char *name, int64_t v, lm_error *err);
int lm_param_set_bool(lm_mig *m, const char *name, bool v, lm_error *err);
int lm_param_set_str(lm_mig *m, const char *name, const char *v, lm_error *err);
/* Fills exactly one of the outputs according to the parameter's type. */
int lm_param_get(lm_mig *m, const char *name, int64_t *iv, bool *bv,
                 char *sv, size_t svlen);

/* ---------------------------------------------------------------- migration */

typedef enum lm_status {
    LM_STATUS_NONE,
    LM_STATUS_SETUP,
    LM_STATUS_ACTIVE,
    LM_STATUS_DEVICE,      /* guest stopped, last pages and device state going */
    LM_STATUS_COMPLETED,
    LM_STATUS_FAILED,
    LM_STATUS_CANCELLING,
    LM_STATUS_CANCELLED,
    /* postcopy (capability postcopy-ram, lm_migrate_start_postcopy): */
    LM_STATUS_POSTCOPY_DEVICE, /* source: the package (device state, RUN) sent, the
                                * destination's confirmation that it loaded it
                                * not yet in; a failure now resumes the guest here */
    LM_STATUS_POSTCOPY_ACTIVE, /* the destination runs the guest; the rest of RAM
                                * streams in the background, faults ask first */
} lm_status;

const char *lm_status_name(lm_status s);

/*
 * Start migrating to `uri`: tcp:HOST:PORT (IPv4, [IPv6]), unix:PATH, fd:N,
 * exec:COMMAND, file:PATH.  Connects synchronously (so a refused connection
 * is reported here), then runs on the migration thread.  On failure or
 * cancel before the commit point (the whole stream sent) the guest keeps
 * running with its memory untouched; on success it stays stopped (run state
 * postmigrate).  After the commit point only a definite answer gives the
 * guest back: the destination reported that it failed, or the target is a
 * file.  Silence, a closed connection or a timeout (parameter
 * switchover-confirm-timeout, 300 s) are no answer: the guest stays stopped
 * and the status is failed with lm_stats.outcome_unknown set.
 */
int lm_migrate(lm_mig *m, const char *uri, lm_error *err);

/*
 * Accept an incoming migration on `uri`.  Listens synchronously (so "address
 * in use" is reported here; tcp port 0 picks a free port, see
 * lm_stats.socket_address), then accepts and loads on the incoming thread.
 * The guest is started (vm ops start) only after a stream that ended cleanly.
 */
int lm_incoming(lm_mig *m, const char *uri, lm_error *err);

/*
 * Postcopy (capability "postcopy-ram" set before lm_migrate, on a socket
 * URI): switch a running precopy migration to postcopy at its next
 * section.  The guest stops here, its device state and the pages dirtied
 * since they were sent are handed over, and the destination runs it while
 * the rest of RAM follows; a page it touches before that is asked for and
 * sent first.  Until the destination confirms it loaded the device state
 * (status postcopy-device) a failure still gives the guest back here; after
 * it (postcopy-active) neither side has all of the guest, so a failure
 * leaves both in run state internal-error.  -EINVAL when the capability is
 * off, -EBUSY when no migration is active (QEMU's migrate-start-postcopy).
 */
int lm_migrate_start_postcopy(lm_mig *m, lm_error *err);

/* Ask a running migration to stop; returns at once (see lm_wait). */
int lm_cancel(lm_mig *m, lm_error *err);

/*
 * Wait until the migration reaches completed, failed or cancelled, at most
 * timeout_ms (-1 = forever).  Returns the status (LM_STATUS_NONE if none ever
 * started).
 */
lm_status lm_wait(lm_mig *m, int timeout_ms);

/* One snapshot of everything query-migrate reports.  Times in ms. */
typedef struct lm_stats {
    lm_status status;
    bool incoming;               /* this context is a destination */
    int64_t total_time;          /* since lm_migrate; final once ended */
    int64_t setup_time;
    int64_t downtime;            /* measured: stop until destination resumed */
    int64_t expected_downtime;   /* remaining / bandwidth, while active */
    int cpu_throttle_percentage;
    uint64_t transferred;        /* bytes written or read on all channels */
    uint64_t remaining;          /* dirty bytes not yet sent */
    uint64_t total;              /* bytes of registered RAM */
    uint64_t duplicate;          /* zero pages sent as ZERO records */
    uint64_t normal;             /* pages sent in full */
    uint64_t normal_bytes;
    uint64_t dirty_sync_count;   /* bitmap syncs = iterations */
    uint64_t dirty_pages_rate;   /* pages/s dirtied, at the last sync */
    double mbps;                 /* throughput, megabits/s, recent window */
    uint64_t pages_per_second;
    uint64_t precopy_bytes, downtime_bytes;
    uint64_t multifd_bytes;      /* part of transferred that went over multifd */
    /* the `compress` capability (QEMU 7.2's "compression" object) */
    bool compression;            /* the figures below are meaningful */
    uint64_t compress_pages;     /* pages sent compressed */
    uint64_t compress_busy;      /* pages that found every worker busy */
    double compress_busy_rate;
    uint64_t compressed_size;    /* bytes of compressed data sent */
    double compression_rate;     /* uncompressed / compressed */
    uint64_t page_size;
    char dirty_tracker[32];      /* tracker actually in use */
    char socket_address[160];    /* destination: the address listened on */
    char error_desc[LM_ERROR_MAX];
    /* source: failed after the commit point without an answer (see
     * MIGRATION_OUTCOME_UNKNOWN below); the guest was not resumed */
    bool outcome_unknown;
    /* postcopy (QEMU's names in query-migrate) */
    uint64_t postcopy_requests;  /* pages the destination asked for */
    uint64_t postcopy_bytes;     /* bytes sent after the switch */
    /* destination: fault latency (request to page placed), microseconds */
    uint64_t postcopy_faults;    /* pages requested (= latency samples) */
    uint64_t postcopy_latency_us;        /* mean */
    uint64_t postcopy_latency_p50_us, postcopy_latency_p99_us, postcopy_latency_max_us;
    uint64_t postcopy_latency_dist[24];  /* [2^i, 2^(i+1)) us; the last open-ended */
    uint64_t postcopy_blocktime_ms;      /* sum of all requested pages' waits */
    int postcopy_nvcpus;                 /* vCPUs of lm_set_vcpu_threads */
    uint64_t postcopy_vcpu_blocktime_ms[LM_MAX_VCPUS];  /* each one's waits */
} lm_stats;

void lm_query(lm_mig *m, lm_stats *st);

/*
 * Listeners are told of every status change (MIGRATION event) and run-state
 * change (STOP / RESUME events).  Up to 8 per context; called on library
 * threads, in order, without locks held.  Any callback may be NULL.
 *
 * `notice` carries what a supervisor must act on that is neither a status
 * nor a run state.  `name` is the QMP event the QMP server emits for it
 * (always, whatever the "events" capability), `detail` one sentence:
 *   MIGRATION_OUTCOME_UNKNOWN  the source sent the whole stream (the
 *       commit point) but got no answer from the destination, which may be
 *       running the guest.  The migration ends "failed" with
 *       lm_stats.outcome_unknown set and the guest stays stopped here
 *       (run state postmigrate) until someone decides: lm_vm_start() if the
 *       destination does not run it, or end this process.
 */
typedef struct lm_listener {
    void (*status_changed)(void *opaque, lm_status s);
    void (*runstate_changed)(void *opaque, lm_runstate s);
    void (*notice)(void *opaque, const char *name, const char *detail);
} lm_listener;

int lm_add_listener(lm_mig *m, const lm_listener *l, void *opaque);

/*
 * Remove a listener added with the same callbacks and opaque.  When it
 * returns, no call to it is in progress or will start.  Must not be called
 * from a listener callback (it would wait for itself).  0 or -ENOENT.
 */
int lm_remove_listener(lm_mig *m, const lm_listener *l, void *opaque);

/* Parse a size like "1G", "512M", "4096" (binary units).  -1 on error. */
int64_t lm_parse_size(const char *s);

#ifdef __cplusplus
}
#endif
#endif
