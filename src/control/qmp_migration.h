/*
 * QEMU's migration commands and events for one lm_mig, served by an lm_qmp
 * (qmp_migration.c).  lm_qmp_new() is the only user: it creates this before
 * the program can register anything, so a program's command of the same name
 * replaces one of these, as the public header promises.
 */
#ifndef CONTROL_QMP_MIGRATION_H
#define CONTROL_QMP_MIGRATION_H

#include "livemig/qmp.h"

typedef struct qmp_migration qmp_migration;

/*
 * Register the migration commands on q (with lm_qmp_register) and subscribe
 * to m for MIGRATION / STOP / RESUME and notice events (one of m's listener
 * slots).  The result belongs to q's owner, who must call
 * qmp_migration_detach() and then, once no handler can run any more (the
 * server thread joined), qmp_migration_free().  NULL with err filled on
 * failure (nothing subscribed then); commands registered by then still
 * point at the freed state, so the caller must not open q: lm_qmp_new gives
 * up on the whole server.
 */
qmp_migration *qmp_migration_new(lm_qmp *q, lm_mig *m, lm_error *err);

/*
 * Unsubscribe from m.  When this returns no listener call runs on the
 * migration commands' state or ever will (lm_remove_listener's promise), so
 * no library thread can reach q through us any more.  Not from a listener
 * callback.  Idempotent.
 */
void qmp_migration_detach(qmp_migration *mig);

/* Detach if not done yet, and free.  NULL is a no-op. */
void qmp_migration_free(qmp_migration *mig);

#endif
