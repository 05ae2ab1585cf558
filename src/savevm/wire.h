/*
 * The wire grammar of QEMU's migration stream, defined once: the file header,
 * the top-level record types, the MIG_CMD_* commands and the return-path
 * messages with their lengths, and the decoders of the framing that every
 * reader of the main stream shares -- the loader (loadvm.c) and the analyzer
 * (src/analyze/analyze.c).  The facts come from
 * ../shared/reference/qemu-migration-format.md: 2.2 (header), 2.3 (record
 * types), 2.4 (section header and footer), 6.1 (commands), 6.3 (return path).
 *
 *   header   := be32 0x5145564d ("QEVM") be32 3
 *   section  := START|FULL  be32 id  counted-idstr  be32 instance  be32 version
 *             | PART|END    be32 id
 *   footer   := 0x7e be32 id            (after every section's payload)
 *   command  := 0x08 be16 cmd be16 len data[len]
 *   rp-msg   := be16 type be16 len data[len]      (destination to source)
 *
 * Why a header of its own and not savevm.h: the analyzer and the source's
 * return-path reader need the grammar but neither the writer helpers nor the
 * loader's state (loadvm), and the return path is to become a module of
 * its own; each of them includes just this.  savevm.h includes it too, so
 * the writer and the loader speak the same numbers.
 *
 * Decoders.  Each reads one framing item from a stream, fills a struct and
 * judges it against the grammar, returning an wire_status.  They do not
 * word the errors for grammar violations: the loader and the analyzer each
 * keep their own messages (for different readers: the loader numbers a
 * command, the analyzer names it and says what it was parsing), and both
 * name the byte offset the decoder records.  A failed read (truncation, I/O)
 * is latched on the stream as always, and returned as WIRE_ESTREAM.
 *
 * Threads: no state at all; the tables are const.
 */
#ifndef SAVEVM_WIRE_H
#define SAVEVM_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "livemig/livemig.h"

#define WIRE_QEVM_MAGIC 0x5145564dU
#define WIRE_QEVM_VERSION 3U

/* Top-level record types (1 byte).  The four section types are the public
 * LM_SECTION_* values a device's load callback receives (livemig.h), named
 * here again, not numbered again. */
enum {
    WIRE_VM_EOF = 0x00,
    WIRE_VM_SECTION_START = LM_SECTION_START,    /* 0x01 */
    WIRE_VM_SECTION_PART = LM_SECTION_PART,      /* 0x02 */
    WIRE_VM_SECTION_END = LM_SECTION_END,        /* 0x03 */
    WIRE_VM_SECTION_FULL = LM_SECTION_FULL,      /* 0x04 */
    WIRE_VM_SUBSECTION = 0x05,                   /* only inside VMState data */
    WIRE_VM_VMDESCRIPTION = 0x06,                /* be32 len, JSON; after EOF */
    WIRE_VM_CONFIGURATION = 0x07,
    WIRE_VM_COMMAND = 0x08,
    WIRE_VM_SECTION_FOOTER = 0x7e,
};

/* Not a length: marks an item whose length varies (see min_len). */
#define WIRE_LEN_VARIABLE (-1)

/*
 * One command or return-path message type.  A type is defined when its name
 * is not NULL.  len is the one valid length, or WIRE_LEN_VARIABLE; then
 * min_len is the shortest valid payload and the item's own parser checks the
 * rest (e.g. POSTCOPY_ADVISE's "0 or 16", REQ_PAGES_ID's name length).
 */
typedef struct wire_item_def {
    const char *name;           /* QEMU's name without the MIG_CMD_ / MIG_RP_MSG_ prefix */
    int32_t len;
    uint16_t min_len;
} wire_item_def;

/* MIG_CMD_* (reference 6.1): the payload of a COMMAND record. */
enum {
    WIRE_CMD_INVALID = 0,
    WIRE_CMD_OPEN_RETURN_PATH = 1,   /* 0 */
    WIRE_CMD_PING = 2,               /* 4: be32 value, answered by PONG(value) */
    WIRE_CMD_POSTCOPY_ADVISE = 3,    /* 0 or 16 */
    WIRE_CMD_POSTCOPY_LISTEN = 4,    /* 0 */
    WIRE_CMD_POSTCOPY_RUN = 5,       /* 0; ends the (nested) load loop it is read by */
    WIRE_CMD_POSTCOPY_RAM_DISCARD = 6, /* variable, >= 20 */
    WIRE_CMD_PACKAGED = 7,           /* 4: be32 blob_len; the blob FOLLOWS the command */
    WIRE_CMD_ENABLE_COLO = 8,        /* 0 */
    WIRE_CMD_POSTCOPY_RESUME = 9,    /* 0 */
    WIRE_CMD_RECV_BITMAP = 10,       /* variable, >= 1: counted block name */
    WIRE_CMD_SWITCHOVER_START = 11,  /* 0; QEMU 10.0 only (7.2 refuses it) */
    WIRE_CMD__MAX,
};

/* Return-path messages, MIG_RP_MSG_* (reference 6.3). */
enum {
    WIRE_RP_INVALID = 0,
    WIRE_RP_SHUT = 1,                /* 4: be32 status, 0 = loaded */
    WIRE_RP_PONG = 2,                /* 4: be32 echo of a PING */
    WIRE_RP_REQ_PAGES_ID = 3,        /* variable, >= 13: be64 start be32 len u8 n name[n] */
    WIRE_RP_REQ_PAGES = 4,           /* 12: be64 start be32 len */
    WIRE_RP_RECV_BITMAP = 5,         /* variable, >= 1: u8 n name[n]; the bitmap follows */
    WIRE_RP_RESUME_ACK = 6,          /* 4: be32 1 */
    WIRE_RP_SWITCHOVER_ACK = 7,      /* 0 */
    WIRE_RP__MAX,
};
/* The source refuses a return-path message longer than this. */
#define WIRE_RP_MAX_LEN 512

typedef enum wire_status {
    WIRE_OK = 0,
    WIRE_ESTREAM = -1,          /* the read failed; the error is latched on the stream */
    WIRE_EUNKNOWN = -2,         /* a command or message type that is not in the table */
    WIRE_ELEN = -3,             /* a length the table does not allow */
    WIRE_EMARK = -4,            /* footer: the byte is not 0x7e */
    WIRE_EID = -5,              /* footer: names another section id */
} wire_status;

/* ---- the tables ---- */

/* The definition of command `cmd`, or NULL (INVALID, or not a command). */
const wire_item_def *wire_cmd_def(uint16_t cmd);
/* Its name ("OPEN_RETURN_PATH"), or "?" when it is not a command. */
const char *wire_cmd_name(uint16_t cmd);
/* OK, EUNKNOWN, or ELEN (not its fixed length, or shorter than its minimum). */
wire_status wire_cmd_check(uint16_t cmd, uint16_t len);

const wire_item_def *wire_rp_def(uint16_t type);
const char *wire_rp_name(uint16_t type);
/* OK, EUNKNOWN, or ELEN (also when len > WIRE_RP_MAX_LEN). */
wire_status wire_rp_check(uint16_t type, uint16_t len);
/*
 * Write return-path message (type, data[len]) into buf: 4 + len bytes, the
 * size returned.  0 when the table does not allow (type, len) or buf is too
 * small: a bug of the caller, never something a peer sent (assert()ed).
 */
size_t wire_rp_encode(uint8_t *buf, size_t cap, uint16_t type, const void *data, uint16_t len);

/* ---- the decoders (the caller has read the record's type byte) ---- */

typedef struct wire_section {
    uint8_t type;               /* WIRE_VM_SECTION_START .. WIRE_VM_SECTION_FULL */
    uint64_t at;                /* offset of the type byte */
    uint32_t id;
    /* START/FULL only (PART/END: "", 0, 0) */
    char idstr[256];            /* NUL-terminated after its idstr_len bytes */
    uint8_t idstr_len;          /* as counted: a NUL inside shows as strlen < this */
    uint64_t idstr_at;          /* offset of the idstr's length byte */
    uint32_t instance, version;
} wire_section;

/* The rest of a section header whose type byte (START, PART, END or FULL)
 * was at `at`.  OK or ESTREAM. */
wire_status wire_get_section_header(lm_stream *s, uint8_t type, uint64_t at,
                                    wire_section *h);

typedef struct wire_footer {
    uint64_t at;                /* offset of the 0x7e byte */
    uint8_t mark;
    uint32_t id;                /* read only when mark is 0x7e */
} wire_footer;

/* The footer of section `id`: OK, ESTREAM, EMARK (the id is then not read:
 * the bytes there are not a footer) or EID. */
wire_status wire_get_footer(lm_stream *s, uint32_t id, wire_footer *f);

typedef struct wire_command {
    uint64_t at;                /* offset of the 0x08 byte */
    uint16_t cmd, len;
    const wire_item_def *def;   /* NULL when the number is not a command */
} wire_command;

/* be16 cmd, be16 len of a COMMAND record whose 0x08 byte was at `at`, checked
 * against the table: OK, ESTREAM, EUNKNOWN or ELEN.  cmd and len are filled
 * whenever the read succeeded, for the caller's message.  The payload is left
 * in the stream for the caller. */
wire_status wire_get_command(lm_stream *s, uint64_t at, wire_command *c);

/* Big-endian fields of a payload the caller has in memory. */
static inline uint32_t wire_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t wire_be64(const uint8_t *p)
{
    return (uint64_t)wire_be32(p) << 32 | wire_be32(p + 4);
}

#endif
