/*
 * Zero-page detection; see zero.h.
 *
 * Design.  One scalar checker that accepts any pointer and length, and one
 * vector checker per x86 unit (SSE2, AVX2, AVX-512F).  The vector bodies are
 * compiled with __attribute__((target(...))) rather than -march flags, so the
 * binary runs on any x86-64 and the choice is made at run time with
 * __builtin_cpu_supports() (which also checks that the OS saves the wide
 * registers).  The choice is made once, on first use, and kept in a
 * function pointer: a CPU property, not migration state, so one per process
 * is right.  Two threads racing on the first call compute the same answer,
 * and the pointer is read and written atomically, so the race is harmless.
 *
 * The vector bodies need a 64-byte aligned pointer and a multiple of 64
 * bytes (every guest page qualifies); anything else goes to the scalar
 * checker, which is correct for every alignment and length.  Each body ORs
 * 256 bytes together before testing, so an all-zero page costs one test per
 * 256 bytes, and a non-zero page exits at the first 256-byte block that
 * holds a non-zero byte.
 */
#include <stdint.h>
#include <string.h>

#include "util/zero.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ZERO_X86 1
#endif

/* ---------------------------------------------------------------- scalar */

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));   /* no alignment or aliasing assumptions */
    return v;
}

static bool zero_scalar(const void *buf, size_t len)
{
    const unsigned char *p = buf;

    /* Bytes up to the first 8-aligned address. */
    while (len && ((uintptr_t)p & 7)) {
        if (*p)
            return false;
        p++;
        len--;
    }
    /* 64 bytes per test: as fast as memory on large buffers. */
    while (len >= 64) {
        uint64_t acc = load64(p) | load64(p + 8) | load64(p + 16) | load64(p + 24) |
                       load64(p + 32) | load64(p + 40) | load64(p + 48) | load64(p + 56);
        if (acc)
            return false;
        p += 64;
        len -= 64;
    }
    while (len >= 8) {
        if (load64(p))
            return false;
        p += 8;
        len -= 8;
    }
    while (len) {
        if (*p)
            return false;
        p++;
        len--;
    }
    return true;
}

/* The precondition every vector body relies on. */
static inline bool vector_ok(const void *p, size_t len)
{
    return ((uintptr_t)p & 63) == 0 && (len & 63) == 0;
}

#ifdef ZERO_X86
/* ---------------------------------------------------------------- SSE2 */

__attribute__((target("sse2")))
static bool zero_sse2_body(const unsigned char *p, size_t len)
{
    const __m128i z = _mm_setzero_si128();
    size_t i = 0;

    for (; i + 256 <= len; i += 256) {
        __m128i a = _mm_or_si128(_mm_load_si128((const __m128i *)(p + i)),
                                 _mm_load_si128((const __m128i *)(p + i + 16)));
        for (size_t k = 32; k < 256; k += 32) {
            a = _mm_or_si128(a, _mm_load_si128((const __m128i *)(p + i + k)));
            a = _mm_or_si128(a, _mm_load_si128((const __m128i *)(p + i + k + 16)));
        }
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(a, z)) != 0xffff)
            return false;
    }
    for (; i < len; i += 64) {
        __m128i a = _mm_or_si128(
            _mm_or_si128(_mm_load_si128((const __m128i *)(p + i)),
                         _mm_load_si128((const __m128i *)(p + i + 16))),
            _mm_or_si128(_mm_load_si128((const __m128i *)(p + i + 32)),
                         _mm_load_si128((const __m128i *)(p + i + 48))));
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(a, z)) != 0xffff)
            return false;
    }
    return true;
}

static bool zero_sse2(const void *p, size_t len)
{
    return vector_ok(p, len) ? zero_sse2_body(p, len) : zero_scalar(p, len);
}

/* ---------------------------------------------------------------- AVX2 */

__attribute__((target("avx2")))
static bool zero_avx2_body(const unsigned char *p, size_t len)
{
    size_t i = 0;

    for (; i + 256 <= len; i += 256) {
        __m256i a = _mm256_or_si256(
            _mm256_or_si256(
                _mm256_or_si256(_mm256_load_si256((const __m256i *)(p + i)),
                                _mm256_load_si256((const __m256i *)(p + i + 32))),
                _mm256_or_si256(_mm256_load_si256((const __m256i *)(p + i + 64)),
                                _mm256_load_si256((const __m256i *)(p + i + 96)))),
            _mm256_or_si256(
                _mm256_or_si256(_mm256_load_si256((const __m256i *)(p + i + 128)),
                                _mm256_load_si256((const __m256i *)(p + i + 160))),
                _mm256_or_si256(_mm256_load_si256((const __m256i *)(p + i + 192)),
                                _mm256_load_si256((const __m256i *)(p + i + 224)))));
        if (!_mm256_testz_si256(a, a))
            return false;
    }
    for (; i < len; i += 64) {
        __m256i a = _mm256_or_si256(_mm256_load_si256((const __m256i *)(p + i)),
                                    _mm256_load_si256((const __m256i *)(p + i + 32)));
        if (!_mm256_testz_si256(a, a))
            return false;
    }
    return true;
}

static bool zero_avx2(const void *p, size_t len)
{
    return vector_ok(p, len) ? zero_avx2_body(p, len) : zero_scalar(p, len);
}

/* ---------------------------------------------------------------- AVX-512 */

__attribute__((target("avx512f")))
static bool zero_avx512_body(const unsigned char *p, size_t len)
{
    size_t i = 0;

    for (; i + 256 <= len; i += 256) {
        __m512i a = _mm512_or_si512(
            _mm512_or_si512(_mm512_load_si512((const void *)(p + i)),
                            _mm512_load_si512((const void *)(p + i + 64))),
            _mm512_or_si512(_mm512_load_si512((const void *)(p + i + 128)),
                            _mm512_load_si512((const void *)(p + i + 192))));
        if (_mm512_test_epi64_mask(a, a))
            return false;
    }
    for (; i < len; i += 64) {
        __m512i a = _mm512_load_si512((const void *)(p + i));
        if (_mm512_test_epi64_mask(a, a))
            return false;
    }
    return true;
}

static bool zero_avx512(const void *p, size_t len)
{
    return vector_ok(p, len) ? zero_avx512_body(p, len) : zero_scalar(p, len);
}
#endif /* ZERO_X86 */

/* ---------------------------------------------------------------- selection */

static const struct zero_impl {
    const char *name;
    buf_is_zero_fn fn;
} zero_impls[] = {
    /* Widest first: selection takes the first one the CPU supports. */
#ifdef ZERO_X86
    { "avx512", zero_avx512 },
    { "avx2", zero_avx2 },
    { "sse2", zero_sse2 },
#endif
    { "scalar", zero_scalar },
};

#define N_IMPLS (sizeof(zero_impls) / sizeof(zero_impls[0]))

static bool impl_supported(const struct zero_impl *z)
{
#ifdef ZERO_X86
    __builtin_cpu_init();
    if (z->fn == zero_avx512)
        return __builtin_cpu_supports("avx512f");
    if (z->fn == zero_avx2)
        return __builtin_cpu_supports("avx2");
    if (z->fn == zero_sse2)
        return __builtin_cpu_supports("sse2");
#endif
    return z->fn == zero_scalar;
}

/* Index into zero_impls of the chosen checker, + 1 (0 = not chosen yet). */
static int zero_chosen;

static const struct zero_impl *zero_choose(void)
{
    int c = __atomic_load_n(&zero_chosen, __ATOMIC_RELAXED);

    if (c)
        return &zero_impls[c - 1];
    for (c = 0; c < (int)N_IMPLS - 1; c++)
        if (impl_supported(&zero_impls[c]))
            break;
    /* The last entry (scalar) is always supported. */
    __atomic_store_n(&zero_chosen, c + 1, __ATOMIC_RELAXED);
    return &zero_impls[c];
}

bool buf_is_zero(const void *p, size_t len)
{
    return zero_choose()->fn(p, len);
}

const char *buf_is_zero_impl(void)
{
    return zero_choose()->name;
}

buf_is_zero_fn buf_is_zero_get(const char *impl)
{
    for (size_t i = 0; i < N_IMPLS; i++)
        if (!strcmp(zero_impls[i].name, impl))
            return impl_supported(&zero_impls[i]) ? zero_impls[i].fn : NULL;
    return NULL;
}
