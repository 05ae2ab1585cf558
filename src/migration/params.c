/*
 * Capabilities and parameters: one table each, used by lm_cap_* /
 * lm_param_* and therefore by QMP and the CLI alike.  Names, defaults and
 * ranges are QEMU's, except max-bandwidth, which defaults to unlimited (0)
 * instead of QEMU's 128 MiB/s (see docs/format.md, "Differences").
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "migration/migration.h"
#include "multifd/multifd.h"
#include "util/error.h"

static const char *const cap_names[MIG_CAP__MAX] = {
    [MIG_CAP_EVENTS] = "events",
    [MIG_CAP_AUTO_CONVERGE] = "auto-converge",
    [MIG_CAP_MULTIFD] = "multifd",
    [MIG_CAP_MAPPED_RAM] = "mapped-ram",
    [MIG_CAP_COMPRESS] = "compress",
    [MIG_CAP_POSTCOPY_RAM] = "postcopy-ram",
    [MIG_CAP_RETURN_PATH] = "return-path",
    [MIG_CAP_POSTCOPY_PREEMPT] = "postcopy-preempt",
    [MIG_CAP_IGNORE_SHARED] = "x-ignore-shared",
    /* livemig's own, off by default: every page checksummed (XXH3) on the
     * wire and in files, checked on arrival; both sides must set it. */
    [MIG_CAP_INTEGRITY] = "x-integrity",
};

typedef struct param_def {
    const char *name;
    lm_param_type type;
    size_t offset;          /* into mig_paramset, int64_t fields */
    int64_t min, max, def;
    bool live;              /* may change while a migration runs */
    const char *const *choices;   /* LM_PARAM_STR: the value is the index */
    size_t strsize;         /* LM_PARAM_STR without choices: a char[strsize] at offset */
} param_def;

static const char *const compression_choices[] = { "none", "zlib", "zstd", NULL };
static const char *const zero_choices[] = { "none", "legacy", "multifd", NULL };
/* QEMU's MigMode, in cpr_mode's order (src/cpr/cpr.h) */
static const char *const mode_choices[] = { "normal", "cpr-reboot", "cpr-transfer", NULL };

#define P(n, f, lo, hi, d, l) { n, LM_PARAM_INT, offsetof(mig_paramset, f), lo, hi, d, l, NULL, 0 }
#define S(n, f, d, c) { n, LM_PARAM_STR, offsetof(mig_paramset, f), 0, 0, d, false, c, 0 }
#define B(n, f, d) { n, LM_PARAM_BOOL, offsetof(mig_paramset, f), 0, 1, d, false, NULL, 0 }
/* A free string, "" by default (QEMU's tls-* parameters). */
#define T(n, f) { n, LM_PARAM_STR, offsetof(mig_paramset, f), 0, 0, 0, false, NULL, \
                  sizeof(((mig_paramset *)0)->f) }
static const param_def param_defs[] = {
    P("downtime-limit", downtime_limit, 0, 2000000, 300, true),
    P("max-bandwidth", max_bandwidth, 0, INT64_MAX, 0, true),
    P("avail-switchover-bandwidth", avail_switchover_bandwidth, 0, INT64_MAX, 0, true),
    P("cpu-throttle-initial", cpu_throttle_initial, 1, 99, 20, true),
    P("cpu-throttle-increment", cpu_throttle_increment, 1, 99, 10, true),
    P("max-cpu-throttle", max_cpu_throttle, 1, 99, 99, true),
    P("throttle-trigger-threshold", throttle_trigger_threshold, 1, 100, 50, true),
    P("multifd-channels", multifd_channels, 1, MULTIFD_MAX_CHANNELS, 2, false),
    S("multifd-compression", multifd_compression, 0, compression_choices),
    P("multifd-zlib-level", multifd_zlib_level, 0, 9, 1, false),
    P("multifd-zstd-level", multifd_zstd_level, 0, 20, 1, false),
    S("zero-page-detection", zero_page_detection, 2, zero_choices),
    B("direct-io", direct_io, 0),
    P("compress-level", compress_level, 0, 9, 1, false),
    P("compress-threads", compress_threads, 1, 255, 8, false),
    P("decompress-threads", decompress_threads, 1, 255, 2, false),
    /* livemig's own: how long the source waits, after the whole stream was
     * sent, for the destination to say it runs the guest (or failed). */
    P("switchover-confirm-timeout", switchover_confirm_timeout, 100, 86400000, 300000, true),
    /* livemig's own: a tcp link that drops everything (no reset) fails the
     * migration on both sides after about this long (0: TCP's ~15 min). */
    P("link-timeout", link_timeout, 0, 3600000, 10000, false),
    P("max-postcopy-bandwidth", max_postcopy_bandwidth, 0, INT64_MAX, 0, true),
    /* livemig's own (postcopy-ram on): switch to postcopy without
     * migrate-start-postcopy when precopy cannot converge -- inside a pass,
     * most of what was sent in two 250 ms windows in a row was written
     * again; or a pass ended with a remainder over the downtime limit that
     * did not shrink by a fifth since the pass before -- or when precopy
     * has run this many ms.  0 = only on request, as QEMU. */
    P("x-postcopy-after", postcopy_after, 0, 86400000, 0, true),
    S("mode", mode, 0, mode_choices),
    /* TLS (src/tls/): ids of objects made with object-add / lm_tls_*_add. */
    T("tls-creds", tls_creds),
    T("tls-hostname", tls_hostname),
    T("tls-authz", tls_authz),
};
#undef T
#undef P
#undef S
#undef B
#define NPARAMS ((int)(sizeof(param_defs) / sizeof(param_defs[0])))

void params_init(mig_paramset *p)
{
    for (int i = 0; i < NPARAMS; i++) {
        if (param_defs[i].strsize)
            *((char *)p + param_defs[i].offset) = 0;
        else
            *(int64_t *)((char *)p + param_defs[i].offset) = param_defs[i].def;
    }
}

const char *lm_cap_name(int i)
{
    return i >= 0 && i < MIG_CAP__MAX ? cap_names[i] : NULL;
}

static int cap_index(const char *name)
{
    for (int i = 0; i < MIG_CAP__MAX; i++)
        if (!strcmp(cap_names[i], name))
            return i;
    return -1;
}

static bool mig_busy(lm_mig *m)
{
    return !mig_status_final(m->status);
}

int lm_cap_set(lm_mig *m, const char *name, bool on, lm_error *err)
{
    int i = cap_index(name), ret = 0;

    if (i < 0)
        return error_set(err, -ENOENT, "Capability '%s' not found", name);
    pthread_mutex_lock(&m->lock);
    if (mig_busy(m))
        ret = error_set(err, -EBUSY, "There's a migration process in progress");
    else
        m->caps[i] = on;
    pthread_mutex_unlock(&m->lock);
    return ret;
}

int lm_cap_get(lm_mig *m, const char *name, bool *on)
{
    int i = cap_index(name);

    if (i < 0)
        return -ENOENT;
    pthread_mutex_lock(&m->lock);
    *on = m->caps[i];
    pthread_mutex_unlock(&m->lock);
    return 0;
}

const char *lm_param_name(int i)
{
    return i >= 0 && i < NPARAMS ? param_defs[i].name : NULL;
}

lm_param_type lm_param_type_of(int i)
{
    return i >= 0 && i < NPARAMS ? param_defs[i].type : LM_PARAM_INT;
}

static const param_def *param_find(const char *name)
{
    for (int i = 0; i < NPARAMS; i++)
        if (!strcmp(param_defs[i].name, name))
            return &param_defs[i];
    return NULL;
}

static const char *const type_names[] = {
    [LM_PARAM_INT] = "integer", [LM_PARAM_BOOL] = "boolean", [LM_PARAM_STR] = "string",
};

/* Look the parameter up and check its type: the one place for both errors. */
static const param_def *param_lookup(const char *name, lm_param_type type, lm_error *err)
{
    const param_def *d = param_find(name);

    if (!d)
        error_set(err, -ENOENT, "Parameter '%s' is unexpected", name);
    else if (d->type != type)
        error_set(err, -EINVAL, "Invalid parameter type for '%s', expected: %s", name,
                  type_names[d->type]);
    return d && d->type == type ? d : NULL;
}

/* Store a checked value; parameters QEMU lets change live are `live`. */
static int param_store(lm_mig *m, const param_def *d, int64_t v, lm_error *err)
{
    int ret = 0;

    pthread_mutex_lock(&m->lock);
    if (!d->live && mig_busy(m))
        ret = error_set(err, -EBUSY, "Parameter '%s' cannot change during a migration",
                        d->name);
    else
        *(int64_t *)((char *)&m->params + d->offset) = v;
    pthread_mutex_unlock(&m->lock);
    return ret;
}

int lm_param_set_int(lm_mig *m, const char *name, int64_t v, lm_error *err)
{
    const param_def *d = param_lookup(name, LM_PARAM_INT, err);

    if (!d)
        return err && err->code ? err->code : -EINVAL;
    if (v < d->min || v > d->max)
        return error_set(err, -ERANGE, "Parameter '%s' expects a value between %lld "
                         "and %lld", name, (long long)d->min, (long long)d->max);
    return param_store(m, d, v, err);
}

int lm_param_set_bool(lm_mig *m, const char *name, bool v, lm_error *err)
{
    const param_def *d = param_lookup(name, LM_PARAM_BOOL, err);

    return d ? param_store(m, d, v, err) : (err && err->code ? err->code : -EINVAL);
}

int lm_param_set_str(lm_mig *m, const char *name, const char *v, lm_error *err)
{
    const param_def *d = param_lookup(name, LM_PARAM_STR, err);
    char list[128] = "";

    if (!d)
        return err && err->code ? err->code : -EINVAL;
    if (d->strsize) {
        int ret = 0;

        if (strlen(v) >= d->strsize)
            return error_set(err, -EINVAL, "Parameter '%s': value too long (at most %zu bytes)",
                             name, d->strsize - 1);
        pthread_mutex_lock(&m->lock);
        if (mig_busy(m))
            ret = error_set(err, -EBUSY, "Parameter '%s' cannot change during a migration",
                            name);
        else
            snprintf((char *)&m->params + d->offset, d->strsize, "%s", v);
        pthread_mutex_unlock(&m->lock);
        return ret;
    }
    for (int i = 0; d->choices[i]; i++) {
        if (!strcmp(d->choices[i], v))
            return param_store(m, d, i, err);
        snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%s", i ? ", " : "",
                 d->choices[i]);
    }
    return error_set(err, -EINVAL, "Parameter '%s' does not accept value '%s' (expected "
                     "one of: %s)", name, v, list);
}

int lm_param_get(lm_mig *m, const char *name, int64_t *iv, bool *bv, char *sv, size_t svlen)
{
    const param_def *d = param_find(name);

    int64_t v;

    if (!d)
        return -ENOENT;
    pthread_mutex_lock(&m->lock);
    if (d->strsize) {
        if (sv && svlen)
            snprintf(sv, svlen, "%s", (const char *)&m->params + d->offset);
        pthread_mutex_unlock(&m->lock);
        return 0;
    }
    v = *(const int64_t *)((const char *)&m->params + d->offset);
    pthread_mutex_unlock(&m->lock);
    if (d->type == LM_PARAM_STR) {
        if (sv && svlen)
            snprintf(sv, svlen, "%s", d->choices[v]);
    } else if (d->type == LM_PARAM_BOOL) {
        if (bv)
            *bv = v != 0;
    } else if (iv) {
        *iv = v;
    }
    return 0;
}
