/*
 * The main-stream loader: a parser that distrusts its input.  Every count,
 * length and id read from the wire is checked before use; every error names
 * what was wrong and the byte offset where the offending item starts.
 * See savevm.h for the grammar.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "integrity/integrity.h"
#include "savevm/savevm.h"
#include "util/error.h"

loadvm_handler *loadvm_add_handler(loadvm *lv, const char *idstr, uint32_t instance,
                                   uint32_t version,
                                   int (*load)(lm_stream *, void *, uint32_t, int),
                                   void *opaque)
{
    loadvm_handler *h;

    if (lv->nhandlers == LOADVM_MAX_HANDLERS)
        return NULL;
    h = &lv->handlers[lv->nhandlers++];
    memset(h, 0, sizeof(*h));
    snprintf(h->idstr, sizeof(h->idstr), "%s", idstr);
    h->instance = instance;
    h->version = version;
    h->load = load;
    h->opaque = opaque;
    return h;
}

void loadvm_merge_done(loadvm *lv, const loadvm *from)
{
    assert(lv->nhandlers == from->nhandlers);   /* one copied from the other */
    for (int i = 0; i < lv->nhandlers; i++)
        lv->handlers[i].done |= from->handlers[i].done;
}

int loadvm_set_command(loadvm *lv, uint16_t cmd, loadvm_cmd_fn fn, void *opaque)
{
    if (!wire_cmd_def(cmd))
        return -EINVAL;
    lv->cmds[cmd].fn = fn;
    lv->cmds[cmd].opaque = opaque;
    return 0;
}

/*
 * Configuration subsections: only configuration/capabilities is known (its
 * data has a length we can parse); the validated capabilities mapped-ram and
 * x-ignore-shared must be set identically on both sides, as in QEMU; so must
 * livemig's own x-integrity, which only a livemig source announces (a QEMU
 * destination refuses the unknown capability right here).
 */
static int loadvm_config_caps(loadvm *lv, lm_stream *s)
{
    bool mapped = false, ignore_shared = false, integrity = false;

    while (stream_peek_u8(s) == WIRE_VM_SUBSECTION) {
        uint64_t at = lm_stream_offset(s);
        char name[256], cap[256];
        uint32_t version, count;
        uint8_t type;

        if (lm_get_u8(s, &type) || stream_get_counted(s, name) || lm_get_be32(s, &version))
            return -1;
        if (strcmp(name, "configuration/capabilities") || version != 1) {
            lm_stream_set_error(s, -EINVAL, "configuration: unsupported subsection '%s' "
                                "version %u at byte offset %" PRIu64, name, version, at);
            return -1;
        }
        if (lm_get_be32(s, &count))
            return -1;
        if (count > 64) {
            lm_stream_set_error(s, -EINVAL, "configuration: %u capabilities at byte offset %"
                                PRIu64 " (at most 64)", count, at);
            return -1;
        }
        for (uint32_t i = 0; i < count; i++) {
            uint64_t cat = lm_stream_offset(s);
            if (stream_get_counted(s, cap))
                return -1;
            if (!strcmp(cap, "mapped-ram")) {
                mapped = true;
            } else if (!strcmp(cap, "x-ignore-shared")) {
                ignore_shared = true;
            } else if (!strcmp(cap, INTEGRITY_CAP)) {
                integrity = true;
            } else {
                lm_stream_set_error(s, -EINVAL, "configuration: the stream needs capability "
                                    "'%s' (byte offset %" PRIu64 "), unknown here", cap, cat);
                return -1;
            }
        }
    }
    if (mapped != lv->mapped_ram) {
        lm_stream_set_error(s, -EINVAL, "configuration: the stream was saved %s mapped-ram "
                            "but this side has the capability %s", mapped ? "with" : "without",
                            lv->mapped_ram ? "on" : "off");
        return -1;
    }
    if (ignore_shared != lv->ignore_shared) {
        lm_stream_set_error(s, -EINVAL, "configuration: the stream was saved %s "
                            "x-ignore-shared but this side has the capability %s",
                            ignore_shared ? "with" : "without", lv->ignore_shared ? "on" : "off");
        return -1;
    }
    if (integrity != lv->integrity) {
        lm_stream_set_error(s, -EINVAL, "configuration: the stream was saved %s "
                            INTEGRITY_CAP " (page checksums) but this side has the "
                            "capability %s: set it on both sides or on neither",
                            integrity ? "with" : "without", lv->integrity ? "on" : "off");
        return -1;
    }
    return 0;
}

static int loadvm_header(loadvm *lv, lm_stream *s)
{
    uint32_t magic, version, len;
    char name[64];

    if (lm_get_be32(s, &magic))
        return -1;
    /* A TLS record header: content type 22 (handshake), version 3.x. */
    if ((magic >> 16) == 0x1603) {
        lm_stream_set_error(s, -EPROTO, "the stream starts with a TLS handshake (0x%08x): "
                            "the source uses TLS, but tls-creds is not set here", magic);
        return -1;
    }
    if (magic != WIRE_QEVM_MAGIC) {
        lm_stream_set_error(s, -EINVAL, "bad magic 0x%08x at byte offset 0 (expected "
                            "0x%08x, \"QEVM\"): not a migration stream", magic, WIRE_QEVM_MAGIC);
        return -1;
    }
    if (lm_get_be32(s, &version))
        return -1;
    if (version != WIRE_QEVM_VERSION) {
        lm_stream_set_error(s, -EINVAL, "unsupported stream version %u at byte offset 4 "
                            "(expected %u)", version, WIRE_QEVM_VERSION);
        return -1;
    }
    {
        uint8_t type;
        uint64_t at = lm_stream_offset(s);
        if (lm_get_u8(s, &type))
            return -1;
        if (type != WIRE_VM_CONFIGURATION) {
            lm_stream_set_error(s, -EINVAL, "expected the configuration section (0x07) at "
                                "byte offset %" PRIu64 ", found 0x%02x", at, type);
            return -1;
        }
    }
    if (lm_get_be32(s, &len))
        return -1;
    if (len == 0 || len >= sizeof(name)) {
        lm_stream_set_error(s, -EINVAL, "configuration: machine name length %u out of range "
                            "at byte offset %" PRIu64, len, lm_stream_offset(s) - 4);
        return -1;
    }
    if (lm_get_buffer(s, name, len))
        return -1;
    name[len] = 0;
    if (strcmp(name, SAVEVM_MACHINE_NAME)) {
        lm_stream_set_error(s, -EINVAL, "configuration: machine type '%s' at byte offset 13 "
                            "is not '%s'", name, SAVEVM_MACHINE_NAME);
        return -1;
    }
    return loadvm_config_caps(lv, s);
}

static int loadvm_find_handler(loadvm *lv, const char *idstr, uint32_t instance)
{
    for (int i = 0; i < lv->nhandlers; i++)
        if (lv->handlers[i].instance == instance && !strcmp(lv->handlers[i].idstr, idstr))
            return i;
    return -1;
}

static int loadvm_find_section(loadvm *lv, uint32_t id)
{
    for (int i = 0; i < lv->nsections; i++)
        if (lv->sections[i].id == id)
            return i;
    return -1;
}

/* START/FULL: bind the sender's id in `h` to a handler.  Returns the index
 * into lv->sections, or -1. */
static int loadvm_section_start(loadvm *lv, lm_stream *s, const wire_section *hdr)
{
    int h, sec;

    h = loadvm_find_handler(lv, hdr->idstr, hdr->instance);
    if (h < 0) {
        lm_stream_set_error(s, -ENOENT, "unknown section '%s' instance %u (section id %u) "
                            "at byte offset %" PRIu64, hdr->idstr, hdr->instance, hdr->id,
                            hdr->at);
        return -1;
    }
    if (hdr->version > lv->handlers[h].version || hdr->version == 0) {
        lm_stream_set_error(s, -EINVAL, "section '%s' has version %u, this side loads up "
                            "to %u (byte offset %" PRIu64 ")", hdr->idstr, hdr->version,
                            lv->handlers[h].version, hdr->at);
        return -1;
    }
    sec = loadvm_find_section(lv, hdr->id);
    if (sec >= 0) {
        if (lv->sections[sec].handler != h) {
            lm_stream_set_error(s, -EINVAL, "section id %u reused for '%s' at byte offset %"
                                PRIu64, hdr->id, hdr->idstr, hdr->at);
            return -1;
        }
        if (hdr->type == WIRE_VM_SECTION_START) {
            lm_stream_set_error(s, -EINVAL, "second START for section '%s' at byte offset %"
                                PRIu64, hdr->idstr, hdr->at);
            return -1;
        }
        return sec;
    }
    if (lv->nsections == LOADVM_MAX_SECTIONS) {
        lm_stream_set_error(s, -ENOSPC, "too many sections (max %d)", LOADVM_MAX_SECTIONS);
        return -1;
    }
    sec = lv->nsections++;
    lv->sections[sec].id = hdr->id;
    lv->sections[sec].handler = h;
    lv->sections[sec].version = hdr->version;
    return sec;
}

static int loadvm_section(loadvm *lv, lm_stream *s, uint8_t type, uint64_t at)
{
    wire_section hdr;
    wire_footer f;
    int sec, ret;
    loadvm_handler *h;

    if (wire_get_section_header(s, type, at, &hdr) != WIRE_OK)
        return -1;
    if (type == WIRE_VM_SECTION_START || type == WIRE_VM_SECTION_FULL) {
        sec = loadvm_section_start(lv, s, &hdr);
    } else {
        sec = loadvm_find_section(lv, hdr.id);
        if (sec < 0)
            lm_stream_set_error(s, -ENOENT, "section id %u at byte offset %" PRIu64
                                " was never started", hdr.id, at);
    }
    if (sec < 0)
        return -1;
    h = &lv->handlers[lv->sections[sec].handler];
    if (h->done) {
        /* After its last section a device's state is final (design note 11:
         * what was checked at its FULL/END stays what runs). */
        lm_stream_set_error(s, -EINVAL, "section '%s' (id %u) at byte offset %" PRIu64
                            " after that section's %s", h->idstr, lv->sections[sec].id, at,
                            "last (FULL or END) record");
        return -1;
    }
    ret = h->load(s, h->opaque, lv->sections[sec].version, type);
    if (ret && !lm_stream_error(s))
        lm_stream_set_error(s, ret, "loading section '%s' failed near byte offset %" PRIu64
                            ": %s", h->idstr, lm_stream_offset(s), strerror(-ret));
    if (lm_stream_error(s))
        return -1;
    switch (wire_get_footer(s, lv->sections[sec].id, &f)) {
    case WIRE_OK:
        break;
    case WIRE_EMARK:
    case WIRE_EID: {
        char found[24];

        /* the id is only read (and worth printing) after a real 0x7e */
        if (f.mark == WIRE_VM_SECTION_FOOTER)
            snprintf(found, sizeof(found), "0x%02x id %u", f.mark, f.id);
        else
            snprintf(found, sizeof(found), "0x%02x", f.mark);
        lm_stream_set_error(s, -EINVAL, "section '%s' (id %u): bad footer at byte offset %"
                            PRIu64 " (found %s): the section's data did not parse to its "
                            "end", h->idstr, lv->sections[sec].id, f.at, found);
        return -1;
    }
    default:
        return -1;
    }
    if (type == WIRE_VM_SECTION_FULL || type == WIRE_VM_SECTION_END)
        h->done = true;
    return 0;
}

/* At EOF: did everything registered here arrive?  Error names the EOF. */
static int loadvm_check_complete(loadvm *lv, lm_stream *s, uint64_t at)
{
    char why[LM_ERROR_MAX - 128] = "";

    for (int i = 0; i < lv->nhandlers; i++) {
        loadvm_handler *h = &lv->handlers[i];

        if (h->check)
            h->check(h->opaque, why, sizeof(why));
        else if (!h->done)
            error_list_add(why, sizeof(why), "device '%s' instance %u: no state (no FULL or "
                           "END section)", h->idstr, h->instance);
    }
    if (!why[0])
        return 0;
    lm_stream_set_error(s, -ENODATA, "the stream ended (EOF at byte offset %" PRIu64 ") "
                        "before everything this side registered arrived: %s", at, why);
    return -1;
}

/*
 * One COMMAND record: the wire table judges number and length, lv->cmds[]
 * says whether this side handles it.  Returns 0, LOADVM_QUIT or -1.
 */
static int loadvm_command(loadvm *lv, lm_stream *s, uint64_t at)
{
    wire_command c;
    loadvm_cmd lc;
    uint8_t *data = NULL;
    int ret;

    switch (wire_get_command(s, at, &c)) {
    case WIRE_OK:
        break;
    case WIRE_EUNKNOWN:
        lm_stream_set_error(s, -ENOTSUP, "unsupported command %u (length %u) at byte offset %"
                            PRIu64, c.cmd, c.len, at);
        return -1;
    case WIRE_ELEN:
        lm_stream_set_error(s, -EINVAL, "command %u with bad length %u at byte offset %"
                            PRIu64, c.cmd, c.len, at);
        return -1;
    default:
        return -1;
    }
    /* a number the table knows indexes lv->cmds[] */
    assert(c.def && c.cmd < WIRE_CMD__MAX);
    if (!lv->cmds[c.cmd].fn) {
        lm_stream_set_error(s, -ENOTSUP, "unsupported command %u (%s, length %u) at byte "
                            "offset %" PRIu64 ": this side has no handler for it", c.cmd,
                            c.def->name, c.len, at);
        return -1;
    }
    /* The payload is read whole before the handler runs, so a handler parses
     * bounded memory and cannot read into the next record by mistake. */
    if (c.len) {
        data = malloc(c.len);
        if (!data)
            abort();
        if (lm_get_buffer(s, data, c.len)) {
            free(data);
            return -1;
        }
    }
    lc = (loadvm_cmd){ .cmd = c.cmd, .len = c.len, .at = at, .data = data, .s = s,
                          .lv = lv };
    ret = lv->cmds[c.cmd].fn(&lc, lv->cmds[c.cmd].opaque);
    free(data);
    assert(ret <= 0 || ret == LOADVM_QUIT);
    if (ret == LOADVM_QUIT)
        return LOADVM_QUIT;
    if (ret)
        lm_stream_set_error(s, ret, "command %u (%s) at byte offset %" PRIu64 " failed: %s",
                            c.cmd, c.def->name, at, strerror(-ret));
    return ret ? -1 : 0;
}

int loadvm_run_records(loadvm *lv, lm_stream *s, loadvm_scope scope)
{
    /* A package's end is found by asking the stream for more; on a
     * descriptor that would block for the next record, so a package must be
     * in memory. */
    assert(scope == LOADVM_MAIN || s->mem);
    for (;;) {
        uint64_t at = lm_stream_offset(s);
        uint8_t type;
        int ret;

        /* Between records is the only place a package may end; inside one,
         * its end stays "truncated" like any stream's. */
        if (scope == LOADVM_PACKAGE && stream_at_eof(s))
            return LOADVM_END;
        if (lm_get_u8(s, &type))
            return -1;
        switch (type) {
        case WIRE_VM_EOF:
            if (scope == LOADVM_PACKAGE) {
                lm_stream_set_error(s, -EINVAL, "EOF record inside a package at byte offset %"
                                    PRIu64 " (a package ends with its blob)", at);
                return -1;
            }
            if (lv->at_eof && lv->at_eof(lv, s, lv->at_eof_opaque))
                return -1;
            return loadvm_check_complete(lv, s, at) ? -1 : LOADVM_EOF;
        case WIRE_VM_SECTION_START:
        case WIRE_VM_SECTION_PART:
        case WIRE_VM_SECTION_END:
        case WIRE_VM_SECTION_FULL:
            if (loadvm_section(lv, s, type, at))
                return -1;
            break;
        case WIRE_VM_COMMAND:
            ret = loadvm_command(lv, s, at);
            if (ret)
                return ret;     /* -1 or LOADVM_QUIT */
            break;
        default:
            lm_stream_set_error(s, -EINVAL, "unknown record type 0x%02x at byte offset %"
                                PRIu64, type, at);
            return -1;
        }
    }
}

int loadvm_run(loadvm *lv, lm_stream *s)
{
    lv->nsections = 0;
    for (int i = 0; i < lv->nhandlers; i++)
        lv->handlers[i].done = false;
    if (loadvm_header(lv, s))
        return -1;
    return loadvm_run_records(lv, s, LOADVM_MAIN);
}
