/*
 * `livemig demo`: a whole live migration on one machine, checked end to end.
 *
 *   1. make a private temp dir for two QMP sockets;
 *   2. start a source guest (writers running) and a destination guest
 *      (--incoming defer) as children: fork + exec of /proc/self/exe;
 *   3. wait for both QMP sockets (bounded; a child that dies ends the wait);
 *   4. migrate-incoming on the destination, read back the real address
 *      (tcp port 0 picks a free port) from its query-migrate;
 *   5. drive the migration exactly as `livemig migrate` does (migrate.c);
 *   6. fetch the destination's arrival check (x-guest-verify cached=true);
 *      it ran before the migrated guest resumed;
 *   7. quit both guests (SIGKILL after 10 s), remove the temp dir.
 *
 * Exit 0 only if the migration completed and the guest verified.
 *
 * The children run in their own process group so a Ctrl-C at the terminal
 * reaches only the demo, which cancels the migration and shuts the guests
 * down in order; PR_SET_PDEATHSIG stops them if the demo itself dies.
 * Child exits are watched through pidfds, so every wait is a bounded poll.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "livemig/livemig.h"

#include "commands.h"
#include "guest.h"
#include "migrate.h"
#include "qmpclient.h"
#include "util.h"

#define QUIT_WAIT_MS 10000
#define CMD_TIMEOUT_MS 10000
#define ARRIVAL_WAIT_MS 60000

struct child {
    const char *name;            /* "source guest" */
    pid_t pid;                   /* 0: not running */
    int pidfd;                   /* -1 if the kernel has no pidfd_open */
    bool exited;
    int status;                  /* waitpid status once exited */
    char sock[4096];
};

/* ---------------------------------------------------------------- children */

static int child_spawn(struct child *c, char *const argv[], lm_error *err)
{
    pid_t parent = getpid();
    pid_t pid = fork();

    if (pid < 0)
        return tool_error_errno(err, -errno, "%s: fork", c->name);
    if (pid == 0) {
        sigset_t none;
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(1);                  /* the demo died before prctl took effect */
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execv("/proc/self/exe", argv);
        fprintf(stderr, "livemig demo: exec /proc/self/exe: %s\n", strerror(errno));
        _exit(127);
    }
    c->pid = pid;
    c->exited = false;
    c->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    return 0;
}

static void child_describe(const struct child *c, char *buf, size_t len)
{
    if (WIFEXITED(c->status))
        snprintf(buf, len, "%s exited with status %d", c->name, WEXITSTATUS(c->status));
    else if (WIFSIGNALED(c->status))
        snprintf(buf, len, "%s was killed by signal %d (%s)", c->name, WTERMSIG(c->status),
                 strsignal(WTERMSIG(c->status)));
    else
        snprintf(buf, len, "%s ended", c->name);
}

/* Reap if it has exited; true while it runs. */
static bool child_running(struct child *c)
{
    if (!c->pid || c->exited)
        return false;
    if (waitpid(c->pid, &c->status, WNOHANG) == c->pid)
        c->exited = true;
    return !c->exited;
}

/* Wait up to timeout_ms for the child to exit; true if it did. */
static bool child_wait(struct child *c, int timeout_ms)
{
    int64_t deadline = tool_now_ms() + timeout_ms;

    while (child_running(c)) {
        int64_t left = deadline - tool_now_ms();
        if (left <= 0)
            return false;
        if (c->pidfd >= 0) {
            struct pollfd p = { .fd = c->pidfd, .events = POLLIN };
            poll(&p, 1, (int)left);
        } else {
            struct timespec ts = { 0, 10000000 };
            nanosleep(&ts, NULL);
        }
    }
    return true;
}

static void child_close(struct child *c)
{
    if (c->pidfd >= 0)
        close(c->pidfd);
    c->pidfd = -1;
}

/* qmpc_alive_fn: stop waiting for a socket whose server is gone. */
static bool child_alive(void *opaque, lm_error *err)
{
    struct child *c = opaque;
    char what[160];

    if (migrate_interrupted()) {
        tool_error(err, -EINTR, "interrupted");
        return false;
    }
    if (child_running(c))
        return true;
    child_describe(c, what, sizeof(what));
    tool_error(err, -ESRCH, "%s before its QMP socket was ready", what);
    return false;
}

/* quit over QMP (or SIGTERM), then SIGKILL after QUIT_WAIT_MS. */
static void child_stop(struct child *c, struct qmpc *q)
{
    char what[160];

    if (!c->pid)
        return;
    if (child_running(c)) {
        lm_error err = { 0 };
        if (!q || qmpc_execute(q, "quit", NULL, NULL, CMD_TIMEOUT_MS, &err))
            kill(c->pid, SIGTERM);
        if (!child_wait(c, QUIT_WAIT_MS)) {
            fprintf(stderr, "livemig demo: %s did not exit within %d s, killing it\n", c->name,
                    QUIT_WAIT_MS / 1000);
            kill(c->pid, SIGKILL);
            waitpid(c->pid, &c->status, 0);
            c->exited = true;
            child_close(c);
            return;
        }
    }
    if (!WIFEXITED(c->status) || WEXITSTATUS(c->status) != 0) {
        child_describe(c, what, sizeof(what));
        fprintf(stderr, "livemig demo: %s\n", what);
    }
    child_close(c);
}

/* ---------------------------------------------------------------- verdict */

/* Print VERIFIED / CORRUPT from an x-guest-verify reply; true if verified. */
static bool print_verdict(const json_t *r, bool postcopy)
{
    json_int_t checked = json_integer_value(json_object_get(r, "checked"));
    json_int_t bad = json_integer_value(json_object_get(r, "bad"));

    if (bad == 0 && checked > 0) {
        printf("VERIFIED: %lld pages, 0 bad (checked in %lld ms %s)\n",
               (long long)checked, (long long)json_integer_value(json_object_get(r, "time-ms")),
               postcopy ? "after the last page arrived; the guest ran during postcopy"
                        : "before the guest resumed");
        return true;
    }
    printf("CORRUPT: %lld bad of %lld pages (lost %lld, stale %lld, torn %lld, misplaced %lld)\n",
           (long long)bad, (long long)checked,
           (long long)json_integer_value(json_object_get(r, "lost")),
           (long long)json_integer_value(json_object_get(r, "stale")),
           (long long)json_integer_value(json_object_get(r, "torn")),
           (long long)json_integer_value(json_object_get(r, "misplaced")));
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(r, "examples"), i, e) {
        printf("  page %lld: %s, expected version %lld, found %lld\n",
               (long long)json_integer_value(json_object_get(e, "page")),
               json_string_value(json_object_get(e, "kind")),
               (long long)json_integer_value(json_object_get(e, "expected-version")),
               (long long)json_integer_value(json_object_get(e, "found-version")));
    }
    return false;
}

/*
 * The destination runs its arrival check when its incoming side completes,
 * which can be a little after the source reports completed.  Poll for the
 * cached result until it exists, the destination fails or dies, or the
 * bound expires.  Returns 0 verified, 1 corrupt or unknown.
 */
/* After a postcopy: how long the destination's faults waited. */
static void print_postcopy(struct qmpc *q)
{
    lm_error err = { 0 };
    json_t *r = NULL;

    if (qmpc_execute(q, "query-migrate", NULL, &r, CMD_TIMEOUT_MS, &err))
        return;
    printf("postcopy: the destination ran the guest before its last page and asked for "
           "%lld pages it touched first: fault latency p50 %lld us, p99 %lld us, max %lld us\n",
           (long long)json_integer_value(json_object_get(r, "x-postcopy-requests")),
           (long long)json_integer_value(json_object_get(r, "x-postcopy-latency-p50-us")),
           (long long)json_integer_value(json_object_get(r, "x-postcopy-latency-p99-us")),
           (long long)json_integer_value(json_object_get(r, "x-postcopy-latency-max-us")));
    json_decref(r);
}

static int fetch_arrival(struct child *dst, struct qmpc *q, bool postcopy, int64_t *check_ms)
{
    int64_t deadline = tool_now_ms() + ARRIVAL_WAIT_MS;
    lm_error err = { 0 };
    char what[160];

    for (;;) {
        json_t *r = NULL;
        int rc = qmpc_execute(q, "x-guest-verify", json_pack("{s:b}", "cached", 1), &r,
                              CMD_TIMEOUT_MS, &err);
        if (!rc) {
            bool ok = print_verdict(r, postcopy);
            *check_ms = json_integer_value(json_object_get(r, "time-ms"));
            json_decref(r);
            return ok ? 0 : 1;
        }
        if (rc != -EREMOTEIO || !child_running(dst)) {
            /* The connection went away: most likely the guest exited. */
            if (child_wait(dst, 2000)) {
                child_describe(dst, what, sizeof(what));
                if (WIFEXITED(dst->status) && WEXITSTATUS(dst->status) == 3)
                    printf("CORRUPT: the destination's arrival check found bad pages "
                           "(report above); it exited with status 3\n");
                else
                    printf("CORRUPT: no arrival check: %s\n", what);
            } else {
                printf("CORRUPT: no arrival check: %s\n", err.msg);
            }
            return 1;
        }
        /* Not yet: is the incoming side still going? */
        json_t *qm = NULL;
        if (!qmpc_execute(q, "query-migrate", NULL, &qm, CMD_TIMEOUT_MS, &err)) {
            struct mig_info mi;
            mig_info_parse(qm, &mi);
            json_decref(qm);
            if (!strcmp(mi.status, "failed") || !strcmp(mi.status, "cancelled")) {
                printf("CORRUPT: the destination's incoming migration %s: %s\n", mi.status,
                       mi.error_desc[0] ? mi.error_desc : "(no description)");
                return 1;
            }
        }
        if (tool_now_ms() > deadline) {
            printf("CORRUPT: no arrival check within %d s: %s\n", ARRIVAL_WAIT_MS / 1000,
                   err.msg);
            return 1;
        }
        if (migrate_interrupted()) {
            printf("CORRUPT: interrupted while waiting for the arrival check\n");
            return 1;
        }
        qmpc_poll(q, 100, NULL);         /* wakes early on an event */
        json_t *ev;
        while ((ev = qmpc_next_event(q)))
            json_decref(ev);
    }
}

/* ---------------------------------------------------------------- command */

static void demo_usage(FILE *f)
{
    fprintf(f,
        "Usage: livemig demo [options]\n"
        "\n"
        "Start a source guest and a destination guest as child processes,\n"
        "live-migrate the source to the destination while its writers keep\n"
        "dirtying memory, and check every page on arrival.\n"
        "\n"
        "Options:\n"
        "  --mem SIZE           guest RAM (default 1G)\n"
        "  --dirty-rate N|max   pages/s the source guest writes (default 20000)\n"
        "  --vcpus N            writer threads (default 2)\n"
        "  --uri URI            migration address (default tcp:127.0.0.1:0, a free port)\n"
        "  --pattern P          random | sequential | hotset (default random)\n"
        "  --fill F             random | text | zero (default random)\n"
        "  --dirty-tracker T    auto | uffd-wp | cooperative, for the source (default auto)\n"
        "  --timeout S          cancel the migration after S seconds (default 600)\n"
        "  --postcopy WHEN      auto (default): switch to postcopy only when precopy\n"
        "                       cannot converge; a time (3s): switch then; off\n"
        "  --preempt on|off     postcopy's requested pages on their own connection\n"
        "                       (default on)\n"
        "  --mode M             normal | cpr-transfer (default normal).  cpr-transfer\n"
        "                       puts both guests' RAM in a memfd and hands the\n"
        "                       source's over a unix: socket (default one in the\n"
        "                       demo's temp dir): no page is copied, the destination\n"
        "                       allocates no RAM of its own\n"
        "  -h, --help           show this help\n"
        "\n"
        "Exit status: 0 if the migration completed and the guest verified,\n"
        "1 otherwise, 2 usage.\n");
}

struct demo_args {
    uint64_t mem;
    int64_t rate;
    unsigned vcpus;
    const char *uri;
    const char *pattern;
    const char *fill;
    const char *tracker;
    int timeout_s;
    const char *postcopy;        /* --postcopy off|auto|TIME */
    bool postcopy_default;       /* not given: auto on sockets only */
    bool preempt;
    bool cpr_transfer;           /* --mode cpr-transfer */
};

static int demo_parse(int argc, char **argv, struct demo_args *a, lm_error *err)
{
    static const struct option opts[] = {
        { "mem", required_argument, NULL, 'm' },
        { "dirty-rate", required_argument, NULL, 'r' },
        { "vcpus", required_argument, NULL, 'v' },
        { "uri", required_argument, NULL, 'u' },
        { "pattern", required_argument, NULL, 'p' },
        { "fill", required_argument, NULL, 'f' },
        { "timeout", required_argument, NULL, 't' },
        { "dirty-tracker", required_argument, NULL, 'T' },
        { "postcopy", required_argument, NULL, 'P' },
        { "preempt", required_argument, NULL, 'E' },
        { "mode", required_argument, NULL, 'M' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int opt;
    int64_t v;

    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'm':
            v = lm_parse_size(optarg);
            if (v <= 0 || v % GUEST_PAGE_SIZE)
                return tool_error(err, -EINVAL, "--mem: '%s' is not a size that is a "
                                  "multiple of 4096 (e.g. 256M, 1G)", optarg);
            a->mem = (uint64_t)v;
            break;
        case 'r':
            if (!tool_parse_rate(optarg, &a->rate))
                return tool_error(err, -EINVAL, "--dirty-rate: '%s' is not a number of "
                                  "pages/s or 'max'", optarg);
            break;
        case 'v':
            if (!tool_parse_int(optarg, 1, 1024, &v))
                return tool_error(err, -EINVAL, "--vcpus: '%s' is not a number from 1 to 1024",
                                  optarg);
            a->vcpus = (unsigned)v;
            break;
        case 'u':
            a->uri = optarg;
            break;
        case 'p':
            if (guest_pattern_parse(optarg) < 0)
                return tool_error(err, -EINVAL, "--pattern: '%s' is not random, sequential "
                                  "or hotset", optarg);
            a->pattern = optarg;
            break;
        case 'f':
            if (guest_fill_parse(optarg) < 0)
                return tool_error(err, -EINVAL, "--fill: '%s' is not random, text or zero",
                                  optarg);
            a->fill = optarg;
            break;
        case 't':
            if (!tool_parse_int(optarg, 0, 365 * 86400, &v))
                return tool_error(err, -EINVAL, "--timeout: '%s' is not a number of seconds",
                                  optarg);
            a->timeout_s = (int)v;
            break;
        case 'P':
            a->postcopy = optarg;
            a->postcopy_default = false;
            break;
        case 'E':
            if (strcmp(optarg, "on") && strcmp(optarg, "off"))
                return tool_error(err, -EINVAL, "--preempt: '%s' is not on or off", optarg);
            a->preempt = !strcmp(optarg, "on");
            break;
        case 'T':
            if (strcmp(optarg, "auto") && strcmp(optarg, "uffd-wp") &&
                strcmp(optarg, "cooperative"))
                return tool_error(err, -EINVAL, "--dirty-tracker: '%s' is not auto, uffd-wp "
                                  "or cooperative", optarg);
            a->tracker = optarg;
            break;
        case 'M':
            if (strcmp(optarg, "normal") && strcmp(optarg, "cpr-transfer"))
                return tool_error(err, -EINVAL, "--mode: '%s' is not normal or cpr-transfer "
                                  "(cpr-reboot restarts one process: see docs/cli.md)",
                                  optarg);
            a->cpr_transfer = !strcmp(optarg, "cpr-transfer");
            break;
        case 'h':
            return 1;
        default:
            return -EINVAL;          /* getopt said what was wrong */
        }
    }
    if (optind < argc)
        return tool_error(err, -EINVAL, "unexpected argument '%s'", argv[optind]);
    if (a->vcpus > a->mem / GUEST_PAGE_SIZE)
        return tool_error(err, -EINVAL, "--vcpus %u is more than the %llu pages of --mem",
                          a->vcpus, (unsigned long long)(a->mem / GUEST_PAGE_SIZE));
    return 0;
}

/* tcp:HOST:0 means "any free port": the real address comes from the destination. */
static bool uri_wants_port(const char *uri)
{
    size_t n = strlen(uri);
    return !strncmp(uri, "tcp:", 4) && n > 2 && !strcmp(uri + n - 2, ":0");
}

int cmd_demo(int argc, char **argv)
{
    struct demo_args a = {
        .mem = 1ull << 30, .rate = 20000, .vcpus = 2, .uri = "tcp:127.0.0.1:0",
        .pattern = "random", .fill = "random", .tracker = "auto", .timeout_s = 600,
        .postcopy = "auto", .postcopy_default = true, .preempt = true,
    };
    struct child src = { .name = "source guest", .pidfd = -1 };
    struct child dst = { .name = "destination guest", .pidfd = -1 };
    struct qmpc *qs = NULL, *qd = NULL;
    struct migrate_opts mo = { .prefix = "livemig demo" };
    lm_error err = { 0 };
    char dir[] = "/tmp/livemig-demo.XXXXXX";
    char mem[32], rate[32], vcpus[16], sq[4200], dq[4200], size[64], uri[4200];
    char cpr_sock[4200] = "", cpr_uri[4300];
    bool uri_given;
    bool have_dir = false, migrated = false;
    int rc, ret = 1;

    rc = demo_parse(argc, argv, &a, &err);
    if (rc > 0) {
        demo_usage(stdout);
        return 0;
    }
    if (rc < 0) {
        if (err.msg[0])
            fprintf(stderr, "livemig demo: %s\n", err.msg);
        fprintf(stderr, "Try 'livemig demo --help'.\n");
        return 2;
    }
    mo.timeout_s = a.timeout_s;
    uri_given = strcmp(a.uri, "tcp:127.0.0.1:0") != 0;
    /* postcopy needs a socket (its return path); the default stays out of
     * the way of other URIs */
    if (a.postcopy_default &&
        (a.cpr_transfer || (strncmp(a.uri, "tcp:", 4) && strncmp(a.uri, "unix:", 5))))
        a.postcopy = "off";
    if (migrate_opt_postcopy(&mo, a.postcopy, &err)) {
        fprintf(stderr, "livemig demo: %s\nTry 'livemig demo --help'.\n", err.msg);
        return 2;
    }
    bool preempt = a.preempt && mo.postcopy;
    if (preempt && migrate_opt_cap(&mo, "postcopy-preempt=on", &err)) {
        fprintf(stderr, "livemig demo: %s\n", err.msg);
        return 2;
    }
    migrate_block_signals();

    if (!mkdtemp(dir)) {
        fprintf(stderr, "livemig demo: cannot create a temp dir: %s\n", strerror(errno));
        return 1;
    }
    have_dir = true;
    snprintf(src.sock, sizeof(src.sock), "%s/source.qmp", dir);
    snprintf(dst.sock, sizeof(dst.sock), "%s/destination.qmp", dir);
    snprintf(sq, sizeof(sq), "unix:%s", src.sock);
    snprintf(dq, sizeof(dq), "unix:%s", dst.sock);
    if (a.cpr_transfer) {
        if (!uri_given) {   /* in the demo's own 0700 dir */
            snprintf(cpr_sock, sizeof(cpr_sock), "%s/migrate.sock", dir);
            snprintf(cpr_uri, sizeof(cpr_uri), "unix:%s", cpr_sock);
            a.uri = cpr_uri;
        }
        if (migrate_opt_param(&mo, "mode=cpr-transfer", &err))
            goto fail;
    }
    snprintf(mem, sizeof(mem), "%llu", (unsigned long long)a.mem);
    if (a.rate < 0)
        snprintf(rate, sizeof(rate), "max");
    else
        snprintf(rate, sizeof(rate), "%lld", (long long)a.rate);
    snprintf(vcpus, sizeof(vcpus), "%u", a.vcpus);
    tool_format_size(a.mem, size, sizeof(size));

    char *src_argv[] = { "livemig", "guest", "--mem", mem, "--vcpus", vcpus,
                         "--dirty-rate", rate, "--pattern", (char *)a.pattern,
                         "--fill", (char *)a.fill, "--dirty-tracker", (char *)a.tracker,
                         "--qmp", sq, NULL, NULL, NULL };
    char *dst_argv[] = { "livemig", "guest", "--mem", mem, "--vcpus", vcpus,
                         "--dirty-rate", rate, "--pattern", (char *)a.pattern,
                         "--incoming", "defer", "--qmp", dq, NULL, NULL, NULL, NULL, NULL };
    if (a.cpr_transfer) {       /* both in a memfd; the destination maps the source's */
        src_argv[16] = "--mem-backend";
        src_argv[17] = "memfd";
        dst_argv[14] = "--mem-backend";
        dst_argv[15] = "memfd";
        dst_argv[16] = "--mode";
        dst_argv[17] = "cpr-transfer";
        printf("mode cpr-transfer: guest RAM in a memfd, handed over on a unix socket\n");
    }

    if (a.rate < 0)
        printf("source guest: %s, %u writers as fast as they can (%s pattern, %s fill)\n",
               size, a.vcpus, a.pattern, a.fill);
    else if (a.rate == 0)
        printf("source guest: %s, %u idle writers (%s fill)\n", size, a.vcpus, a.fill);
    else
        printf("source guest: %s, %u writers at %lld pages/s (%s pattern, %s fill)\n",
               size, a.vcpus, (long long)a.rate, a.pattern, a.fill);
    printf("destination guest: %s, waiting for an incoming migration\n", size);
    fflush(stdout);
    if (child_spawn(&src, src_argv, &err) || child_spawn(&dst, dst_argv, &err))
        goto fail;

    /* Filling or prefaulting RAM comes first: allow for slow first touch. */
    int connect_ms = 30000 + (int)(a.mem >> 30) * 10000;
    if (qmpc_connect(&qs, src.sock, connect_ms, child_alive, &src, &err) ||
        qmpc_connect(&qd, dst.sock, connect_ms, child_alive, &dst, &err))
        goto fail;

    json_t *r = NULL;
    /* postcopy-preempt must be set on both sides (with postcopy-ram) */
    if (preempt && qmpc_execute(qd, "migrate-set-capabilities",
                                json_pack("{s:[{s:s,s:b},{s:s,s:b}]}", "capabilities",
                                          "capability", "postcopy-ram", "state", 1,
                                          "capability", "postcopy-preempt", "state", 1),
                                NULL, CMD_TIMEOUT_MS, &err))
        goto fail;
    if (qmpc_execute(qd, "migrate-incoming", json_pack("{s:s}", "uri", a.uri), NULL,
                     CMD_TIMEOUT_MS, &err) ||
        qmpc_execute(qd, "query-migrate", NULL, &r, CMD_TIMEOUT_MS, &err))
        goto fail;
    struct mig_info dmi;
    mig_info_parse(r, &dmi);
    json_decref(r);
    if (uri_wants_port(a.uri)) {
        if (!dmi.socket_address[0]) {
            tool_error(&err, -EPROTO, "the destination did not report the port it listens "
                       "on (no socket-address in query-migrate)");
            goto fail;
        }
        snprintf(uri, sizeof(uri), "%s", dmi.socket_address);
    } else {
        snprintf(uri, sizeof(uri), "%s", a.uri);
    }
    printf("migrating over %s ...\n", uri);
    fflush(stdout);

    struct mig_info mi;
    int64_t check_ms = 0;
    if (migrate_drive(qs, uri, &mo, &mi, &err)) {
        fprintf(stderr, "livemig demo: %s\n", err.msg);
    } else {
        migrated = true;
        ret = fetch_arrival(&dst, qd, mi.postcopy_bytes > 0, &check_ms);
        if (mi.postcopy_bytes)
            print_postcopy(qd);
        /* The check runs inside the destination's start, which the source's
         * downtime clock waits for when the destination confirms its start. */
        if (ret == 0 && mi.has_downtime && check_ms > 0 && mi.downtime >= check_ms &&
            !mi.postcopy_bytes)
            printf("note: the downtime above includes the %lld ms arrival check\n",
                   (long long)check_ms);
    }
    fflush(stdout);
    goto out;

fail:
    fprintf(stderr, "livemig demo: %s\n", err.msg);
    ret = 1;
out:
    child_stop(&src, qs);
    child_stop(&dst, qd);
    qmpc_close(qs);
    qmpc_close(qd);
    if (have_dir) {
        unlink(src.sock);
        unlink(dst.sock);
        if (cpr_sock[0])
            unlink(cpr_sock);
        if (rmdir(dir))
            fprintf(stderr, "livemig demo: cannot remove %s: %s\n", dir, strerror(errno));
    }
    migrate_opts_free(&mo);
    if (migrated && ret == 0)
        return 0;
    return 1;
}
