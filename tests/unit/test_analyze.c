/*
 * Unit tests of the stream analyzer (src/analyze/analyze.c) on small
 * synthetic files built here byte by byte from the documented format:
 *
 *   - a livemig-shaped precopy stream (START/PART/END "ram", a FULL device
 *     skipped by its VMDESCRIPTION), checking every reported number, the
 *     byte ranges and the extracted images;
 *   - QEMU 7.2 page encodings: ZERO with a fill byte, COMPRESS_PAGE (zlib),
 *     XBZRLE on top of an earlier page, x-ignore-shared block addresses;
 *   - VMDESCRIPTION skipping with arrays, nested structs and subsections;
 *   - a mapped-ram file laid out as reference appendix C (QEMU 10.0);
 *   - damage: every truncation and every single-byte flip outside page
 *     data (a sample inside it), random garbage,
 *     and one case per structural check, each of which must be refused
 *     with a message naming the byte offset, without crashing (these run
 *     under ASan/UBSan too).
 *
 * Each test writes its files into a private temporary directory that the
 * group teardown removes.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>
#include <zlib.h>

#include "livemig/analyze.h"

#define PS 4096u

/* ------------------------------------------------------------ byte builder */

typedef struct buf {
    uint8_t *d;
    size_t len, cap;
} buf;

static void b_reserve(buf *b, size_t n)
{
    if (b->len + n <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n)
        cap *= 2;
    b->d = realloc(b->d, cap);
    assert_non_null(b->d);
    memset(b->d + b->cap, 0, cap - b->cap);
    b->cap = cap;
}

static void b_bytes(buf *b, const void *p, size_t n)
{
    b_reserve(b, n);
    memcpy(b->d + b->len, p, n);
    b->len += n;
}

static void b_u8(buf *b, uint8_t v) { b_bytes(b, &v, 1); }

static void b_be16(buf *b, uint16_t v)
{
    uint8_t x[2] = { (uint8_t)(v >> 8), (uint8_t)v };
    b_bytes(b, x, 2);
}

static void b_be32(buf *b, uint32_t v)
{
    uint8_t x[4] = { (uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v };
    b_bytes(b, x, 4);
}

static void b_be64(buf *b, uint64_t v)
{
    b_be32(b, (uint32_t)(v >> 32));
    b_be32(b, (uint32_t)v);
}

static void b_str(buf *b, const char *s)
{
    b_u8(b, (uint8_t)strlen(s));
    b_bytes(b, s, strlen(s));
}

/* Zero-fill up to absolute offset `off` (mapped-ram's fixed regions). */
static void b_pad_to(buf *b, size_t off)
{
    assert_true(off >= b->len);
    b_reserve(b, off - b->len);
    memset(b->d + b->len, 0, off - b->len);
    b->len = off;
}

static void b_put_at(buf *b, size_t off, const void *p, size_t n)
{
    if (off + n > b->len)
        b_pad_to(b, off + n);
    memcpy(b->d + off, p, n);
}

static void b_header(buf *b, const char *machine)
{
    b_be32(b, 0x5145564d);
    b_be32(b, 3);
    b_u8(b, 0x07);
    b_be32(b, (uint32_t)strlen(machine));
    b_bytes(b, machine, strlen(machine));
}

static size_t b_section(buf *b, uint8_t type, uint32_t id, const char *idstr, uint32_t inst,
                        uint32_t ver)
{
    size_t start = b->len;
    b_u8(b, type);
    b_be32(b, id);
    if (type == 1 || type == 4) {
        b_str(b, idstr);
        b_be32(b, inst);
        b_be32(b, ver);
    }
    return start;
}

static void b_footer(buf *b, uint32_t id)
{
    b_u8(b, 0x7e);
    b_be32(b, id);
}

/* EOF, then VMDESCRIPTION with `json`.  Returns the EOF offset. */
static size_t b_end(buf *b, const char *json)
{
    size_t eof = b->len;
    b_u8(b, 0x00);
    if (json) {
        b_u8(b, 0x06);
        b_be32(b, (uint32_t)strlen(json));
        b_bytes(b, json, strlen(json));
    }
    return eof;
}

/* ------------------------------------------------------------ fixture */

typedef struct fixture {
    char dir[64];
    char path[128];
    char exdir[128];
} fixture;

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st; (void)flag; (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_analyze-XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    snprintf(f->path, sizeof(f->path), "%s/stream.mig", f->dir);
    snprintf(f->exdir, sizeof(f->exdir), "%s/ram", f->dir);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void write_file(const char *path, const void *d, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, d, len), (ssize_t)len);
    assert_int_equal(close(fd), 0);
}

static uint8_t *read_file(const char *path, size_t *len)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    uint8_t *d;

    assert_true(fd >= 0);
    assert_int_equal(fstat(fd, &st), 0);
    d = malloc((size_t)st.st_size + 1);
    assert_non_null(d);
    assert_int_equal(read(fd, d, (size_t)st.st_size), st.st_size);
    close(fd);
    *len = (size_t)st.st_size;
    return d;
}

/* Analyze `b` (written to the fixture's file); expect success or failure. */
static lm_analysis *analyze(fixture *f, const buf *b, bool extract, bool expect_ok)
{
    lm_analyze_opts o = { .extract_dir = extract ? f->exdir : NULL };
    lm_analysis *a = NULL;
    lm_error err = { 0 };
    int rc;

    write_file(f->path, b->d, b->len);
    rc = lm_analyze_file(f->path, &o, &a, &err);
    assert_non_null(a);
    if (expect_ok && rc != 0)
        fail_msg("analysis failed: %s", err.msg);
    if (!expect_ok) {
        assert_true(rc < 0);
        assert_false(a->complete);
        assert_int_equal(a->error.code, rc);
        assert_string_equal(a->error.msg, err.msg);
    }
    return a;
}

/* The analysis failed with a message containing `what` and a byte offset. */
static void assert_refused(lm_analysis *a, const char *what)
{
    assert_false(a->complete);
    assert_true(a->error.code < 0);
    if (!strstr(a->error.msg, "byte offset"))
        fail_msg("error does not name a byte offset: %s", a->error.msg);
    if (what && !strstr(a->error.msg, what))
        fail_msg("error lacks '%s': %s", what, a->error.msg);
}

static void fill_pattern(uint8_t *p, unsigned seed)
{
    uint32_t x = seed * 2654435761u + 1;
    for (unsigned i = 0; i < PS; i++) {
        x = x * 1103515245u + 12345u;
        p[i] = (uint8_t)(x >> 16);
    }
}

static void assert_image(fixture *f, const char *name, const uint8_t *want, size_t len)
{
    char path[256];
    size_t got_len;
    uint8_t *got;

    snprintf(path, sizeof(path), "%s/%s", f->exdir, name);
    got = read_file(path, &got_len);
    assert_int_equal(got_len, len);
    assert_memory_equal(got, want, len);
    free(got);
}

/* ------------------------------------------------------------ a livemig stream */

/*
 * Blocks "guest.ram" (4 pages) and "rom/x" (2 pages).  Expected images are
 * built alongside the stream.  Offsets of the landmarks go to `m`.
 */
typedef struct marks {
    size_t start, part, end, full, eof, vmdesc, size;
    size_t full_end;
    size_t pg[8];               /* offsets of the page payloads */
    int npg;
} marks;

#define DEV_JSON "{\"page_size\":4096,\"devices\":[{\"name\":\"guest\",\"instance_id\":0," \
                 "\"vmsd_name\":\"guest\",\"version\":1,\"fields\":[{\"name\":\"data\"," \
                 "\"type\":\"buffer\",\"size\":10}]}]}"

static void build_livemig(buf *b, marks *m, uint8_t *img_a, uint8_t *img_b)
{
    uint8_t page[PS];

    m->npg = 0;
    memset(img_a, 0, 4 * PS);
    memset(img_b, 0, 2 * PS);
    b_header(b, "livemig-1");
    m->start = b_section(b, 1, 1, "ram", 0, 4);
    b_be64(b, 6 * PS | 0x04);
    b_str(b, "guest.ram");
    b_be64(b, 4 * PS);
    b_str(b, "rom/x");
    b_be64(b, 2 * PS);
    b_be64(b, 0x10);
    b_footer(b, 1);

    m->part = b_section(b, 2, 1, NULL, 0, 0);
    fill_pattern(page, 1);
    b_be64(b, 0 * PS | 0x08);             /* guest.ram page 0 */
    b_str(b, "guest.ram");
    m->pg[m->npg++] = b->len;
    b_bytes(b, page, PS);
    memcpy(img_a, page, PS);
    b_be64(b, 1 * PS | 0x02 | 0x20);      /* page 1 zero, CONTINUE */
    b_u8(b, 0);
    b_be64(b, 3 * PS | 0x08 | 0x20);      /* page 3 */
    fill_pattern(page, 3);
    m->pg[m->npg++] = b->len;
    b_bytes(b, page, PS);
    memcpy(img_a + 3 * PS, page, PS);
    b_be64(b, 1 * PS | 0x08);             /* rom/x page 1 */
    b_str(b, "rom/x");
    fill_pattern(page, 4);
    m->pg[m->npg++] = b->len;
    b_bytes(b, page, PS);
    memcpy(img_b + PS, page, PS);
    b_be64(b, 0x10);
    b_footer(b, 1);

    m->end = b_section(b, 3, 1, NULL, 0, 0);
    b_be64(b, 3 * PS | 0x02);             /* guest.ram page 3 becomes zero */
    b_str(b, "guest.ram");
    b_u8(b, 0);
    memset(img_a + 3 * PS, 0, PS);
    b_be64(b, 0 * PS | 0x08 | 0x20);      /* page 0 rewritten */
    fill_pattern(page, 5);
    m->pg[m->npg++] = b->len;
    b_bytes(b, page, PS);
    memcpy(img_a, page, PS);
    b_be64(b, 0x10);
    b_footer(b, 1);

    m->full = b_section(b, 4, 2, "guest", 0, 1);
    b_bytes(b, "0123456789", 10);
    b_footer(b, 2);
    m->full_end = b->len;
    m->eof = b_end(b, DEV_JSON);
    m->vmdesc = m->eof + 1;
    m->size = b->len;
}

static void test_livemig_stream(void **state)
{
    fixture *f = *state;
    buf b = { 0 };
    marks m;
    uint8_t img_a[4 * PS], img_b[2 * PS];
    lm_analysis *a;

    build_livemig(&b, &m, img_a, img_b);
    a = analyze(f, &b, true, true);
    /* Understood to its end, but pages were left out on purpose (the
     * extraction's holes): a part of a migration, and it says which. */
    assert_int_equal(a->error.code, 0);
    assert_false(a->complete);
    assert_non_null(strstr(a->missing, "'guest.ram': 1 of 4 pages not in this stream"));
    assert_non_null(strstr(a->missing, "'rom/x': 1 of 2 pages"));
    assert_true(a->header_ok);
    assert_int_equal(a->magic, 0x5145564d);
    assert_int_equal(a->version, 3);
    assert_true(a->has_config);
    assert_string_equal(a->machine, "livemig-1");
    assert_int_equal(a->nconfig_subsections, 0);
    assert_false(a->mapped_ram);
    assert_int_equal(a->page_size, PS);
    assert_int_equal(a->ram_total, 6 * PS);
    assert_int_equal(a->file_size, m.size);

    assert_int_equal(a->nsections, 4);
    assert_int_equal(a->sections[0].type, LM_SECTION_START);
    assert_int_equal(a->sections[0].start, m.start);
    assert_int_equal(a->sections[0].end, m.part);
    assert_int_equal(a->sections[1].type, LM_SECTION_PART);
    assert_string_equal(a->sections[1].idstr, "ram");
    assert_int_equal(a->sections[1].version_id, 4);
    assert_int_equal(a->sections[1].start, m.part);
    assert_int_equal(a->sections[1].end, m.end);
    assert_int_equal(a->sections[2].type, LM_SECTION_END);
    assert_int_equal(a->sections[2].end, m.full);
    assert_int_equal(a->sections[3].type, LM_SECTION_FULL);
    assert_string_equal(a->sections[3].idstr, "guest");
    assert_int_equal(a->sections[3].section_id, 2);
    assert_int_equal(a->sections[3].version_id, 1);
    assert_int_equal(a->sections[3].parsed_by, LM_AN_PARSED_VMDESC);
    assert_int_equal(a->sections[3].start, m.full);
    assert_int_equal(a->sections[3].end, m.full_end);

    assert_true(a->has_eof);
    assert_int_equal(a->eof_offset, m.eof);
    assert_true(a->has_vmdesc);
    assert_int_equal(a->vmdesc_offset, m.vmdesc);
    assert_int_equal(a->vmdesc_len, strlen(DEV_JSON));
    assert_int_equal(a->trailing_bytes, 0);

    assert_int_equal(a->nblocks, 2);
    assert_string_equal(a->blocks[0].idstr, "guest.ram");
    assert_int_equal(a->blocks[0].size, 4 * PS);
    assert_int_equal(a->blocks[0].counts.pages, 4);
    assert_int_equal(a->blocks[0].counts.pages_present, 3);     /* 0, 1, 3 */
    assert_int_equal(a->blocks[0].counts.zero_pages, 2);
    assert_int_equal(a->blocks[0].counts.normal_pages, 3);
    assert_int_equal(a->blocks[0].counts.compressed_pages, 0);
    assert_string_equal(a->blocks[1].idstr, "rom/x");
    assert_string_equal(a->blocks[1].file_name, "rom_x");
    assert_int_equal(a->blocks[1].counts.pages_present, 1);
    assert_int_equal(a->blocks[1].counts.normal_pages, 1);
    assert_int_equal(a->totals.pages, 6);
    assert_int_equal(a->totals.pages_present, 4);
    assert_int_equal(a->totals.zero_pages, 2);
    assert_int_equal(a->totals.normal_pages, 4);
    assert_int_equal(a->page_records, 6);
    assert_true(a->extracted);

    assert_image(f, "guest.ram", img_a, sizeof(img_a));
    assert_image(f, "rom_x", img_b, sizeof(img_b));
    lm_analysis_free(a);
    free(b.d);
}

static void test_json_output(void **state)
{
    fixture *f = *state;
    buf b = { 0 };
    marks m;
    uint8_t img_a[4 * PS], img_b[2 * PS];
    lm_analysis *a;
    json_error_t jerr;
    json_t *root, *blk;
    char *doc;

    build_livemig(&b, &m, img_a, img_b);
    a = analyze(f, &b, false, true);
    doc = lm_analysis_to_json(a);
    assert_non_null(doc);
    root = json_loads(doc, 0, &jerr);
    if (!root)
        fail_msg("invalid JSON: %s", jerr.text);
    assert_string_equal(json_string_value(json_object_get(json_object_get(root, "header"),
                                                          "magic")), "QEVM");
    assert_string_equal(json_string_value(json_object_get(json_object_get(root,
                        "configuration"), "machine")), "livemig-1");
    assert_int_equal(json_array_size(json_object_get(root, "sections")), 4);
    assert_int_equal(json_integer_value(json_object_get(root, "eof_offset")), m.eof);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(root, "vmdescription"),
                                                        "offset")), m.vmdesc);
    blk = json_array_get(json_object_get(root, "ram_blocks"), 1);
    assert_string_equal(json_string_value(json_object_get(blk, "idstr")), "rom/x");
    assert_int_equal(json_integer_value(json_object_get(json_object_get(blk, "counts"),
                                                        "pages_present")), 1);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(root, "totals"),
                                                        "zero_pages")), 2);
    assert_true(json_is_false(json_object_get(root, "complete")));
    assert_non_null(strstr(json_string_value(json_object_get(root, "missing")), "rom/x"));
    assert_true(json_is_null(json_object_get(root, "error")));
    json_decref(root);
    free(doc);
    lm_analysis_free(a);

    /* A failed analysis carries its error into the JSON. */
    b.len = m.eof;
    a = analyze(f, &b, false, false);
    doc = lm_analysis_to_json(a);
    root = json_loads(doc, 0, &jerr);
    assert_non_null(root);
    assert_true(json_is_false(json_object_get(root, "complete")));
    assert_non_null(strstr(json_string_value(json_object_get(root, "error")), "byte offset"));
    json_decref(root);
    free(doc);
    lm_analysis_free(a);
    free(b.d);
}

/* A stream that starts at an offset (file:PATH,offset=N): offsets stay absolute. */
static void test_stream_offset(void **state)
{
    fixture *f = *state;
    buf s = { 0 }, b = { 0 };
    marks m;
    uint8_t img_a[4 * PS], img_b[2 * PS];
    lm_analyze_opts o = { .extract_dir = f->exdir, .offset = 5000 };
    lm_analysis *a;
    lm_error err = { 0 };

    build_livemig(&s, &m, img_a, img_b);
    b_reserve(&b, 5000);
    memset(b.d, 'Z', 5000);
    b.len = 5000;
    b_bytes(&b, s.d, s.len);
    write_file(f->path, b.d, b.len);
    if (lm_analyze_file(f->path, &o, &a, &err))
        fail_msg("analysis at offset 5000 failed: %s", err.msg);
    assert_int_equal(a->stream_offset, 5000);
    assert_int_equal(a->nsections, 4);
    assert_int_equal(a->sections[0].start, 5000 + m.start);
    assert_int_equal(a->sections[3].end, 5000 + m.full_end);
    assert_int_equal(a->eof_offset, 5000 + m.eof);
    assert_int_equal(a->vmdesc_offset, 5000 + m.vmdesc);
    assert_image(f, "guest.ram", img_a, sizeof(img_a));
    lm_analysis_free(a);

    /* Without the offset the 'Z's are a bad magic at byte 0. */
    o.offset = 0;
    assert_true(lm_analyze_file(f->path, &o, &a, &err) < 0);
    assert_refused(a, "bad magic");
    lm_analysis_free(a);
    /* An offset past the end of the file. */
    o.offset = b.len + 1;
    assert_true(lm_analyze_file(f->path, &o, NULL, &err) < 0);
    assert_non_null(strstr(err.msg, "past the end"));
    free(s.d);
    free(b.d);
}

/* ------------------------------------------------------------ QEMU encodings */

/* XBZRLE: pairs of (unchanged run, changed run + bytes), ULEB128 lengths. */
static size_t xbzrle_encode_one(uint8_t *out, uint32_t zrun, const uint8_t *nz, uint32_t nzrun)
{
    size_t n = 0;
    uint32_t v[2] = { zrun, nzrun };
    for (int k = 0; k < 2; k++) {
        if (v[k] < 0x80) {
            out[n++] = (uint8_t)v[k];
        } else {
            out[n++] = (uint8_t)((v[k] & 0x7f) | 0x80);
            out[n++] = (uint8_t)(v[k] >> 7);
        }
    }
    memcpy(out + n, nz, nzrun);
    return n + nzrun;
}

static void test_qemu_encodings(void **state)
{
    fixture *f = *state;
    buf b = { 0 };
    uint8_t page[PS], img[4 * PS], z[PS + 64], delta[64];
    uLongf zlen = sizeof(z);
    size_t dlen = 0;
    lm_analysis *a;
    char json[512];

    memset(img, 0, sizeof(img));
    b_header(&b, "pc-q35-7.2");
    b_u8(&b, 0x05);                       /* configuration/capabilities: x-ignore-shared */
    b_str(&b, "configuration/capabilities");
    b_be32(&b, 1);
    b_be32(&b, 1);
    b_str(&b, "x-ignore-shared");
    b_u8(&b, 0x08);                       /* COMMAND OPEN_RETURN_PATH */
    b_be16(&b, 1);
    b_be16(&b, 0);
    b_section(&b, 1, 2, "ram", 0, 4);
    b_be64(&b, 4 * PS | 0x04);
    b_str(&b, "pc.ram");
    b_be64(&b, 4 * PS);
    b_be64(&b, 0x100000);                 /* mr_addr */
    b_be64(&b, 0x10);
    b_footer(&b, 2);

    b_section(&b, 2, 2, NULL, 0, 0);
    fill_pattern(page, 7);                /* page 0: PAGE (QEMU sends a block's first page plain) */
    b_be64(&b, 0 | 0x08);
    b_str(&b, "pc.ram");
    b_bytes(&b, page, PS);
    memcpy(img, page, PS);
    memset(page, 'x', PS);                /* page 1: COMPRESS_PAGE */
    for (unsigned i = 0; i < PS; i += 7)
        page[i] = (uint8_t)i;
    assert_int_equal(compress2(z, &zlen, page, PS, 1), Z_OK);
    b_be64(&b, 1 * PS | 0x100 | 0x20);
    b_be32(&b, (uint32_t)zlen);
    b_bytes(&b, z, zlen);
    memcpy(img + PS, page, PS);
    b_be64(&b, 2 * PS | 0x02 | 0x20);     /* page 2: ZERO with fill 0xa5 (7.2) */
    b_u8(&b, 0xa5);
    memset(img + 2 * PS, 0xa5, PS);
    b_be64(&b, 0x200);                    /* MULTIFD_FLUSH (10.0) */
    b_be64(&b, 0x10);
    b_footer(&b, 2);

    b_section(&b, 3, 2, NULL, 0, 0);      /* END: XBZRLE on top of page 0 */
    dlen += xbzrle_encode_one(delta + dlen, 0, (const uint8_t *)"AB", 2);
    dlen += xbzrle_encode_one(delta + dlen, 300, (const uint8_t *)"C", 1);
    dlen += xbzrle_encode_one(delta + dlen, 4096 - 304, (const uint8_t *)"D", 1);
    img[0] = 'A';
    img[1] = 'B';
    img[302] = 'C';
    img[4095] = 'D';
    b_be64(&b, 0 | 0x40);
    b_str(&b, "pc.ram");
    b_u8(&b, 1);
    b_be16(&b, (uint16_t)dlen);
    b_bytes(&b, delta, dlen);
    b_be64(&b, 0x10);
    b_footer(&b, 2);
    snprintf(json, sizeof(json), "{\"page_size\":4096,\"devices\":[]}");
    b_end(&b, json);

    a = analyze(f, &b, true, true);
    assert_int_equal(a->ncapabilities, 1);
    assert_string_equal(a->capabilities[0], "x-ignore-shared");
    assert_int_equal(a->nconfig_subsections, 1);
    assert_string_equal(a->config_subsections[0].name, "configuration/capabilities");
    assert_int_equal(a->ncommands, 1);
    assert_int_equal(a->commands[0].cmd, 1);
    assert_string_equal(lm_an_command_name(a->commands[0].cmd), "OPEN_RETURN_PATH");
    assert_true(a->blocks[0].has_mr_addr);
    assert_int_equal(a->blocks[0].mr_addr, 0x100000);
    assert_int_equal(a->blocks[0].counts.normal_pages, 1);
    assert_int_equal(a->blocks[0].counts.compressed_pages, 1);
    assert_int_equal(a->blocks[0].counts.zero_pages, 1);
    assert_int_equal(a->blocks[0].counts.xbzrle_pages, 1);
    assert_int_equal(a->blocks[0].counts.pages_present, 3);
    assert_int_equal(a->multifd_flushes, 1);
    assert_image(f, "pc.ram", img, sizeof(img));
    lm_analysis_free(a);
    free(b.d);
}

/* ------------------------------------------------------------ VMDESCRIPTION skipping */

/*
 * Device "dev": u32 a; struct s[2] (array_len 2, each: u16 x, subsection
 * "inner/sub" with 3 bytes, so 2 + 1 + 10 + 4 + 3 = 20 bytes each);
 * top-level subsection "dev/extra" with a 5-byte buffer.
 */
#define NEST_JSON "{\"page_size\":4096,\"devices\":[{\"name\":\"dev\",\"instance_id\":3," \
    "\"vmsd_name\":\"dev\",\"version\":2,\"fields\":[" \
    "{\"name\":\"a\",\"type\":\"uint32\",\"size\":4}," \
    "{\"name\":\"s\",\"array_len\":2,\"type\":\"struct\",\"size\":%d,\"struct\":{" \
        "\"vmsd_name\":\"inner\",\"version\":1,\"fields\":[{\"name\":\"x\",\"type\":" \
        "\"uint16\",\"size\":2}],\"subsections\":[{\"vmsd_name\":\"inner/sub\"," \
        "\"version\":1,\"fields\":[{\"name\":\"y\",\"type\":\"buffer\",\"size\":3}]}]}}]," \
    "\"subsections\":[{\"vmsd_name\":\"dev/extra\",\"version\":1,\"fields\":[" \
        "{\"name\":\"z\",\"type\":\"buffer\",\"size\":5}]}]}]}"

static void build_nested(buf *b, int struct_size)
{
    char json[1024];

    b_header(b, "pc");
    b_section(b, 4, 7, "dev", 3, 2);
    b_be32(b, 0xdeadbeef);
    for (int i = 0; i < 2; i++) {
        b_be16(b, 0x1234);
        b_u8(b, 0x05);
        b_str(b, "inner/sub");
        b_be32(b, 1);
        b_bytes(b, "abc", 3);
    }
    b_u8(b, 0x05);
    b_str(b, "dev/extra");
    b_be32(b, 1);
    b_bytes(b, "12345", 5);
    b_footer(b, 7);
    snprintf(json, sizeof(json), NEST_JSON, struct_size);
    b_end(b, json);
}

static void test_vmdesc_nested(void **state)
{
    fixture *f = *state;
    buf b = { 0 };
    lm_analysis *a;

    build_nested(&b, 20);
    a = analyze(f, &b, false, true);
    assert_int_equal(a->nsections, 1);
    assert_int_equal(a->sections[0].instance_id, 3);
    assert_int_equal(a->nblocks, 0);
    lm_analysis_free(a);

    /* A struct whose listed size disagrees with its contents is refused. */
    b.len = 0;
    build_nested(&b, 21);
    a = analyze(f, &b, false, false);
    assert_refused(a, "struct field 's' of 'dev' took 20 bytes");
    lm_analysis_free(a);
    free(b.d);
}

/* ------------------------------------------------------------ mapped-ram */

#define MIB (1u << 20)

typedef struct mr_block {
    const char *name;
    uint64_t pages;
    uint64_t present_mask;      /* bit i: page i present (<= 64 pages) */
    size_t header_off;          /* filled by the builder */
} mr_block;

/*
 * A file laid out as reference appendix C: configuration with the
 * mapped-ram capability; START "ram" with each block followed by its
 * 28-byte header, bitmap right after it, pages at the next 1 MiB boundary;
 * the stream continues after the block's pages; PART and END hold only
 * EOS with SWITCHOVER_START between them; one FULL device; EOF; JSON.
 * `img` receives the expected images, back to back.
 */
static void build_mapped(buf *b, mr_block *blk, int n, uint8_t *img)
{
    uint64_t total = 0, at = 0;
    uint8_t page[PS];

    for (int i = 0; i < n; i++)
        total += blk[i].pages * PS;
    b_header(b, "pc-q35-10.0");
    b_u8(b, 0x05);
    b_str(b, "configuration/capabilities");
    b_be32(b, 1);
    b_be32(b, 1);
    b_str(b, "mapped-ram");
    b_section(b, 1, 1, "ram", 0, 4);
    b_be64(b, total | 0x04);
    for (int i = 0; i < n; i++) {
        uint64_t len = blk[i].pages * PS, bm_off, pg_off, words = (blk[i].pages + 63) / 64;
        uint8_t le[8];
        b_str(b, blk[i].name);
        b_be64(b, len);
        blk[i].header_off = b->len;
        bm_off = b->len + 28;
        pg_off = (bm_off + words * 8 + MIB - 1) / MIB * MIB;
        b_be32(b, 1);
        b_be64(b, PS);
        b_be64(b, bm_off);
        b_be64(b, pg_off);
        for (int k = 0; k < 8; k++)
            le[k] = (uint8_t)(blk[i].present_mask >> (8 * k));
        b_put_at(b, bm_off, le, 8);
        memset(img + at, 0, len);
        for (uint64_t p = 0; p < blk[i].pages; p++) {
            fill_pattern(page, (unsigned)(i * 100 + p));
            /* A clear bit's stale data must be ignored: write it anyway. */
            b_put_at(b, pg_off + p * PS, page, PS);
            if (blk[i].present_mask >> p & 1)
                memcpy(img + at + p * PS, page, PS);
        }
        b_pad_to(b, pg_off + len);
        at += len;
    }
    b_be64(b, 0x10);
    b_footer(b, 1);
    b_section(b, 2, 1, NULL, 0, 0);
    b_be64(b, 0x10);
    b_footer(b, 1);
    b_u8(b, 0x08);
    b_be16(b, 11);
    b_be16(b, 0);
    b_section(b, 3, 1, NULL, 0, 0);
    b_be64(b, 0x10);
    b_footer(b, 1);
    b_section(b, 4, 2, "guest", 0, 1);
    b_bytes(b, "0123456789", 10);
    b_footer(b, 2);
    b_end(b, DEV_JSON);
}

static void test_mapped_ram(void **state)
{
    fixture *f = *state;
    mr_block blk[2] = {
        { "mem", 16, 0xf9f5, 0 },           /* 12 present */
        { "/rom@etc/acpi/rsdp", 3, 0x5, 0 },
    };
    uint8_t *img = malloc(19 * PS);
    buf b = { 0 };
    lm_analysis *a;

    assert_non_null(img);
    build_mapped(&b, blk, 2, img);
    a = analyze(f, &b, true, true);
    assert_true(a->mapped_ram);
    assert_int_equal(a->ncapabilities, 1);
    assert_string_equal(a->capabilities[0], "mapped-ram");
    assert_int_equal(a->nblocks, 2);
    assert_true(a->blocks[0].mapped_ram);
    assert_int_equal(a->blocks[0].header_offset, blk[0].header_off);
    assert_int_equal(a->blocks[0].bitmap_offset, blk[0].header_off + 28);
    assert_int_equal(a->blocks[0].pages_offset, MIB);
    assert_int_equal(a->blocks[0].counts.pages, 16);
    assert_int_equal(a->blocks[0].counts.pages_present, 12);
    assert_int_equal(a->blocks[0].counts.normal_pages, 12);
    assert_int_equal(a->blocks[0].counts.zero_pages, 0);
    assert_int_equal(a->blocks[1].header_offset, MIB + 16 * PS + 1 + 18 + 8);
    assert_int_equal(a->blocks[1].pages_offset, 2 * MIB);
    assert_int_equal(a->blocks[1].counts.pages_present, 2);
    assert_int_equal(a->totals.pages_present, 14);
    assert_int_equal(a->page_records, 0);
    assert_int_equal(a->nsections, 4);
    assert_int_equal(a->ncommands, 1);
    assert_string_equal(lm_an_command_name(a->commands[0].cmd), "SWITCHOVER_START");
    assert_true(a->has_vmdesc);
    assert_image(f, "mem", img, 16 * PS);
    assert_image(f, "_rom@etc_acpi_rsdp", img + 16 * PS, 3 * PS);
    lm_analysis_free(a);
    free(b.d);
    free(img);
}

/* Damage one field of block 0's header (offset within it) and expect `what`. */
static void mapped_damaged(fixture *f, size_t field, uint64_t value, int width, const char *what)
{
    mr_block blk[2] = {
        { "mem", 16, 0xffff, 0 },
        { "rom", 3, 0x7, 0 },
    };
    uint8_t *img = malloc(19 * PS);
    buf b = { 0 };
    lm_analysis *a;

    assert_non_null(img);
    build_mapped(&b, blk, 2, img);
    for (int k = 0; k < width; k++)
        b.d[blk[0].header_off + field + k] = (uint8_t)(value >> (8 * (width - 1 - k)));
    a = analyze(f, &b, true, false);
    assert_refused(a, what);
    assert_non_null(strstr(a->error.msg, "'mem'"));
    lm_analysis_free(a);
    free(b.d);
    free(img);
}

static void test_mapped_ram_damage(void **state)
{
    fixture *f = *state;
    mr_block blk[1] = { { "mem", 16, 0xffff, 0 } };
    uint8_t *img = malloc(16 * PS);
    buf b = { 0 };
    lm_analysis *a;

    mapped_damaged(f, 0, 2, 4, "header version 2");
    mapped_damaged(f, 4, 8192, 8, "page size 8192");
    mapped_damaged(f, 12, 1ULL << 40, 8, "bitmap");
    mapped_damaged(f, 12, 10, 8, "bitmap");                 /* before the header's end */
    mapped_damaged(f, 20, MIB + 100, 8, "not page aligned");
    mapped_damaged(f, 20, 0, 8, "overlap its bitmap");
    mapped_damaged(f, 20, 1ULL << 40, 8, "past the end");

    /* Truncated inside the pages: the pages would extend past the end. */
    assert_non_null(img);
    build_mapped(&b, blk, 1, img);
    b.len = MIB + 8 * PS;
    a = analyze(f, &b, true, false);
    assert_refused(a, "truncated");
    lm_analysis_free(a);
    free(b.d);
    free(img);
}

/* ------------------------------------------------------------ structural errors */

typedef void (*mutator)(buf *b, const marks *m);

static void mut_magic(buf *b, const marks *m) { (void)m; b->d[0] = 'X'; }
static void mut_version(buf *b, const marks *m) { (void)m; b->d[7] = 2; }
static void mut_record_type(buf *b, const marks *m) { b->d[m->full] = 0x42; }
static void mut_footer(buf *b, const marks *m) { b->d[m->full_end - 5] = 0x7d; }
static void mut_footer_id(buf *b, const marks *m) { b->d[m->full_end - 1] = 9; }
static void mut_part_id(buf *b, const marks *m) { b->d[m->part + 4] = 5; }
static void mut_ram_version(buf *b, const marks *m) { b->d[m->start + 1 + 4 + 4 + 4 + 3] = 5; }
static void mut_device_name(buf *b, const marks *m) { b->d[m->full + 6] = 'G'; }
static void mut_flags(buf *b, const marks *m) { b->d[m->part + 5 + 7] = 0x08 | 0x80; }
static void mut_block_name(buf *b, const marks *m) { b->d[m->part + 5 + 9] = 'q'; }
static void mut_page_offset(buf *b, const marks *m) { b->d[m->part + 5 + 5] = 0x40; }
static void mut_mem_size(buf *b, const marks *m) { b->d[m->start + 17 + 6] = 0x20; }
static void mut_eos(buf *b, const marks *m) { b->d[m->full - 5 - 1] = 0x10 | 0x02; }
static void mut_name_byte(buf *b, const marks *m) { b->d[m->full + 7] = 0x01; }
static void mut_vmdesc_start(buf *b, const marks *m)
{
    /* Move the EOF: the VMDESCRIPTION found at the end is not after it. */
    b->d[m->eof] = 0x08;
}

static const struct {
    const char *name;
    mutator fn;
    const char *what;
} mutations[] = {
    { "magic", mut_magic, "bad magic" },
    { "version", mut_version, "stream version 2" },
    { "record type", mut_record_type, "unknown record type 0x42" },
    { "footer", mut_footer, "expected the section footer" },
    { "footer id", mut_footer_id, "footer names section id 9" },
    { "part id", mut_part_id, "which no START section opened" },
    { "ram version", mut_ram_version, "ram section version 5" },
    { "device name", mut_device_name, "no VMDESCRIPTION entry describes device 'Guest'" },
    { "flags", mut_flags, "RDMA hook" },
    { "block name", mut_block_name, "unknown RAM block 'quest.ram'" },
    { "page offset", mut_page_offset, "outside block 'guest.ram'" },
    { "mem size", mut_mem_size, "MEM_SIZE" },
    { "eos", mut_eos, "EOS record with other flags" },
    { "name byte", mut_name_byte, "not printable ASCII" },
    { "eof", mut_vmdesc_start, NULL },
};

static void test_structural_errors(void **state)
{
    fixture *f = *state;
    uint8_t img_a[4 * PS], img_b[2 * PS];

    for (size_t i = 0; i < sizeof(mutations) / sizeof(mutations[0]); i++) {
        buf b = { 0 };
        marks m;
        lm_analysis *a;
        build_livemig(&b, &m, img_a, img_b);
        mutations[i].fn(&b, &m);
        a = analyze(f, &b, true, false);
        if (!strstr(a->error.msg, "byte offset") ||
            (mutations[i].what && !strstr(a->error.msg, mutations[i].what)))
            fail_msg("mutation '%s': expected '%s' at a byte offset, got: %s", mutations[i].name,
                     mutations[i].what ? mutations[i].what : "", a->error.msg);
        lm_analysis_free(a);
        free(b.d);
    }
}

/* Start `b` afresh: header, a ram START section and its block list -- one
 * block "r" of one page -- with no EOS yet, for the records under test. */
static void b_ram_one_page(buf *b)
{
    b->len = 0;
    b_header(b, "m");
    b_section(b, 1, 1, "ram", 0, 4);
    b_be64(b, PS | 0x04);
    b_str(b, "r");
    b_be64(b, PS);
}

static void test_more_errors(void **state)
{
    fixture *f = *state;
    lm_analysis *a;
    buf b = { 0 };

    /* CONTINUE before any named record. */
    b_ram_one_page(&b);
    b_be64(&b, 0x08 | 0x20);
    a = analyze(f, &b, false, false);
    assert_refused(a, "CONTINUE record with no previous block");
    lm_analysis_free(a);

    /* A compressed page that is not zlib. */
    b_ram_one_page(&b);
    b_be64(&b, 0x100);
    b_str(&b, "r");
    b_be32(&b, 8);
    b_bytes(&b, "garbage!", 8);
    a = analyze(f, &b, false, false);
    assert_refused(a, "does not inflate");
    lm_analysis_free(a);

    /* XBZRLE runs past the page. */
    b_ram_one_page(&b);
    b_be64(&b, 0x40);
    b_str(&b, "r");
    b_u8(&b, 1);
    b_be16(&b, 4);
    b_bytes(&b, "\xff\x7f\x01\x41", 4);   /* unchanged 16383, then 1 byte */
    a = analyze(f, &b, false, false);
    assert_refused(a, "XBZRLE");
    lm_analysis_free(a);

    /* Unknown command, and a command with the wrong length. */
    b.len = 0;
    b_header(&b, "m");
    b_u8(&b, 0x08);
    b_be16(&b, 12);
    b_be16(&b, 0);
    a = analyze(f, &b, false, false);
    assert_refused(a, "unknown command 12");
    lm_analysis_free(a);
    b.len = 0;
    b_header(&b, "m");
    b_u8(&b, 0x08);
    b_be16(&b, 2);
    b_be16(&b, 3);
    b_bytes(&b, "abc", 3);
    a = analyze(f, &b, false, false);
    assert_refused(a, "command PING with a payload of 3 bytes");
    lm_analysis_free(a);
    /* Below a variable command's minimum (reference 6.1: 1+1+1+1+16), and
     * ADVISE's own "0 or 16". */
    b.len = 0;
    b_header(&b, "m");
    b_u8(&b, 0x08);
    b_be16(&b, 6);
    b_be16(&b, 19);
    b_pad_to(&b, b.len + 19);
    a = analyze(f, &b, false, false);
    assert_refused(a, "command POSTCOPY_RAM_DISCARD with a payload of 19 bytes");
    lm_analysis_free(a);
    b.len = 0;
    b_header(&b, "m");
    b_u8(&b, 0x08);
    b_be16(&b, 3);
    b_be16(&b, 8);
    b_pad_to(&b, b.len + 8);
    a = analyze(f, &b, false, false);
    assert_refused(a, "command POSTCOPY_ADVISE with a payload of 8 bytes");
    lm_analysis_free(a);

    /* A section name with a NUL inside: not printable, named at its offset
     * (header 8 + configuration 6: the FULL at 14, its name at 19). */
    b.len = 0;
    b_header(&b, "m");
    b_u8(&b, 0x04);
    b_be32(&b, 1);
    b_u8(&b, 3);
    b_bytes(&b, "d\0v", 3);
    b_be32(&b, 0);
    b_be32(&b, 1);
    a = analyze(f, &b, false, false);
    assert_refused(a, "a section name contains byte 0x00, which is not printable ASCII at "
                   "byte offset 19");
    lm_analysis_free(a);

    /* Command names come from the one table (reference 6.1). */
    assert_string_equal(lm_an_command_name(7), "PACKAGED");
    assert_string_equal(lm_an_command_name(5), "POSTCOPY_RUN");
    assert_string_equal(lm_an_command_name(0), "?");
    assert_string_equal(lm_an_command_name(12), "?");

    /* A device section with no VMDESCRIPTION at all. */
    b.len = 0;
    b_header(&b, "m");
    b_section(&b, 4, 1, "dev", 0, 1);
    b_bytes(&b, "xyz", 3);
    b_footer(&b, 1);
    b_end(&b, NULL);
    a = analyze(f, &b, false, false);
    assert_refused(a, "the file has no VMDESCRIPTION");
    lm_analysis_free(a);

    /* Not a regular file. */
    {
        lm_error err = { 0 };
        assert_true(lm_analyze_file(f->dir, NULL, &a, &err) < 0);
        assert_non_null(strstr(err.msg, "not a regular file"));
        lm_analysis_free(a);
        assert_true(lm_analyze_file("/nonexistent/x.mig", NULL, &a, &err) == -ENOENT);
        lm_analysis_free(a);
    }

    /* Two blocks whose image names collide. */
    b.len = 0;
    b_header(&b, "m");
    b_section(&b, 1, 1, "ram", 0, 4);
    b_be64(&b, 2 * PS | 0x04);
    b_str(&b, "a/b");
    b_be64(&b, PS);
    b_str(&b, "a_b");
    b_be64(&b, PS);
    a = analyze(f, &b, true, false);
    assert_refused(a, "would both be extracted to 'a_b'");
    lm_analysis_free(a);
    free(b.d);
}

/* ------------------------------------------------------------ fuzzing */

/* Every truncation of a valid stream is refused, naming an offset. */
static void test_every_truncation(void **state)
{
    fixture *f = *state;
    buf b = { 0 };
    marks m;
    uint8_t img_a[4 * PS], img_b[2 * PS];
    size_t full;

    build_livemig(&b, &m, img_a, img_b);
    full = b.len;
    for (size_t len = 0; len < full; len++) {
        lm_analysis *a;
        bool in_page = false;
        /* Inside a page payload every cut looks the same: one in 61. */
        for (int k = 0; k < m.npg; k++)
            if (len > m.pg[k] && len < m.pg[k] + PS && len % 61)
                in_page = true;
        if (in_page)
            continue;
        b.len = len;
        a = analyze(f, &b, (len & 7) == 0, false);
        if (!strstr(a->error.msg, "byte offset"))
            fail_msg("truncated to %zu bytes: error names no offset: %s", len, a->error.msg);
        lm_analysis_free(a);
    }
    free(b.d);
}

/*
 * Flip every byte of the stream's structure (and a sample of the page
 * data).  The analyzer must never crash; when it refuses, it names an
 * offset; page data damage is not detectable and may pass.
 */
static void test_every_flip(void **state)
{
    fixture *f = *state;
    buf b = { 0 };
    marks m;
    uint8_t img_a[4 * PS], img_b[2 * PS];
    unsigned refused = 0;

    build_livemig(&b, &m, img_a, img_b);
    for (size_t i = 0; i < b.len; i++) {
        lm_analysis *a;
        lm_analyze_opts o = { .extract_dir = f->exdir };
        lm_error err = { 0 };
        bool in_page = false;
        /* Inside a page payload: one byte in 97 is enough. */
        for (int k = 0; k < m.npg; k++)
            if (i >= m.pg[k] && i < m.pg[k] + PS && i % 97)
                in_page = true;
        if (in_page)
            continue;
        b.d[i] ^= 0xff;
        write_file(f->path, b.d, b.len);
        if (lm_analyze_file(f->path, &o, &a, &err) < 0) {
            refused++;
            if (!strstr(err.msg, "byte offset"))
                fail_msg("flip at %zu: error names no offset: %s", i, err.msg);
        }
        lm_analysis_free(a);
        b.d[i] ^= 0xff;
    }
    assert_true(refused > 100);
    free(b.d);
}

/* Random bytes after a valid header, and random bytes alone. */
static void test_garbage(void **state)
{
    fixture *f = *state;
    uint64_t x = 0x9E3779B97F4A7C15ull;

    for (int round = 0; round < 400; round++) {
        buf b = { 0 };
        size_t n = 1 + (size_t)(x % 3000);
        lm_analysis *a;
        if (round % 2)
            b_header(&b, "pc-q35-7.2");
        if (round % 4 == 1) {   /* a plausible ram START, then garbage */
            b_section(&b, 1, 1, "ram", 0, 4);
            b_be64(&b, 2 * PS | 0x04);
            b_str(&b, "r");
            b_be64(&b, 2 * PS);
        }
        for (size_t i = 0; i < n; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b_u8(&b, (uint8_t)x);
        }
        a = analyze(f, &b, true, false);
        assert_non_null(strstr(a->error.msg, "byte offset"));
        lm_analysis_free(a);
        free(b.d);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_livemig_stream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_json_output, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream_offset, setup, teardown),
        cmocka_unit_test_setup_teardown(test_qemu_encodings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_vmdesc_nested, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mapped_ram, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mapped_ram_damage, setup, teardown),
        cmocka_unit_test_setup_teardown(test_structural_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_more_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_every_truncation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_every_flip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
