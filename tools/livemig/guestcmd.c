/*
 * `livemig guest`: host the demo guest (guest.c) inside a migration context
 * and serve QMP.
 *
 * This file is the glue between the guest model and the library:
 *
 *   RAM           one block "guest.ram", page size 4096.
 *   device state  the version table, "guest" instance 0 version 1, a FULL
 *                 section (guest_state.c has the encoding).
 *   vm ops        stop/start/throttle map to guest_vm_stop/start/throttle.
 *                 On a destination the first start() after an incoming
 *                 migration began runs the arrival check first (the guest is
 *                 still parked, so it sees exactly what was loaded).
 *   tracking      with the cooperative tracker (or "auto", which may fall
 *                 back to it), writers report each page after writing it.
 *   QMP           quit, x-guest-verify, x-guest-info, x-guest-set-dirty-rate.
 *
 * Threads: main parses options, sets everything up, then sleeps in
 * tool_host_wait() (host.h: the signals, quit and the listener, shared with
 * `livemig vm`).  QMP handlers run on the QMP thread; vm ops and
 * device callbacks on library threads.  Teardown order: QMP (no more
 * handlers), hold the writers (no more write hooks into the context), the
 * library (joins its threads, which may still call vm ops), then the guest
 * (joins the writers).
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "livemig/livemig.h"
#include "livemig/qmp.h"

#include "commands.h"
#include "guest.h"
#include "guest_state.h"
#include "host.h"
#include "tlsopts.h"
#include "util.h"
#include "verify.h"

#define RAM_IDSTR "guest.ram"

struct gctx {
    struct tool_host h;            /* the context, QMP, quit and arrival flags */
    struct guest *g;
    int block;                     /* RAM block index for cooperative marks */
    bool verify_on_arrival;

    pthread_mutex_t lock;          /* protects the arrival result */
    pthread_cond_t arrival_cv;     /* broadcast when it is in (or given up) */
    bool arrival_done;
    struct verify_report arrival;
};

/* ---------------------------------------------------------------- reports */

static json_t *report_json(const struct verify_report *r, bool cached)
{
    json_t *ex = json_array();
    for (unsigned i = 0; i < r->nexamples; i++) {
        const struct verify_example *e = &r->examples[i];
        json_array_append_new(ex, json_pack("{s:I, s:s, s:I, s:I}",
                                            "page", (json_int_t)e->page,
                                            "kind", page_damage_name(e->kind),
                                            "expected-version", (json_int_t)e->expected_version,
                                            "found-version", (json_int_t)e->found_version));
    }
    json_t *o = json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:o, s:I}",
                          "checked", (json_int_t)r->checked, "bad", (json_int_t)r->bad,
                          "lost", (json_int_t)r->lost, "stale", (json_int_t)r->stale,
                          "torn", (json_int_t)r->torn, "misplaced", (json_int_t)r->misplaced,
                          "examples", ex, "time-ms", (json_int_t)r->time_ms);
    if (cached)
        json_object_set_new(o, "cached", json_true());
    return o;
}

/* "<summary> (T ms)" then the example lines, to stderr. */
static void report_print(const char *what, const struct verify_report *r)
{
    char buf[2048];
    verify_format(r, buf, sizeof(buf));
    char *nl = strchr(buf, '\n');
    if (nl)
        *nl = 0;
    fprintf(stderr, "livemig guest: %s: %s (%lld ms)\n", what, buf, (long long)r->time_ms);
    if (nl)
        fprintf(stderr, "%s\n", nl + 1);
    fflush(stderr);
}

/* ---------------------------------------------------------------- vm ops */

static void vm_stop(void *opaque)
{
    struct gctx *gc = opaque;
    lm_error err = { 0 };

    if (guest_vm_stop(gc->g, &err))
        fprintf(stderr, "livemig guest: %s\n", err.msg);
}

/* The arrival check: every page against the table; a bad page ends the
 * process (a corrupt guest must not run; nothing to clean up for). */
static void arrival_check(struct gctx *gc)
{
    struct verify_report r;
    lm_error err = { 0 };

    if (guest_verify(gc->g, &r, &err)) {
        fprintf(stderr, "livemig guest: arrival check: %s\n", err.msg);
        return;
    }
    pthread_mutex_lock(&gc->lock);
    gc->arrival = r;
    gc->arrival_done = true;
    pthread_cond_broadcast(&gc->arrival_cv);
    pthread_mutex_unlock(&gc->lock);
    report_print("arrival check", &r);
    if (r.bad)
        _exit(3);
}

/* Postcopy: the check after the last page (main thread, tool_host_wait). */
static void late_arrival(struct tool_host *h)
{
    struct gctx *gc = (struct gctx *)h;     /* h is its first member */

    arrival_check(gc);
    pthread_mutex_lock(&gc->lock);
    atomic_store(&gc->h.postcopy_arrival, false);
    pthread_cond_broadcast(&gc->arrival_cv);
    pthread_mutex_unlock(&gc->lock);
}

static void vm_start(void *opaque)
{
    struct gctx *gc = opaque;

    /* The first start of a destination once an incoming migration began is
     * the arrival; in postcopy the writers run (and fault) before the last
     * page, and the check waits for the end. */
    if (tool_host_check_at_start(&gc->h, gc->verify_on_arrival))
        arrival_check(gc);
    guest_vm_start(gc->g);
}

static void vm_throttle(void *opaque, int percent)
{
    struct gctx *gc = opaque;
    guest_throttle(gc->g, percent);
}

/* ---------------------------------------------------------------- tracking */

static void mark_dirty(void *opaque, uint64_t page)
{
    struct gctx *gc = opaque;
    lm_ram_mark_dirty_idx(gc->h.m, gc->block, page * GUEST_PAGE_SIZE, GUEST_PAGE_SIZE);
}

/* ---------------------------------------------------------------- QMP */

static int qmp_verify(void *opaque, const char *args_json, char **reply_json, lm_error *err)
{
    struct gctx *gc = opaque;
    json_t *a = tool_host_args(args_json, err);
    struct verify_report r;
    int rc = 0;

    if (!a)
        return -EINVAL;
    json_t *cached = json_object_get(a, "cached");
    if (cached && !json_is_boolean(cached)) {
        rc = tool_error(err, -EINVAL, "'cached' must be a boolean");
        goto out;
    }
    if (json_is_true(cached)) {
        pthread_mutex_lock(&gc->lock);
        /* After postcopy the check runs once the migration completed: a
         * client that saw "completed" waits for it here (bounded). */
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += 120;
        while (!gc->arrival_done && atomic_load(&gc->h.postcopy_arrival) &&
               pthread_cond_timedwait(&gc->arrival_cv, &gc->lock, &dl) == 0)
            ;
        bool done = gc->arrival_done;
        r = gc->arrival;
        pthread_mutex_unlock(&gc->lock);
        if (!done) {
            rc = tool_error(err, -ENOENT, "no arrival check has run%s",
                            gc->h.incoming ? (gc->verify_on_arrival ? " yet" : " (--verify-on-arrival off)")
                                         : " (not a destination)");
            goto out;
        }
        rc = tool_host_reply(report_json(&r, true), reply_json, err);
        goto out;
    }
    if (lm_runstate_get(gc->h.m) == LM_RUN_INMIGRATE) {
        rc = tool_error(err, -EBUSY, "an incoming migration is loading guest RAM; "
                                     "verify after it completes");
        goto out;
    }
    rc = guest_verify(gc->g, &r, err);
    if (!rc)
        rc = tool_host_reply(report_json(&r, false), reply_json, err);
out:
    json_decref(a);
    return rc;
}

static int qmp_info(void *opaque, const char *args_json, char **reply_json, lm_error *err)
{
    struct gctx *gc = opaque;
    const struct guest_config *c = guest_config(gc->g);

    json_t *o = json_pack("{s:I, s:I, s:I, s:I, s:s, s:s, s:I, s:s, s:b, s:I}",
                          "mem", (json_int_t)c->mem,
                          "pages", (json_int_t)guest_pages(gc->g),
                          "vcpus", (json_int_t)c->vcpus,
                          "dirty-rate", (json_int_t)guest_rate(gc->g),
                          "pattern", guest_pattern_name(c->pattern),
                          "fill", guest_fill_name(guest_fill(gc->g)),
                          "writes", (json_int_t)guest_writes(gc->g),
                          "dirty-tracker", lm_dirty_tracker_name(gc->h.m),
                          "running", guest_vm_running(gc->g),
                          "last-stop-us", (json_int_t)(guest_last_stop_ns(gc->g) / 1000));
    return tool_host_reply(o, reply_json, err);
}

static int qmp_set_rate(void *opaque, const char *args_json, char **reply_json, lm_error *err)
{
    struct gctx *gc = opaque;
    json_t *a = tool_host_args(args_json, err);
    int rc = 0;

    if (!a)
        return -EINVAL;
    json_t *r = json_object_get(a, "rate");
    if (!json_is_integer(r) || json_integer_value(r) < -1) {
        rc = tool_error(err, -EINVAL, "'rate' must be an integer: pages/s, 0 idle, -1 max");
        goto out;
    }
    guest_set_rate(gc->g, json_integer_value(r));
    *reply_json = NULL;
out:
    json_decref(a);
    return rc;
}

/* ---------------------------------------------------------------- command */

static void guest_usage(FILE *f)
{
    fprintf(f,
        "Usage: livemig guest [options]\n"
        "\n"
        "Run a self-verifying demo guest: RAM rewritten by writer threads, every\n"
        "page checkable against a version table that migrates as device state.\n"
        "\n"
        "Options:\n"
        "  --mem SIZE                guest RAM, K/M/G suffixes (default 1G)\n"
        "  --vcpus N                 writer threads (default 2)\n"
        "  --dirty-rate N|max        pages/s written by the whole guest (default 0)\n"
        "  --pattern P               random | sequential | hotset (default random;\n"
        "                            hotset sends 90%% of writes to 10%% of pages)\n"
        "  --fill F                  initial content: random | text | zero\n"
        "                            (default random)\n"
        "  --seed N                  seed of the writers' page choice (default 1)\n"
        "  --working-set SIZE        the writers write only the first SIZE of RAM\n"
        "                            (default all of it)\n"
        "  --qmp unix:PATH           serve QMP on this socket\n"
        "  --dirty-tracker T         auto | uffd-wp | cooperative (default auto)\n"
        "  --incoming URI|defer      be a migration destination; 'defer' waits for\n"
        "                            QMP migrate-incoming\n"
        "  --mem-backend B           anon | memfd | file:PATH (default anon): where\n"
        "                            guest RAM lives.  memfd and file RAM can be handed\n"
        "                            over (mode cpr-transfer); a file outlives the\n"
        "                            process (mode cpr-reboot).  An incoming memfd\n"
        "                            guest allocates no RAM: it maps the source's\n"
        "  --mode M                  the migration parameter 'mode' at start: normal |\n"
        "                            cpr-reboot | cpr-transfer (for --incoming URI)\n"
        "  --verify-on-arrival on|off  check every page when an incoming migration\n"
        "                            completes, before the guest runs (default on)\n"
        TLSOPT_USAGE
        "                            (with --incoming they are the destination's;\n"
        "                            without, they are used when QMP migrate runs)\n"
        "  -h, --help                show this help\n"
        "\n"
        "QMP commands besides the migration ones: quit, x-guest-verify\n"
        "{\"cached\": bool}, x-guest-info, x-guest-set-dirty-rate {\"rate\": N}.\n"
        "\n"
        "Exit status: 0 after quit or SIGINT/SIGTERM; 1 on an error or a failed\n"
        "incoming migration; 2 usage; 3 the arrival check found bad pages.\n");
}

struct guest_args {
    struct guest_config cfg;
    const char *qmp;
    const char *tracker;
    const char *incoming;
    const char *mode;
    bool verify_on_arrival;
    struct tls_opts tls;
};

static int guest_parse(int argc, char **argv, struct guest_args *a, lm_error *err)
{
    static const struct option opts[] = {
        { "mem", required_argument, NULL, 'm' },
        { "vcpus", required_argument, NULL, 'v' },
        { "dirty-rate", required_argument, NULL, 'r' },
        { "pattern", required_argument, NULL, 'p' },
        { "fill", required_argument, NULL, 'f' },
        { "seed", required_argument, NULL, 's' },
        { "working-set", required_argument, NULL, 'w' },
        { "qmp", required_argument, NULL, 'q' },
        { "dirty-tracker", required_argument, NULL, 't' },
        { "incoming", required_argument, NULL, 'i' },
        { "verify-on-arrival", required_argument, NULL, 'V' },
        { "mem-backend", required_argument, NULL, 'b' },
        { "mode", required_argument, NULL, 'M' },
        TLSOPT_LONG_OPTIONS,
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int opt, x;
    int64_t v;

    optind = 1;
    tls_opts_init(&a->tls);
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'm':
            v = lm_parse_size(optarg);
            if (v <= 0 || v % GUEST_PAGE_SIZE)
                return tool_error(err, -EINVAL, "--mem: '%s' is not a size that is a "
                                  "multiple of 4096 (e.g. 256M, 1G)", optarg);
            a->cfg.mem = (uint64_t)v;
            break;
        case 'v':
            if (!tool_parse_int(optarg, 1, 1024, &v))
                return tool_error(err, -EINVAL, "--vcpus: '%s' is not a number from 1 to 1024",
                                  optarg);
            a->cfg.vcpus = (unsigned)v;
            break;
        case 'r':
            if (!tool_parse_rate(optarg, &a->cfg.rate))
                return tool_error(err, -EINVAL, "--dirty-rate: '%s' is not a number of "
                                  "pages/s or 'max'", optarg);
            break;
        case 'p':
            if ((x = guest_pattern_parse(optarg)) < 0)
                return tool_error(err, -EINVAL, "--pattern: '%s' is not random, sequential "
                                  "or hotset", optarg);
            a->cfg.pattern = (enum guest_pattern)x;
            break;
        case 'f':
            if ((x = guest_fill_parse(optarg)) < 0)
                return tool_error(err, -EINVAL, "--fill: '%s' is not random, text or zero",
                                  optarg);
            a->cfg.fill = (enum guest_fill)x;
            break;
        case 's':
            if (!tool_parse_int(optarg, 0, INT64_MAX, &v))
                return tool_error(err, -EINVAL, "--seed: '%s' is not a number", optarg);
            a->cfg.seed = (uint64_t)v;
            break;
        case 'w':
            v = lm_parse_size(optarg);
            if (v <= 0 || v % GUEST_PAGE_SIZE)
                return tool_error(err, -EINVAL, "--working-set: '%s' is not a size that is a "
                                  "multiple of 4096", optarg);
            a->cfg.working_set = (uint64_t)v;
            break;
        case 'q':
            if (strncmp(optarg, "unix:", 5) || !optarg[5])
                return tool_error(err, -EINVAL, "--qmp: '%s' is not unix:PATH", optarg);
            a->qmp = optarg;
            break;
        case 't':
            if (strcmp(optarg, "auto") && strcmp(optarg, "uffd-wp") &&
                strcmp(optarg, "cooperative"))
                return tool_error(err, -EINVAL, "--dirty-tracker: '%s' is not auto, uffd-wp "
                                  "or cooperative", optarg);
            a->tracker = optarg;
            break;
        case 'i':
            a->incoming = optarg;
            break;
        case 'V':
            if (!strcmp(optarg, "on"))
                a->verify_on_arrival = true;
            else if (!strcmp(optarg, "off"))
                a->verify_on_arrival = false;
            else
                return tool_error(err, -EINVAL, "--verify-on-arrival: '%s' is not on or off",
                                  optarg);
            break;
        case 'b':
            if (tool_mem_backend_parse(optarg, &a->cfg.backend, &a->cfg.mem_path, err))
                return err->code;
            break;
        case 'M':
            if (strcmp(optarg, "normal") && strcmp(optarg, "cpr-reboot") &&
                strcmp(optarg, "cpr-transfer"))
                return tool_error(err, -EINVAL, "--mode: '%s' is not normal, cpr-reboot or "
                                  "cpr-transfer", optarg);
            a->mode = optarg;
            break;
        case 'h':
            return 1;
        default:
            x = tls_opts_take(&a->tls, opt, optarg, err);
            if (x < 0)
                return x;
            if (x == 0)
                return -EINVAL;      /* getopt said what was wrong */
        }
    }
    if (optind < argc)
        return tool_error(err, -EINVAL, "unexpected argument '%s'", argv[optind]);
    if ((x = tls_opts_check(&a->tls, a->incoming != NULL, err)) < 0)
        return x;
    if (a->incoming && !strcmp(a->incoming, "defer") && !a->qmp)
        return tool_error(err, -EINVAL, "--incoming defer needs --qmp (migrate-incoming "
                          "comes over QMP)");
    if (a->cfg.vcpus > a->cfg.mem / GUEST_PAGE_SIZE)
        return tool_error(err, -EINVAL, "--vcpus %u is more than the %llu pages of --mem",
                          a->cfg.vcpus, (unsigned long long)(a->cfg.mem / GUEST_PAGE_SIZE));
    a->cfg.incoming = a->incoming != NULL;
    return 0;
}

static int guest_setup(struct gctx *gc, const struct guest_args *a, lm_error *err)
{
    static const lm_vm_ops vm_ops = {
        .stop = vm_stop, .start = vm_start, .throttle = vm_throttle,
    };
    int rc;

    rc = guest_new(&gc->g, &a->cfg, err);
    if (rc)
        return rc;
    gc->h.m = lm_new();
    if (a->cfg.backend == GUEST_MEM_ANON)
        rc = lm_ram_register(gc->h.m, RAM_IDSTR, guest_ram(gc->g), a->cfg.mem, GUEST_PAGE_SIZE,
                             err);
    else    /* fd -1 for an incoming memfd guest: the source's memfd is mapped there */
        rc = lm_ram_register_fd(gc->h.m, RAM_IDSTR, guest_ram(gc->g), a->cfg.mem,
                                GUEST_PAGE_SIZE, guest_ram_fd(gc->g), 0, err);
    if (rc)
        return rc;
    if (a->mode && (rc = lm_param_set_str(gc->h.m, "mode", a->mode, err)))
        return rc;
    gc->block = lm_ram_find(gc->h.m, RAM_IDSTR);
    rc = lm_device_register(gc->h.m, GUEST_STATE_IDSTR, 0, GUEST_STATE_VERSION, &guest_state_ops,
                            gc->g, err);
    if (rc)
        return rc;
    lm_set_vm_ops(gc->h.m, &vm_ops, gc);
    rc = tls_opts_apply(&a->tls, gc->h.m, a->incoming != NULL, err);
    if (rc)
        return rc;
    rc = lm_set_dirty_tracker(gc->h.m, a->tracker, err);
    if (rc)
        return rc;
    /* Report writes unless the tracker is known to see them by itself. */
    if (strcmp(lm_dirty_tracker_name(gc->h.m), "uffd-wp"))
        guest_set_write_hook(gc->g, mark_dirty, gc);
    if (lm_add_listener(gc->h.m, &tool_host_listener, &gc->h) < 0)
        return tool_error(err, -ENOSPC, "cannot add a migration listener");
    rc = guest_start_writers(gc->g, err);
    if (rc)
        return rc;
    {
        int tids[LM_MAX_VCPUS], n = guest_writer_tids(gc->g, tids, LM_MAX_VCPUS);
        if (n < 0 || lm_set_vcpu_threads(gc->h.m, tids, n, err))
            return tool_error(err, -EIO, "cannot name the writer threads as vCPUs");
    }

    if (a->qmp) {
        gc->h.q = lm_qmp_new(gc->h.m, a->qmp, err);
        if (!gc->h.q)
            return err->code ? err->code : -EIO;
        if (lm_qmp_register(gc->h.q, "quit", tool_host_qmp_quit, &gc->h) ||
            lm_qmp_register(gc->h.q, "x-guest-verify", qmp_verify, gc) ||
            lm_qmp_register(gc->h.q, "x-guest-info", qmp_info, gc) ||
            lm_qmp_register(gc->h.q, "x-guest-set-dirty-rate", qmp_set_rate, gc))
            return tool_error(err, -ENOMEM, "cannot register the guest's QMP commands");
        lm_qmp_open(gc->h.q);     /* only now can a client see the command set */
    }

    if (!a->incoming) {
        /* A context starts in "prelaunch"; the guest runs on its own, so
         * start the writers here and tell the library (lm_vm_start would
         * refuse: it only resumes a paused guest). */
        guest_vm_start(gc->g);
        lm_runstate_set_running(gc->h.m);
        return 0;
    }
    if (strcmp(a->incoming, "defer"))
        return lm_incoming(gc->h.m, a->incoming, err);
    lm_runstate_set_inmigrate(gc->h.m);     /* query-status: "inmigrate", as QEMU */
    return 0;
}

int cmd_guest(int argc, char **argv)
{
    struct guest_args a = {
        .cfg = { .mem = 1ull << 30, .vcpus = 2, .rate = 0, .pattern = GUEST_PATTERN_RANDOM,
                 .fill = GUEST_FILL_RANDOM, .seed = 1 },
        .tracker = "auto",
        .verify_on_arrival = true,
    };
    struct gctx gc = { .h.name = "livemig guest", .block = -1 };
    lm_error err = { 0 };
    int rc, ret = 1;

    rc = guest_parse(argc, argv, &a, &err);
    if (rc > 0) {
        guest_usage(stdout);
        return 0;
    }
    if (rc < 0) {
        if (err.msg[0])
            fprintf(stderr, "livemig guest: %s\n", err.msg);
        fprintf(stderr, "Try 'livemig guest --help'.\n");
        return 2;
    }

    /* Before any thread exists, so every thread inherits the mask. */
    tool_host_block_signals(&gc.h);

    gc.h.incoming = a.incoming != NULL;
    gc.verify_on_arrival = a.verify_on_arrival;
    gc.h.late_arrival = late_arrival;
    pthread_mutex_init(&gc.lock, NULL);
    pthread_cond_init(&gc.arrival_cv, NULL);

    if (guest_setup(&gc, &a, &err)) {
        fprintf(stderr, "livemig guest: %s\n", err.msg[0] ? err.msg : "setup failed");
        goto out;
    }
    ret = tool_host_wait(&gc.h);
out:
    if (gc.h.q)
        lm_qmp_stop(gc.h.q);
    /* Park the writers for good before the context goes: their write hook
     * reports to it, and lm_free may still call start() on a cancel. */
    if (gc.g && guest_hold(gc.g, &err))
        fprintf(stderr, "livemig guest: %s\n", err.msg);
    if (gc.h.m)
        lm_free(gc.h.m);
    guest_free(gc.g);
    pthread_mutex_destroy(&gc.lock);
    pthread_cond_destroy(&gc.arrival_cv);
    return ret;
}
