/*
 * Page contents of the demo guest and their verification.
 *
 * Speed is the design constraint: verifying 2 GiB should take about a
 * second, and writers must produce hundreds of thousands of pages per
 * second.  So the RANDOM body is counter based: word j of a page is
 * mix64(seed + (j + 1) * GOLDEN), where seed is a hash of (index, version,
 * kind).  Words are independent of each other, so the loop has no carried
 * dependency except the counter, and the checker compares each generated
 * word with memory as it goes (OR-accumulating the differences) instead of
 * building an expected page and calling memcmp.  mix64 is the splitmix64
 * finalizer, a bijection with good avalanche, which is plenty for telling a
 * page of version 7 from one of version 8.
 *
 * TEXT bodies are words from a fixed 32-word dictionary, five bits of the
 * stream per word, separated by spaces (a newline after every twelfth
 * word); zlib gets about 3x on them.  They are built into a buffer and
 * compared with memcmp: text is there to exercise compression, not speed.
 *
 * Header and body are little-endian regardless of the host, so a page means
 * the same thing on both ends of a migration.
 */
#include "verify.h"

#include <endian.h>
#include <stdio.h>
#include <string.h>

#define GOLDEN GUEST_GOLDEN
#define mix64 guest_mix64
#define BODY_WORDS ((GUEST_PAGE_SIZE - GUEST_PAGE_HEADER) / 8)

static inline uint64_t page_seed(uint64_t index, uint32_t version, enum guest_fill kind)
{
    return mix64(index * GOLDEN ^ (((uint64_t)version << 2 | (uint64_t)kind) *
                                   0xD1B54A32D192ED03ull));
}

int guest_fill_parse(const char *s)
{
    if (!strcmp(s, "random"))
        return GUEST_FILL_RANDOM;
    if (!strcmp(s, "text"))
        return GUEST_FILL_TEXT;
    if (!strcmp(s, "zero"))
        return GUEST_FILL_ZERO;
    return -1;
}

const char *guest_fill_name(enum guest_fill f)
{
    switch (f) {
    case GUEST_FILL_RANDOM: return "random";
    case GUEST_FILL_TEXT: return "text";
    case GUEST_FILL_ZERO: return "zero";
    }
    return "?";
}

const char *page_damage_name(enum page_damage d)
{
    switch (d) {
    case PAGE_OK: return "ok";
    case PAGE_LOST: return "lost";
    case PAGE_STALE: return "stale";
    case PAGE_MISPLACED: return "misplaced";
    case PAGE_TORN: return "torn";
    }
    return "?";
}

/* ---------------------------------------------------------------- text */

/*
 * Each entry is a word plus its trailing space, padded to 16 bytes, so the
 * generator copies a fixed 16 bytes and advances by the word's length: no
 * strlen, no variable-length memcpy.  That keeps text pages at about a
 * microsecond each.
 */
struct dict_word {
    char s[16];
    uint8_t len;
};

#define W(x) { x " ", sizeof(x) }
static const struct dict_word dict[32] = {
    W("the"), W("of"), W("and"), W("to"), W("in"), W("is"), W("was"), W("that"),
    W("for"), W("on"), W("as"), W("with"), W("by"), W("at"), W("from"), W("page"),
    W("an"), W("were"), W("are"), W("which"), W("this"), W("also"), W("be"), W("had"),
    W("first"), W("one"), W("their"), W("its"), W("new"), W("after"), W("guest"),
    W("migration"),
};
#undef W

#define TEXT_LEN (BODY_WORDS * 8)

/*
 * Build the TEXT body for `seed` into `out`, which must have room for
 * TEXT_LEN + 16 bytes (the last word's fixed-size copy may run past the end;
 * the caller copies only TEXT_LEN bytes out).
 */
static void text_body(uint8_t *out, uint64_t seed)
{
    size_t pos = 0;
    uint64_t ctr = 0;
    unsigned nwords = 0;

    while (pos < TEXT_LEN) {
        uint64_t r = mix64(seed + ++ctr * GOLDEN);
        for (int k = 0; k < 12 && pos < TEXT_LEN; k++, r >>= 5) {
            const struct dict_word *w = &dict[r & 31];
            memcpy(out + pos, w->s, 16);
            pos += w->len;
            if (++nwords % 12 == 0)
                out[pos - 1] = '\n';
        }
    }
}

/* ---------------------------------------------------------------- pages */

void page_fill(void *page, uint64_t index, uint32_t version, enum guest_fill kind)
{
    uint64_t *w = page;

    if (version == 0) {
        memset(page, 0, GUEST_PAGE_SIZE);
        return;
    }
    kind = guest_body_kind(kind);
    uint64_t seed = page_seed(index, version, kind);
    w[0] = htole64(index);
    w[1] = htole64(version);
    if (kind == GUEST_FILL_TEXT) {
        uint8_t text[TEXT_LEN + 16];
        text_body(text, seed);
        memcpy(w + 2, text, TEXT_LEN);
        return;
    }
    for (uint64_t j = 0; j < BODY_WORDS; j++)
        w[2 + j] = htole64(mix64(seed + (j + 1) * GOLDEN));
}

static bool words_zero(const uint64_t *w, size_t n)
{
    uint64_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc |= w[i];
    return acc == 0;
}

/* True when the body matches (index, version, kind); header already checked. */
static bool body_matches(const uint64_t *w, uint64_t index, uint32_t version,
                         enum guest_fill kind)
{
    uint64_t seed = page_seed(index, version, kind);

    if (kind == GUEST_FILL_TEXT) {
        uint8_t expect[TEXT_LEN + 16];
        text_body(expect, seed);
        return memcmp(expect, w + 2, TEXT_LEN) == 0;
    }
    /* OR-accumulate differences in blocks so a torn page stops early but
     * the common (good) case runs without a branch per word. */
    for (uint64_t b = 0; b < BODY_WORDS; b += 64) {
        uint64_t end = b + 64 < BODY_WORDS ? b + 64 : BODY_WORDS, diff = 0;
        for (uint64_t j = b; j < end; j++)
            diff |= le64toh(w[2 + j]) ^ mix64(seed + (j + 1) * GOLDEN);
        if (diff)
            return false;
    }
    return true;
}

enum page_damage page_check(const void *page, uint64_t index, uint32_t version,
                            enum guest_fill kind, uint64_t *found_version)
{
    const uint64_t *w = page;
    uint64_t hidx = le64toh(w[0]), hver = le64toh(w[1]);

    kind = guest_body_kind(kind);
    *found_version = hver;
    if (version == 0) {
        if (words_zero(w, GUEST_PAGE_SIZE / 8))
            return PAGE_OK;
        return hidx != index ? PAGE_MISPLACED : PAGE_TORN;
    }
    if (hidx == index && hver == version)
        return body_matches(w, index, version, kind) ? PAGE_OK : PAGE_TORN;
    if (words_zero(w, GUEST_PAGE_SIZE / 8))
        return PAGE_LOST;
    if (hidx != index)
        return PAGE_MISPLACED;
    return hver < version ? PAGE_STALE : PAGE_TORN;
}

/* ---------------------------------------------------------------- reports */

static void report_add(struct verify_report *r, uint64_t page, enum page_damage d,
                       uint32_t expected, uint64_t found)
{
    r->bad++;
    switch (d) {
    case PAGE_LOST: r->lost++; break;
    case PAGE_STALE: r->stale++; break;
    case PAGE_MISPLACED: r->misplaced++; break;
    case PAGE_TORN: r->torn++; break;
    case PAGE_OK: break;
    }
    if (r->nexamples < VERIFY_MAX_EXAMPLES) {
        struct verify_example *e = &r->examples[r->nexamples++];
        e->page = page;
        e->kind = d;
        e->expected_version = expected;
        e->found_version = found;
    }
}

void verify_range(const uint8_t *ram, const uint32_t *versions, uint64_t first,
                  uint64_t count, enum guest_fill kind, struct verify_report *r)
{
    for (uint64_t i = first; i < first + count; i++) {
        uint64_t found;
        enum page_damage d = page_check(ram + i * GUEST_PAGE_SIZE, i, versions[i],
                                        kind, &found);
        if (d != PAGE_OK)
            report_add(r, i, d, versions[i], found);
    }
    r->checked += count;
}

void verify_merge(struct verify_report *dst, const struct verify_report *src)
{
    dst->checked += src->checked;
    dst->bad += src->bad;
    dst->lost += src->lost;
    dst->stale += src->stale;
    dst->torn += src->torn;
    dst->misplaced += src->misplaced;
    for (unsigned i = 0; i < src->nexamples && dst->nexamples < VERIFY_MAX_EXAMPLES; i++)
        dst->examples[dst->nexamples++] = src->examples[i];
}

void verify_format(const struct verify_report *r, char *buf, size_t len)
{
    int n = snprintf(buf, len, "%llu pages checked, %llu bad",
                     (unsigned long long)r->checked, (unsigned long long)r->bad);
    if (r->bad && n >= 0 && (size_t)n < len)
        n += snprintf(buf + n, len - n, " (lost %llu, stale %llu, torn %llu, misplaced %llu)",
                      (unsigned long long)r->lost, (unsigned long long)r->stale,
                      (unsigned long long)r->torn, (unsigned long long)r->misplaced);
    for (unsigned i = 0; i < r->nexamples && n >= 0 && (size_t)n < len; i++) {
        const struct verify_example *e = &r->examples[i];
        n += snprintf(buf + n, len - n, "\n  page %llu: %s, expected version %u, found %llu",
                      (unsigned long long)e->page, page_damage_name(e->kind),
                      e->expected_version, (unsigned long long)e->found_version);
    }
}
