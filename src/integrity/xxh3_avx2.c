/*
 * XXH3 compiled for AVX2, for CPUs that have it (integrity.c chooses at run
 * time).  Debian's libxxhash is built for the x86-64 baseline (SSE2): ~6
 * GB/s on a cached page here, against ~25-35 GB/s for the same algorithm
 * with AVX2 -- the difference between a checksum that shows in a
 * migration's time and one that does not.  The algorithm and its results
 * are the library's own (its header, inlined: XXH_INLINE_ALL); only the
 * vector unit differs, and tests/unit/test_integrity.c checks that both
 * give the same sums.  The whole file is compiled with the avx2 target
 * (pragma, not -mavx2, so the build needs no per-file flags), and nothing
 * here runs unless the CPU and OS support AVX2.
 */
#include <stddef.h>
#include <stdint.h>

#include "integrity/integrity.h"

#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push (__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX2
#include <immintrin.h>
#include <xxhash.h>

uint64_t integrity_xxh3_avx2(const void *p, size_t len, uint64_t seed)
{
    return XXH3_64bits_withSeed(p, len, seed);
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
