/*
 * multifd: RAM pages over N parallel channels, each a socket with its own
 * thread, kept in order across dirty-sync rounds by SYNC packets.
 *
 * Wire (docs/format.md, section 5): every channel starts with a 64-byte
 * handshake (magic 0x11223344, version 1, the source's 16-byte UUID -- zero,
 * as QEMU without -uuid --, channel id), then packets: a 1344-byte header
 * (magic, version, flags, pages_alloc=128, normal_pages, next_packet_size,
 * packet_num, zero_pages, the block's idstr in 256 bytes, 128 be64 offsets:
 * normal ones first, then zero ones) followed by the normal pages' data.
 * Sync is per section, as QEMU 7.2 does it: before every EOS of the `ram`
 * section each channel sends a packet with the SYNC flag, and the destination
 * treats every EOS as a barrier.  No MULTIFD_FLUSH record is ever written.
 *
 * Source threads and ownership
 * ----------------------------
 *   migration thread  owns `ms->batch` (the pages being collected) and is the
 *                     only producer.  multifd_send_page() appends an offset;
 *                     a full batch, or a page of another block, is parked in
 *                     the hand-off slot `c->next` of a channel whose slot is
 *                     free, by SWAPPING batch pointers with it.
 *   channel thread i  owns `c->batch` (the packet it is sending) always, and
 *                     `c->next` from the moment it sees pending_job=1
 *                     (acquire, via c->sem).  It takes the job by swapping
 *                     `c->batch` and `c->next`, then at once stores
 *                     pending_job=0 (release) and posts ms->ready -- before it
 *                     sends -- so the next batch can be parked while this one
 *                     is on the wire and the channel goes from packet to
 *                     packet without sleeping (a futex wake-up costs ~30 us
 *                     here, 15% of a 512 KiB packet's time on the wire).
 *   Barriers: the migration thread's store-release of pending_job=1 and
 *   fsem_post(c->sem) pair with the channel's fsem_wait (acquire) and its
 *   load-acquire of pending_job; the channel's store-release of pending_job=0
 *   and post of ms->ready pair with the migration thread's wait on ms->ready
 *   and load-acquire of pending_job.  `ms->ready` counts free slots.
 *   Sync: the migration thread sets every pending_sync and posts every c->sem;
 *   a channel always sends its parked job before it sends SYNC, then posts
 *   c->sem_sync; the migration thread waits for all of them before it writes
 *   EOS on the main stream.
 *
 * With x-integrity a channel copies its packet's normal pages into its own
 * buffer, hashes the copy and sends it (the guest may write a page after
 * the hash), then the checksums; the receiving channel hashes each page in
 * place right after its readv (or inflate), before ram_received().
 *
 * Destination threads
 * -------------------
 *   channel thread i  reads packets and writes their pages straight into guest
 *                     RAM (readv into the pages, adjacent pages coalesced);
 *                     on SYNC it posts mr->synced and parks on c->release.
 *   incoming thread   at every `ram` EOS calls multifd_recv_sync(): waits for
 *                     every channel's SYNC, then releases them all.  So every
 *                     page sent before a sync is in RAM before the main stream
 *                     goes on, and no channel applies a page of the next round
 *                     early: round N can never overwrite round N+1.
 *
 * Errors: whichever thread fails first reports through `fail` (which keeps
 * the first error, sets the shared abort flag and shuts every socket down),
 * so every wait -- fsem_wait checks `abort`, blocked I/O returns on
 * shutdown -- ends; multifd_*_finish() joins every thread it started and
 * closes every socket.  No path waits forever.
 */
#ifndef MULTIFD_MULTIFD_H
#define MULTIFD_MULTIFD_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "ram/ram.h"
#include "stream/transport.h"
#include "tls/tls.h"
#include "util/sem.h"

#define MULTIFD_MAGIC 0x11223344U
#define MULTIFD_VERSION 1U
#define MULTIFD_PAGES 128
#define MULTIFD_INIT_SIZE 64
#define MULTIFD_HDR_SIZE (320 + 8 * MULTIFD_PAGES)         /* 1344 */
#define MULTIFD_MAX_CHANNELS 64

enum {
    MULTIFD_FLAG_SYNC = 0x01,
    MULTIFD_FLAG_COMP_MASK = 0x0e,
    MULTIFD_FLAG_ZLIB = 0x02,
    MULTIFD_FLAG_ZSTD = 0x04,
    /* livemig's own (x-integrity, never towards QEMU): after the payload,
     * one be64 checksum per listed page, normal ones then zero ones,
     * not counted in next_packet_size (docs/format.md section 9) */
    MULTIFD_FLAG_INTEGRITY = 0x100,
};

/* multifd-compression, in the order of its parameter choices */
enum { MF_NONE, MF_ZLIB, MF_ZSTD };

/* Per-channel streaming (de)compression (codec.c); owned by one thread. */
typedef struct mf_codec mf_codec;
mf_codec *mf_codec_new(int method, int level, bool compress, lm_error *err);
void mf_codec_free(mf_codec *c);
size_t mf_codec_bound(int method);      /* largest payload of one packet */
/* Compress one page; `last` ends the packet with a flush.  *outlen = bytes out. */
int mf_codec_compress(mf_codec *c, const uint8_t *page, bool last, uint8_t *out,
                      size_t cap, size_t *outlen, lm_error *err);
int mf_codec_decompress(mf_codec *c, const uint8_t *in, size_t len, uint8_t *const *pages,
                        uint32_t n, lm_error *err);
static inline uint32_t mf_comp_flags(int method)
{
    return method == MF_ZLIB ? MULTIFD_FLAG_ZLIB
         : method == MF_ZSTD ? MULTIFD_FLAG_ZSTD : 0;
}

typedef enum zero_detect {
    ZERO_NONE,          /* every page sent in full */
    ZERO_LEGACY,        /* migration thread checks; ZERO records on the main stream */
    ZERO_MULTIFD,       /* channel threads check; the packet's zero list */
} zero_detect;

/* Reports the first error of a channel thread; provided by the migration. */
typedef void (*multifd_fail_fn)(void *opaque, const lm_error *err);

/* One batch: up to 128 offsets of one block. */
typedef struct mf_batch {
    const ramblock *block;
    uint32_t num;
    uint64_t offsets[MULTIFD_PAGES];
} mf_batch;

/* ---- packet encoding (packet.c) ---- */

typedef struct mf_header {
    uint32_t flags;
    uint32_t pages_alloc;
    uint32_t normal, zero;
    uint32_t next_size;
    uint64_t packet_num;
    char idstr[256];
    uint64_t offsets[MULTIFD_PAGES];
} mf_header;

void multifd_put_init(uint8_t out[MULTIFD_INIT_SIZE], uint8_t id);
/* Check a handshake; fills *id.  Errors name the channel's peer. */
int multifd_check_init(const uint8_t in[MULTIFD_INIT_SIZE], int nchannels, uint8_t *id,
                       lm_error *err);
void multifd_put_header(uint8_t out[MULTIFD_HDR_SIZE], const mf_header *h);
/*
 * Decode and validate a header against the destination's RAM: magic,
 * version, compression method, the integrity flag (ram->integrity), counts, block name, every offset inside the
 * block and page aligned.  *block is NULL only when the packet has no pages.
 */
int multifd_get_header(const uint8_t in[MULTIFD_HDR_SIZE], mf_header *h,
                       const ram_state *ram, uint32_t comp_flags, const ramblock **block,
                       lm_error *err);

/* ---- source (send.c) ---- */

typedef struct multifd_sender multifd_sender;

/*
 * Migration thread: connect the `n` channels to `u` one after the other,
 * each sending its handshake right after its connect (a destination reads
 * every connection's first bytes before it accepts the next).  With TLS
 * (tls on) each connection's TLS handshake comes first, and the multifd
 * handshake travels inside it.  On failure every connection made is closed
 * and the error names the channel.
 */
int multifd_send_connect(const transport_uri *u, const tls_setup *tls, int n, int cancel_fd,
                         int timeout_ms, transport_conn *conns, lm_error *err);
/*
 * Start one thread per channel connected by multifd_send_connect (ownership
 * of the descriptors passes to the multifd state).  `abort` is the
 * migration's cancel flag.
 */
multifd_sender *multifd_send_start(transport_conn *conns, int n, zero_detect zd,
                                   int method, int level, bool integrity,
                                   atomic_bool *stop, multifd_fail_fn fail,
                                   void *fail_opaque, lm_error *err);
/* Migration thread: queue one dirty page (not checked for zeros by caller
 * unless zd == LEGACY).  0 or -ECANCELED when the channels failed. */
int multifd_send_page(multifd_sender *ms, const ramblock *b, uint64_t offset);
/* The sink (ram.h) for the `ram` section: pages to the channels (or ZERO
 * records with legacy detection), a SYNC of every channel before each EOS. */
ram_sink multifd_send_sink(multifd_sender *ms);
/* Migration thread: hand off the partial batch, SYNC every channel, wait. */
int multifd_send_sync(multifd_sender *ms);
/* Any thread: make every channel thread and wait return (failure path). */
void multifd_send_kick(multifd_sender *ms);
/* Migration thread: stop and join all channels, close their sockets, free. */
void multifd_send_finish(multifd_sender *ms);

typedef struct multifd_stats {
    uint64_t queued_pages;   /* handed in by the migration thread */
    uint64_t bytes;          /* on the wire, headers included */
    uint64_t compressed_bytes;   /* payload after compression (0 without) */
    uint64_t normal_pages;
    uint64_t zero_pages;     /* found by the channel threads */
    uint64_t packets;
} multifd_stats;
void multifd_send_stats(multifd_sender *ms, multifd_stats *st);

/* ---- destination (recv.c) ---- */

typedef struct multifd_receiver multifd_receiver;

/*
 * Take `n` channel connections whose handshakes were checked (conns[id] is
 * channel id) and start their threads.
 */
/* main_fd: the main stream, watched while the incoming thread waits at a
 * barrier (a source that goes away is noticed even if no channel reads). */
multifd_receiver *multifd_recv_start(transport_conn *conns, int n, const ram_state *ram, int method,
                                     int main_fd, atomic_bool *stop, multifd_fail_fn fail,
                                     void *fail_opaque, lm_error *err);
/*
 * Incoming thread: accept the main connection and `n` channels in whatever
 * order they arrive.  Each connection is classified by its first 4 bytes
 * ("QEVM" = main, 0x11223344 = a channel, anything else is refused); a
 * channel's handshake is read and checked (magic, version, UUID, id in
 * range, no duplicate).  The first accept waits for a source (cancel_fd
 * interrupts it); everything after it is bounded by timeout_ms.  With TLS
 * (tls on) every connection's TLS handshake comes first and the 4 bytes are
 * read inside it (TLS has no peek: they are put back with conn_unread).
 */
int multifd_accept(transport_listener *l, const tls_setup *tls, int n, int cancel_fd,
                   int timeout_ms, transport_conn *main_conn, transport_conn *chans,
                   lm_error *err);
/* Incoming thread, at every ram EOS: the barrier described above. */
int multifd_recv_sync(multifd_receiver *mr);
/* The placer (ram.h): main-stream records (legacy ZERO) placed directly,
 * and every EOS the barrier above. */
ram_placer multifd_recv_placer(multifd_receiver *mr);
void multifd_recv_kick(multifd_receiver *mr);
/*
 * Shut the channels down (the stream ended), join, close, free.  After the
 * final barrier a source sends no page: 0, or -EPROTO (in err) when a
 * channel had begun placing pages after its last SYNC -- the load must then
 * fail, since such pages (maybe half written) were never part of a round.
 */
int multifd_recv_finish(multifd_receiver *mr, lm_error *err);
uint64_t multifd_recv_bytes(multifd_receiver *mr);

#endif
