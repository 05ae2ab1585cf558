/*
 * End-to-end integrity (capability `x-integrity`, livemig's own): a
 * 64-bit checksum for every guest page that travels, computed by the
 * sender from the very bytes it sends and checked by the library on
 * arrival, before the page counts as received.
 *
 * What a checksum covers.  A page's checksum binds its content to where
 * it belongs:
 *
 *     content = XXH3_64bits(page's 4096 bytes)
 *     seed    = XXH3_64bits(block idstr) XOR offset_in_block
 *     sum     = XXH3_64bits_withSeed(&content_le64, 8, seed)
 *
 * so a page with a flipped bit, a page placed at another offset or in
 * another block all fail.  A page told as zero (a ZERO record, a multifd
 * zero-list entry) has the checksum of the page it describes: `content` is
 * then a constant (integrity_fill_content), and no 4 KiB are hashed.
 * XXH3 is not a MAC: it catches corruption (a flipped bit, a torn write, a
 * bad disk), not an attacker, who can recompute it -- TLS is the answer to
 * that.
 *
 * Where the sums travel (docs/format.md section 9): after each page
 * record's payload on the main stream and the preempt channel, as a
 * per-packet array after a multifd packet's payload, and in a per-block
 * table in a mapped-ram file (plus a sum over that block's bitmap).  This
 * module only computes; the transports place and check.
 *
 * Threads: pure functions, any thread.
 */
#ifndef INTEGRITY_INTEGRITY_H
#define INTEGRITY_INTEGRITY_H

#include <stddef.h>
#include <stdint.h>

#define INTEGRITY_CAP "x-integrity"
#define INTEGRITY_PAGE_SIZE 4096

/* The per-block part of the seed (computed once per block). */
uint64_t integrity_block_seed(const char *idstr);
/* The content hash of one 4096-byte page. */
uint64_t integrity_content(const void *page);
/* The content hash of a page filled with `fill` (0: a constant). */
uint64_t integrity_fill_content(uint8_t fill);
/* The checksum of a page whose content hash is `content`, at `offset` of
 * the block whose seed is `block_seed`. */
uint64_t integrity_sum(uint64_t block_seed, uint64_t offset, uint64_t content);
/* Shorthands: the checksum of a page's bytes / of a fill page. */
static inline uint64_t integrity_page(uint64_t block_seed, uint64_t offset, const void *page)
{
    return integrity_sum(block_seed, offset, integrity_content(page));
}
static inline uint64_t integrity_fill(uint64_t block_seed, uint64_t offset, uint8_t fill)
{
    return integrity_sum(block_seed, offset, integrity_fill_content(fill));
}
/* A hash of any buffer (mapped-ram's bitmap and checksum table). */
uint64_t integrity_buf(const void *buf, size_t len, uint64_t seed);
/* Which XXH3 build hashes pages here: "avx2" or "libxxhash". */
const char *integrity_impl(void);
/* XXH3_64bits_withSeed built for AVX2 (xxh3_avx2.c); only where the CPU
 * has it.  Exposed for the test that compares it with libxxhash. */
uint64_t integrity_xxh3_avx2(const void *p, size_t len, uint64_t seed);

#endif
