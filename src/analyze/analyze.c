/*
 * The stream analyzer: a distrustful parser of migration files.
 *
 * Order of work:
 *
 *   1. The VMDESCRIPTION is found first, from the end of the file, the way
 *      QEMU's analyze-migration.py does it: in the last 10 MiB take the last
 *      NUL byte, then the first '{' after it; the byte five places before
 *      the '{' must be 0x06 and the four between hold the be32 JSON length.
 *      (A length byte can itself be '{', so the next few '{' are tried
 *      too.)  Device sections have no length on the wire; the JSON lists the
 *      bytes each field took, which is what lets us skip them.
 *   2. The stream is then parsed from byte 0 with the library's reader
 *      (lm_stream over the file descriptor): header, configuration, then
 *      records until EOF.  The "ram" section is parsed record by record;
 *      every other section is skipped by its VMDESCRIPTION entry (fields,
 *      arrays, nested structs, subsections) and must end exactly at its
 *      footer.  After EOF the VMDESCRIPTION must start at the next byte.
 *   3. mapped-ram (the "mapped-ram" capability in the configuration): each
 *      block in the block list is followed by a 28-byte header; the bitmap
 *      is read with pread at its offset and the main stream continues at
 *      pages_offset + block size, where the reader is re-created
 *      (an_seek), because lm_stream only reads forward.
 *
 * Distrust.  Every length, count, offset and name is checked against the
 * file size and the format before it is used; names must be printable
 * ASCII (QEMU's always are, and they end up in file names and JSON).  The
 * first error stops the parse; it names the section being parsed and the
 * byte offset of the bad item.  Allocations that the file controls are
 * bounded (AN_MAX_*), so garbage cannot make us allocate without limit.
 *
 * Extraction.  Each block's image is created (sparse, exactly its size) when
 * the block list is read; page records are written at their offsets as
 * they come, so a later record for a page overwrites an earlier one, as on
 * a destination.  A ZERO record for a page not written before needs no
 * write (the hole reads as zero).  XBZRLE deltas apply to the image's
 * current page, which is why images are opened read-write.
 *
 * Threads and state: everything lives in one an_ctx on the caller's stack;
 * nothing is global.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <zlib.h>

#include "integrity/integrity.h"
#include "livemig/analyze.h"
#include "ram/ram.h"
#include "savevm/wire.h"
#include "stream/stream.h"
#include "util/bitmap.h"
#include "util/error.h"

#define AN_VMDESC_SCAN (10u << 20)      /* tail searched for the VMDESCRIPTION */
#define AN_MAX_BLOCKS 4096
#define AN_MAX_RAM (1ULL << 42)         /* 4 TiB: bitmaps stay <= 128 MiB */
#define AN_MAX_DEPTH 64                 /* VMDESCRIPTION nesting */
#define AN_MAX_ITEMS (1u << 24)         /* sections, commands */
#define AN_MAX_ARRAY (1u << 24)         /* VMDESCRIPTION array_len */
#define AN_MAX_CAPS 256
#define AN_MR_HEADER_SIZE 28
#define AN_MR_VERSION 1
#define AN_EXTRACT_CHUNK (1u << 20)
#define AN_CBUF_SIZE (65536u + 65536u)  /* >= compressBound(64 KiB), >= 65535 */

_Static_assert(sizeof(unsigned long) == 8, "mapped-ram bitmaps are read as 64-bit words");

typedef struct an_block_state {
    unsigned long *present;     /* pages with content so far */
    int out_fd;                 /* extraction image, or -1 */
} an_block_state;

/* A sender's section id, bound at START/FULL to the section that opened it. */
typedef struct an_bind {
    uint32_t id;
    size_t section;             /* index into a->sections */
    bool ended;                 /* a FULL or END section closed it */
} an_bind;

typedef struct an_ctx {
    lm_analysis *a;
    int fd;
    lm_stream *s;               /* NULL only after a failed an_seek */
    json_t *vmdesc;             /* root object, or NULL */
    int dirfd;                  /* extraction directory, or -1 */
    an_block_state *bs;         /* parallel to a->blocks */
    size_t blocks_cap, bs_cap, sections_cap, commands_cap, binds_cap;
    an_bind *binds;
    size_t nbinds;
    uint8_t *page;              /* one page of scratch */
    uint8_t *cbuf;              /* AN_CBUF_SIZE: compressed data, commands */
    uint64_t ps;                /* target page size */
    bool ram_started, ram_listed, ram_ended;
    long last_block;            /* CONTINUE target, -1 before any */
    bool postcopy_ram;          /* POSTCOPY_ADVISE with sizes was seen */
    uint64_t pagesize_summary;
    bool ignore_shared;         /* x-ignore-shared: blocks carry mr_addr */
    bool integrity;             /* x-integrity: page records carry checksums */
    char where[LM_AN_NAME_MAX + 96];   /* what is being parsed, for errors */
} an_ctx;

/* ------------------------------------------------------------ errors */

/* Record the first error: "<where>: <what> at byte offset N".  Returns -1. */
static int __attribute__((format(printf, 4, 5)))
an_fail(an_ctx *c, int code, uint64_t off, const char *fmt, ...)
{
    char msg[LM_ERROR_MAX];
    va_list ap;

    if (c->a->error.code)
        return -1;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (c->where[0])
        error_set(&c->a->error, code, "%s: %s at byte offset %llu", c->where, msg,
                  (unsigned long long)off);
    else
        error_set(&c->a->error, code, "%s at byte offset %llu", msg, (unsigned long long)off);
    return -1;
}

/* The stream latched an error (its message names the offset). */
static int an_stream_fail(an_ctx *c)
{
    if (c->a->error.code)
        return -1;
    if (c->where[0])
        error_set(&c->a->error, lm_stream_error(c->s), "%s: %s", c->where,
                  lm_stream_error_msg(c->s));
    else
        error_set(&c->a->error, lm_stream_error(c->s), "%s", lm_stream_error_msg(c->s));
    return -1;
}

/* ------------------------------------------------------------ reading */

static uint64_t an_pos(an_ctx *c)
{
    return lm_stream_offset(c->s);
}

static int rd_u8(an_ctx *c, uint8_t *v)
{
    return lm_get_u8(c->s, v) ? an_stream_fail(c) : 0;
}

static int rd_be16(an_ctx *c, uint16_t *v)
{
    return lm_get_be16(c->s, v) ? an_stream_fail(c) : 0;
}

static int rd_be32(an_ctx *c, uint32_t *v)
{
    return lm_get_be32(c->s, v) ? an_stream_fail(c) : 0;
}

static int rd_be64(an_ctx *c, uint64_t *v)
{
    return lm_get_be64(c->s, v) ? an_stream_fail(c) : 0;
}

static int rd_buf(an_ctx *c, void *buf, size_t len)
{
    return lm_get_buffer(c->s, buf, len) ? an_stream_fail(c) : 0;
}

/* Skip n bytes, refusing at once to skip past the end of the file. */
static int rd_skip(an_ctx *c, uint64_t n, const char *what)
{
    uint64_t off = an_pos(c);

    if (n > c->a->file_size || off > c->a->file_size - n)
        return an_fail(c, -EPIPE, off, "%s needs %llu bytes but the file is truncated "
                       "(it ends at byte offset %llu)", what, (unsigned long long)n,
                       (unsigned long long)c->a->file_size);
    while (n > 0) {
        size_t k = n > AN_CBUF_SIZE ? AN_CBUF_SIZE : (size_t)n;
        if (rd_buf(c, c->cbuf, k))
            return -1;
        n -= k;
    }
    return 0;
}

/* The n bytes of a counted string read at `off` must be printable ASCII
 * (names become file names, and a NUL would cut one short); else the name
 * is emptied and the parse fails. */
static int an_check_name(an_ctx *c, char *name, unsigned n, uint64_t off, const char *what)
{
    for (unsigned i = 0; i < n; i++) {
        uint8_t b = (uint8_t)name[i];
        if (b < 0x20 || b > 0x7e) {
            name[0] = 0;
            return an_fail(c, -EINVAL, off, "%s contains byte 0x%02x, which is not printable "
                           "ASCII", what, b);
        }
    }
    return 0;
}

/* A counted string that must be printable ASCII. */
static int rd_name(an_ctx *c, char name[LM_AN_NAME_MAX], const char *what)
{
    uint64_t off = an_pos(c);
    uint8_t n;

    name[0] = 0;
    if (rd_u8(c, &n) || rd_buf(c, name, n))
        return -1;
    name[n] = 0;
    return an_check_name(c, name, n, off, what);
}

/* Continue reading at absolute offset `off` (lm_stream only reads forward). */
static int an_seek(an_ctx *c, uint64_t off)
{
    uint64_t here = an_pos(c);

    if (off > c->a->file_size)
        return an_fail(c, -EPIPE, here, "the stream continues at byte offset %llu, past the end "
                       "of the file (%llu bytes)", (unsigned long long)off,
                       (unsigned long long)c->a->file_size);
    if (lseek(c->fd, (off_t)off, SEEK_SET) < 0)
        return an_fail(c, -errno, here, "cannot seek to byte offset %llu: %s",
                       (unsigned long long)off, strerror(errno));
    stream_free(c->s);
    c->s = stream_new_reader(c->fd, false);
    /* The reader counts from where it starts; make its offsets, and so its
     * error messages, absolute file offsets again. */
    c->s->pos = off;
    return 0;
}

static int an_pread(an_ctx *c, void *buf, size_t len, uint64_t off, uint64_t err_off,
                    const char *what)
{
    size_t done = 0;

    while (done < len) {
        ssize_t r = pread(c->fd, (uint8_t *)buf + done, len - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return an_fail(c, -errno, err_off, "cannot read %s at byte offset %llu: %s", what,
                           (unsigned long long)(off + done), strerror(errno));
        if (r == 0)
            return an_fail(c, -EPIPE, err_off, "%s is truncated: the file ends at byte offset "
                           "%llu", what, (unsigned long long)(off + done));
        done += (size_t)r;
    }
    return 0;
}

/* ------------------------------------------------------------ growing arrays */

/* Make room for one more element; aborts on OOM like the rest of the library
 * (the counts are bounded by AN_MAX_ITEMS, so only a real OOM gets here). */
static void *an_grow(void *arr, size_t n, size_t *cap, size_t elem)
{
    if (n < *cap)
        return arr;
    size_t ncap = *cap ? *cap * 2 : 16;
    void *p = realloc(arr, ncap * elem);
    if (!p)
        abort();
    memset((uint8_t *)p + *cap * elem, 0, (ncap - *cap) * elem);
    *cap = ncap;
    return p;
}

/* ------------------------------------------------------------ VMDESCRIPTION */

static bool an_pow2_page(json_int_t v)
{
    return v >= 512 && v <= 65536 && (v & (v - 1)) == 0;
}

/* Step 1 of the file comment.  No VMDESCRIPTION is not an error (yet). */
static int an_vmdesc_load(an_ctx *c)
{
    lm_analysis *a = c->a;
    size_t n = a->file_size < AN_VMDESC_SCAN ? (size_t)a->file_size : AN_VMDESC_SCAN;
    uint64_t base = a->file_size - n;
    uint8_t *buf;
    size_t nul, b = 0;
    uint32_t len = 0;
    bool found = false;
    json_error_t jerr;
    json_t *root = NULL, *ps;
    int ret = 0;

    if (n < 7)
        return 0;
    buf = malloc(n);
    if (!buf)
        return an_fail(c, -ENOMEM, base, "cannot allocate %zu bytes to search for the "
                       "VMDESCRIPTION", n);
    if (an_pread(c, buf, n, base, base, "the end of the file")) {
        ret = -1;
        goto out;
    }
    for (nul = n; nul > 0 && buf[nul - 1] != 0; nul--)
        ;
    if (nul == 0)
        goto out;
    /* nul is the index just past the last NUL; try up to 5 '{' after it. */
    for (size_t from = nul, tries = 0; tries < 5 && from < n; tries++) {
        uint8_t *p = memchr(buf + from, '{', n - from);
        if (!p)
            break;
        b = (size_t)(p - buf);
        if (b >= 5 && buf[b - 5] == WIRE_VM_VMDESCRIPTION) {
            len = (uint32_t)buf[b - 4] << 24 | (uint32_t)buf[b - 3] << 16 |
                  (uint32_t)buf[b - 2] << 8 | buf[b - 1];
            if (len > 0 && len <= n - b) {
                found = true;
                break;
            }
        }
        from = b + 1;
    }
    if (!found)
        goto out;
    a->vmdesc_offset = base + b - 5;
    a->vmdesc_len = len;
    root = json_loadb((const char *)buf + b, len, 0, &jerr);
    if (!root || !json_is_object(root)) {
        ret = an_fail(c, -EINVAL, a->vmdesc_offset, "the VMDESCRIPTION (%u bytes of JSON) is "
                      "not a JSON object: %s", len, root ? "not an object" : jerr.text);
        goto out;
    }
    ps = json_object_get(root, "page_size");
    if (ps) {
        if (!json_is_integer(ps) || !an_pow2_page(json_integer_value(ps))) {
            ret = an_fail(c, -EINVAL, a->vmdesc_offset, "VMDESCRIPTION page_size is not a "
                          "power of two between 512 and 65536");
            goto out;
        }
        c->ps = (uint64_t)json_integer_value(ps);
    }
    if (json_object_get(root, "devices") && !json_is_array(json_object_get(root, "devices"))) {
        ret = an_fail(c, -EINVAL, a->vmdesc_offset, "VMDESCRIPTION 'devices' is not an array");
        goto out;
    }
    a->has_vmdesc = true;
    c->vmdesc = root;
    root = NULL;
out:
    json_decref(root);
    free(buf);
    return ret;
}

/* The VMDESCRIPTION entry of device (idstr, instance), or NULL. */
static json_t *an_vmdesc_device(an_ctx *c, const char *idstr, uint32_t instance)
{
    json_t *devs = c->vmdesc ? json_object_get(c->vmdesc, "devices") : NULL;
    size_t i;
    json_t *d;

    json_array_foreach(devs, i, d) {
        json_t *name = json_object_get(d, "name"), *inst = json_object_get(d, "instance_id");
        if (json_is_string(name) && json_is_integer(inst) &&
            !strcmp(json_string_value(name), idstr) && json_integer_value(inst) == instance)
            return d;
    }
    return NULL;
}

/*
 * Skip the VMState data described by `desc` (a device entry, a nested
 * "struct" or a subsection): its fields in order, each `size` bytes, times
 * array_len for compressed arrays; nested structs are walked so that their
 * subsections are accounted for, and must add up to their listed size; then
 * the subsections that were sent, each 0x05, counted name, be32 version,
 * data.
 */
static int an_skip_vmsd(an_ctx *c, json_t *desc, const char *dev, int depth)
{
    json_t *fields = json_object_get(desc, "fields");
    json_t *subs = json_object_get(desc, "subsections");
    json_t *f;
    size_t i;

    if (depth > AN_MAX_DEPTH)
        return an_fail(c, -EINVAL, an_pos(c), "the VMDESCRIPTION of '%s' nests deeper than %d "
                       "levels", dev, AN_MAX_DEPTH);
    if ((fields && !json_is_array(fields)) || (subs && !json_is_array(subs)))
        return an_fail(c, -EINVAL, an_pos(c), "the VMDESCRIPTION of '%s' has 'fields' or "
                       "'subsections' that are not arrays", dev);
    json_array_foreach(fields, i, f) {
        json_t *jname = json_object_get(f, "name"), *jsize = json_object_get(f, "size");
        json_t *jlen = json_object_get(f, "array_len"), *st = json_object_get(f, "struct");
        const char *name = json_is_string(jname) ? json_string_value(jname) : "?";
        json_int_t size, count = 1;

        if (!json_is_integer(jsize) || json_integer_value(jsize) < 0)
            return an_fail(c, -EINVAL, an_pos(c), "VMDESCRIPTION field '%s' of '%s' has no "
                           "valid size", name, dev);
        size = json_integer_value(jsize);
        if (jlen) {
            if (!json_is_integer(jlen) || json_integer_value(jlen) < 1 ||
                json_integer_value(jlen) > AN_MAX_ARRAY)
                return an_fail(c, -EINVAL, an_pos(c), "VMDESCRIPTION field '%s' of '%s' has an "
                               "invalid array_len", name, dev);
            count = json_integer_value(jlen);
        }
        if (st && !json_is_object(st))
            return an_fail(c, -EINVAL, an_pos(c), "VMDESCRIPTION field '%s' of '%s' has a "
                           "'struct' that is not an object", name, dev);
        for (json_int_t k = 0; k < count; k++) {
            uint64_t start = an_pos(c);
            if (!st) {
                if (rd_skip(c, (uint64_t)size, "a device field"))
                    return -1;
                continue;
            }
            if (an_skip_vmsd(c, st, dev, depth + 1))
                return -1;
            if (an_pos(c) - start != (uint64_t)size)
                return an_fail(c, -EINVAL, start, "struct field '%s' of '%s' took %llu bytes "
                               "but the VMDESCRIPTION says %lld", name, dev,
                               (unsigned long long)(an_pos(c) - start), (long long)size);
        }
    }
    json_array_foreach(subs, i, f) {
        json_t *jname = json_object_get(f, "vmsd_name");
        const char *want = json_is_string(jname) ? json_string_value(jname) : NULL;
        char name[LM_AN_NAME_MAX];
        uint64_t off = an_pos(c);
        uint32_t version;
        uint8_t mark;

        if (rd_u8(c, &mark))
            return -1;
        if (mark != WIRE_VM_SUBSECTION)
            return an_fail(c, -EINVAL, off, "expected subsection '%s' of '%s' (byte 0x05), "
                           "found 0x%02x", want ? want : "?", dev, mark);
        if (rd_name(c, name, "a subsection name") || rd_be32(c, &version))
            return -1;
        if (want && strcmp(name, want))
            return an_fail(c, -EINVAL, off, "subsection '%s' where the VMDESCRIPTION of '%s' "
                           "lists '%s'", name, dev, want);
        if (an_skip_vmsd(c, f, dev, depth + 1))
            return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ configuration */

static int an_parse_capabilities(an_ctx *c)
{
    lm_analysis *a = c->a;
    uint64_t off = an_pos(c);
    uint32_t count;

    if (rd_be32(c, &count))
        return -1;
    if (count > AN_MAX_CAPS)
        return an_fail(c, -EINVAL, off, "%u capabilities listed (at most %d)", count, AN_MAX_CAPS);
    a->capabilities = calloc(count ? count : 1, sizeof(*a->capabilities));
    if (!a->capabilities)
        abort();
    for (uint32_t i = 0; i < count; i++) {
        if (rd_name(c, a->capabilities[i], "a capability name"))
            return -1;
        a->ncapabilities++;
        if (!strcmp(a->capabilities[i], "mapped-ram"))
            a->mapped_ram = true;
        else if (!strcmp(a->capabilities[i], "x-ignore-shared"))
            c->ignore_shared = true;
        else if (!strcmp(a->capabilities[i], INTEGRITY_CAP))
            c->integrity = true;
    }
    return 0;
}

static int an_parse_config(an_ctx *c)
{
    lm_analysis *a = c->a;
    uint64_t off = an_pos(c);
    uint32_t len;
    uint8_t type;
    size_t cap = 0;

    snprintf(c->where, sizeof(c->where), "configuration section at byte offset %llu",
             (unsigned long long)off);
    a->config_offset = off;
    if (rd_u8(c, &type) || rd_be32(c, &len))
        return -1;
    if (len == 0 || len >= LM_AN_NAME_MAX)
        return an_fail(c, -EINVAL, off + 1, "machine name length %u (expected 1..255)", len);
    if (rd_buf(c, a->machine, len))
        return -1;
    a->machine[len] = 0;
    for (uint32_t i = 0; i < len; i++)
        if ((uint8_t)a->machine[i] < 0x20 || (uint8_t)a->machine[i] > 0x7e) {
            a->machine[0] = 0;
            return an_fail(c, -EINVAL, off + 5 + i, "machine name is not printable ASCII");
        }
    a->has_config = true;

    while (stream_peek_u8(c->s) == WIRE_VM_SUBSECTION) {
        lm_an_subsection *sub;
        uint64_t soff = an_pos(c);
        uint8_t mark;

        a->config_subsections = an_grow(a->config_subsections, a->nconfig_subsections, &cap,
                                        sizeof(*sub));
        sub = &a->config_subsections[a->nconfig_subsections];
        sub->start = soff;
        if (rd_u8(c, &mark) || rd_name(c, sub->name, "a subsection name") ||
            rd_be32(c, &sub->version))
            return -1;
        a->nconfig_subsections++;
        if (strncmp(sub->name, "configuration/", 14))
            return an_fail(c, -EINVAL, soff, "subsection '%s' does not belong to the "
                           "configuration", sub->name);
        if (!strcmp(sub->name, "configuration/capabilities")) {
            if (a->capabilities)
                return an_fail(c, -EINVAL, soff, "a second capabilities subsection");
            if (an_parse_capabilities(c))
                return -1;
        } else if (!strcmp(sub->name, "configuration/target-page-bits")) {
            uint32_t bits;
            uint64_t boff = an_pos(c);
            if (rd_be32(c, &bits))
                return -1;
            if (bits < 9 || bits > 16 || (a->has_vmdesc && (1ULL << bits) != c->ps))
                return an_fail(c, -EINVAL, boff, "target page bits %u (page size %llu) disagree "
                               "with the page size %llu", bits,
                               bits < 64 ? 1ULL << bits : 0ULL, (unsigned long long)c->ps);
            c->ps = 1ULL << bits;
        } else if (!strcmp(sub->name, "configuration/uuid")) {
            if (rd_skip(c, 16, "the configuration UUID"))
                return -1;
        } else {
            /* 10.0 describes the configuration too: skip what we do not know. */
            json_t *conf = c->vmdesc ? json_object_get(c->vmdesc, "configuration") : NULL;
            json_t *subs = json_object_get(conf, "subsections"), *d, *found = NULL;
            size_t i;
            json_array_foreach(subs, i, d) {
                json_t *n = json_object_get(d, "vmsd_name");
                if (json_is_string(n) && !strcmp(json_string_value(n), sub->name))
                    found = d;
            }
            if (!found)
                return an_fail(c, -ENOTSUP, soff, "unknown configuration subsection '%s' (and "
                               "no VMDESCRIPTION entry for it)", sub->name);
            if (an_skip_vmsd(c, found, sub->name, 1))
                return -1;
        }
        a->config_subsections[a->nconfig_subsections - 1].end = an_pos(c);
    }
    if (lm_stream_error(c->s))
        return an_stream_fail(c);
    c->where[0] = 0;
    return 0;
}

/* ------------------------------------------------------------ RAM */

static int an_block_find(an_ctx *c, const char *idstr)
{
    for (size_t i = 0; i < c->a->nblocks; i++)
        if (!strcmp(c->a->blocks[i].idstr, idstr))
            return (int)i;
    return -1;
}

static int an_write(an_ctx *c, lm_an_block *b, int fd, const void *buf, size_t len,
                    uint64_t off, uint64_t err_off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t w = pwrite(fd, (const uint8_t *)buf + done, len - done, (off_t)(off + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return an_fail(c, w < 0 ? -errno : -EIO, err_off, "cannot write the image of "
                           "block '%s' (%s): %s", b->idstr, b->file_name,
                           w < 0 ? strerror(errno) : "short write");
        done += (size_t)w;
    }
    return 0;
}

/* Create the sparse image of block bi, exactly its size. */
static int an_extract_open(an_ctx *c, size_t bi, uint64_t err_off)
{
    lm_an_block *b = &c->a->blocks[bi];
    int fd;

    if (!strcmp(b->file_name, ".") || !strcmp(b->file_name, ".."))
        return an_fail(c, -EINVAL, err_off, "RAM block '%s' cannot be extracted: its name is "
                       "not a usable file name", b->idstr);
    for (size_t i = 0; i < bi; i++)
        if (!strcmp(c->a->blocks[i].file_name, b->file_name))
            return an_fail(c, -EEXIST, err_off, "RAM blocks '%s' and '%s' would both be "
                           "extracted to '%s'", c->a->blocks[i].idstr, b->idstr, b->file_name);
    /* O_NOFOLLOW: a block name must not let a planted symlink redirect us. */
    fd = openat(c->dirfd, b->file_name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
                0644);
    if (fd < 0)
        return an_fail(c, -errno, err_off, "cannot create the image '%s' of block '%s': %s",
                       b->file_name, b->idstr, strerror(errno));
    c->bs[bi].out_fd = fd;
    if (ftruncate(fd, (off_t)b->size) < 0)
        return an_fail(c, -errno, err_off, "cannot size the image '%s' to %llu bytes: %s",
                       b->file_name, (unsigned long long)b->size, strerror(errno));
    return 0;
}

/*
 * mapped-ram: the 28-byte header that follows the block in the list, its
 * bitmap, and (extracting) its pages.  Layout invariant checked here:
 * header < bitmap < pages, each region inside the file, so regions of
 * different blocks cannot overlap either (the next block starts after
 * this one's pages).
 */
static int an_mapped_block(an_ctx *c, size_t bi)
{
    lm_analysis *a = c->a;
    lm_an_block *b = &a->blocks[bi];
    an_block_state *st = &c->bs[bi];
    uint64_t hoff = an_pos(c), npages = b->counts.pages, words = BITMAP_WORDS(npages);
    uint64_t bm_size = words * 8, fsize = a->file_size;
    uint64_t page_size;
    uint32_t version;
    uint8_t *chunk = NULL;
    int ret = -1;

    b->mapped_ram = true;
    b->header_offset = hoff;
    if (rd_be32(c, &version) || rd_be64(c, &page_size) || rd_be64(c, &b->bitmap_offset) ||
        rd_be64(c, &b->pages_offset))
        return -1;
    if (version == 0 || version > AN_MR_VERSION)
        return an_fail(c, -EINVAL, hoff, "block '%s': mapped-ram header version %u (only %d "
                       "exists)", b->idstr, version, AN_MR_VERSION);
    if (page_size != c->ps)
        return an_fail(c, -EINVAL, hoff + 4, "block '%s': mapped-ram page size %llu, the "
                       "stream's is %llu", b->idstr, (unsigned long long)page_size,
                       (unsigned long long)c->ps);
    if (b->bitmap_offset < hoff + AN_MR_HEADER_SIZE || b->bitmap_offset > fsize ||
        bm_size > fsize - b->bitmap_offset)
        return an_fail(c, -EINVAL, hoff + 12, "block '%s': bitmap [%llu, %llu) is not between "
                       "its header and the end of the file (%llu bytes)", b->idstr,
                       (unsigned long long)b->bitmap_offset,
                       (unsigned long long)(b->bitmap_offset + bm_size),
                       (unsigned long long)fsize);
    if (b->pages_offset % c->ps)
        return an_fail(c, -EINVAL, hoff + 20, "block '%s': pages offset %llu is not page "
                       "aligned", b->idstr, (unsigned long long)b->pages_offset);
    if (b->pages_offset < b->bitmap_offset + bm_size)
        return an_fail(c, -EINVAL, hoff + 20, "block '%s': pages at %llu overlap its bitmap "
                       "[%llu, %llu)", b->idstr, (unsigned long long)b->pages_offset,
                       (unsigned long long)b->bitmap_offset,
                       (unsigned long long)(b->bitmap_offset + bm_size));
    if (b->pages_offset > fsize || b->size > fsize - b->pages_offset)
        return an_fail(c, -EPIPE, hoff + 20, "block '%s': pages [%llu, %llu) extend past the "
                       "end of the file (%llu bytes): truncated", b->idstr,
                       (unsigned long long)b->pages_offset,
                       (unsigned long long)(b->pages_offset + b->size),
                       (unsigned long long)fsize);

    /* Little-endian 64-bit words (x86-64's unsigned long, reference 5.2). */
    if (an_pread(c, st->present, bm_size, b->bitmap_offset, hoff + 12, "the bitmap"))
        return -1;
    for (uint64_t w = 0; w < words; w++)
        st->present[w] = le64toh(st->present[w]);
    if (npages % 64)   /* keep the tail clear, as bitmap requires */
        st->present[words - 1] &= (1UL << (npages % 64)) - 1;
    b->counts.pages_present = bitmap_count(st->present, npages);
    b->counts.normal_pages = b->counts.pages_present;

    if (st->out_fd >= 0) {
        uint64_t max_pages = AN_EXTRACT_CHUNK / c->ps;
        chunk = malloc(AN_EXTRACT_CHUNK);
        if (!chunk)
            abort();
        for (uint64_t i = bitmap_next_set(st->present, npages, 0); i < npages;) {
            uint64_t end = bitmap_next_clear(st->present, npages, i);
            if (end - i > max_pages)
                end = i + max_pages;
            size_t len = (size_t)((end - i) * c->ps);
            if (an_pread(c, chunk, len, b->pages_offset + i * c->ps, hoff + 20, "page data") ||
                an_write(c, b, st->out_fd, chunk, len, i * c->ps, b->pages_offset + i * c->ps))
                goto out;
            i = bitmap_next_set(st->present, npages, end);
        }
    }
    /* The main stream resumes right after the block's pages. */
    ret = an_seek(c, b->pages_offset + b->size);
out:
    free(chunk);
    return ret;
}

/* The MEM_SIZE record's block list (reference 3.2). */
static int an_block_list(an_ctx *c, uint64_t total, uint64_t roff)
{
    lm_analysis *a = c->a;
    uint64_t sum = 0;

    if (c->ram_listed)
        return an_fail(c, -EINVAL, roff, "a second MEM_SIZE record");
    a->ram_total = total;
    if (total == 0 || total > AN_MAX_RAM)
        return an_fail(c, -EINVAL, roff, "MEM_SIZE total %llu bytes (expected 1 byte to 4 TiB)",
                       (unsigned long long)total);
    while (sum < total) {
        uint64_t boff = an_pos(c), len;
        lm_an_block *b;
        char idstr[LM_AN_NAME_MAX];

        if (rd_name(c, idstr, "a RAM block name") || rd_be64(c, &len))
            return -1;
        if (!idstr[0])
            return an_fail(c, -EINVAL, boff, "empty RAM block name");
        if (an_block_find(c, idstr) >= 0)
            return an_fail(c, -EINVAL, boff, "RAM block '%s' listed twice", idstr);
        if (a->nblocks >= AN_MAX_BLOCKS)
            return an_fail(c, -EINVAL, boff, "more than %d RAM blocks", AN_MAX_BLOCKS);
        if (len == 0 || len % c->ps)
            return an_fail(c, -EINVAL, boff, "RAM block '%s' has length %llu, not a positive "
                           "multiple of the page size %llu", idstr, (unsigned long long)len,
                           (unsigned long long)c->ps);
        if (len > total - sum)
            return an_fail(c, -EINVAL, boff, "RAM block lengths add up to more than the "
                           "MEM_SIZE total %llu", (unsigned long long)total);
        a->blocks = an_grow(a->blocks, a->nblocks, &c->blocks_cap, sizeof(*a->blocks));
        c->bs = an_grow(c->bs, a->nblocks, &c->bs_cap, sizeof(*c->bs));
        b = &a->blocks[a->nblocks];
        memset(b, 0, sizeof(*b));
        c->bs[a->nblocks].out_fd = -1;
        c->bs[a->nblocks].present = NULL;
        snprintf(b->idstr, sizeof(b->idstr), "%s", idstr);
        snprintf(b->file_name, sizeof(b->file_name), "%s", idstr);
        for (char *p = b->file_name; *p; p++)
            if (*p == '/')
                *p = '_';
        b->size = len;
        b->counts.pages = len / c->ps;
        a->nblocks++;
        c->bs[a->nblocks - 1].present = bitmap_new(b->counts.pages);

        if (c->postcopy_ram) {
            /* The sender adds a be64 page size only for blocks whose page size
             * differs from the host's, which the file does not say; the
             * summary tells us whether any block is such. */
            if (c->pagesize_summary != c->ps)
                return an_fail(c, -ENOTSUP, boff, "postcopy stream with huge-page RAM blocks "
                               "(page size summary 0x%llx): which blocks carry a page size "
                               "cannot be told from the file",
                               (unsigned long long)c->pagesize_summary);
        }
        if (c->ignore_shared) {
            if (rd_be64(c, &b->mr_addr))
                return -1;
            b->has_mr_addr = true;
        }
        if (c->dirfd >= 0 && an_extract_open(c, a->nblocks - 1, boff))
            return -1;
        if (a->mapped_ram && an_mapped_block(c, a->nblocks - 1))
            return -1;
        sum += len;
    }
    c->ram_listed = true;
    return 0;
}

/* Decode one XBZRLE delta (reference 7.1) onto `page`. */
static int an_xbzrle_apply(an_ctx *c, uint8_t *page, const uint8_t *d, size_t len,
                           uint64_t off)
{
    size_t i = 0, pos = 0;

    while (i < len) {
        uint32_t run[2];
        for (int k = 0; k < 2; k++) {
            if (i >= len)
                return an_fail(c, -EINVAL, off + i, "XBZRLE data ends inside a run pair");
            run[k] = d[i] & 0x7f;
            if (d[i++] & 0x80) {
                if (i >= len || (d[i] & 0x80))
                    return an_fail(c, -EINVAL, off + i, "bad XBZRLE run length encoding");
                run[k] |= (uint32_t)d[i++] << 7;
            }
        }
        if (run[0] == 0 && pos != 0)
            return an_fail(c, -EINVAL, off + i, "XBZRLE unchanged run of length 0 after the "
                           "first");
        if (run[1] == 0)
            return an_fail(c, -EINVAL, off + i, "XBZRLE changed run of length 0");
        if (run[0] > c->ps - pos || run[1] > c->ps - pos - run[0] || run[1] > len - i)
            return an_fail(c, -EINVAL, off + i, "XBZRLE runs go past the page or the data");
        pos += run[0];
        memcpy(page + pos, d + i, run[1]);
        pos += run[1];
        i += run[1];
    }
    return 0;
}

/* A page's new content is c->page: count it and write it to the image. */
static int an_put_page(an_ctx *c, size_t bi, uint64_t idx, uint64_t err_off)
{
    lm_an_block *b = &c->a->blocks[bi];
    an_block_state *st = &c->bs[bi];

    if (!bitmap_test(st->present, idx)) {
        bitmap_set(st->present, idx);
        b->counts.pages_present++;
    }
    if (st->out_fd < 0)
        return 0;
    return an_write(c, b, st->out_fd, c->page, c->ps, idx * c->ps, err_off);
}

static int an_put_fill(an_ctx *c, size_t bi, uint64_t idx, uint8_t fill, uint64_t err_off)
{
    an_block_state *st = &c->bs[bi];

    /* Zeroes over a page nothing wrote yet: the hole already reads as zero. */
    if (fill == 0 && (st->out_fd < 0 || !bitmap_test(st->present, idx))) {
        if (!bitmap_test(st->present, idx)) {
            bitmap_set(st->present, idx);
            c->a->blocks[bi].counts.pages_present++;
        }
        return 0;
    }
    memset(c->page, fill, c->ps);
    return an_put_page(c, bi, idx, err_off);
}

/* The current content of a page, for XBZRLE: from the image, else zero. */
static int an_get_page(an_ctx *c, size_t bi, uint64_t idx, uint64_t err_off)
{
    an_block_state *st = &c->bs[bi];
    size_t done = 0;

    memset(c->page, 0, c->ps);
    if (st->out_fd < 0 || !bitmap_test(st->present, idx))
        return 0;
    while (done < c->ps) {
        ssize_t r = pread(st->out_fd, c->page + done, c->ps - done,
                          (off_t)(idx * c->ps + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return an_fail(c, r < 0 ? -errno : -EIO, err_off, "cannot read back the image of "
                           "block '%s': %s", c->a->blocks[bi].idstr,
                           r < 0 ? strerror(errno) : "short read");
        done += (size_t)r;
    }
    return 0;
}

/* x-integrity: the be64 checksum after a ZERO or PAGE payload, checked
 * against the page's content hash (src/integrity/integrity.h). */
static int an_check_sum(an_ctx *c, const char *idstr, uint64_t addr, uint64_t content)
{
    uint64_t off = an_pos(c), got;

    if (!c->integrity)
        return 0;
    if (c->ps != INTEGRITY_PAGE_SIZE)
        return an_fail(c, -EINVAL, off, "x-integrity with %llu-byte pages (only 4096)",
                       (unsigned long long)c->ps);
    if (rd_be64(c, &got))
        return -1;
    if (got != integrity_sum(integrity_block_seed(idstr), addr, content))
        return an_fail(c, -EBADMSG, off, "page 0x%llx of block '%s' does not match its "
                       "checksum", (unsigned long long)addr, idstr);
    return 0;
}

static int an_page_record(an_ctx *c, uint64_t word, uint64_t roff)
{
    lm_analysis *a = c->a;
    uint64_t flags = word & (c->ps - 1), addr = word & ~(c->ps - 1);
    uint64_t kind = flags & ~(uint64_t)RAM_CONTINUE, idx, doff;
    lm_an_block *b;
    size_t bi;

    if (a->mapped_ram)
        return an_fail(c, -EINVAL, roff, "page record (flags 0x%llx) in a mapped-ram stream, "
                       "whose pages live at fixed offsets", (unsigned long long)flags);
    if (!c->ram_listed)
        return an_fail(c, -EINVAL, roff, "page record before the RAM block list");
    if (flags & RAM_CONTINUE) {
        if (c->last_block < 0)
            return an_fail(c, -EINVAL, roff, "CONTINUE record with no previous block");
    } else {
        char idstr[LM_AN_NAME_MAX];
        uint64_t noff = an_pos(c);
        int i;
        if (rd_name(c, idstr, "a RAM block name"))
            return -1;
        i = an_block_find(c, idstr);
        if (i < 0)
            return an_fail(c, -EINVAL, noff, "unknown RAM block '%s'", idstr);
        c->last_block = i;
    }
    bi = (size_t)c->last_block;
    b = &a->blocks[bi];
    if (addr >= b->size)
        return an_fail(c, -EINVAL, roff, "page offset 0x%llx is outside block '%s' (%llu bytes)",
                       (unsigned long long)addr, b->idstr, (unsigned long long)b->size);
    idx = addr / c->ps;
    doff = an_pos(c);

    if (kind == RAM_ZERO) {
        uint8_t fill;
        if (rd_u8(c, &fill) ||
            an_check_sum(c, b->idstr, addr, integrity_fill_content(fill)))
            return -1;
        b->counts.zero_pages++;
        return an_put_fill(c, bi, idx, fill, doff);
    }
    if (kind == RAM_PAGE) {
        if (rd_buf(c, c->page, c->ps) ||
            (c->integrity && an_check_sum(c, b->idstr, addr, integrity_content(c->page))))
            return -1;
        b->counts.normal_pages++;
        return an_put_page(c, bi, idx, doff);
    }
    if (kind == RAM_COMPRESS_PAGE) {
        uint32_t len;
        uLongf out = (uLongf)c->ps;
        int zr;
        if (rd_be32(c, &len))
            return -1;
        if (len == 0 || len > compressBound((uLong)c->ps))
            return an_fail(c, -EINVAL, doff, "compressed page of %u bytes (at most %lu for a "
                           "page)", len, (unsigned long)compressBound((uLong)c->ps));
        if (rd_buf(c, c->cbuf, len))
            return -1;
        zr = uncompress(c->page, &out, c->cbuf, len);
        if (zr != Z_OK || out != c->ps)
            return an_fail(c, -EINVAL, doff + 4, "compressed page does not inflate to exactly "
                           "one page (zlib: %s, %lu bytes)", zr == Z_OK ? "ok" : zError(zr),
                           (unsigned long)out);
        b->counts.compressed_pages++;
        return an_put_page(c, bi, idx, doff);
    }
    if (kind == RAM_XBZRLE) {
        uint8_t enc;
        uint16_t len;
        if (rd_u8(c, &enc) || rd_be16(c, &len))
            return -1;
        if (enc != 1)
            return an_fail(c, -EINVAL, doff, "XBZRLE encoding %u (only 1 exists)", enc);
        if (len > c->ps)
            return an_fail(c, -EINVAL, doff + 1, "XBZRLE data of %u bytes, longer than a page",
                           len);
        if (rd_buf(c, c->cbuf, len) || an_get_page(c, bi, idx, doff) ||
            an_xbzrle_apply(c, c->page, c->cbuf, len, doff + 3))
            return -1;
        b->counts.xbzrle_pages++;
        return an_put_page(c, bi, idx, doff);
    }
    if (kind & RAM_HOOK)
        return an_fail(c, -ENOTSUP, roff, "RDMA hook record (flags 0x%llx) is not supported",
                       (unsigned long long)flags);
    return an_fail(c, -EINVAL, roff, "unsupported ram record flags 0x%llx",
                   (unsigned long long)flags);
}

/* One START / PART / END payload of the "ram" section, up to its EOS. */
static int an_parse_ram(an_ctx *c, uint8_t type)
{
    for (;;) {
        uint64_t roff = an_pos(c), word, flags;

        if (rd_be64(c, &word))
            return -1;
        flags = word & (c->ps - 1);
        if (flags & RAM_EOS) {
            if (flags != RAM_EOS)
                return an_fail(c, -EINVAL, roff, "EOS record with other flags (0x%llx)",
                               (unsigned long long)flags);
            return 0;
        }
        if (flags == RAM_MEM_SIZE) {
            if (type != LM_SECTION_START)
                return an_fail(c, -EINVAL, roff, "MEM_SIZE record outside the START section");
            if (an_block_list(c, word & ~(c->ps - 1), roff))
                return -1;
            continue;
        }
        if (flags == RAM_MULTIFD_FLUSH) {
            c->a->multifd_flushes++;
            continue;
        }
        if (an_page_record(c, word, roff))
            return -1;
        c->a->page_records++;
    }
}

/* ------------------------------------------------------------ sections */

static int an_parse_section(an_ctx *c, uint8_t type, uint64_t off)
{
    lm_analysis *a = c->a;
    lm_an_section sec;
    wire_section hdr;
    wire_footer f;
    an_bind *bind = NULL;

    memset(&sec, 0, sizeof(sec));
    sec.type = type;
    sec.start = off;
    snprintf(c->where, sizeof(c->where), "%s section header at byte offset %llu",
             lm_an_section_type_name(type), (unsigned long long)off);
    if (wire_get_section_header(c->s, type, off, &hdr) != WIRE_OK)
        return an_stream_fail(c);
    sec.section_id = hdr.id;
    for (size_t i = 0; i < c->nbinds; i++)
        if (c->binds[i].id == sec.section_id)
            bind = &c->binds[i];
    if (type == LM_SECTION_START || type == LM_SECTION_FULL) {
        if (an_check_name(c, hdr.idstr, hdr.idstr_len, hdr.idstr_at, "a section name"))
            return -1;
        _Static_assert(sizeof(sec.idstr) == sizeof(hdr.idstr), "one name size");
        memcpy(sec.idstr, hdr.idstr, sizeof(sec.idstr));
        sec.instance_id = hdr.instance;
        sec.version_id = hdr.version;
        if (bind) {
            const lm_an_section *was = &a->sections[bind->section];
            if (strcmp(was->idstr, sec.idstr) || was->instance_id != sec.instance_id)
                return an_fail(c, -EINVAL, off, "section id %u reused for '%s' instance %u (the "
                               "section at byte offset %llu bound it to '%s' instance %u)",
                               sec.section_id, sec.idstr, sec.instance_id,
                               (unsigned long long)was->start, was->idstr, was->instance_id);
        } else {
            c->binds = an_grow(c->binds, c->nbinds, &c->binds_cap, sizeof(*c->binds));
            bind = &c->binds[c->nbinds++];
            bind->id = sec.section_id;
            bind->ended = false;
        }
        bind->section = a->nsections;
    } else {
        const lm_an_section *was;
        if (!bind)
            return an_fail(c, -EINVAL, off, "%s section for id %u, which no START section "
                           "opened", lm_an_section_type_name(type), sec.section_id);
        was = &a->sections[bind->section];
        if (was->type == LM_SECTION_FULL)
            return an_fail(c, -EINVAL, off, "%s section for id %u, which a FULL section used",
                           lm_an_section_type_name(type), sec.section_id);
        memcpy(sec.idstr, was->idstr, sizeof(sec.idstr));
        sec.instance_id = was->instance_id;
        sec.version_id = was->version_id;
    }
    snprintf(c->where, sizeof(c->where), "section '%s' (%s, id %u) at byte offset %llu",
             sec.idstr, lm_an_section_type_name(type), sec.section_id,
             (unsigned long long)off);

    if (!strcmp(sec.idstr, "ram") && sec.instance_id == 0) {
        if (type == LM_SECTION_FULL)
            return an_fail(c, -EINVAL, off, "the ram section cannot be FULL");
        if (sec.version_id != RAM_SECTION_VERSION)
            return an_fail(c, -EINVAL, off, "ram section version %u (only %d exists)",
                           sec.version_id, RAM_SECTION_VERSION);
        if (type == LM_SECTION_START) {
            if (c->ram_started)
                return an_fail(c, -EINVAL, off, "a second START of the ram section");
            c->ram_started = true;
        }
        sec.parsed_by = LM_AN_PARSED_RAM;
        if (an_parse_ram(c, type))
            return -1;
    } else {
        json_t *desc = an_vmdesc_device(c, sec.idstr, sec.instance_id);
        if (!desc)
            return an_fail(c, -ENOTSUP, off, "no VMDESCRIPTION entry describes device '%s' "
                           "instance %u, so the length of its section is unknown%s",
                           sec.idstr, sec.instance_id,
                           a->has_vmdesc ? "" : " (the file has no VMDESCRIPTION)");
        if (type == LM_SECTION_START || type == LM_SECTION_PART)
            return an_fail(c, -ENOTSUP, off, "the VMDESCRIPTION describes the final state of "
                           "'%s', not its iterative %s sections", sec.idstr,
                           lm_an_section_type_name(type));
        sec.parsed_by = LM_AN_PARSED_VMDESC;
        if (an_skip_vmsd(c, desc, sec.idstr, 0))
            return -1;
    }

    switch (wire_get_footer(c->s, sec.section_id, &f)) {
    case WIRE_OK:
        break;
    case WIRE_EMARK:
        return an_fail(c, -EINVAL, f.at, "expected the section footer (0x7e), found 0x%02x: "
                       "the payload does not end where %s", f.mark,
                       sec.parsed_by == LM_AN_PARSED_RAM ? "its EOS record says"
                                                         : "the VMDESCRIPTION says");
    case WIRE_EID:
        return an_fail(c, -EINVAL, f.at, "footer names section id %u, expected %u", f.id,
                       sec.section_id);
    default:
        return an_stream_fail(c);
    }
    sec.end = an_pos(c);
    if (type == LM_SECTION_FULL || type == LM_SECTION_END)
        bind->ended = true;
    if (type == LM_SECTION_END && sec.parsed_by == LM_AN_PARSED_RAM)
        c->ram_ended = true;
    if (a->nsections >= AN_MAX_ITEMS)
        return an_fail(c, -EINVAL, off, "more than %u sections", AN_MAX_ITEMS);
    a->sections = an_grow(a->sections, a->nsections, &c->sections_cap, sizeof(*a->sections));
    a->sections[a->nsections++] = sec;
    return 0;
}

static int an_parse_command(an_ctx *c, uint64_t off)
{
    lm_analysis *a = c->a;
    lm_an_command cmd = { .offset = off };
    wire_command wc;
    wire_status st = wire_get_command(c->s, off, &wc);

    if (st == WIRE_ESTREAM)
        return an_stream_fail(c);
    cmd.cmd = wc.cmd;
    cmd.len = wc.len;
    if (st == WIRE_EUNKNOWN)
        return an_fail(c, -EINVAL, off, "unknown command %u", cmd.cmd);
    /* The table's fixed lengths and minimums; ADVISE's "0 or 16" is its own. */
    if (st == WIRE_ELEN ||
        (cmd.cmd == WIRE_CMD_POSTCOPY_ADVISE && cmd.len != 0 && cmd.len != 16))
        return an_fail(c, -EINVAL, off, "command %s with a payload of %u bytes, which is not "
                       "its length", wc.def->name, cmd.len);
    if (rd_buf(c, c->cbuf, cmd.len))
        return -1;
    if (cmd.cmd == WIRE_CMD_POSTCOPY_ADVISE && cmd.len == 16) {
        uint64_t summary, target;
        memcpy(&summary, c->cbuf, 8);
        memcpy(&target, c->cbuf + 8, 8);
        c->postcopy_ram = true;
        c->pagesize_summary = be64toh(summary);
        if (be64toh(target) != c->ps)
            return an_fail(c, -EINVAL, off + 5, "POSTCOPY_ADVISE target page size %llu, the "
                           "stream's is %llu", (unsigned long long)be64toh(target),
                           (unsigned long long)c->ps);
    }
    if (cmd.cmd == WIRE_CMD_PACKAGED)
        return an_fail(c, -ENOTSUP, off, "command PACKAGED: postcopy device state comes in a "
                       "package and without a VMDESCRIPTION, which the analyzer cannot skip");
    if (a->ncommands >= AN_MAX_ITEMS)
        return an_fail(c, -EINVAL, off, "more than %u commands", AN_MAX_ITEMS);
    a->commands = an_grow(a->commands, a->ncommands, &c->commands_cap, sizeof(*a->commands));
    a->commands[a->ncommands++] = cmd;
    return 0;
}

/* After EOF: the VMDESCRIPTION (if any) must start at the next byte. */
static int an_after_eof(an_ctx *c)
{
    lm_analysis *a = c->a;
    uint64_t next = a->eof_offset + 1, rest = a->file_size - next;
    uint32_t len;
    uint8_t mark;

    snprintf(c->where, sizeof(c->where), "after the EOF record at byte offset %llu",
             (unsigned long long)a->eof_offset);
    if (a->has_vmdesc && a->vmdesc_offset != next)
        return an_fail(c, -EINVAL, next, "the VMDESCRIPTION found at the end of the file starts "
                       "at byte offset %llu, not right after EOF",
                       (unsigned long long)a->vmdesc_offset);
    if (rest == 0 || stream_peek_u8(c->s) != WIRE_VM_VMDESCRIPTION) {
        a->trailing_bytes = rest;
        return 0;
    }
    if (rd_u8(c, &mark) || rd_be32(c, &len))
        return -1;
    if (rest < 5 || len > rest - 5)
        return an_fail(c, -EPIPE, next, "VMDESCRIPTION of %u bytes, but only %llu bytes follow: "
                       "truncated", len, (unsigned long long)(rest < 5 ? 0 : rest - 5));
    if (!a->has_vmdesc) {
        /* The tail search missed it (e.g. bytes after it): parse it here. */
        char *json = malloc(len ? len : 1);
        json_error_t jerr;
        json_t *root;
        if (!json)
            return an_fail(c, -ENOMEM, next, "cannot allocate %u bytes", len);
        if (rd_buf(c, json, len)) {
            free(json);
            return -1;
        }
        root = json_loadb(json, len, 0, &jerr);
        free(json);
        if (!root)
            return an_fail(c, -EINVAL, next + 5, "the VMDESCRIPTION is not valid JSON: %s",
                           jerr.text);
        json_decref(root);
        a->has_vmdesc = true;
        a->vmdesc_offset = next;
        a->vmdesc_len = len;
    } else if (len != a->vmdesc_len) {
        return an_fail(c, -EINVAL, next + 1, "VMDESCRIPTION length %u differs from the %u found "
                       "from the end of the file", len, a->vmdesc_len);
    }
    a->trailing_bytes = rest - 5 - len;
    return 0;
}

static int an_parse(an_ctx *c)
{
    lm_analysis *a = c->a;

    snprintf(c->where, sizeof(c->where), "file header");
    if (rd_be32(c, &a->magic) || rd_be32(c, &a->version))
        return -1;
    if (a->magic != WIRE_QEVM_MAGIC)
        return an_fail(c, -EINVAL, a->stream_offset, "bad magic 0x%08x (expected 0x%08x, \"QEVM\")", a->magic,
                       WIRE_QEVM_MAGIC);
    if (a->version != WIRE_QEVM_VERSION)
        return an_fail(c, -EINVAL, a->stream_offset + 4, "stream version %u (only %u is supported)", a->version,
                       WIRE_QEVM_VERSION);
    a->header_ok = true;
    c->where[0] = 0;
    /* Machine types up to 2.3 send no configuration; it is optional here. */
    if (stream_peek_u8(c->s) == WIRE_VM_CONFIGURATION && an_parse_config(c))
        return -1;

    for (;;) {
        uint64_t off = an_pos(c);
        uint8_t type;

        snprintf(c->where, sizeof(c->where), "record at byte offset %llu (the file must end "
                 "with an EOF record)", (unsigned long long)off);
        if (rd_u8(c, &type))
            return -1;
        c->where[0] = 0;
        switch (type) {
        case WIRE_VM_EOF:
            a->has_eof = true;
            a->eof_offset = off;
            return an_after_eof(c);
        case WIRE_VM_SECTION_START:
        case WIRE_VM_SECTION_PART:
        case WIRE_VM_SECTION_END:
        case WIRE_VM_SECTION_FULL:
            if (an_parse_section(c, type, off))
                return -1;
            break;
        case WIRE_VM_COMMAND:
            if (an_parse_command(c, off))
                return -1;
            break;
        case WIRE_VM_CONFIGURATION:
            return an_fail(c, -EINVAL, off, "CONFIGURATION record after the start of the stream");
        case WIRE_VM_VMDESCRIPTION:
            return an_fail(c, -EINVAL, off, "VMDESCRIPTION record before the EOF record");
        default:
            return an_fail(c, -EINVAL, off, "unknown record type 0x%02x", type);
        }
    }
}

/* ------------------------------------------------------------ completeness */

/* A file that parsed: does it hold a whole migration?  (see analyze.h) */
static void an_check_complete(an_ctx *c)
{
    lm_analysis *a = c->a;
    json_t *devs = c->vmdesc ? json_object_get(c->vmdesc, "devices") : NULL, *d;
    char *miss = a->missing;
    const size_t msz = sizeof(a->missing);
    size_t i;

    if (!c->ram_listed)
        error_list_add(miss, msz, "no RAM block list (no ram section START)");
    else if (!c->ram_ended)
        error_list_add(miss, msz, "no END of the ram section");
    for (size_t k = 0; k < c->nbinds; k++) {
        const lm_an_section *first = &a->sections[c->binds[k].section];
        if (!c->binds[k].ended && strcmp(first->idstr, "ram"))
            error_list_add(miss, msz, "section '%s' instance %u (id %u) started at byte offset "
                           "%llu never ended", first->idstr, first->instance_id,
                           first->section_id, (unsigned long long)first->start);
    }
    for (size_t k = 0; k < a->nblocks && !a->mapped_ram; k++) {
        const lm_an_block *b = &a->blocks[k];
        /* x-ignore-shared: a block with no page at all was left in place
         * (its memory is the shared file or memfd the restore maps) */
        if (c->ignore_shared && b->counts.pages_present == 0)
            continue;
        if (b->counts.pages_present < b->counts.pages)
            error_list_add(miss, msz, "RAM block '%s': %llu of %llu pages not in this stream",
                           b->idstr,
                           (unsigned long long)(b->counts.pages - b->counts.pages_present),
                           (unsigned long long)b->counts.pages);
    }
    json_array_foreach(devs, i, d) {
        json_t *name = json_object_get(d, "name"), *inst = json_object_get(d, "instance_id");
        bool seen = false;

        if (!json_is_string(name) || !json_is_integer(inst))
            continue;
        for (size_t k = 0; k < a->nsections && !seen; k++)
            seen = (a->sections[k].type == LM_SECTION_FULL ||
                    a->sections[k].type == LM_SECTION_END) &&
                   a->sections[k].instance_id == json_integer_value(inst) &&
                   !strcmp(a->sections[k].idstr, json_string_value(name));
        if (!seen)
            error_list_add(miss, msz, "device '%s' instance %lld: described by the "
                           "VMDESCRIPTION but its state is not in the stream",
                           json_string_value(name), (long long)json_integer_value(inst));
    }
    a->complete = !a->missing[0];
}

/* ------------------------------------------------------------ entry points */

static void an_totals(lm_analysis *a)
{
    memset(&a->totals, 0, sizeof(a->totals));
    for (size_t i = 0; i < a->nblocks; i++) {
        const lm_an_counts *k = &a->blocks[i].counts;
        a->totals.pages += k->pages;
        a->totals.pages_present += k->pages_present;
        a->totals.zero_pages += k->zero_pages;
        a->totals.normal_pages += k->normal_pages;
        a->totals.compressed_pages += k->compressed_pages;
        a->totals.xbzrle_pages += k->xbzrle_pages;
    }
}

int lm_analyze_file(const char *path, const lm_analyze_opts *opts, lm_analysis **out,
                    lm_error *err)
{
    an_ctx ctx;
    an_ctx *c = &ctx;
    lm_analysis *a = calloc(1, sizeof(*a));
    struct stat st;
    int ret = -1;

    if (!a)
        abort();
    memset(c, 0, sizeof(*c));
    c->a = a;
    c->fd = -1;
    c->dirfd = -1;
    c->last_block = -1;
    c->ps = RAM_PAGE_SIZE;

    c->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (c->fd < 0) {
        error_set_errno(&a->error, -errno, "cannot open %s", path);
        goto out;
    }
    if (fstat(c->fd, &st) < 0) {
        error_set_errno(&a->error, -errno, "cannot stat %s", path);
        goto out;
    }
    /* The VMDESCRIPTION is read from the end, so only a regular file will do
     * (and a FIFO would block us). */
    if (!S_ISREG(st.st_mode)) {
        error_set(&a->error, -EINVAL, "%s is not a regular file", path);
        goto out;
    }
    a->file_size = (uint64_t)st.st_size;
    if (opts && opts->extract_dir) {
        if (mkdir(opts->extract_dir, 0755) < 0 && errno != EEXIST) {
            error_set_errno(&a->error, -errno, "cannot create directory %s",
                            opts->extract_dir);
            goto out;
        }
        c->dirfd = open(opts->extract_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (c->dirfd < 0) {
            error_set_errno(&a->error, -errno, "cannot open directory %s", opts->extract_dir);
            goto out;
        }
    }
    if (an_vmdesc_load(c))
        goto out;
    a->page_size = c->ps;
    c->page = malloc(c->ps);
    c->cbuf = malloc(AN_CBUF_SIZE);
    if (!c->page || !c->cbuf)
        abort();
    c->s = stream_new_reader(c->fd, false);
    if (opts && opts->offset) {
        a->stream_offset = opts->offset;
        snprintf(c->where, sizeof(c->where), "the stream offset");
        if (an_seek(c, opts->offset))
            goto out;
    }
    if (an_parse(c))
        goto out;
    a->page_size = c->ps;
    ret = 0;
out:
    an_totals(a);
    for (size_t i = 0; i < a->nblocks; i++) {
        if (c->bs[i].out_fd >= 0 && close(c->bs[i].out_fd) < 0 && ret == 0) {
            error_set_errno(&a->error, -errno, "cannot write the image of block '%s'",
                            a->blocks[i].idstr);
            ret = -1;
        }
        bitmap_free(c->bs[i].present);
    }
    a->extracted = ret == 0 && c->dirfd >= 0;
    if (ret == 0)
        an_check_complete(c);
    if (ret && !a->error.code)
        error_set(&a->error, -EIO, "analysis failed");
    if (ret && err)
        error_copy(err, &a->error);
    stream_free(c->s);
    json_decref(c->vmdesc);
    free(c->bs);
    free(c->binds);
    free(c->page);
    free(c->cbuf);
    if (c->dirfd >= 0)
        close(c->dirfd);
    if (c->fd >= 0)
        close(c->fd);
    ret = ret ? a->error.code : 0;
    if (out)
        *out = a;
    else
        lm_analysis_free(a);
    return ret;
}

void lm_analysis_free(lm_analysis *a)
{
    if (!a)
        return;
    free(a->config_subsections);
    free(a->capabilities);
    free(a->sections);
    free(a->commands);
    free(a->blocks);
    free(a);
}

const char *lm_an_section_type_name(uint8_t type)
{
    switch (type) {
    case LM_SECTION_START: return "START";
    case LM_SECTION_PART: return "PART";
    case LM_SECTION_END: return "END";
    case LM_SECTION_FULL: return "FULL";
    }
    return "?";
}

const char *lm_an_command_name(uint16_t cmd)
{
    return wire_cmd_name(cmd);
}

/* ------------------------------------------------------------ JSON */

static json_t *jint(uint64_t v)
{
    /* JSON integers are signed 64-bit in jansson; nothing we report is
     * larger except a garbage MEM_SIZE, which a string keeps exact. */
    if (v > INT64_MAX) {
        char buf[24];
        snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);
        return json_string(buf);
    }
    return json_integer((json_int_t)v);
}

static json_t *jstr(const char *s)
{
    json_t *j = json_string(s);
    return j ? j : json_string("(not UTF-8)");
}

static json_t *an_counts_json(const lm_an_counts *k)
{
    return json_pack("{s:o,s:o,s:o,s:o,s:o,s:o}",
                     "pages", jint(k->pages),
                     "pages_present", jint(k->pages_present),
                     "zero_pages", jint(k->zero_pages),
                     "normal_pages", jint(k->normal_pages),
                     "compressed_pages", jint(k->compressed_pages),
                     "xbzrle_pages", jint(k->xbzrle_pages));
}

char *lm_analysis_to_json(const lm_analysis *a)
{
    json_t *root = json_object(), *arr, *o;
    char *out;

    if (!root)
        return NULL;
    json_object_set_new(root, "file_size", jint(a->file_size));
    json_object_set_new(root, "stream_offset", jint(a->stream_offset));
    if (a->header_ok)
        json_object_set_new(root, "header", json_pack("{s:s,s:o,s:o}", "magic", "QEVM",
                                                      "magic_value", jint(a->magic),
                                                      "version", jint(a->version)));
    else
        json_object_set_new(root, "header", json_null());

    if (a->has_config) {
        json_t *subs = json_array(), *caps = json_array();
        for (size_t i = 0; i < a->nconfig_subsections; i++) {
            const lm_an_subsection *s = &a->config_subsections[i];
            json_array_append_new(subs, json_pack("{s:o,s:o,s:o,s:o}", "name", jstr(s->name),
                                                  "version", jint(s->version),
                                                  "start", jint(s->start), "end", jint(s->end)));
        }
        for (size_t i = 0; i < a->ncapabilities; i++)
            json_array_append_new(caps, jstr(a->capabilities[i]));
        json_object_set_new(root, "configuration",
                            json_pack("{s:o,s:o,s:o,s:o}", "offset", jint(a->config_offset),
                                      "machine", jstr(a->machine), "subsections", subs,
                                      "capabilities", caps));
    } else {
        json_object_set_new(root, "configuration", json_null());
    }
    json_object_set_new(root, "mapped_ram", json_boolean(a->mapped_ram));
    json_object_set_new(root, "page_size", jint(a->page_size));
    json_object_set_new(root, "ram_total", jint(a->ram_total));

    arr = json_array();
    for (size_t i = 0; i < a->nsections; i++) {
        const lm_an_section *s = &a->sections[i];
        json_array_append_new(arr, json_pack("{s:s,s:o,s:o,s:o,s:o,s:o,s:o,s:s}",
            "type", lm_an_section_type_name(s->type), "section_id", jint(s->section_id),
            "idstr", jstr(s->idstr), "instance_id", jint(s->instance_id),
            "version_id", jint(s->version_id), "start", jint(s->start), "end", jint(s->end),
            "parsed_by", s->parsed_by == LM_AN_PARSED_RAM ? "ram" : "vmdesc"));
    }
    json_object_set_new(root, "sections", arr);

    arr = json_array();
    for (size_t i = 0; i < a->ncommands; i++) {
        const lm_an_command *k = &a->commands[i];
        json_array_append_new(arr, json_pack("{s:o,s:o,s:s,s:o}", "offset", jint(k->offset),
                                             "cmd", jint(k->cmd),
                                             "name", lm_an_command_name(k->cmd),
                                             "len", jint(k->len)));
    }
    json_object_set_new(root, "commands", arr);

    arr = json_array();
    for (size_t i = 0; i < a->nblocks; i++) {
        const lm_an_block *b = &a->blocks[i];
        o = json_pack("{s:o,s:o,s:o}", "idstr", jstr(b->idstr), "file_name",
                      jstr(b->file_name), "size", jint(b->size));
        json_object_set_new(o, "counts", an_counts_json(&b->counts));
        if (b->has_mr_addr)
            json_object_set_new(o, "mr_addr", jint(b->mr_addr));
        if (b->has_host_page_size)
            json_object_set_new(o, "host_page_size", jint(b->host_page_size));
        if (b->mapped_ram)
            json_object_set_new(o, "mapped_ram", json_pack("{s:o,s:o,s:o}",
                                "header_offset", jint(b->header_offset),
                                "bitmap_offset", jint(b->bitmap_offset),
                                "pages_offset", jint(b->pages_offset)));
        json_array_append_new(arr, o);
    }
    json_object_set_new(root, "ram_blocks", arr);
    o = an_counts_json(&a->totals);
    json_object_set_new(o, "page_records", jint(a->page_records));
    json_object_set_new(o, "multifd_flushes", jint(a->multifd_flushes));
    json_object_set_new(o, "sections", jint(a->nsections));
    json_object_set_new(o, "commands", jint(a->ncommands));
    json_object_set_new(root, "totals", o);

    json_object_set_new(root, "eof_offset", a->has_eof ? jint(a->eof_offset) : json_null());
    json_object_set_new(root, "vmdescription", a->has_vmdesc
                        ? json_pack("{s:o,s:o}", "offset", jint(a->vmdesc_offset),
                                    "length", jint(a->vmdesc_len))
                        : json_null());
    json_object_set_new(root, "trailing_bytes", jint(a->trailing_bytes));
    json_object_set_new(root, "extracted", json_boolean(a->extracted));
    json_object_set_new(root, "complete", json_boolean(a->complete));
    json_object_set_new(root, "missing", a->missing[0] ? jstr(a->missing) : json_null());
    json_object_set_new(root, "error", a->error.code ? jstr(a->error.msg) : json_null());
    out = json_dumps(root, JSON_INDENT(2));
    json_decref(root);
    return out;
}
