/*
 * Postcopy: the destination runs the guest before all of its RAM arrived
 * and pulls what is missing.  This module holds postcopy's commands as the
 * destination applies them; src/uffd/ holds the memory side (MISSING-mode
 * registration, the atomic placer, the fault thread); src/migration/ drives
 * both (precopy.c the source, postcopy_in.c the destination).
 *
 * What is here, destination: the two commands that make destination RAM
 * "missing" again, parsed as a hostile peer could send them (wire layouts in
 * ../shared/reference/qemu-migration-format.md section 6.1):
 *
 *   POSTCOPY_ADVISE      0 or 16 bytes: be64 summary of the source's page
 *                        sizes, be64 its target page size.  Both must be
 *                        this side's (4096: no huge pages here).  Applying
 *                        it discards ALL of RAM (MADV_DONTNEED): pages built
 *                        locally must not survive, and a page that is to
 *                        fault later must not be present.
 *   POSTCOPY_RAM_DISCARD u8 version (0), u8 n, block name (n bytes), u8 0,
 *                        then 1..12 ranges of be64 start, be64 length in
 *                        BYTES, each page aligned and inside the block:
 *                        pages sent during precopy and dirtied since.  Each
 *                        range is dropped and its received bits cleared, so
 *                        the page faults (or comes again in the background).
 *
 * Threads: the loading thread (commands arrive in stream order), before the
 * guest runs and before any fault thread starts; the received bitmaps are
 * cleared with plain stores for that reason.
 */
#ifndef POSTCOPY_POSTCOPY_H
#define POSTCOPY_POSTCOPY_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "ram/ram.h"

#define POSTCOPY_DISCARD_MAX_RANGES 12

/* ADVISE's payload (len 0 or 16) checked against this side; 0 or -EINVAL. */
int postcopy_check_advise(const uint8_t *data, uint16_t len, lm_error *err);
/* Drop every page of every block (ADVISE applied).  0 or -errno. */
int postcopy_discard_all(ram_state *r, lm_error *err);

/* One range of a RAM_DISCARD command, checked: page aligned, in the block. */
typedef struct postcopy_range {
    ramblock *block;
    uint64_t start, length;     /* bytes */
} postcopy_range;

/*
 * Parse a RAM_DISCARD payload.  Fills ranges[0..*n) (at most
 * POSTCOPY_DISCARD_MAX_RANGES); 0, or -EINVAL with what was wrong (and the
 * range's index) in err.  Nothing is applied unless all of it is valid.
 */
int postcopy_parse_discard(ram_state *r, const uint8_t *data, uint16_t len,
                           postcopy_range *ranges, int *n, lm_error *err);
/* Drop the ranges' pages and clear their received bits.  0 or -errno. */
int postcopy_apply_discard(const postcopy_range *ranges, int n, lm_error *err);

/* ---------------------------------------------------------------- source */

/*
 * At the switch, guest stopped, bitmaps synced a last time: one
 * RAM_DISCARD command per run of up to 12 ranges of pages still dirty in
 * each block's bmap (sent and written since, or never sent: either way the
 * destination must not keep what it has there).  Returns the pages named.
 */
uint64_t postcopy_put_discards(const ram_state *r, lm_stream *s);

/*
 * The queue of pages the destination asked for (REQ_PAGES_ID names a block
 * and a page; REQ_PAGES a page of the same block), filled by the
 * return-path reader thread (rp_reader_ops.message) and emptied by the
 * migration thread, which sends them before the background pass.  Each
 * request must be exactly one page inside its block; at most
 * POSTCOPY_MAX_QUEUED wait at once (a destination asks once per missing
 * page it faults on, so more means a broken or hostile peer).
 */
#define POSTCOPY_MAX_QUEUED (1u << 20)

typedef struct postcopy_requests postcopy_requests;

typedef struct postcopy_request {
    ramblock *block;
    uint64_t page;
} postcopy_request;

postcopy_requests *postcopy_requests_new(ram_state *r);
void postcopy_requests_free(postcopy_requests *pr);
/* Reader thread: one REQ_PAGES_ID / REQ_PAGES payload, queued and (out,
 * when not NULL) returned.  0, or a negative errno with err filled (the
 * reader then fails the migration). */
int postcopy_requests_add(postcopy_requests *pr, uint16_t type, const uint8_t *data,
                          uint16_t len, postcopy_request *out, lm_error *err);
/* Migration thread: the oldest request, without waiting; false if none. */
bool postcopy_requests_pop(postcopy_requests *pr, postcopy_request *rq);
uint64_t postcopy_requests_total(postcopy_requests *pr);   /* ever queued */

/* ---------------------------------------------------------------- recovery */

/*
 * RECV_BITMAP (recvbitmap.c): after a broken link the destination sends,
 * for each block the source names, which pages it placed; the source then
 * sends exactly the others.  The trailer follows the return-path message
 * (u8 n, name): be64 size, size bytes of little-endian 64-bit words, be64
 * POSTCOPY_RECV_BITMAP_END.  Destination: encode from the block's rmap
 * while no placer runs (recovery holds them).  Source: apply on the
 * return-path reader's thread while the migration thread waits for it.
 */
#define POSTCOPY_RECV_BITMAP_END 0x0123456789abcdefULL

uint64_t postcopy_recv_bitmap_bytes(uint64_t npages);          /* the size field */
uint64_t postcopy_recv_bitmap_trailer_bytes(uint64_t npages);  /* 16 + that */
/* Destination: the whole trailer into out (trailer_bytes of it). */
void postcopy_recv_bitmap_encode(const ramblock *b, uint8_t *out);
/* Source: check a trailer of len bytes (size, end mark, no page past the
 * block's end) and, only if it is right, make b->bmap "not received";
 * *resend = pages to send again.  0, or -EPROTO with err filled. */
int postcopy_recv_bitmap_apply(ramblock *b, const uint8_t *trailer, uint64_t len,
                               uint64_t *resend, lm_error *err);
/* RESUME_ACK's payload: be32 1, nothing else.  0 or -EPROTO. */
int postcopy_check_resume_ack(const uint8_t *data, uint16_t len, lm_error *err);

#endif
