/*
 * multifd compression: one streaming context per channel for the whole
 * migration, exactly as QEMU frames it (reference section 4.5):
 *
 *   zlib  one deflate stream per channel, deflateInit once; every page is
 *         deflated with Z_NO_FLUSH and the packet's last page with
 *         Z_SYNC_FLUSH, so each packet ends on a byte boundary and the
 *         receiver can inflate it without the next one.  The zlib header
 *         therefore appears only in the channel's first data packet.
 *   zstd  the same model: ZSTD_e_continue per page, ZSTD_e_flush on the last;
 *         the frame never ends.
 *
 * The receiver inflates exactly one page at a time straight into guest RAM
 * and checks that each page comes out whole, so a corrupt or short payload
 * is an error naming the packet, never a partial page presented as data.
 * Contexts are owned by their channel thread; nothing here is shared.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "multifd/multifd.h"
#include "util/error.h"

struct mf_codec {
    int method;                 /* MF_ZLIB / MF_ZSTD */
    bool compress;
    z_stream z;
    ZSTD_CStream *zc;
    ZSTD_DStream *zd;
};

size_t mf_codec_bound(int method)
{
    size_t raw = MULTIFD_PAGES * RAM_PAGE_SIZE;

    /* Sync-flush markers add a few bytes per packet on top of the bound. */
    if (method == MF_ZLIB)
        return compressBound((uLong)raw) + 64;
    return ZSTD_compressBound(raw) + 64;
}

mf_codec *mf_codec_new(int method, int level, bool compress, lm_error *err)
{
    mf_codec *c = calloc(1, sizeof(*c));
    int ret = 0;

    if (!c)
        abort();
    c->method = method;
    c->compress = compress;
    if (method == MF_ZLIB) {
        ret = compress ? deflateInit(&c->z, level) : inflateInit(&c->z);
        if (ret != Z_OK) {
            error_set(err, -ENOMEM, "zlib: cannot initialise the stream (%d)", ret);
            free(c);
            return NULL;
        }
    } else {
        if (compress) {
            c->zc = ZSTD_createCStream();
            if (c->zc)
                ret = (int)ZSTD_isError(ZSTD_initCStream(c->zc, level));
        } else {
            c->zd = ZSTD_createDStream();
            if (c->zd)
                ret = (int)ZSTD_isError(ZSTD_initDStream(c->zd));
        }
        if ((!c->zc && !c->zd) || ret) {
            error_set(err, -ENOMEM, "zstd: cannot initialise the stream");
            mf_codec_free(c);
            return NULL;
        }
    }
    return c;
}

void mf_codec_free(mf_codec *c)
{
    if (!c)
        return;
    if (c->method == MF_ZLIB)
        c->compress ? deflateEnd(&c->z) : inflateEnd(&c->z);
    ZSTD_freeCStream(c->zc);
    ZSTD_freeDStream(c->zd);
    free(c);
}

int mf_codec_compress(mf_codec *c, const uint8_t *page, bool last, uint8_t *out,
                      size_t cap, size_t *outlen, lm_error *err)
{
    if (c->method == MF_ZLIB) {
        c->z.next_in = (Bytef *)page;
        c->z.avail_in = RAM_PAGE_SIZE;
        c->z.next_out = out;
        c->z.avail_out = (uInt)cap;
        int ret = deflate(&c->z, last ? Z_SYNC_FLUSH : Z_NO_FLUSH);
        if (ret != Z_OK || c->z.avail_in)
            return error_set(err, -EIO, "zlib: deflate failed (%d)", ret);
        *outlen = cap - c->z.avail_out;
        return 0;
    }
    ZSTD_inBuffer in = { page, RAM_PAGE_SIZE, 0 };
    ZSTD_outBuffer o = { out, cap, 0 };
    size_t left;
    do {
        left = ZSTD_compressStream2(c->zc, &o, &in, last ? ZSTD_e_flush : ZSTD_e_continue);
        if (ZSTD_isError(left))
            return error_set(err, -EIO, "zstd: %s", ZSTD_getErrorName(left));
        if (o.pos == o.size && (left || in.pos < in.size))
            return error_set(err, -ENOSPC, "zstd: packet output full");
    } while (in.pos < in.size || (last && left));
    *outlen = o.pos;
    return 0;
}

int mf_codec_decompress(mf_codec *c, const uint8_t *in, size_t len, uint8_t *const *pages,
                        uint32_t n, lm_error *err)
{
    size_t used = 0;

    for (uint32_t i = 0; i < n; i++) {
        if (c->method == MF_ZLIB) {
            c->z.next_in = (Bytef *)in + used;
            c->z.avail_in = (uInt)(len - used);
            c->z.next_out = pages[i];
            c->z.avail_out = RAM_PAGE_SIZE;
            int ret = inflate(&c->z, Z_SYNC_FLUSH);
            if ((ret != Z_OK && ret != Z_STREAM_END && ret != Z_BUF_ERROR) || c->z.avail_out)
                return error_set(err, -EBADMSG, "zlib: page %u of the packet did not "
                                 "inflate to 4096 bytes (%s)", i,
                                 c->z.msg ? c->z.msg : "short or corrupt data");
            used = len - c->z.avail_in;
        } else {
            ZSTD_inBuffer ib = { in, len, used };
            ZSTD_outBuffer ob = { pages[i], RAM_PAGE_SIZE, 0 };
            while (ob.pos < ob.size) {
                size_t r = ZSTD_decompressStream(c->zd, &ob, &ib);
                if (ZSTD_isError(r))
                    return error_set(err, -EBADMSG, "zstd: page %u of the packet: %s", i,
                                     ZSTD_getErrorName(r));
                if (ob.pos < ob.size && ib.pos == ib.size)
                    return error_set(err, -EBADMSG, "zstd: page %u of the packet is short",
                                     i);
            }
            used = ib.pos;
        }
    }
    /* Whatever is left must be flush padding only, never page data. */
    if (c->method == MF_ZLIB && used < len) {
        uint8_t scratch[64];
        c->z.next_in = (Bytef *)in + used;
        c->z.avail_in = (uInt)(len - used);
        c->z.next_out = scratch;
        c->z.avail_out = sizeof(scratch);
        inflate(&c->z, Z_SYNC_FLUSH);
        if (c->z.avail_out != sizeof(scratch) || c->z.avail_in)
            return error_set(err, -EBADMSG, "zlib: %zu bytes after the packet's pages",
                             len - used);
    } else if (c->method == MF_ZSTD && used < len) {
        uint8_t scratch[64];
        ZSTD_inBuffer ib = { in, len, used };
        ZSTD_outBuffer ob = { scratch, sizeof(scratch), 0 };
        size_t r = ZSTD_decompressStream(c->zd, &ob, &ib);
        if (ZSTD_isError(r) || ob.pos || ib.pos != len)
            return error_set(err, -EBADMSG, "zstd: %zu bytes after the packet's pages",
                             len - used);
    }
    return 0;
}
