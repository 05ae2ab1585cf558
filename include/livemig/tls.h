/*
 * TLS for migrations: credentials and authorization objects, by id, in a
 * migration context -- QEMU's tls-creds-x509, tls-creds-psk and
 * authz-simple objects, which QMP's object-add creates through these calls.
 *
 * A migration uses them through three string parameters (lm_param_set_str,
 * QEMU's names): "tls-creds" (the id of a credentials object; "" = no TLS),
 * "tls-hostname" (the name the source checks the destination's certificate
 * against; "" = the host of a tcp: URI) and "tls-authz" (the id of an
 * authz-simple object; the destination then refuses every client whose
 * identity -- its x509 certificate's distinguished name, or its PSK
 * username -- is not the one listed; "" = any client the credentials
 * accept).  With tls-creds set, every channel of the migration (the main
 * stream and its return path, every multifd channel) runs TLS, and a peer
 * that fails the handshake, the certificate checks or the authorization is
 * refused before any guest byte is read.
 *
 * Files, in `dir` (QEMU's names):
 *   x509: ca-cert.pem (always), ca-crl.pem (optional),
 *         server-cert.pem + server-key.pem (endpoint server, required),
 *         client-cert.pem + client-key.pem (endpoint client: required when
 *         the server verifies its clients; used if present).
 *   psk:  keys.psk, one "username:hexkey" per line.  A client uses the line
 *         of its username ("qemu" when NULL, as QEMU); a server accepts any
 *         username listed.
 * Files are read when the object is added, so a missing or bad file is
 * reported then, naming the file.
 *
 * Objects are shared and reference counted: lm_object_del removes the id at
 * once (a new object may take it), while a migration that uses the object
 * keeps it alive until it ends.  Any thread; ids are unique across the
 * three kinds, as in QEMU's object tree.
 */
#ifndef LIVEMIG_TLS_H
#define LIVEMIG_TLS_H

#include <stdbool.h>
#include "livemig/livemig.h"

typedef enum lm_tls_endpoint {
    LM_TLS_CLIENT,      /* the source of a migration */
    LM_TLS_SERVER,      /* the destination */
} lm_tls_endpoint;

/*
 * x509 credentials.  verify_peer (QEMU's default: true): a client checks
 * the server's certificate against ca-cert.pem and the expected hostname; a
 * server requires a client certificate signed by ca-cert.pem.  priority:
 * a GnuTLS priority string, NULL = "NORMAL".
 */
int lm_tls_creds_x509_add(lm_mig *m, const char *id, const char *dir, lm_tls_endpoint endpoint,
                          bool verify_peer, const char *priority, lm_error *err);
/* PSK credentials; username: client only (NULL = "qemu"). */
int lm_tls_creds_psk_add(lm_mig *m, const char *id, const char *dir, lm_tls_endpoint endpoint,
                         const char *username, const char *priority, lm_error *err);
/* authz-simple: exactly one allowed identity. */
int lm_authz_simple_add(lm_mig *m, const char *id, const char *identity, lm_error *err);
/* Remove any object by id; -ENOENT when there is none. */
int lm_object_del(lm_mig *m, const char *id, lm_error *err);

#endif
