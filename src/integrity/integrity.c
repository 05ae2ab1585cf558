/*
 * Page checksums for the x-integrity capability; see integrity.h.
 */
#include <endian.h>
#include <string.h>
#include <xxhash.h>

#include "integrity/integrity.h"

uint64_t integrity_block_seed(const char *idstr)
{
    return XXH3_64bits(idstr, strlen(idstr));
}

uint64_t integrity_content(const void *page)
{
    return XXH3_64bits(page, INTEGRITY_PAGE_SIZE);
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
    return XXH3_64bits_withSeed(buf, len, seed);
}
