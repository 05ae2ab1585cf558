/*
 * The `ram` section, both directions; see ram.h for the design.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "integrity/integrity.h"
#include "ram/ram.h"
#include "util/fault.h"
#include "util/bitmap.h"
#include "util/error.h"
#include "util/zero.h"

int ram_register(ram_state *r, const char *idstr, void *host, uint64_t length,
                 uint64_t page_size, lm_error *err)
{
    ramblock *b;

    if (!idstr || !*idstr || strlen(idstr) > 255)
        return error_set(err, -EINVAL, "RAM block name must be 1 to 255 bytes");
    if (ram_find(r, idstr) >= 0)
        return error_set(err, -EEXIST, "RAM block '%s' is already registered", idstr);
    if (page_size != RAM_PAGE_SIZE)
        return error_set(err, -EINVAL, "RAM block '%s': page size %" PRIu64
                         " not supported (only 4096)", idstr, page_size);
    if (!host || ((uintptr_t)host & (RAM_PAGE_SIZE - 1)) || !length ||
        (length & (RAM_PAGE_SIZE - 1)))
        return error_set(err, -EINVAL, "RAM block '%s': host address and length must "
                         "be page aligned and non-zero", idstr);
    if (r->nblocks == RAM_MAX_BLOCKS)
        return error_set(err, -ENOSPC, "too many RAM blocks (max %d)", RAM_MAX_BLOCKS);
    b = &r->blocks[r->nblocks++];
    memset(b, 0, sizeof(*b));
    snprintf(b->idstr, sizeof(b->idstr), "%s", idstr);
    b->host = host;
    b->length = length;
    b->npages = length / RAM_PAGE_SIZE;
    b->fd = -1;
    b->mr_addr = r->total;
    b->seed = integrity_block_seed(b->idstr);
    r->total += length;
    return 0;
}

int ram_find(const ram_state *r, const char *idstr)
{
    for (int i = 0; i < r->nblocks; i++)
        if (!strcmp(r->blocks[i].idstr, idstr))
            return i;
    return -1;
}

/* ------------------------------------------------------------ source */

void ram_save_start(ram_state *r, dirty_tracker *arm)
{
    r->dirty = 0;
    r->arm = arm;
    for (int i = 0; i < r->nblocks; i++) {
        ramblock *b = &r->blocks[i];
        bitmap_free(b->bmap);
        b->bmap = bitmap_new(b->npages);
        b->arm_next = arm && !b->ignored ? 0 : b->npages;
        if (b->ignored)
            continue;           /* in place: nothing of it is ever sent */
        bitmap_fill(b->bmap, b->npages);
        r->dirty += b->npages;
    }
    r->cur_block = 0;
    r->cur_page = 0;
    r->last_sent = NULL;
    r->zero_pages = r->normal_pages = r->offstream_bytes = 0;
}

void ram_save_finish(ram_state *r)
{
    for (int i = 0; i < r->nblocks; i++) {
        bitmap_free(r->blocks[i].bmap);
        r->blocks[i].bmap = NULL;
    }
}

void ram_put_eos(ram_state *r, const ram_sink *sink, lm_stream *s)
{
    lm_error err = { 0 };

    if (sink->ops && sink->ops->flush && !lm_stream_error(s) &&
        sink->ops->flush(sink->impl, r, s, &err) && !lm_stream_error(s))
        lm_stream_set_error(s, err.code ? err.code : -EIO, "%s", err.msg);
    lm_put_be64(s, RAM_EOS);
}

void ram_save_setup(ram_state *r, const ram_sink *sink, lm_stream *s)
{
    lm_put_be64(s, r->total | RAM_MEM_SIZE);
    for (int i = 0; i < r->nblocks; i++) {
        stream_put_counted(s, r->blocks[i].idstr);
        lm_put_be64(s, r->blocks[i].length);
        if (r->ignore_shared)
            lm_put_be64(s, r->blocks[i].mr_addr);
        if (sink->ops && sink->ops->block)
            sink->ops->block(sink->impl, r, s, &r->blocks[i]);
    }
    ram_put_eos(r, sink, s);
}

/* CONTINUE is relative to the stream a record is on: `last` is its own. */
static void ram_put_record_on(lm_stream *s, const ramblock **last, const ramblock *b,
                              uint64_t offset, uint64_t flags)
{
    if (b == *last) {
        lm_put_be64(s, offset | flags | RAM_CONTINUE);
        return;
    }
    lm_put_be64(s, offset | flags);
    stream_put_counted(s, b->idstr);
    *last = b;
}

void ram_put_record(ram_state *r, lm_stream *s, const ramblock *b, uint64_t offset,
                    uint64_t flags)
{
    ram_put_record_on(s, &r->last_sent, b, offset, flags);
}

/*
 * A PAGE payload with its checksum (x-integrity): the page is copied once,
 * into the stream's buffer, and that copy is both hashed and sent, so the sum always matches what
 * travels even while the guest writes the page (it is dirty again then and
 * goes again).  The fault point "corrupt-page" (channel 0: the main stream,
 * 1: the preempt channel) flips one byte of the copy after hashing.
 */
static void ram_put_checked(lm_stream *s, const ramblock *b, uint64_t page, int channel)
{
    uint8_t *copy = stream_put_copy(s, b->host + page * RAM_PAGE_SIZE, RAM_PAGE_SIZE);
    uint64_t sum;

    if (!copy)
        return;     /* the stream failed: nothing more goes out */
    sum = integrity_page(b->seed, page * RAM_PAGE_SIZE, copy);
    if (fault_hit("src", "corrupt-page", channel))
        copy[RAM_PAGE_SIZE / 2] ^= 0x20;
    lm_put_be64(s, sum);
}

static void ram_put_zero_on(const ram_state *r, lm_stream *s, const ramblock **last,
                            const ramblock *b, uint64_t page)
{
    ram_put_record_on(s, last, b, page * RAM_PAGE_SIZE, RAM_ZERO);
    lm_put_u8(s, 0);
    if (r->integrity)
        lm_put_be64(s, integrity_fill(b->seed, page * RAM_PAGE_SIZE, 0));
}

static void ram_put_page_on(const ram_state *r, lm_stream *s, const ramblock **last,
                            const ramblock *b, uint64_t page, int channel)
{
    ram_put_record_on(s, last, b, page * RAM_PAGE_SIZE, RAM_PAGE);
    if (r->integrity)
        ram_put_checked(s, b, page, channel);
    else
        stream_put_page(s, b->host + page * RAM_PAGE_SIZE, RAM_PAGE_SIZE);
}

void ram_put_urgent(const ram_state *r, lm_stream *s, const ramblock **last, const ramblock *b,
                    uint64_t page)
{
    if (buf_is_zero(b->host + page * RAM_PAGE_SIZE, RAM_PAGE_SIZE))
        ram_put_zero_on(r, s, last, b, page);
    else
        ram_put_page_on(r, s, last, b, page, 1);
}

void ram_put_zero(ram_state *r, lm_stream *s, const ramblock *b, uint64_t page)
{
    ram_put_zero_on(r, s, &r->last_sent, b, page);
}

void ram_put_page(ram_state *r, lm_stream *s, const ramblock *b, uint64_t page)
{
    ram_put_page_on(r, s, &r->last_sent, b, page, 0);
}

/* The default sink: this thread checks for zeros and writes records. */
static int ram_stream_page(ram_state *r, lm_stream *s, ramblock *b, uint64_t page)
{
    if (buf_is_zero(b->host + page * RAM_PAGE_SIZE, RAM_PAGE_SIZE)) {
        ram_put_zero(r, s, b, page);
        return RAM_SENT_ZERO;
    }
    ram_put_page(r, s, b, page);
    return RAM_SENT_STREAM;
}

static void ram_save_page(ram_state *r, const ram_sink *sink, lm_stream *s, ramblock *b,
                          uint64_t page)
{
    int sent = sink->ops && sink->ops->page ? sink->ops->page(sink->impl, r, s, b, page)
                                            : ram_stream_page(r, s, b, page);

    switch (sent) {
    case RAM_SENT_ZERO:
        r->zero_pages++;
        break;
    case RAM_SENT_AWAY:
        r->offstream_bytes += RAM_PAGE_SIZE;
        /* fall through */
    case RAM_SENT_STREAM:
        r->normal_pages++;
        break;
    default:
        assert(sent < 0);
        if (!lm_stream_error(s))
            lm_stream_set_error(s, sent, "%s: sending a page failed",
                                sink->ops ? sink->ops->name : "ram");
    }
}

/* Work done so far: main-stream bytes plus pages handed to channels/files. */
static uint64_t ram_progress(const ram_state *r, lm_stream *s)
{
    return lm_stream_offset(s) + r->offstream_bytes;
}

/* Arm tracking of the chunk holding `page` (see ram_save_start). */
static int ram_arm(ram_state *r, lm_stream *s, ramblock *b, uint64_t page)
{
    uint64_t end = (page / RAM_ARM_PAGES + 1) * RAM_ARM_PAGES;
    lm_error err = { 0 };
    int ret;

    if (end > b->npages)
        end = b->npages;
    ret = dirty_arm(r->arm, (int)(b - r->blocks), end * RAM_PAGE_SIZE, &err);
    if (ret < 0) {
        lm_stream_set_error(s, ret, "%s", err.msg);
        return ret;
    }
    b->arm_next = end;
    return 0;
}

bool ram_save_some(ram_state *r, const ram_sink *sink, lm_stream *s, uint64_t budget)
{
    uint64_t start = ram_progress(r, s);

    while (!lm_stream_error(s)) {
        ramblock *b;
        uint64_t page;

        if (r->cur_block >= r->nblocks) {
            r->cur_block = 0;
            r->cur_page = 0;
            return true;
        }
        b = &r->blocks[r->cur_block];
        page = bitmap_next_set(b->bmap, b->npages, r->cur_page);
        if (page >= b->npages) {
            r->cur_block++;
            r->cur_page = 0;
            continue;
        }
        if (page >= b->arm_next && ram_arm(r, s, b, page))
            break;
        /* The walk owns the bit: cleared before the page is handed over, so a
         * write after the sink read it sets it again (dirty.h). */
        assert(r->dirty > 0);
        bitmap_clear(b->bmap, page);
        r->dirty--;
        ram_save_page(r, sink, s, b, page);
        r->cur_page = page + 1;
        if (ram_progress(r, s) - start >= budget)
            break;
    }
    return false;
}

bool ram_take_requested(ram_state *r, ramblock *b, uint64_t page)
{
    bool was = bitmap_test(b->bmap, page);

    assert(page < b->npages);
    if (was) {
        assert(r->dirty > 0);
        bitmap_clear(b->bmap, page);
        r->dirty--;
    }
    /* The guest faults near where it faulted last: go on from there. */
    r->cur_block = (int)(b - r->blocks);
    r->cur_page = page + 1;
    return was;
}

bool ram_save_requested(ram_state *r, const ram_sink *sink, lm_stream *s, ramblock *b,
                        uint64_t page)
{
    if (!ram_take_requested(r, b, page))
        return false;
    ram_save_page(r, sink, s, b, page);
    return true;
}

int64_t ram_sync(ram_state *r, dirty_tracker *d, lm_error *err)
{
    int64_t total = 0;

    for (int i = 0; i < r->nblocks; i++) {
        if (r->blocks[i].ignored)
            continue;           /* never armed, never sent */
        int64_t n = dirty_sync(d, i, r->blocks[i].bmap, err);
        if (n < 0)
            return n;
        total += n;
    }
    r->dirty += (uint64_t)total;
    return total;
}

/* ------------------------------------------------------------ destination */

/*
 * A load after a failed one (the guest never ran) starts from memory the
 * failed attempt partly wrote.  Every path but one overwrites each page
 * again; a mapped-ram file does not write the pages its bitmap leaves out
 * (zero by definition), so what the last attempt placed is zeroed first.
 */
static void ram_load_forget(ramblock *b)
{
    for (uint64_t p = bitmap_next_set(b->rmap, b->npages, 0); p < b->npages;) {
        uint64_t end = bitmap_next_clear(b->rmap, b->npages, p);
        for (uint64_t q = p; q < end; q++)
            if (!buf_is_zero(b->host + q * RAM_PAGE_SIZE, RAM_PAGE_SIZE))
                memset(b->host + q * RAM_PAGE_SIZE, 0, RAM_PAGE_SIZE);
        p = bitmap_next_set(b->rmap, b->npages, end);
    }
}

void ram_load_start(ram_state *r)
{
    r->last_recv = NULL;
    r->seen_block_list = false;
    r->load_ended = false;
    for (int i = 0; i < r->nblocks; i++) {
        ramblock *b = &r->blocks[i];
        if (b->rmap && !b->ignored)    /* shared memory in place is never wiped */
            ram_load_forget(b);
        bitmap_free(b->rmap);
        b->rmap = bitmap_new(b->npages);
        b->listed = false;
    }
}

void ram_load_finish(ram_state *r)
{
    for (int i = 0; i < r->nblocks; i++) {
        bitmap_free(r->blocks[i].rmap);
        r->blocks[i].rmap = NULL;
    }
}

int ram_load_check(const ram_state *r, char *why, size_t len)
{
    bool ok = true;

    if (!r->seen_block_list && r->nblocks) {
        error_list_add(why, len, "no RAM block list (%d block%s registered here)",
                       r->nblocks, r->nblocks == 1 ? "" : "s");
        return -1;
    }
    if (!r->load_ended) {
        error_list_add(why, len, "no END of the ram section");
        ok = false;
    }
    for (int i = 0; i < r->nblocks; i++) {
        const ramblock *b = &r->blocks[i];
        uint64_t got = b->ignored ? b->npages : bitmap_count(b->rmap, b->npages);

        if (got == b->npages)
            continue;
        error_list_add(why, len, "RAM block '%s': %" PRIu64 " of %" PRIu64 " pages never "
                       "arrived (the first at offset 0x%" PRIx64 ")", b->idstr,
                       b->npages - got, b->npages,
                       (uint64_t)(bitmap_next_clear(b->rmap, b->npages, 0) * RAM_PAGE_SIZE));
        ok = false;
    }
    return ok ? 0 : -1;
}

static int ram_load_block_list(ram_state *r, const ram_placer *pl, lm_stream *s, uint64_t total,
                               uint64_t at)
{
    uint64_t sum = 0;
    char name[256];

    if (total != r->total) {
        lm_stream_set_error(s, -EINVAL, "ram: stream has %" PRIu64 " bytes of RAM, this "
                            "guest has %" PRIu64 " (MEM_SIZE record at byte offset %" PRIu64 ")",
                            total, r->total, at);
        return -1;
    }
    while (sum < total) {
        uint64_t where = lm_stream_offset(s), len;
        int i;

        if (stream_get_counted(s, name) || lm_get_be64(s, &len))
            return -1;
        i = ram_find(r, name);
        if (i < 0) {
            lm_stream_set_error(s, -ENOENT, "ram: unknown RAM block '%s' at byte offset %"
                                PRIu64, name, where);
            return -1;
        }
        if (r->blocks[i].listed) {
            lm_stream_set_error(s, -EINVAL, "ram: RAM block '%s' listed twice (byte offset %"
                                PRIu64 ")", name, where);
            return -1;
        }
        if (len != r->blocks[i].length) {
            lm_stream_set_error(s, -EINVAL, "ram: RAM block '%s' is %" PRIu64 " bytes in "
                                "the stream but %" PRIu64 " here (byte offset %" PRIu64 ")",
                                name, len, r->blocks[i].length, where);
            return -1;
        }
        if (r->ignore_shared) {
            uint64_t addr;
            if (lm_get_be64(s, &addr))
                return -1;
            /* QEMU checks the address of the blocks it leaves in place */
            if (r->blocks[i].ignored && addr != r->blocks[i].mr_addr) {
                lm_stream_set_error(s, -EINVAL, "ram: RAM block '%s' is at address 0x%"
                                    PRIx64 " in the stream but 0x%" PRIx64 " here (byte "
                                    "offset %" PRIu64 ")", name, addr, r->blocks[i].mr_addr,
                                    where);
                return -1;
            }
        }
        if (pl->ops && pl->ops->block && pl->ops->block(pl->impl, r, s, &r->blocks[i]))
            return -1;
        r->blocks[i].listed = true;
        sum += len;
    }
    if (sum != total) {
        lm_stream_set_error(s, -EINVAL, "ram: block lengths add up to %" PRIu64 ", not the "
                            "announced %" PRIu64, sum, total);
        return -1;
    }
    r->seen_block_list = true;
    if (pl->ops && pl->ops->blocks_done && pl->ops->blocks_done(pl->impl, r, s))
        return -1;
    return 0;
}

/* Resolve the block of a page record (reading its idstr unless CONTINUE,
 * which names the previous record's block on the same stream: *last). */
static const ramblock *ram_load_block(ram_state *r, const ramblock **last, lm_stream *s,
                                      uint64_t flags, uint64_t at)
{
    char name[256];
    int i;

    if (flags & RAM_CONTINUE) {
        if (!*last)
            lm_stream_set_error(s, -EINVAL, "ram: CONTINUE record with no previous block "
                                "at byte offset %" PRIu64, at);
        return *last;
    }
    if (stream_get_counted(s, name))
        return NULL;
    i = ram_find(r, name);
    if (i < 0) {
        lm_stream_set_error(s, -ENOENT, "ram: unknown RAM block '%s' at byte offset %" PRIu64,
                            name, at);
        return NULL;
    }
    *last = &r->blocks[i];
    return *last;
}

static int ram_verify(const ram_state *r, lm_stream *s, const ramblock *b, uint64_t offset,
                      uint64_t content, const char *channel, uint64_t at)
{
    uint64_t got, want = integrity_sum(b->seed, offset, content);

    if (lm_get_be64(s, &got))
        return -1;
    if (got == want)
        return 0;
    lm_stream_set_error(s, -EBADMSG, "integrity: page 0x%" PRIx64 " of RAM block '%s' "
                        "does not match its checksum (%s, record at byte offset %" PRIu64
                        ", checksum at byte offset %" PRIu64 "): the page was corrupted "
                        "on the way", offset, b->idstr, channel, at, lm_stream_offset(s) - 8);
    return -1;
}

int ram_verify_page(const ram_state *r, lm_stream *s, const ramblock *b, uint64_t offset,
                    const void *page, const char *channel, uint64_t at)
{
    if (!r->integrity)
        return 0;
    return ram_verify(r, s, b, offset, integrity_content(page), channel, at);
}

int ram_verify_fill(const ram_state *r, lm_stream *s, const ramblock *b, uint64_t offset,
                    uint8_t fill, const char *channel, uint64_t at)
{
    if (!r->integrity)
        return 0;
    return ram_verify(r, s, b, offset, integrity_fill_content(fill), channel, at);
}

int ram_place_direct(ram_state *r, lm_stream *s, ramblock *b, uint64_t offset, uint64_t flags,
                     uint64_t at)
{
    uint8_t fill;

    switch (flags) {
    case RAM_PAGE:
        if (lm_get_buffer(s, b->host + offset, RAM_PAGE_SIZE) ||
            ram_verify_page(r, s, b, offset, b->host + offset, "main stream", at))
            return -1;
        break;
    case RAM_ZERO:
        if (lm_get_u8(s, &fill) || ram_verify_fill(r, s, b, offset, fill, "main stream", at))
            return -1;
        /* A zero page that is already zero is not written: that keeps fresh
         * destination memory untouched (QEMU 7.2 also accepts a fill byte). */
        if (fill || !buf_is_zero(b->host + offset, RAM_PAGE_SIZE))
            memset(b->host + offset, fill, RAM_PAGE_SIZE);
        break;
    default:
        lm_stream_set_error(s, -EINVAL, "ram: compressed page at byte offset %" PRIu64 " but "
                            "the compress capability is off here", at);
        return -1;
    }
    ram_received(b, offset / RAM_PAGE_SIZE, 1);
    return 0;
}

static int ram_load_on(ram_state *r, const ramblock **last, const ram_placer *pl,
                       lm_stream *s, int section_type);

int ram_load(ram_state *r, const ram_placer *pl, lm_stream *s, int section_type)
{
    return ram_load_on(r, &r->last_recv, pl, s, section_type);
}

int ram_load_records(ram_state *r, const ramblock **last, const ram_placer *pl, lm_stream *s)
{
    return ram_load_on(r, last, pl, s, LM_SECTION_PART);
}

static int ram_load_on(ram_state *r, const ramblock **last, const ram_placer *pl,
                       lm_stream *s, int section_type)
{
    for (;;) {
        uint64_t at = lm_stream_offset(s), word, flags, offset;
        ramblock *b;
        int ret;

        if (lm_get_be64(s, &word))
            return -1;
        flags = word & ~RAM_PAGE_MASK;
        offset = word & RAM_PAGE_MASK;

        if (flags == RAM_EOS) {
            /* every page of this section is in place before the next one */
            if (pl->ops && pl->ops->sync && pl->ops->sync(pl->impl, r, s, at))
                return -1;
            if (section_type == LM_SECTION_END)
                r->load_ended = true;
            return 0;
        }
        if (flags == RAM_MEM_SIZE) {
            if (section_type != LM_SECTION_START || r->seen_block_list) {
                lm_stream_set_error(s, -EINVAL, "ram: unexpected MEM_SIZE record at byte "
                                    "offset %" PRIu64, at);
                return -1;
            }
            if (ram_load_block_list(r, pl, s, offset, at))
                return -1;
            continue;
        }
        if (!r->seen_block_list) {
            lm_stream_set_error(s, -EINVAL, "ram: page record before the block list at "
                                "byte offset %" PRIu64, at);
            return -1;
        }
        switch (flags & ~(uint64_t)RAM_CONTINUE) {
        case RAM_ZERO:
        case RAM_PAGE:
        case RAM_COMPRESS_PAGE:
            break;
        default:
            lm_stream_set_error(s, -EINVAL, "ram: unsupported record flags 0x%" PRIx64
                                " at byte offset %" PRIu64, flags, at);
            return -1;
        }
        b = (ramblock *)ram_load_block(r, last, s, flags, at);
        if (!b)
            return -1;
        if (b->ignored) {
            lm_stream_set_error(s, -EINVAL, "ram: page record for RAM block '%s', which "
                                "stays in place here (x-ignore-shared / cpr mode), at byte "
                                "offset %" PRIu64, b->idstr, at);
            return -1;
        }
        if (offset >= b->length) {
            lm_stream_set_error(s, -ERANGE, "ram: page offset 0x%" PRIx64 " is outside RAM "
                                "block '%s' (length 0x%" PRIx64 ") at byte offset %" PRIu64,
                                offset, b->idstr, b->length, at);
            return -1;
        }
        flags &= ~(uint64_t)RAM_CONTINUE;
        ret = pl->ops && pl->ops->record
                  ? pl->ops->record(pl->impl, r, s, b, offset, flags, at)
                  : ram_place_direct(r, s, b, offset, flags, at);
        if (ret) {
            if (!lm_stream_error(s))
                lm_stream_set_error(s, -EIO, "ram: placing the page at byte offset %" PRIu64
                                    " failed", at);
            return -1;
        }
    }
}
