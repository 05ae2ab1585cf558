/*
 * The check of `livemig vm`'s test guest (tools/livemig/vmguest/pattern.s)
 * on a snapshot of its RAM: is every page counter what one instruction
 * boundary of that guest allows?
 *
 * The guest's header at 0x500 holds five little-endian 32-bit words:
 * magic "LMVG", pass P, cursor c, region start (bytes), region pages n.
 * Each region page's first word is its counter.  Consistent means: every
 * counter is P or P + 1, the ones at P + 1 are a prefix of k pages, and
 * k = c, k = c + 1, or k = 0 with c = n (pattern.s says why).  Anything
 * else -- a page left behind by a migration, a page from a later pass, a
 * torn header -- is reported with the first page that breaks the rule.
 *
 * Threads: none; the caller makes sure the vCPU is not running (or
 * accepts a check of a moving target).
 */
#ifndef LIVEMIG_TOOL_VMCHECK_H
#define LIVEMIG_TOOL_VMCHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VMCHECK_HDR 0x500
#define VMCHECK_MAGIC 0x47564d4cu

struct vmcheck_report {
    bool ok;
    uint32_t pass, cursor, pages, start;
    uint32_t ahead;              /* k: counters at pass + 1 */
    char msg[256];               /* what is wrong, or a summary */
};

/* Check `ram` (`size` bytes of guest physical memory from 0).  Returns the
 * verdict in r->ok; r->msg says why. */
void vmcheck_run(const uint8_t *ram, uint64_t size, struct vmcheck_report *r);

#endif
