/*
 * Unit tests for src/integrity/ (x-integrity's page checksums) and the
 * multifd header's integrity flag.
 *
 * A checksum must change with the page's content (any byte), its offset
 * and its block; a fill page's content hash is that of the page it
 * describes, so a ZERO record and a PAGE of zeros carry the same sum.  The
 * multifd header check refuses a packet whose integrity flag differs from
 * the destination's setting, either way.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <xxhash.h>

#include "integrity/integrity.h"
#include "multifd/multifd.h"
#include "ram/ram.h"

#define PAGE INTEGRITY_PAGE_SIZE

static void test_fill_is_content(void **state)
{
    uint8_t page[PAGE];

    memset(page, 0, sizeof(page));
    assert_true(integrity_fill_content(0) == integrity_content(page));
    assert_true(integrity_fill_content(0) == integrity_content(page));   /* cached */
    memset(page, 0x5a, sizeof(page));
    assert_true(integrity_fill_content(0x5a) == integrity_content(page));
    assert_true(integrity_fill(7, 4096, 0x5a) == integrity_page(7, 4096, page));
}

static void test_every_byte_counts(void **state)
{
    uint8_t page[PAGE];
    uint64_t seed = integrity_block_seed("pc.ram"), sum;

    for (int i = 0; i < PAGE; i++)
        page[i] = (uint8_t)(i * 7 + 3);
    sum = integrity_page(seed, 0x10000, page);
    for (int i = 0; i < PAGE; i++) {
        for (int bit = 0; bit < 8; bit += 3) {
            page[i] ^= (uint8_t)(1u << bit);
            assert_true(integrity_page(seed, 0x10000, page) != sum);
            page[i] ^= (uint8_t)(1u << bit);
        }
    }
    assert_true(integrity_page(seed, 0x10000, page) == sum);
}

static void test_place_counts(void **state)
{
    uint8_t page[PAGE];
    uint64_t a = integrity_block_seed("pc.ram"), b = integrity_block_seed("pc.ram2");

    memset(page, 0x11, sizeof(page));
    assert_true(a != b);
    assert_true(integrity_page(a, 0, page) != integrity_page(a, PAGE, page));
    assert_true(integrity_page(a, PAGE, page) != integrity_page(b, PAGE, page));
    /* a zero page told as ZERO at another offset or block is caught too */
    assert_true(integrity_fill(a, 0, 0) != integrity_fill(a, PAGE, 0));
    assert_true(integrity_fill(a, 0, 0) != integrity_fill(b, 0, 0));
}

static void test_buf(void **state)
{
    unsigned long bits[4] = { 1, 2, 3, 4 };
    uint64_t h = integrity_buf(bits, sizeof(bits), 9);

    bits[2] ^= 1UL << 40;
    assert_true(integrity_buf(bits, sizeof(bits), 9) != h);
    bits[2] ^= 1UL << 40;
    assert_true(integrity_buf(bits, sizeof(bits), 9) == h);
    assert_true(integrity_buf(bits, sizeof(bits), 10) != h);
}

/* The AVX2 build of XXH3 gives libxxhash's results, on every length the
 * module hashes (pages, bitmaps, tables) and odd ones. */
static void test_avx2_is_xxh3(void **state)
{
    static const size_t lens[] = { 0, 1, 17, 240, 241, 1000, 4096, 8 * 4096 + 8, 65537 };
    uint8_t *buf = malloc(65537);

    assert_non_null(buf);
    for (size_t i = 0; i < 65537; i++)
        buf[i] = (uint8_t)(i * 131 + (i >> 8));
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2")) {
        free(buf);
        skip();
    }
    assert_string_equal(integrity_impl(), "avx2");
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
        for (uint64_t seed = 0; seed < 3; seed++)
            assert_true(integrity_xxh3_avx2(buf, lens[i], seed * 0x9e3779b97f4a7c15ULL) ==
                        XXH3_64bits_withSeed(buf, lens[i], seed * 0x9e3779b97f4a7c15ULL));
    assert_true(integrity_content(buf) == XXH3_64bits(buf, PAGE));
#endif
    free(buf);
}

static void test_multifd_flag(void **state)
{
    static uint8_t mem[4 * PAGE] __attribute__((aligned(PAGE)));
    uint8_t raw[MULTIFD_HDR_SIZE];
    mf_header h = { .flags = MULTIFD_FLAG_INTEGRITY, .pages_alloc = MULTIFD_PAGES,
                    .normal = 1, .next_size = PAGE, .offsets = { PAGE } }, out;
    const ramblock *blk;
    ram_state r;
    lm_error err = { 0 };

    memset(&r, 0, sizeof(r));
    assert_int_equal(ram_register(&r, "pc.ram", mem, sizeof(mem), PAGE, NULL), 0);
    strcpy(h.idstr, "pc.ram");
    multifd_put_header(raw, &h);

    r.integrity = true;
    assert_int_equal(multifd_get_header(raw, &out, &r, 0, &blk, &err), 0);
    assert_ptr_equal(blk, &r.blocks[0]);
    r.integrity = false;
    assert_int_not_equal(multifd_get_header(raw, &out, &r, 0, &blk, &err), 0);
    assert_non_null(strstr(err.msg, "x-integrity off"));

    h.flags = 0;
    multifd_put_header(raw, &h);
    assert_int_equal(multifd_get_header(raw, &out, &r, 0, &blk, &err), 0);
    r.integrity = true;
    assert_int_not_equal(multifd_get_header(raw, &out, &r, 0, &blk, &err), 0);
    assert_non_null(strstr(err.msg, "lacks page checksums"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fill_is_content),
        cmocka_unit_test(test_every_byte_counts),
        cmocka_unit_test(test_place_counts),
        cmocka_unit_test(test_buf),
        cmocka_unit_test(test_avx2_is_xxh3),
        cmocka_unit_test(test_multifd_flag),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
