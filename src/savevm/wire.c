/*
 * The wire grammar's tables and framing decoders; see wire.h.
 */
#include <assert.h>
#include <string.h>

#include "savevm/wire.h"

/* Reference 6.1.  A new command joins here, by its number. */
static const wire_item_def wire_cmds[WIRE_CMD__MAX] = {
    [WIRE_CMD_OPEN_RETURN_PATH] = { "OPEN_RETURN_PATH", 0, 0 },
    [WIRE_CMD_PING] = { "PING", 4, 0 },
    /* 16 = be64 page-size summary, be64 target page size; 0 = dirty bitmaps only */
    [WIRE_CMD_POSTCOPY_ADVISE] = { "POSTCOPY_ADVISE", WIRE_LEN_VARIABLE, 0 },
    [WIRE_CMD_POSTCOPY_LISTEN] = { "POSTCOPY_LISTEN", 0, 0 },
    [WIRE_CMD_POSTCOPY_RUN] = { "POSTCOPY_RUN", 0, 0 },
    /* u8 version, u8 namelen, name (>= 1), u8 0, then >= 1 x (be64 start, be64 length) */
    [WIRE_CMD_POSTCOPY_RAM_DISCARD] = { "POSTCOPY_RAM_DISCARD", WIRE_LEN_VARIABLE,
                                      1 + 1 + 1 + 1 + 16 },
    [WIRE_CMD_PACKAGED] = { "PACKAGED", 4, 0 },
    [WIRE_CMD_ENABLE_COLO] = { "ENABLE_COLO", 0, 0 },
    [WIRE_CMD_POSTCOPY_RESUME] = { "POSTCOPY_RESUME", 0, 0 },
    /* u8 namelen, name: len = namelen + 1 */
    [WIRE_CMD_RECV_BITMAP] = { "RECV_BITMAP", WIRE_LEN_VARIABLE, 1 },
    [WIRE_CMD_SWITCHOVER_START] = { "SWITCHOVER_START", 0, 0 },
};

/* Reference 6.3. */
static const wire_item_def wire_rps[WIRE_RP__MAX] = {
    [WIRE_RP_SHUT] = { "SHUT", 4, 0 },
    [WIRE_RP_PONG] = { "PONG", 4, 0 },
    /* be64 start, be32 len, u8 n, name[n] */
    [WIRE_RP_REQ_PAGES_ID] = { "REQ_PAGES_ID", WIRE_LEN_VARIABLE, 12 + 1 },
    [WIRE_RP_REQ_PAGES] = { "REQ_PAGES", 12, 0 },
    /* u8 n, name[n]; be64 size, the bitmap and an end mark follow the message */
    [WIRE_RP_RECV_BITMAP] = { "RECV_BITMAP", WIRE_LEN_VARIABLE, 1 },
    [WIRE_RP_RESUME_ACK] = { "RESUME_ACK", 4, 0 },
    [WIRE_RP_SWITCHOVER_ACK] = { "SWITCHOVER_ACK", 0, 0 },
};

/* Index 0 (INVALID) has no name, so it is never defined: QEMU refuses it. */
static const wire_item_def *wire_def(const wire_item_def *table, size_t n, uint16_t type)
{
    return type < n && table[type].name ? &table[type] : NULL;
}

static wire_status wire_check(const wire_item_def *d, uint16_t len)
{
    if (!d)
        return WIRE_EUNKNOWN;
    /* a fixed length has no minimum: the table says one or the other */
    assert(d->len == WIRE_LEN_VARIABLE || d->min_len == 0);
    if (d->len == WIRE_LEN_VARIABLE ? len < d->min_len : len != d->len)
        return WIRE_ELEN;
    return WIRE_OK;
}

const wire_item_def *wire_cmd_def(uint16_t cmd)
{
    return wire_def(wire_cmds, WIRE_CMD__MAX, cmd);
}

const char *wire_cmd_name(uint16_t cmd)
{
    const wire_item_def *d = wire_cmd_def(cmd);

    return d ? d->name : "?";
}

wire_status wire_cmd_check(uint16_t cmd, uint16_t len)
{
    return wire_check(wire_cmd_def(cmd), len);
}

const wire_item_def *wire_rp_def(uint16_t type)
{
    return wire_def(wire_rps, WIRE_RP__MAX, type);
}

const char *wire_rp_name(uint16_t type)
{
    const wire_item_def *d = wire_rp_def(type);

    return d ? d->name : "?";
}

wire_status wire_rp_check(uint16_t type, uint16_t len)
{
    wire_status st = wire_check(wire_rp_def(type), len);

    return st == WIRE_OK && len > WIRE_RP_MAX_LEN ? WIRE_ELEN : st;
}

size_t wire_rp_encode(uint8_t *buf, size_t cap, uint16_t type, const void *data, uint16_t len)
{
    if (wire_rp_check(type, len) != WIRE_OK || cap < 4u + len) {
        assert(!"return-path message the table does not allow, or no room for it");
        return 0;
    }
    buf[0] = (uint8_t)(type >> 8);
    buf[1] = (uint8_t)type;
    buf[2] = (uint8_t)(len >> 8);
    buf[3] = (uint8_t)len;
    if (len)
        memcpy(buf + 4, data, len);
    return 4u + len;
}

wire_status wire_get_section_header(lm_stream *s, uint8_t type, uint64_t at,
                                    wire_section *h)
{
    assert(type >= WIRE_VM_SECTION_START && type <= WIRE_VM_SECTION_FULL);
    memset(h, 0, sizeof(*h));
    h->type = type;
    h->at = at;
    if (lm_get_be32(s, &h->id))
        return WIRE_ESTREAM;
    if (type == WIRE_VM_SECTION_PART || type == WIRE_VM_SECTION_END)
        return WIRE_OK;
    h->idstr_at = lm_stream_offset(s);
    if (lm_get_u8(s, &h->idstr_len) || lm_get_buffer(s, h->idstr, h->idstr_len))
        return WIRE_ESTREAM;
    h->idstr[h->idstr_len] = 0;
    if (lm_get_be32(s, &h->instance) || lm_get_be32(s, &h->version))
        return WIRE_ESTREAM;
    return WIRE_OK;
}

wire_status wire_get_footer(lm_stream *s, uint32_t id, wire_footer *f)
{
    f->at = lm_stream_offset(s);
    f->id = 0;
    if (lm_get_u8(s, &f->mark))
        return WIRE_ESTREAM;
    if (f->mark != WIRE_VM_SECTION_FOOTER)
        return WIRE_EMARK;
    if (lm_get_be32(s, &f->id))
        return WIRE_ESTREAM;
    return f->id == id ? WIRE_OK : WIRE_EID;
}

wire_status wire_get_command(lm_stream *s, uint64_t at, wire_command *c)
{
    c->at = at;
    c->cmd = c->len = 0;
    c->def = NULL;
    if (lm_get_be16(s, &c->cmd) || lm_get_be16(s, &c->len))
        return WIRE_ESTREAM;
    c->def = wire_cmd_def(c->cmd);
    return wire_check(c->def, c->len);
}
