/*
 * The --tls-* options of `livemig guest` and `livemig migrate`; see
 * tlsopts.h.  Parsing only records the strings; checking is separate, so a
 * combination (--tls-x509 with --tls-psk, a PSK username on x509) is
 * reported once, whatever the order of the options.
 */
#include "tlsopts.h"

#include <errno.h>
#include <string.h>

#include "util.h"

#define CREDS_ID "tls0"
#define AUTHZ_ID "authz0"

void tls_opts_init(struct tls_opts *t)
{
    memset(t, 0, sizeof(*t));
    t->verify_peer = true;
}

int tls_opts_take(struct tls_opts *t, int opt, const char *arg, lm_error *err)
{
    switch (opt - TLSOPT_BASE) {
    case 0: t->x509_dir = arg; break;
    case 1: t->psk_dir = arg; break;
    case 2: t->username = arg; break;
    case 3:
        if (!strcmp(arg, "on"))
            t->verify_peer = true;
        else if (!strcmp(arg, "off"))
            t->verify_peer = false;
        else
            return tool_error(err, -EINVAL, "--tls-verify-peer: '%s' is not on or off", arg);
        break;
    case 4: t->priority = arg; break;
    case 5: t->hostname = arg; break;
    case 6: t->authz = arg; break;
    default:
        return 0;
    }
    t->any = true;
    return 1;
}

int tls_opts_check(const struct tls_opts *t, bool server, lm_error *err)
{
    if (!t->any)
        return 0;
    if (t->x509_dir && t->psk_dir)
        return tool_error(err, -EINVAL, "--tls-x509 and --tls-psk exclude each other");
    if (!t->x509_dir && !t->psk_dir)
        return tool_error(err, -EINVAL, "--tls-* options need --tls-x509 DIR or --tls-psk DIR");
    if (t->username && (!t->psk_dir || server))
        return tool_error(err, -EINVAL, "--tls-username is for a source using --tls-psk");
    if (t->hostname && server)
        return tool_error(err, -EINVAL, "--tls-hostname is for a source (the destination "
                          "does not check a hostname)");
    if (t->authz && !server)
        return tool_error(err, -EINVAL, "--tls-authz is for a destination (--incoming)");
    return 0;
}

int tls_opts_apply(const struct tls_opts *t, lm_mig *m, bool server, lm_error *err)
{
    lm_tls_endpoint ep = server ? LM_TLS_SERVER : LM_TLS_CLIENT;
    int rc;

    if (!t->any)
        return 0;
    if (t->x509_dir)
        rc = lm_tls_creds_x509_add(m, CREDS_ID, t->x509_dir, ep, t->verify_peer, t->priority,
                                   err);
    else
        rc = lm_tls_creds_psk_add(m, CREDS_ID, t->psk_dir, ep, t->username, t->priority, err);
    if (!rc && t->authz && !(rc = lm_authz_simple_add(m, AUTHZ_ID, t->authz, err)))
        rc = lm_param_set_str(m, "tls-authz", AUTHZ_ID, err);
    if (!rc && t->hostname)
        rc = lm_param_set_str(m, "tls-hostname", t->hostname, err);
    if (!rc)
        rc = lm_param_set_str(m, "tls-creds", CREDS_ID, err);
    return rc;
}

json_t *tls_opts_objects(const struct tls_opts *t, json_t **params)
{
    json_t *objs, *o;

    if (!t->any)
        return NULL;
    objs = json_array();
    o = json_pack("{s:s,s:s,s:s,s:s}", "qom-type", t->x509_dir ? "tls-creds-x509"
                                                               : "tls-creds-psk",
                  "id", CREDS_ID, "dir", t->x509_dir ? t->x509_dir : t->psk_dir,
                  "endpoint", "client");
    if (t->x509_dir)
        json_object_set_new(o, "verify-peer", json_boolean(t->verify_peer));
    if (t->username)
        json_object_set_new(o, "username", json_string(t->username));
    if (t->priority)
        json_object_set_new(o, "priority", json_string(t->priority));
    json_array_append_new(objs, o);
    if (!*params)
        *params = json_object();
    json_object_set_new(*params, "tls-creds", json_string(CREDS_ID));
    if (t->hostname)
        json_object_set_new(*params, "tls-hostname", json_string(t->hostname));
    return objs;
}
