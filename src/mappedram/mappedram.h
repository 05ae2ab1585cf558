/*
 * mapped-ram: guest RAM in a file, every page at its own fixed offset
 * (QEMU 9.0+ layout, reference section 5; docs/format.md section 6).
 *
 * In the `ram` START section each block's idstr and length are followed by a
 * 28-byte header (be32 version 1, be64 page size, be64 bitmap offset, be64
 * pages offset -- absolute file offsets); the bitmap (host-endian unsigned
 * longs, bit i = page i present) sits right after the header, the pages
 * region starts at the next 1 MiB boundary, and the main stream continues
 * after the pages region.  No page records travel in the stream; PART and
 * END carry only EOS.  A page rewritten because it got dirty again lands on
 * the same spot, so the file never holds two copies of a page.  The bitmaps
 * are written last, after the final sync.
 *
 * x-integrity (ram_state.integrity, docs/format.md section 9): each block's
 * checksum table (be64 per page) and a seal over bitmap and table follow the
 * bitmap, and the pages region starts after them.  The workers hash every
 * page of a run right after its pwrite (source: the table entry) or pread
 * (destination: checked, -EBADMSG naming the page and file offset); the
 * destination checks the seal and absent pages' entries at START, before
 * any read is queued.
 *
 * The page I/O runs on an worker_pool (src/util/pool.h) of `channels` workers,
 * each with its own descriptor on the file (O_DIRECT with direct-io): one
 * worker without multifd, multifd-channels with it.  A request is one
 * contiguous run of pages: at most 1 MiB, one pwrite/pread straight from or
 * into guest RAM.  The owner -- the migration thread on the source, the
 * incoming thread on the destination -- is the only one that submits and
 * polls; the first I/O error is kept and reported by mapped_ram_sync().
 *
 * Ordering: mapped_ram_sync() waits for every queued request.  The source
 * calls it at every `ram` EOS, so a page queued in one pass is on disk
 * before the same page can be queued again in the next (two workers could
 * otherwise reorder the two writes).
 *
 * Cancel: the owner's waits (a free request, mapped_ram_sync) have no
 * timeout -- a slow file is not an error -- so a cancel must interrupt them:
 * mapped_ram_interrupt(), from any thread, makes the current and every later
 * wait return at once with an error and stops all further queueing (pages
 * the sink is given are dropped, the placer's block load fails
 * with "loading interrupted").  The migration's cancel path (mig_kick) calls
 * it; it is the one function of this module another thread may call, and
 * the caller must keep mr from being closed meanwhile (publish the pointer
 * under the lock that the cancel path takes).  mapped_ram_close()
 * after an interrupt waits only for the requests the workers are running
 * (one each, at most MAPPED_RAM_CHUNK bytes), not for the queued ones.
 */
#ifndef MAPPEDRAM_MAPPEDRAM_H
#define MAPPEDRAM_MAPPEDRAM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "ram/ram.h"
#include "stream/stream.h"

#define MAPPED_RAM_HDR_SIZE 28
#define MAPPED_RAM_VERSION 1
#define MAPPED_RAM_ALIGN (1ULL << 20)
#define MAPPED_RAM_CHUNK (1ULL << 20)

typedef struct mapped_ram_file mapped_ram_file;

/*
 * Open `channels` workers on `path` (write: O_WRONLY, read: O_RDONLY; both
 * plus O_DIRECT when `direct`).  `base` is the file offset the stream starts
 * at (file:PATH,offset=N); `main_fd` the stream's own descriptor, used for
 * the bitmaps.
 */
mapped_ram_file *mapped_ram_open(const char *path, uint64_t base, int main_fd, int channels,
                                 bool direct, bool write, lm_error *err);
void mapped_ram_close(mapped_ram_file *mr);
/* Page bytes queued for writing or reading so far (owner thread). */
uint64_t mapped_ram_bytes(const mapped_ram_file *mr);
/* Make the owner's current and later waits return, queue nothing more
 * (cancel; see above).  Any thread; sticky; NULL is a no-op. */
void mapped_ram_interrupt(mapped_ram_file *mr);

/* ---- source ---- */
/*
 * The sink (ram.h) that puts pages in the file: START writes each block's
 * header and skips its pages region; a page goes to its fixed slot (with
 * `zero_check`, a zero page only gets its bit cleared); every EOS waits for
 * the writes.  Valid while mr is open.
 */
ram_sink mapped_ram_sink(mapped_ram_file *mr, bool zero_check);
/* Submit the pending run and wait for all writes.  0 or the first error. */
int mapped_ram_sync(mapped_ram_file *mr, lm_error *err);
/* After the final sync: write every block's bitmap. */
int mapped_ram_put_bitmaps(mapped_ram_file *mr, ram_state *r, lm_error *err);

/* ---- destination ---- */
/*
 * The placer (ram.h) that reads pages from the file: at START it reads and
 * checks each block's header and bitmap and queues the reads of every
 * present page (errors latched on s name the block and offset); after the
 * block list it waits for them; a page record in the stream is refused.
 */
ram_placer mapped_ram_placer(mapped_ram_file *mr);

#endif
