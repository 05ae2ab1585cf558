/*
 * Demo-guest page contents: what page i holds at version v, and the check
 * that memory holds what the version table says.
 *
 * A page is a 16-byte header {le64 index, le64 version} followed by 4080
 * bytes derived only from (index, version, content kind), so any page can
 * be regenerated and compared without keeping a copy of guest RAM.  Version
 * 0 means "never written": the whole page is zero.
 *
 * Content kinds: RANDOM is a splitmix64 stream seeded from (index, version)
 * -- incompressible; TEXT is words from a fixed 32-word dictionary picked
 * by the same stream -- compresses about 3x with zlib (3.06x measured at
 * the default level, page by page).  The guest's `--fill
 * zero` only means "every page starts at version 0"; later writes to such a
 * guest use RANDOM bodies (see guest_body_kind()).
 *
 * Threads: everything here is a pure function of its arguments except
 * verify_range(), which reads guest RAM and the version table and must only
 * run while no writer is writing (the caller pauses them).
 */
#ifndef LIVEMIG_TOOL_VERIFY_H
#define LIVEMIG_TOOL_VERIFY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GUEST_PAGE_SIZE 4096u
#define GUEST_PAGE_HEADER 16u

/*
 * The splitmix64 finalizer: a cheap bijection with full avalanche.  Page
 * bodies are mix64(seed + k * GOLDEN); the writers' page picker uses the
 * same function as a sequential generator.
 */
#define GUEST_GOLDEN 0x9E3779B97F4A7C15ull

static inline uint64_t guest_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

enum guest_fill { GUEST_FILL_RANDOM = 0, GUEST_FILL_TEXT = 1, GUEST_FILL_ZERO = 2 };

/* "random" / "text" / "zero"; -1 for an unknown name. */
int guest_fill_parse(const char *s);
const char *guest_fill_name(enum guest_fill f);

/* The body kind that writes use for a guest with this fill (never ZERO). */
static inline enum guest_fill guest_body_kind(enum guest_fill f)
{
    return f == GUEST_FILL_TEXT ? GUEST_FILL_TEXT : GUEST_FILL_RANDOM;
}

/* Write the full page for (index, version); version 0 zeroes it. */
void page_fill(void *page, uint64_t index, uint32_t version, enum guest_fill kind);

/* How a page differs from what the version table says. */
enum page_damage {
    PAGE_OK = 0,
    PAGE_LOST,        /* all zero, but the table says it was written */
    PAGE_STALE,       /* right page, older version than the table */
    PAGE_MISPLACED,   /* the header names another page */
    PAGE_TORN,        /* right header, wrong body; or a version from the future */
};

const char *page_damage_name(enum page_damage d);

/*
 * Compare one page with (index, version).  On damage, *found_version gets
 * the version in the page's header (0 for a lost page).  Generates the
 * expected words on the fly; no scratch page for RANDOM.
 */
enum page_damage page_check(const void *page, uint64_t index, uint32_t version,
                            enum guest_fill kind, uint64_t *found_version);

#define VERIFY_MAX_EXAMPLES 8

struct verify_example {
    uint64_t page;
    enum page_damage kind;
    uint32_t expected_version;
    uint64_t found_version;
};

struct verify_report {
    uint64_t checked, bad;
    uint64_t lost, stale, torn, misplaced;
    unsigned nexamples;
    struct verify_example examples[VERIFY_MAX_EXAMPLES];
    int64_t time_ms;
};

/*
 * Check pages [first, first + count) of `ram` against `versions` and add the
 * findings to *r (examples keep the lowest page numbers seen by this call;
 * use verify_merge to combine reports of disjoint ranges).
 */
void verify_range(const uint8_t *ram, const uint32_t *versions, uint64_t first,
                  uint64_t count, enum guest_fill kind, struct verify_report *r);

/* Add `src` (a later, disjoint range) to `dst`. */
void verify_merge(struct verify_report *dst, const struct verify_report *src);

/* Fill `buf` with a one-line summary plus one line per example. */
void verify_format(const struct verify_report *r, char *buf, size_t len);

#endif
