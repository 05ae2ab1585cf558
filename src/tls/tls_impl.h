/*
 * tls: what creds.c and session.c share (not for other modules: they use
 * tls.h).  Objects are immutable after creation except for `refs`.
 */
#ifndef TLS_TLS_IMPL_H
#define TLS_TLS_IMPL_H

#include <stdatomic.h>
#include <gnutls/gnutls.h>

#include "tls/tls.h"

typedef struct tls_psk_entry {
    char *user;
    char *key;                  /* hex */
} tls_psk_entry;

struct tls_creds {
    atomic_int refs;
    char id[TLS_ID_MAX];
    lm_tls_endpoint endpoint;
    bool is_psk;
    bool verify_peer;           /* x509; always true for PSK (the key is the proof) */
    char priority[512];
    char username[256];         /* psk client */
    gnutls_certificate_credentials_t x509;
    gnutls_psk_client_credentials_t psk_client;
    gnutls_psk_server_credentials_t psk_server;
    tls_psk_entry *psk;         /* psk server: every line of keys.psk */
    int npsk;
};

struct tls_authz {
    atomic_int refs;
    char id[TLS_ID_MAX];
    char identity[TLS_IDENTITY_MAX];
};

/* session.c, for creds.c's PSK server callback: the creds of a session
 * being set up, and "a client sent this unknown username". */
const tls_creds *tls_session_creds(gnutls_session_t s);
void tls_session_note_unknown_user(gnutls_session_t s, const char *username);

#endif
