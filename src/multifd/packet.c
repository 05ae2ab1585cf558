/*
 * multifd handshake and packet header: encoding and the destination's
 * checks.  Layouts are QEMU's (reference sections 4.1-4.3): the header is
 * always the full 1344 bytes, because a 7.2 receiver reads exactly that.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "multifd/multifd.h"
#include "util/error.h"

static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

void multifd_put_init(uint8_t out[MULTIFD_INIT_SIZE], uint8_t id)
{
    memset(out, 0, MULTIFD_INIT_SIZE);
    put32(out, MULTIFD_MAGIC);
    put32(out + 4, MULTIFD_VERSION);
    /* bytes 8..23: UUID, zero like QEMU started without -uuid */
    out[24] = id;
}

int multifd_check_init(const uint8_t in[MULTIFD_INIT_SIZE], int nchannels, uint8_t *id,
                       lm_error *err)
{
    static const uint8_t zero_uuid[16];
    uint32_t magic = get32(in), version = get32(in + 4);

    if (magic != MULTIFD_MAGIC)
        return error_set(err, -EPROTO, "multifd handshake: bad magic 0x%08x (expected "
                         "0x%08x)", magic, MULTIFD_MAGIC);
    if (version != MULTIFD_VERSION)
        return error_set(err, -EPROTO, "multifd handshake: unsupported version %u", version);
    if (memcmp(in + 8, zero_uuid, 16))
        return error_set(err, -EPROTO, "multifd handshake: UUID does not match this "
                         "destination's (all zeros)");
    /* QEMU checks id > channels, which lets id == channels index past its
     * array; the right check is id < channels. */
    if (in[24] >= nchannels)
        return error_set(err, -EPROTO, "multifd handshake: channel id %u out of range "
                         "(%d channels)", in[24], nchannels);
    *id = in[24];
    return 0;
}

void multifd_put_header(uint8_t out[MULTIFD_HDR_SIZE], const mf_header *h)
{
    uint32_t i;

    memset(out, 0, MULTIFD_HDR_SIZE);
    put32(out, MULTIFD_MAGIC);
    put32(out + 4, MULTIFD_VERSION);
    put32(out + 8, h->flags);
    put32(out + 12, h->pages_alloc);
    put32(out + 16, h->normal);
    put32(out + 20, h->next_size);
    put64(out + 24, h->packet_num);
    put32(out + 32, h->zero);
    if (h->normal + h->zero)
        memcpy(out + 64, h->idstr, strnlen(h->idstr, 255));
    for (i = 0; i < h->normal + h->zero && i < MULTIFD_PAGES; i++)
        put64(out + 320 + 8 * i, h->offsets[i]);
}

int multifd_get_header(const uint8_t in[MULTIFD_HDR_SIZE], mf_header *h,
                       const ram_state *ram, uint32_t comp_flags, const ramblock **block,
                       lm_error *err)
{
    uint32_t magic = get32(in), version = get32(in + 4), n;
    int b;

    *block = NULL;
    if (magic != MULTIFD_MAGIC)
        return error_set(err, -EPROTO, "bad packet magic 0x%08x", magic);
    if (version != MULTIFD_VERSION)
        return error_set(err, -EPROTO, "unsupported packet version %u", version);
    h->flags = get32(in + 8);
    h->pages_alloc = get32(in + 12);
    h->normal = get32(in + 16);
    h->next_size = get32(in + 20);
    h->packet_num = get64(in + 24);
    h->zero = get32(in + 32);
    if ((h->flags & MULTIFD_FLAG_COMP_MASK) != comp_flags)
        return error_set(err, -EPROTO, "packet compression flags 0x%x, this side expects "
                         "0x%x (multifd-compression must match on both sides)",
                         h->flags & MULTIFD_FLAG_COMP_MASK, comp_flags);
    if ((h->flags & MULTIFD_FLAG_INTEGRITY) != (ram->integrity ? MULTIFD_FLAG_INTEGRITY : 0))
        return error_set(err, -EPROTO, "packet %s page checksums (flag 0x%x) but this side "
                         "has x-integrity %s", h->flags & MULTIFD_FLAG_INTEGRITY ? "has" :
                         "lacks", MULTIFD_FLAG_INTEGRITY, ram->integrity ? "on" : "off");
    if (h->flags & ~(uint32_t)(MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMP_MASK |
                               MULTIFD_FLAG_INTEGRITY))
        return error_set(err, -EPROTO, "unknown packet flags 0x%x", h->flags);
    if (h->pages_alloc > MULTIFD_PAGES || h->normal > MULTIFD_PAGES ||
        h->zero > MULTIFD_PAGES - h->normal)
        return error_set(err, -EPROTO, "packet page counts out of range (alloc %u, normal "
                         "%u, zero %u; at most %d)", h->pages_alloc, h->normal, h->zero,
                         MULTIFD_PAGES);
    n = h->normal + h->zero;
    if (n == 0)
        return 0;      /* no payload whatever next_packet_size says (7.2 quirk) */
    memcpy(h->idstr, in + 64, 255);
    h->idstr[255] = 0;  /* never trust the sender's NUL */
    b = ram_find(ram, h->idstr);
    if (b < 0)
        return error_set(err, -ENOENT, "packet for unknown RAM block '%s'", h->idstr);
    *block = &ram->blocks[b];
    for (uint32_t i = 0; i < n; i++) {
        h->offsets[i] = get64(in + 320 + 8 * i);
        if ((h->offsets[i] & (RAM_PAGE_SIZE - 1)) ||
            h->offsets[i] > (*block)->length - RAM_PAGE_SIZE)
            return error_set(err, -ERANGE, "packet offset 0x%" PRIx64 " outside RAM block "
                             "'%s' (length 0x%" PRIx64 ")", h->offsets[i], h->idstr,
                             (*block)->length);
    }
    return 0;
}
