/*
 * The main-stream loader: loadvm_run over the input, as a destination with
 * one RAM block ("guest.ram", what `livemig guest --mem 64K` has; the
 * stream's total must match, so QEMU's streams stop at their configuration
 * and block list) placed by the default placer, a device handler shaped like
 * the demo guest's version table ("guest"), and OPEN_RETURN_PATH / PING
 * accepted.  Every input must end in 0 or an error latched on the stream.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "ram/ram.h"
#include "savevm/savevm.h"
#include "stream/stream.h"

#define GUEST_LEN (64u << 10)

static ram_state ram;
static uint8_t *guest_mem;
static uint32_t versions[GUEST_LEN / RAM_PAGE_SIZE];

static int ram_handler(lm_stream *s, void *opaque, uint32_t version, int type)
{
    ram_placer pl = ram_direct_placer();

    return ram_load(&ram, &pl, s, type) ? -EINVAL : 0;
}

static int ram_check(void *opaque, char *why, size_t len)
{
    return ram_load_check(&ram, why, len);
}

/* The demo guest's device: be64 pages, be32 fill, pages x be32. */
static int dev_load(lm_stream *s, void *opaque, uint32_t version, int type)
{
    uint64_t pages;
    uint32_t fill;

    if (lm_get_be64(s, &pages) || lm_get_be32(s, &fill))
        return lm_stream_error(s);
    if (pages != GUEST_LEN / RAM_PAGE_SIZE || fill > 2) {
        lm_stream_set_error(s, -EINVAL, "fuzz: bad device state");
        return -EINVAL;
    }
    for (uint64_t i = 0; i < pages; i++)
        if (lm_get_be32(s, &versions[i]))
            break;
    return lm_stream_error(s);
}

static int cmd_accept(const loadvm_cmd *c, void *opaque)
{
    return 0;
}

static void init(void)
{
    guest_mem = mmap(NULL, GUEST_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (guest_mem == MAP_FAILED ||
        ram_register(&ram, "guest.ram", guest_mem, GUEST_LEN, RAM_PAGE_SIZE, NULL))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool ready;
    loadvm *lv;
    lm_stream *s;
    int ret;

    if (!ready) {
        init();
        ready = true;
    }
    lv = calloc(1, sizeof(*lv));
    if (!lv)
        abort();
    loadvm_add_handler(lv, "ram", 0, RAM_SECTION_VERSION, ram_handler, NULL)->check = ram_check;
    loadvm_add_handler(lv, "guest", 0, 1, dev_load, NULL);
    loadvm_set_command(lv, WIRE_CMD_OPEN_RETURN_PATH, cmd_accept, NULL);
    loadvm_set_command(lv, WIRE_CMD_PING, cmd_accept, NULL);

    s = stream_new_mem(data, size);
    ram_load_start(&ram);
    ret = loadvm_run(lv, s);
    if (ret < 0 && lm_stream_error(s) == 0)
        abort();            /* a failure must say why */
    if (getenv("FUZZ_VERBOSE"))
        fprintf(stderr, "loadvm: %d %s\n", ret, lm_stream_error_msg(s));
    ram_load_finish(&ram);
    stream_free(s);
    free(lv);
    return 0;
}
