/*
 * tls: GnuTLS on a migration's connections.
 *
 * Objects (creds.c).  tls_creds (x509 or PSK, one endpoint) and tls_authz
 * (authz-simple) are immutable once made and reference counted; a
 * tls_registry maps ids to them for one lm_mig (include/livemig/tls.h is
 * the public face).  A migration resolves its tls-* parameters once, at
 * start, into a tls_setup that holds references for as long as it runs.
 *
 * Sessions (session.c).  One call wraps a connection; a migration's
 * channels use it through src/stream/transport.h:
 *
 *     transport_connect(&u, &c, ...);              or transport_accept(...)
 *     conn_tls_wrap(&setup, &c, cancel_fd, timeout_ms, &err);
 *
 * A setup without credentials makes it a no-op, so every place that opens a
 * channel calls it unconditionally.  With credentials it runs the handshake
 * at once (the creds' endpoint says client or server), checks the peer
 * (certificate and hostname, or PSK key; then tls-authz on a server) and
 * hangs the session on c->tls; conn_close() ends and frees it.  That is the
 * whole recipe for a new kind of channel (postcopy's preempt channel:
 * connect + conn_tls_wrap on the source, accept + conn_tls_wrap on the
 * destination, then read and write through transport.h's conn_readv /
 * conn_writev, which go through the session when there is one).  Nothing
 * else has been read from or written to the socket when the wrap runs: the
 * handshake is the first thing on the wire, before QEMU's QEVM header or
 * multifd handshake, as QEMU places it.  This module knows no transport:
 * it works on a descriptor (tls_wrap) so the stream layer can sit on it.
 *
 * I/O.  tls_io_writev / tls_io_readv (bytes or -1 with errno, like
 * sendmsg / readv) make and take GnuTLS records.  Kernel TLS, which would
 * keep the zero-copy paths (the kernel encrypting straight from guest RAM),
 * is not available on this machine's kernel: setsockopt(TCP_ULP, "tls")
 * fails with ENOENT (no tls module, and no modprobe), so GnuTLS's kTLS
 * support cannot engage either.  Records are therefore made in user space:
 * writes gather iovecs (guest pages) into one 16 KiB record buffer -- one
 * copy, then GnuTLS encrypts into its own record -- and a piece of at least
 * a record's size goes to GnuTLS straight from guest RAM; reads hand the
 * caller's iovecs (guest RAM for multifd) to gnutls_record_recv, which
 * copies each decrypted record out once.  A failed TLS operation leaves its
 * reason in tls_error() (the alert the peer sent, say), so messages name
 * it.
 *
 * Threads.  A session may be written by one thread while another reads it
 * (the source's migration thread writes the main stream while the return
 * path thread reads it; GnuTLS allows exactly this split), never written
 * or read by two at once.  conn_shutdown() from any thread makes a blocked
 * operation return, as without TLS.  tls_wrap runs on the thread that owns
 * the connection; its waits are bounded by timeout_ms and cancel_fd.
 */
#ifndef TLS_TLS_H
#define TLS_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "livemig/livemig.h"
#include "livemig/tls.h"

#define TLS_ID_MAX 128
#define TLS_HOSTNAME_MAX 256
#define TLS_IDENTITY_MAX 1024

/* ---------------------------------------------------------------- objects */

typedef struct tls_creds tls_creds;
typedef struct tls_authz tls_authz;
typedef struct tls_registry tls_registry;

tls_registry *tls_registry_new(void);
void tls_registry_free(tls_registry *r);     /* drops its references */

tls_creds *tls_creds_ref(tls_creds *c);
void tls_creds_unref(tls_creds *c);          /* NULL is a no-op */
tls_authz *tls_authz_ref(tls_authz *a);
void tls_authz_unref(tls_authz *a);
lm_tls_endpoint tls_creds_endpoint(const tls_creds *c);
bool tls_creds_is_psk(const tls_creds *c);
bool tls_creds_verify_peer(const tls_creds *c);
const char *tls_creds_id(const tls_creds *c);
const char *tls_authz_id(const tls_authz *a);
/* Is `identity` the one the object allows? */
bool tls_authz_allows(const tls_authz *a, const char *identity);

/*
 * keys.psk: find `username`'s key (hex, NUL-terminated, in key[keysize]).
 * 0; -ENOENT when the user is not listed; -EINVAL for a malformed line
 * (err names the file and line).  Exposed for the unit tests.
 */
int tls_psk_file_lookup(const char *path, const char *username, char *key, size_t keysize,
                        lm_error *err);

/* ---------------------------------------------------------------- setup */

/* What a migration's connections are wrapped with; creds NULL = no TLS. */
typedef struct tls_setup {
    tls_creds *creds;
    tls_authz *authz;                    /* server only; NULL = anyone */
    char hostname[TLS_HOSTNAME_MAX];     /* client: the name to verify */
} tls_setup;

/*
 * Resolve the tls-creds / tls-hostname / tls-authz parameters for a
 * migration in direction `endpoint`.  Empty creds = no TLS (the other two
 * are then ignored, as in QEMU).  not_socket: NULL for a transport that can
 * carry TLS, else its name for the message ("exec:"); uri_host: the host of
 * a tcp: URI (the default hostname), NULL otherwise.  Errors name the
 * parameter: no such object, an object of the wrong kind or endpoint, a
 * transport that cannot carry TLS, no hostname to verify.
 */
int tls_setup_resolve(tls_registry *r, const char *creds_id, const char *hostname,
                      const char *authz_id, lm_tls_endpoint endpoint, const char *not_socket,
                      const char *uri_host, tls_setup *out, lm_error *err);

/* The registry's side of include/livemig/tls.h (same arguments and errors;
 * src/migration/ holds the lm_* calls, which pass their context's registry). */
int tls_registry_add_x509(tls_registry *r, const char *id, const char *dir,
                          lm_tls_endpoint endpoint, bool verify_peer, const char *priority,
                          lm_error *err);
int tls_registry_add_psk(tls_registry *r, const char *id, const char *dir,
                         lm_tls_endpoint endpoint, const char *username, const char *priority,
                         lm_error *err);
int tls_registry_add_authz(tls_registry *r, const char *id, const char *identity,
                           lm_error *err);
int tls_registry_del(tls_registry *r, const char *id, lm_error *err);
void tls_setup_release(tls_setup *s);   /* idempotent */
static inline bool tls_setup_on(const tls_setup *s) { return s && s->creds; }

/* ---------------------------------------------------------------- sessions */

typedef struct tls_session tls_session;

/* Handshake on the socket fd (the creds' endpoint says which side), then
 * the peer checks; see the top of this file.  0 with *out the session (NULL
 * when s has no creds), or a negative errno with err naming `peer` and the
 * cause.  fd is the caller's before and after. */
int tls_wrap(const tls_setup *s, int fd, const char *peer, int cancel_fd, int timeout_ms,
             tls_session **out, lm_error *err);
/* End the session: a close_notify when it is healthy (without waiting for
 * room in the socket: never blocks), then free.  NULL is a no-op. */
void tls_session_close(tls_session *t);
/* The peer's identity after a handshake (DN or PSK username), or "". */
const char *tls_peer_identity(const tls_session *t);
/* The reason of the last failed read or write, or NULL. */
const char *tls_error(const tls_session *t);

/*
 * Record I/O on a session (fd is its socket).  writev: every byte, or -1
 * with errno; readv: bytes (as soon as some arrived and no more are
 * decrypted), 0 when the peer closed, -1 with errno (EAGAIN when nonblock
 * and nothing is there).
 */
ssize_t tls_io_writev(int fd, tls_session *t, const struct iovec *iov, int n);
ssize_t tls_io_readv(int fd, tls_session *t, const struct iovec *iov, int n, bool nonblock);
/* Decrypted (or put back) bytes waiting: a poll() on the socket would not
 * see them, so check this first.  NULL: false. */
bool tls_io_pending(const tls_session *t);
/* Put back up to 64 bytes just read, right after the session's first read
 * (the destination classifies a connection by its first bytes, and TLS has
 * no MSG_PEEK). */
void tls_io_unread(tls_session *t, const void *buf, size_t len);
/* tls_error(t), or strerror(errnum) when t is NULL or has none. */
const char *tls_io_strerror(const tls_session *t, int errnum);

#endif
