/*
 * Transports: turn a migration URI into a file descriptor.
 *
 *   tcp:HOST:PORT    IPv4, hostname, or [IPv6]:PORT.  Port 0 when listening
 *                    picks a free port (reported in transport_listener.address and
 *                    transport_listener.uri.port).
 *   unix:PATH        AF_UNIX stream socket.  Listening removes a stale socket
 *                    file only if nobody answers on it.
 *   fd:N             an already open descriptor (socket, pipe or file) that
 *                    the caller hands over; it is dup'ed, so the caller keeps N.
 *                    It must be open in the right direction, and is made
 *                    blocking (the flag is shared with the caller's N).
 *   exec:COMMAND     /bin/sh -c COMMAND; outgoing writes to its stdin,
 *                    incoming reads its stdout.  The child is reaped on close
 *                    and a non-zero exit is an error.  Our end is one end of
 *                    an AF_UNIX socketpair, so conn_shutdown works on it;
 *                    is_socket is false all the same (no return path: the
 *                    command is not a livemig peer).
 *   file:PATH        outgoing creates/truncates PATH, incoming opens it; the
 *                    stream as on any transport, or with the mapped-ram
 *                    capability the file layout of src/mappedram/ (its
 *                    workers open PATH again themselves).  ",offset=N":
 *                    outgoing does not truncate; both start at byte N.
 *
 * Every blocking step (connect, accept) polls an extra `cancel_fd` (an
 * eventfd; readable = give up; -1 = none; never read, so one eventfd can
 * cancel several waiters) and has a timeout, so cancellation and dead peers
 * never hang a thread.  Error messages name the URI and the cause
 * ("tcp:127.0.0.1:1: connect: Connection refused").  Descriptors handed out
 * are blocking and close-on-exec; tcp ones have TCP_NODELAY set.
 *
 * Threads: all functions are plain calls with no shared state; the caller
 * owns every transport_conn / transport_listener it gets.
 */
#ifndef STREAM_TRANSPORT_H
#define STREAM_TRANSPORT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include "livemig/livemig.h"
#include "tls/tls.h"

typedef enum transport_uri_kind {
    URI_TCP, URI_UNIX, URI_FD, URI_EXEC, URI_FILE,
} transport_uri_kind;

typedef struct transport_uri {
    transport_uri_kind kind;
    char host[256];       /* tcp: without brackets */
    char port[16];        /* tcp */
    char path[4096];      /* unix, file */
    char cmd[4096];       /* exec */
    int fd;               /* fd */
    uint64_t offset;      /* file: ,offset=N */
    /* tcp: a link that goes silent (packets dropped, no reset) fails the
     * connection after about this long, both ways: keepalive probes when
     * nothing is sent, TCP_USER_TIMEOUT when sent data stays unacknowledged.
     * 0 = the kernel's defaults (retransmissions for ~15 minutes).  Set by
     * the caller after transport_uri_parse. */
    int link_timeout_ms;
} transport_uri;

/* Parse; "bad URI" errors say which part was wrong. */
int transport_uri_parse(const char *s, transport_uri *u, lm_error *err);

typedef struct transport_conn {
    int fd;               /* -1 when closed */
    tls_session *tls;     /* the TLS session on fd (conn_tls_wrap below),
                             NULL for plaintext; owned with fd: conn_close ends
                             it, and it means nothing once fd is -1 */
    bool is_socket;       /* a socket with a peer that can answer (tcp, unix,
                             fd: socket): sendmsg(MSG_NOSIGNAL) works, a
                             return path is possible.  false for exec: */
    bool seekable;        /* regular file */
    pid_t child;          /* exec: the shell, 0 otherwise */
    char peer[160];       /* printable peer, for messages: "tcp:ADDR:PORT",
                             "unix:PATH", "exec:CMD", "fd:N", "file:PATH" */
} transport_conn;

/* Outgoing.  timeout_ms bounds connect (tcp/unix, all addresses together);
 * -1 = no limit.  Returns -ECANCELED / -ETIMEDOUT like accept. */
int transport_connect(const transport_uri *u, transport_conn *c, int cancel_fd, int timeout_ms,
                      lm_error *err);

typedef struct transport_listener {
    transport_uri uri;
    int fd;               /* listening socket; -1 for fd/exec/file */
    char address[160];    /* "tcp:127.0.0.1:40123", "unix:/path", ... */
} transport_listener;

/*
 * Incoming: bind + listen (tcp/unix); for fd/file only checks that the
 * descriptor / file is there, so mistakes are reported at once.  A unix path
 * held by a live listener is refused; finding out connects to it once.
 */
int transport_listen(const transport_uri *u, transport_listener *l, lm_error *err);
/*
 * Wait for the connection (tcp/unix accept; fd/exec/file open at once).
 * Returns -ECANCELED when cancel_fd fires, -ETIMEDOUT after timeout_ms (-1 =
 * forever).
 */
int transport_accept(transport_listener *l, transport_conn *c, int cancel_fd, int timeout_ms,
                     lm_error *err);
/* Close, unlink a unix path.  Idempotent; not concurrently with accept. */
void transport_unlisten(transport_listener *l);

/* Make blocked reads/writes on c return (socket, exec: shutdown; others:
 * no-op).  Safe from another thread while one is blocked on c. */
void conn_shutdown(transport_conn *c);
/*
 * Close (ending the TLS session first, if any); for exec waits for the
 * child and reports a failed exit in err.  That wait is bounded: after 10 s the command's process group is killed
 * (-ETIMEDOUT).  Idempotent.
 */
int conn_close(transport_conn *c, lm_error *err);

/*
 * TLS: wrap c in a session made from s (src/tls/tls.h); a no-op when s has
 * no credentials, so every place that opens a channel calls it.  Right
 * after connect or accept, before any byte; c must be a socket.  On failure
 * c is as it was (the caller closes it) and err names the peer and cause.
 */
int conn_tls_wrap(const tls_setup *s, transport_conn *c, int cancel_fd, int timeout_ms,
                  lm_error *err);
/*
 * I/O on a connection, TLS or not (c->tls): like sendmsg(MSG_NOSIGNAL) or
 * writev (not a socket) / readv: bytes, or -1 with errno; 0 from a read:
 * the peer closed.  One thread may write while another reads.
 */
ssize_t conn_writev(transport_conn *c, const struct iovec *iov, int n);
ssize_t conn_readv(transport_conn *c, const struct iovec *iov, int n);
ssize_t conn_read(transport_conn *c, void *buf, size_t len);
/* Non-blocking read: -1/EAGAIN when nothing is there yet. */
ssize_t conn_read_nb(transport_conn *c, void *buf, size_t len);
/* Bytes already in the TLS session: poll() on fd would not see them. */
bool conn_pending(const transport_conn *c);
/* TLS only: put back the first bytes read (tls_io_unread). */
void conn_unread(transport_conn *c, const void *buf, size_t len);
/* The text for a failure of the calls above: TLS's reason or strerror. */
const char *conn_strerror(const transport_conn *c, int errnum);

#endif
