/*
 * The main stream (QEMU's "QEVM" format, version 3) -- writer helpers and the
 * loader.  The grammar's numbers, lengths and framing decoders are in
 * wire.h; this is what livemig writes and how it loads:
 *
 *   stream   := header CONFIGURATION record* EOF
 *   header   := be32 0x5145564d ("QEVM") be32 3
 *   config   := 0x07 be32 len machine-name[len] subsection*   (mapped-ram only:
 *               configuration/capabilities, see docs/format.md)
 *   record   := START|FULL  be32 id  counted-idstr be32 instance be32 version
 *                            payload footer
 *             | PART|END    be32 id  payload footer
 *             | COMMAND     be16 cmd be16 len data[len]
 *   footer   := 0x7e be32 id
 *   package  := record*        (PACKAGED's blob: no header, no EOF)
 *
 * A section's payload has no length: only its handler can parse it.  So the
 * loader looks the handler up by (idstr, instance) at START/FULL, remembers
 * the sender's section id for PART/END, checks the footer after the handler
 * returns, and treats anything it cannot account for as an error that names
 * the byte offset.  The loader never resumes anything itself: it returns 0
 * only after it has parsed the EOF record AND everything registered with it
 * arrived (design note 11): every handler got its last section (FULL, or the
 * END of an iterable one) and every handler's own `check` agrees (the RAM
 * handler's: every block listed, every page received).  An EOF before that is
 * an error that names the EOF's byte offset and what is missing.
 *
 * Commands are dispatched by number through lv->cmds[], where the program
 * attaches a handler per command (loadvm_set_command); wire.h's table says
 * which numbers exist and their lengths.  A number that is not a command, a
 * length the table does not allow, and a command with no handler here are
 * each refused with the byte offset.
 *
 * Threads: the writer helpers run on the migration thread, the loader on the
 * incoming thread (or a test); they keep no state outside their arguments.
 */
#ifndef SAVEVM_SAVEVM_H
#define SAVEVM_SAVEVM_H

#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"
#include "savevm/wire.h"
#include "stream/stream.h"

/* The configuration section's machine name: livemig guests are not QEMU
 * machines, so a QEMU destination refuses our stream here, early and clearly. */
#define SAVEVM_MACHINE_NAME "livemig-1"

/* ---- writing ---- */
/* Header and configuration; with mapped-ram the configuration carries QEMU's
 * configuration/capabilities subsection listing it (a validated capability),
 * and so do x-ignore-shared (QEMU's other one) and x-integrity (livemig's
 * own), in the same list. */
void savevm_put_header(lm_stream *s, bool mapped_ram, bool ignore_shared, bool integrity);
void savevm_section_header(lm_stream *s, uint8_t type, uint32_t id, const char *idstr,
                           uint32_t instance, uint32_t version);  /* any type */
void savevm_section_footer(lm_stream *s, uint32_t id);
void savevm_put_command(lm_stream *s, uint16_t cmd, uint16_t len, const void *data);
void savevm_put_eof(lm_stream *s);

/* ---- loading ---- */
typedef struct loadvm_handler {
    char idstr[256];
    uint32_t instance;
    uint32_t version;         /* highest version we can load */
    int (*load)(lm_stream *s, void *opaque, uint32_t version, int section_type);
    void *opaque;
    /* Optional, at EOF: 0 when this handler has all it needs, else -1 with
     * what is missing appended to the list why[0..len) (error_list_add).
     * Without it, the handler needs its FULL or END section (`done`). */
    int (*check)(void *opaque, char *why, size_t len);
    bool done;                /* parse state: its FULL or END section loaded */
} loadvm_handler;

#define LOADVM_MAX_HANDLERS 72
#define LOADVM_MAX_SECTIONS 256

typedef struct loadvm loadvm;

/* A command as its handler gets it. */
typedef struct loadvm_cmd {
    uint16_t cmd, len;        /* len is one the wire table allows for cmd */
    uint64_t at;              /* byte offset of the COMMAND record's 0x08 */
    const uint8_t *data;      /* its len payload bytes, read by the loader
                               * (NULL when len is 0); valid during the call */
    lm_stream *s;             /* the stream it came from, just past the payload
                               * (PACKAGED's blob follows there) */
    loadvm *lv;               /* for a nested loadvm_run_records() */
} loadvm_cmd;

/*
 * What a record loop ended with (loadvm_run_records), and what a command
 * handler returns to end the loop that read it (QEMU's POSTCOPY_RUN ends
 * the nested loop, and a PACKAGED handler that sees it end so passes it on).
 */
enum {
    LOADVM_EOF = 0,           /* LOADVM_MAIN: the EOF record, and all arrived */
    LOADVM_QUIT = 1,          /* a command handler returned LOADVM_QUIT */
    LOADVM_END = 2,           /* LOADVM_PACKAGE: the blob ended between records */
};

/* Returns 0, LOADVM_QUIT, or a negative errno: the loader then reports
 * "command N (NAME) at byte offset X failed: <errno text>", unless the
 * handler latched a more precise error on c->s first. */
typedef int (*loadvm_cmd_fn)(const loadvm_cmd *c, void *opaque);

struct loadvm {
    loadvm_handler handlers[LOADVM_MAX_HANDLERS];
    int nhandlers;
    /* The commands this side handles, by number; fn NULL = refused. */
    struct { loadvm_cmd_fn fn; void *opaque; } cmds[WIRE_CMD__MAX];
    bool mapped_ram;          /* this side loads a mapped-ram file */
    bool integrity;           /* this side has x-integrity (page checksums) */
    /* Optional, at the EOF record of a LOADVM_MAIN loop, before the
     * completeness check: 0 to go on, or -1 with the error latched on s
     * (postcopy's listen thread waits there for the main thread to finish
     * the package, whose device sections the check counts). */
    int (*at_eof)(loadvm *lv, lm_stream *s, void *opaque);
    void *at_eof_opaque;
    bool ignore_shared;       /* this side has x-ignore-shared on */

    /* parse state, shared by a package's nested loop and the stream around
     * it: sender's section id -> handler, and version in use */
    struct { uint32_t id; int handler; uint32_t version; } sections[LOADVM_MAX_SECTIONS];
    int nsections;
};

/* The handlers' "last section loaded" flags of `from` are added to lv's
 * (postcopy: the package's devices, loaded by another loop). */
void loadvm_merge_done(loadvm *lv, const loadvm *from);

/* Register a section handler; NULL when the table is full.  The caller may
 * set the returned handler's `check`. */
loadvm_handler *loadvm_add_handler(loadvm *lv, const char *idstr, uint32_t instance,
                                   uint32_t version,
                                   int (*load)(lm_stream *, void *, uint32_t, int),
                                   void *opaque);
/* Handle command `cmd` (WIRE_CMD_*) with fn(c, opaque); fn NULL refuses it
 * again.  -EINVAL when cmd is not in the wire table. */
int loadvm_set_command(loadvm *lv, uint16_t cmd, loadvm_cmd_fn fn, void *opaque);

/*
 * Parse the whole main stream: the header, then loadvm_run_records(MAIN).
 * 0 = the EOF record and everything registered arrived; LOADVM_QUIT = a
 * command handler ended the load before EOF (nothing is checked then: the
 * rest of the stream, with its EOF, is for whoever reads on); -1 = error
 * latched on s.  Resets the parse state first, so an loadvm can be
 * loaded again.
 */
int loadvm_run(loadvm *lv, lm_stream *s);

typedef enum loadvm_scope {
    /* The main stream after its header (or after a command that ended an
     * earlier loop): it ends with its EOF record, which runs the "complete
     * means complete" check; the stream's end anywhere before is truncation. */
    LOADVM_MAIN,
    /* A package: a stream over PACKAGED's blob (stream_new_mem), which
     * has no header and no EOF record; it ends with the blob's last byte,
     * which must be a record's last.  An EOF record in it is refused (QEMU
     * writes none; it would hide the rest of the blob), and nothing checks
     * completeness at its end: that is for the main stream's EOF. */
    LOADVM_PACKAGE,
} loadvm_scope;

/*
 * The record loop on its own: records from s until the scope's end or a
 * command handler's LOADVM_QUIT (s is then just past that command).
 * Returns LOADVM_EOF (MAIN), LOADVM_END (PACKAGE), LOADVM_QUIT, or
 * -1 with the error latched on s.  It does not reset the parse state: a
 * package's sections use the ids the stream around it bound, and the other
 * way round.  Offsets in errors are s's own, so in a package they count from
 * the blob's first byte; the PACKAGED handler says where the blob starts.
 */
int loadvm_run_records(loadvm *lv, lm_stream *s, loadvm_scope scope);

#endif
