/*
 * mapped-ram loading: the input is a mapped-ram file (main stream with the
 * block headers, bitmaps and pages regions), loaded as the
 * incoming side does -- stream_new_reader on the file, mapped_ram_open on
 * the same file (by its /proc/self/fd path), ram_load through
 * mapped_ram_placer -- into one 64 KiB "guest.ram" block, what
 * `livemig guest --mem 64K` saves.  The input is the file with its zero
 * hole cut out (fuzz_hole_file in fuzz_util.h).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz_util.h"
#include "mappedram/mappedram.h"
#include "ram/ram.h"
#include "savevm/savevm.h"
#include "stream/stream.h"

#define GUEST_LEN (64u << 10)

static ram_state ram;
static ram_placer placer;

static int ram_handler(lm_stream *s, void *opaque, uint32_t version, int type)
{
    return ram_load(&ram, &placer, s, type) ? -EINVAL : 0;
}

static int ram_check(void *opaque, char *why, size_t len)
{
    return ram_load_check(&ram, why, len);
}

static int dev_skip(lm_stream *s, void *opaque, uint32_t version, int type)
{
    uint64_t pages;
    uint32_t fill;

    if (lm_get_be64(s, &pages) || lm_get_be32(s, &fill))
        return lm_stream_error(s);
    for (uint64_t i = 0; i < pages && i < GUEST_LEN / RAM_PAGE_SIZE; i++)
        if (lm_get_be32(s, &fill))
            break;
    return lm_stream_error(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t *mem;
    int fd;
    char path[64];
    lm_error err = { 0 };
    mapped_ram_file *mr;
    loadvm *lv;
    lm_stream *s;

    if (!mem) {
        mem = mmap(NULL, GUEST_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED ||
            ram_register(&ram, "guest.ram", mem, GUEST_LEN, RAM_PAGE_SIZE, NULL))
            abort();
    }
    fd = fuzz_hole_file(data, size);
    if (fd < 0)
        return 0;
    fuzz_fd_path(path, sizeof(path), fd);
    mr = mapped_ram_open(path, 0, fd, 1, false, false, &err);
    if (!mr)
        abort();
    placer = mapped_ram_placer(mr);
    lv = calloc(1, sizeof(*lv));
    if (!lv)
        abort();
    lv->mapped_ram = true;
    loadvm_add_handler(lv, "ram", 0, RAM_SECTION_VERSION, ram_handler, NULL)->check = ram_check;
    loadvm_add_handler(lv, "guest", 0, 1, dev_skip, NULL);
    s = stream_new_reader(fd, false);
    ram_load_start(&ram);
    if (loadvm_run(lv, s) < 0 && lm_stream_error(s) == 0)
        abort();
    if (getenv("FUZZ_VERBOSE"))
        fprintf(stderr, "mappedram: %d %s\n", lm_stream_error(s), lm_stream_error_msg(s));
    ram_load_finish(&ram);
    stream_free(s);
    mapped_ram_close(mr);
    free(lv);
    close(fd);
    return 0;
}
