/*
 * src/tls: keys.psk parsing, the object registry (add, duplicate ids, del,
 * resolving the tls-* parameters and every refusal there), the tls-*
 * parameters themselves, and real PSK sessions over a socketpair -- one
 * thread per end -- for the bytes, the authz refusal and an unknown
 * username.  x509 needs certificates made by certtool: the integration test
 * (tests/integration/test_tls.py) covers it.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "migration/migration.h"
#include "tls/tls.h"

#define T_MS 10000

static char dir[64];

static void write_file(const char *name, const char *text)
{
    char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int setup_dir(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/lm-test-tls-XXXXXX");
    assert_non_null(mkdtemp(dir));
    return 0;
}

static int remove_dir(void **state)
{
    char cmd[128];

    (void)state;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    return 0;
}

static void test_psk_file(void **state)
{
    char path[256], key[128];
    lm_error err = { 0 };

    (void)state;
    snprintf(path, sizeof(path), "%s/keys.psk", dir);
    write_file("keys.psk", "# comment\n\nalice:00112233\nbob:aabbccddeeff\r\n");
    assert_int_equal(tls_psk_file_lookup(path, "bob", key, sizeof(key), &err), 0);
    assert_string_equal(key, "aabbccddeeff");
    assert_int_equal(tls_psk_file_lookup(path, "carol", key, sizeof(key), &err), -ENOENT);
    assert_non_null(strstr(err.msg, "no key for username 'carol'"));

    write_file("keys.psk", "alice:0011\nbob:xyz\n");
    assert_int_equal(tls_psk_file_lookup(path, "bob", key, sizeof(key), &err), -EINVAL);
    assert_non_null(strstr(err.msg, "keys.psk:2:"));
    write_file("keys.psk", "alice:001\n");      /* odd number of digits */
    assert_int_equal(tls_psk_file_lookup(path, "alice", key, sizeof(key), &err), -EINVAL);
    write_file("keys.psk", ":0011\n");
    assert_int_equal(tls_psk_file_lookup(path, "alice", key, sizeof(key), &err), -EINVAL);
    snprintf(path, sizeof(path), "%s/none.psk", dir);
    assert_int_equal(tls_psk_file_lookup(path, "alice", key, sizeof(key), &err), -ENOENT);
    assert_non_null(strstr(err.msg, "none.psk"));
}

/* tls_setup_resolve without tls-authz, on m's registry. */
static int resolve(lm_mig *m, const char *creds, const char *hostname, lm_tls_endpoint ep,
                   const char *not_socket, const char *uri_host, tls_setup *st, lm_error *err)
{
    return tls_setup_resolve(m->tls_objects, creds, hostname, "", ep, not_socket, uri_host, st,
                             err);
}

static void test_objects(void **state)
{
    lm_mig *m = lm_new();
    lm_error err = { 0 };
    tls_setup st;

    (void)state;
    write_file("keys.psk", "qemu:00112233445566778899aabbccddeeff\n");

    assert_int_equal(lm_tls_creds_psk_add(m, "c0", dir, LM_TLS_CLIENT, NULL, NULL, &err), 0);
    assert_int_equal(lm_tls_creds_psk_add(m, "c0", dir, LM_TLS_CLIENT, NULL, NULL, &err),
                     -EEXIST);
    assert_int_equal(lm_authz_simple_add(m, "c0", "x", &err), -EEXIST);
    assert_int_equal(lm_authz_simple_add(m, "a0", "qemu", &err), 0);
    /* a username without a key, a missing directory, a bad priority */
    assert_true(lm_tls_creds_psk_add(m, "c1", dir, LM_TLS_CLIENT, "nobody", NULL, &err) < 0);
    assert_non_null(strstr(err.msg, "'nobody'"));
    assert_true(lm_tls_creds_x509_add(m, "x1", "/nonexistent", LM_TLS_SERVER, true, NULL,
                                      &err) < 0);
    assert_non_null(strstr(err.msg, "/nonexistent/ca-cert.pem"));
    assert_true(lm_tls_creds_psk_add(m, "c2", dir, LM_TLS_SERVER, NULL, "BOGUS:+X", &err) < 0);
    assert_non_null(strstr(err.msg, "priority"));

    /* resolving */
    assert_int_equal(resolve(m, "", "", LM_TLS_CLIENT, NULL, "127.0.0.1", &st, &err), 0);
    assert_false(tls_setup_on(&st));
    assert_int_equal(resolve(m, "c0", "", LM_TLS_CLIENT, NULL, "127.0.0.1", &st, &err), 0);
    assert_true(tls_setup_on(&st));
    assert_string_equal(st.hostname, "127.0.0.1");
    tls_setup_release(&st);
    assert_int_equal(resolve(m, "c0", "", LM_TLS_SERVER, NULL, "127.0.0.1", &st, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "endpoint 'client'"));
    assert_int_equal(resolve(m, "nope", "", LM_TLS_CLIENT, NULL, "127.0.0.1", &st, &err), -ENOENT);
    assert_int_equal(resolve(m, "a0", "", LM_TLS_CLIENT, NULL, "127.0.0.1", &st, &err), -ENOENT);
    assert_non_null(strstr(err.msg, "authz object"));
    assert_int_equal(resolve(m, "c0", "", LM_TLS_CLIENT, "exec:", NULL, &st, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "exec:"));
    /* PSK needs no hostname, over unix: too */
    assert_int_equal(resolve(m, "c0", "", LM_TLS_CLIENT, NULL, NULL, &st, &err), 0);
    tls_setup_release(&st);

    /* del: gone for new lookups, alive for a setup that holds it */
    assert_int_equal(resolve(m, "c0", "h", LM_TLS_CLIENT, NULL, "127.0.0.1", &st, &err), 0);
    assert_int_equal(lm_object_del(m, "c0", &err), 0);
    assert_int_equal(lm_object_del(m, "c0", &err), -ENOENT);
    assert_string_equal(tls_creds_id(st.creds), "c0");
    tls_setup_release(&st);
    tls_setup_release(&st);      /* idempotent */
    lm_free(m);
}

static void test_params(void **state)
{
    lm_mig *m = lm_new();
    lm_error err = { 0 };
    char sv[300];
    char big[400];

    (void)state;
    assert_int_equal(lm_param_get(m, "tls-creds", NULL, NULL, sv, sizeof(sv)), 0);
    assert_string_equal(sv, "");
    assert_int_equal(lm_param_set_str(m, "tls-creds", "tls0", &err), 0);
    assert_int_equal(lm_param_set_str(m, "tls-hostname", "dest.example", &err), 0);
    assert_int_equal(lm_param_set_str(m, "tls-authz", "auth0", &err), 0);
    lm_param_get(m, "tls-creds", NULL, NULL, sv, sizeof(sv));
    assert_string_equal(sv, "tls0");
    lm_param_get(m, "tls-hostname", NULL, NULL, sv, sizeof(sv));
    assert_string_equal(sv, "dest.example");
    lm_param_get(m, "tls-authz", NULL, NULL, sv, sizeof(sv));
    assert_string_equal(sv, "auth0");
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = 0;
    assert_int_equal(lm_param_set_str(m, "tls-hostname", big, &err), -EINVAL);
    assert_int_equal(lm_param_set_int(m, "tls-creds", 1, &err), -EINVAL);
    lm_free(m);
}

/* ---------------------------------------------------------------- sessions */

typedef struct end {
    tls_setup st;
    transport_conn c;
    lm_error err;
    int ret;
} end;

static void *wrap_thread(void *arg)
{
    end *e = arg;

    e->ret = conn_tls_wrap(&e->st, &e->c, -1, T_MS, &e->err);
    return NULL;
}

static void session_pair(lm_mig *m, const char *authz, end *cl, end *sv)
{
    int fds[2];
    pthread_t th;
    lm_error err = { 0 };

    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    memset(cl, 0, sizeof(*cl));
    memset(sv, 0, sizeof(*sv));
    cl->c.fd = fds[0];
    cl->c.is_socket = true;
    snprintf(cl->c.peer, sizeof(cl->c.peer), "unix:server");
    sv->c.fd = fds[1];
    sv->c.is_socket = true;
    snprintf(sv->c.peer, sizeof(sv->c.peer), "unix:client");
    assert_int_equal(tls_setup_resolve(m->tls_objects, "cli", "", "", LM_TLS_CLIENT, NULL, NULL,
                                       &cl->st, &err), 0);
    assert_int_equal(tls_setup_resolve(m->tls_objects, "srv", "", authz, LM_TLS_SERVER, NULL, NULL,
                                       &sv->st, &err), 0);
    assert_int_equal(pthread_create(&th, NULL, wrap_thread, sv), 0);
    wrap_thread(cl);
    if (cl->ret)            /* a refused client must not leave the server waiting */
        conn_shutdown(&cl->c);
    pthread_join(th, NULL);
}

static void session_end(end *e)
{
    conn_close(&e->c, NULL);
    tls_setup_release(&e->st);
}

typedef struct writer {
    transport_conn *c;
    struct iovec *iov;
    int n;
    ssize_t r;
} writer;

static void *write_thread(void *arg)
{
    writer *w = arg;

    w->r = conn_writev(w->c, w->iov, w->n);
    return NULL;
}

static void test_psk_session(void **state)
{
    lm_mig *m = lm_new();
    lm_error err = { 0 };
    end cl, sv;
    static uint8_t big[300000], back[300000];
    struct iovec iov[3];

    (void)state;
    write_file("keys.psk", "qemu:00112233445566778899aabbccddeeff\n"
                           "other:ffeeddccbbaa99887766554433221100\n");
    assert_int_equal(lm_tls_creds_psk_add(m, "cli", dir, LM_TLS_CLIENT, NULL, NULL, &err), 0);
    assert_int_equal(lm_tls_creds_psk_add(m, "srv", dir, LM_TLS_SERVER, NULL, NULL, &err), 0);
    session_pair(m, "", &cl, &sv);
    assert_int_equal(cl.ret, 0);
    assert_int_equal(sv.ret, 0);
    assert_string_equal(tls_peer_identity(sv.c.tls), "qemu");

    /* pieces smaller and larger than a record, one writev; the socketpair
     * buffer is smaller than that, so the reader runs alongside */
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (uint8_t)(i * 7 + 3);
    iov[0] = (struct iovec){ big, 10 };
    iov[1] = (struct iovec){ big + 10, 100000 };
    iov[2] = (struct iovec){ big + 100010, sizeof(big) - 100010 };
    {
        writer w = { &cl.c, iov, 3, 0 };
        pthread_t th;
        size_t got = 0;

        assert_int_equal(pthread_create(&th, NULL, write_thread, &w), 0);
        while (got < sizeof(back)) {
            ssize_t r = conn_read(&sv.c, back + got, sizeof(back) - got);
            assert_true(r > 0);
            got += (size_t)r;
        }
        pthread_join(th, NULL);
        assert_int_equal(w.r, (ssize_t)sizeof(big));
        assert_memory_equal(big, back, sizeof(big));
    }
    /* a clean close reads as EOF */
    session_end(&cl);
    assert_int_equal(conn_read(&sv.c, back, 1), 0);
    session_end(&sv);

    /* authz: the username is not the one allowed */
    assert_int_equal(lm_authz_simple_add(m, "onlyother", "other", &err), 0);
    session_pair(m, "onlyother", &cl, &sv);
    assert_int_equal(sv.ret, -EACCES);
    assert_non_null(strstr(sv.err.msg, "client identity 'qemu' is not allowed by tls-authz "
                                       "'onlyother'"));
    if (cl.ret == 0) {
        /* TLS 1.3: the client finished first; the alert is its next read */
        assert_int_equal(conn_read(&cl.c, back, 1), -1);
        assert_non_null(strstr(conn_strerror(&cl.c, errno), "alert"));
    }
    session_end(&cl);
    session_end(&sv);

    /* a username the server does not know */
    assert_int_equal(lm_object_del(m, "cli", &err), 0);
    write_file("keys.psk", "stranger:00112233445566778899aabbccddeeff\n");
    assert_int_equal(lm_tls_creds_psk_add(m, "cli", dir, LM_TLS_CLIENT, "stranger", NULL,
                                          &err), 0);
    session_pair(m, "", &cl, &sv);
    assert_int_equal(sv.ret, -EACCES);
    assert_non_null(strstr(sv.err.msg, "PSK username 'stranger' is not in keys.psk"));
    assert_true(cl.ret < 0);
    session_end(&cl);
    session_end(&sv);
    lm_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_psk_file),
        cmocka_unit_test(test_objects),
        cmocka_unit_test(test_params),
        cmocka_unit_test(test_psk_session),
    };

    return cmocka_run_group_tests(tests, setup_dir, remove_dir);
}
