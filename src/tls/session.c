/*
 * TLS sessions on migration connections: the handshake (tls_wrap) and
 * record I/O.  The contract is in tls.h; the choices made here:
 *
 *  - GnuTLS talks to the socket through our own push/pull functions:
 *    sendmsg(MSG_NOSIGNAL) (a dead peer is an error, not SIGPIPE) with all
 *    of a record's pieces in one call, and recv(); both take MSG_DONTWAIT
 *    when the caller asked for a non-blocking step (the return path's
 *    reader, and close_notify at close, which must never block).  The
 *    handshake's waits go through pull_timeout, which also watches the
 *    migration's cancel eventfd, so a cancel or a silent peer ends it.
 *
 *  - A server looks at the connection's first bytes (MSG_PEEK) before the
 *    handshake, so a plaintext source is told apart from a broken TLS one
 *    and both sides get a message that says what is wrong.
 *
 *  - Peer checks happen inside the handshake where TLS allows it (the
 *    certificate chain and the hostname, GnuTLS's verify-cert hook, and an
 *    unknown PSK username), so the peer's handshake fails too, with the
 *    alert GnuTLS sends.  tls-authz is checked right after the handshake,
 *    before the first application byte is read; a refused client gets an
 *    access_denied alert.  With TLS 1.3 a client has finished its side of
 *    the handshake by then, so a refused source learns it from that alert
 *    on its next read (the return path) or write.
 *
 *  - Session tickets are off (GNUTLS_NO_TICKETS): a migration never
 *    resumes a session, and a ticket would be a record nobody reads on a
 *    channel that only goes one way.
 *
 *  - Writes: see tls.h (one gather copy into a 16 KiB record buffer,
 *    record-sized pieces straight from the caller's memory).  Each record
 *    is one sendmsg.  Gathering the records of a whole writev into one
 *    256 KiB send, and reading 256 KiB per recv into a buffer GnuTLS pulls
 *    from (instead of a header and a body recv per record), was tried: CPU
 *    time per GiB did not change measurably on this machine (loopback; the
 *    copies and AES-GCM dominate), so the simpler form stayed.
 */
#include <assert.h>
#include <errno.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "tls/tls_impl.h"
#include "util/error.h"
#include "util/time.h"

#define TLS_RECORD 16384
#define TLS_BACK_MAX 64

/* The connection being wrapped, as the messages name it. */
typedef struct tls_peer {
    int fd;
    const char *peer;
} tls_peer;

struct tls_session {
    gnutls_session_t s;
    int fd;
    tls_creds *creds;                 /* a reference */
    bool client;
    int cancel_fd;                    /* handshake only */
    bool cancelled;                   /* pull_timeout saw cancel_fd */
    bool established;
    bool failed;                      /* no close_notify on close */
    bool nb_pull;                     /* the reader's next pull: MSG_DONTWAIT */
    bool nb_push;                     /* close: MSG_DONTWAIT */
    int push_errno, pull_errno;
    uint8_t *wbuf;                    /* writer's record buffer */
    size_t wlen;
    uint8_t back[TLS_BACK_MAX];       /* conn_unread */
    size_t back_pos, back_len;
    char identity[TLS_IDENTITY_MAX];  /* the peer's DN or PSK username */
    char hostname[TLS_HOSTNAME_MAX];  /* client: what the certificate must name */
    char unknown_user[256];           /* psk server: a username not in keys.psk */
    char rerr[LM_ERROR_MAX];          /* reader's last failure */
    char werr[LM_ERROR_MAX];          /* writer's last failure */
};

/* ---------------------------------------------------------------- transport */

static ssize_t tls_push(gnutls_transport_ptr_t p, const giovec_t *iov, int n)
{
    tls_session *t = p;
    struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
    ssize_t r = sendmsg(t->fd, &m, MSG_NOSIGNAL | (t->nb_push ? MSG_DONTWAIT : 0));

    if (r < 0)
        t->push_errno = errno;
    return r;
}

static ssize_t tls_pull(gnutls_transport_ptr_t p, void *buf, size_t len)
{
    tls_session *t = p;
    ssize_t r = recv(t->fd, buf, len, t->nb_pull ? MSG_DONTWAIT : 0);

    if (r < 0)
        t->pull_errno = errno;
    return r;
}

static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned int ms)
{
    tls_session *t = p;
    struct pollfd pfd[2] = { { .fd = t->fd, .events = POLLIN },
                             { .fd = t->cancel_fd, .events = POLLIN } };
    int r = poll(pfd, t->cancel_fd >= 0 ? 2 : 1, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : (int)ms);

    if (r < 0)
        return -1;      /* errno is EINTR: GnuTLS retries */
    if (t->cancel_fd >= 0 && pfd[1].revents) {
        t->cancelled = true;
        errno = ECANCELED;
        return -1;
    }
    return r > 0 ? 1 : 0;
}

const tls_creds *tls_session_creds(gnutls_session_t s)
{
    tls_session *t = gnutls_session_get_ptr(s);

    return t ? t->creds : NULL;
}

void tls_session_note_unknown_user(gnutls_session_t s, const char *username)
{
    tls_session *t = gnutls_session_get_ptr(s);

    if (t)
        snprintf(t->unknown_user, sizeof(t->unknown_user), "%s", username);
}

/* ---------------------------------------------------------------- handshake */

static void session_free(tls_session *t)
{
    if (!t)
        return;
    if (t->s)
        gnutls_deinit(t->s);
    tls_creds_unref(t->creds);
    free(t->wbuf);
    free(t);
}

static bool is_ip_address(const char *h)
{
    struct in6_addr a6;
    struct in_addr a4;

    return inet_pton(AF_INET, h, &a4) == 1 || inet_pton(AF_INET6, h, &a6) == 1;
}

static int session_new(const tls_setup *st, const tls_peer *c, int cancel_fd, tls_session **out,
                       lm_error *err)
{
    const tls_creds *cr = st->creds;
    tls_session *t = calloc(1, sizeof(*t));
    unsigned int flags;
    int r;

    if (!t)
        abort();
    t->fd = c->fd;
    t->creds = tls_creds_ref(st->creds);
    t->client = cr->endpoint == LM_TLS_CLIENT;
    t->cancel_fd = cancel_fd;
    snprintf(t->hostname, sizeof(t->hostname), "%s", st->hostname);
    t->wbuf = malloc(TLS_RECORD);
    if (!t->wbuf)
        abort();
    flags = (t->client ? GNUTLS_CLIENT : GNUTLS_SERVER) | GNUTLS_NO_SIGNAL | GNUTLS_NO_TICKETS;
    if ((r = gnutls_init(&t->s, flags)) < 0) {
        t->s = NULL;
        goto gnutls_fail;
    }
    gnutls_session_set_ptr(t->s, t);
    if ((r = gnutls_priority_set_direct(t->s, cr->priority, NULL)) < 0)
        goto gnutls_fail;
    if (cr->is_psk)
        r = gnutls_credentials_set(t->s, GNUTLS_CRD_PSK,
                                   t->client ? (void *)cr->psk_client : (void *)cr->psk_server);
    else
        r = gnutls_credentials_set(t->s, GNUTLS_CRD_CERTIFICATE, cr->x509);
    if (r < 0)
        goto gnutls_fail;
    if (!cr->is_psk && cr->verify_peer) {
        if (t->client) {
            gnutls_session_set_verify_cert(t->s, st->hostname, 0);
        } else {
            gnutls_certificate_server_set_request(t->s, GNUTLS_CERT_REQUIRE);
            gnutls_session_set_verify_cert(t->s, NULL, 0);
        }
    }
    /* SNI takes a DNS name only, never an address. */
    if (t->client && st->hostname[0] && !is_ip_address(st->hostname))
        gnutls_server_name_set(t->s, GNUTLS_NAME_DNS, st->hostname, strlen(st->hostname));
    gnutls_transport_set_ptr(t->s, t);
    gnutls_transport_set_vec_push_function(t->s, tls_push);
    gnutls_transport_set_pull_function(t->s, tls_pull);
    gnutls_transport_set_pull_timeout_function(t->s, tls_pull_timeout);
    *out = t;
    return 0;
gnutls_fail:
    error_set(err, -EINVAL, "%s: TLS setup: %s", c->peer, gnutls_strerror(r));
    session_free(t);
    return -EINVAL;
}

/*
 * Server, before the handshake: a TLS client starts with a handshake record
 * (content type 0x16).  A livemig or QEMU source without TLS starts with
 * QEMU's magic instead; say so rather than let GnuTLS call it a bad packet.
 */
static int server_peek(const tls_peer *c, int cancel_fd, int timeout_ms, lm_error *err)
{
    int64_t deadline = timeout_ms < 0 ? -1 : time_now_ms() + timeout_ms;
    uint8_t b[4];
    ssize_t n;

    for (;;) {
        struct pollfd pfd[2] = { { .fd = c->fd, .events = POLLIN },
                                 { .fd = cancel_fd, .events = POLLIN } };
        int64_t left = deadline - time_now_ms();
        int r;

        if (deadline < 0)
            left = -1;              /* no limit */
        else if (left < 0)
            left = 0;
        r = deadline >= 0 && left == 0 ? 0 : poll(pfd, cancel_fd >= 0 ? 2 : 1, (int)left);

        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return error_set_errno(err, -errno, "%s: TLS: poll", c->peer);
        if (cancel_fd >= 0 && pfd[1].revents)
            return error_set(err, -ECANCELED, "%s: TLS handshake cancelled", c->peer);
        if (r == 0)
            return error_set(err, -ETIMEDOUT, "%s: TLS: the source sent no handshake within "
                             "%d ms", c->peer, timeout_ms);
        n = recv(c->fd, b, sizeof(b), MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n < 0)
            return error_set_errno(err, -errno, "%s: TLS handshake", c->peer);
        if (n == 0)
            return error_set(err, -ECONNRESET, "%s: TLS: the source closed the connection "
                             "before its handshake", c->peer);
        if (b[0] == 0x16)
            return 0;
        if ((size_t)n < sizeof(b) && (b[0] == 'Q' || b[0] == 0x11)) {
            /* Maybe QEMU's magic, not all here yet: wait for the rest
             * without spinning on a socket that stays readable. */
            const struct timespec nap = { 0, 1000000 };
            nanosleep(&nap, NULL);
            continue;
        }
        /* Not TLS: answer with a bare TLS alert record (fatal,
         * unexpected_message), which a livemig source recognises on its
         * return path; never blocks. */
        (void)send(c->fd, "\x15\x03\x03\x00\x02\x02\x0a", 7, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n == 4 && !memcmp(b, "QEVM", 4))
            return error_set(err, -EPROTO, "%s: TLS is required (tls-creds is set), but the "
                             "source sent a plaintext migration stream (QEVM header): set "
                             "tls-creds on the source too", c->peer);
        if (n == 4 && b[0] == 0x11 && b[1] == 0x22 && b[2] == 0x33 && b[3] == 0x44)
            return error_set(err, -EPROTO, "%s: TLS is required (tls-creds is set), but the "
                             "source opened a plaintext multifd channel", c->peer);
        return error_set(err, -EPROTO, "%s: TLS is required (tls-creds is set), but the "
                         "source did not start a TLS handshake (first byte 0x%02x)", c->peer,
                         b[0]);
    }
}

/* The handshake failed with GnuTLS error r: say why, as the user sees it. */
static int handshake_error(tls_session *t, const tls_peer *c, int r, int timeout_ms,
                           lm_error *err)
{
    const char *peer = t->client ? "destination" : "source";
    gnutls_datum_t out = { 0 };

    if (t->cancelled)
        return error_set(err, -ECANCELED, "%s: TLS handshake cancelled", c->peer);
    if (r == GNUTLS_E_TIMEDOUT)
        return error_set(err, -ETIMEDOUT, "%s: TLS handshake: no answer within %d ms",
                         c->peer, timeout_ms);
    if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
        unsigned int status = gnutls_session_get_verify_cert_status(t->s);
        int ret;

        if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) < 0)
            out.data = NULL;
        while (out.data && out.size && out.data[out.size - 1] == ' ')
            out.data[--out.size] = 0;
        ret = error_set(err, -EACCES, "%s: TLS: the %s's certificate is refused%s%s%s: %s",
                        c->peer, peer, t->client ? " (expected hostname '" : "",
                        t->client ? t->hostname : "", t->client ? "')" : "",
                        out.data ? (const char *)out.data : gnutls_strerror(r));
        gnutls_free(out.data);
        return ret;
    }
    if (r == GNUTLS_E_FATAL_ALERT_RECEIVED)
        return error_set(err, -EACCES, "%s: TLS: the %s refused the handshake (alert: %s)",
                         c->peer, peer, gnutls_alert_get_name(gnutls_alert_get(t->s)));
    if (t->unknown_user[0])
        return error_set(err, -EACCES, "%s: TLS: PSK username '%s' is not in keys.psk of "
                         "tls-creds '%s'", c->peer, t->unknown_user, t->creds->id);
    if (r == GNUTLS_E_NO_CERTIFICATE_FOUND || r == GNUTLS_E_CERTIFICATE_REQUIRED)
        return error_set(err, -EACCES, "%s: TLS: the %s sent no certificate, and "
                         "verify-peer requires one", c->peer, peer);
    if (r == GNUTLS_E_PREMATURE_TERMINATION || r == GNUTLS_E_UNEXPECTED_PACKET_LENGTH ||
        (r == GNUTLS_E_PULL_ERROR && t->pull_errno == ECONNRESET) ||
        (r == GNUTLS_E_PUSH_ERROR && (t->push_errno == EPIPE || t->push_errno == ECONNRESET)))
        return error_set(err, -ECONNRESET, "%s: TLS: the %s closed the connection during the "
                         "handshake (%s)", c->peer, peer,
                         t->client ? "is tls-creds set on the destination?"
                                   : "it may have refused our certificate");
    if (r == GNUTLS_E_UNEXPECTED_PACKET || r == GNUTLS_E_UNSUPPORTED_VERSION_PACKET)
        return error_set(err, -EPROTO, "%s: TLS handshake: the %s does not speak TLS: %s",
                         c->peer, peer, gnutls_strerror(r));
    return error_set(err, -EPROTO, "%s: TLS handshake: %s", c->peer, gnutls_strerror(r));
}

/* The peer's identity: its certificate's DN in RFC 4514 order ("CN=...,O=...",
 * most specific first, as QEMU's authz examples write it) or PSK username. */
static void session_identity(tls_session *t)
{
    const gnutls_datum_t *certs;
    unsigned int n = 0;
    gnutls_x509_crt_t crt;
    gnutls_datum_t dn = { 0 };

    if (t->creds->is_psk) {
        const char *u = t->client ? NULL : gnutls_psk_server_get_username(t->s);
        snprintf(t->identity, sizeof(t->identity), "%s", u ? u : "");
        return;
    }
    certs = gnutls_certificate_get_peers(t->s, &n);
    if (!certs || n == 0 || gnutls_x509_crt_init(&crt) < 0)
        return;
    if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) == 0 &&
        gnutls_x509_crt_get_dn3(crt, &dn, 0) == 0) {
        snprintf(t->identity, sizeof(t->identity), "%.*s", (int)dn.size, (const char *)dn.data);
        gnutls_free(dn.data);
    }
    gnutls_x509_crt_deinit(crt);
}

int tls_wrap(const tls_setup *st, int fd, const char *peer, int cancel_fd, int timeout_ms,
             tls_session **out, lm_error *err)
{
    const tls_peer pc = { fd, peer }, *c = &pc;
    tls_session *t = NULL;
    int r, ret;

    *out = NULL;
    if (!tls_setup_on(st))
        return 0;
    if (st->creds->endpoint == LM_TLS_SERVER &&
        (ret = server_peek(c, cancel_fd, timeout_ms, err)) < 0)
        return ret;
    if ((ret = session_new(st, c, cancel_fd, &t, err)) < 0)
        return ret;
    gnutls_handshake_set_timeout(t->s, timeout_ms < 0 ? GNUTLS_INDEFINITE_TIMEOUT
                                                      : (unsigned int)timeout_ms);
    do {
        r = gnutls_handshake(t->s);
    } while (r < 0 && !gnutls_error_is_fatal(r) && !t->cancelled);
    if (r < 0) {
        ret = handshake_error(t, c, r, timeout_ms, err);
        /* GnuTLS leaves telling the peer to us: the alert that names the
         * cause (unknown PSK identity, bad certificate...), so it fails at
         * once with a reason instead of waiting for a close. */
        if (!t->cancelled && r != GNUTLS_E_FATAL_ALERT_RECEIVED) {
            t->nb_push = true;
            gnutls_alert_send_appropriate(t->s, r);
        }
        goto fail;
    }
    t->established = true;
    t->cancel_fd = -1;
    session_identity(t);
    if (!t->client && st->authz && !tls_authz_allows(st->authz, t->identity)) {
        /* Tell the source why; a full socket must not block us here. */
        t->nb_push = true;
        gnutls_alert_send(t->s, GNUTLS_AL_FATAL, GNUTLS_A_ACCESS_DENIED);
        ret = error_set(err, -EACCES, "%s: TLS: client identity '%s' is not allowed by "
                        "tls-authz '%s'", c->peer, t->identity[0] ? t->identity : "(none)",
                        tls_authz_id(st->authz));
        goto fail;
    }
    *out = t;
    return 0;
fail:
    session_free(t);
    return ret;
}

void tls_session_close(tls_session *t)
{
    if (!t)
        return;
    if (t->established && !t->failed) {
        t->nb_push = true;
        (void)gnutls_bye(t->s, GNUTLS_SHUT_WR);
    }
    session_free(t);
}

const char *tls_peer_identity(const tls_session *t)
{
    return t ? t->identity : "";
}

const char *tls_error(const tls_session *t)
{
    if (!t)
        return NULL;
    return t->rerr[0] ? t->rerr : t->werr[0] ? t->werr : NULL;
}

/* ---------------------------------------------------------------- records */

/* A failed record operation: the reason into msg, and the errno to return. */
static int record_errno(tls_session *t, int r, bool reading, char *msg, size_t size)
{
    int e = reading ? t->pull_errno : t->push_errno;

    t->failed = true;
    if (r == GNUTLS_E_FATAL_ALERT_RECEIVED) {
        snprintf(msg, size, "the %s ended the TLS session (alert: %s)",
                 t->client ? "destination" : "source",
                 gnutls_alert_get_name(gnutls_alert_get(t->s)));
        return EPROTO;
    }
    if ((r == GNUTLS_E_PUSH_ERROR || r == GNUTLS_E_PULL_ERROR) && e) {
        snprintf(msg, size, "%s", strerror(e));
        return e;
    }
    snprintf(msg, size, "TLS: %s", gnutls_strerror(r));
    return r == GNUTLS_E_DECRYPTION_FAILED ? EBADMSG : EPROTO;
}

static int record_send(tls_session *t, const void *p, size_t len, size_t *sent)
{
    ssize_t r;

    do {
        r = gnutls_record_send(t->s, p, len);
    } while (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED);
    if (r < 0) {
        errno = record_errno(t, (int)r, false, t->werr, sizeof(t->werr));
        return -1;
    }
    *sent = (size_t)r;
    return 0;
}

ssize_t tls_io_writev(int fd, tls_session *t, const struct iovec *iov, int n)
{
    size_t total = 0, sent;

    (void)fd;
    for (int i = 0; i < n; i++) {
        const uint8_t *p = iov[i].iov_base;
        size_t len = iov[i].iov_len;

        while (len) {
            if (t->wlen == 0 && len >= TLS_RECORD) {
                /* A whole record's worth in place: no copy. */
                if (record_send(t, p, TLS_RECORD, &sent) < 0)
                    return -1;
            } else {
                sent = TLS_RECORD - t->wlen < len ? TLS_RECORD - t->wlen : len;
                memcpy(t->wbuf + t->wlen, p, sent);
                t->wlen += sent;
                if (t->wlen == TLS_RECORD) {
                    size_t done;
                    if (record_send(t, t->wbuf, t->wlen, &done) < 0)
                        return -1;
                    /* GnuTLS sends a record of at most TLS_RECORD bytes whole. */
                    if (done != t->wlen)
                        memmove(t->wbuf, t->wbuf + done, t->wlen - done);
                    t->wlen -= done;
                }
            }
            p += sent;
            len -= sent;
            total += sent;
        }
    }
    while (t->wlen) {
        if (record_send(t, t->wbuf, t->wlen, &sent) < 0)
            return -1;
        memmove(t->wbuf, t->wbuf + sent, t->wlen - sent);
        t->wlen -= sent;
    }
    return (ssize_t)total;
}

ssize_t tls_io_readv(int fd, tls_session *t, const struct iovec *iov, int n, bool nonblock)
{
    size_t got = 0;

    (void)fd;
    t->nb_pull = nonblock;
    for (int i = 0; i < n; i++) {
        uint8_t *p = iov[i].iov_base;
        size_t len = iov[i].iov_len, fill = 0;

        while (fill < len && t->back_pos < t->back_len) {
            size_t k = t->back_len - t->back_pos < len - fill ? t->back_len - t->back_pos
                                                              : len - fill;
            memcpy(p + fill, t->back + t->back_pos, k);
            t->back_pos += k;
            fill += k;
            got += k;
        }
        while (fill < len) {
            ssize_t r;

            /* Return what we have rather than wait for another record. */
            if (got && gnutls_record_check_pending(t->s) == 0)
                return (ssize_t)got;
            r = gnutls_record_recv(t->s, p + fill, len - fill);
            if (r > 0) {
                fill += (size_t)r;
                got += (size_t)r;
                continue;
            }
            if (r == GNUTLS_E_INTERRUPTED)
                continue;
            /* The peer closed (with close_notify, or without: the stream's
             * own framing says whether that was in the middle of an item). */
            if (r == 0 || r == GNUTLS_E_PREMATURE_TERMINATION)
                return (ssize_t)got;
            if (got)
                return (ssize_t)got;
            if (r == GNUTLS_E_AGAIN) {
                errno = EAGAIN;
                return -1;
            }
            errno = record_errno(t, (int)r, true, t->rerr, sizeof(t->rerr));
            return -1;
        }
    }
    return (ssize_t)got;
}

bool tls_io_pending(const tls_session *t)
{
    return t && (t->back_pos < t->back_len || gnutls_record_check_pending(t->s) > 0);
}

const char *tls_io_strerror(const tls_session *t, int errnum)
{
    const char *m = tls_error(t);

    return m ? m : strerror(errnum);
}

void tls_io_unread(tls_session *t, const void *buf, size_t len)
{
    /* Only right after the first read of a session: nothing else is buffered. */
    assert(t->back_pos == t->back_len && len <= TLS_BACK_MAX);
    memcpy(t->back, buf, len);
    t->back_pos = 0;
    t->back_len = len;
}
