/*
 * Postcopy's destination commands (src/postcopy): ADVISE checked against
 * this side's page sizes, RAM_DISCARD parsed as a hostile peer could send it
 * (every malformed field refused, nothing applied unless all of it is
 * valid), and applying them really drops the pages (they read as zero) and
 * clears their received bits.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "postcopy/postcopy.h"
#include "savevm/wire.h"
#include "util/bitmap.h"

#define NPAGES 16
#define LEN (NPAGES * RAM_PAGE_SIZE)

static void be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (56 - 8 * i));
}

/* version 0, name, 0, then the ranges (start, length) in bytes */
static uint16_t cmd(uint8_t *buf, const char *name, const uint64_t *r, int n, uint8_t version)
{
    size_t nl = strlen(name), at = 2 + nl + 1;

    buf[0] = version;
    buf[1] = (uint8_t)nl;
    memcpy(buf + 2, name, nl);
    buf[2 + nl] = 0;
    for (int k = 0; k < n; k++) {
        be64(buf + at + 16 * k, r[2 * k]);
        be64(buf + at + 16 * k + 8, r[2 * k + 1]);
    }
    return (uint16_t)(at + 16 * n);
}

typedef struct dest {
    ram_state ram;
    uint8_t *mem;
} dest;

static void dest_init(dest *d)
{
    memset(d, 0, sizeof(*d));
    d->mem = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(d->mem != MAP_FAILED);
    memset(d->mem, 0xab, LEN);
    assert_int_equal(ram_register(&d->ram, "pc.ram", d->mem, LEN, RAM_PAGE_SIZE, NULL), 0);
    ram_load_start(&d->ram);
    bitmap_fill(d->ram.blocks[0].rmap, NPAGES);
}

static void dest_fini(dest *d)
{
    ram_load_finish(&d->ram);
    munmap(d->mem, LEN);
}

static void test_advise(void **state)
{
    uint8_t b[16];
    lm_error err = { 0 };
    dest d;

    (void)state;
    assert_int_equal(postcopy_check_advise(NULL, 0, &err), 0);
    be64(b, RAM_PAGE_SIZE);
    be64(b + 8, RAM_PAGE_SIZE);
    assert_int_equal(postcopy_check_advise(b, 16, &err), 0);
    assert_int_equal(postcopy_check_advise(b, 8, &err), -EINVAL);
    be64(b, RAM_PAGE_SIZE | (2 << 20));                 /* huge pages at the source */
    assert_int_equal(postcopy_check_advise(b, 16, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "no huge pages"));
    be64(b, RAM_PAGE_SIZE);
    be64(b + 8, 8192);
    assert_int_equal(postcopy_check_advise(b, 16, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "target page size is 8192"));
    /* applied: all of RAM reads as zero, nothing counts as received */
    dest_init(&d);
    assert_int_equal(postcopy_discard_all(&d.ram, &err), 0);
    for (size_t i = 0; i < LEN; i += 997)
        assert_int_equal(d.mem[i], 0);
    assert_int_equal(bitmap_count(d.ram.blocks[0].rmap, NPAGES), 0);
    dest_fini(&d);
}

static void expect_bad(dest *d, const uint8_t *buf, uint16_t len, const char *words)
{
    postcopy_range r[POSTCOPY_DISCARD_MAX_RANGES];
    lm_error err = { 0 };
    int n = -1;

    assert_true(postcopy_parse_discard(&d->ram, buf, len, r, &n, &err) < 0);
    assert_int_equal(n, 0);
    if (!strstr(err.msg, words))
        fail_msg("'%s' lacks '%s'", err.msg, words);
}

static void test_discard(void **state)
{
    uint8_t buf[512];
    postcopy_range r[POSTCOPY_DISCARD_MAX_RANGES];
    lm_error err = { 0 };
    uint64_t good[] = { 2 * RAM_PAGE_SIZE, 3 * RAM_PAGE_SIZE, 10 * RAM_PAGE_SIZE, RAM_PAGE_SIZE };
    uint64_t many[2 * 13];
    uint16_t len;
    dest d;
    int n;

    (void)state;
    dest_init(&d);
    len = cmd(buf, "pc.ram", good, 2, 0);
    assert_int_equal(postcopy_parse_discard(&d.ram, buf, len, r, &n, &err), 0);
    assert_int_equal(n, 2);
    assert_int_equal(postcopy_apply_discard(r, n, &err), 0);
    for (int p = 0; p < NPAGES; p++) {
        bool dropped = (p >= 2 && p < 5) || p == 10;
        assert_int_equal(d.mem[p * RAM_PAGE_SIZE + 7], dropped ? 0 : 0xab);
        assert_int_equal(bitmap_test(d.ram.blocks[0].rmap, p), !dropped);
    }

    /* malformed: each refused, naming what */
    expect_bad(&d, buf, 3, "too short");
    len = cmd(buf, "pc.ram", good, 1, 1);
    expect_bad(&d, buf, len, "version 1");
    len = cmd(buf, "nosuch", good, 1, 0);
    expect_bad(&d, buf, len, "unknown RAM block 'nosuch'");
    len = cmd(buf, "pc.ram", good, 1, 0);
    buf[2 + 6] = 'x';                                   /* no 0 after the name */
    expect_bad(&d, buf, len, "0 byte");
    len = cmd(buf, "pc.ram", good, 1, 0);
    expect_bad(&d, buf, (uint16_t)(len - 3), "bytes of ranges");
    expect_bad(&d, buf, 2 + 6 + 1, "bytes of ranges");  /* no range at all */
    buf[1] = 200;                                       /* name longer than the command */
    expect_bad(&d, buf, len, "block name of 200 bytes");
    for (int k = 0; k < 13; k++) {
        many[2 * k] = 0;
        many[2 * k + 1] = RAM_PAGE_SIZE;
    }
    len = cmd(buf, "pc.ram", many, 13, 0);
    expect_bad(&d, buf, len, "1 to 12 ranges");
    uint64_t unaligned[] = { 100, RAM_PAGE_SIZE };
    len = cmd(buf, "pc.ram", unaligned, 1, 0);
    expect_bad(&d, buf, len, "range 0");
    uint64_t past[] = { 0, RAM_PAGE_SIZE, 15 * RAM_PAGE_SIZE, 2 * RAM_PAGE_SIZE };
    len = cmd(buf, "pc.ram", past, 2, 0);
    expect_bad(&d, buf, len, "range 1");
    uint64_t wrap[] = { RAM_PAGE_SIZE, UINT64_MAX & ~(RAM_PAGE_SIZE - 1) };
    len = cmd(buf, "pc.ram", wrap, 1, 0);
    expect_bad(&d, buf, len, "range 0");
    uint64_t empty[] = { 0, 0 };
    len = cmd(buf, "pc.ram", empty, 1, 0);
    expect_bad(&d, buf, len, "range 0");
    /* nothing of a refused command was applied */
    assert_int_equal(d.mem[0], 0xab);
    dest_fini(&d);
}

static uint16_t req_id(uint8_t *b, uint64_t start, uint32_t len, const char *name)
{
    size_t n = strlen(name);

    be64(b, start);
    b[8] = (uint8_t)(len >> 24);
    b[9] = (uint8_t)(len >> 16);
    b[10] = (uint8_t)(len >> 8);
    b[11] = (uint8_t)len;
    b[12] = (uint8_t)n;
    memcpy(b + 13, name, n);
    return (uint16_t)(13 + n);
}

static void test_requests(void **state)
{
    postcopy_requests *pr;
    postcopy_request rq;
    lm_error err = { 0 };
    uint8_t b[64];
    uint16_t len;
    dest d;

    (void)state;
    dest_init(&d);
    pr = postcopy_requests_new(&d.ram);
    /* REQ_PAGES before any block was named */
    req_id(b, 0, RAM_PAGE_SIZE, "");
    assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES, b, 12, NULL, &err), -EPROTO);
    len = req_id(b, 3 * RAM_PAGE_SIZE, RAM_PAGE_SIZE, "pc.ram");
    assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES_ID, b, len, NULL, &err), 0);
    req_id(b, 7 * RAM_PAGE_SIZE, RAM_PAGE_SIZE, "");
    assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES, b, 12, NULL, &err), 0);
    assert_true(postcopy_requests_pop(pr, &rq));
    assert_int_equal(rq.page, 3);
    assert_ptr_equal(rq.block, &d.ram.blocks[0]);
    assert_true(postcopy_requests_pop(pr, &rq));
    assert_int_equal(rq.page, 7);
    assert_false(postcopy_requests_pop(pr, &rq));
    assert_int_equal(postcopy_requests_total(pr), 2);
    /* hostile: unknown block, a name that does not fit, not one page,
     * outside the block, unaligned */
    len = req_id(b, 0, RAM_PAGE_SIZE, "nosuch");
    assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES_ID, b, len, NULL, &err), -ENOENT);
    assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES_ID, b, (uint16_t)(len - 1),
                                           NULL, &err), -EPROTO);
    len = req_id(b, 0, 2 * RAM_PAGE_SIZE, "pc.ram");
    assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES_ID, b, len, NULL, &err), -ERANGE);
    len = req_id(b, NPAGES * RAM_PAGE_SIZE, RAM_PAGE_SIZE, "pc.ram");
    assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES_ID, b, len, NULL, &err), -ERANGE);
    len = req_id(b, 100, RAM_PAGE_SIZE, "pc.ram");
    assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES_ID, b, len, NULL, &err), -ERANGE);
    assert_non_null(strstr(err.msg, "not one page"));
    assert_false(postcopy_requests_pop(pr, &rq));
    /* many at once: the queue grows, order kept */
    len = req_id(b, 0, RAM_PAGE_SIZE, "pc.ram");
    for (int i = 0; i < 3000; i++) {
        be64(b, (uint64_t)(i % NPAGES) * RAM_PAGE_SIZE);
        assert_int_equal(postcopy_requests_add(pr, WIRE_RP_REQ_PAGES_ID, b, len, NULL, &err), 0);
    }
    for (int i = 0; i < 3000; i++) {
        assert_true(postcopy_requests_pop(pr, &rq));
        assert_int_equal(rq.page, (uint64_t)(i % NPAGES));
    }
    postcopy_requests_free(pr);
    dest_fini(&d);
}

/* RECV_BITMAP: the destination's received map as the source reads it back
 * (little-endian words, size, end mark), and every malformed trailer
 * refused with the source's map left as it was. */
static void test_recv_bitmap(void **state)
{
    uint8_t t[24], bad[24];
    lm_error err = { 0 };
    uint64_t resend = 99;
    ramblock *b;
    dest d;

    (void)state;
    dest_init(&d);
    b = &d.ram.blocks[0];
    bitmap_clear(b->rmap, 1);
    bitmap_clear(b->rmap, 5);
    bitmap_clear(b->rmap, 15);
    assert_int_equal(postcopy_recv_bitmap_bytes(NPAGES), 8);
    assert_int_equal(postcopy_recv_bitmap_bytes(64), 8);
    assert_int_equal(postcopy_recv_bitmap_bytes(65), 16);
    assert_int_equal(postcopy_recv_bitmap_trailer_bytes(NPAGES), sizeof(t));
    postcopy_recv_bitmap_encode(b, t);
    assert_int_equal(wire_be64(t), 8);
    assert_int_equal(t[8], 0xdd);           /* pages 0-7 but 1 and 5, LSB first */
    assert_int_equal(t[9], 0x7f);           /* pages 8-14 */
    for (int i = 10; i < 16; i++)
        assert_int_equal(t[i], 0);
    assert_int_equal(wire_be64(t + 16), POSTCOPY_RECV_BITMAP_END);

    /* the source's side: to send = not received */
    b->bmap = bitmap_new(NPAGES);
    assert_int_equal(postcopy_recv_bitmap_apply(b, t, sizeof(t), &resend, &err), 0);
    assert_int_equal(resend, 3);
    assert_int_equal(bitmap_count(b->bmap, NPAGES), 3);
    assert_true(bitmap_test(b->bmap, 1) && bitmap_test(b->bmap, 5) && bitmap_test(b->bmap, 15));

    /* malformed: refused, bmap unchanged */
    memcpy(bad, t, sizeof(t));
    be64(bad, 16);
    assert_int_equal(postcopy_recv_bitmap_apply(b, bad, sizeof(bad), &resend, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "a bitmap of 16 bytes, this block's is 8"));
    memcpy(bad, t, sizeof(t));
    bad[23] ^= 1;
    assert_int_equal(postcopy_recv_bitmap_apply(b, bad, sizeof(bad), &resend, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "end mark"));
    memcpy(bad, t, sizeof(t));
    bad[10] = 1;                            /* page 16 of a 16-page block */
    assert_int_equal(postcopy_recv_bitmap_apply(b, bad, sizeof(bad), &resend, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "past the block's last"));
    assert_int_equal(postcopy_recv_bitmap_apply(b, t, 20, &resend, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "20 bytes after the message, expected 24"));
    assert_int_equal(postcopy_recv_bitmap_apply(b, t, 4, &resend, &err), -EPROTO);
    assert_int_equal(bitmap_count(b->bmap, NPAGES), 3);

    /* everything received: nothing to send */
    bitmap_fill(b->rmap, NPAGES);
    postcopy_recv_bitmap_encode(b, t);
    assert_int_equal(postcopy_recv_bitmap_apply(b, t, sizeof(t), &resend, &err), 0);
    assert_int_equal(resend, 0);
    assert_int_equal(bitmap_count(b->bmap, NPAGES), 0);
    bitmap_free(b->bmap);
    b->bmap = NULL;
    dest_fini(&d);
}

static void test_resume_ack(void **state)
{
    uint8_t v[4] = { 0, 0, 0, 1 };
    lm_error err = { 0 };

    (void)state;
    assert_int_equal(postcopy_check_resume_ack(v, 4, &err), 0);
    v[3] = 2;
    assert_int_equal(postcopy_check_resume_ack(v, 4, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "value 2"));
    v[3] = 0;
    assert_int_equal(postcopy_check_resume_ack(v, 4, &err), -EPROTO);
    assert_int_equal(postcopy_check_resume_ack(v, 3, &err), -EPROTO);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_advise),
        cmocka_unit_test(test_discard),
        cmocka_unit_test(test_requests),
        cmocka_unit_test(test_recv_bitmap),
        cmocka_unit_test(test_resume_ack),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
