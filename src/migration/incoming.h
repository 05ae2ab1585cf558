/*
 * The destination's incoming thread and what its postcopy half shares
 * with it (internal to src/migration/).  incoming.c is the thread;
 * postcopy_in.c the postcopy commands, the listen and preempt threads and
 * the fault requests.
 *
 * Threads
 * -------
 * | thread | job | waits on | woken by | owns | told to exit by |
 * |---|---|---|---|---|---|
 * | `lm-incoming` (main) | the stream up to PACKAGED, the package, RUN; then joins lm-listen | socket reads; a fault on a missing page in a device load | data; the page placed by lm-listen; uffd_release | `in->lv`, the package's memory stream, starting the guest | its own RUN / failure |
 * | `lm-listen` | loads the main stream after LISTEN with its copy of the loader (`lv_listen`: the ram handler and PING only) | socket reads; at EOF `pci->cond` until the main thread is out of the package and the preempt channel is drained | data or a shutdown (mig_kick); `main_done` | `lv_listen`, `listen_s`, the ram load state, the uffd placer's bounce page | EOF, or an error (then it releases every waiting fault) |
 * | `lm-uffd` (src/uffd) | one REQ_PAGES(_ID) per missing page faulted on, on the shared return-path writer | poll(uffd, stop eventfd) | a fault; uffd_close | the requested bitmaps, `last_req` | uffd_close (incoming thread) |
 * | guest threads, or the main thread in a device load | a missing page | in the kernel | UFFDIO_COPY/ZEROPAGE of it; uffd_release | -- | -- |
 * | `lm-preempt` (postcopy-preempt) | places the preempt channel's bare page records with the second uffd placer; each EOS marks the channel drained | socket reads | data; its shutdown at the end | the preempt stream, placer 1's bounce page | shut down by postcopy_in_finish; a failure before that stops the migration (mig_kick) |
 *
 * Exit codes: the main thread's loadvm_run ends with LOADVM_QUIT at RUN
 * (or -1); the listen thread's loop with LOADVM_EOF after the EOF record and
 * the completeness check (every page received, the devices' sections
 * counted from the main loop's flags, merged at EOF), or -1.  Only
 * postcopy_in_finish (main thread) joins the listen thread; it first tells
 * it that the package is done (`main_done`) -- or, when the main load
 * failed, shuts the socket's read side down (SHUT(1) still goes back) and
 * releases every waiting fault so that the listen thread's read returns;
 * then it shuts the preempt channel down and joins its thread.
 */
#ifndef MIGRATION_INCOMING_H
#define MIGRATION_INCOMING_H

#include "migration/migration.h"
#include "compress/compress.h"
#include "mappedram/mappedram.h"
#include "multifd/multifd.h"
#include "returnpath/returnpath.h"
#include "savevm/savevm.h"

typedef struct postcopy_in postcopy_in;

typedef struct incoming {
    lm_mig *m;
    lm_stream *s;
    int64_t last_publish_ns;
    lm_stats st;
    multifd_receiver *mfr;
    mapped_ram_file *mapped;
    decompressor *decomp;
    rp_writer *rpw;             /* the return path, once OPEN_RETURN_PATH came */
    ram_placer placer;          /* where every page record goes, chosen at accept */
    uint64_t mf_bytes;
    loadvm *lv;                 /* the loader of the main stream */
    postcopy_in *pci;           /* postcopy's state, from POSTCOPY_ADVISE */
} incoming;

/* incoming.c: stop the load's helpers (see there). */
int in_workers_finish(incoming *in, bool failed, lm_error *err);
void in_publish(incoming *in);

/* ---- postcopy_in.c ---- */

/* Attach ADVISE, RAM_DISCARD, PACKAGED, LISTEN and RUN to in->lv. */
void postcopy_in_register(incoming *in);
/* After the main thread's loadvm_run: 0 when no postcopy began (precopy
 * goes on as before); otherwise waits for the listen thread and returns
 * its outcome: 0 = every page arrived (the guest already runs), or an
 * error in err (`main_ret` < 0: the main thread's load failed, which
 * stops the listen thread first).  Sets *after_run when the guest was
 * started (RUN), so the caller knows a failure split the guest. */
int postcopy_in_finish(incoming *in, int main_ret, bool *after_run, lm_error *err);
/* The stream the load is at now (the listen thread's after LISTEN). */
lm_stream *postcopy_in_stream(incoming *in);
/* Fault statistics into st (any thread). */
void postcopy_in_stats(incoming *in, lm_stats *st);
/* Free everything (threads joined by postcopy_in_finish). */
void postcopy_in_free(incoming *in);

#endif
