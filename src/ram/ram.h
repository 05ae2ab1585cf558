/*
 * The `ram` section: guest RAM blocks, the dirty bitmap they are sent from,
 * and the encoding of QEMU's ram section (version 4).
 *
 * Wire (see docs/format.md): every record starts with be64
 * (offset_in_block | flags).  START carries MEM_SIZE|total and the block list
 * (counted idstr, be64 length) then EOS; PART and END carry page records --
 * ZERO (+u8 fill) or PAGE (+4096 bytes), each with the block's counted idstr
 * unless CONTINUE says "same block as the previous record" -- then EOS.
 *
 * Source (the migration thread owns all save state): ram_save_start()
 * allocates one bitmap per block with every page set (the first pass sends
 * everything, as QEMU does); ram_sync() ORs the tracker's written pages in;
 * ram_save_some() walks the bitmaps from a cursor that persists across calls,
 * clearing each bit as it hands the page to the sink, and reports when the
 * walk wraps (one full pass).  The default sink turns zero pages into ZERO
 * records (vectorised check) and queues the others by reference (zero-copy).
 *
 * Integrity (x-integrity, `integrity` set on both sides): every ZERO and
 * PAGE record carries a be64 checksum after its payload (integrity.h), made
 * by the sender from the bytes it sends (a PAGE is then copied into the
 * stream, not referenced: a page the guest writes after it was hashed
 * would otherwise go out with a stale sum) and checked by the placer
 * (ram_verify_page / ram_verify_fill) before the page counts as received.
 *
 * Destination (the incoming thread): ram_load() parses one section's payload,
 * checking every name, length and offset before it hands a record to the
 * placer (the default one reads each page straight into its place).  Nothing
 * writes outside a block.
 */
#ifndef RAM_RAM_H
#define RAM_RAM_H

#include <assert.h>
#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "stream/stream.h"
#include "dirty/dirty.h"
#include "util/bitmap.h"

#define RAM_PAGE_SIZE 4096ULL
#define RAM_PAGE_MASK (~(RAM_PAGE_SIZE - 1))

/* Record flags in the low bits of the be64 header word (QEMU's values). */
enum {
    RAM_ZERO = 0x002,
    RAM_MEM_SIZE = 0x004,
    RAM_PAGE = 0x008,
    RAM_EOS = 0x010,
    RAM_CONTINUE = 0x020,
    RAM_XBZRLE = 0x040,
    RAM_HOOK = 0x080,
    RAM_COMPRESS_PAGE = 0x100,
    RAM_MULTIFD_FLUSH = 0x200,
};

#define RAM_SECTION_VERSION 4
#define RAM_MAX_BLOCKS 64

typedef struct ramblock {
    char idstr[256];
    uint8_t *host;
    uint64_t length;
    uint64_t npages;
    unsigned long *bmap;        /* source: pages still to send */
    uint64_t arm_next;          /* source: first page whose tracking is not armed */
    /* destination: pages that arrived in this load (set with atomic ORs:
     * multifd channel threads set theirs concurrently), and whether the
     * block list named the block */
    unsigned long *rmap;
    bool listed;
    /* Where the memory comes from (src/cpr/: lm_ram_register_fd): `fd` is
     * the library's own descriptor of it (-1: anonymous, or a destination
     * block waiting for a cpr-transfer source's), mapped from `fd_offset`.
     * `ignored`: this migration leaves the block in place (x-ignore-shared,
     * cpr modes) -- no page of it is sent, tracked or loaded.  Both are set
     * before a migration starts and read-only while it runs. */
    int fd;
    uint64_t fd_offset;
    int backing;                /* cpr_backing */
    bool ignored;
    uint64_t mr_addr;           /* x-ignore-shared's address: the bytes of the
                                   blocks registered before this one */
    uint64_t seed;              /* integrity_block_seed(idstr) */
} ramblock;

typedef struct ram_state {
    ramblock blocks[RAM_MAX_BLOCKS];
    int nblocks;
    uint64_t total;             /* sum of block lengths */
    bool ignore_shared;         /* x-ignore-shared: mr_addr in the block list */
    bool integrity;             /* x-integrity: records carry checksums; set at setup */

    /* source save state */
    int cur_block;
    uint64_t cur_page;
    const ramblock *last_sent;      /* for CONTINUE */
    uint64_t dirty;             /* bits set in all bitmaps */
    uint64_t zero_pages, normal_pages;
    uint64_t offstream_bytes;   /* page bytes a sink moved off the main stream */
    dirty_tracker *arm;         /* the tracker, started unarmed; NULL: all armed */

    /* destination load state */
    const ramblock *last_recv;
    bool seen_block_list;
    bool load_ended;            /* the END section's EOS was read */
} ram_state;

/*
 * The page path (design note 9): this module owns blocks, bitmaps and
 * cursors and encodes the `ram` section, but never knows which transport
 * carries a page.  On the source every page leaves through ONE sink chosen
 * at setup; on the destination every page record is placed through ONE
 * placer.  A transport (multifd, mapped-ram, compression, later postcopy's
 * urgent channel and UFFDIO_COPY) implements the interface in its own
 * module, which includes this header -- never the other way round.
 *
 * Implementations today: sinks -- the main stream (default), multifd
 * (multifd_send_sink), mapped-ram (mapped_ram_sink), compression
 * (compress_sink); placers -- direct copy (default), multifd's barrier
 * (multifd_recv_placer), mapped-ram's pread (mapped_ram_placer), the
 * decompression pool (decompress_placer).  Postcopy adds a sink for its
 * urgent channel and a placer that installs pages with UFFDIO_COPY /
 * UFFDIO_ZEROPAGE.  The bytes themselves are written where they arrive:
 * multifd channel threads and mapped-ram/decompression workers write guest
 * RAM directly (zero-copy) and mark ram_received(); postcopy disables
 * multifd (as QEMU does), so after LISTEN every page record goes through the
 * one placer.
 *
 * Threads: sinks and placers are called on the thread that drives the
 * section (the migration thread, the incoming thread), never concurrently.
 */
typedef enum ram_sent {
    RAM_SENT_ZERO,      /* a zero page, told as such (a ZERO record, a clear bit) */
    RAM_SENT_STREAM,    /* in full, on the main stream (counted by its offset) */
    RAM_SENT_AWAY,      /* in full, handed to another channel (multifd, a file) */
} ram_sent;

typedef struct ram_sink_ops {
    const char *name;
    /* START, after a block's idstr and length (mapped-ram: its header).
     * NULL: nothing. */
    void (*block)(void *impl, ram_state *r, lm_stream *s, ramblock *b);
    /* Send one dirty page (its bit already cleared): a ram_sent, or a
     * negative errno (the caller latches it on s).  NULL: the main stream's
     * ZERO / PAGE records (ram_put_zero, ram_put_page). */
    int (*page)(void *impl, ram_state *r, lm_stream *s, ramblock *b, uint64_t page);
    /* Before every EOS: everything handed over is out (multifd SYNC,
     * mapped-ram writes done, compressed pages emitted), so a page sent in
     * this section can never overtake its resend in the next.  NULL:
     * nothing.  0 or a negative errno with err filled. */
    int (*flush)(void *impl, ram_state *r, lm_stream *s, lm_error *err);
} ram_sink_ops;

typedef struct ram_sink {
    const ram_sink_ops *ops;
    void *impl;
} ram_sink;

typedef struct ram_placer_ops {
    const char *name;
    /* START, after a block's idstr and length (mapped-ram: read its header
     * and bitmap, queue the reads).  NULL: nothing.  Errors latched on s. */
    int (*block)(void *impl, ram_state *r, lm_stream *s, ramblock *b);
    /* After the whole block list.  NULL: nothing. */
    int (*blocks_done)(void *impl, ram_state *r, lm_stream *s);
    /* One page record whose block and offset were checked: read its payload
     * from s and place it (flags: ZERO, PAGE or COMPRESS_PAGE, without
     * CONTINUE; `at` is the record's byte offset, for errors).  Every
     * implementation marks what it placed with ram_received().  NULL:
     * ram_place_direct. */
    int (*record)(void *impl, ram_state *r, lm_stream *s, ramblock *b, uint64_t offset,
                  uint64_t flags, uint64_t at);
    /* At every EOS: each page of the section is in place (multifd barrier,
     * decompression done).  NULL: nothing.  Errors latched on s. */
    int (*sync)(void *impl, ram_state *r, lm_stream *s, uint64_t at);
} ram_placer_ops;

typedef struct ram_placer {
    const ram_placer_ops *ops;
    void *impl;
} ram_placer;

/* The default sink and placer: records on the main stream, copied in place. */
static inline ram_sink ram_stream_sink(void) { return (ram_sink){ NULL, NULL }; }
static inline ram_placer ram_direct_placer(void) { return (ram_placer){ NULL, NULL }; }

/* Main-stream record writers for sinks: a ZERO record, a PAGE record whose
 * data is queued by reference, a record header (CONTINUE when the block is
 * the last one named: the idstr otherwise). */
void ram_put_zero(ram_state *r, lm_stream *s, const ramblock *b, uint64_t page);
void ram_put_page(ram_state *r, lm_stream *s, const ramblock *b, uint64_t page);
void ram_put_record(ram_state *r, lm_stream *s, const ramblock *b, uint64_t offset,
                    uint64_t flags);
/*
 * With r->integrity: read the be64 checksum that follows a record's payload
 * and compare it with the page as placed (`page`: its bytes, wherever the
 * placer put them -- guest RAM or a bounce page) or as described (a ZERO
 * record's `fill`).  A mismatch latches an error on s naming the block,
 * the page's offset, `channel` and the record's byte offset `at`, and
 * returns -1: the caller must not count (or, in postcopy, install) the
 * page.  Without integrity: 0 at once, nothing read.
 */
int ram_verify_page(const ram_state *r, lm_stream *s, const ramblock *b, uint64_t offset,
                    const void *page, const char *channel, uint64_t at);
int ram_verify_fill(const ram_state *r, lm_stream *s, const ramblock *b, uint64_t offset,
                    uint8_t fill, const char *channel, uint64_t at);
/* The default placement of one record (see ram_placer_ops.record). */
int ram_place_direct(ram_state *r, lm_stream *s, ramblock *b, uint64_t offset, uint64_t flags,
                     uint64_t at);

int ram_register(ram_state *r, const char *idstr, void *host, uint64_t length,
                 uint64_t page_size, lm_error *err);
int ram_find(const ram_state *r, const char *idstr);

/* ---- source ---- */
/*
 * `arm`: a tracker started with dirty_start_unarmed(), or NULL.  The
 * first pass then arms each RAM_ARM_PAGES chunk just before it queues
 * the chunk's first page: every page of a chunk not reached yet is still set
 * in the all-set bitmap, so it is read after its arm (dirty.h's invariant).
 */
void ram_save_start(ram_state *r, dirty_tracker *arm);
/* 64 MiB, ~1 ms of write-protecting: few enough arms that their TLB
 * flushes (IPIs to the CPUs running the channel threads) stay negligible. */
#define RAM_ARM_PAGES 16384
void ram_save_finish(ram_state *r);       /* frees the bitmaps */
/* START payload incl. EOS */
void ram_save_setup(ram_state *r, const ram_sink *sink, lm_stream *s);
/*
 * Queue dirty pages through `sink` until about `budget` bytes were queued
 * or the walk wrapped.  Returns true when it wrapped (a pass is complete).
 * The caller writes EOS (ram_put_eos) when it closes the section.
 */
bool ram_save_some(ram_state *r, const ram_sink *sink, lm_stream *s, uint64_t budget);
/*
 * Postcopy, a page the destination asked for: sent now through `sink` if
 * its bit is set (cleared then; a clear bit means it was sent since the
 * switch, ahead of us on this stream).  The background walk then goes on
 * just past it (QEMU 10.1's locality hint: guests fault in runs).  True if
 * sent.
 */
bool ram_save_requested(ram_state *r, const ram_sink *sink, lm_stream *s, ramblock *b,
                        uint64_t page);
/* The same without sending (another thread sent it on the preempt channel):
 * the bit cleared if set, the walk moved past it.  True if it was set. */
bool ram_take_requested(ram_state *r, ramblock *b, uint64_t page);
/* A requested page as a record on its own stream (postcopy's preempt
 * channel: bare records, CONTINUE relative to *last, that stream's). */
void ram_put_urgent(const ram_state *r, lm_stream *s, const ramblock **last, const ramblock *b,
                    uint64_t page);
/* End a ram payload: the sink's flush (its barrier), then EOS. */
void ram_put_eos(ram_state *r, const ram_sink *sink, lm_stream *s);
/* Sync every block from the tracker; returns pages newly dirtied or -errno. */
int64_t ram_sync(ram_state *r, dirty_tracker *d, lm_error *err);

/* ---- destination ---- */
/*
 * Design note 11, "complete means complete": a load counts only when the
 * block list named every block once, the END section arrived and every page
 * of every block was received (a source's first pass sends each page, a
 * zero page as a ZERO record; in a mapped-ram file a page the bitmap leaves
 * out is zero by definition, so a block's pages all count once its header
 * is loaded).  Every path that places a page calls ram_received().
 */
void ram_load_start(ram_state *r);
/* Parse one ram section payload (through its EOS), placing every page
 * through `pl`.  Errors are latched on s. */
int ram_load(ram_state *r, const ram_placer *pl, lm_stream *s, int section_type);
/* Page records outside any section (postcopy's preempt channel) up to an
 * EOS, with the stream's own CONTINUE context *last.  0 at EOS, -1 with
 * the error latched on s. */
int ram_load_records(ram_state *r, const ramblock **last, const ram_placer *pl, lm_stream *s);
/* `n` pages from `page` of block b have been placed.  Any thread. */
static inline void ram_received(const ramblock *b, uint64_t page, uint64_t n)
{
    assert(b->rmap && page + n <= b->npages);   /* checked offsets only */
    bitmap_set_range_atomic(b->rmap, page, n);
}
/*
 * After EOF: 0 when everything registered arrived, else -1 with what is
 * missing (every block, with counts and the first missing page) appended to
 * the list why[0..len) (error_list_add).
 */
int ram_load_check(const ram_state *r, char *why, size_t len);
void ram_load_finish(ram_state *r);  /* frees the received bitmaps */

#endif
