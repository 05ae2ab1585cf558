/*
 * Postcopy recovery's received-pages bitmap (RECV_BITMAP), both ends; see
 * postcopy.h.  After a broken link neither side knows which pages were in
 * flight: the destination says exactly which it placed, and the source
 * sends again every page it did not.
 *
 * Layout after the return-path message (u8 n, block name), reference 6.3:
 *
 *   be64 size        ROUND_UP(ceil(npages / 8), 8): whole 64-bit words
 *   size bytes       the received map as LITTLE-endian 64-bit words, bit i
 *                    of the stream = page i placed (whatever the host's
 *                    byte order: the words are converted one by one)
 *   be64 end mark    0x0123456789abcdef
 *
 * The source refuses a size other than its own block's, a missing end mark
 * and a bit set past the block's last page (a peer that says it has a page
 * that does not exist is not to be believed about the others).
 */
#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "postcopy/postcopy.h"
#include "savevm/savevm.h"
#include "util/bitmap.h"
#include "util/error.h"

uint64_t postcopy_recv_bitmap_bytes(uint64_t npages)
{
    return (npages + 63) / 64 * 8;
}

uint64_t postcopy_recv_bitmap_trailer_bytes(uint64_t npages)
{
    return 8 + postcopy_recv_bitmap_bytes(npages) + 8;
}

/* The maps are arrays of 64-bit words here, as the wire's. */
_Static_assert(sizeof(unsigned long) == 8, "bitmap words must be 64-bit");

void postcopy_recv_bitmap_encode(const ramblock *b, uint8_t *out)
{
    uint64_t size = postcopy_recv_bitmap_bytes(b->npages), be, le;

    assert(b->rmap);
    be = htobe64(size);
    memcpy(out, &be, 8);
    for (uint64_t w = 0; w < size / 8; w++) {
        /* the tail of the last word is clear: bitmap_new zeroes it and
         * only pages < npages are ever set */
        le = htole64(b->rmap[w]);
        memcpy(out + 8 + w * 8, &le, 8);
    }
    be = htobe64(POSTCOPY_RECV_BITMAP_END);
    memcpy(out + 8 + size, &be, 8);
}

int postcopy_recv_bitmap_apply(ramblock *b, const uint8_t *trailer, uint64_t len,
                               uint64_t *resend, lm_error *err)
{
    uint64_t size = postcopy_recv_bitmap_bytes(b->npages), got, mark, n = 0;

    if (len < 8)
        return error_set(err, -EPROTO, "RECV_BITMAP for '%s': %" PRIu64 " bytes, no size",
                         b->idstr, len);
    got = wire_be64(trailer);
    if (got != size)
        return error_set(err, -EPROTO, "RECV_BITMAP for '%s': a bitmap of %" PRIu64 " bytes, "
                         "this block's is %" PRIu64 " (%" PRIu64 " pages)", b->idstr, got,
                         size, b->npages);
    if (len != 16 + size)
        return error_set(err, -EPROTO, "RECV_BITMAP for '%s': %" PRIu64 " bytes after the "
                         "message, expected %" PRIu64, b->idstr, len, 16 + size);
    mark = wire_be64(trailer + 8 + size);
    if (mark != POSTCOPY_RECV_BITMAP_END)
        return error_set(err, -EPROTO, "RECV_BITMAP for '%s': end mark 0x%016" PRIx64 ", "
                         "expected 0x%016llx", b->idstr, mark,
                         (unsigned long long)POSTCOPY_RECV_BITMAP_END);
    /* Check all before changing anything. */
    if (b->npages % 64) {
        uint64_t last;

        memcpy(&last, trailer + 8 + size - 8, 8);
        if (le64toh(last) >> (b->npages % 64))
            return error_set(err, -EPROTO, "RECV_BITMAP for '%s': pages past the block's "
                             "last (%" PRIu64 ") marked received", b->idstr, b->npages);
    }
    /* To send = not received (the tail past npages was checked clear). */
    for (uint64_t w = 0; w < size / 8; w++) {
        uint64_t le, rest = b->npages - w * 64;

        memcpy(&le, trailer + 8 + w * 8, 8);
        b->bmap[w] = ~le64toh(le) & (rest >= 64 ? ~0ULL : (1ULL << rest) - 1);
        n += (uint64_t)__builtin_popcountll(b->bmap[w]);
    }
    *resend = n;
    return 0;
}

int postcopy_check_resume_ack(const uint8_t *data, uint16_t len, lm_error *err)
{
    uint32_t v;

    if (len != 4)
        return error_set(err, -EPROTO, "RESUME_ACK of %u bytes (4)", len);
    v = wire_be32(data);
    if (v != 1)
        return error_set(err, -EPROTO, "RESUME_ACK with value %" PRIu32 " (1 is the only "
                         "valid one)", v);
    return 0;
}
