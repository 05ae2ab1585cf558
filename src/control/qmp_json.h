/*
 * What the QMP server (qmp.c) and the commands it serves (qmp.c's protocol
 * commands, qmp_migration.c) share: turning arbitrary bytes into JSON
 * strings, reading a command's "arguments" the way QEMU checks them, and
 * handing a reply back as lm_qmp_handler text.  Every command, built-in or a
 * program's, is an lm_qmp_handler; these helpers only save each of ours from
 * spelling out QEMU's messages again.
 */
#ifndef CONTROL_QMP_JSON_H
#define CONTROL_QMP_JSON_H

#include <jansson.h>

#include "livemig/livemig.h"

/* A JSON string even from bytes that are not UTF-8 (library messages, paths):
 * such bytes become '?'.  NULL reads as "".  NULL only when out of memory. */
json_t *qmp_string(const char *s);

typedef enum qmp_type { QMP_STR, QMP_BOOL, QMP_INT, QMP_ARRAY } qmp_type;

/* One member of a command's argument schema; a table ends with name NULL. */
typedef struct qmp_arg {
    const char *name;
    qmp_type type;
    bool required;
} qmp_arg;

/*
 * Parse a handler's args_json and check it against `schema` in QEMU's order
 * and words: members in schema order (missing, then wrong type), then the
 * first member the schema does not name is unexpected.  A NULL schema only
 * parses (for a command that checks its own).  Returns the arguments object
 * (the caller's reference) or NULL with err filled (GenericError text).
 */
json_t *qmp_args_parse(const char *args_json, const qmp_arg *schema, lm_error *err);

/* args[name] is JSON true (absent or false: false). */
bool qmp_arg_true(json_t *args, const char *name);

/*
 * Hand `v` back as a handler's *reply_json; takes the reference.  Returns 0,
 * or -ENOMEM with err set when v is NULL (a failed json_pack) or cannot be
 * serialised, so a handler can end with `return qmp_reply(json_pack(...))`.
 */
int qmp_reply(json_t *v, char **reply_json, lm_error *err);

#endif
