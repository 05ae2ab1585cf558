/*
 * Device state of the demo guest: the version table on the wire.  See
 * guest_state.h for the encoding.  The table goes out in chunks converted to
 * big-endian in a bounce buffer, so a 1 GiB guest (256 Ki pages, 1 MiB of
 * table) costs a few lm_put_buffer calls, not one call per page.
 */
#include "guest_state.h"

#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "guest.h"

#define TABLE_CHUNK 16384      /* versions converted per buffer call */

static int state_save(lm_stream *s, void *opaque)
{
    struct guest *g = opaque;
    const uint32_t *v = guest_versions(g);
    uint64_t pages = guest_pages(g);
    uint32_t *buf = malloc(TABLE_CHUNK * sizeof(uint32_t));

    if (!buf)
        return -ENOMEM;
    lm_put_be64(s, pages);
    lm_put_be32(s, (uint32_t)guest_fill(g));
    for (uint64_t i = 0; i < pages && !lm_stream_error(s); i += TABLE_CHUNK) {
        uint64_t n = pages - i < TABLE_CHUNK ? pages - i : TABLE_CHUNK;
        for (uint64_t j = 0; j < n; j++)
            buf[j] = htobe32(v[i + j]);
        lm_put_buffer(s, buf, n * sizeof(uint32_t));
    }
    free(buf);
    return lm_stream_error(s);
}

/*
 * A real device's state load reads guest memory (DMA rings, descriptors):
 * so does this one, to keep postcopy honest -- there the pages may not have
 * arrived yet, the read faults and the page is asked for while the loader
 * is inside the package.  A few pages picked from the table must hold the
 * version the table names (the header of page_fill, or zeros at version 0).
 */
#define STATE_PROBES 4

static int state_probe_ram(lm_stream *s, struct guest *g, uint64_t at)
{
    const uint32_t *v = guest_versions(g);
    const uint8_t *ram = guest_ram(g);
    uint64_t pages = guest_pages(g), h = GUEST_GOLDEN;

    for (uint64_t i = 0; i < pages; i += pages / 64 + 1)
        h = guest_mix64(h ^ v[i]);
    for (int k = 0; k < STATE_PROBES; k++) {
        uint64_t i = guest_mix64(h + (uint64_t)k) % pages, hdr[2];

        memcpy(hdr, ram + i * GUEST_PAGE_SIZE, sizeof(hdr));
        if (le64toh(hdr[0]) == (v[i] ? i : 0) && le64toh(hdr[1]) == v[i])
            continue;
        lm_stream_set_error(s, -EINVAL, "guest: page %llu holds version %llu but the device "
                            "state (byte offset %llu) says %u: RAM and device state do not "
                            "belong together", (unsigned long long)i,
                            (unsigned long long)le64toh(hdr[1]), (unsigned long long)at, v[i]);
        return -EINVAL;
    }
    return 0;
}

static int state_load(lm_stream *s, void *opaque, uint32_t version, int section_type)
{
    struct guest *g = opaque;
    uint32_t *v = guest_versions(g);
    uint64_t pages, mine = guest_pages(g);
    uint32_t fill, *buf;

    uint64_t at = lm_stream_offset(s);     /* where the state begins, for messages */

    if (version != GUEST_STATE_VERSION || section_type != LM_SECTION_FULL) {
        lm_stream_set_error(s, -EINVAL, "guest: unexpected device section (version %u, "
                            "type %d) at byte offset %llu", version, section_type,
                            (unsigned long long)at);
        return -EINVAL;
    }
    if (lm_get_be64(s, &pages) || lm_get_be32(s, &fill))
        return lm_stream_error(s);
    if (pages != mine) {
        lm_stream_set_error(s, -EINVAL, "guest: the source has %llu pages (byte offset %llu), "
                            "this guest %llu (start both with the same --mem)",
                            (unsigned long long)pages, (unsigned long long)at,
                            (unsigned long long)mine);
        return -EINVAL;
    }
    if (fill > GUEST_FILL_ZERO) {
        lm_stream_set_error(s, -EINVAL, "guest: unknown fill kind %u at byte offset %llu", fill,
                            (unsigned long long)(at + 8));
        return -EINVAL;
    }
    buf = malloc(TABLE_CHUNK * sizeof(uint32_t));
    if (!buf) {
        lm_stream_set_error(s, -ENOMEM, "guest: out of memory");
        return -ENOMEM;
    }
    for (uint64_t i = 0; i < pages; i += TABLE_CHUNK) {
        uint64_t n = pages - i < TABLE_CHUNK ? pages - i : TABLE_CHUNK;
        if (lm_get_buffer(s, buf, n * sizeof(uint32_t)))
            break;
        for (uint64_t j = 0; j < n; j++)
            v[i + j] = be32toh(buf[j]);
    }
    free(buf);
    guest_set_fill(g, (enum guest_fill)fill);
    if (!lm_stream_error(s) && pages)
        return state_probe_ram(s, g, at);
    return lm_stream_error(s);
}

const lm_device_ops guest_state_ops = { .save = state_save, .load = state_load };
