/*
 * The public TLS object calls (include/livemig/tls.h) on a context: each
 * passes the context's registry to src/tls/, which does the work.  Here
 * because only this module knows lm_mig; src/tls/ stays below the stream
 * layer that uses its sessions.
 */
#include "migration/migration.h"
#include "tls/tls.h"

int lm_tls_creds_x509_add(lm_mig *m, const char *id, const char *dir, lm_tls_endpoint endpoint,
                          bool verify_peer, const char *priority, lm_error *err)
{
    return tls_registry_add_x509(m->tls_objects, id, dir, endpoint, verify_peer, priority, err);
}

int lm_tls_creds_psk_add(lm_mig *m, const char *id, const char *dir, lm_tls_endpoint endpoint,
                         const char *username, const char *priority, lm_error *err)
{
    return tls_registry_add_psk(m->tls_objects, id, dir, endpoint, username, priority, err);
}

int lm_authz_simple_add(lm_mig *m, const char *id, const char *identity, lm_error *err)
{
    return tls_registry_add_authz(m->tls_objects, id, identity, err);
}

int lm_object_del(lm_mig *m, const char *id, lm_error *err)
{
    return tls_registry_del(m->tls_objects, id, err);
}
