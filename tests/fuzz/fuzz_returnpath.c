/*
 * Return-path messages: the input is what the destination sent, written
 * into a socketpair whose write end is then shut, and read by the source's
 * reader thread (rp_reader_start); the verdict is awaited with
 * rp_reader_wait_shut.  Every input ends, well within the timeout, in a
 * SHUT, a protocol error or the peer's close: a timeout is a hang.
 * Messages other than SHUT go to a handler that takes them (postcopy's
 * page requests are valid messages), so the table's checks are what the
 * bytes meet.  RECV_BITMAP names one block of 100 pages ("pc.ram"; any
 * other name is refused): its trailer is read and applied to that block
 * with postcopy_recv_bitmap_apply, as a source in recovery does.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_util.h"
#include "postcopy/postcopy.h"
#include "returnpath/returnpath.h"
#include "util/bitmap.h"
#include "util/error.h"

static int on_message(void *opaque, uint16_t type, const uint8_t *data, uint16_t len,
                      lm_error *err)
{
    volatile uint8_t sum = 0;

    for (uint16_t i = 0; i < len; i++)      /* the payload is readable */
        sum += data[i];
    (void)sum;
    return 0;
}

static void on_failed(void *opaque, const lm_error *err)
{
}

static ramblock block = { .idstr = "pc.ram", .npages = 100 };

static int on_bitmap_bytes(void *opaque, const uint8_t *msg, uint16_t len, uint64_t *bytes,
                           lm_error *err)
{
    if (len != 7 || msg[0] != 6 || memcmp(msg + 1, block.idstr, 6))
        return error_set(err, -EPROTO, "RECV_BITMAP for an unknown block");
    *bytes = postcopy_recv_bitmap_trailer_bytes(block.npages);
    return 0;
}

static int on_bitmap(void *opaque, const uint8_t *msg, uint16_t len, const uint8_t *trailer,
                     uint64_t bytes, lm_error *err)
{
    uint64_t resend;

    if (!block.bmap)
        block.bmap = bitmap_new(block.npages);
    return postcopy_recv_bitmap_apply(&block, trailer, bytes, &resend, err);
}

static const rp_reader_ops ops = { .message = on_message, .failed = on_failed,
                                   .bitmap_bytes = on_bitmap_bytes, .bitmap = on_bitmap };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fds[2];
    lm_error err = { 0 };
    uint32_t status;
    rp_reader *r;
    size_t done = 0;
    int ret;

    if (size > 65536)
        return 0;   /* more than the socket buffer would block the writer */
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds))
        abort();
    while (done < size) {
        ssize_t n = write(fds[1], data + done, size - done);
        if (n <= 0)
            abort();
        done += (size_t)n;
    }
    shutdown(fds[1], SHUT_WR);
    r = rp_reader_start(fds[0], &ops, NULL, &err);
    if (!r)
        abort();
    ret = rp_reader_wait_shut(r, 5000, &status, &err);
    if (ret == -ETIMEDOUT) {
        fprintf(stderr, "return path: no verdict within 5 s of the peer's close\n");
        abort();
    }
    rp_reader_stop(r);
    close(fds[0]);
    close(fds[1]);
    return 0;
}
