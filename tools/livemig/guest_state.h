/*
 * The demo guest's device state: its version table, as a non-iterable
 * device ("guest", instance 0, version 1) -- one FULL section written with
 * the guest stopped.
 *
 * Encoding (all big-endian):
 *     be64  number of pages
 *     be32  fill kind (0 random, 1 text, 2 zero)
 *     be32  version of page 0, page 1, ... (number-of-pages entries)
 *
 * The loader refuses another page count (the two sides were started with
 * different --mem) or an unknown fill kind, with a message naming both
 * values and the byte offset, and adopts the source's fill kind so text
 * pages verify as text.
 *
 * Threads: the callbacks run on the library's migration or incoming thread
 * while the guest's writers are parked; the opaque is the struct guest.
 */
#ifndef LIVEMIG_TOOL_GUEST_STATE_H
#define LIVEMIG_TOOL_GUEST_STATE_H

#include "livemig/livemig.h"

#define GUEST_STATE_IDSTR "guest"
#define GUEST_STATE_VERSION 1

/* Device ops for lm_device_register(m, GUEST_STATE_IDSTR, 0, GUEST_STATE_VERSION,
 * &guest_state_ops, guest, err). */
extern const lm_device_ops guest_state_ops;

#endif
