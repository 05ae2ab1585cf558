/*
 * The source's queue of page requests (REQ_PAGES_ID / REQ_PAGES on the
 * return path); see postcopy.h.
 *
 * The return-path reader thread parses and checks each request and pushes
 * it; the migration thread pops them before it goes on with the background
 * pass.  A mutex guards the queue: requests come at fault rate (thousands
 * per second at most, each one a page the guest waits for), far below where
 * a lock costs anything, and the migration thread asks without blocking.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "postcopy/postcopy.h"
#include "savevm/wire.h"
#include "util/error.h"

struct postcopy_requests {
    ram_state *ram;
    pthread_mutex_t lock;
    postcopy_request *q;        /* ring of cap entries */
    size_t cap, head, len;
    ramblock *last;             /* REQ_PAGES means "the block of the last _ID" */
    uint64_t total;
};

postcopy_requests *postcopy_requests_new(ram_state *r)
{
    postcopy_requests *pr = calloc(1, sizeof(*pr));

    if (!pr)
        abort();
    pr->ram = r;
    pr->cap = 1024;
    pr->q = calloc(pr->cap, sizeof(*pr->q));
    if (!pr->q)
        abort();
    pthread_mutex_init(&pr->lock, NULL);
    return pr;
}

void postcopy_requests_free(postcopy_requests *pr)
{
    if (!pr)
        return;
    pthread_mutex_destroy(&pr->lock);
    free(pr->q);
    free(pr);
}

static void push_locked(postcopy_requests *pr, postcopy_request rq)
{
    if (pr->len == pr->cap) {
        postcopy_request *q = calloc(pr->cap * 2, sizeof(*q));
        if (!q)
            abort();
        for (size_t i = 0; i < pr->len; i++)
            q[i] = pr->q[(pr->head + i) % pr->cap];
        free(pr->q);
        pr->q = q;
        pr->head = 0;
        pr->cap *= 2;
    }
    pr->q[(pr->head + pr->len) % pr->cap] = rq;
    pr->len++;
    pr->total++;
}

int postcopy_requests_add(postcopy_requests *pr, uint16_t type, const uint8_t *data,
                          uint16_t len, postcopy_request *out, lm_error *err)
{
    uint64_t start;
    uint32_t bytes;
    ramblock *b;
    int ret = 0;

    pthread_mutex_lock(&pr->lock);
    if (type == WIRE_RP_REQ_PAGES_ID) {
        char name[256];
        uint8_t n;
        int bi;

        if (len < 13 || (n = data[12]) == 0 || len != 13u + n) {
            ret = error_set(err, -EPROTO, "REQ_PAGES_ID: %u bytes do not hold be64 start, be32 "
                            "length and a counted block name", len);
            goto out;
        }
        memcpy(name, data + 13, n);
        name[n] = 0;
        bi = memchr(name, 0, n) ? -1 : ram_find(pr->ram, name);
        if (bi < 0) {
            ret = error_set(err, -ENOENT, "REQ_PAGES_ID: unknown RAM block '%s'", name);
            goto out;
        }
        pr->last = &pr->ram->blocks[bi];
    } else if (type != WIRE_RP_REQ_PAGES || len != 12) {
        ret = error_set(err, -EPROTO, "page request: message type %u of %u bytes", type, len);
        goto out;
    } else if (!pr->last) {
        ret = error_set(err, -EPROTO, "REQ_PAGES before any REQ_PAGES_ID named a block");
        goto out;
    }
    b = pr->last;
    start = wire_be64(data);
    bytes = wire_be32(data + 8);
    /* one host page of the block, as a destination asks (4 KiB here: no
     * huge pages), so a request can never make the queue grow by more */
    if (bytes != RAM_PAGE_SIZE || (start & (RAM_PAGE_SIZE - 1)) || start >= b->length) {
        ret = error_set(err, -ERANGE, "page request [0x%" PRIx64 ", +0x%x) is not one page "
                        "inside RAM block '%s' (0x%" PRIx64 " bytes)", start, bytes, b->idstr,
                        b->length);
        goto out;
    }
    if (pr->len >= POSTCOPY_MAX_QUEUED) {
        ret = error_set(err, -ENOBUFS, "page requests: %zu outstanding, the destination asks "
                        "faster than any guest faults", pr->len);
        goto out;
    }
    push_locked(pr, (postcopy_request){ b, start / RAM_PAGE_SIZE });
    if (out)
        *out = (postcopy_request){ b, start / RAM_PAGE_SIZE };
out:
    pthread_mutex_unlock(&pr->lock);
    return ret;
}

bool postcopy_requests_pop(postcopy_requests *pr, postcopy_request *rq)
{
    bool got;

    pthread_mutex_lock(&pr->lock);
    got = pr->len > 0;
    if (got) {
        *rq = pr->q[pr->head];
        pr->head = (pr->head + 1) % pr->cap;
        pr->len--;
    }
    pthread_mutex_unlock(&pr->lock);
    return got;
}

uint64_t postcopy_requests_total(postcopy_requests *pr)
{
    uint64_t t;

    pthread_mutex_lock(&pr->lock);
    t = pr->total;
    pthread_mutex_unlock(&pr->lock);
    return t;
}
