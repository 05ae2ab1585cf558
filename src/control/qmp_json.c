/*
 * JSON helpers for the QMP server and its commands (see qmp_json.h).
 *
 * The argument messages are QEMU's, word for word, because management
 * scripts match on them; the order of the checks is QEMU's too, so a request
 * with several faults gets the same complaint from us as from QEMU.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "control/qmp_json.h"
#include "util/error.h"

json_t *qmp_string(const char *s)
{
    json_t *v;
    char *copy;

    if (!s)
        s = "";
    v = json_string(s);
    if (v)
        return v;
    /* Not UTF-8 (or out of memory): keep what is readable of it. */
    copy = strdup(s);
    if (!copy)
        return NULL;
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    v = json_string(copy);
    free(copy);
    return v;
}

static const char *qmp_type_name(qmp_type t)
{
    switch (t) {
    case QMP_STR: return "string";
    case QMP_BOOL: return "boolean";
    case QMP_INT: return "integer";
    case QMP_ARRAY: return "array";
    }
    return "?";
}

static bool qmp_type_ok(json_t *v, qmp_type t)
{
    switch (t) {
    case QMP_STR: return json_is_string(v);
    case QMP_BOOL: return json_is_boolean(v);
    case QMP_INT: return json_is_integer(v);
    case QMP_ARRAY: return json_is_array(v);
    }
    return false;
}

static int qmp_args_check(json_t *args, const qmp_arg *schema, lm_error *err)
{
    const char *key;
    json_t *v;

    for (const qmp_arg *a = schema; a->name; a++) {
        v = json_object_get(args, a->name);
        if (!v) {
            if (a->required)
                return error_set(err, -EINVAL, "Parameter '%s' is missing", a->name);
            continue;
        }
        if (!qmp_type_ok(v, a->type))
            return error_set(err, -EINVAL, "Invalid parameter type for '%s', expected: %s",
                             a->name, qmp_type_name(a->type));
    }
    json_object_foreach(args, key, v) {
        const qmp_arg *a = schema;

        while (a->name && strcmp(a->name, key) != 0)
            a++;
        if (!a->name)
            return error_set(err, -EINVAL, "Parameter '%s' is unexpected", key);
    }
    return 0;
}

json_t *qmp_args_parse(const char *args_json, const qmp_arg *schema, lm_error *err)
{
    json_error_t jerr;
    json_t *args = json_loads(args_json ? args_json : "{}", 0, &jerr);

    /* The server hands every handler an object it serialised itself, so a
     * failure here is memory, not the client's input. */
    if (!json_is_object(args)) {
        json_decref(args);
        error_set(err, -ENOMEM, "Out of memory");
        return NULL;
    }
    if (schema && qmp_args_check(args, schema, err) < 0) {
        json_decref(args);
        return NULL;
    }
    return args;
}

bool qmp_arg_true(json_t *args, const char *name)
{
    return json_is_true(json_object_get(args, name));
}

int qmp_reply(json_t *v, char **reply_json, lm_error *err)
{
    char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;

    json_decref(v);
    if (!s)
        return error_set(err, -ENOMEM, "Out of memory");
    *reply_json = s;
    return 0;
}
