/*
 * `livemig migrate`: drive a migration of a running source over QMP.
 *
 * The loop is deliberately simple and bounded everywhere:
 *
 *   set capabilities, set parameters, migrate {"uri"}
 *   every 100 ms: query-migrate, show progress
 *   in between: wait for QMP input (MIGRATION events end the wait early,
 *               so the final status is seen without waiting out the tick)
 *   Ctrl-C or --timeout: migrate_cancel once, then keep polling until the
 *               status is final (a cancel can lose the race against
 *               completion; whatever the source says last is the truth),
 *               giving up after CANCEL_WAIT_MS.
 *
 * Each QMP command has its own CMD_TIMEOUT_MS, so a stuck source turns into
 * an error, not a hang.  The summary uses `info migrate`'s labels so output
 * can be compared with QEMU's side by side.
 *
 * Parameter values are typed the way the source types them: the current
 * query-migrate-parameters says whether NAME is an integer (sizes like 100M
 * are accepted), a bool (on/off) or a string.
 */
#include "migrate.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commands.h"
#include "tlsopts.h"
#include "util.h"

#define POLL_MS 100
#define CMD_TIMEOUT_MS 10000
#define CONNECT_TIMEOUT_MS 3000     /* the source should be up already */
#define CANCEL_WAIT_MS 30000
#define MIB (1024.0 * 1024.0)

/* ---------------------------------------------------------------- parsing */

static int64_t jint(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    if (json_is_integer(v))
        return json_integer_value(v);
    if (json_is_real(v))
        return (int64_t)json_real_value(v);
    return 0;
}

static void jstr(const json_t *o, const char *key, char *buf, size_t len)
{
    const char *s = json_string_value(json_object_get(o, key));
    if (s)
        snprintf(buf, len, "%s", s);
}

/* First entry of "socket-address" as a URI: tcp:HOST:PORT or unix:PATH. */
static void parse_socket_address(const json_t *r, char *buf, size_t len)
{
    const json_t *sa = json_object_get(r, "socket-address");
    const json_t *a = json_is_array(sa) ? json_array_get(sa, 0) : NULL;
    const char *type = json_string_value(json_object_get(a, "type"));
    char port[32] = "";

    if (!type)
        return;
    if (!strcmp(type, "inet")) {
        const char *host = json_string_value(json_object_get(a, "host"));
        const json_t *p = json_object_get(a, "port");   /* a string in QEMU */
        if (json_is_string(p))
            snprintf(port, sizeof(port), "%s", json_string_value(p));
        else if (json_is_integer(p))
            snprintf(port, sizeof(port), "%lld", (long long)json_integer_value(p));
        if (host && strchr(host, ':'))
            snprintf(buf, len, "tcp:[%s]:%s", host, port);
        else
            snprintf(buf, len, "tcp:%s:%s", host ? host : "", port);
    } else if (!strcmp(type, "unix")) {
        const char *path = json_string_value(json_object_get(a, "path"));
        snprintf(buf, len, "unix:%s", path ? path : "");
    }
}

void mig_info_parse(const json_t *r, struct mig_info *mi)
{
    memset(mi, 0, sizeof(*mi));
    snprintf(mi->status, sizeof(mi->status), "none");
    jstr(r, "status", mi->status, sizeof(mi->status));
    mi->has_total_time = json_object_get(r, "total-time") != NULL;
    mi->total_time = jint(r, "total-time");
    mi->has_downtime = json_object_get(r, "downtime") != NULL;
    mi->downtime = jint(r, "downtime");
    mi->has_expected_downtime = json_object_get(r, "expected-downtime") != NULL;
    mi->expected_downtime = jint(r, "expected-downtime");
    mi->has_setup_time = json_object_get(r, "setup-time") != NULL;
    mi->setup_time = jint(r, "setup-time");
    mi->throttle_percent = jint(r, "cpu-throttle-percentage");
    jstr(r, "error-desc", mi->error_desc, sizeof(mi->error_desc));
    parse_socket_address(r, mi->socket_address, sizeof(mi->socket_address));

    const json_t *ram = json_object_get(r, "ram");
    mi->has_ram = json_is_object(ram);
    if (mi->has_ram) {
        mi->transferred = jint(ram, "transferred");
        mi->remaining = jint(ram, "remaining");
        mi->total = jint(ram, "total");
        mi->duplicate = jint(ram, "duplicate");
        mi->normal = jint(ram, "normal");
        mi->normal_bytes = jint(ram, "normal-bytes");
        mi->dirty_sync_count = jint(ram, "dirty-sync-count");
        mi->page_size = jint(ram, "page-size");
        mi->dirty_pages_rate = jint(ram, "dirty-pages-rate");
        mi->pages_per_second = jint(ram, "pages-per-second");
        mi->precopy_bytes = jint(ram, "precopy-bytes");
        mi->postcopy_bytes = jint(ram, "postcopy-bytes");
        mi->postcopy_requests = jint(ram, "postcopy-requests");
        mi->downtime_bytes = jint(ram, "downtime-bytes");
        const json_t *mb = json_object_get(ram, "mbps");
        mi->mbps = json_is_number(mb) ? json_number_value(mb) : 0;
    }
    /* Not a QEMU field; accept it at the top level or under "ram". */
    static const char *const tk[] = { "dirty-tracker", "x-dirty-tracker" };
    for (size_t i = 0; i < 2 && !mi->dirty_tracker[0]; i++) {
        jstr(r, tk[i], mi->dirty_tracker, sizeof(mi->dirty_tracker));
        if (mi->has_ram && !mi->dirty_tracker[0])
            jstr(ram, tk[i], mi->dirty_tracker, sizeof(mi->dirty_tracker));
    }
}

bool migrate_status_final(const char *s)
{
    return !strcmp(s, "completed") || !strcmp(s, "failed") || !strcmp(s, "cancelled");
}

/* ---------------------------------------------------------------- options */

static int parse_bool_word(const char *v)
{
    if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "yes"))
        return 1;
    if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no"))
        return 0;
    return -1;
}

static int split_assign(const char *arg, char *name, size_t nlen, const char **val,
                        const char *what, lm_error *err)
{
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg || (size_t)(eq - arg) >= nlen)
        return tool_error(err, -EINVAL, "%s '%s': expected NAME=VALUE", what, arg);
    memcpy(name, arg, (size_t)(eq - arg));
    name[eq - arg] = 0;
    *val = eq + 1;
    return 0;
}

int migrate_opt_cap(struct migrate_opts *o, const char *arg, lm_error *err)
{
    char name[128];
    const char *v = NULL;
    int rc = split_assign(arg, name, sizeof(name), &v, "--cap", err);
    if (rc)
        return rc;
    int b = parse_bool_word(v);
    if (b < 0)
        return tool_error(err, -EINVAL, "--cap %s: value must be on or off, not '%s'", name, v);
    if (!o->caps)
        o->caps = json_object();
    json_object_set_new(o->caps, name, json_boolean(b));
    return 0;
}

int migrate_opt_param(struct migrate_opts *o, const char *arg, lm_error *err)
{
    char name[128];
    const char *v = NULL;
    int rc = split_assign(arg, name, sizeof(name), &v, "--param", err);
    if (rc)
        return rc;
    if (!o->params)
        o->params = json_object();
    json_object_set_new(o->params, name, json_string(v));
    return 0;
}

void migrate_opts_free(struct migrate_opts *o)
{
    json_decref(o->caps);
    json_decref(o->params);
    json_decref(o->objects);
    o->caps = o->params = o->objects = NULL;
}

/* ---------------------------------------------------------------- signals */

static void interrupt_set(sigset_t *s)
{
    sigemptyset(s);
    sigaddset(s, SIGINT);
    sigaddset(s, SIGTERM);
}

void migrate_block_signals(void)
{
    sigset_t s;
    interrupt_set(&s);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
}

bool migrate_interrupted(void)
{
    sigset_t s;
    struct timespec zero = { 0, 0 };
    interrupt_set(&s);
    return sigtimedwait(&s, NULL, &zero) > 0;
}

/* ---------------------------------------------------------------- setup */

static int set_caps(struct qmpc *c, const json_t *caps, lm_error *err)
{
    json_t *list = json_array();
    const char *name;
    json_t *v;
    bool has_events = false;

    json_object_foreach((json_t *)caps, name, v) {
        has_events |= !strcmp(name, "events");
        json_array_append_new(list, json_pack("{s:s, s:O}", "capability", name,
                                              "state", v));
    }
    /* MIGRATION events let the drive loop see the end without waiting for
     * the next poll; turn them on unless the user said otherwise. */
    if (!has_events)
        json_array_append_new(list, json_pack("{s:s, s:b}", "capability", "events",
                                              "state", 1));
    return qmpc_execute(c, "migrate-set-capabilities",
                        json_pack("{s:o}", "capabilities", list), NULL, CMD_TIMEOUT_MS, err);
}

/* Convert "VALUE" to the JSON type the source uses for `name`. */
static json_t *typed_param(const json_t *current, const char *name, const char *v,
                           lm_error *err)
{
    const json_t *cur = json_object_get(current, name);
    int64_t iv;

    if (json_is_boolean(cur) || (!cur && parse_bool_word(v) >= 0)) {
        int b = parse_bool_word(v);
        if (b < 0) {
            tool_error(err, -EINVAL, "--param %s: value must be on or off, not '%s'", name, v);
            return NULL;
        }
        return json_boolean(b);
    }
    if (json_is_integer(cur) || json_is_real(cur) || !cur) {
        if (tool_parse_int(v, INT64_MIN, INT64_MAX, &iv))
            return json_integer(iv);
        iv = lm_parse_size(v);
        if (iv >= 0)
            return json_integer(iv);
        if (cur) {
            tool_error(err, -EINVAL, "--param %s: '%s' is not an integer or a size", name, v);
            return NULL;
        }
    }
    return json_string(v);
}

static int set_params(struct qmpc *c, const json_t *params, lm_error *err)
{
    json_t *current = NULL, *args = json_object();
    const char *name;
    json_t *v;
    int rc;

    rc = qmpc_execute(c, "query-migrate-parameters", NULL, &current, CMD_TIMEOUT_MS, err);
    if (rc)
        goto out;
    json_object_foreach((json_t *)params, name, v) {
        json_t *tv = typed_param(current, name, json_string_value(v), err);
        if (!tv) {
            rc = -EINVAL;
            goto out;
        }
        json_object_set_new(args, name, tv);
    }
    rc = qmpc_execute(c, "migrate-set-parameters", args, NULL, CMD_TIMEOUT_MS, err);
    args = NULL;
out:
    json_decref(args);
    json_decref(current);
    return rc;
}

/* ---------------------------------------------------------------- display */

static void progress_text(const struct mig_info *mi, char *buf, size_t len)
{
    if (!mi->has_ram || !mi->total || !strcmp(mi->status, "setup")) {
        snprintf(buf, len, "%s", mi->status);
        return;
    }
    uint64_t rem = mi->remaining < mi->total ? mi->remaining : mi->total;
    int n = snprintf(buf, len,
                     "%s %5.1f%% done, %.1f MiB remaining, %.1f MB/s, iteration %llu",
                     mi->status, 100.0 * (double)(mi->total - rem) / (double)mi->total,
                     (double)rem / MIB, mi->mbps / 8.0,
                     (unsigned long long)mi->dirty_sync_count);
    if (n >= 0 && (size_t)n < len && mi->has_expected_downtime)
        n += snprintf(buf + n, len - n, ", expected downtime %lld ms",
                      (long long)mi->expected_downtime);
    if (n >= 0 && (size_t)n < len && mi->throttle_percent)
        snprintf(buf + n, len - n, ", throttle %lld%%", (long long)mi->throttle_percent);
}

static void print_summary(FILE *f, const struct mig_info *mi)
{
    fprintf(f, "Migration status: %s\n", mi->status);
    if (mi->has_total_time)
        fprintf(f, "total time: %lld ms\n", (long long)mi->total_time);
    if (mi->has_downtime)
        fprintf(f, "downtime: %lld ms\n", (long long)mi->downtime);
    if (mi->has_expected_downtime && !migrate_status_final(mi->status))
        fprintf(f, "expected downtime: %lld ms\n", (long long)mi->expected_downtime);
    if (mi->has_setup_time)
        fprintf(f, "setup: %lld ms\n", (long long)mi->setup_time);
    if (mi->has_ram) {
        fprintf(f, "transferred ram: %llu kbytes\n", (unsigned long long)(mi->transferred >> 10));
        fprintf(f, "throughput: %.2f mbps\n", mi->mbps);
        fprintf(f, "remaining ram: %llu kbytes\n", (unsigned long long)(mi->remaining >> 10));
        fprintf(f, "total ram: %llu kbytes\n", (unsigned long long)(mi->total >> 10));
        fprintf(f, "duplicate: %llu pages\n", (unsigned long long)mi->duplicate);
        fprintf(f, "normal: %llu pages\n", (unsigned long long)mi->normal);
        fprintf(f, "normal bytes: %llu kbytes\n", (unsigned long long)(mi->normal_bytes >> 10));
        fprintf(f, "dirty sync count: %llu\n", (unsigned long long)mi->dirty_sync_count);
        fprintf(f, "page size: %llu kbytes\n", (unsigned long long)(mi->page_size >> 10));
        fprintf(f, "dirty pages rate: %llu pages\n", (unsigned long long)mi->dirty_pages_rate);
        fprintf(f, "pages-per-second: %llu\n", (unsigned long long)mi->pages_per_second);
        if (mi->postcopy_bytes) {
            fprintf(f, "postcopy ram: %llu kbytes\n", (unsigned long long)(mi->postcopy_bytes >> 10));
            fprintf(f, "postcopy request count: %llu\n",
                    (unsigned long long)mi->postcopy_requests);
        }
        if (mi->precopy_bytes || mi->downtime_bytes) {
            fprintf(f, "precopy ram: %llu kbytes\n", (unsigned long long)(mi->precopy_bytes >> 10));
            fprintf(f, "downtime ram: %llu kbytes\n",
                   (unsigned long long)(mi->downtime_bytes >> 10));
        }
    }
    if (mi->throttle_percent)
        fprintf(f, "cpu throttle percentage: %lld\n", (long long)mi->throttle_percent);
    fprintf(f, "dirty tracker: %s\n", mi->dirty_tracker[0] ? mi->dirty_tracker : "unknown");
    if (mi->error_desc[0])
        fprintf(f, "error: %s\n", mi->error_desc);
    fflush(f);
}

int migrate_opt_postcopy(struct migrate_opts *o, const char *arg, lm_error *err)
{
    char *end;
    double v;

    if (!strcmp(arg, "off")) {
        o->postcopy = 0;
        return 0;
    }
    if (!strcmp(arg, "auto")) {
        o->postcopy = MIGRATE_POSTCOPY_AUTO;
        return 0;
    }
    v = strtod(arg, &end);
    if (end != arg && !strcmp(end, "s"))
        v *= 1000;
    else if (end == arg || (*end && strcmp(end, "ms")))
        v = -1;
    if (v < 1 || v > 86400000.0)
        return tool_error(err, -EINVAL, "--postcopy: '%s' is not off, auto or a time "
                          "(3000, 3000ms, 3s)", arg);
    o->postcopy = (int64_t)v;
    return 0;
}

/* --postcopy: the capability, and for auto the engine's own switch. */
static int set_postcopy(struct qmpc *src, const struct migrate_opts *o, lm_error *err)
{
    json_t *caps, *params;
    int rc;

    if (!o->postcopy)
        return 0;
    caps = json_pack("{s:[{s:s,s:b}]}", "capabilities", "capability", "postcopy-ram",
                     "state", 1);
    rc = qmpc_execute(src, "migrate-set-capabilities", caps, NULL, CMD_TIMEOUT_MS, err);
    if (rc || o->postcopy != MIGRATE_POSTCOPY_AUTO)
        return rc;
    /* switch when the forecast says precopy will not converge, or at 60 s */
    params = json_pack("{s:I}", "x-postcopy-after", (json_int_t)60000);
    return qmpc_execute(src, "migrate-set-parameters", params, NULL, CMD_TIMEOUT_MS, err);
}

/* ---------------------------------------------------------------- drive */

/*
 * object-add each of `objs` on the source; an object of the same id left
 * by an earlier run is deleted first (object-del's "not found" is fine).
 */
static int add_objects(struct qmpc *c, const json_t *objs, lm_error *err)
{
    size_t i;
    json_t *o;

    json_array_foreach((json_t *)objs, i, o) {
        lm_error ignore = { 0 };
        int rc;

        qmpc_execute(c, "object-del", json_pack("{s:O}", "id", json_object_get(o, "id")),
                     NULL, CMD_TIMEOUT_MS, &ignore);
        rc = qmpc_execute(c, "object-add", json_incref(o), NULL, CMD_TIMEOUT_MS, err);
        if (rc)
            return rc;
    }
    return 0;
}

int migrate_drive(struct qmpc *src, const char *uri, const struct migrate_opts *o,
                  struct mig_info *final, lm_error *err)
{
    struct mig_info mi;
    FILE *out = o->out ? o->out : stdout;
    bool tty = isatty(fileno(out)), line_open = false;
    const char *pfx = o->prefix ? o->prefix : "livemig";
    char why[128] = "";
    int rc;

    mig_info_parse(NULL, &mi);
    rc = add_objects(src, o->objects, err);
    if (!rc)
        rc = set_postcopy(src, o, err);
    if (!rc)
        rc = set_caps(src, o->caps, err);
    if (!rc && o->params)
        rc = set_params(src, o->params, err);
    if (!rc)
        rc = qmpc_execute(src, "migrate", json_pack("{s:s}", "uri", uri), NULL,
                          CMD_TIMEOUT_MS, err);
    if (rc)
        goto out;

    int64_t start = tool_now_ms(), next_query = start, next_line = start, cancel_at = 0;
    bool postcopy_asked = false;
    for (;;) {
        int64_t now = tool_now_ms();
        if (o->postcopy > 0 && !postcopy_asked && now - start >= o->postcopy &&
            (!strcmp(mi.status, "active") || !strcmp(mi.status, "setup"))) {
            postcopy_asked = true;
            lm_error perr = { 0 };
            /* It may be switching over by itself already: then say why not. */
            if (qmpc_execute(src, "migrate-start-postcopy", NULL, NULL, CMD_TIMEOUT_MS, &perr))
                fprintf(stderr, "%s: migrate-start-postcopy: %s\n", pfx, perr.msg);
        }
        if (!why[0] && migrate_interrupted())
            snprintf(why, sizeof(why), "interrupted");
        if (!why[0] && o->timeout_s > 0 && now - start > (int64_t)o->timeout_s * 1000)
            snprintf(why, sizeof(why), "timed out after %d s", o->timeout_s);
        if (why[0] && !cancel_at) {
            if (line_open)
                fputc('\n', out);
            line_open = false;
            fprintf(stderr, "%s: %s, cancelling the migration\n", pfx, why);
            cancel_at = now;
            lm_error cerr = { 0 };
            /* It may have just ended; the next query-migrate tells. */
            if (qmpc_execute(src, "migrate_cancel", NULL, NULL, CMD_TIMEOUT_MS, &cerr))
                fprintf(stderr, "%s: %s\n", pfx, cerr.msg);
            next_query = now;
        }
        if (cancel_at && now - cancel_at > CANCEL_WAIT_MS) {
            rc = tool_error(err, -ETIMEDOUT,
                            "the migration did not end within %d s of migrate_cancel "
                            "(status %s)", CANCEL_WAIT_MS / 1000, mi.status);
            goto out;
        }
        if (now < next_query) {
            int wait_ms = (int)(next_query - now);
            if (o->postcopy > 0 && !postcopy_asked && start + o->postcopy - now < wait_ms)
                wait_ms = (int)(start + o->postcopy - now > 0 ? start + o->postcopy - now : 0);
            rc = qmpc_poll(src, wait_ms, err);
            if (rc)
                goto out;
        }
        json_t *ev;
        while ((ev = qmpc_next_event(src))) {
            const char *name = json_string_value(json_object_get(ev, "event"));
            const char *st = json_string_value(
                json_object_get(json_object_get(ev, "data"), "status"));
            if (name && !strcmp(name, "MIGRATION") && st && migrate_status_final(st))
                next_query = 0;             /* look now: it is over */
            json_decref(ev);
        }
        now = tool_now_ms();
        if (now < next_query)
            continue;

        json_t *r = NULL;
        rc = qmpc_execute(src, "query-migrate", NULL, &r, CMD_TIMEOUT_MS, err);
        if (rc)
            goto out;
        mig_info_parse(r, &mi);
        json_decref(r);
        next_query = tool_now_ms() + POLL_MS;
        if (migrate_status_final(mi.status))
            break;

        char text[256];
        progress_text(&mi, text, sizeof(text));
        if (tty) {
            fprintf(out, "\r%s\033[K", text);
            line_open = true;
            fflush(out);
        } else if (now >= next_line) {
            fprintf(out, "%s\n", text);
            fflush(out);
            next_line = now + 1000;
        }
    }
    if (line_open)
        fputc('\n', out);
    line_open = false;
    print_summary(out, &mi);
    if (!strcmp(mi.status, "completed")) {
        rc = 0;
    } else if (!strcmp(mi.status, "failed")) {
        rc = tool_error(err, -EIO, "migration failed: %s",
                        mi.error_desc[0] ? mi.error_desc : "(no error description)");
    } else if (why[0]) {
        rc = tool_error(err, -ECANCELED, "migration cancelled: %s", why);
    } else {
        rc = tool_error(err, -ECANCELED, "migration cancelled%s%s",
                        mi.error_desc[0] ? ": " : "", mi.error_desc);
    }
out:
    if (line_open)
        fputc('\n', out);
    fflush(out);
    if (final)
        *final = mi;
    return rc;
}

/* ---------------------------------------------------------------- command */

static void migrate_usage(FILE *f)
{
    fprintf(f,
        "Usage: livemig migrate --qmp PATH [options] URI\n"
        "\n"
        "Migrate the running source guest whose QMP socket is PATH to URI\n"
        "(tcp:HOST:PORT, unix:PATH, fd:N, exec:CMD, file:PATH), showing progress.\n"
        "\n"
        "Options:\n"
        "  --qmp PATH            QMP socket of the source (PATH or unix:PATH)\n"
        "  --cap NAME=on|off     set a migration capability (repeatable)\n"
        "  --param NAME=VALUE    set a migration parameter (repeatable); the value\n"
        "                        is typed as the source reports the parameter\n"
        "                        (integers accept K/M/G suffixes)\n"
        "  --timeout S           cancel the migration after S seconds (default 600,\n"
        "                        0 = no limit)\n"
        "  --postcopy WHEN       postcopy-ram on, and switch: 'auto' when precopy\n"
        "                        cannot converge (x-postcopy-after), or after a\n"
        "                        time (3000, 3s) with migrate-start-postcopy;\n"
        "                        'off' (default) leaves it to --cap/--param\n"
        TLSOPT_USAGE
        "  -h, --help            show this help\n"
        "\n"
        "Exit status: 0 completed, 1 failed or cancelled (Ctrl-C cancels), 2 usage.\n");
}

int cmd_migrate(int argc, char **argv)
{
    static const struct option opts[] = {
        { "qmp", required_argument, NULL, 'q' },
        { "cap", required_argument, NULL, 'c' },
        { "param", required_argument, NULL, 'p' },
        { "timeout", required_argument, NULL, 't' },
        { "postcopy", required_argument, NULL, 'P' },
        TLSOPT_LONG_OPTIONS,
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct migrate_opts mo = { .timeout_s = 600, .prefix = "livemig migrate" };
    struct tls_opts tls;
    const char *qmp = NULL;
    struct qmpc *c = NULL;
    lm_error err = { 0 };
    int opt, ret = 2;
    int64_t v;

    optind = 1;
    tls_opts_init(&tls);
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'q':
            qmp = optarg;
            break;
        case 'c':
            if (migrate_opt_cap(&mo, optarg, &err))
                goto usage_err;
            break;
        case 'p':
            if (migrate_opt_param(&mo, optarg, &err))
                goto usage_err;
            break;
        case 'P':
            if (migrate_opt_postcopy(&mo, optarg, &err))
                goto usage_err;
            break;
        case 't':
            if (!tool_parse_int(optarg, 0, 365 * 86400, &v)) {
                tool_error(&err, -EINVAL, "--timeout: '%s' is not a number of seconds", optarg);
                goto usage_err;
            }
            mo.timeout_s = (int)v;
            break;
        case 'h':
            migrate_usage(stdout);
            ret = 0;
            goto out;
        default:
            if (tls_opts_take(&tls, opt, optarg, &err) > 0)
                break;
            goto usage_err;          /* getopt (or the TLS option) said what was wrong */
        }
    }
    if (tls_opts_check(&tls, false, &err))
        goto usage_err;
    mo.objects = tls_opts_objects(&tls, &mo.params);
    if (!qmp) {
        tool_error(&err, -EINVAL, "--qmp PATH is required");
        goto usage_err;
    }
    if (optind != argc - 1) {
        tool_error(&err, -EINVAL, optind == argc ? "missing the destination URI"
                                                 : "expected one URI, got %d arguments",
                   argc - optind);
        goto usage_err;
    }

    migrate_block_signals();
    ret = 1;
    if (qmpc_connect(&c, qmp, CONNECT_TIMEOUT_MS, NULL, NULL, &err)) {
        fprintf(stderr, "livemig migrate: %s\n", err.msg);
        goto out;
    }
    if (migrate_drive(c, argv[optind], &mo, NULL, &err)) {
        fprintf(stderr, "livemig migrate: %s\n", err.msg);
        goto out;
    }
    ret = 0;
    goto out;

usage_err:
    if (err.msg[0])
        fprintf(stderr, "livemig migrate: %s\n", err.msg);
    fprintf(stderr, "Try 'livemig migrate --help'.\n");
    ret = 2;
out:
    qmpc_close(c);
    migrate_opts_free(&mo);
    return ret;
}
