/*
 * QMP server tests: a real server on a temporary unix socket in front of a
 * real lm_mig, driven by a small blocking client written here (poll-bounded
 * reads, so a server that fails to answer fails the test instead of hanging
 * it).  Each test gets a fresh context and server from the fixture.
 *
 * What is covered: greeting and negotiation, every error class and message
 * the protocol promises, framing (split requests, several per write, braces
 * inside strings), query-migrate on an idle context, capability and
 * parameter round trips, query-status with stop/cont and their events,
 * program commands and events, several clients at once, clients that send
 * garbage, oversize or over-deep input or vanish mid-command, descriptor
 * passing (getfd), listening edge cases, stop() with clients attached,
 * servers started and stopped on one context more often than it has
 * listener slots (stop gives its slot back) and while another thread keeps
 * firing the listeners, and one whole migration between two contexts driven
 * only through QMP.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "livemig/livemig.h"
#include "livemig/qmp.h"

#define WAIT_MS 10000          /* any single expected message */

/* ---------------------------------------------------------------- helpers */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

typedef struct client {
    int fd;
    char *buf;
    size_t len, cap;
    json_t *events;            /* events read while waiting for replies */
    bool eof;
} client;

static void client_open(client *c, const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };

    memset(c, 0, sizeof(*c));
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(c->fd >= 0);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    assert_int_equal(connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    c->events = json_array();
}

static void client_close(client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    free(c->buf);
    c->buf = NULL;
    json_decref(c->events);
    c->events = NULL;
}

/* Next message, or NULL after timeout_ms or at end of stream (c->eof). */
static json_t *client_read(client *c, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;

    for (;;) {
        char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;
        struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
        int64_t left;
        ssize_t n;

        if (nl) {
            size_t linelen = (size_t)(nl - c->buf) + 1;
            json_error_t jerr;
            json_t *v = json_loadb(c->buf, linelen, 0, &jerr);

            if (!v)
                fail_msg("server sent invalid JSON (%s): %.*s", jerr.text,
                         (int)linelen, c->buf);
            memmove(c->buf, c->buf + linelen, c->len - linelen);
            c->len -= linelen;
            return v;
        }
        if (c->eof)
            return NULL;
        left = deadline - now_ms();
        if (left <= 0)
            return NULL;
        if (poll(&pfd, 1, (int)left) <= 0)
            continue;
        if (c->cap - c->len < 65536) {
            c->cap = c->len + 65536;
            c->buf = realloc(c->buf, c->cap);
            assert_non_null(c->buf);
        }
        n = read(c->fd, c->buf + c->len, c->cap - c->len);
        if (n <= 0) {
            c->eof = true;    /* EOF or ECONNRESET: nothing more will come */
            continue;
        }
        c->len += (size_t)n;
    }
}

/* Write everything, bounded; false when the server closed on us. */
static bool client_send_bytes(client *c, const void *data, size_t len)
{
    const char *p = data;
    int64_t deadline = now_ms() + WAIT_MS;

    while (len > 0) {
        struct pollfd pfd = { .fd = c->fd, .events = POLLOUT };
        ssize_t n;

        if (now_ms() > deadline)
            fail_msg("server does not read its input");
        if (poll(&pfd, 1, 100) <= 0)
            continue;
        n = send(c->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n < 0)
            return false;
        p += n;
        len -= (size_t)n;
    }
    return true;
}

static void client_send(client *c, const char *s)
{
    assert_true(client_send_bytes(c, s, strlen(s)));
}

/* The next reply (return or error); events on the way are kept. */
static json_t *client_reply(client *c)
{
    for (;;) {
        json_t *v = client_read(c, WAIT_MS);

        if (!v)
            fail_msg("no reply from the server (%s)", c->eof ? "closed" : "timeout");
        if (json_object_get(v, "event")) {
            json_array_append_new(c->events, v);
            continue;
        }
        return v;
    }
}

static json_t *client_cmd(client *c, const char *req)
{
    client_send(c, req);
    client_send(c, "\n");
    return client_reply(c);
}

/* Wait for an event by name; takes it out of the stash.  NULL on timeout. */
static json_t *client_event(client *c, const char *name, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;

    for (;;) {
        size_t i;
        json_t *e;

        json_array_foreach(c->events, i, e) {
            if (strcmp(json_string_value(json_object_get(e, "event")), name) == 0) {
                json_incref(e);
                json_array_remove(c->events, i);
                return e;
            }
        }
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return NULL;
        e = client_read(c, (int)left);
        if (!e)
            return NULL;
        json_array_append_new(c->events, e);
    }
}

/* The greeting checked, capabilities negotiated. */
static void client_ready(client *c, const char *path)
{
    json_t *v, *r;

    client_open(c, path);
    v = client_read(c, WAIT_MS);
    assert_non_null(v);
    assert_non_null(json_object_get(v, "QMP"));
    json_decref(v);
    r = client_cmd(c, "{\"execute\":\"qmp_capabilities\"}");
    assert_non_null(json_object_get(r, "return"));
    json_decref(r);
}

static void check_error(json_t *r, const char *cls, const char *desc)
{
    json_t *e = json_object_get(r, "error");
    char *s = json_dumps(r, JSON_COMPACT);

    if (!e || !json_is_object(e))
        fail_msg("expected an error, got %s", s);
    if (strcmp(json_string_value(json_object_get(e, "class")), cls) != 0)
        fail_msg("expected class %s, got %s", cls, s);
    if (desc && strcmp(json_string_value(json_object_get(e, "desc")), desc) != 0)
        fail_msg("expected desc \"%s\", got %s", desc, s);
    if (!desc && !*json_string_value(json_object_get(e, "desc")))
        fail_msg("empty desc: %s", s);
    free(s);
}

static void expect_error(client *c, const char *req, const char *cls, const char *desc)
{
    json_t *r = client_cmd(c, req);
    check_error(r, cls, desc);
    json_decref(r);
}

static void expect_error_containing(client *c, const char *req, const char *cls,
                                    const char *part)
{
    json_t *r = client_cmd(c, req);
    const char *d;

    check_error(r, cls, NULL);
    d = json_string_value(json_object_get(json_object_get(r, "error"), "desc"));
    if (!strstr(d, part))
        fail_msg("desc \"%s\" does not contain \"%s\"", d, part);
    json_decref(r);
}

/* The "return" of a request that must succeed; caller decrefs. */
static json_t *expect_return(client *c, const char *req)
{
    json_t *r = client_cmd(c, req), *ret = json_object_get(r, "return");

    if (!ret) {
        char *s = json_dumps(r, JSON_COMPACT);
        fail_msg("%s failed: %s", req, s);
    }
    json_incref(ret);
    json_decref(r);
    return ret;
}

static void expect_ok(client *c, const char *req)
{
    json_t *ret = expect_return(c, req);
    assert_true(json_is_object(ret));
    assert_int_equal(json_object_size(ret), 0);
    json_decref(ret);
}

/* ---------------------------------------------------------------- fixture */

typedef struct fx {
    char dir[64];
    char path[128];
    char uri[160];
    lm_mig *m;
    lm_qmp *q;
    int stops, starts;
} fx;

static void fx_vm_stop(void *opaque)
{
    ((fx *)opaque)->stops++;
}

static void fx_vm_start(void *opaque)
{
    ((fx *)opaque)->starts++;
}

static const lm_vm_ops fx_ops = { .stop = fx_vm_stop, .start = fx_vm_start };

static int fx_setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    lm_error err = { 0 };

    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/lmqmp-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof(f->path), "%s/qmp.sock", f->dir);
    snprintf(f->uri, sizeof(f->uri), "unix:%s", f->path);
    f->m = lm_new();
    lm_set_vm_ops(f->m, &fx_ops, f);
    f->q = lm_qmp_start(f->m, f->uri, &err);
    if (!f->q)
        fail_msg("lm_qmp_start: %s", err.msg);
    *state = f;
    return 0;
}

static void rm_dir(const char *dir)
{
    char cmd[160];

    /* Only our own mkdtemp directory. */
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (strncmp(dir, "/tmp/lmqmp-", 11) == 0 && system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
}

static int fx_teardown(void **state)
{
    fx *f = *state;

    lm_qmp_stop(f->q);
    lm_free(f->m);
    rm_dir(f->dir);
    free(f);
    return 0;
}

/* ---------------------------------------------------------------- tests */

static void test_greeting(void **state)
{
    fx *f = *state;
    client c;
    json_t *g, *v;

    client_open(&c, f->path);
    g = client_read(&c, WAIT_MS);
    assert_non_null(g);
    v = json_object_get(json_object_get(json_object_get(g, "QMP"), "version"), "qemu");
    assert_int_equal(json_integer_value(json_object_get(v, "major")), 7);
    assert_int_equal(json_integer_value(json_object_get(v, "minor")), 2);
    assert_int_equal(json_integer_value(json_object_get(v, "micro")), 0);
    v = json_object_get(json_object_get(json_object_get(g, "QMP"), "version"), "package");
    assert_string_equal(json_string_value(v), "livemig 0.1.0");
    v = json_object_get(json_object_get(g, "QMP"), "capabilities");
    assert_true(json_is_array(v));
    assert_int_equal(json_array_size(v), 0);
    json_decref(g);
    client_close(&c);
}

static void test_negotiation(void **state)
{
    fx *f = *state;
    client c;
    json_t *r;

    client_open(&c, f->path);
    json_decref(client_read(&c, WAIT_MS));
    expect_error(&c, "{\"execute\":\"query-status\"}", "CommandNotFound",
                 "Expecting capabilities negotiation with 'qmp_capabilities'");
    /* Unknown commands too: nothing but negotiation before negotiation. */
    expect_error(&c, "{\"execute\":\"no-such\"}", "CommandNotFound",
                 "Expecting capabilities negotiation with 'qmp_capabilities'");
    expect_error(&c, "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}",
                 "GenericError", "This monitor does not support Out-Of-Band (OOB)");

    r = client_cmd(&c, "{\"execute\":\"qmp_capabilities\",\"id\":\"neg-1\"}");
    assert_true(json_is_object(json_object_get(r, "return")));
    assert_int_equal(json_object_size(json_object_get(r, "return")), 0);
    assert_string_equal(json_string_value(json_object_get(r, "id")), "neg-1");
    json_decref(r);

    expect_error(&c, "{\"execute\":\"qmp_capabilities\"}", "CommandNotFound",
                 "Capabilities negotiation is already complete, command ignored");

    /* Any id comes back as it was sent. */
    r = client_cmd(&c, "{\"execute\":\"query-status\",\"id\":{\"n\":[1,2,{\"x\":null}]}}");
    assert_non_null(json_object_get(r, "return"));
    {
        json_t *want = json_loads("{\"n\":[1,2,{\"x\":null}]}", 0, NULL);
        assert_true(json_equal(json_object_get(r, "id"), want));
        json_decref(want);
    }
    json_decref(r);
    client_close(&c);
}

static void test_errors(void **state)
{
    fx *f = *state;
    client c;
    json_t *r;

    client_ready(&c, f->path);

    r = client_cmd(&c, "{\"execute\": bad}");
    check_error(r, "GenericError", NULL);
    assert_memory_equal(json_string_value(json_object_get(json_object_get(r, "error"), "desc")),
                        "JSON parse error, ", 18);
    assert_null(json_object_get(r, "id"));
    json_decref(r);

    expect_error(&c, "[1, 2]", "GenericError", "QMP input must be a JSON object");
    expect_error(&c, "42", "GenericError", "QMP input must be a JSON object");
    expect_error(&c, "{\"arguments\":{}}", "GenericError", "Missing 'execute' in QMP input");
    expect_error(&c, "{\"execute\":7}", "GenericError",
                 "QMP input member 'execute' must be a string");
    expect_error(&c, "{\"execute\":\"query-status\",\"arguments\":[]}", "GenericError",
                 "QMP input member 'arguments' must be an object");
    expect_error(&c, "{\"execute\":\"query-status\",\"bogus\":1}", "GenericError",
                 "QMP input member 'bogus' is unexpected");
    expect_error(&c, "{\"execute\":\"no-such-command\"}", "CommandNotFound",
                 "The command no-such-command has not been found");
    expect_error(&c, "{\"execute\":\"migrate\"}", "GenericError", "Parameter 'uri' is missing");
    expect_error(&c, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":5}}", "GenericError",
                 "Invalid parameter type for 'uri', expected: string");
    expect_error(&c, "{\"execute\":\"migrate-set-parameters\","
                     "\"arguments\":{\"downtime-limit\":\"x\"}}", "GenericError",
                 "Invalid parameter type for 'downtime-limit', expected: integer");
    expect_error(&c, "{\"execute\":\"migrate-set-parameters\","
                     "\"arguments\":{\"foo\":1}}", "GenericError",
                 "Parameter 'foo' is unexpected");
    expect_error(&c, "{\"execute\":\"query-status\",\"arguments\":{\"foo\":1}}",
                 "GenericError", "Parameter 'foo' is unexpected");
    expect_error_containing(&c, "{\"execute\":\"migrate\",\"arguments\":"
                                "{\"uri\":\"unix:/nonexistent/x\",\"blk\":true}}",
                            "GenericError", "not supported");
    expect_error_containing(&c, "{\"execute\":\"migrate\",\"arguments\":"
                                "{\"uri\":\"unix:/nonexistent/x\",\"inc\":true}}",
                            "GenericError", "not supported");
    expect_error_containing(&c, "{\"execute\":\"migrate\",\"arguments\":"
                                "{\"uri\":\"unix:/nonexistent/x\",\"resume\":true}}",
                            "GenericError", "not supported");
    /* A library refusal becomes GenericError with the library's message. */
    expect_error(&c, "{\"execute\":\"migrate\",\"arguments\":"
                     "{\"uri\":\"unix:/nonexistent-dir/x.sock\"}}", "GenericError", NULL);
    expect_error(&c, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"bogus:1\"}}",
                 "GenericError", NULL);
    expect_error(&c, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"fd:nosuchname\"}}",
                 "GenericError", "File descriptor named 'nosuchname' has not been found");

    /* Errors echo the id, and the connection is still fine afterwards. */
    r = client_cmd(&c, "{\"execute\":\"nope\",\"id\":17}");
    check_error(r, "CommandNotFound", "The command nope has not been found");
    assert_int_equal(json_integer_value(json_object_get(r, "id")), 17);
    json_decref(r);
    json_decref(expect_return(&c, "{\"execute\":\"query-status\"}"));
    client_close(&c);
}

static void test_framing(void **state)
{
    fx *f = *state;
    client c;
    json_t *r;

    client_ready(&c, f->path);

    /* A whole request and half of the next in one write. */
    client_send(&c, "{\"execute\":\"query-version\",\"id\":1}{\"execute\":\"query-sta");
    r = client_reply(&c);
    assert_int_equal(json_integer_value(json_object_get(r, "id")), 1);
    assert_string_equal(json_string_value(json_object_get(json_object_get(r, "return"),
                                                          "package")), "livemig 0.1.0");
    json_decref(r);
    /* The rest, one byte at a time, then two more in one write, no newlines. */
    {
        const char *rest = "tus\",  \"id\" : 2 }";
        for (const char *p = rest; *p; p++) {
            char b[2] = { *p, 0 };
            client_send(&c, b);
        }
    }
    client_send(&c, "\r\n\t {\"execute\":\"query-status\",\"id\":3}"
                    "{\"execute\":\"query-status\",\"id\":4}");
    for (int want = 2; want <= 4; want++) {
        r = client_reply(&c);
        assert_int_equal(json_integer_value(json_object_get(r, "id")), want);
        assert_non_null(json_object_get(r, "return"));
        json_decref(r);
    }
    /* Braces, brackets and escaped quotes inside strings do not count. */
    r = client_cmd(&c, "{\"execute\":\"query-status\",\"id\":\"}{]\\\"[\\\\\"}");
    assert_string_equal(json_string_value(json_object_get(r, "id")), "}{]\"[\\");
    json_decref(r);
    /* Stray punctuation and bare words are errors, not stalls. */
    expect_error(&c, "}", "GenericError", NULL);
    expect_error(&c, "nonsense", "GenericError", NULL);
    expect_error(&c, "\"just a string\"", "GenericError", "QMP input must be a JSON object");
    json_decref(expect_return(&c, "{\"execute\":\"query-status\"}"));
    client_close(&c);
}

static void test_query_migrate_idle(void **state)
{
    fx *f = *state;
    client c;
    json_t *ret;

    client_ready(&c, f->path);
    ret = expect_return(&c, "{\"execute\":\"query-migrate\"}");
    assert_true(json_is_object(ret));
    assert_int_equal(json_object_size(ret), 0);
    json_decref(ret);
    /* Cancelling nothing is fine, under both spellings. */
    expect_ok(&c, "{\"execute\":\"migrate_cancel\"}");
    expect_ok(&c, "{\"execute\":\"migrate-cancel\"}");
    client_close(&c);
}

static bool cap_state(json_t *caps, const char *name, bool *found)
{
    size_t i;
    json_t *e;

    *found = false;
    json_array_foreach(caps, i, e) {
        if (strcmp(json_string_value(json_object_get(e, "capability")), name) == 0) {
            *found = true;
            return json_is_true(json_object_get(e, "state"));
        }
    }
    return false;
}

static void test_capabilities(void **state)
{
    fx *f = *state;
    client c;
    json_t *caps;
    const char *name;
    bool found, on;

    client_ready(&c, f->path);
    caps = expect_return(&c, "{\"execute\":\"query-migrate-capabilities\"}");
    for (int i = 0; (name = lm_cap_name(i)); i++) {
        assert_false(cap_state(caps, name, &found));   /* all off by default */
        assert_true(found);
    }
    {
        int n = 0;
        while (lm_cap_name(n))
            n++;
        assert_int_equal((int)json_array_size(caps), n);
    }
    json_decref(caps);

    expect_ok(&c, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                  "[{\"capability\":\"auto-converge\",\"state\":true},"
                  " {\"capability\":\"events\",\"state\":true}]}}");
    caps = expect_return(&c, "{\"execute\":\"query-migrate-capabilities\"}");
    assert_true(cap_state(caps, "auto-converge", &found));
    assert_true(cap_state(caps, "events", &found));
    json_decref(caps);
    assert_int_equal(lm_cap_get(f->m, "auto-converge", &on), 0);
    assert_true(on);

    /* Bad elements are refused before anything is set. */
    expect_error(&c, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                     "[{\"capability\":\"auto-converge\",\"state\":false},"
                     " {\"capability\":\"no-such-cap\",\"state\":true}]}}", "GenericError",
                 "Parameter 'capabilities[1].capability' does not accept value 'no-such-cap'");
    expect_error(&c, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                     "[{\"capability\":\"auto-converge\",\"state\":false},"
                     " {\"capability\":\"events\",\"state\":\"yes\"}]}}", "GenericError",
                 "Invalid parameter type for 'capabilities[1].state', expected: boolean");
    expect_error(&c, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                     "[{\"capability\":\"events\"}]}}", "GenericError",
                 "Parameter 'capabilities[0].state' is missing");
    expect_error(&c, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                     "{\"capability\":\"events\"}}}", "GenericError",
                 "Invalid parameter type for 'capabilities', expected: array");
    expect_error(&c, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{}}",
                 "GenericError", "Parameter 'capabilities' is missing");
    assert_int_equal(lm_cap_get(f->m, "auto-converge", &on), 0);
    assert_true(on);

    expect_ok(&c, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                  "[{\"capability\":\"auto-converge\",\"state\":false}]}}");
    caps = expect_return(&c, "{\"execute\":\"query-migrate-capabilities\"}");
    assert_false(cap_state(caps, "auto-converge", &found));
    assert_true(found);
    assert_true(cap_state(caps, "events", &found));
    json_decref(caps);
    client_close(&c);
}

static int i_count_params(void)
{
    int n = 0;

    while (lm_param_name(n))
        n++;
    return n;
}

static void test_parameters(void **state)
{
    fx *f = *state;
    client c;
    json_t *p;
    const char *name;
    int64_t iv;
    bool bv;
    char sv[256];

    client_ready(&c, f->path);
    p = expect_return(&c, "{\"execute\":\"query-migrate-parameters\"}");
    for (int i = 0; (name = lm_param_name(i)); i++) {
        json_t *v = json_object_get(p, name);

        if (!v)
            fail_msg("query-migrate-parameters lacks %s", name);
        /* Exactly what the library holds (its defaults are its business). */
        sv[0] = 0;
        assert_int_equal(lm_param_get(f->m, name, &iv, &bv, sv, sizeof(sv)), 0);
        switch (lm_param_type_of(i)) {
        case LM_PARAM_INT:
            assert_true(json_is_integer(v));
            assert_int_equal(json_integer_value(v), iv);
            break;
        case LM_PARAM_BOOL:
            assert_true(json_is_boolean(v));
            assert_int_equal(json_is_true(v), bv);
            break;
        case LM_PARAM_STR:
            assert_true(json_is_string(v));
            assert_string_equal(json_string_value(v), sv);
            break;
        }
    }
    assert_int_equal((int)json_object_size(p), i_count_params());
    json_decref(p);

    expect_ok(&c, "{\"execute\":\"migrate-set-parameters\",\"arguments\":"
                  "{\"downtime-limit\":1234,\"max-bandwidth\":1000000}}");
    p = expect_return(&c, "{\"execute\":\"query-migrate-parameters\"}");
    assert_int_equal(json_integer_value(json_object_get(p, "downtime-limit")), 1234);
    assert_int_equal(json_integer_value(json_object_get(p, "max-bandwidth")), 1000000);
    json_decref(p);
    assert_int_equal(lm_param_get(f->m, "downtime-limit", &iv, &bv, sv, sizeof(sv)), 0);
    assert_int_equal(iv, 1234);

    /*
     * All or nothing: a value the library refuses (QEMU's limit for
     * downtime-limit is 2000 s) leaves the valid one untouched too.
     */
    expect_error(&c, "{\"execute\":\"migrate-set-parameters\",\"arguments\":"
                     "{\"max-bandwidth\":777,\"downtime-limit\":2000001}}", "GenericError", NULL);
    p = expect_return(&c, "{\"execute\":\"query-migrate-parameters\"}");
    assert_int_equal(json_integer_value(json_object_get(p, "downtime-limit")), 1234);
    assert_int_equal(json_integer_value(json_object_get(p, "max-bandwidth")), 1000000);
    json_decref(p);

    /* Type errors are caught before anything is set. */
    expect_error(&c, "{\"execute\":\"migrate-set-parameters\",\"arguments\":"
                     "{\"max-bandwidth\":5,\"downtime-limit\":true}}", "GenericError",
                 "Invalid parameter type for 'downtime-limit', expected: integer");
    assert_int_equal(lm_param_get(f->m, "max-bandwidth", &iv, &bv, sv, sizeof(sv)), 0);
    assert_int_equal(iv, 1000000);

    /* Every boolean and string parameter takes its own type. */
    for (int i = 0; (name = lm_param_name(i)); i++) {
        char req[512];

        if (lm_param_type_of(i) == LM_PARAM_BOOL) {
            snprintf(req, sizeof(req), "{\"execute\":\"migrate-set-parameters\","
                     "\"arguments\":{\"%s\":1}}", name);
            char want[256];
            snprintf(want, sizeof(want), "Invalid parameter type for '%s', expected: boolean",
                     name);
            expect_error(&c, req, "GenericError", want);
        }
    }
    client_close(&c);
}

static void test_status_stop_cont(void **state)
{
    fx *f = *state;
    client c;
    json_t *ret, *ev;

    lm_runstate_set_running(f->m);
    client_ready(&c, f->path);
    ret = expect_return(&c, "{\"execute\":\"query-status\"}");
    assert_string_equal(json_string_value(json_object_get(ret, "status")), "running");
    assert_true(json_is_true(json_object_get(ret, "running")));
    assert_true(json_is_false(json_object_get(ret, "singlestep")));
    json_decref(ret);

    expect_ok(&c, "{\"execute\":\"stop\"}");
    assert_int_equal(f->stops, 1);
    /*
     * The library reports the stop synchronously, so as in QEMU the event
     * comes before the reply: it must already be stashed (no wait here).
     */
    ev = client_event(&c, "STOP", 0);
    assert_non_null(ev);
    assert_true(json_is_integer(json_object_get(json_object_get(ev, "timestamp"), "seconds")));
    assert_true(json_is_integer(json_object_get(json_object_get(ev, "timestamp"),
                                                "microseconds")));
    assert_true(json_integer_value(json_object_get(json_object_get(ev, "timestamp"),
                                                   "seconds")) > 1600000000);
    json_decref(ev);
    ret = expect_return(&c, "{\"execute\":\"query-status\"}");
    assert_string_equal(json_string_value(json_object_get(ret, "status")),
                        lm_runstate_name(lm_runstate_get(f->m)));
    assert_true(json_is_false(json_object_get(ret, "running")));
    json_decref(ret);

    expect_ok(&c, "{\"execute\":\"cont\"}");
    assert_int_equal(f->starts, 1);
    ev = client_event(&c, "RESUME", 0);
    assert_non_null(ev);
    json_decref(ev);
    ret = expect_return(&c, "{\"execute\":\"query-status\"}");
    assert_true(json_is_true(json_object_get(ret, "running")));
    json_decref(ret);
    client_close(&c);
}

/* Program commands for the tests. */
static int cmd_echo(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    int *calls = opaque;
    size_t n = strlen(args_json) + 16;

    (*calls)++;
    *reply = malloc(n);
    snprintf(*reply, n, "{\"got\":%s}", args_json);
    return 0;
}

static int cmd_fail(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    snprintf(err->msg, sizeof(err->msg), "the guest is not ready");
    err->code = -EBUSY;
    return -EBUSY;
}

static int cmd_null(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    *reply = NULL;
    return 0;
}

static int cmd_badjson(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    *reply = strdup("{not json");
    return 0;
}

static int cmd_number(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    *reply = strdup("42");
    return 0;
}

static void test_registered(void **state)
{
    fx *f = *state;
    client c;
    json_t *ret, *want;
    int calls = 0;

    assert_int_equal(lm_qmp_register(f->q, "x-echo", cmd_echo, &calls), 0);
    assert_int_equal(lm_qmp_register(f->q, "x-fail", cmd_fail, NULL), 0);
    assert_int_equal(lm_qmp_register(f->q, "x-null", cmd_null, NULL), 0);
    assert_int_equal(lm_qmp_register(f->q, "x-bad", cmd_badjson, NULL), 0);
    assert_int_equal(lm_qmp_register(f->q, "x-num", cmd_null, NULL), 0);
    assert_int_equal(lm_qmp_register(f->q, "x-num", cmd_number, NULL), 0);  /* replaces */
    assert_int_equal(lm_qmp_register(f->q, "", cmd_null, NULL), -EINVAL);
    assert_int_equal(lm_qmp_register(f->q, "qmp_capabilities", cmd_null, NULL), -EINVAL);

    client_ready(&c, f->path);
    ret = expect_return(&c, "{\"execute\":\"x-echo\",\"arguments\":"
                            "{\"a\":[1,\"two\",{\"three\":3.5}],\"b\":null}}");
    want = json_loads("{\"got\":{\"a\":[1,\"two\",{\"three\":3.5}],\"b\":null}}", 0, NULL);
    assert_true(json_equal(ret, want));
    json_decref(want);
    json_decref(ret);
    ret = expect_return(&c, "{\"execute\":\"x-echo\"}");
    want = json_loads("{\"got\":{}}", 0, NULL);
    assert_true(json_equal(ret, want));
    json_decref(want);
    json_decref(ret);
    assert_int_equal(calls, 2);

    /* A large request (under the 1 MiB limit) in many small writes. */
    {
        size_t n = 900 * 1024, len;
        char *big = malloc(n + 128);
        json_t *got;

        assert_non_null(big);
        len = (size_t)sprintf(big, "{\"execute\":\"x-echo\",\"arguments\":{\"s\":\"");
        for (size_t i = 0; i < n; i++)
            big[len++] = (char)('a' + i % 26);
        len += (size_t)sprintf(big + len, "\"}}\n");
        for (size_t off = 0; off < len; off += 4096)
            assert_true(client_send_bytes(&c, big + off, len - off < 4096 ? len - off : 4096));
        free(big);
        ret = client_reply(&c);
        got = json_object_get(json_object_get(json_object_get(ret, "return"), "got"), "s");
        assert_true(json_is_string(got));
        assert_int_equal(json_string_length(got), n);
        assert_int_equal(json_string_value(got)[n - 1], 'a' + (n - 1) % 26);
        json_decref(ret);
        assert_int_equal(calls, 3);
    }

    expect_error(&c, "{\"execute\":\"x-fail\",\"id\":\"f\"}", "GenericError",
                 "the guest is not ready");
    expect_ok(&c, "{\"execute\":\"x-null\"}");
    expect_error_containing(&c, "{\"execute\":\"x-bad\"}", "GenericError", "invalid JSON");
    ret = expect_return(&c, "{\"execute\":\"x-num\"}");
    assert_int_equal(json_integer_value(ret), 42);
    json_decref(ret);

    /* query-commands lists built-in and program commands. */
    ret = expect_return(&c, "{\"execute\":\"query-commands\"}");
    {
        const char *need[] = { "qmp_capabilities", "query-migrate", "migrate",
                               "migrate_cancel", "migrate-set-parameters", "x-echo",
                               "x-num", NULL };
        for (int i = 0; need[i]; i++) {
            size_t j;
            json_t *e;
            bool seen = false;
            json_array_foreach(ret, j, e)
                if (strcmp(json_string_value(json_object_get(e, "name")), need[i]) == 0)
                    seen = true;
            if (!seen)
                fail_msg("query-commands lacks %s", need[i]);
        }
    }
    json_decref(ret);
    ret = expect_return(&c, "{\"execute\":\"query-version\"}");
    assert_int_equal(json_integer_value(json_object_get(json_object_get(ret, "qemu"),
                                                        "major")), 7);
    json_decref(ret);
    client_close(&c);
}

/*
 * query-version and the greeting report this build (meson's project
 * version, LIVEMIG_VERSION) under QEMU 7.2's shape, and the same object.
 */
static void test_version(void **state)
{
    fx *f = *state;
    client c;
    json_t *g, *ret;
    const char *want = "livemig " LIVEMIG_VERSION;

    client_open(&c, f->path);
    g = client_read(&c, WAIT_MS);
    assert_non_null(g);
    client_send(&c, "{\"execute\":\"qmp_capabilities\"}\n");
    json_decref(client_reply(&c));
    ret = expect_return(&c, "{\"execute\":\"query-version\"}");
    assert_string_equal(json_string_value(json_object_get(ret, "package")), want);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(ret, "qemu"),
                                                        "minor")), 2);
    assert_int_equal(json_object_size(ret), 2);
    assert_int_equal(json_object_size(json_object_get(ret, "qemu")), 3);
    assert_true(json_equal(ret, json_object_get(json_object_get(g, "QMP"), "version")));
    json_decref(ret);
    json_decref(g);
    client_close(&c);
}

static int cmd_mine(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    *reply = strdup("{\"mine\":true}");
    return 0;
}

/* A program command replaces a built-in of the same name, and is listed once. */
static void test_replace_builtin(void **state)
{
    fx *f = *state;
    client c;
    json_t *ret, *e;
    size_t i;
    int seen = 0;

    assert_int_equal(lm_qmp_register(f->q, "query-status", cmd_mine, NULL), 0);
    assert_int_equal(lm_qmp_register(f->q, "getfd", cmd_mine, NULL), 0);
    client_ready(&c, f->path);
    ret = expect_return(&c, "{\"execute\":\"query-status\",\"arguments\":{\"any\":1}}");
    assert_true(json_is_true(json_object_get(ret, "mine")));
    json_decref(ret);
    ret = expect_return(&c, "{\"execute\":\"getfd\"}");
    assert_true(json_is_true(json_object_get(ret, "mine")));
    json_decref(ret);
    /* The other built-ins are untouched. */
    ret = expect_return(&c, "{\"execute\":\"query-migrate\"}");
    assert_int_equal(json_object_size(ret), 0);
    json_decref(ret);
    ret = expect_return(&c, "{\"execute\":\"query-commands\"}");
    json_array_foreach(ret, i, e)
        if (strcmp(json_string_value(json_object_get(e, "name")), "query-status") == 0)
            seen++;
    assert_int_equal(seen, 1);
    json_decref(ret);
    client_close(&c);
}

/* A program command that takes a descriptor named with getfd. */
typedef struct taker {
    lm_qmp *q;
    int calls;
} taker;

static int cmd_take(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    taker *t = opaque;
    int fd = lm_qmp_take_fd(t->q, "mine");

    t->calls++;
    if (fd < 0) {
        snprintf(err->msg, sizeof(err->msg), "take: %s", strerror(-fd));
        err->code = fd;
        return fd;
    }
    /* Ours now: prove it is the one passed, then close it. */
    if (write(fd, "k", 1) != 1) {
        close(fd);
        snprintf(err->msg, sizeof(err->msg), "take: write: %s", strerror(errno));
        err->code = -EIO;
        return -EIO;
    }
    close(fd);
    return 0;
}

/* Pass the write end of a new pipe with getfd under `name`; returns the read end. */
static int pass_pipe(client *c, const char *name)
{
    char req[128], cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
    struct cmsghdr *cm;
    int pfd[2];
    json_t *r;

    snprintf(req, sizeof(req), "{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"%s\"}}\n",
             name);
    iov = (struct iovec){ .iov_base = req, .iov_len = strlen(req) };
    assert_int_equal(pipe(pfd), 0);
    memset(cbuf, 0, sizeof(cbuf));
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &pfd[1], sizeof(int));
    assert_int_equal(sendmsg(c->fd, &msg, 0), (ssize_t)strlen(req));
    close(pfd[1]);
    r = client_reply(c);
    assert_non_null(json_object_get(r, "return"));
    json_decref(r);
    return pfd[0];
}

static void test_take_fd(void **state)
{
    fx *f = *state;
    taker t = { .q = f->q };
    client a, b;
    char byte;
    int rd;

    /* Only inside a handler, on the server thread. */
    assert_int_equal(lm_qmp_take_fd(f->q, "mine"), -EPERM);
    assert_int_equal(lm_qmp_take_fd(NULL, "mine"), -EINVAL);
    assert_int_equal(lm_qmp_take_fd(f->q, NULL), -EINVAL);
    assert_int_equal(lm_qmp_register(f->q, "x-take", cmd_take, &t), 0);

    client_ready(&a, f->path);
    client_ready(&b, f->path);
    expect_error(&a, "{\"execute\":\"x-take\"}", "GenericError", "take: No such file or directory");
    /* Named descriptors are per client: b's is not a's. */
    rd = pass_pipe(&b, "mine");
    expect_error(&a, "{\"execute\":\"x-take\"}", "GenericError", "take: No such file or directory");
    expect_ok(&b, "{\"execute\":\"x-take\"}");
    assert_int_equal(t.calls, 3);
    {
        struct pollfd p = { .fd = rd, .events = POLLIN };

        assert_int_equal(poll(&p, 1, WAIT_MS), 1);
        assert_int_equal(read(rd, &byte, 1), 1);
        assert_int_equal(byte, 'k');
        /* The server kept no copy: the handler's close was the last writer. */
        assert_int_equal(poll(&p, 1, WAIT_MS), 1);
        assert_int_equal(read(rd, &byte, 1), 0);
    }
    close(rd);
    /* Taking forgets the name, as migrate's "fd:NAME" does. */
    expect_error(&b, "{\"execute\":\"closefd\",\"arguments\":{\"fdname\":\"mine\"}}",
                 "GenericError", "File descriptor named 'mine' not found");
    expect_error(&b, "{\"execute\":\"x-take\"}", "GenericError", "take: No such file or directory");
    client_close(&a);
    client_close(&b);
}

/* migrate's "fd:NAME" consumes the name too, whatever the migration does. */
static void test_migrate_fd_name(void **state)
{
    fx *f = *state;
    client c;
    int rd;

    client_ready(&c, f->path);
    rd = pass_pipe(&c, "out");
    /* No RAM registered: refused, but the descriptor was taken and closed. */
    expect_error_containing(&c, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"fd:out\"}}",
                            "GenericError", "nothing to migrate");
    {
        struct pollfd p = { .fd = rd, .events = POLLIN };
        char byte;

        assert_int_equal(poll(&p, 1, WAIT_MS), 1);
        assert_int_equal(read(rd, &byte, 1), 0);
    }
    expect_error(&c, "{\"execute\":\"closefd\",\"arguments\":{\"fdname\":\"out\"}}",
                 "GenericError", "File descriptor named 'out' not found");
    expect_error(&c, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"fd:out\"}}",
                 "GenericError", "File descriptor named 'out' has not been found");
    close(rd);
    client_close(&c);
}

static void test_program_events(void **state)
{
    fx *f = *state;
    client a, b, raw;
    json_t *ev, *r;

    client_ready(&a, f->path);
    client_ready(&b, f->path);
    client_open(&raw, f->path);
    json_decref(client_read(&raw, WAIT_MS));          /* greeting only */

    lm_qmp_event(f->q, "SHUTDOWN", "{\"guest\":false,\"reason\":\"host-qmp-quit\"}");
    lm_qmp_event(f->q, "X-NODATA", NULL);
    lm_qmp_event(f->q, "X-BAD", "{oops");             /* dropped, logged */
    for (client *c = &a; c; c = (c == &a ? &b : NULL)) {
        ev = client_event(c, "SHUTDOWN", WAIT_MS);
        assert_non_null(ev);
        assert_true(json_is_false(json_object_get(json_object_get(ev, "data"), "guest")));
        assert_non_null(json_object_get(json_object_get(ev, "timestamp"), "seconds"));
        json_decref(ev);
        ev = client_event(c, "X-NODATA", WAIT_MS);
        assert_non_null(ev);
        assert_null(json_object_get(ev, "data"));
        json_decref(ev);
    }
    /* A client that has not negotiated gets no events: its next message is the reply. */
    client_send(&raw, "{\"execute\":\"qmp_capabilities\"}\n");
    r = client_read(&raw, WAIT_MS);
    assert_non_null(r);
    assert_null(json_object_get(r, "event"));
    assert_non_null(json_object_get(r, "return"));
    json_decref(r);
    client_close(&a);
    client_close(&b);
    client_close(&raw);
}

static void test_two_clients(void **state)
{
    fx *f = *state;
    client a, b;
    json_t *r;

    client_ready(&a, f->path);
    client_ready(&b, f->path);
    /* a stalls mid-request; b is served meanwhile. */
    client_send(&a, "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"downtime-li");
    r = client_cmd(&b, "{\"execute\":\"query-status\",\"id\":\"b\"}");
    assert_string_equal(json_string_value(json_object_get(r, "id")), "b");
    json_decref(r);
    client_send(&a, "mit\":4321},\"id\":\"a\"}");
    r = client_reply(&a);
    assert_string_equal(json_string_value(json_object_get(r, "id")), "a");
    assert_non_null(json_object_get(r, "return"));
    json_decref(r);
    /* What one client set, the other sees. */
    r = expect_return(&b, "{\"execute\":\"query-migrate-parameters\"}");
    assert_int_equal(json_integer_value(json_object_get(r, "downtime-limit")), 4321);
    json_decref(r);
    client_close(&a);
    r = expect_return(&b, "{\"execute\":\"query-status\"}");
    json_decref(r);
    client_close(&b);
}

static void test_garbage_clients(void **state)
{
    fx *f = *state;
    client good, bad;
    json_t *r;
    char *big;
    size_t n;
    bool sent;

    client_ready(&good, f->path);

    /* Binary noise: errors, but the server survives and so does good. */
    client_open(&bad, f->path);
    json_decref(client_read(&bad, WAIT_MS));
    {
        unsigned char noise[4096];
        unsigned x = 12345;
        for (size_t i = 0; i < sizeof(noise); i++) {
            x = x * 1103515245 + 12345;
            noise[i] = (unsigned char)(x >> 16);
            if (noise[i] == '{' || noise[i] == '[' || noise[i] == '"')
                noise[i] = '!';     /* keep it from opening a value that never ends */
        }
        client_send_bytes(&bad, noise, sizeof(noise));
        client_send(&bad, "\n");
    }
    r = client_read(&bad, WAIT_MS);
    assert_non_null(r);
    check_error(r, "GenericError", NULL);
    json_decref(r);
    client_close(&bad);
    json_decref(expect_return(&good, "{\"execute\":\"query-status\"}"));

    /* An unfinished value over the limit: error, then the server hangs up. */
    client_open(&bad, f->path);
    json_decref(client_read(&bad, WAIT_MS));
    n = (1u << 20) + 65536 * 2;
    big = malloc(n);
    assert_non_null(big);
    memset(big, 'x', n);
    memcpy(big, "{\"execute\":\"", 12);
    sent = client_send_bytes(&bad, big, n);
    (void)sent;     /* the server may hang up before it has read everything */
    free(big);
    r = client_read(&bad, WAIT_MS);
    assert_non_null(r);
    check_error(r, "GenericError", NULL);
    assert_non_null(strstr(json_string_value(json_object_get(json_object_get(r, "error"),
                                                             "desc")), "too large"));
    json_decref(r);
    assert_null(client_read(&bad, WAIT_MS));
    assert_true(bad.eof);
    client_close(&bad);

    /* Nesting deeper than the parser allows: error and hang up. */
    client_open(&bad, f->path);
    json_decref(client_read(&bad, WAIT_MS));
    big = malloc(5000);
    memset(big, '[', 5000);
    client_send_bytes(&bad, big, 5000);
    free(big);
    r = client_read(&bad, WAIT_MS);
    assert_non_null(r);
    check_error(r, "GenericError", NULL);
    json_decref(r);
    assert_null(client_read(&bad, WAIT_MS));
    assert_true(bad.eof);
    client_close(&bad);

    /* Vanishing in the middle of a request, or right after sending one. */
    client_open(&bad, f->path);
    client_send(&bad, "{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-mig");
    client_close(&bad);
    client_open(&bad, f->path);
    client_send(&bad, "{\"execute\":\"qmp_capabilities\"}\n"
                      "{\"execute\":\"query-migrate-parameters\"}\n");
    client_close(&bad);

    json_decref(expect_return(&good, "{\"execute\":\"query-status\"}"));
    client_close(&good);
}

/* A half-closed client still gets the answers to what it sent. */
static void test_half_close(void **state)
{
    fx *f = *state;
    client c;
    json_t *r;

    client_open(&c, f->path);
    client_send(&c, "{\"execute\":\"qmp_capabilities\",\"id\":1}\n"
                    "{\"execute\":\"query-status\",\"id\":2}");
    assert_int_equal(shutdown(c.fd, SHUT_WR), 0);
    json_decref(client_read(&c, WAIT_MS));            /* greeting */
    for (int id = 1; id <= 2; id++) {
        r = client_reply(&c);
        assert_int_equal(json_integer_value(json_object_get(r, "id")), id);
        assert_non_null(json_object_get(r, "return"));
        json_decref(r);
    }
    assert_null(client_read(&c, WAIT_MS));
    assert_true(c.eof);
    client_close(&c);
}

static void test_getfd(void **state)
{
    fx *f = *state;
    client c;
    int pfd[2];
    char cbuf[CMSG_SPACE(sizeof(int))];
    const char *req = "{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"mig\"}}\n";
    struct iovec iov = { .iov_base = (void *)req, .iov_len = strlen(req) };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
    struct cmsghdr *cm;
    json_t *r;
    char byte;

    client_ready(&c, f->path);
    expect_error(&c, "{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"mig\"}}",
                 "GenericError", "No file descriptor supplied via SCM_RIGHTS");
    expect_error(&c, "{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"9x\"}}",
                 "GenericError", "Parameter 'fdname' expects a name not starting with a digit");

    assert_int_equal(pipe(pfd), 0);
    memset(cbuf, 0, sizeof(cbuf));
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &pfd[1], sizeof(int));
    assert_int_equal(sendmsg(c.fd, &msg, 0), (ssize_t)strlen(req));
    close(pfd[1]);
    r = client_reply(&c);
    assert_non_null(json_object_get(r, "return"));
    json_decref(r);

    /* The server holds the write end now; closefd drops it: EOF on ours. */
    expect_error(&c, "{\"execute\":\"closefd\",\"arguments\":{\"fdname\":\"other\"}}",
                 "GenericError", "File descriptor named 'other' not found");
    expect_ok(&c, "{\"execute\":\"closefd\",\"arguments\":{\"fdname\":\"mig\"}}");
    {
        struct pollfd p = { .fd = pfd[0], .events = POLLIN };
        assert_int_equal(poll(&p, 1, WAIT_MS), 1);
        assert_int_equal(read(pfd[0], &byte, 1), 0);
    }
    close(pfd[0]);
    client_close(&c);
}

static void test_listen_errors(void **state)
{
    fx *f = *state;
    lm_error err = { 0 };
    lm_qmp *q2;
    char uri[200], path[160];
    int fd;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };

    assert_null(lm_qmp_start(f->m, "tcp:127.0.0.1:4444", &err));
    assert_non_null(strstr(err.msg, "unix:"));
    assert_true(err.code < 0);

    /* The path of a running server is refused, and that server keeps working. */
    memset(&err, 0, sizeof(err));
    assert_null(lm_qmp_start(f->m, f->uri, &err));
    assert_non_null(strstr(err.msg, "in use"));
    {
        client c;
        client_ready(&c, f->path);
        client_close(&c);
    }

    /* A file that is not a socket is never removed. */
    snprintf(path, sizeof(path), "%s/plain", f->dir);
    fd = open(path, O_CREAT | O_WRONLY, 0600);
    assert_true(fd >= 0);
    close(fd);
    snprintf(uri, sizeof(uri), "unix:%s", path);
    memset(&err, 0, sizeof(err));
    assert_null(lm_qmp_start(f->m, uri, &err));
    assert_non_null(strstr(err.msg, "not a socket"));
    assert_int_equal(access(path, F_OK), 0);

    /* A stale socket (nobody listening) is replaced. */
    snprintf(path, sizeof(path), "%s/stale.sock", f->dir);
    assert_true(strlen(path) < sizeof(sa.sun_path));
    memcpy(sa.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(fd);
    snprintf(uri, sizeof(uri), "unix:%s", path);
    q2 = lm_qmp_start(f->m, uri, &err);
    if (!q2)
        fail_msg("stale socket not replaced: %s", err.msg);
    {
        client c;
        client_ready(&c, path);
        client_close(&c);
    }
    lm_qmp_stop(q2);
    assert_int_equal(access(path, F_OK), -1);
}

/* Stop with clients attached: one idle, one mid-request, one not reading. */
static void test_stop_with_clients(void **state)
{
    fx *f = *state;
    client idle, partial, deaf;
    int64_t t0;
    char *req;
    size_t n = 0;

    client_ready(&idle, f->path);
    client_ready(&partial, f->path);
    client_send(&partial, "{\"execute\":\"query-st");
    client_ready(&deaf, f->path);
    /* Many requests it never reads the answers to (until its buffers fill). */
    req = malloc(2000 * 48);
    for (int i = 0; i < 2000; i++)
        n += (size_t)sprintf(req + n, "{\"execute\":\"query-commands\"}\n");
    client_send_bytes(&deaf, req, n);
    free(req);
    json_decref(expect_return(&idle, "{\"execute\":\"query-status\"}"));

    t0 = now_ms();
    lm_qmp_stop(f->q);
    f->q = NULL;
    assert_true(now_ms() - t0 < 5000);
    assert_int_equal(access(f->path, F_OK), -1);

    assert_null(client_read(&idle, WAIT_MS));
    assert_true(idle.eof);
    assert_null(client_read(&partial, WAIT_MS));
    assert_true(partial.eof);
    client_close(&idle);
    client_close(&partial);
    client_close(&deaf);

    /* The context outlives its server: events now go nowhere, harmlessly. */
    lm_runstate_set_running(f->m);
    assert_int_equal(lm_vm_stop(f->m, NULL), 0);
}

/* A client that never reads is dropped before it costs unbounded memory. */
static void test_slow_reader_dropped(void **state)
{
    fx *f = *state;
    client good, deaf;
    const char *one = "{\"execute\":\"query-migrate-parameters\"}\n";
    size_t len = strlen(one), chunk = 1000, total = 0;
    char *req = malloc(len * chunk);
    int64_t deadline = now_ms() + 60000;

    for (size_t i = 0; i < chunk; i++)
        memcpy(req + i * len, one, len);
    client_ready(&good, f->path);
    client_ready(&deaf, f->path);
    /* Keep asking, never read; the server must hang up at its output limit. */
    while (client_send_bytes(&deaf, req, len * chunk)) {
        total += len * chunk;
        if (now_ms() > deadline)
            fail_msg("server kept a client that never reads (%zu bytes sent)", total);
        struct pollfd p = { .fd = deaf.fd, .events = POLLRDHUP };
        if (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP)))
            break;
    }
    free(req);
    json_decref(expect_return(&good, "{\"execute\":\"query-status\"}"));
    client_close(&deaf);
    client_close(&good);
}

/* ------------------------------------------------- a migration through QMP */

#define MIG_RAM (4u << 20)

/*
 * A server's listener slot is given back by lm_qmp_stop(): a program can
 * restart its server on one context far more often than the context has
 * slots (8), and every new server gets the events.
 */
#define RESTARTS (3 * 8 + 1)

static void test_restart_many(void **state)
{
    fx *f = *state;
    lm_error err = { 0 };

    lm_runstate_set_running(f->m);
    for (int i = 0; i < RESTARTS; i++) {
        bool stop = i % 2 == 0;
        client c;
        json_t *ev;

        lm_qmp_stop(f->q);
        f->q = lm_qmp_start(f->m, f->uri, &err);
        if (!f->q)
            fail_msg("server #%d on the same context: %s", i + 2, err.msg);
        client_ready(&c, f->path);
        expect_ok(&c, stop ? "{\"execute\":\"stop\"}" : "{\"execute\":\"cont\"}");
        /* Synchronous, as in test_status_stop_cont: already stashed. */
        ev = client_event(&c, stop ? "STOP" : "RESUME", 0);
        if (!ev)
            fail_msg("server #%d: no %s event: its listener is not subscribed", i + 2,
                     stop ? "STOP" : "RESUME");
        json_decref(ev);
        /* Exactly one: a stopped server's listener must not be called, and
         * this one is subscribed once. */
        assert_int_equal(json_array_size(c.events), 0);
        client_close(&c);
    }
    assert_int_equal(f->stops, (RESTARTS + 1) / 2);
    assert_int_equal(f->starts, RESTARTS / 2);
}

/* Flips the run state as fast as it can: every flip calls the listeners. */
typedef struct flipper {
    lm_mig *m;
    atomic_bool done;
    atomic_ulong flips;
} flipper;

static void *flip_thread(void *arg)
{
    flipper *fl = arg;

    while (!atomic_load(&fl->done)) {
        lm_vm_stop(fl->m, NULL);
        lm_vm_start(fl->m, NULL);
        atomic_fetch_add(&fl->flips, 1);
    }
    return NULL;
}

/*
 * Stop and start servers while another thread keeps calling the listeners:
 * lm_qmp_stop() frees the server right after it unsubscribes, so a callback
 * still running on it would be a use after free (ASan) and a stop that
 * waits for a callback that never ends a hang.  Each server lives until the
 * flipper has flipped at least once more, so callbacks really do run on it.
 */
#define FLIP_ROUNDS 200
#define FLIP_BOUND_S 120

static void test_stop_while_notifying(void **state)
{
    fx *f = *state;
    flipper fl = { .m = f->m };
    lm_error err = { 0 };
    pthread_t t;
    int64_t deadline;

    /* A stop that hangs fails the test (SIGALRM ends the process) instead of
     * running into meson's timeout. */
    alarm(FLIP_BOUND_S);
    lm_runstate_set_running(f->m);
    assert_int_equal(pthread_create(&t, NULL, flip_thread, &fl), 0);
    deadline = now_ms() + FLIP_BOUND_S * 1000 / 2;
    for (int i = 0; i < FLIP_ROUNDS; i++) {
        unsigned long seen = atomic_load(&fl.flips);

        lm_qmp_stop(f->q);
        f->q = lm_qmp_start(f->m, f->uri, &err);
        if (!f->q)
            fail_msg("round %d: %s", i, err.msg);
        while (atomic_load(&fl.flips) < seen + 2) {
            if (now_ms() > deadline)
                fail_msg("round %d: the flipper stopped flipping", i);
            sched_yield();
        }
    }
    atomic_store(&fl.done, true);
    assert_int_equal(pthread_join(t, NULL), 0);
    alarm(0);
    /* The last server still works, and reports a plain stop. */
    {
        client c;
        json_t *ev;

        lm_runstate_set_running(f->m);
        client_ready(&c, f->path);
        expect_ok(&c, "{\"execute\":\"stop\"}");
        ev = client_event(&c, "STOP", WAIT_MS);
        assert_non_null(ev);
        json_decref(ev);
        client_close(&c);
    }
}

static void test_migration(void **state)
{
    fx *dst = *state;
    fx src = { 0 };
    lm_error err = { 0 };
    client cs, cd;
    uint8_t *ram_s, *ram_d;
    char req[512], mig_path[160];
    json_t *ev, *r, *ram, *sa;
    int64_t deadline;

    snprintf(src.dir, sizeof(src.dir), "%s", dst->dir);
    snprintf(src.path, sizeof(src.path), "%s/src.sock", dst->dir);
    snprintf(src.uri, sizeof(src.uri), "unix:%s", src.path);
    snprintf(mig_path, sizeof(mig_path), "%s/mig.sock", dst->dir);

    ram_s = mmap(NULL, MIG_RAM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ram_d = mmap(NULL, MIG_RAM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(ram_s != MAP_FAILED && ram_d != MAP_FAILED);
    for (size_t i = 0; i < MIG_RAM; i += 4096)
        if ((i / 4096) % 3)                       /* some zero pages too */
            memset(ram_s + i, (int)(i / 4096) & 0xff, 4096);

    src.m = lm_new();
    assert_int_equal(lm_ram_register(src.m, "pc.ram", ram_s, MIG_RAM, 4096, &err), 0);
    assert_int_equal(lm_ram_register(dst->m, "pc.ram", ram_d, MIG_RAM, 4096, &err), 0);
    assert_int_equal(lm_set_dirty_tracker(src.m, "cooperative", &err), 0);
    lm_runstate_set_running(src.m);     /* the source guest runs */
    src.q = lm_qmp_start(src.m, src.uri, &err);
    if (!src.q)
        fail_msg("lm_qmp_start: %s", err.msg);

    client_ready(&cs, src.path);
    client_ready(&cd, dst->path);
    expect_ok(&cs, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                   "[{\"capability\":\"events\",\"state\":true}]}}");
    expect_ok(&cd, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                   "[{\"capability\":\"events\",\"state\":true}]}}");

    snprintf(req, sizeof(req), "{\"execute\":\"migrate-incoming\",\"arguments\":"
             "{\"uri\":\"unix:%s\"}}", mig_path);
    expect_ok(&cd, req);
    r = expect_return(&cd, "{\"execute\":\"query-migrate\"}");
    sa = json_array_get(json_object_get(r, "socket-address"), 0);
    assert_non_null(sa);
    assert_string_equal(json_string_value(json_object_get(sa, "type")), "unix");
    assert_string_equal(json_string_value(json_object_get(sa, "path")), mig_path);
    json_decref(r);

    snprintf(req, sizeof(req), "{\"execute\":\"migrate\",\"arguments\":"
             "{\"uri\":\"unix:%s\",\"detach\":true}}", mig_path);
    expect_ok(&cs, req);

    /* MIGRATION events on both sides, ending in completed. */
    deadline = now_ms() + 60000;
    for (client *c = &cs; c; c = (c == &cs ? &cd : NULL)) {
        bool done = false, saw_setup = false;
        while (!done) {
            int64_t left = deadline - now_ms();
            ev = client_event(c, "MIGRATION", left > 0 ? (int)left : 0);
            if (!ev)
                fail_msg("no MIGRATION completed event on the %s",
                         c == &cs ? "source" : "destination");
            const char *st = json_string_value(json_object_get(json_object_get(ev, "data"),
                                                               "status"));
            if (strcmp(st, "setup") == 0)
                saw_setup = true;
            if (strcmp(st, "failed") == 0 || strcmp(st, "cancelled") == 0)
                fail_msg("migration %s", st);
            done = strcmp(st, "completed") == 0;
            json_decref(ev);
        }
        if (c == &cs)
            assert_true(saw_setup);     /* QEMU's source starts with setup */
    }
    /* Run-state events as QEMU: STOP on the source, only RESUME on the destination. */
    ev = client_event(&cs, "STOP", WAIT_MS);
    assert_non_null(ev);
    json_decref(ev);
    ev = client_event(&cd, "RESUME", WAIT_MS);
    assert_non_null(ev);
    json_decref(ev);
    assert_null(client_event(&cd, "STOP", 0));
    assert_int_equal(lm_wait(src.m, WAIT_MS), LM_STATUS_COMPLETED);
    assert_int_equal(lm_wait(dst->m, WAIT_MS), LM_STATUS_COMPLETED);
    assert_memory_equal(ram_s, ram_d, MIG_RAM);

    r = expect_return(&cs, "{\"execute\":\"query-migrate\"}");
    assert_string_equal(json_string_value(json_object_get(r, "status")), "completed");
    assert_true(json_is_integer(json_object_get(r, "total-time")));
    assert_true(json_is_integer(json_object_get(r, "setup-time")));
    assert_true(json_is_integer(json_object_get(r, "downtime")));
    assert_null(json_object_get(r, "expected-downtime"));
    assert_null(json_object_get(r, "error-desc"));
    assert_string_equal(json_string_value(json_object_get(r, "x-dirty-tracker")),
                        "cooperative");
    ram = json_object_get(r, "ram");
    {
        const char *fields[] = { "transferred", "remaining", "total", "duplicate", "skipped",
                                 "normal", "normal-bytes", "dirty-pages-rate", "mbps",
                                 "dirty-sync-count", "postcopy-requests", "page-size",
                                 "multifd-bytes", "pages-per-second", "precopy-bytes",
                                 "downtime-bytes", "postcopy-bytes",
                                 "dirty-sync-missed-zero-copy", NULL };
        for (int i = 0; fields[i]; i++)
            if (!json_is_number(json_object_get(ram, fields[i])))
                fail_msg("query-migrate ram lacks %s", fields[i]);
        assert_int_equal(json_object_size(ram), 18);
    }
    assert_int_equal(json_integer_value(json_object_get(ram, "total")), MIG_RAM);
    assert_int_equal(json_integer_value(json_object_get(ram, "page-size")), 4096);
    /* What the library counted, reported faithfully. */
    {
        lm_stats st;

        lm_query(src.m, &st);
        assert_int_equal(json_integer_value(json_object_get(ram, "transferred")), st.transferred);
        assert_int_equal(json_integer_value(json_object_get(ram, "normal")), st.normal);
        assert_int_equal(json_integer_value(json_object_get(ram, "duplicate")), st.duplicate);
        assert_int_equal(json_integer_value(json_object_get(ram, "normal-bytes")),
                         st.normal_bytes);
        assert_int_equal(json_integer_value(json_object_get(ram, "dirty-sync-count")),
                         st.dirty_sync_count);
        assert_int_equal(json_integer_value(json_object_get(r, "downtime")), st.downtime);
        assert_int_equal(json_integer_value(json_object_get(r, "total-time")), st.total_time);
        assert_true(st.normal + st.duplicate >= MIG_RAM / 4096);
    }
    json_decref(r);

    r = expect_return(&cd, "{\"execute\":\"query-migrate\"}");
    assert_string_equal(json_string_value(json_object_get(r, "status")), "completed");
    json_decref(r);
    r = expect_return(&cs, "{\"execute\":\"query-status\"}");
    assert_string_equal(json_string_value(json_object_get(r, "status")), "postmigrate");
    json_decref(r);

    client_close(&cs);
    client_close(&cd);
    lm_qmp_stop(src.q);
    lm_free(src.m);
    munmap(ram_s, MIG_RAM);
    /* The fixture frees dst->m, which points into ram_d: unmap after that. */
    lm_qmp_stop(dst->q);
    dst->q = NULL;
    lm_free(dst->m);
    dst->m = lm_new();
    munmap(ram_d, MIG_RAM);
}

/* A failing migration reports error-desc; cancel of an incoming one works. */
static void test_migration_failure(void **state)
{
    fx *f = *state;
    client c;
    json_t *r, *ev;
    char req[512];
    lm_error err = { 0 };
    static uint8_t ram[64 * 1024] __attribute__((aligned(4096)));

    assert_int_equal(lm_ram_register(f->m, "pc.ram", ram, sizeof(ram), 4096, &err), 0);
    client_ready(&c, f->path);
    expect_ok(&c, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                  "[{\"capability\":\"events\",\"state\":true}]}}");
    /* Nobody listens: refused at once, reported as the command's error. */
    snprintf(req, sizeof(req), "{\"execute\":\"migrate\",\"arguments\":"
             "{\"uri\":\"unix:%s/nobody.sock\"}}", f->dir);
    expect_error(&c, req, "GenericError", NULL);

    /* A destination that gets cancelled before anyone connects. */
    snprintf(req, sizeof(req), "{\"execute\":\"migrate-incoming\",\"arguments\":"
             "{\"uri\":\"unix:%s/in.sock\"}}", f->dir);
    expect_ok(&c, req);
    ev = client_event(&c, "MIGRATION", WAIT_MS);
    assert_non_null(ev);
    json_decref(ev);
    expect_ok(&c, "{\"execute\":\"migrate_cancel\"}");
    {
        lm_status st = lm_wait(f->m, WAIT_MS);
        assert_true(st == LM_STATUS_CANCELLED || st == LM_STATUS_FAILED);
    }
    r = expect_return(&c, "{\"execute\":\"query-migrate\"}");
    {
        const char *st = json_string_value(json_object_get(r, "status"));
        assert_non_null(st);
        if (strcmp(st, "failed") == 0)
            assert_true(json_is_string(json_object_get(r, "error-desc")));
        else
            assert_string_equal(st, "cancelled");
    }
    json_decref(r);
    client_close(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_greeting, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_negotiation, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_errors, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_framing, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_query_migrate_idle, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_capabilities, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_parameters, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_status_stop_cont, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_registered, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_version, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_replace_builtin, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_take_fd, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_migrate_fd_name, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_program_events, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_two_clients, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_garbage_clients, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_half_close, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_getfd, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_listen_errors, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_stop_with_clients, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_slow_reader_dropped, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_restart_many, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_stop_while_notifying, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_migration, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_migration_failure, fx_setup, fx_teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
