/*
 * livemig analyze -- what is in a migration stream file.
 *
 * lm_analyze_file() reads a file written by a migration to `file:` (or by
 * QEMU with `exec:cat > FILE`) and returns a description of it: the header,
 * the configuration section, every section with its byte range, every
 * command, each RAM block with its page counts, totals, the EOF offset and
 * the VMDESCRIPTION.  It understands
 *
 *   - livemig's own streams (docs/format.md),
 *   - QEMU's precopy streams (checked against 7.2): ZERO, PAGE,
 *     COMPRESS_PAGE (zlib) and XBZRLE page records, x-ignore-shared block
 *     addresses, 10.0's MULTIFD_FLUSH and SWITCHOVER_START,
 *   - mapped-ram files (QEMU 9.0+ layout, and livemig's, which is the same):
 *     per block a 28-byte header, a bitmap of present pages and every page
 *     at a fixed offset.
 *
 * Device sections carry no length on the wire, so the analyzer reads the
 * VMDESCRIPTION JSON first, from the end of the file, and skips each device
 * section by the sizes it lists (nested structs, arrays and subsections
 * included), then checks the section footer.  A section it can neither
 * parse nor skip is an error, never a guess.
 *
 * With opts->extract_dir set, each RAM block's memory is also written to
 * DIR/<idstr with '/' replaced by '_'> (lm_an_block.file_name) as a raw
 * image of exactly the block's size; pages never sent stay zero (holes).
 *
 * Errors.  The file is distrusted: every length, offset, count and name is
 * checked before use, and the first problem stops the analysis with a
 * message that says what was wrong and at which byte offset.  The partial
 * result up to that point is still returned (so a tool can show how far the
 * file made sense); its `error` member repeats the message.
 *
 * Threads: a call uses only its own state; several may run at once.
 * Ownership: the lm_analysis belongs to the caller, who frees it with
 * lm_analysis_free(); every array in it is owned by it.
 */
#ifndef LIVEMIG_ANALYZE_H
#define LIVEMIG_ANALYZE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "livemig/livemig.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LM_AN_NAME_MAX 256      /* counted strings: 255 bytes + NUL */

/* How a section's payload was accounted for. */
typedef enum lm_an_parse {
    LM_AN_PARSED_RAM,           /* the "ram" section, record by record */
    LM_AN_PARSED_VMDESC,        /* skipped by the VMDESCRIPTION's field sizes */
} lm_an_parse;

/* One START / PART / END / FULL section. */
typedef struct lm_an_section {
    uint8_t type;               /* LM_SECTION_START .. LM_SECTION_FULL */
    uint32_t section_id;
    char idstr[LM_AN_NAME_MAX];
    uint32_t instance_id;       /* PART/END: those of the section's START */
    uint32_t version_id;
    uint64_t start, end;        /* [start, end): type byte to end of footer */
    lm_an_parse parsed_by;
} lm_an_section;

/* One COMMAND record (QEMU's MIG_CMD_*). */
typedef struct lm_an_command {
    uint16_t cmd;
    uint16_t len;
    uint64_t offset;            /* of the 0x08 byte */
} lm_an_command;

/* A subsection of the configuration section. */
typedef struct lm_an_subsection {
    char name[LM_AN_NAME_MAX];
    uint32_t version;
    uint64_t start, end;        /* [start, end): 0x05 byte to end of data */
} lm_an_subsection;

/*
 * Page counts.  Record counts (zero, normal, compressed, xbzrle) count what
 * the file carries, so a page sent twice counts twice; pages_present counts
 * distinct pages with content in the file.  In a mapped-ram file a page is
 * present when its bitmap bit is set and is stored in full (normal); pages
 * whose bit is clear are zero by definition and are not counted as records.
 */
typedef struct lm_an_counts {
    uint64_t pages;             /* block size / page size */
    uint64_t pages_present;
    uint64_t zero_pages;        /* ZERO records */
    uint64_t normal_pages;      /* PAGE records (mapped-ram: present pages) */
    uint64_t compressed_pages;  /* COMPRESS_PAGE records (zlib) */
    uint64_t xbzrle_pages;      /* XBZRLE records */
} lm_an_counts;

typedef struct lm_an_block {
    char idstr[LM_AN_NAME_MAX];
    char file_name[LM_AN_NAME_MAX];  /* idstr with '/' -> '_' (extraction) */
    uint64_t size;              /* used_length from the block list */
    lm_an_counts counts;
    bool has_mr_addr;           /* x-ignore-shared: guest-physical address */
    uint64_t mr_addr;
    bool has_host_page_size;    /* postcopy: the block's own page size */
    uint64_t host_page_size;
    /* mapped-ram: where the block's header, bitmap and pages are. */
    bool mapped_ram;
    uint64_t header_offset, bitmap_offset, pages_offset;
} lm_an_block;

typedef struct lm_analysis {
    uint64_t file_size;
    uint64_t stream_offset;     /* where the stream starts (opts->offset) */
    uint32_t magic, version;    /* as read (valid only if header_ok) */
    bool header_ok;

    bool has_config;
    uint64_t config_offset;
    char machine[LM_AN_NAME_MAX];
    lm_an_subsection *config_subsections;
    size_t nconfig_subsections;
    char (*capabilities)[LM_AN_NAME_MAX];   /* configuration/capabilities */
    size_t ncapabilities;

    bool mapped_ram;            /* the "mapped-ram" capability is listed */
    uint64_t page_size;         /* target page size (VMDESCRIPTION, or 4096) */
    uint64_t ram_total;         /* the MEM_SIZE record's total */

    lm_an_section *sections;
    size_t nsections;
    lm_an_command *commands;
    size_t ncommands;
    lm_an_block *blocks;
    size_t nblocks;

    lm_an_counts totals;        /* sums over the blocks */
    uint64_t page_records;      /* ZERO + PAGE + COMPRESS_PAGE + XBZRLE records */
    uint64_t multifd_flushes;   /* MULTIFD_FLUSH records (QEMU 8.0+) */

    bool has_eof;
    uint64_t eof_offset;        /* of the 0x00 EOF byte */
    bool has_vmdesc;
    uint64_t vmdesc_offset;     /* of the 0x06 byte */
    uint32_t vmdesc_len;        /* bytes of JSON */
    uint64_t trailing_bytes;    /* after the VMDESCRIPTION (or EOF) */

    bool extracted;             /* every block was written to extract_dir */
    /*
     * complete: parsed to the end with no error AND the file holds a whole
     * migration, what a destination needs before it may run the guest:
     * every section that was started ended, a ram section with a block list
     * and its END, every page of every block present (a mapped-ram file:
     * every block's header; a page its bitmap leaves out is zero), and a
     * section for every device the VMDESCRIPTION lists.  A file that parsed
     * but is not complete (a multifd main stream, whose pages went over
     * other connections; a stream cut short at a record boundary) has
     * `missing` saying what is not there, and error.code 0.
     */
    bool complete;
    char missing[LM_ERROR_MAX];
    lm_error error;             /* the first error; code 0 when understood */
} lm_analysis;

typedef struct lm_analyze_opts {
    const char *extract_dir;    /* NULL: do not extract; created if missing */
    uint64_t offset;            /* the stream starts here (file:PATH,offset=N);
                                 * every offset reported stays absolute */
} lm_analyze_opts;

/*
 * Analyze the file at `path` (a regular file).  *out always receives a
 * result, to be freed with lm_analysis_free() (out and opts may be NULL).
 * Returns 0 when the whole file was understood (then see `complete`), else
 * a negative errno with the message in err (and in (*out)->error).
 */
int lm_analyze_file(const char *path, const lm_analyze_opts *opts,
                    lm_analysis **out, lm_error *err);

void lm_analysis_free(lm_analysis *a);

/*
 * The whole result as one JSON document (a malloc'd NUL-terminated string,
 * freed by the caller with free()), or NULL on allocation failure.  Field
 * names are the struct members' names; byte ranges are [start, end).
 */
char *lm_analysis_to_json(const lm_analysis *a);

/* "START", "PART", "END", "FULL" (or "?"). */
const char *lm_an_section_type_name(uint8_t type);
/* QEMU's MIG_CMD_* name without the prefix ("OPEN_RETURN_PATH"), or "?". */
const char *lm_an_command_name(uint16_t cmd);

#ifdef __cplusplus
}
#endif
#endif
