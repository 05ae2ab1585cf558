/*
 * Page checksums for the x-integrity capability; see integrity.h.
 *
 * The 4 KiB hashes go through XXH3 built for AVX2 when the CPU has it
 * (xxh3_avx2.c), else through libxxhash itself; the results are the same.
 * The choice is made once, on first use, and kept: a CPU property, not
 * migration state (as util/zero.c's).  Two threads racing on the first
 * call compute the same answer; the word is read and written atomically.
 */
#include <endian.h>
#include <string.h>
#include <xxhash.h>

#include "integrity/integrity.h"

/* 0: not chosen yet, 1: libxxhash, 2: AVX2 */
static int integrity_chosen;

static int integrity_choose(void)
{
    int c = __atomic_load_n(&integrity_chosen, __ATOMIC_RELAXED);

    if (c)
        return c;
    c = 1;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        c = 2;
#endif
    __atomic_store_n(&integrity_chosen, c, __ATOMIC_RELAXED);
    return c;
}

const char *integrity_impl(void)
{
    return integrity_choose() == 2 ? "avx2" : "libxxhash";
}

static uint64_t integrity_hash(const void *p, size_t len, uint64_t seed)
{
#if defined(__x86_64__)
    if (integrity_choose() == 2)
        return integrity_xxh3_avx2(p, len, seed);
#endif
    return XXH3_64bits_withSeed(p, len, seed);
}

uint64_t integrity_block_seed(const char *idstr)
{
    return XXH3_64bits(idstr, strlen(idstr));
}

uint64_t integrity_content(const void *page)
{
    return integrity_hash(page, INTEGRITY_PAGE_SIZE, 0);
}

/* XXH3_64bits of 4096 zero bytes (tests/unit/test_integrity.c checks it):
 * most pages told as zero cost no hashing at all. */
#define INTEGRITY_ZERO_CONTENT 0x93d76fe148c689baULL

uint64_t integrity_fill_content(uint8_t fill)
{
    uint8_t page[INTEGRITY_PAGE_SIZE];

    if (fill == 0)
        return INTEGRITY_ZERO_CONTENT;
    memset(page, fill, sizeof(page));
    return integrity_content(page);
}

uint64_t integrity_sum(uint64_t block_seed, uint64_t offset, uint64_t content)
{
    uint64_t le = htole64(content);

    return XXH3_64bits_withSeed(&le, sizeof(le), block_seed ^ offset);
}

uint64_t integrity_buf(const void *buf, size_t len, uint64_t seed)
{
    return integrity_hash(buf, len, seed);
}
