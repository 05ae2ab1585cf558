/*
 * The return path: messages from the destination back to the source on the
 * main connection (be16 type, be16 len, data; QEMU's MIG_RP_MSG_*, whose
 * numbers, lengths and 512-byte cap are src/savevm/wire.h's table).
 *
 * Precopy uses it for SHUT (the destination's verdict) and PONG; postcopy
 * adds page requests (REQ_PAGES, REQ_PAGES_ID) that must be taken while the
 * source's migration thread is busy sending, and recovery adds RECV_BITMAP
 * and RESUME_ACK.  So each end is an object of its own, with its own thread
 * rules, instead of code inside the migration threads:
 *
 * Destination: rp_writer
 *   Any thread may send (the incoming thread's SHUT and PONG today; the
 *   fault thread's page requests later): each message is checked against the
 *   table, encoded whole and written under the writer's lock, so two
 *   threads' messages never interleave on the wire.  The writer never closes
 *   the descriptor: the connection belongs to the incoming thread.
 *
 * Source: rp_reader
 *   A thread of its own ("lm-rp") reads the return path for the whole
 *   migration, so a message is taken when it arrives, not when the
 *   migration thread next looks.  It checks every message against the table
 *   (type known, length right, at most 512 bytes), keeps the SHUT verdict,
 *   and hands any other message to ops->message on its own thread (NULL: a
 *   message other than SHUT and PONG is a protocol error).  When it stops by
 *   itself -- a bad message, the peer closed or reset the connection, a
 *   handler's refusal -- it keeps that error and calls ops->failed once (the
 *   migration's mig_fail: the first error is kept and every wait is
 *   interrupted).  It exits on its own after SHUT; rp_reader_stop() ends it
 *   earlier (an eventfd its poll watches) and joins it.
 *
 *   The migration thread asks with rp_reader_check() between sections (has
 *   the reader failed, or the destination given its verdict early?) and
 *   waits with rp_reader_wait_shut() after the whole stream was sent.
 *
 * Ownership: both objects borrow the connection's descriptor; its owner
 * (the migration or incoming thread) stops/frees them before closing it.
 */
#ifndef RETURNPATH_RETURNPATH_H
#define RETURNPATH_RETURNPATH_H

#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"

/* ---------------------------------------------------------------- destination */

typedef struct rp_writer rp_writer;

struct tls_session;

rp_writer *rp_writer_new(int fd);
/* Through the connection's TLS session (borrowed like fd; tls.h: one
 * writer at a time, which the writer's lock gives). */
rp_writer *rp_writer_new_tls(int fd, struct tls_session *tls);
void rp_writer_free(rp_writer *w);           /* NULL is a no-op */
/* Send one message, whole or not at all (a short write is an error).  Any
 * thread.  0, -EINVAL (not a valid message per the table), or -errno. */
int rp_send(rp_writer *w, uint16_t type, const void *data, uint16_t len);
/* The same followed by tail_len bytes under the same lock, for the one
 * message that has bytes after it, RECV_BITMAP (its trailer: size, bitmap,
 * end mark; postcopy.h).  -EINVAL for a tail on any other type. */
int rp_send_tail(rp_writer *w, uint16_t type, const void *data, uint16_t len,
                 const void *tail, size_t tail_len);
/* SHUT, PONG, RESUME_ACK: a be32 payload. */
int rp_send_u32(rp_writer *w, uint16_t type, uint32_t value);

/* ---------------------------------------------------------------- source */

typedef struct rp_reader rp_reader;

typedef struct rp_reader_ops {
    /* Reader thread: a valid message other than SHUT.  0, or a negative
     * errno with err filled (the reader stops with that error).  NULL:
     * PONG is taken and dropped, anything else is a protocol error. */
    int (*message)(void *opaque, uint16_t type, const uint8_t *data, uint16_t len,
                   lm_error *err);
    /* Reader thread, once: it stopped with an error (not after SHUT, not
     * when rp_reader_stop asked). */
    void (*failed)(void *opaque, const lm_error *err);
    /* Reader thread, postcopy recovery.  RECV_BITMAP (u8 n, name) is
     * followed by a trailer whose length only the owner knows from the
     * block it names: bitmap_bytes returns it (the whole trailer, >= 16)
     * or refuses the name; the reader refuses a size field that disagrees
     * before it waits for that many bytes, then hands the whole trailer to
     * bitmap.  Both 0 or a negative errno with err filled.  NULL bitmap:
     * RECV_BITMAP is a protocol error. */
    int (*bitmap_bytes)(void *opaque, const uint8_t *msg, uint16_t len, uint64_t *bytes,
                        lm_error *err);
    int (*bitmap)(void *opaque, const uint8_t *msg, uint16_t len, const uint8_t *trailer,
                  uint64_t bytes, lm_error *err);
} rp_reader_ops;

rp_reader *rp_reader_start(int fd, const rp_reader_ops *ops, void *opaque, lm_error *err);
/* The same over the connection's TLS session: the reader thread is the
 * session's only reader while the migration thread writes it. */
rp_reader *rp_reader_start_tls(int fd, struct tls_session *tls, const rp_reader_ops *ops,
                               void *opaque, lm_error *err);
/* Stop the thread (if it still runs), join it, free.  NULL is a no-op. */
void rp_reader_stop(rp_reader *r);

/*
 * Migration thread, between sections: 0 while nothing happened; the
 * reader's error; or, when a SHUT arrived before the stream was complete,
 * an error that says so (status != 0: the destination failed to load;
 * status 0: a verdict before EOF, which only a broken peer sends).
 * *shut_status is set when a SHUT arrived (-1 otherwise).
 */
int rp_reader_check(rp_reader *r, int *shut_status, lm_error *err);
/*
 * Migration thread, after the whole stream was sent: wait at most
 * timeout_ms for the destination's SHUT.  0 with *status set when it came
 * (a non-zero status is the destination's failure: the caller reports it);
 * -ETIMEDOUT; or the reader's error (the peer closed without a verdict...).
 * An interrupt (rp_reader_stop from elsewhere) returns -ECANCELED.
 */
int rp_reader_wait_shut(rp_reader *r, int timeout_ms, uint32_t *status, lm_error *err);

#endif
