/*
 * Zero-page detection.  buf_is_zero() picks the widest vector unit the CPU
 * has (AVX-512, AVX2, SSE2) once, at first use, and reads the buffer with
 * it; on these machines that is ~15 GB/s from DRAM, so checking every page
 * costs far less than sending it.  `len` must be a multiple of 64 and `p`
 * 64-byte aligned for the fast paths (pages always are); other buffers
 * take a plain word loop.  Any thread may call it; it keeps no state but
 * the (idempotent) choice of implementation.
 */
#ifndef UTIL_ZERO_H
#define UTIL_ZERO_H

#include <stdbool.h>
#include <stddef.h>

bool buf_is_zero(const void *p, size_t len);
/* The implementation chosen ("avx512", "avx2", "sse2", "scalar"). */
const char *buf_is_zero_impl(void);

/*
 * For tests and benchmarks: the checker named `impl` ("avx512", "avx2",
 * "sse2", "scalar"), or NULL if this CPU cannot run it or the name is
 * unknown.  The returned function has buf_is_zero()'s contract, including the
 * scalar fallback for unaligned buffers.
 */
typedef bool (*buf_is_zero_fn)(const void *p, size_t len);
buf_is_zero_fn buf_is_zero_get(const char *impl);

#endif
