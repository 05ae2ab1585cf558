/*
 * TLS objects: x509 and PSK credentials, authz-simple, and the registry that
 * names them by id in one lm_mig (see tls.h and include/livemig/tls.h).
 *
 * Design.  An object is made whole or not at all: every file is read and
 * checked when it is added (GnuTLS credentials are loaded then), so a
 * migration that starts later cannot fail on a missing key.  After that it
 * never changes, so sessions on any thread read it without a lock; only its
 * reference count is atomic.  The registry is a short list under a mutex:
 * a handful of objects, looked up once per migration.
 *
 * PSK keys are read by this file, not by GnuTLS's own file loader, so a
 * bad line is reported with its file and line number, and a client finds
 * its key by username; the server gets a callback that looks the username
 * up in the keys read at add time.
 */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "tls/tls_impl.h"
#include "util/error.h"

#define PSK_LINE_MAX 4096

/* ---------------------------------------------------------------- refs */

tls_creds *tls_creds_ref(tls_creds *c)
{
    if (c)
        atomic_fetch_add(&c->refs, 1);
    return c;
}

void tls_creds_unref(tls_creds *c)
{
    if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    if (c->x509)
        gnutls_certificate_free_credentials(c->x509);
    if (c->psk_client)
        gnutls_psk_free_client_credentials(c->psk_client);
    if (c->psk_server)
        gnutls_psk_free_server_credentials(c->psk_server);
    for (int i = 0; i < c->npsk; i++) {
        free(c->psk[i].user);
        free(c->psk[i].key);
    }
    free(c->psk);
    free(c);
}

tls_authz *tls_authz_ref(tls_authz *a)
{
    if (a)
        atomic_fetch_add(&a->refs, 1);
    return a;
}

void tls_authz_unref(tls_authz *a)
{
    if (a && atomic_fetch_sub(&a->refs, 1) == 1)
        free(a);
}

lm_tls_endpoint tls_creds_endpoint(const tls_creds *c) { return c->endpoint; }
bool tls_creds_is_psk(const tls_creds *c) { return c->is_psk; }
bool tls_creds_verify_peer(const tls_creds *c) { return c->verify_peer; }
const char *tls_creds_id(const tls_creds *c) { return c->id; }
const char *tls_authz_id(const tls_authz *a) { return a->id; }

bool tls_authz_allows(const tls_authz *a, const char *identity)
{
    return identity && strcmp(a->identity, identity) == 0;
}

/* ---------------------------------------------------------------- keys.psk */

/* "user:hex" -> 0 with *user and *key pointing into line; -EINVAL otherwise. */
static int psk_split(char *line, char **user, char **key)
{
    char *colon = strchr(line, ':');
    size_t n;

    if (!colon || colon == line)
        return -EINVAL;
    *colon = 0;
    *user = line;
    *key = colon + 1;
    n = strlen(*key);
    if (n == 0 || n % 2)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)(*key)[i]))
            return -EINVAL;
    return 0;
}

/*
 * Read every "user:hexkey" line of `path` (blank lines and lines starting
 * with '#' are skipped).  Calls fn for each; stops early when fn returns 1.
 */
static int psk_file_read(const char *path, int (*fn)(void *, const char *, const char *),
                         void *opaque, lm_error *err)
{
    char line[PSK_LINE_MAX];
    FILE *f = fopen(path, "re");
    int lineno = 0, ret = 0;

    if (!f)
        return error_set_errno(err, -errno, "%s", path);
    while (fgets(line, sizeof(line), f)) {
        char *user, *key;
        size_t n = strlen(line);

        lineno++;
        if (n && line[n - 1] != '\n' && !feof(f)) {
            ret = error_set(err, -EINVAL, "%s:%d: line too long", path, lineno);
            goto out;
        }
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = 0;
        if (n == 0 || line[0] == '#')
            continue;
        if (psk_split(line, &user, &key) < 0) {
            ret = error_set(err, -EINVAL, "%s:%d: not \"username:hexkey\" (an even number of "
                            "hex digits after the colon)", path, lineno);
            goto out;
        }
        ret = fn(opaque, user, key);
        if (ret)
            goto out;
    }
    if (ferror(f))
        ret = error_set_errno(err, -EIO, "%s: read", path);
out:
    fclose(f);
    return ret < 0 ? ret : 0;
}

typedef struct psk_find {
    const char *user;
    char *key;
    size_t keysize;
    bool found;
    bool too_long;
} psk_find;

static int psk_find_fn(void *opaque, const char *user, const char *key)
{
    psk_find *f = opaque;

    if (strcmp(user, f->user))
        return 0;
    f->found = true;
    if (strlen(key) >= f->keysize) {
        f->too_long = true;
        return -EINVAL;
    }
    snprintf(f->key, f->keysize, "%s", key);
    return 1;
}

int tls_psk_file_lookup(const char *path, const char *username, char *key, size_t keysize,
                        lm_error *err)
{
    psk_find f = { .user = username, .key = key, .keysize = keysize };
    int ret = psk_file_read(path, psk_find_fn, &f, err);

    if (f.too_long)
        return error_set(err, -EINVAL, "%s: the key of '%s' is too long", path, username);
    if (ret < 0)
        return ret;
    if (!f.found)
        return error_set(err, -ENOENT, "%s: no key for username '%s'", path, username);
    return 0;
}

static int psk_add_fn(void *opaque, const char *user, const char *key)
{
    tls_creds *c = opaque;
    tls_psk_entry *n = realloc(c->psk, (size_t)(c->npsk + 1) * sizeof(*n));

    if (!n)
        abort();
    c->psk = n;
    n[c->npsk].user = strdup(user);
    n[c->npsk].key = strdup(key);
    if (!n[c->npsk].user || !n[c->npsk].key)
        abort();
    c->npsk++;
    return 0;
}

/* Server: GnuTLS asks for the key of the username a client sent. */
static int psk_server_key(gnutls_session_t s, const char *username, gnutls_datum_t *key)
{
    const tls_creds *c = tls_session_creds(s);
    gnutls_datum_t hex;

    for (int i = 0; c && i < c->npsk; i++) {
        if (strcmp(c->psk[i].user, username))
            continue;
        hex.data = (unsigned char *)c->psk[i].key;
        hex.size = (unsigned int)strlen(c->psk[i].key);
        /* gnutls_hex_decode2 allocates key->data with gnutls_malloc, which
         * GnuTLS frees. */
        return gnutls_hex_decode2(&hex, key) < 0 ? -1 : 0;
    }
    tls_session_note_unknown_user(s, username);
    return -1;
}

/* ---------------------------------------------------------------- making */

static void dir_file(char *out, size_t size, const char *dir, const char *name)
{
    snprintf(out, size, "%s/%s", dir, name);
}

static int x509_load(tls_creds *c, const char *dir, lm_error *err)
{
    char ca[4096], crl[4096], cert[4096], key[4096];
    const char *who = c->endpoint == LM_TLS_SERVER ? "server" : "client";
    char certname[32], keyname[32];
    int r;

    dir_file(ca, sizeof(ca), dir, "ca-cert.pem");
    dir_file(crl, sizeof(crl), dir, "ca-crl.pem");
    snprintf(certname, sizeof(certname), "%s-cert.pem", who);
    snprintf(keyname, sizeof(keyname), "%s-key.pem", who);
    dir_file(cert, sizeof(cert), dir, certname);
    dir_file(key, sizeof(key), dir, keyname);

    if ((r = gnutls_certificate_allocate_credentials(&c->x509)) < 0)
        return error_set(err, -ENOMEM, "tls-creds-x509: %s", gnutls_strerror(r));
    if (access(ca, R_OK) < 0)
        return error_set_errno(err, -errno, "%s", ca);
    r = gnutls_certificate_set_x509_trust_file(c->x509, ca, GNUTLS_X509_FMT_PEM);
    if (r <= 0)
        return error_set(err, -EINVAL, "%s: %s", ca,
                         r == 0 ? "no certificate in it" : gnutls_strerror(r));
    if (access(crl, F_OK) == 0) {
        r = gnutls_certificate_set_x509_crl_file(c->x509, crl, GNUTLS_X509_FMT_PEM);
        if (r < 0)
            return error_set(err, -EINVAL, "%s: %s", crl, gnutls_strerror(r));
    }
    /* A server always needs its pair; a client only when it has one. */
    if (c->endpoint == LM_TLS_CLIENT && access(cert, F_OK) < 0 && access(key, F_OK) < 0)
        return 0;
    if (access(cert, R_OK) < 0)
        return error_set_errno(err, -errno, "%s", cert);
    if (access(key, R_OK) < 0)
        return error_set_errno(err, -errno, "%s", key);
    r = gnutls_certificate_set_x509_key_file(c->x509, cert, key, GNUTLS_X509_FMT_PEM);
    if (r < 0)
        return error_set(err, -EINVAL, "%s, %s: %s", cert, key, gnutls_strerror(r));
    return 0;
}

static int psk_load(tls_creds *c, const char *dir, const char *username, lm_error *err)
{
    char path[4096], key[1024];
    gnutls_datum_t hex;
    int r;

    dir_file(path, sizeof(path), dir, "keys.psk");
    if (c->endpoint == LM_TLS_CLIENT) {
        if ((r = tls_psk_file_lookup(path, username, key, sizeof(key), err)) < 0)
            return r;
        if ((r = gnutls_psk_allocate_client_credentials(&c->psk_client)) < 0)
            return error_set(err, -ENOMEM, "tls-creds-psk: %s", gnutls_strerror(r));
        hex.data = (unsigned char *)key;
        hex.size = (unsigned int)strlen(key);
        r = gnutls_psk_set_client_credentials(c->psk_client, username, &hex,
                                              GNUTLS_PSK_KEY_HEX);
        if (r < 0)
            return error_set(err, -EINVAL, "%s: key of '%s': %s", path, username,
                             gnutls_strerror(r));
        return 0;
    }
    if ((r = psk_file_read(path, psk_add_fn, c, err)) < 0)
        return r;
    if (c->npsk == 0)
        return error_set(err, -EINVAL, "%s: no \"username:hexkey\" line", path);
    if ((r = gnutls_psk_allocate_server_credentials(&c->psk_server)) < 0)
        return error_set(err, -ENOMEM, "tls-creds-psk: %s", gnutls_strerror(r));
    gnutls_psk_set_server_credentials_function(c->psk_server, psk_server_key);
    return 0;
}

static int creds_check_priority(const char *priority, lm_error *err)
{
    gnutls_priority_t p;
    const char *where = NULL;
    int r = gnutls_priority_init(&p, priority, &where);

    if (r < 0)
        return error_set(err, -EINVAL, "priority '%s': %s (at '%s')", priority,
                         gnutls_strerror(r), where ? where : "");
    gnutls_priority_deinit(p);
    return 0;
}

static int id_check(const char *id, lm_error *err)
{
    if (!id || !*id)
        return error_set(err, -EINVAL, "Parameter 'id' is missing");
    if (strlen(id) >= TLS_ID_MAX)
        return error_set(err, -EINVAL, "object id '%.32s...' is too long (at most %d bytes)",
                         id, TLS_ID_MAX - 1);
    return 0;
}

static tls_creds *creds_make(const char *id, const char *dir, lm_tls_endpoint ep, bool psk,
                             bool verify_peer, const char *username, const char *priority,
                             lm_error *err)
{
    tls_creds *c;
    int r;

    if (id_check(id, err) < 0)
        return NULL;
    if (!dir || !*dir) {
        error_set(err, -EINVAL, "%s '%s': 'dir' is required", psk ? "tls-creds-psk" :
                  "tls-creds-x509", id);
        return NULL;
    }
    if (ep != LM_TLS_CLIENT && ep != LM_TLS_SERVER) {
        error_set(err, -EINVAL, "'%s': endpoint must be client or server", id);
        return NULL;
    }
    c = calloc(1, sizeof(*c));
    if (!c)
        abort();
    atomic_init(&c->refs, 1);
    snprintf(c->id, sizeof(c->id), "%s", id);
    c->endpoint = ep;
    c->is_psk = psk;
    c->verify_peer = psk ? true : verify_peer;
    if (psk)
        /* PSK key exchanges are not in NORMAL: add them, to the given
         * priority or the default one. */
        snprintf(c->priority, sizeof(c->priority), "%s:+ECDHE-PSK:+DHE-PSK:+PSK",
                 priority && *priority ? priority : "NORMAL");
    else
        snprintf(c->priority, sizeof(c->priority), "%s",
                 priority && *priority ? priority : "NORMAL");
    snprintf(c->username, sizeof(c->username), "%s", username && *username ? username : "qemu");
    if ((r = creds_check_priority(c->priority, err)) < 0)
        goto fail;
    r = psk ? psk_load(c, dir, c->username, err) : x509_load(c, dir, err);
    if (r < 0)
        goto fail;
    return c;
fail:
    error_prefix(err, "%s '%s'", psk ? "tls-creds-psk" : "tls-creds-x509", id);
    tls_creds_unref(c);
    return NULL;
}

/* ---------------------------------------------------------------- registry */

typedef struct tls_object {
    char id[TLS_ID_MAX];
    tls_creds *creds;           /* exactly one of the two */
    tls_authz *authz;
    struct tls_object *next;
} tls_object;

struct tls_registry {
    pthread_mutex_t lock;
    tls_object *head;
};

tls_registry *tls_registry_new(void)
{
    tls_registry *r = calloc(1, sizeof(*r));

    if (!r)
        abort();
    pthread_mutex_init(&r->lock, NULL);
    return r;
}

static void object_free(tls_object *o)
{
    tls_creds_unref(o->creds);
    tls_authz_unref(o->authz);
    free(o);
}

void tls_registry_free(tls_registry *r)
{
    if (!r)
        return;
    while (r->head) {
        tls_object *o = r->head;
        r->head = o->next;
        object_free(o);
    }
    pthread_mutex_destroy(&r->lock);
    free(r);
}

static tls_object *registry_find(tls_registry *r, const char *id)
{
    for (tls_object *o = r->head; o; o = o->next)
        if (!strcmp(o->id, id))
            return o;
    return NULL;
}

/* Takes the reference of creds or authz, also on failure. */
static int registry_add(tls_registry *r, const char *id, tls_creds *c, tls_authz *a,
                        lm_error *err)
{
    tls_object *o;
    int ret = 0;

    pthread_mutex_lock(&r->lock);
    if (registry_find(r, id)) {
        ret = error_set(err, -EEXIST, "attempt to add duplicate property '%s' to object "
                        "(type 'container')", id);
        goto out;
    }
    o = calloc(1, sizeof(*o));
    if (!o)
        abort();
    snprintf(o->id, sizeof(o->id), "%s", id);
    o->creds = c;
    o->authz = a;
    o->next = r->head;
    r->head = o;
    c = NULL;
    a = NULL;
out:
    pthread_mutex_unlock(&r->lock);
    tls_creds_unref(c);
    tls_authz_unref(a);
    return ret;
}

int tls_setup_resolve(tls_registry *r, const char *creds_id, const char *hostname,
                      const char *authz_id, lm_tls_endpoint endpoint, const char *not_socket,
                      const char *uri_host, tls_setup *out, lm_error *err)
{
    const char *want = endpoint == LM_TLS_SERVER ? "server" : "client";
    tls_object *o;
    int ret = 0;

    memset(out, 0, sizeof(*out));
    if (!creds_id || !*creds_id)
        return 0;
    pthread_mutex_lock(&r->lock);
    o = registry_find(r, creds_id);
    if (!o || !o->creds) {
        ret = error_set(err, -ENOENT, "tls-creds: no TLS credentials object with id '%s'%s",
                        creds_id, o ? " (it is an authz object)" : "");
        goto out;
    }
    out->creds = tls_creds_ref(o->creds);
    if (endpoint == LM_TLS_SERVER && authz_id && *authz_id) {
        o = registry_find(r, authz_id);
        if (!o || !o->authz) {
            ret = error_set(err, -ENOENT, "tls-authz: no authz object with id '%s'", authz_id);
            goto out;
        }
        out->authz = tls_authz_ref(o->authz);
    }
out:
    pthread_mutex_unlock(&r->lock);
    if (ret)
        goto fail;
    if (out->creds->endpoint != endpoint) {
        ret = error_set(err, -EINVAL, "tls-creds '%s' has endpoint '%s', but %s migration "
                        "needs '%s'", creds_id,
                        out->creds->endpoint == LM_TLS_SERVER ? "server" : "client",
                        endpoint == LM_TLS_SERVER ? "an incoming" : "an outgoing", want);
        goto fail;
    }
    if (not_socket) {
        ret = error_set(err, -EINVAL, "tls-creds is set, but TLS needs a socket transport "
                        "(tcp:, unix: or fd: of a socket), not %s", not_socket);
        goto fail;
    }
    if (endpoint == LM_TLS_CLIENT) {
        const char *h = hostname && *hostname ? hostname : uri_host ? uri_host : "";
        if (!*h && !out->creds->is_psk && out->creds->verify_peer) {
            ret = error_set(err, -EINVAL, "tls-hostname is required to verify the "
                            "destination's certificate on a migration that is not tcp:");
            goto fail;
        }
        snprintf(out->hostname, sizeof(out->hostname), "%s", h);
    }
    return 0;
fail:
    tls_setup_release(out);
    return ret;
}

void tls_setup_release(tls_setup *s)
{
    tls_creds_unref(s->creds);
    tls_authz_unref(s->authz);
    s->creds = NULL;
    s->authz = NULL;
    s->hostname[0] = 0;
}

/* ---------------------------------------------------------------- adding */

int tls_registry_add_x509(tls_registry *r, const char *id, const char *dir,
                          lm_tls_endpoint endpoint, bool verify_peer, const char *priority,
                          lm_error *err)
{
    tls_creds *c = creds_make(id, dir, endpoint, false, verify_peer, NULL, priority, err);

    return c ? registry_add(r, id, c, NULL, err) : (err && err->code ? err->code : -EINVAL);
}

int tls_registry_add_psk(tls_registry *r, const char *id, const char *dir,
                         lm_tls_endpoint endpoint, const char *username, const char *priority,
                         lm_error *err)
{
    tls_creds *c = creds_make(id, dir, endpoint, true, true, username, priority, err);

    return c ? registry_add(r, id, c, NULL, err) : (err && err->code ? err->code : -EINVAL);
}

int tls_registry_add_authz(tls_registry *r, const char *id, const char *identity,
                           lm_error *err)
{
    tls_authz *a;
    int ret;

    if ((ret = id_check(id, err)) < 0)
        return ret;
    if (!identity || !*identity)
        return error_set(err, -EINVAL, "authz-simple '%s': 'identity' is required", id);
    if (strlen(identity) >= TLS_IDENTITY_MAX)
        return error_set(err, -EINVAL, "authz-simple '%s': identity too long", id);
    a = calloc(1, sizeof(*a));
    if (!a)
        abort();
    atomic_init(&a->refs, 1);
    snprintf(a->id, sizeof(a->id), "%s", id);
    snprintf(a->identity, sizeof(a->identity), "%s", identity);
    return registry_add(r, id, NULL, a, err);
}

int tls_registry_del(tls_registry *r, const char *id, lm_error *err)
{
    tls_object **pp, *o = NULL;

    pthread_mutex_lock(&r->lock);
    for (pp = &r->head; *pp; pp = &(*pp)->next) {
        if (!strcmp((*pp)->id, id ? id : "")) {
            o = *pp;
            *pp = o->next;
            break;
        }
    }
    pthread_mutex_unlock(&r->lock);
    if (!o)
        return error_set(err, -ENOENT, "object '%s' not found", id ? id : "");
    object_free(o);
    return 0;
}
