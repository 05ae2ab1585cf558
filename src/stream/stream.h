/*
 * lm_stream: the byte stream of one migration channel, buffered, with
 * zero-copy page references.
 *
 * Writing.  Small items (record headers, ids, device state) are copied into
 * a fixed buffer; guest pages are NOT copied: stream_put_page() records
 * a pointer to guest RAM as its own iovec, and stream_flush() hands the
 * whole list to one writev/sendmsg.  So a page costs 2 iovecs and no memcpy
 * on the source, and one system call carries ~2 MiB.  The price: a page's
 * bytes are read at flush time, not at put time.  That is fine for precopy
 * (a page written after its dirty bit was cleared is dirty again and will be
 * resent), and the final pass runs with the guest stopped.  Invariant: the
 * caller keeps every referenced page mapped until the next flush.
 *
 * Reading.  A buffer refilled with readv(); a large read (a page) that finds
 * the buffer empty lands directly in its destination, with the rest of the
 * readv filling the buffer, so most pages are not copied twice.
 *
 * Errors are latched: the first failure (I/O error, EOF in the middle of an
 * item, or a parse error reported with lm_stream_set_error) is kept with the
 * byte offset where it happened; every later operation is a no-op, getters
 * return -1.  Callers check lm_stream_error() at natural boundaries.
 *
 * Threads: a stream belongs to one thread at a time (the migration thread,
 * or the incoming thread).  The only cross-thread operation is shutting the
 * descriptor down (conn_shutdown), which makes a blocked call return.
 * The stream never owns the descriptor: the caller closes it.
 */
#ifndef STREAM_STREAM_H
#define STREAM_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "livemig/livemig.h"

#define STREAM_BUF_SIZE (256 * 1024)
#define STREAM_IOV_MAX 1024        /* kernel IOV_MAX */

struct tls_session;

struct lm_stream {
    int fd;
    bool is_socket;
    struct tls_session *tls; /* records on fd go through it (src/tls); borrowed */
    bool writer;
    /* Memory reader: data/len is the whole stream, fd is -1. */
    const uint8_t *mem;
    size_t mem_len;
    /* Memory writer: everything put stays in buf[0..len), which grows. */
    bool mem_writer;

    uint64_t pos;            /* logical offset of the next byte read/written */
    uint64_t io_bytes;       /* bytes that really crossed the descriptor */
    uint64_t skipped;        /* bytes jumped over by stream_seek (writer) */

    uint8_t *buf;
    size_t buf_cap;
    /* writer: buf[0..len) holds copied bytes, buf[seg..len) not yet in iov */
    size_t len, seg;
    struct iovec *iov;
    int niov;
    /* reader: buf[rpos..rlen) is unread */
    size_t rpos, rlen;

    int err;                 /* 0 or the first negative errno */
    char errmsg[LM_ERROR_MAX];
};

lm_stream *stream_new_writer(int fd, bool is_socket);
lm_stream *stream_new_reader(int fd, bool is_socket);
/* Read/write fd through a TLS session (the connection's c->tls), which
 * the stream borrows like fd.  Before the first operation. */
void stream_set_tls(lm_stream *s, struct tls_session *tls);
/* A reader over bytes in memory (tests, fuzzing).  `data` must outlive it. */
lm_stream *stream_new_mem(const void *data, size_t len);
/* A writer into memory (postcopy's package is built whole before it is
 * sent): pages are copied, flush does nothing. */
lm_stream *stream_new_mem_writer(void);
/* A memory writer's bytes so far (valid until the next put or free). */
const uint8_t *stream_mem_data(const lm_stream *s, size_t *len);
/*
 * A descriptor reader's stream goes to another thread (postcopy's listen
 * thread takes the main stream over from the loading thread): a new stream
 * with s's unread bytes and offsets; s is left without a descriptor, so a
 * read on it fails instead of stealing bytes.  The caller frees both.
 */
lm_stream *stream_hand_over(lm_stream *s);
void stream_free(lm_stream *s);

/* Queue a reference to `len` bytes at `p` (a guest page). See invariant above. */
void stream_put_page(lm_stream *s, const void *p, size_t len);
/* Copy `len` bytes (at most the buffer's size) into the buffer in one
 * piece and return where the copy is -- valid until the next put or flush
 * -- so a caller can read back exactly what will be sent (x-integrity
 * hashes a page's copy; a test fault changes it).  NULL when the stream
 * has failed. */
uint8_t *stream_put_copy(lm_stream *s, const void *p, size_t len);
/* Put a counted string: u8 length then the bytes (no NUL); len <= 255. */
void stream_put_counted(lm_stream *s, const char *str);
/* Write out everything queued.  Returns 0 or the latched error. */
int stream_flush(lm_stream *s);
/* Bytes queued but not yet written (the caller flushes past a threshold). */
size_t stream_pending(const lm_stream *s);

/* Read a counted string into str (size >= 256, NUL-terminated). */
int stream_get_counted(lm_stream *s, char *str);
/* Next byte without consuming it, or -1 on error/EOF (EOF is NOT latched). */
int stream_peek_u8(lm_stream *s);
/*
 * Seekable files only (mapped-ram): continue at logical offset `pos`.  A
 * writer flushes first; a reader drops what it had buffered.  Positions are
 * relative, so a stream that starts at file offset N keeps working.
 */
void stream_seek(lm_stream *s, uint64_t pos);
/* Bytes put into the stream: the offset minus what seeks jumped over. */
static inline uint64_t stream_bytes(const lm_stream *s) { return s->pos - s->skipped; }
/* Writer: the logical offset up to which bytes were handed to the
 * descriptor -- what a peer may have received.  Bytes past it never left. */
static inline uint64_t stream_written(const lm_stream *s) { return s->io_bytes; }
/* Reader: bytes that can be read without waiting for the descriptor. */
static inline size_t stream_buffered(const lm_stream *s)
{
    return s->mem ? s->mem_len - (size_t)s->pos : s->rlen - s->rpos;
}
/* True at a clean end of stream (nothing buffered, the peer closed). */
bool stream_at_eof(lm_stream *s);

#endif
