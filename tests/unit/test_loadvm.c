/*
 * The stream format and its loader: encode/decode round trips, and every
 * rejection the loader promises (bad magic, version, unknown section, block
 * or id, out-of-range offsets, oversized lengths, truncation at every byte,
 * corruption of every byte), each checked for the words of its message.
 * Streams are built with the real writer into a memfd and fed back through
 * the in-memory reader.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ram/ram.h"
#include "savevm/savevm.h"
#include "stream/stream.h"

#define NPAGES 16
/* the main stream's records: the default sink */
static const ram_sink SINK = { NULL, NULL };
#define BLOCK_LEN (NPAGES * RAM_PAGE_SIZE)

typedef struct buf {
    uint8_t *data;
    size_t len;
} buf;

/* Run `fn` against a writer, return the bytes it produced. */
static buf build(void (*fn)(lm_stream *, void *), void *arg)
{
    int fd = memfd_create("stream", 0);
    lm_stream *s;
    buf b;
    off_t end;

    assert_true(fd >= 0);
    s = stream_new_writer(fd, false);
    fn(s, arg);
    assert_int_equal(stream_flush(s), 0);
    stream_free(s);
    end = lseek(fd, 0, SEEK_END);
    b.len = (size_t)end;
    b.data = malloc(b.len + 1);
    assert_int_equal(pread(fd, b.data, b.len, 0), (ssize_t)b.len);
    close(fd);
    return b;
}

/* ---- a destination: one RAM block and one device ---- */

typedef struct dest {
    ram_state ram;
    uint8_t *mem;
    uint32_t dev_value;
    int dev_loads;
} dest;

static int dev_load(lm_stream *s, void *opaque, uint32_t version, int type)
{
    dest *d = opaque;
    d->dev_loads++;
    return lm_get_be32(s, &d->dev_value) ? -EIO : 0;
}

static int ram_handler(lm_stream *s, void *opaque, uint32_t version, int type)
{
    dest *d = opaque;
    ram_placer pl = ram_direct_placer();

    return ram_load(&d->ram, &pl, s, type) ? -EINVAL : 0;
}

static void dest_init(dest *d)
{
    memset(d, 0, sizeof(*d));
    d->mem = mmap(NULL, BLOCK_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(d->mem != MAP_FAILED);
    assert_int_equal(ram_register(&d->ram, "pc.ram", d->mem, BLOCK_LEN, RAM_PAGE_SIZE, NULL), 0);
}

static void dest_fini(dest *d)
{
    ram_load_finish(&d->ram);
    munmap(d->mem, BLOCK_LEN);
}

static int ram_check(void *opaque, char *why, size_t len)
{
    dest *d = opaque;
    return ram_load_check(&d->ram, why, len);
}

/* OPEN_RETURN_PATH on a destination with nothing to open: accepted. */
static int cmd_accept(const loadvm_cmd *c, void *opaque)
{
    return 0;
}

/* The destination's loader: "ram", "dev" and OPEN_RETURN_PATH. */
static loadvm *dest_loader(dest *d)
{
    loadvm *lv = calloc(1, sizeof(*lv));

    assert_non_null(lv);
    lv->integrity = d->ram.integrity;
    loadvm_add_handler(lv, "ram", 0, RAM_SECTION_VERSION, ram_handler, d)->check =
        ram_check;
    loadvm_add_handler(lv, "dev", 0, 2, dev_load, d);
    assert_int_equal(loadvm_set_command(lv, WIRE_CMD_OPEN_RETURN_PATH, cmd_accept, NULL), 0);
    return lv;
}

/* Load `b` into a fresh destination; returns 0 or -1, message in msg. */
static int load(const buf *b, dest *d, char *msg, size_t msglen)
{
    loadvm *lv = dest_loader(d);
    lm_stream *s = stream_new_mem(b->data, b->len);
    int ret;

    ram_load_start(&d->ram);
    ret = loadvm_run(lv, s);
    if (msg)
        snprintf(msg, msglen, "%s", lm_stream_error_msg(s));
    if (ret)
        assert_true(lm_stream_error(s) != 0);
    stream_free(s);
    free(lv);
    return ret;
}

/* ---- a source: the same block with known content ---- */

typedef struct src {
    ram_state ram;
    uint8_t *mem;
} src;

static void src_init(src *sr)
{
    memset(sr, 0, sizeof(*sr));
    sr->mem = mmap(NULL, BLOCK_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(sr->mem != MAP_FAILED);
    for (int p = 0; p < NPAGES; p++)
        if (p % 3)    /* every third page stays zero */
            memset(sr->mem + p * RAM_PAGE_SIZE, 0x40 + p, RAM_PAGE_SIZE);
    assert_int_equal(ram_register(&sr->ram, "pc.ram", sr->mem, BLOCK_LEN, RAM_PAGE_SIZE, NULL),
                     0);
}

static void write_good(lm_stream *s, void *arg)
{
    src *sr = arg;

    savevm_put_header(s, false, false, sr->ram.integrity);
    savevm_put_command(s, 1, 0, NULL);                 /* OPEN_RETURN_PATH */
    savevm_section_header(s, WIRE_VM_SECTION_START, 1, "ram", 0, 4);
    ram_save_setup(&sr->ram, &SINK, s);
    savevm_section_footer(s, 1);
    ram_save_start(&sr->ram, NULL);
    savevm_section_header(s, WIRE_VM_SECTION_PART, 1, NULL, 0, 0);
    while (!ram_save_some(&sr->ram, &SINK, s, 3 * RAM_PAGE_SIZE))
        ;
    ram_put_eos(&sr->ram, &SINK, s);
    savevm_section_footer(s, 1);
    savevm_section_header(s, WIRE_VM_SECTION_END, 1, NULL, 0, 0);
    ram_put_eos(&sr->ram, &SINK, s);
    savevm_section_footer(s, 1);
    savevm_section_header(s, WIRE_VM_SECTION_FULL, 2, "dev", 0, 2);
    lm_put_be32(s, 0xdeadbeef);
    savevm_section_footer(s, 2);
    savevm_put_eof(s);
    ram_save_finish(&sr->ram);
}

static buf good_stream(src *sr)
{
    src_init(sr);
    return build(write_good, sr);
}

static void test_round_trip(void **state)
{
    src sr;
    dest d;
    char msg[512];
    buf b = good_stream(&sr);

    dest_init(&d);
    assert_int_equal(load(&b, &d, msg, sizeof(msg)), 0);
    assert_memory_equal(d.mem, sr.mem, BLOCK_LEN);
    assert_int_equal(d.dev_value, 0xdeadbeef);
    assert_int_equal(d.dev_loads, 1);
    /* 16 pages, 6 zero: zero records are 9 bytes, CONTINUE after the first */
    assert_int_equal(sr.ram.zero_pages, 6);
    assert_int_equal(sr.ram.normal_pages, 10);
    assert_memory_equal(b.data, "QEVM\0\0\0\3", 8);
    dest_fini(&d);
    free(b.data);
}

static void test_primitives(void **state)
{
    static const uint8_t want[] = { 0x12, 0x12, 0x34, 0x12, 0x34, 0x56, 0x78, 0x01, 0x02,
                                    0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 3, 'a', 'b', 'c' };
    int fd = memfd_create("p", 0);
    lm_stream *s = stream_new_writer(fd, false);
    uint8_t got[sizeof(want)];
    lm_stream *r;
    uint8_t v8;
    uint16_t v16;
    uint32_t v32;
    uint64_t v64;
    char str[256];

    lm_put_u8(s, 0x12);
    lm_put_be16(s, 0x1234);
    lm_put_be32(s, 0x12345678);
    lm_put_be64(s, 0x0102030405060708ULL);
    stream_put_counted(s, "abc");
    assert_int_equal(lm_stream_offset(s), sizeof(want));
    assert_int_equal(stream_flush(s), 0);
    assert_int_equal(pread(fd, got, sizeof(got), 0), sizeof(want));
    assert_memory_equal(got, want, sizeof(want));
    stream_free(s);

    r = stream_new_mem(want, sizeof(want));
    assert_int_equal(lm_get_u8(r, &v8), 0);
    assert_int_equal(v8, 0x12);
    assert_int_equal(lm_get_be16(r, &v16), 0);
    assert_int_equal(v16, 0x1234);
    assert_int_equal(lm_get_be32(r, &v32), 0);
    assert_int_equal(v32, 0x12345678);
    assert_int_equal(lm_get_be64(r, &v64), 0);
    assert_true(v64 == 0x0102030405060708ULL);
    assert_int_equal(stream_get_counted(r, str), 0);
    assert_string_equal(str, "abc");
    assert_true(stream_at_eof(r));
    assert_int_equal(lm_get_u8(r, &v8), -1);
    assert_non_null(strstr(lm_stream_error_msg(r), "truncated at byte offset 19"));
    stream_free(r);
    close(fd);
}

/* ---- malformed streams ---- */

static void expect_error(const buf *b, const char *words1, const char *words2)
{
    dest d;
    char msg[512];

    dest_init(&d);
    assert_int_equal(load(b, &d, msg, sizeof(msg)), -1);
    if (!strstr(msg, words1) || (words2 && !strstr(msg, words2)))
        fail_msg("error '%s' lacks '%s' / '%s'", msg, words1, words2 ? words2 : "");
    dest_fini(&d);
}

static void test_bad_magic(void **state)
{
    src sr;
    buf b = good_stream(&sr);

    b.data[0] = 'X';
    expect_error(&b, "bad magic", "byte offset 0");
    free(b.data);
}

static void test_bad_version(void **state)
{
    src sr;
    buf b = good_stream(&sr);

    b.data[7] = 2;
    expect_error(&b, "unsupported stream version 2", "byte offset 4");
    free(b.data);
}

static void w_unknown_section(lm_stream *s, void *arg)
{
    savevm_put_header(s, false, false, false);
    savevm_section_header(s, WIRE_VM_SECTION_FULL, 7, "nosuch", 0, 1);
    savevm_section_footer(s, 7);
    savevm_put_eof(s);
}

static void test_unknown_section(void **state)
{
    buf b = build(w_unknown_section, NULL);
    expect_error(&b, "unknown section 'nosuch'", "byte offset 22");
    free(b.data);
}

static void w_unknown_instance(lm_stream *s, void *arg)
{
    savevm_put_header(s, false, false, false);
    savevm_section_header(s, WIRE_VM_SECTION_FULL, 7, "dev", 3, 1);
    savevm_put_eof(s);
}

static void test_unknown_instance(void **state)
{
    buf b = build(w_unknown_instance, NULL);
    expect_error(&b, "unknown section 'dev' instance 3", NULL);
    free(b.data);
}

static void w_new_version(lm_stream *s, void *arg)
{
    savevm_put_header(s, false, false, false);
    savevm_section_header(s, WIRE_VM_SECTION_FULL, 7, "dev", 0, 3);
    savevm_put_eof(s);
}

static void test_version_too_new(void **state)
{
    buf b = build(w_new_version, NULL);
    expect_error(&b, "version 3", "up to 2");
    free(b.data);
}

/* A ram START with the block list, then whatever `extra` writes. */
typedef void (*extra_fn)(lm_stream *s);

static void w_ram(lm_stream *s, void *arg)
{
    extra_fn extra = (extra_fn)arg;

    savevm_put_header(s, false, false, false);
    savevm_section_header(s, WIRE_VM_SECTION_START, 1, "ram", 0, 4);
    lm_put_be64(s, BLOCK_LEN | RAM_MEM_SIZE);
    stream_put_counted(s, "pc.ram");
    lm_put_be64(s, BLOCK_LEN);
    extra(s);
}

static void x_unknown_block(lm_stream *s)
{
    lm_put_be64(s, 0 | RAM_PAGE);
    stream_put_counted(s, "other.ram");
}

static void x_page_out_of_range(lm_stream *s)
{
    lm_put_be64(s, BLOCK_LEN | RAM_ZERO);
    stream_put_counted(s, "pc.ram");
    lm_put_u8(s, 0);
}

static void x_huge_offset(lm_stream *s)
{
    lm_put_be64(s, 0xfffffffffffff000ULL | RAM_PAGE);
    stream_put_counted(s, "pc.ram");
}

static void x_continue_first(lm_stream *s)
{
    lm_put_be64(s, 0 | RAM_PAGE | RAM_CONTINUE);
}

static void x_bad_flags(lm_stream *s)
{
    lm_put_be64(s, 0 | RAM_XBZRLE);
}

static void x_bad_footer(lm_stream *s)
{
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 9);
}

static void x_part_unknown_id(lm_stream *s)
{
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 1);
    savevm_section_header(s, WIRE_VM_SECTION_PART, 5, NULL, 0, 0);
}

static void x_unknown_record(lm_stream *s)
{
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 1);
    lm_put_u8(s, 0x42);
}

static void x_bad_command(lm_stream *s)
{
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 1);
    savevm_put_command(s, 2, 7, "1234567");   /* PING must be 4 bytes */
}

static void x_unknown_command(lm_stream *s)
{
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 1);
    savevm_put_command(s, 99, 0, NULL);
}

static void x_second_mem_size(lm_stream *s)
{
    lm_put_be64(s, BLOCK_LEN | RAM_MEM_SIZE);
}

static void x_no_eof(lm_stream *s)
{
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 1);
}

static void ram_case(extra_fn fn, const char *w1, const char *w2)
{
    buf b = build(w_ram, (void *)fn);
    expect_error(&b, w1, w2);
    free(b.data);
}

static void test_ram_rejections(void **state)
{
    ram_case(x_unknown_block, "unknown RAM block 'other.ram'", "byte offset 62");
    ram_case(x_page_out_of_range, "outside RAM block 'pc.ram'", "byte offset 62");
    ram_case(x_huge_offset, "outside RAM block", NULL);
    ram_case(x_continue_first, "CONTINUE record with no previous block", "byte offset 62");
    ram_case(x_bad_flags, "unsupported record flags 0x40", "byte offset 62");
    ram_case(x_bad_footer, "bad footer", "byte offset 70");
    ram_case(x_part_unknown_id, "section id 5", "never started");
    ram_case(x_unknown_record, "unknown record type 0x42", "byte offset 75");
    ram_case(x_bad_command, "bad length 7", NULL);
    ram_case(x_unknown_command, "unsupported command 99", NULL);
    ram_case(x_second_mem_size, "unexpected MEM_SIZE", NULL);
    ram_case(x_no_eof, "truncated", "byte offset 75");
}

static void w_wrong_total(lm_stream *s, void *arg)
{
    savevm_put_header(s, false, false, false);
    savevm_section_header(s, WIRE_VM_SECTION_START, 1, "ram", 0, 4);
    lm_put_be64(s, (uint64_t)arg | RAM_MEM_SIZE);
    stream_put_counted(s, "pc.ram");
    lm_put_be64(s, 2 * BLOCK_LEN);
}

static void test_oversized_lengths(void **state)
{
    buf b = build(w_wrong_total, (void *)(uintptr_t)(2 * BLOCK_LEN));
    expect_error(&b, "stream has 131072 bytes of RAM", "this guest has 65536");
    free(b.data);
    b = build(w_wrong_total, (void *)(uintptr_t)BLOCK_LEN);
    expect_error(&b, "RAM block 'pc.ram' is 131072 bytes in the stream but 65536 here", NULL);
    free(b.data);
}

static void w_wrong_machine(lm_stream *s, void *arg)
{
    lm_put_be32(s, WIRE_QEVM_MAGIC);
    lm_put_be32(s, 3);
    lm_put_u8(s, WIRE_VM_CONFIGURATION);
    lm_put_be32(s, 10);
    lm_put_buffer(s, "pc-q35-7.2", 10);
    savevm_put_eof(s);
}

static void test_wrong_machine(void **state)
{
    buf b = build(w_wrong_machine, NULL);
    expect_error(&b, "machine type 'pc-q35-7.2'", NULL);
    free(b.data);
}

/* ---- complete means complete: EOF before everything arrived ---- */

static void w_empty(lm_stream *s, void *arg)
{
    savevm_put_header(s, false, false, false);
    savevm_put_eof(s);
}

static void test_empty_stream(void **state)
{
    buf b = build(w_empty, NULL);
    /* header 8 + configuration 14: EOF at 22 */
    expect_error(&b, "EOF at byte offset 22", "no RAM block list");
    expect_error(&b, "device 'dev' instance 0: no state", NULL);
    free(b.data);
}

static void x_list_then_eof(lm_stream *s)
{
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 1);
    savevm_put_eof(s);
}

/* The block list, one page, END, the device; 15 pages never sent. */
static void x_pages_missing(lm_stream *s)
{
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 1);
    savevm_section_header(s, WIRE_VM_SECTION_END, 1, NULL, 0, 0);
    lm_put_be64(s, 0 | RAM_ZERO);
    stream_put_counted(s, "pc.ram");
    lm_put_u8(s, 0);
    lm_put_be64(s, RAM_EOS);
    savevm_section_footer(s, 1);
    savevm_section_header(s, WIRE_VM_SECTION_FULL, 2, "dev", 0, 2);
    lm_put_be32(s, 1);
    savevm_section_footer(s, 2);
    savevm_put_eof(s);
}

/* Header, the ram START, all of RAM in one END: a stream without devices. */
static void w_ram_whole(lm_stream *s, src *sr)
{
    savevm_put_header(s, false, false, false);
    savevm_section_header(s, WIRE_VM_SECTION_START, 1, "ram", 0, 4);
    ram_save_setup(&sr->ram, &SINK, s);
    savevm_section_footer(s, 1);
    ram_save_start(&sr->ram, NULL);
    savevm_section_header(s, WIRE_VM_SECTION_END, 1, NULL, 0, 0);
    while (!ram_save_some(&sr->ram, &SINK, s, UINT64_MAX))
        ;
    ram_put_eos(&sr->ram, &SINK, s);
    savevm_section_footer(s, 1);
}

/* The good stream with its device section left out. */
static void w_no_device(lm_stream *s, void *arg)
{
    src *sr = arg;

    w_ram_whole(s, sr);
    if (arg && ((src *)arg)->mem[0] == 0xdd) {   /* the device twice */
        for (int i = 0; i < 2; i++) {
            savevm_section_header(s, WIRE_VM_SECTION_FULL, 2, "dev", 0, 2);
            lm_put_be32(s, 7);
            savevm_section_footer(s, 2);
        }
    }
    savevm_put_eof(s);
    ram_save_finish(&sr->ram);
}

static void test_incomplete_streams(void **state)
{
    src sr;
    buf b;

    ram_case(x_list_then_eof, "before everything this side registered arrived",
             "no END of the ram section");
    ram_case(x_list_then_eof, "RAM block 'pc.ram': 16 of 16 pages never arrived", NULL);
    ram_case(x_pages_missing, "RAM block 'pc.ram': 15 of 16 pages never arrived",
             "the first at offset 0x1000");
    src_init(&sr);
    b = build(w_no_device, &sr);
    expect_error(&b, "device 'dev' instance 0: no state", "EOF at byte offset");
    free(b.data);
    munmap(sr.mem, BLOCK_LEN);

    src_init(&sr);
    sr.mem[0] = 0xdd;
    b = build(w_no_device, &sr);
    expect_error(&b, "after that section's last", "byte offset");
    free(b.data);
    munmap(sr.mem, BLOCK_LEN);
}

/* Every strict prefix of a valid stream fails, and says "truncated". */
static void test_truncated_everywhere(void **state)
{
    src sr;
    buf b = good_stream(&sr);

    for (size_t n = 0; n < b.len; n++) {
        buf t = { b.data, n };
        dest d;
        char msg[512];

        dest_init(&d);
        if (load(&t, &d, msg, sizeof(msg)) != -1)
            fail_msg("prefix of %zu bytes loaded", n);
        if (!strstr(msg, "truncated") && !strstr(msg, "bad magic"))
            fail_msg("prefix %zu: '%s'", n, msg);
        dest_fini(&d);
    }
    free(b.data);
}

/* Flipping any byte never crashes or writes outside the block (ASan
 * watches); a load that still succeeds must have changed only page data. */
static void test_corrupted_everywhere(void **state)
{
    src sr;
    buf b = good_stream(&sr);
    int failed = 0;

    for (size_t i = 0; i < b.len; i += (i < 200 ? 1 : 97)) {
        dest d;
        uint8_t saved = b.data[i];

        b.data[i] ^= 0x5a;
        dest_init(&d);
        if (load(&b, &d, NULL, 0))
            failed++;
        dest_fini(&d);
        b.data[i] = saved;
    }
    assert_true(failed > 100);
    free(b.data);
}

/* ---- x-integrity: a checksum after every ZERO and PAGE payload ---- */

/*
 * The encoding, byte for byte: the configuration lists x-integrity, and a
 * stream with checksums is exactly one be64 per page record longer; it
 * loads into an integrity destination, and each side refuses the other's
 * setting at the configuration.
 */
static void test_integrity_round_trip(void **state)
{
    src plain, sr;
    buf b0 = good_stream(&plain), b;
    dest d;
    char msg[512];
    static const char caps[] = "\x05\x1a" "configuration/capabilities" "\0\0\0\1" "\0\0\0\1"
                               "\x0b" "x-integrity";

    src_init(&sr);
    sr.ram.integrity = true;
    b = build(write_good, &sr);
    assert_int_equal(b.len, b0.len + (sizeof(caps) - 1) + 8 * NPAGES);
    assert_memory_equal(b.data + 22, caps, sizeof(caps) - 1);

    dest_init(&d);
    d.ram.integrity = true;
    assert_int_equal(load(&b, &d, msg, sizeof(msg)), 0);
    assert_memory_equal(d.mem, sr.mem, BLOCK_LEN);
    dest_fini(&d);

    dest_init(&d);
    assert_int_not_equal(load(&b, &d, msg, sizeof(msg)), 0);
    assert_non_null(strstr(msg, "saved with x-integrity"));
    assert_non_null(strstr(msg, "capability off"));
    dest_fini(&d);

    dest_init(&d);
    d.ram.integrity = true;
    assert_int_not_equal(load(&b0, &d, msg, sizeof(msg)), 0);
    assert_non_null(strstr(msg, "saved without x-integrity"));
    dest_fini(&d);
    free(b.data);
    free(b0.data);
}

/*
 * Every byte of every page record's payload and checksum matters: a flip
 * anywhere in them fails the load with the page named (a flip in a
 * record's header or idstr is caught by the other checks or the sum).  The
 * record offsets come from a walk of the stream as the encoding says.
 */
static void test_integrity_every_flip(void **state)
{
    src sr;
    buf b;
    int records = 0;
    size_t pos;

    src_init(&sr);
    sr.ram.integrity = true;
    b = build(write_good, &sr);
    /* the PART section's first record: be64 word, counted idstr */
    {
        static const uint8_t part[] = { WIRE_VM_SECTION_PART, 0, 0, 0, 1 };
        uint8_t *p = memmem(b.data + 40, b.len - 40, part, sizeof(part));
        assert_non_null(p);
        pos = (size_t)(p - b.data) + sizeof(part);
    }
    for (;;) {
        uint64_t word = 0, flags;
        size_t payload, len;

        for (int i = 0; i < 8; i++)
            word = word << 8 | b.data[pos + i];
        flags = word & ~RAM_PAGE_MASK;
        if (flags == RAM_EOS)
            break;
        payload = pos + 8 + ((flags & RAM_CONTINUE) ? 0 : 1 + b.data[pos + 8]);
        len = ((flags & ~(uint64_t)RAM_CONTINUE) == RAM_PAGE ? RAM_PAGE_SIZE : 1) + 8;
        for (size_t i = payload; i < payload + len; i += (len > 9 ? 509 : 1)) {
            dest d;
            char msg[512], want[64];

            b.data[i] ^= 0x04;
            dest_init(&d);
            d.ram.integrity = true;
            assert_int_not_equal(load(&b, &d, msg, sizeof(msg)), 0);
            snprintf(want, sizeof(want), "integrity: page 0x%" PRIx64 " of RAM block 'pc.ram'",
                     (uint64_t)(word & RAM_PAGE_MASK));
            if (!strstr(msg, want) || !strstr(msg, "main stream, record at byte offset"))
                fail_msg("flip at %zu: '%s'", i, msg);
            dest_fini(&d);
            b.data[i] ^= 0x04;
        }
        pos = payload + len;
        records++;
    }
    assert_int_equal(records, NPAGES);
    free(b.data);
    ram_save_finish(&sr.ram);
}

/* ---- commands: the dispatch table ---- */

/* What a command handler saw. */
typedef struct seen {
    int calls;
    uint16_t cmd, len;
    uint64_t at;
    uint8_t data[64];
    int ret;                  /* what the handler returns */
} seen;

static int cmd_record(const loadvm_cmd *c, void *opaque)
{
    seen *w = opaque;

    w->calls++;
    w->cmd = c->cmd;
    w->len = c->len;
    w->at = c->at;
    assert_true(c->len <= sizeof(w->data));
    if (c->len)
        memcpy(w->data, c->data, c->len);
    /* the payload is consumed before the handler runs */
    assert_int_equal(lm_stream_offset(c->s), c->at + 5 + c->len);
    return w->ret;
}

/* The header, then the bytes in arg (raw records), then EOF. */
typedef struct raw {
    const void *p;
    size_t len;
} raw;

static void w_raw(lm_stream *s, void *arg)
{
    const raw *r = arg;

    savevm_put_header(s, false, false, false);
    lm_put_buffer(s, r->p, r->len);
    savevm_put_eof(s);
}

/* Load header + rec + EOF with `lv` (no section handlers: EOF is complete). */
static int load_raw(loadvm *lv, const void *rec, size_t len, char *msg, size_t msglen)
{
    raw r = { rec, len };
    buf b = build(w_raw, &r);
    lm_stream *s = stream_new_mem(b.data, b.len);
    int ret = loadvm_run(lv, s);

    snprintf(msg, msglen, "%s", lm_stream_error_msg(s));
    stream_free(s);
    free(b.data);
    return ret;
}

static void expect_words(const char *msg, const char *w1, const char *w2)
{
    if (!strstr(msg, w1) || (w2 && !strstr(msg, w2)))
        fail_msg("error '%s' lacks '%s' / '%s'", msg, w1, w2 ? w2 : "");
}

static void test_command_dispatch(void **state)
{
    loadvm *lv = calloc(1, sizeof(*lv));
    seen ping = { 0 }, bitmap = { 0 };
    char msg[512];

    /* A command with a handler gets its payload and offset (header: 22). */
    assert_int_equal(loadvm_set_command(lv, WIRE_CMD_PING, cmd_record, &ping), 0);
    assert_int_equal(load_raw(lv, "\x08\0\x02\0\x04\0\0\0\x07", 9, msg, sizeof(msg)), 0);
    assert_int_equal(ping.calls, 1);
    assert_int_equal(ping.cmd, WIRE_CMD_PING);
    assert_int_equal(ping.len, 4);
    assert_int_equal(ping.at, 22);
    assert_int_equal(wire_be32(ping.data), 7);

    /* A variable-length one gets exactly its bytes. */
    assert_int_equal(loadvm_set_command(lv, WIRE_CMD_RECV_BITMAP, cmd_record, &bitmap), 0);
    assert_int_equal(load_raw(lv, "\x08\0\x0a\0\x04\x03" "abc", 9, msg, sizeof(msg)), 0);
    assert_int_equal(bitmap.len, 4);
    assert_memory_equal(bitmap.data, "\3abc", 4);

    /* A command this side has no handler for: refused, with its name. */
    assert_int_equal(load_raw(lv, "\x08\0\x04\0\0", 5, msg, sizeof(msg)), -1);
    expect_words(msg, "unsupported command 4 (POSTCOPY_LISTEN, length 0) at byte offset 22",
                 "no handler");
    /* A number that is no command at all. */
    assert_int_equal(load_raw(lv, "\x08\0\x0c\0\0", 5, msg, sizeof(msg)), -1);
    expect_words(msg, "unsupported command 12 (length 0) at byte offset 22", NULL);
    assert_int_equal(load_raw(lv, "\x08\0\0\0\0", 5, msg, sizeof(msg)), -1);
    expect_words(msg, "unsupported command 0", "byte offset 22");
    /* A wrong fixed length, with or without a handler; and below a minimum. */
    assert_int_equal(load_raw(lv, "\x08\0\x02\0\x03" "abc", 8, msg, sizeof(msg)), -1);
    expect_words(msg, "command 2 with bad length 3 at byte offset 22", NULL);
    assert_int_equal(load_raw(lv, "\x08\0\x07\0\x03" "abc", 8, msg, sizeof(msg)), -1);
    expect_words(msg, "command 7 with bad length 3 at byte offset 22", NULL);
    assert_int_equal(load_raw(lv, "\x08\0\x0a\0\0", 5, msg, sizeof(msg)), -1);
    expect_words(msg, "command 10 with bad length 0 at byte offset 22", NULL);
    assert_int_equal(ping.calls, 1);

    /* A handler that fails: the loader names the command and the offset. */
    ping.ret = -EPIPE;
    assert_int_equal(load_raw(lv, "\x08\0\x02\0\x04\0\0\0\x07", 9, msg, sizeof(msg)), -1);
    expect_words(msg, "command 2 (PING) at byte offset 22 failed", strerror(EPIPE));

    /* Detached again: refused again.  Numbers outside the table: -EINVAL. */
    assert_int_equal(loadvm_set_command(lv, WIRE_CMD_PING, NULL, NULL), 0);
    assert_int_equal(load_raw(lv, "\x08\0\x02\0\x04\0\0\0\x07", 9, msg, sizeof(msg)), -1);
    expect_words(msg, "unsupported command 2 (PING", NULL);
    assert_int_equal(loadvm_set_command(lv, WIRE_CMD_INVALID, cmd_record, NULL), -EINVAL);
    assert_int_equal(loadvm_set_command(lv, WIRE_CMD__MAX, cmd_record, NULL), -EINVAL);
    free(lv);
}

/* ---- packages: the record loop over a blob, no header ---- */

/* POSTCOPY_RUN's part in a nested loop: end it. */
static int cmd_quit(const loadvm_cmd *c, void *opaque)
{
    (*(int *)opaque)++;
    return LOADVM_QUIT;
}

enum { PKG_PLAIN, PKG_RUN, PKG_RUN_NO_DEV, PKG_BAD_FOOTER };

/* The device's FULL section [0, 26), PING(3) [26, 35); PKG_RUN adds
 * POSTCOPY_RUN [35, 40) and then a byte that is no record. */
static void w_package(lm_stream *s, void *arg)
{
    int kind = (int)(uintptr_t)arg;

    if (kind != PKG_RUN_NO_DEV) {
        savevm_section_header(s, WIRE_VM_SECTION_FULL, 2, "dev", 0, 2);
        lm_put_be32(s, 0xfeedf00d);
        savevm_section_footer(s, kind == PKG_BAD_FOOTER ? 3 : 2);
        savevm_put_command(s, WIRE_CMD_PING, 4, "\0\0\0\3");
    }
    if (kind == PKG_RUN || kind == PKG_RUN_NO_DEV) {
        savevm_put_command(s, WIRE_CMD_POSTCOPY_RUN, 0, NULL);
        lm_put_u8(s, 0x42);
    }
}

static void test_package_records(void **state)
{
    buf blob = build(w_package, (void *)(uintptr_t)PKG_PLAIN);
    seen ping = { 0 };
    int runs = 0;

    assert_int_equal(blob.len, 35);
    /* Its end is the end of the blob: at a record boundary that ends the
     * loop (no EOF record, no completeness check: RAM never came); inside a
     * record it is a truncation. */
    for (size_t n = 0; n <= blob.len; n++) {
        dest d;
        loadvm *lv;
        lm_stream *s = stream_new_mem(blob.data, n);
        int ret;

        dest_init(&d);
        lv = dest_loader(&d);
        loadvm_set_command(lv, WIRE_CMD_PING, cmd_record, &ping);
        ret = loadvm_run_records(lv, s, LOADVM_PACKAGE);
        if (n == 0 || n == 26 || n == 35) {
            if (ret != LOADVM_END)
                fail_msg("blob cut to %zu bytes: %d, '%s'", n, ret, lm_stream_error_msg(s));
            assert_int_equal(d.dev_loads, n ? 1 : 0);
        } else {
            assert_int_equal(ret, -1);
            expect_words(lm_stream_error_msg(s), "truncated", NULL);
        }
        if (n == 35) {
            assert_int_equal(d.dev_value, 0xfeedf00d);
            assert_int_equal(ping.at, 26);
            assert_int_equal(wire_be32(ping.data), 3);
        }
        stream_free(s);
        free(lv);
        dest_fini(&d);
    }
    free(blob.data);

    /* An EOF record inside a package is refused (QEMU writes none). */
    {
        dest d;
        loadvm *lv;
        uint8_t bytes[36];
        lm_stream *s;

        blob = build(w_package, (void *)(uintptr_t)PKG_PLAIN);
        memcpy(bytes, blob.data, 35);
        bytes[35] = WIRE_VM_EOF;
        s = stream_new_mem(bytes, sizeof(bytes));
        dest_init(&d);
        lv = dest_loader(&d);
        loadvm_set_command(lv, WIRE_CMD_PING, cmd_record, &ping);
        assert_int_equal(loadvm_run_records(lv, s, LOADVM_PACKAGE), -1);
        expect_words(lm_stream_error_msg(s), "EOF record inside a package at byte offset 35",
                     NULL);
        stream_free(s);
        free(lv);
        dest_fini(&d);
        free(blob.data);
    }

    /* A command that ends the loop (POSTCOPY_RUN): the loop stops right after
     * it and never reads what follows. */
    {
        dest d;
        loadvm *lv;
        lm_stream *s;

        blob = build(w_package, (void *)(uintptr_t)PKG_RUN);
        s = stream_new_mem(blob.data, blob.len);
        dest_init(&d);
        lv = dest_loader(&d);
        loadvm_set_command(lv, WIRE_CMD_PING, cmd_record, &ping);
        loadvm_set_command(lv, WIRE_CMD_POSTCOPY_RUN, cmd_quit, &runs);
        assert_int_equal(loadvm_run_records(lv, s, LOADVM_PACKAGE), LOADVM_QUIT);
        assert_int_equal(runs, 1);
        assert_int_equal(lm_stream_offset(s), 40);
        assert_int_equal(lm_stream_error(s), 0);
        assert_int_equal(d.dev_loads, 1);
        stream_free(s);
        free(lv);
        dest_fini(&d);
        free(blob.data);
    }
}

/*
 * PACKAGED the way postcopy will drive it, with a handler of the test's:
 * read the blob that follows the command, run the nested loop over it, pass
 * a QUIT on.  Then the rest of the main stream is read by a second MAIN loop
 * (as QEMU's listen thread does), whose EOF runs the completeness check.
 */
typedef struct pkg_stream {
    src *sr;
    const buf *blob;
} pkg_stream;

static void w_packaged(lm_stream *s, void *arg)
{
    pkg_stream *p = arg;
    src *sr = p->sr;

    w_ram_whole(s, sr);
    lm_put_u8(s, WIRE_VM_COMMAND);
    lm_put_be16(s, WIRE_CMD_PACKAGED);
    lm_put_be16(s, 4);
    lm_put_be32(s, (uint32_t)p->blob->len);
    lm_put_buffer(s, p->blob->data, p->blob->len);
    savevm_put_command(s, WIRE_CMD_PING, 4, "\0\0\0\4");
    savevm_put_eof(s);
    ram_save_finish(&sr->ram);
}

static int cmd_packaged(const loadvm_cmd *c, void *opaque)
{
    uint32_t n = wire_be32(c->data);
    uint64_t at = lm_stream_offset(c->s);
    uint8_t *blob = malloc(n ? n : 1);
    lm_stream *ps;
    int ret;

    assert_non_null(blob);
    if (lm_get_buffer(c->s, blob, n)) {
        free(blob);
        return -EIO;
    }
    ps = stream_new_mem(blob, n);
    ret = loadvm_run_records(c->lv, ps, LOADVM_PACKAGE);
    if (ret < 0)
        lm_stream_set_error(c->s, lm_stream_error(ps), "in the package at byte offset %llu: "
                            "%s", (unsigned long long)at, lm_stream_error_msg(ps));
    stream_free(ps);
    free(blob);
    return ret < 0 ? -EINVAL : ret == LOADVM_QUIT ? LOADVM_QUIT : 0;
}

/* Load the packaged stream around `kind`'s blob: loadvm_run, then (after a
 * QUIT) the rest.  Returns the last result; message in msg. */
static int load_packaged(int kind, dest *d, src *sr, seen *ping, char *msg, size_t msglen)
{
    buf blob = build(w_package, (void *)(uintptr_t)kind);
    pkg_stream p = { sr, &blob };
    buf b;
    loadvm *lv;
    lm_stream *s;
    int runs = 0, ret;

    src_init(sr);
    b = build(w_packaged, &p);
    dest_init(d);
    lv = dest_loader(d);
    loadvm_set_command(lv, WIRE_CMD_PING, cmd_record, ping);
    loadvm_set_command(lv, WIRE_CMD_POSTCOPY_RUN, cmd_quit, &runs);
    loadvm_set_command(lv, WIRE_CMD_PACKAGED, cmd_packaged, NULL);
    ram_load_start(&d->ram);
    s = stream_new_mem(b.data, b.len);
    ret = loadvm_run(lv, s);
    if (ret == LOADVM_QUIT) {
        assert_int_equal(runs, 1);
        ret = loadvm_run_records(lv, s, LOADVM_MAIN);
    }
    snprintf(msg, msglen, "%s", lm_stream_error_msg(s));
    stream_free(s);
    free(lv);
    free(b.data);
    free(blob.data);
    return ret;
}

static void test_packaged_stream(void **state)
{
    src sr;
    dest d;
    seen ping = { 0 };
    char msg[512];

    /* The device's state comes in the package; PING 4 after it, on the rest. */
    assert_int_equal(load_packaged(PKG_RUN, &d, &sr, &ping, msg, sizeof(msg)), LOADVM_EOF);
    assert_int_equal(d.dev_value, 0xfeedf00d);
    assert_memory_equal(d.mem, sr.mem, BLOCK_LEN);
    assert_int_equal(ping.calls, 2);
    assert_int_equal(wire_be32(ping.data), 4);
    dest_fini(&d);
    munmap(sr.mem, BLOCK_LEN);

    /* A package without RUN just ends; the same loop goes on to EOF. */
    ping.calls = 0;
    assert_int_equal(load_packaged(PKG_PLAIN, &d, &sr, &ping, msg, sizeof(msg)), 0);
    assert_int_equal(ping.calls, 2);
    dest_fini(&d);
    munmap(sr.mem, BLOCK_LEN);

    /* The end of a package checks nothing; the main stream's EOF does. */
    assert_int_equal(load_packaged(PKG_RUN_NO_DEV, &d, &sr, &ping, msg, sizeof(msg)), -1);
    expect_words(msg, "device 'dev' instance 0: no state", "EOF at byte offset");
    dest_fini(&d);
    munmap(sr.mem, BLOCK_LEN);

    /* An error inside: offsets count from the blob, the handler says where
     * the blob is. */
    assert_int_equal(load_packaged(PKG_BAD_FOOTER, &d, &sr, &ping, msg, sizeof(msg)), -1);
    expect_words(msg, "in the package at byte offset", "bad footer at byte offset 21 (found "
                 "0x7e id 3)");
    dest_fini(&d);
    munmap(sr.mem, BLOCK_LEN);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_primitives),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_bad_magic),
        cmocka_unit_test(test_bad_version),
        cmocka_unit_test(test_unknown_section),
        cmocka_unit_test(test_unknown_instance),
        cmocka_unit_test(test_version_too_new),
        cmocka_unit_test(test_ram_rejections),
        cmocka_unit_test(test_oversized_lengths),
        cmocka_unit_test(test_wrong_machine),
        cmocka_unit_test(test_empty_stream),
        cmocka_unit_test(test_incomplete_streams),
        cmocka_unit_test(test_truncated_everywhere),
        cmocka_unit_test(test_corrupted_everywhere),
        cmocka_unit_test(test_integrity_round_trip),
        cmocka_unit_test(test_integrity_every_flip),
        cmocka_unit_test(test_command_dispatch),
        cmocka_unit_test(test_package_records),
        cmocka_unit_test(test_packaged_stream),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
