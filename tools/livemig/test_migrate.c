/*
 * Tests for the QMP client (qmpclient.c) and the migration driver
 * (migrate.c) against the library's real QMP server, all in one process:
 * two lm_mig contexts, each with a demo guest, migrate over loopback TCP
 * while the source's writers run flat out, driven over QMP exactly as
 * `livemig migrate` drives them.  Then the destination's memory must verify
 * and its version table must equal the stopped source's.
 *
 * Every wait is bounded: QMP calls carry timeouts, lm_wait has one, and the
 * blocking test command gives up after a few seconds on its own.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "livemig/livemig.h"
#include "livemig/qmp.h"

#include "guest.h"
#include "guest_state.h"
#include "migrate.h"
#include "qmpclient.h"
#include "util.h"

#define T_MS 10000

struct fixture {
    char dir[64];
    char sock[128];
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    snprintf(f->dir, sizeof(f->dir), "/tmp/livemig-test.XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    snprintf(f->sock, sizeof(f->sock), "%s/qmp.sock", f->dir);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    unlink(f->sock);
    rmdir(f->dir);
    free(f);
    return 0;
}

/* ---------------------------------------------------------------- QMP client */

/* x-block waits until the test opens the gate (bounded, so it cannot hang). */
struct gate {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool open;
};

static int cmd_echo(void *opaque, const char *args, char **reply, lm_error *err)
{
    *reply = strdup(args);
    return 0;
}

static int cmd_fail(void *opaque, const char *args, char **reply, lm_error *err)
{
    snprintf(err->msg, sizeof(err->msg), "boom");
    err->code = -EINVAL;
    return -EINVAL;
}

static int cmd_block(void *opaque, const char *args, char **reply, lm_error *err)
{
    struct gate *g = opaque;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 5;
    pthread_mutex_lock(&g->lock);
    while (!g->open)
        if (pthread_cond_timedwait(&g->cond, &g->lock, &dl))
            break;
    pthread_mutex_unlock(&g->lock);
    *reply = strdup("{\"late\": true}");
    return 0;
}

static void test_qmpc_commands(void **state)
{
    struct fixture *f = *state;
    char uri[160];
    lm_error err = { 0 };
    struct gate gate = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false };
    struct qmpc *c;
    json_t *r;

    lm_mig *m = lm_new();
    snprintf(uri, sizeof(uri), "unix:%s", f->sock);
    lm_qmp *q = lm_qmp_start(m, uri, &err);
    assert_non_null(q);
    lm_qmp_register(q, "x-echo", cmd_echo, NULL);
    lm_qmp_register(q, "x-fail", cmd_fail, NULL);
    lm_qmp_register(q, "x-block", cmd_block, &gate);

    /* "unix:" prefix or a plain path: both work. */
    assert_int_equal(qmpc_connect(&c, uri, T_MS, NULL, NULL, &err), 0);

    assert_int_equal(qmpc_execute(c, "x-echo", json_pack("{s:i}", "a", 7), &r, T_MS, &err), 0);
    assert_int_equal(json_integer_value(json_object_get(r, "a")), 7);
    json_decref(r);

    assert_int_equal(qmpc_execute(c, "x-fail", NULL, NULL, T_MS, &err), -EREMOTEIO);
    assert_string_equal(err.msg, "x-fail: boom");
    assert_int_equal(qmpc_execute(c, "x-nope", NULL, NULL, T_MS, &err), -EREMOTEIO);
    assert_non_null(strstr(err.msg, "x-nope"));

    /* An event sent while nothing runs is picked up by qmpc_poll... */
    lm_qmp_event(q, "X-TEST", "{\"n\": 1}");
    json_t *ev = NULL;
    int64_t deadline = tool_now_ms() + T_MS;
    while (!(ev = qmpc_next_event(c)) && tool_now_ms() < deadline)
        assert_int_equal(qmpc_poll(c, 100, &err), 0);
    assert_non_null(ev);
    assert_string_equal(json_string_value(json_object_get(ev, "event")), "X-TEST");
    assert_int_equal(json_integer_value(json_object_get(json_object_get(ev, "data"), "n")), 1);
    json_decref(ev);
    /* ...and one that arrives before a reply is queued, not lost. */
    lm_qmp_event(q, "X-TEST", "{\"n\": 2}");
    assert_int_equal(qmpc_execute(c, "x-echo", NULL, NULL, T_MS, &err), 0);
    ev = qmpc_next_event(c);
    assert_non_null(ev);
    json_decref(ev);
    assert_null(qmpc_next_event(c));

    /* A command that does not answer in time is a timeout with its name... */
    int64_t t0 = tool_now_ms();
    assert_int_equal(qmpc_execute(c, "x-block", NULL, NULL, 200, &err), -ETIMEDOUT);
    assert_true(tool_now_ms() - t0 < 2000);
    assert_non_null(strstr(err.msg, "x-block"));
    /* ...and its late reply is not taken for the next command's. */
    pthread_mutex_lock(&gate.lock);
    gate.open = true;
    pthread_cond_broadcast(&gate.cond);
    pthread_mutex_unlock(&gate.lock);
    assert_int_equal(qmpc_execute(c, "x-echo", json_pack("{s:i}", "b", 9), &r, T_MS, &err), 0);
    assert_null(json_object_get(r, "late"));
    assert_int_equal(json_integer_value(json_object_get(r, "b")), 9);
    json_decref(r);

    /* The server going away is an error, not a hang. */
    lm_qmp_stop(q);
    assert_true(qmpc_execute(c, "x-echo", NULL, NULL, T_MS, &err) < 0);
    qmpc_close(c);
    lm_free(m);
}

static bool never_alive(void *opaque, lm_error *err)
{
    snprintf(err->msg, sizeof(err->msg), "the server died");
    err->code = -ESRCH;
    return false;
}

static void test_qmpc_connect_errors(void **state)
{
    struct fixture *f = *state;
    struct qmpc *c = (struct qmpc *)1;
    lm_error err = { 0 };

    int64_t t0 = tool_now_ms();
    assert_int_equal(qmpc_connect(&c, f->sock, 150, NULL, NULL, &err), -ETIMEDOUT);
    assert_null(c);
    assert_true(tool_now_ms() - t0 < 3000);
    assert_non_null(strstr(err.msg, "no server within 150 ms"));

    assert_int_equal(qmpc_connect(&c, f->sock, T_MS, never_alive, NULL, &err), -ESRCH);
    assert_string_equal(err.msg, "the server died");
}

/* ---------------------------------------------------------------- migration */

struct side {
    struct guest *g;
    lm_mig *m;
    int block;
};

static void side_stop(void *opaque)
{
    struct side *s = opaque;
    lm_error err = { 0 };
    if (guest_vm_stop(s->g, &err))
        fail_msg("%s", err.msg);
}

static void side_start(void *opaque)
{
    struct side *s = opaque;
    guest_vm_start(s->g);
}

static void side_mark(void *opaque, uint64_t page)
{
    struct side *s = opaque;
    lm_ram_mark_dirty_idx(s->m, s->block, page * GUEST_PAGE_SIZE, GUEST_PAGE_SIZE);
}

static const lm_vm_ops side_ops = { .stop = side_stop, .start = side_start };

#define MEM (16u << 20)

/*
 * Sides live on the heap: a failed assertion longjmps out of the test while
 * the writers still run, and their hook must not point into a dead stack
 * frame (the leak on failure does not matter).
 */
static struct side *side_new(bool incoming)
{
    struct side *s = calloc(1, sizeof(*s));
    struct guest_config cfg = {
        .mem = MEM, .vcpus = 2, .fill = GUEST_FILL_TEXT, .seed = 3, .incoming = incoming,
        /* The destination idles after arrival so its table can be compared. */
        .rate = incoming ? 0 : GUEST_RATE_MAX,
    };
    lm_error err = { 0 };

    assert_int_equal(guest_new(&s->g, &cfg, &err), 0);
    s->m = lm_new();
    assert_int_equal(lm_ram_register(s->m, "guest.ram", guest_ram(s->g), MEM,
                                     GUEST_PAGE_SIZE, &err), 0);
    s->block = lm_ram_find(s->m, "guest.ram");
    assert_int_equal(lm_device_register(s->m, GUEST_STATE_IDSTR, 0, GUEST_STATE_VERSION,
                                        &guest_state_ops, s->g, &err), 0);
    lm_set_vm_ops(s->m, &side_ops, s);
    guest_set_write_hook(s->g, side_mark, s);
    assert_int_equal(guest_start_writers(s->g, &err), 0);
    if (!incoming) {
        guest_vm_start(s->g);
        lm_runstate_set_running(s->m);
    }
    return s;
}

static void side_free(struct side *s)
{
    lm_error err = { 0 };
    guest_hold(s->g, &err);       /* no more hooks into the context */
    lm_free(s->m);
    guest_free(s->g);
    free(s);
}

/* Listen on a free port; the URI to migrate to. */
static void dest_listen(struct side *d, char *uri, size_t len)
{
    lm_error err = { 0 };
    lm_stats st;

    assert_int_equal(lm_incoming(d->m, "tcp:127.0.0.1:0", &err), 0);
    lm_query(d->m, &st);
    assert_true(st.socket_address[0]);
    snprintf(uri, len, "%s", st.socket_address);
}

static char *slurp(FILE *f)
{
    static char buf[16384];
    size_t n;
    fflush(f);
    rewind(f);
    n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = 0;
    return buf;
}

static void test_drive_migration(void **state)
{
    struct fixture *f = *state;
    struct side *src, *dst, *dst2;
    char uri[200], qmp_uri[160];
    struct migrate_opts mo = { .timeout_s = 60, .prefix = "test" };
    struct mig_info mi;
    lm_error err = { 0 };
    struct qmpc *c;

    src = side_new(false);
    snprintf(qmp_uri, sizeof(qmp_uri), "unix:%s", f->sock);
    lm_qmp *q = lm_qmp_start(src->m, qmp_uri, &err);
    assert_non_null(q);
    assert_int_equal(qmpc_connect(&c, f->sock, T_MS, NULL, NULL, &err), 0);
    mo.out = tmpfile();
    assert_non_null(mo.out);

    /* Bad values are refused before anything starts, typed as the source
     * types the parameter. */
    assert_int_equal(migrate_opt_param(&mo, "downtime-limit=soon", &err), 0);
    assert_int_equal(migrate_drive(c, "tcp:127.0.0.1:1", &mo, &mi, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "downtime-limit: 'soon' is not an integer"));
    migrate_opts_free(&mo);
    assert_int_equal(migrate_opt_cap(&mo, "events", &err), -EINVAL);
    assert_int_equal(migrate_opt_cap(&mo, "events=maybe", &err), -EINVAL);

    /* 1: throttled to 1 MB/s with a 1 s timeout: cancelled, guest runs on. */
    dst = side_new(true);
    dest_listen(dst, uri, sizeof(uri));
    assert_int_equal(migrate_opt_param(&mo, "max-bandwidth=1M", &err), 0);
    mo.timeout_s = 1;
    int64_t t0 = tool_now_ms();
    assert_int_equal(migrate_drive(c, uri, &mo, &mi, &err), -ECANCELED);
    assert_true(tool_now_ms() - t0 < T_MS);
    assert_string_equal(err.msg, "migration cancelled: timed out after 1 s");
    assert_string_equal(mi.status, "cancelled");
    assert_true(guest_vm_running(src->g));
    assert_non_null(strstr(slurp(mo.out), "Migration status: cancelled"));
    assert_int_equal(lm_wait(dst->m, T_MS), LM_STATUS_FAILED);
    migrate_opts_free(&mo);

    /* 2: unlimited, writers at full speed: completes, and every page of the
     * destination is what its (migrated) version table says. */
    dst2 = side_new(true);
    dest_listen(dst2, uri, sizeof(uri));
    assert_int_equal(migrate_opt_param(&mo, "max-bandwidth=0", &err), 0);
    assert_int_equal(migrate_opt_param(&mo, "downtime-limit=300", &err), 0);
    assert_int_equal(migrate_opt_cap(&mo, "auto-converge=on", &err), 0);
    mo.timeout_s = 60;
    rewind(mo.out);
    assert_int_equal(migrate_drive(c, uri, &mo, &mi, &err), 0);
    assert_string_equal(mi.status, "completed");
    assert_int_equal(mi.total, MEM);
    assert_true(mi.transferred >= MEM);
    char *text = slurp(mo.out);
    assert_non_null(strstr(text, "Migration status: completed"));
    assert_non_null(strstr(text, "total ram: 16384 kbytes"));
    assert_non_null(strstr(text, "dirty sync count: "));

    assert_int_equal(lm_wait(dst2->m, T_MS), LM_STATUS_COMPLETED);
    assert_true(guest_vm_running(dst2->g));
    assert_false(guest_vm_running(src->g));       /* postmigrate */
    assert_int_equal(guest_vm_stop(dst2->g, &err), 0);
    assert_int_equal(guest_fill(dst2->g), GUEST_FILL_TEXT);
    assert_memory_equal(guest_versions(dst2->g), guest_versions(src->g),
                        guest_pages(src->g) * sizeof(uint32_t));
    struct verify_report r;
    assert_int_equal(guest_verify(dst2->g, &r, &err), 0);
    assert_int_equal(r.checked, MEM / GUEST_PAGE_SIZE);
    assert_int_equal(r.bad, 0);
    /* The writers did write during the migration. */
    assert_true(guest_writes(src->g) > 0);

    migrate_opts_free(&mo);
    fclose(mo.out);
    qmpc_close(c);
    lm_qmp_stop(q);
    side_free(dst2);
    side_free(dst);
    side_free(src);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_qmpc_commands, setup, teardown),
        cmocka_unit_test_setup_teardown(test_qmpc_connect_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drive_migration, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
