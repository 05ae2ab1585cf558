/*
 * Fault injection for tests: make a chosen channel fail at a chosen point,
 * on a chosen hit of that point.
 *
 * LIVEMIG_FAULT="SIDE:POINT:CHANNEL[:N][,...]", e.g. "src:packet:1",
 * "src:packet:1:100" or "dst:sync:0".  SIDE is src or dst; POINT is one of
 * connect, handshake, packet (in the middle of a packet), sync (just before
 * the SYNC packet / while waiting at the SYNC barrier), corrupt-page,
 * corrupt-mfpage (x-integrity, below); CHANNEL is the multifd channel id.
 * N (default 1) picks the hit that fails: the fault
 * fires on the N-th time fault_hit() is reached for that side, point and
 * channel, and never again, so each listed fault fires at most once per
 * process.  Hits are counted per process, across migrations: a source that
 * migrates twice keeps counting from where its first migration stopped.
 *
 * What one hit is, per point (src/multifd, src/migration/precopy.c):
 *   src connect     one per channel and migration, before it connects
 *   src handshake   one per channel and migration, before it is sent
 *   src packet      every packet the channel writes, data and SYNC alike
 *                   (a channel's first packet is the setup SYNC): the
 *                   packet is torn after half its header
 *   src sync        every SYNC the channel is asked for, before it is sent
 *   dst handshake   one per accepted channel and migration
 *   dst packet      every packet the channel has read, data and SYNC alike
 *   dst sync        every SYNC packet read, before the barrier
 *   src corrupt-page    every PAGE record with x-integrity, after its
 *                   checksum was taken: one byte of the copy sent is
 *                   flipped; channel 0 is the main stream, 1 postcopy's
 *                   preempt channel (src/ram/ram.c)
 *   src corrupt-mfpage  every multifd packet with pages, x-integrity on:
 *                   its first page's copy gets a flipped byte after hashing
 *   dst package     postcopy's PACKAGED, read whole, before it is loaded:
 *                   channel 0 fails the load, channel 1 ends the process
 *                   (_exit(1)), both before the confirmation PONG
 * So "src:packet:1:100" tears the 100th packet of channel 1: with 512 KiB
 * packets that is ~50 MiB into that channel's share of the first pass.
 *
 * Compiled in only with the meson option fault_injection (on for
 * development builds, off for release packages); otherwise fault_hit() is
 * constant false.
 *
 * Threads: fault_hit() may be called from any thread, concurrently.  The
 * parsed list is the one process-wide state in livemig: it is set once from
 * the environment (pthread_once) and then only read, except for each
 * fault's hit counter, which is atomic: two threads hitting the same fault
 * get distinct hit numbers, so exactly one of them sees the N-th.
 */
#ifndef UTIL_FAULT_H
#define UTIL_FAULT_H

#include <stdbool.h>

#ifdef FAULT_INJECTION
bool fault_hit(const char *side, const char *point, int channel);
#else
static inline bool fault_hit(const char *side, const char *point, int channel)
{
    (void)side; (void)point; (void)channel;
    return false;
}
#endif

#endif
