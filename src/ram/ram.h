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
 * clearing each bit as it queues the page, and reports when the walk wraps
 * (one full pass).  Zero pages become ZERO records (vectorised check); others
 * are queued by reference (zero-copy) on the stream.
 *
 * Destination (the incoming thread): ram_load() parses one section's payload,
 * checking every name, length and offset before it touches memory, and reads
 * each page straight into its place.  It never writes outside a block.
 */
#ifndef LM_RAM_RAM_H
#define LM_RAM_RAM_H

#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "stream/stream.h"
#include "dirty/dirty.h"
#include "util/bitmap.h"

#define LM_PAGE_SIZE 4096ULL
#define LM_PAGE_MASK (~(LM_PAGE_SIZE - 1))

/* Record flags in the low bits of the be64 header word (QEMU's values). */
enum {
    LM_RAM_ZERO = 0x002,
    LM_RAM_MEM_SIZE = 0x004,
    LM_RAM_PAGE = 0x008,
    LM_RAM_EOS = 0x010,
    LM_RAM_CONTINUE = 0x020,
    LM_RAM_XBZRLE = 0x040,
    LM_RAM_HOOK = 0x080,
    LM_RAM_COMPRESS_PAGE = 0x100,
    LM_RAM_MULTIFD_FLUSH = 0x200,
};

#define LM_RAM_SECTION_VERSION 4
#define LM_RAM_MAX_BLOCKS 64

struct lm_multifd_send;
struct lm_mapped_ram;
struct lm_compress;
struct lm_decompress;
struct lm_multifd_recv;

typedef struct lm_ramblock {
    char idstr[256];
    uint8_t *host;
    uint64_t length;
    uint64_t npages;
    unsigned long *bmap;        /* source: pages still to send */
    uint64_t arm_next;          /* source: first page whose tracking is not armed */
    /* mapped-ram: absolute file offsets and the pages present in the file */
    uint64_t mr_bitmap_offset, mr_pages_offset;
    unsigned long *file_bmap;
    /* destination: pages that arrived in this load (set with atomic ORs:
     * multifd channel threads set theirs concurrently), and whether the
     * block list named the block */
    unsigned long *rmap;
    bool listed;
} lm_ramblock;

typedef struct lm_ram {
    lm_ramblock blocks[LM_RAM_MAX_BLOCKS];
    int nblocks;
    uint64_t total;             /* sum of block lengths */

    /* source save state */
    int cur_block;
    uint64_t cur_page;
    const lm_ramblock *last_sent;   /* for CONTINUE */
    uint64_t dirty;             /* bits set in all bitmaps */
    uint64_t zero_pages, normal_pages;
    uint64_t offstream_bytes;   /* page bytes routed to multifd / mapped-ram */
    uint64_t mf_queued_pages;   /* pages handed to multifd */
    lm_dirty *arm;              /* the tracker, started unarmed; NULL: all armed */
    /* multifd (set by the migration thread around a migration): pages go to
     * the channels; zd says who checks for zero pages (lm_zero_detect). */
    struct lm_multifd_send *mfs;
    int zd;
    /* mapped-ram (both directions): pages go to / come from fixed file offsets */
    struct lm_mapped_ram *mapped;
    /* `compress` capability: the source's compression pool, the
     * destination's decompression pool (QEMU 7.2 COMPRESS_PAGE records) */
    struct lm_compress *comp;
    struct lm_decompress *decomp;
    lm_stream *comp_stream;     /* where emitted pages go (the save's stream) */

    /* destination load state */
    const lm_ramblock *last_recv;
    bool seen_block_list;
    bool load_ended;            /* the END section's EOS was read */
    struct lm_multifd_recv *mfr;    /* every EOS is a sync barrier when set */
} lm_ram;

int ram_register(lm_ram *r, const char *idstr, void *host, uint64_t length,
                 uint64_t page_size, lm_error *err);
int ram_find(const lm_ram *r, const char *idstr);

/* ---- source ---- */
/*
 * `arm`: a tracker started with lm_dirty_start_unarmed(), or NULL.  The
 * first pass then arms each LM_RAM_ARM_PAGES chunk just before it queues
 * the chunk's first page: every page of a chunk not reached yet is still set
 * in the all-set bitmap, so it is read after its arm (dirty.h's invariant).
 */
void ram_save_start(lm_ram *r, lm_dirty *arm);
/* 64 MiB, ~1 ms of write-protecting: few enough arms that their TLB
 * flushes (IPIs to the CPUs running the channel threads) stay negligible. */
#define LM_RAM_ARM_PAGES 16384
void ram_save_finish(lm_ram *r);          /* frees the bitmaps */
void ram_save_setup(lm_ram *r, lm_stream *s); /* START payload incl. EOS */
/*
 * Queue dirty pages until about `budget` bytes were queued or the walk
 * wrapped.  Returns true when it wrapped (a pass is complete).  The caller
 * writes EOS (ram_put_eos) when it closes the section.
 */
bool ram_save_some(lm_ram *r, lm_stream *s, uint64_t budget);
/* End a ram payload: with multifd, first SYNC every channel (per-section
 * sync, QEMU 7.2 placement), then EOS. */
void ram_put_eos(lm_ram *r, lm_stream *s);
/* Sync every block from the tracker; returns pages newly dirtied or -errno. */
int64_t ram_sync(lm_ram *r, lm_dirty *d, lm_error *err);

/* ---- destination ---- */
/*
 * Design note 11, "complete means complete": a load counts only when the
 * block list named every block once, the END section arrived and every page
 * of every block was received (a source's first pass sends each page, a
 * zero page as a ZERO record; in a mapped-ram file a page the bitmap leaves
 * out is zero by definition, so a block's pages all count once its header
 * is loaded).  Every path that places a page calls ram_received().
 */
void ram_load_start(lm_ram *r);
/* Parse one ram section payload (through its EOS).  Errors are latched on s. */
int ram_load(lm_ram *r, lm_stream *s, int section_type);
/* `n` pages from `page` of block b have been placed.  Any thread. */
static inline void ram_received(const lm_ramblock *b, uint64_t page, uint64_t n)
{
    lm_bitmap_set_range_atomic(b->rmap, page, n);
}
/*
 * After EOF: 0 when everything registered arrived, else -1 with what is
 * missing (every block, with counts and the first missing page) in `why`.
 */
int ram_load_check(const lm_ram *r, char *why, size_t len);
void ram_load_finish(lm_ram *r);     /* frees the received bitmaps */

#endif
