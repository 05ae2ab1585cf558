/*
 * The destination's incoming thread and what its postcopy half shares
 * with it (internal to src/migration/).  incoming.c is the thread;
 * postcopy_in.c the postcopy commands, the listen thread and the fault
 * requests.  Their thread table is at the top of postcopy_in.c.
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
