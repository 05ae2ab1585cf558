/*
 * POSTCOPY_ADVISE and POSTCOPY_RAM_DISCARD on the destination; see
 * postcopy.h.  Parse everything, check everything, then apply: a command
 * that is wrong anywhere changes nothing.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/mman.h>

#include "postcopy/postcopy.h"
#include "savevm/savevm.h"
#include "util/bitmap.h"
#include "util/error.h"

int postcopy_check_advise(const uint8_t *data, uint16_t len, lm_error *err)
{
    uint64_t summary, target;

    if (len == 0)
        return 0;           /* dirty-bitmaps postcopy only: nothing to compare */
    if (len != 16)
        return error_set(err, -EINVAL, "POSTCOPY_ADVISE: %u bytes (0 or 16)", len);
    summary = wire_be64(data);
    target = wire_be64(data + 8);
    if (target != RAM_PAGE_SIZE)
        return error_set(err, -EINVAL, "POSTCOPY_ADVISE: the source's target page size is %"
                         PRIu64 ", this side's %llu", target, RAM_PAGE_SIZE);
    if (summary != RAM_PAGE_SIZE)
        return error_set(err, -EINVAL, "POSTCOPY_ADVISE: the source's RAM uses page sizes 0x%"
                         PRIx64 ", this side only %llu (no huge pages)", summary,
                         RAM_PAGE_SIZE);
    return 0;
}

static int discard(ramblock *b, uint64_t start, uint64_t length, lm_error *err)
{
    if (madvise(b->host + start, length, MADV_DONTNEED) < 0)
        return error_set_errno(err, -errno, "postcopy: discarding [0x%" PRIx64 ", +0x%" PRIx64
                               ") of RAM block '%s'", start, length, b->idstr);
    if (b->rmap)
        bitmap_clear_range(b->rmap, start / RAM_PAGE_SIZE, length / RAM_PAGE_SIZE);
    return 0;
}

int postcopy_discard_all(ram_state *r, lm_error *err)
{
    for (int i = 0; i < r->nblocks; i++) {
        int ret = discard(&r->blocks[i], 0, r->blocks[i].length, err);
        if (ret)
            return ret;
    }
    return 0;
}

int postcopy_parse_discard(ram_state *r, const uint8_t *data, uint16_t len,
                           postcopy_range *ranges, int *n, lm_error *err)
{
    char name[256];
    uint16_t namelen, at, left;
    int bi;

    *n = 0;
    if (len < 4)
        return error_set(err, -EINVAL, "POSTCOPY_RAM_DISCARD: %u bytes is too short", len);
    if (data[0] != 0)
        return error_set(err, -EINVAL, "POSTCOPY_RAM_DISCARD: version %u (only 0)", data[0]);
    namelen = data[1];
    if (namelen == 0 || 2u + namelen + 1u > len)
        return error_set(err, -EINVAL, "POSTCOPY_RAM_DISCARD: block name of %u bytes in a "
                         "%u-byte command", namelen, len);
    memcpy(name, data + 2, namelen);
    name[namelen] = 0;
    if (memchr(name, 0, namelen) || data[2 + namelen] != 0)
        return error_set(err, -EINVAL, "POSTCOPY_RAM_DISCARD: block name not followed by its "
                         "0 byte (or holding one)");
    bi = ram_find(r, name);
    if (bi < 0)
        return error_set(err, -ENOENT, "POSTCOPY_RAM_DISCARD: unknown RAM block '%s'", name);
    at = (uint16_t)(2 + namelen + 1);
    left = (uint16_t)(len - at);
    if (left == 0 || left % 16 || left / 16 > POSTCOPY_DISCARD_MAX_RANGES)
        return error_set(err, -EINVAL, "POSTCOPY_RAM_DISCARD: %u bytes of ranges for '%s' "
                         "(1 to %d ranges of 16 bytes)", left, name,
                         POSTCOPY_DISCARD_MAX_RANGES);
    for (int k = 0; k < left / 16; k++) {
        ramblock *b = &r->blocks[bi];
        uint64_t start = wire_be64(data + at + 16 * k), length = wire_be64(data + at + 16 * k + 8);

        if ((start | length) & (RAM_PAGE_SIZE - 1) || length == 0 || start >= b->length ||
            length > b->length - start)
            return error_set(err, -EINVAL, "POSTCOPY_RAM_DISCARD: range %d [0x%" PRIx64 ", +0x%"
                             PRIx64 ") is not whole pages inside RAM block '%s' (0x%" PRIx64
                             " bytes)", k, start, length, name, b->length);
        ranges[k] = (postcopy_range){ b, start, length };
    }
    *n = left / 16;
    return 0;
}

int postcopy_apply_discard(const postcopy_range *ranges, int n, lm_error *err)
{
    for (int k = 0; k < n; k++) {
        int ret = discard(ranges[k].block, ranges[k].start, ranges[k].length, err);
        if (ret)
            return ret;
    }
    return 0;
}

/* ---------------------------------------------------------------- source */

/* One RAM_DISCARD command: ranges[0..n) of block b, in bytes. */
static void put_discard(lm_stream *s, const ramblock *b, const uint64_t (*ranges)[2], int n)
{
    uint8_t buf[3 + 255 + 16 * POSTCOPY_DISCARD_MAX_RANGES];
    size_t namelen = strlen(b->idstr), at = 0;

    buf[at++] = 0;                      /* version */
    buf[at++] = (uint8_t)namelen;
    memcpy(buf + at, b->idstr, namelen);
    at += namelen;
    buf[at++] = 0;
    for (int k = 0; k < n; k++) {
        uint64_t v[2] = { htobe64(ranges[k][0]), htobe64(ranges[k][1]) };
        memcpy(buf + at, v, 16);
        at += 16;
    }
    savevm_put_command(s, WIRE_CMD_POSTCOPY_RAM_DISCARD, (uint16_t)at, buf);
}

uint64_t postcopy_put_discards(const ram_state *r, lm_stream *s)
{
    uint64_t ranges[POSTCOPY_DISCARD_MAX_RANGES][2], pages = 0;

    for (int i = 0; i < r->nblocks; i++) {
        const ramblock *b = &r->blocks[i];
        int n = 0;

        for (uint64_t p = bitmap_next_set(b->bmap, b->npages, 0); p < b->npages;) {
            uint64_t end = bitmap_next_clear(b->bmap, b->npages, p);

            ranges[n][0] = p * RAM_PAGE_SIZE;
            ranges[n][1] = (end - p) * RAM_PAGE_SIZE;
            pages += end - p;
            if (++n == POSTCOPY_DISCARD_MAX_RANGES) {
                put_discard(s, b, ranges, n);
                n = 0;
            }
            p = end < b->npages ? bitmap_next_set(b->bmap, b->npages, end) : end;
        }
        if (n)
            put_discard(s, b, ranges, n);
    }
    return pages;
}
