/*
 * tls: GnuTLS on a migration's connections.
 *
 * Objects (creds.c).  tls_creds (x509 or PSK, one endpoint) and tls_authz
 * (authz-simple) are immutable once made and reference counted; a
 * tls_registry maps ids to them for one lm_mig (include/livemig/tls.h is
 * the public face).  A migration resolves its tls-* parameters once, at
 * start, into a tls_setup that holds references for as long as it runs.
 *
 * Sessions (session.c).  One call wraps a connection:
 *
 *     transport_connect(&u, &c, ...);              or transport_accept(...)
 *     tls_wrap(&setup, &c, cancel_fd, timeout_ms, &err);
 *
 * A setup without credentials makes tls_wrap a no-op, so every place that
 * opens a channel calls it unconditionally.  With credentials it runs the
 * handshake at once (the creds' endpoint says client or server), checks the
 * peer (certificate and hostname, or PSK key; then tls-authz on a server)
 * and hangs the session on c->tls; conn_close() ends and frees it.  That is
 * the whole recipe for a new kind of channel (postcopy's preempt channel:
 * connect + tls_wrap on the source, accept + tls_wrap on the destination,
 * then read and write through conn_readv/conn_writev below).  Nothing else
 * has been read from or written to the socket when tls_wrap runs: the
 * handshake is the first thing on the wire, before QEMU's QEVM header or
 * multifd handshake, as QEMU places it.
 *
 * I/O.  conn_writev / conn_readv (transport.h style: bytes or -1 with
 * errno) go to the socket directly without TLS and through GnuTLS records
 * with it.  Kernel TLS is not available on this machine's kernel (TCP_ULP
 * "tls" fails with ENOENT), so records are made in user space: writes
 * gather iovecs (guest pages) into one 16 KiB record buffer -- one copy, then
 * GnuTLS encrypts -- and a piece of at least a record's size goes to GnuTLS
 * straight from guest RAM; reads decrypt straight into the caller's iovecs
 * (guest RAM for multifd).  A failed TLS operation leaves its reason in
 * tls_error() (the alert the peer sent, say), so messages name it.
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
#include "stream/transport.h"

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
 * migration in direction `endpoint` over `u`.  Empty creds = no TLS (the
 * other two are then ignored, as in QEMU).
 * Errors name the parameter: no such object, an object of the wrong kind or
 * endpoint, a transport that cannot carry TLS, no hostname to verify.
 */
int tls_setup_resolve(tls_registry *r, const char *creds_id, const char *hostname,
                      const char *authz_id, lm_tls_endpoint endpoint, const transport_uri *u,
                      tls_setup *out, lm_error *err);
void tls_setup_release(tls_setup *s);   /* idempotent */
static inline bool tls_setup_on(const tls_setup *s) { return s && s->creds; }

/* ---------------------------------------------------------------- sessions */

typedef struct tls_session tls_session;

/* See the top of this file.  0, or a negative errno with err naming the peer
 * and the cause; c is left as it was (the caller still closes it). */
int tls_wrap(const tls_setup *s, transport_conn *c, int cancel_fd, int timeout_ms,
             lm_error *err);
/* End the session: a close_notify when it is healthy (without waiting for
 * room in the socket: never blocks), then free.  NULL is a no-op. */
void tls_session_close(tls_session *t);
/* The peer's identity after a handshake (DN or PSK username), or "". */
const char *tls_peer_identity(const tls_session *t);
/* The reason of the last failed read or write, or NULL. */
const char *tls_error(const tls_session *t);

/* Whole-connection I/O, TLS or not (c->tls).  Like sendmsg(MSG_NOSIGNAL) /
 * readv: bytes, or -1 with errno (0 from readv: the peer closed). */
ssize_t conn_writev(transport_conn *c, const struct iovec *iov, int n);
ssize_t conn_readv(transport_conn *c, const struct iovec *iov, int n);
ssize_t conn_read(transport_conn *c, void *buf, size_t len);
/* Non-blocking read: -1/EAGAIN when nothing is there yet. */
ssize_t conn_read_nb(transport_conn *c, void *buf, size_t len);
/* Decrypted bytes waiting in the session: a poll() on the socket would not
 * see them, so check this first. */
bool conn_pending(const transport_conn *c);
/* Put back up to 64 bytes just read (the destination reads a connection's
 * first bytes to classify it: TLS has no MSG_PEEK). */
void conn_unread(transport_conn *c, const void *buf, size_t len);
/* Text for a failure of the calls above: tls_error() or strerror(errnum). */
const char *conn_strerror(const transport_conn *c, int errnum);

/* Same for users that only keep (fd, session): the stream, the return path. */
ssize_t tls_io_writev(int fd, tls_session *t, const struct iovec *iov, int n);
ssize_t tls_io_readv(int fd, tls_session *t, const struct iovec *iov, int n, bool nonblock);
bool tls_io_pending(const tls_session *t);
const char *tls_io_strerror(const tls_session *t, int errnum);

#endif
