/*
 * Bitmaps of pages: an array of unsigned long, bit i = page i, bit (i % 64)
 * of word (i / 64) -- the host-native layout, which is also what QEMU's
 * mapped-ram file stores.  Plain functions for the owner thread and a few
 * atomic ones for bitmaps written by other threads (the cooperative dirty
 * log).  Bits past nbits in the last word are always kept clear, so
 * bitmap_count() can count whole words.
 */
#ifndef UTIL_BITMAP_H
#define UTIL_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BITMAP_BITS_PER_LONG (sizeof(unsigned long) * 8)
#define BITMAP_WORDS(nbits) (((nbits) + BITMAP_BITS_PER_LONG - 1) / BITMAP_BITS_PER_LONG)

unsigned long *bitmap_new(uint64_t nbits);             /* zeroed; aborts on OOM */
void bitmap_free(unsigned long *map);
size_t bitmap_bytes(uint64_t nbits);                   /* words * sizeof(long) */

static inline bool bitmap_test(const unsigned long *map, uint64_t i)
{
    return (map[i / BITMAP_BITS_PER_LONG] >> (i % BITMAP_BITS_PER_LONG)) & 1;
}
static inline void bitmap_set(unsigned long *map, uint64_t i)
{
    map[i / BITMAP_BITS_PER_LONG] |= 1UL << (i % BITMAP_BITS_PER_LONG);
}
static inline void bitmap_clear(unsigned long *map, uint64_t i)
{
    map[i / BITMAP_BITS_PER_LONG] &= ~(1UL << (i % BITMAP_BITS_PER_LONG));
}

void bitmap_set_range(unsigned long *map, uint64_t start, uint64_t n);
void bitmap_clear_range(unsigned long *map, uint64_t start, uint64_t n);
void bitmap_fill(unsigned long *map, uint64_t nbits);      /* all set, tail clear */
void bitmap_zero(unsigned long *map, uint64_t nbits);
uint64_t bitmap_count(const unsigned long *map, uint64_t nbits);
/* First set bit at index >= start, or nbits if none. */
uint64_t bitmap_next_set(const unsigned long *map, uint64_t nbits, uint64_t start);
/* First clear bit at index >= start, or nbits if none. */
uint64_t bitmap_next_clear(const unsigned long *map, uint64_t nbits, uint64_t start);

/* Atomic: safe against concurrent bitmap_set_range_atomic on the same map. */
void bitmap_set_range_atomic(unsigned long *map, uint64_t start, uint64_t n);
/* Atomic test (acquire: the data a setter wrote before its release OR is
 * visible), and test-and-set (true when this call set the bit). */
static inline bool bitmap_test_atomic(const unsigned long *map, uint64_t i)
{
    return (__atomic_load_n(&map[i / BITMAP_BITS_PER_LONG], __ATOMIC_ACQUIRE) >>
            (i % BITMAP_BITS_PER_LONG)) & 1;
}
static inline bool bitmap_test_and_set_atomic(unsigned long *map, uint64_t i)
{
    unsigned long bit = 1UL << (i % BITMAP_BITS_PER_LONG);

    return !(__atomic_fetch_or(&map[i / BITMAP_BITS_PER_LONG], bit, __ATOMIC_ACQ_REL) & bit);
}
/* Clear bit i; true if it was set (atomic). */
static inline bool bitmap_test_and_clear_atomic(unsigned long *map, uint64_t i)
{
    unsigned long bit = 1UL << (i % BITMAP_BITS_PER_LONG);

    return __atomic_fetch_and(&map[i / BITMAP_BITS_PER_LONG], ~bit, __ATOMIC_ACQ_REL) & bit;
}
/*
 * Move every set bit of `src` into `dst` (dst |= src; src = 0), word by word
 * with an atomic exchange on src so no concurrently set bit is lost.
 * Returns how many bits were newly set in dst.
 */
uint64_t bitmap_move_atomic(unsigned long *dst, unsigned long *src, uint64_t nbits);

#endif
