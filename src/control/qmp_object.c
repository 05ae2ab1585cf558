/*
 * QMP object-add / object-del for the objects a migration uses: QEMU's
 * tls-creds-x509, tls-creds-psk and authz-simple.  A thin layer: each
 * request is checked against the type's members (QEMU's names) and handed
 * to the public lm_tls_* / lm_authz_* / lm_object_del calls
 * (include/livemig/tls.h), whose errors are the reply.
 *
 *   {"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509",
 *     "id": "tls0", "dir": "/etc/pki/qemu", "endpoint": "server",
 *     "verify-peer": true}}
 *
 * Members are flat, as in QEMU 6.0 and later; the older form with the
 * type's members under "props" is taken too.
 */
#include <errno.h>
#include <string.h>

#include <jansson.h>

#include "control/qmp_json.h"
#include "control/qmp_object.h"
#include "livemig/tls.h"
#include "util/error.h"

static const char *str_member(json_t *o, const char *name)
{
    json_t *v = json_object_get(o, name);

    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* Every member of `o` is one of names[] (plus qom-type, id, props), and has
 * the type the list says: 's' string, 'b' boolean. */
static int members_check(json_t *o, const char *type, const char *const *names,
                         const char *types, lm_error *err)
{
    const char *key;
    json_t *v;

    json_object_foreach(o, key, v) {
        int i;

        if (!strcmp(key, "qom-type") || !strcmp(key, "id") || !strcmp(key, "props"))
            continue;
        for (i = 0; names[i]; i++)
            if (!strcmp(names[i], key))
                break;
        if (!names[i])
            return error_set(err, -EINVAL, "Property '%s.%s' not found", type, key);
        if ((types[i] == 's' && !json_is_string(v)) || (types[i] == 'b' && !json_is_boolean(v)))
            return error_set(err, -EINVAL, "Invalid parameter type for '%s', expected: %s",
                             key, types[i] == 's' ? "string" : "boolean");
    }
    return 0;
}

static int endpoint_of(json_t *o, lm_tls_endpoint *ep, lm_error *err)
{
    const char *e = str_member(o, "endpoint");

    if (!e || !strcmp(e, "client"))
        *ep = LM_TLS_CLIENT;        /* QEMU's default */
    else if (!strcmp(e, "server"))
        *ep = LM_TLS_SERVER;
    else
        return error_set(err, -EINVAL, "Parameter 'endpoint' does not accept value '%s'", e);
    return 0;
}

static int cmd_object_add(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    static const char *const x509_names[] = { "dir", "endpoint", "verify-peer", "priority",
                                              "sanity-check", "passwordid", NULL };
    static const char *const psk_names[] = { "dir", "endpoint", "username", "priority",
                                             "verify-peer", NULL };
    static const char *const authz_names[] = { "identity", NULL };
    lm_mig *m = opaque;
    json_t *args = qmp_args_parse(args_json, NULL, err), *o, *props;
    const char *type, *id;
    lm_tls_endpoint ep = LM_TLS_CLIENT;
    int rc;

    if (!args)
        return err->code;
    type = str_member(args, "qom-type");
    id = str_member(args, "id");
    rc = -EINVAL;
    if (!type) {
        error_set(err, rc, "Parameter 'qom-type' is missing");
        goto out;
    }
    if (!id) {
        error_set(err, rc, "Parameter 'id' is missing");
        goto out;
    }
    /* Before QEMU 6.0 the type's members were under "props". */
    props = json_object_get(args, "props");
    o = json_is_object(props) ? props : args;

    if (!strcmp(type, "tls-creds-x509")) {
        json_t *vp = json_object_get(o, "verify-peer");
        if ((rc = members_check(o, type, x509_names, "ssbsbs", err)) ||
            (rc = endpoint_of(o, &ep, err)))
            goto out;
        rc = lm_tls_creds_x509_add(m, id, str_member(o, "dir"), ep,
                                   vp ? json_is_true(vp) : true, str_member(o, "priority"),
                                   err);
    } else if (!strcmp(type, "tls-creds-psk")) {
        if ((rc = members_check(o, type, psk_names, "ssssb", err)) ||
            (rc = endpoint_of(o, &ep, err)))
            goto out;
        rc = lm_tls_creds_psk_add(m, id, str_member(o, "dir"), ep, str_member(o, "username"),
                                  str_member(o, "priority"), err);
    } else if (!strcmp(type, "authz-simple")) {
        if ((rc = members_check(o, type, authz_names, "s", err)))
            goto out;
        rc = lm_authz_simple_add(m, id, str_member(o, "identity"), err);
    } else {
        rc = error_set(err, -EINVAL, "Invalid parameter '%s' for 'qom-type' (livemig has "
                       "tls-creds-x509, tls-creds-psk and authz-simple)", type);
    }
out:
    json_decref(args);
    return rc;
}

static const qmp_arg args_del[] = {
    { .name = "id", .type = QMP_STR, .required = true },
    { .name = NULL },
};

static int cmd_object_del(void *opaque, const char *args_json, char **reply, lm_error *err)
{
    json_t *args = qmp_args_parse(args_json, args_del, err);
    int rc;

    if (!args)
        return err->code;
    rc = lm_object_del(opaque, json_string_value(json_object_get(args, "id")), err);
    json_decref(args);
    return rc;
}

int qmp_object_register(lm_qmp *q, lm_mig *m, lm_error *err)
{
    int rc = lm_qmp_register(q, "object-add", cmd_object_add, m);

    if (rc == 0)
        rc = lm_qmp_register(q, "object-del", cmd_object_del, m);
    if (rc < 0)
        return error_set_errno(err, rc, "QMP: cannot register object-add/object-del");
    return 0;
}
