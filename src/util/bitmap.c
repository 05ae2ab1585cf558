/*
 * Page bitmaps; see bitmap.h for the layout and the contract.
 *
 * Design.  A bitmap is a bare array of unsigned long with no header: the
 * caller keeps nbits.  Every function that writes keeps the invariant that
 * the bits past nbits in the last word are clear, so counting and scanning
 * can work on whole words and only clamp their result.
 *
 * Range operations work a word at a time: a partial first word, whole middle
 * words, a partial last word.  The masks are built by one helper so the
 * boundary arithmetic lives in one place.
 *
 * Atomics.  Two functions touch bitmaps shared between threads (the
 * cooperative dirty log): writers OR bits in with
 * bitmap_set_range_atomic() and one consumer drains them with
 * bitmap_move_atomic().  The writer's OR is a release and the consumer's
 * exchange an acquire: a writer that marks a page AFTER writing it is
 * guaranteed that whoever collects the bit also sees the data.  A bit set
 * while the consumer is draining lands either in this drain (the exchange
 * saw it) or stays in src for the next one; none is lost, because every
 * read-and-clear of a word is a single atomic exchange.
 */
#include <stdlib.h>
#include <string.h>

#include "util/bitmap.h"

/* Bits [lo, hi) of one word, 0 <= lo < hi <= BITMAP_BITS_PER_LONG. */
static inline unsigned long word_mask(unsigned lo, unsigned hi)
{
    unsigned long m = ~0UL << lo;
    if (hi < BITMAP_BITS_PER_LONG)
        m &= ~(~0UL << hi);
    return m;
}

size_t bitmap_bytes(uint64_t nbits)
{
    return BITMAP_WORDS(nbits) * sizeof(unsigned long);
}

unsigned long *bitmap_new(uint64_t nbits)
{
    /* At least one word so an empty bitmap is still a valid pointer. */
    size_t words = BITMAP_WORDS(nbits) ? BITMAP_WORDS(nbits) : 1;
    unsigned long *map = calloc(words, sizeof(unsigned long));

    if (!map)
        abort();
    return map;
}

void bitmap_free(unsigned long *map)
{
    free(map);
}

void bitmap_set_range(unsigned long *map, uint64_t start, uint64_t n)
{
    uint64_t end = start + n, w, wend;

    if (n == 0)
        return;
    w = start / BITMAP_BITS_PER_LONG;
    wend = (end - 1) / BITMAP_BITS_PER_LONG;
    if (w == wend) {
        map[w] |= word_mask(start % BITMAP_BITS_PER_LONG, (end - 1) % BITMAP_BITS_PER_LONG + 1);
        return;
    }
    map[w++] |= word_mask(start % BITMAP_BITS_PER_LONG, BITMAP_BITS_PER_LONG);
    for (; w < wend; w++)
        map[w] = ~0UL;
    map[wend] |= word_mask(0, (end - 1) % BITMAP_BITS_PER_LONG + 1);
}

void bitmap_clear_range(unsigned long *map, uint64_t start, uint64_t n)
{
    uint64_t end = start + n, w, wend;

    if (n == 0)
        return;
    w = start / BITMAP_BITS_PER_LONG;
    wend = (end - 1) / BITMAP_BITS_PER_LONG;
    if (w == wend) {
        map[w] &= ~word_mask(start % BITMAP_BITS_PER_LONG, (end - 1) % BITMAP_BITS_PER_LONG + 1);
        return;
    }
    map[w++] &= ~word_mask(start % BITMAP_BITS_PER_LONG, BITMAP_BITS_PER_LONG);
    for (; w < wend; w++)
        map[w] = 0;
    map[wend] &= ~word_mask(0, (end - 1) % BITMAP_BITS_PER_LONG + 1);
}

void bitmap_fill(unsigned long *map, uint64_t nbits)
{
    size_t words = BITMAP_WORDS(nbits);

    if (words == 0)
        return;
    memset(map, 0xff, words * sizeof(unsigned long));
    /* Keep the tail-clear invariant. */
    if (nbits % BITMAP_BITS_PER_LONG)
        map[words - 1] = word_mask(0, nbits % BITMAP_BITS_PER_LONG);
}

void bitmap_zero(unsigned long *map, uint64_t nbits)
{
    memset(map, 0, bitmap_bytes(nbits));
}

uint64_t bitmap_count(const unsigned long *map, uint64_t nbits)
{
    size_t words = BITMAP_WORDS(nbits);
    uint64_t c = 0;

    /* Whole words are safe to count: the tail bits are clear. */
    for (size_t w = 0; w < words; w++)
        c += (uint64_t)__builtin_popcountl(map[w]);
    return c;
}

/*
 * Shared scan for next_set / next_clear: `invert` flips every word so the
 * search is always for a set bit.  The result is clamped to nbits because,
 * when inverted, the (clear) tail bits read as set.
 */
static uint64_t bitmap_find(const unsigned long *map, uint64_t nbits,
                            uint64_t start, unsigned long invert)
{
    size_t words = BITMAP_WORDS(nbits);
    size_t w;
    unsigned long bits;

    if (start >= nbits)
        return nbits;
    w = start / BITMAP_BITS_PER_LONG;
    bits = (map[w] ^ invert) & (~0UL << (start % BITMAP_BITS_PER_LONG));
    for (;;) {
        if (bits) {
            uint64_t i = (uint64_t)w * BITMAP_BITS_PER_LONG + (uint64_t)__builtin_ctzl(bits);
            return i < nbits ? i : nbits;
        }
        if (++w >= words)
            return nbits;
        bits = map[w] ^ invert;
    }
}

uint64_t bitmap_next_set(const unsigned long *map, uint64_t nbits, uint64_t start)
{
    return bitmap_find(map, nbits, start, 0);
}

uint64_t bitmap_next_clear(const unsigned long *map, uint64_t nbits, uint64_t start)
{
    return bitmap_find(map, nbits, start, ~0UL);
}

void bitmap_set_range_atomic(unsigned long *map, uint64_t start, uint64_t n)
{
    uint64_t end = start + n, w, wend;

    if (n == 0)
        return;
    w = start / BITMAP_BITS_PER_LONG;
    wend = (end - 1) / BITMAP_BITS_PER_LONG;
    for (; w <= wend; w++) {
        unsigned lo = w == start / BITMAP_BITS_PER_LONG ? start % BITMAP_BITS_PER_LONG : 0;
        unsigned hi = w == wend ? (end - 1) % BITMAP_BITS_PER_LONG + 1 : BITMAP_BITS_PER_LONG;
        /* Release: pairs with the acquire exchange in bitmap_move_atomic. */
        __atomic_fetch_or(&map[w], word_mask(lo, hi), __ATOMIC_RELEASE);
    }
}

uint64_t bitmap_move_atomic(unsigned long *dst, unsigned long *src, uint64_t nbits)
{
    size_t words = BITMAP_WORDS(nbits);
    uint64_t newly = 0;

    for (size_t w = 0; w < words; w++) {
        unsigned long v;

        /*
         * Skipping a word that reads 0 is safe: a bit set after this load
         * stays in src for the next move.  It also keeps clean words out of
         * the writers' caches, which matters for a mostly clean guest.
         */
        if (!__atomic_load_n(&src[w], __ATOMIC_RELAXED))
            continue;
        v = __atomic_exchange_n(&src[w], 0UL, __ATOMIC_ACQUIRE);
        newly += (uint64_t)__builtin_popcountl(v & ~dst[w]);
        dst[w] |= v;
    }
    return newly;
}
