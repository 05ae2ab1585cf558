/*
 * The multifd codecs' decompression (mf_codec_decompress), zlib and zstd,
 * on one channel's codec across several packets as the receiver does.
 * Input: byte 0 picks the method (bit 0: zlib or zstd); then packets, each
 * a byte of pages (1 + value % MAX_PAGES: a packet has 1..128 normal
 * pages), a be32 length (taken modulo what is left) and that many
 * compressed bytes, copied to a buffer of their own so that a read past
 * the packet is an ASan report.
 * A failed packet ends the channel, as in the receiver.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "multifd/multifd.h"
#include "ram/ram.h"

#define MAX_PAGES MULTIFD_PAGES

static uint8_t page_mem[MAX_PAGES][RAM_PAGE_SIZE];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *pages[MAX_PAGES];
    lm_error err = { 0 };
    mf_codec *c;
    uint32_t n;
    size_t off = 1;

    if (size < 1)
        return 0;
    for (int i = 0; i < MAX_PAGES; i++)
        pages[i] = page_mem[i];
    c = mf_codec_new(data[0] & 1 ? MF_ZSTD : MF_ZLIB, 1, false, &err);
    if (!c)
        abort();
    while (size - off >= 5) {
        n = 1 + (uint32_t)data[off++] % MAX_PAGES;
        uint32_t len = (uint32_t)data[off] << 24 | (uint32_t)data[off + 1] << 16 |
                       (uint32_t)data[off + 2] << 8 | data[off + 3];
        off += 4;
        len = (uint32_t)(len % (size - off + 1));
        uint8_t *pkt = malloc(len ? len : 1);
        if (!pkt)
            abort();
        memcpy(pkt, data + off, len);
        int ret = mf_codec_decompress(c, pkt, len, pages, n, &err);
        free(pkt);
        off += len;
        if (ret)
            break;
    }
    mf_codec_free(c);
    return 0;
}
