/*
 * The TLS command-line options shared by `livemig guest` and `livemig
 * migrate` (tlsopts.c).  They say what QMP's object-add and the tls-*
 * parameters say, in one place:
 *
 *   --tls-x509 DIR            tls-creds-x509 with dir DIR (QEMU's file names)
 *   --tls-psk DIR             tls-creds-psk with dir DIR (DIR/keys.psk)
 *   --tls-username NAME       PSK client username (default qemu)
 *   --tls-verify-peer on|off  x509 verify-peer (default on)
 *   --tls-priority STRING     GnuTLS priority string
 *   --tls-hostname NAME       tls-hostname (the source's check of the
 *                             destination's certificate)
 *   --tls-authz IDENTITY      an authz-simple object for tls-authz (the
 *                             destination's allowed client DN or username)
 *
 * The credentials object gets id "tls0" and the authz object "authz0".
 * `guest` makes them with the library calls (include/livemig/tls.h), with
 * endpoint server when it is a destination and client otherwise;
 * `migrate` sends them to its source over QMP (object-add).
 */
#ifndef LIVEMIG_TOOL_TLSOPTS_H
#define LIVEMIG_TOOL_TLSOPTS_H

#include <getopt.h>
#include <stdbool.h>
#include <jansson.h>

#include "livemig/livemig.h"
#include "livemig/tls.h"

#define TLSOPT_BASE 0x1000   /* getopt values: TLSOPT_BASE + n */

#define TLSOPT_LONG_OPTIONS \
    { "tls-x509", required_argument, NULL, TLSOPT_BASE + 0 }, \
    { "tls-psk", required_argument, NULL, TLSOPT_BASE + 1 }, \
    { "tls-username", required_argument, NULL, TLSOPT_BASE + 2 }, \
    { "tls-verify-peer", required_argument, NULL, TLSOPT_BASE + 3 }, \
    { "tls-priority", required_argument, NULL, TLSOPT_BASE + 4 }, \
    { "tls-hostname", required_argument, NULL, TLSOPT_BASE + 5 }, \
    { "tls-authz", required_argument, NULL, TLSOPT_BASE + 6 }

#define TLSOPT_USAGE \
    "  --tls-x509 DIR            TLS with x509 credentials in DIR (ca-cert.pem,\n" \
    "                            server-cert.pem/server-key.pem or\n" \
    "                            client-cert.pem/client-key.pem)\n" \
    "  --tls-psk DIR             TLS with pre-shared keys in DIR/keys.psk\n" \
    "                            (username:hexkey lines)\n" \
    "  --tls-username NAME       PSK username of the source (default qemu)\n" \
    "  --tls-verify-peer on|off  check the peer's certificate (default on)\n" \
    "  --tls-priority STRING     GnuTLS priority string (default NORMAL)\n" \
    "  --tls-hostname NAME       source: the name the destination's certificate\n" \
    "                            must carry (default: the URI's host)\n" \
    "  --tls-authz IDENTITY      destination: the only client identity (x509 DN\n" \
    "                            as CN=...,O=..., or PSK username) allowed\n"

struct tls_opts {
    const char *x509_dir, *psk_dir, *username, *priority, *hostname, *authz;
    bool verify_peer;
    bool any;             /* some --tls-* option was given */
};

void tls_opts_init(struct tls_opts *t);
/* getopt value `opt` with optarg `arg`: 1 taken, 0 not a TLS option, <0 bad. */
int tls_opts_take(struct tls_opts *t, int opt, const char *arg, lm_error *err);
/* Consistency once every option is in; `server`: the side is a destination. */
int tls_opts_check(const struct tls_opts *t, bool server, lm_error *err);
/* guest: make the objects in m and set the tls-* parameters. */
int tls_opts_apply(const struct tls_opts *t, lm_mig *m, bool server, lm_error *err);
/* migrate: the object-add arguments (an array, NULL without TLS) and the
 * tls-* parameters added to *params (created if NULL). */
json_t *tls_opts_objects(const struct tls_opts *t, json_t **params);

#endif
