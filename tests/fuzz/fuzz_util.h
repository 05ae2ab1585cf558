/*
 * Helpers shared by the libFuzzer targets (tests/fuzz/, docs/fuzzing.md).
 * Each target is one LLVMFuzzerTestOneInput; nothing here is linked into
 * the library.
 */
#ifndef FUZZ_FUZZ_UTIL_H
#define FUZZ_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The input as a file: a memfd holding exactly `size` bytes, offset 0.
 * Aborts on failure (the fuzzer's own problem, not the code under test). */
static inline int fuzz_memfd(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz-input", MFD_CLOEXEC);
    size_t done = 0;

    if (fd < 0) {
        perror("memfd_create");
        abort();
    }
    while (done < size) {
        ssize_t n = write(fd, data + done, size - done);
        if (n <= 0) {
            perror("write");
            abort();
        }
        done += (size_t)n;
    }
    if (lseek(fd, 0, SEEK_SET) != 0)
        abort();
    return fd;
}

static inline uint32_t fuzz_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/*
 * A file target's input: be32 hole offset, be32 hole length (at most
 * FUZZ_MAX_HOLE), then the file without the hole.  The file is written
 * back with the hole as a sparse gap of zeros: a migration file is mostly
 * the zeros before its 1 MiB-aligned mapped-ram pages region, which would
 * otherwise not fit a fuzz input (make-corpus.py cuts out the longest zero
 * run; a plain stream has a zero hole).  Returns a memfd at offset 0, or -1
 * when the input is shorter than its 8-byte prefix.
 */
#define FUZZ_MAX_HOLE (8u << 20)
static inline int fuzz_hole_file(const uint8_t *data, size_t size)
{
    size_t at, hole;
    int fd;

    if (size < 8)
        return -1;
    at = fuzz_be32(data) % (size - 8 + 1);
    hole = fuzz_be32(data + 4) % (FUZZ_MAX_HOLE + 1);
    data += 8;
    size -= 8;
    fd = fuzz_memfd(data, at);
    if (lseek(fd, (off_t)(at + hole), SEEK_SET) < 0 ||
        (size > at && write(fd, data + at, size - at) != (ssize_t)(size - at)) ||
        ftruncate(fd, (off_t)(size + hole)) || lseek(fd, 0, SEEK_SET) != 0)
        abort();
    return fd;
}

static inline void fuzz_fd_path(char *buf, size_t len, int fd)
{
    snprintf(buf, len, "/proc/self/fd/%d", fd);
}

#endif
