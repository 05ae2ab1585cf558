/*
 * The multifd channel's decoders: the 64-byte handshake
 * (multifd_check_init) and the 1344-byte packet header
 * (multifd_get_header) against a destination with a 64 MiB "pc.ram" (the
 * size of the QEMU 7.2 captures' block) and a 4 MiB "guest.ram".  The input
 * is a channel's bytes: handshake first, then headers back to back (short
 * inputs are zero-padded); the compression the destination expects comes
 * from the handshake's last byte, so all three are tried.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "fuzz_util.h"
#include "multifd/multifd.h"
#include "ram/ram.h"

static ram_state ram;

static void init(void)
{
    /* Never touched: the decoder only checks offsets against the blocks. */
    void *pc = mmap(NULL, 64u << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1, 0);
    void *g = mmap(NULL, 4u << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);

    if (pc == MAP_FAILED || g == MAP_FAILED ||
        ram_register(&ram, "pc.ram", pc, 64u << 20, RAM_PAGE_SIZE, NULL) ||
        ram_register(&ram, "guest.ram", g, 4u << 20, RAM_PAGE_SIZE, NULL))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    uint8_t init_buf[MULTIFD_INIT_SIZE] = { 0 };
    static uint8_t hdr[MULTIFD_HDR_SIZE];
    lm_error err = { 0 };
    uint8_t id = 0;
    size_t off;
    int method;

    if (!ready) {
        init();
        ready = 1;
    }
    memcpy(init_buf, data, size < sizeof(init_buf) ? size : sizeof(init_buf));
    multifd_check_init(init_buf, 1 + (init_buf[MULTIFD_INIT_SIZE - 1] & 63), &id, &err);
    method = init_buf[MULTIFD_INIT_SIZE - 1] % 3;

    off = size < MULTIFD_INIT_SIZE ? size : MULTIFD_INIT_SIZE;
    do {
        mf_header h;
        const ramblock *block = NULL;
        size_t n = size - off < MULTIFD_HDR_SIZE ? size - off : MULTIFD_HDR_SIZE;

        memset(hdr, 0, sizeof(hdr));
        memcpy(hdr, data + off, n);
        err = (lm_error){ 0 };
        if (multifd_get_header(hdr, &h, &ram, mf_comp_flags(method), &block, &err) == 0) {
            /* What the receiver then trusts: every offset inside the block. */
            if ((uint64_t)h.normal + h.zero > MULTIFD_PAGES)
                abort();
            if (h.normal + h.zero && !block)
                abort();
            for (uint32_t i = 0; i < h.normal + h.zero; i++)
                if (h.offsets[i] >= block->length || h.offsets[i] % RAM_PAGE_SIZE)
                    abort();
        }
        off += n;
    } while (off < size);
    return 0;
}
