/*
 * The test guest's pattern check; see vmcheck.h for the rule.
 */
#include "vmcheck.h"

#include <stdio.h>
#include <string.h>

static uint32_t word(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));       /* x86: little-endian, like the guest */
    return v;
}

void vmcheck_run(const uint8_t *ram, uint64_t size, struct vmcheck_report *r)
{
    const uint8_t *h = ram + VMCHECK_HDR;
    uint32_t k = 0, n;
    uint64_t end;

    memset(r, 0, sizeof(*r));
    if (size < VMCHECK_HDR + 20 || word(h) != VMCHECK_MAGIC) {
        snprintf(r->msg, sizeof(r->msg), "no test guest header at %#x (magic %#x): the "
                 "guest is not the pattern guest, or has not initialised yet",
                 VMCHECK_HDR, size >= VMCHECK_HDR + 4 ? word(h) : 0);
        return;
    }
    r->pass = word(h + 4);
    r->cursor = word(h + 8);
    r->start = word(h + 12);
    r->pages = n = word(h + 16);
    end = (uint64_t)r->start + (uint64_t)n * 4096;
    if (r->start % 4096 || end > size || r->cursor > n) {
        snprintf(r->msg, sizeof(r->msg), "bad header: region %#x + %u pages in %llu bytes "
                 "of RAM, cursor %u", r->start, n, (unsigned long long)size, r->cursor);
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t c = word(ram + r->start + (uint64_t)i * 4096);
        if (c == r->pass + 1 && k == i) {
            k++;
            continue;
        }
        if (c != r->pass) {
            snprintf(r->msg, sizeof(r->msg), "page %u (at %#llx) has count %u; pass %u, "
                     "cursor %u, %u pages ahead before it", i,
                     (unsigned long long)(r->start + (uint64_t)i * 4096), c, r->pass,
                     r->cursor, k);
            r->ahead = k;
            return;
        }
    }
    r->ahead = k;
    if (!(k == r->cursor || k == r->cursor + 1 || (k == 0 && r->cursor == n))) {
        snprintf(r->msg, sizeof(r->msg), "%u pages are at pass %u + 1 but the cursor says %u",
                 k, r->pass, r->cursor);
        return;
    }
    r->ok = true;
    snprintf(r->msg, sizeof(r->msg), "consistent: pass %u, cursor %u of %u pages", r->pass,
             r->cursor, n);
}
