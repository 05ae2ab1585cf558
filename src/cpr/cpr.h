/*
 * CPR: QEMU's "checkpoint and restart" migration modes, which hand guest
 * RAM over instead of copying it (docs/format.md, section 8).
 *
 *   mode normal        today's migration.  With x-ignore-shared, blocks in a
 *                      named shared file stay in place (the destination maps
 *                      the same file); memfd and anonymous blocks are sent.
 *   mode cpr-reboot    a save to a file: blocks must be in a shared file
 *                      that outlives the process (memfd and anonymous RAM
 *                      are refused); with x-ignore-shared they stay in
 *                      place, only their names, sizes and addresses go
 *                      into the file.  A new process maps the same file and
 *                      loads the state.
 *   mode cpr-transfer  to a new process on this host over a unix: socket:
 *                      every block is fd-backed; the source passes each
 *                      block's descriptor (SCM_RIGHTS) in a preamble on the
 *                      main connection, the destination checks and maps
 *                      them over address space it reserved and says yes or
 *                      no; then the ordinary stream follows with no page in
 *                      it (every block left in place, as QEMU 10 does in
 *                      this mode).
 *
 * Ownership.  A block registered with lm_ram_register_fd owns a dup of the
 * program's descriptor (b->fd), closed by cpr_release (lm_free).  A
 * destination block registered with fd -1 is a reservation: the library
 * maps a received descriptor over it with MAP_FIXED and from then on owns
 * that descriptor the same way (so the destination can later be the source
 * of the next cpr-transfer).  If the load fails before the guest runs, the
 * mapping is replaced by the reservation again and the descriptor closed:
 * nothing of the source's memory stays reachable here, and nothing here
 * ever wrote to it (the loader refuses page records for blocks in place).
 *
 * Threads.  cpr_register and cpr_check run on the caller's thread before a
 * migration starts (they set b->fd, b->backing, b->ignored, which are then
 * read-only until it ends); cpr_send runs on the migration thread,
 * cpr_receive and cpr_incoming_failed on the incoming thread.  Every wait
 * polls the migration's cancel_fd and has a deadline.
 */
#ifndef CPR_CPR_H
#define CPR_CPR_H

#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"

#include "ram/ram.h"
#include "stream/transport.h"

/* The `mode` parameter's values, in QEMU's MigMode order. */
typedef enum cpr_mode { CPR_MODE_NORMAL, CPR_MODE_REBOOT, CPR_MODE_TRANSFER } cpr_mode;

/* What a block's memory is (ramblock.backing). */
typedef enum cpr_backing {
    CPR_BACKING_ANON,       /* lm_ram_register: private memory */
    CPR_BACKING_MEMFD,      /* a memfd, or an unlinked file: dies with its holders */
    CPR_BACKING_FILE,       /* a named file (tmpfs under /dev/shm, a DAX device...) */
    CPR_BACKING_AWAIT,      /* destination: reserved, waits for a cpr-transfer source */
} cpr_backing;

#define CPR_MAGIC 0x4c435052u        /* "LCPR" */
#define CPR_VERSION 1
#define CPR_TIMEOUT_MS 10000         /* each step of the preamble exchange */
#define CPR_MSG_MAX 512

/* lm_ram_register_fd's work once block i is registered: own a dup of fd
 * (or, fd -1, mark the block as waiting for a cpr-transfer source's). */
int cpr_register(ram_state *r, int i, int fd, uint64_t offset, lm_error *err);

/*
 * Before a migration starts (the caller's thread): decide which blocks stay
 * in place (b->ignored) and refuse what the mode cannot do, with a message
 * naming the block.  `conflict`: a capability that is on and that this mode
 * cannot be combined with (NULL: none) -- the caller knows the caps.
 */
typedef struct cpr_config {
    cpr_mode mode;
    bool ignore_shared;         /* x-ignore-shared */
    bool incoming;
    transport_uri_kind uri_kind;
    const char *conflict;
} cpr_config;
int cpr_check(ram_state *r, const cpr_config *c, lm_error *err);

/* Source, cpr-transfer, first thing on the connection `fd`: check the
 * peer, pass the descriptors, wait for the destination's verdict. */
int cpr_send(ram_state *r, int fd, int cancel_fd, lm_error *err);
/* Destination, cpr-transfer, right after accept: the other half. */
int cpr_receive(ram_state *r, int fd, int cancel_fd, lm_error *err);
/* Destination: the load failed after cpr_receive mapped memory. */
void cpr_incoming_failed(ram_state *r);
/* lm_free: close the descriptors the library owns. */
void cpr_release(ram_state *r);

/* The peer of a connected unix socket runs as us or as root: 0, or
 * -EPERM with a message that names its uid. */
int cpr_check_peer(int fd, const char *what, lm_error *err);

#endif
