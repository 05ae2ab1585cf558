/*
 * Fault injection for tests: make a chosen channel fail at a chosen point.
 *
 * LIVEMIG_FAULT="SIDE:POINT:CHANNEL[,...]", e.g. "src:packet:1" or
 * "dst:sync:0".  SIDE is src or dst; POINT is one of connect, handshake,
 * packet (in the middle of a packet), sync (just before the SYNC packet /
 * while waiting at the SYNC barrier); CHANNEL is the multifd channel id.
 * Each listed fault fires once per process.  Compiled in only with the
 * meson option fault_injection (on for development builds, off for release
 * packages); otherwise lm_fault_hit() is constant false.
 *
 * The parsed list is the one process-wide state in livemig: it is set once
 * from the environment and then only read (and its `fired` flags set).
 */
#ifndef LM_UTIL_FAULT_H
#define LM_UTIL_FAULT_H

#include <stdbool.h>

#ifdef LM_FAULT_INJECTION
bool lm_fault_hit(const char *side, const char *point, int channel);
#else
static inline bool lm_fault_hit(const char *side, const char *point, int channel)
{
    (void)side; (void)point; (void)channel;
    return false;
}
#endif

#endif
