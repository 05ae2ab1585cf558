/*
 * Driving a migration from the outside, over QMP: the code behind
 * `livemig migrate`, reused as is by `livemig demo`.
 *
 * migrate_drive() sets capabilities and parameters, issues `migrate`, then
 * polls `query-migrate` every 100 ms (reading MIGRATION events in between
 * so the end is seen at once), shows progress, cancels on timeout or on
 * SIGINT/SIGTERM, and prints an `info migrate`-style summary at the end.
 *
 * Signals: the caller blocks SIGINT and SIGTERM in every thread before
 * calling (migrate_block_signals()); the drive loop picks them up with a
 * zero-timeout sigtimedwait between polls, so Ctrl-C is a request to cancel,
 * never an abrupt exit that would leave a migration running.
 */
#ifndef LIVEMIG_TOOL_MIGRATE_H
#define LIVEMIG_TOOL_MIGRATE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <jansson.h>

#include "livemig/livemig.h"
#include "qmpclient.h"

/* What query-migrate said, with the names of `info migrate`. */
struct mig_info {
    char status[32];
    int64_t total_time, downtime, expected_downtime, setup_time;
    int64_t throttle_percent;
    uint64_t transferred, remaining, total, duplicate, normal, normal_bytes;
    uint64_t dirty_sync_count, page_size, dirty_pages_rate, pages_per_second;
    uint64_t precopy_bytes, downtime_bytes;
    uint64_t postcopy_bytes, postcopy_requests;
    double mbps;
    bool has_ram, has_total_time, has_downtime, has_expected_downtime, has_setup_time;
    char dirty_tracker[32];
    char socket_address[160];   /* destination: first listening address as a URI */
    char error_desc[LM_ERROR_MAX];
};

/* Fill `mi` from a query-migrate reply. */
void mig_info_parse(const json_t *r, struct mig_info *mi);

/* completed, failed or cancelled */
bool migrate_status_final(const char *status);

struct migrate_opts {
    json_t *caps;        /* object NAME -> true/false; NULL for none */
    json_t *params;      /* object NAME -> string value as given; NULL for none */
    json_t *objects;     /* object-add arguments, sent first; NULL for none */
    int timeout_s;       /* cancel after this long; <= 0: no limit */
    const char *prefix;  /* for messages: "livemig migrate" */
    FILE *out;           /* progress and summary; NULL = stdout.  Progress is
                            one updating line when this is a terminal. */
    /* --postcopy: 0 off; MIGRATE_POSTCOPY_AUTO the engine switches when
     * precopy cannot converge (x-postcopy-after); N > 0: migrate-start-postcopy
     * N ms after the start, as a QEMU script does.  Either sets postcopy-ram. */
    int64_t postcopy;
};
#define MIGRATE_POSTCOPY_AUTO (-1)
/* Parse --postcopy's value (off, auto, or a time like 3000 or 3s). */
int migrate_opt_postcopy(struct migrate_opts *o, const char *arg, lm_error *err);

/* Parse "NAME=on|off" into opts->caps, "NAME=VALUE" into opts->params. */
int migrate_opt_cap(struct migrate_opts *o, const char *arg, lm_error *err);
int migrate_opt_param(struct migrate_opts *o, const char *arg, lm_error *err);
void migrate_opts_free(struct migrate_opts *o);

/* Block SIGINT and SIGTERM in the calling thread (and threads it creates). */
void migrate_block_signals(void);
/* Was SIGINT or SIGTERM delivered since?  Consumes it. */
bool migrate_interrupted(void);

/*
 * Run a whole migration of the guest behind `src` to `uri`.  Returns 0 when
 * it completed; otherwise a negative errno with the reason in err (failed
 * with the source's error-desc, cancelled on timeout or interrupt, or a QMP
 * problem).  *final (may be NULL) gets the last query-migrate.
 */
int migrate_drive(struct qmpc *src, const char *uri, const struct migrate_opts *o,
                  struct mig_info *final, lm_error *err);

#endif
