/*
 * The one definition of the wire grammar (src/savevm/wire.h): the command and
 * return-path tables against the reference's lists (6.1, 6.3), and the
 * framing decoders the loader and the analyzer share -- section header,
 * footer, command header -- on hand-built bytes: each status, the offsets
 * they record, and truncation at every byte.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "savevm/wire.h"
#include "stream/stream.h"

/* Reference 6.1, row by row: number, name, len (-1 = variable), minimum. */
static const struct { uint16_t cmd; const char *name; int32_t len; uint16_t min; } cmds[] = {
    { 1, "OPEN_RETURN_PATH", 0, 0 },
    { 2, "PING", 4, 0 },
    { 3, "POSTCOPY_ADVISE", -1, 0 },
    { 4, "POSTCOPY_LISTEN", 0, 0 },
    { 5, "POSTCOPY_RUN", 0, 0 },
    { 6, "POSTCOPY_RAM_DISCARD", -1, 20 },
    { 7, "PACKAGED", 4, 0 },
    { 8, "ENABLE_COLO", 0, 0 },
    { 9, "POSTCOPY_RESUME", 0, 0 },
    { 10, "RECV_BITMAP", -1, 1 },
    { 11, "SWITCHOVER_START", 0, 0 },
};

/* Reference 6.3. */
static const struct { uint16_t type; const char *name; int32_t len; uint16_t min; } rps[] = {
    { 1, "SHUT", 4, 0 },
    { 2, "PONG", 4, 0 },
    { 3, "REQ_PAGES_ID", -1, 13 },
    { 4, "REQ_PAGES", 12, 0 },
    { 5, "RECV_BITMAP", -1, 1 },
    { 6, "RESUME_ACK", 4, 0 },
    { 7, "SWITCHOVER_ACK", 0, 0 },
};

static void test_command_table(void **state)
{
    (void)state;
    assert_int_equal(WIRE_CMD__MAX, 12);
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        const wire_item_def *d = wire_cmd_def(cmds[i].cmd);

        assert_non_null(d);
        assert_string_equal(d->name, cmds[i].name);
        assert_string_equal(wire_cmd_name(cmds[i].cmd), cmds[i].name);
        assert_int_equal(d->len, cmds[i].len);
        assert_int_equal(d->min_len, cmds[i].min);
        if (cmds[i].len >= 0) {
            assert_int_equal(wire_cmd_check(cmds[i].cmd, (uint16_t)cmds[i].len), WIRE_OK);
            assert_int_equal(wire_cmd_check(cmds[i].cmd, (uint16_t)cmds[i].len + 1),
                             WIRE_ELEN);
        } else {
            assert_int_equal(wire_cmd_check(cmds[i].cmd, cmds[i].min), WIRE_OK);
            assert_int_equal(wire_cmd_check(cmds[i].cmd, 65535), WIRE_OK);
            if (cmds[i].min)
                assert_int_equal(wire_cmd_check(cmds[i].cmd, cmds[i].min - 1), WIRE_ELEN);
        }
    }
    /* INVALID and everything from MAX on are not commands. */
    assert_null(wire_cmd_def(0));
    assert_null(wire_cmd_def(WIRE_CMD__MAX));
    assert_null(wire_cmd_def(65535));
    assert_string_equal(wire_cmd_name(0), "?");
    assert_string_equal(wire_cmd_name(12), "?");
    assert_int_equal(wire_cmd_check(0, 0), WIRE_EUNKNOWN);
    assert_int_equal(wire_cmd_check(12, 0), WIRE_EUNKNOWN);
    /* The symbolic names are the table's numbers. */
    assert_string_equal(wire_cmd_name(WIRE_CMD_PACKAGED), "PACKAGED");
    assert_string_equal(wire_cmd_name(WIRE_CMD_POSTCOPY_RUN), "POSTCOPY_RUN");
}

static void test_return_path_table(void **state)
{
    uint8_t msg[WIRE_RP_MAX_LEN + 8], v[4] = { 0, 0, 0, 7 };

    (void)state;
    assert_int_equal(WIRE_RP__MAX, 8);
    for (size_t i = 0; i < sizeof(rps) / sizeof(rps[0]); i++) {
        const wire_item_def *d = wire_rp_def(rps[i].type);

        assert_non_null(d);
        assert_string_equal(wire_rp_name(rps[i].type), rps[i].name);
        assert_int_equal(d->len, rps[i].len);
        assert_int_equal(d->min_len, rps[i].min);
        if (rps[i].len >= 0) {
            assert_int_equal(wire_rp_check(rps[i].type, (uint16_t)rps[i].len), WIRE_OK);
            assert_int_equal(wire_rp_check(rps[i].type, (uint16_t)rps[i].len + 4),
                             WIRE_ELEN);
        } else {
            /* variable: from the minimum up to the 512-byte cap */
            assert_int_equal(wire_rp_check(rps[i].type, rps[i].min), WIRE_OK);
            assert_int_equal(wire_rp_check(rps[i].type, WIRE_RP_MAX_LEN), WIRE_OK);
            assert_int_equal(wire_rp_check(rps[i].type, WIRE_RP_MAX_LEN + 1), WIRE_ELEN);
            assert_int_equal(wire_rp_check(rps[i].type, rps[i].min - 1), WIRE_ELEN);
        }
    }
    assert_int_equal(wire_rp_check(0, 4), WIRE_EUNKNOWN);
    assert_int_equal(wire_rp_check(WIRE_RP__MAX, 4), WIRE_EUNKNOWN);
    assert_string_equal(wire_rp_name(9), "?");

    assert_int_equal(wire_rp_encode(msg, sizeof(msg), WIRE_RP_PONG, v, 4), 8);
    assert_memory_equal(msg, "\0\2\0\4\0\0\0\7", 8);
    assert_int_equal(wire_rp_encode(msg, sizeof(msg), WIRE_RP_SWITCHOVER_ACK, NULL, 0), 4);
    assert_memory_equal(msg, "\0\7\0\0", 4);
}

/* ---- decoders ---- */

/* A START header of section 7 "dev" instance 2 version 3 (after its type
 * byte), a PART header of id 7, then a good footer, a footer with a wrong id
 * and bytes that are no footer. */
static const uint8_t sections[] = {
    0, 0, 0, 7, 3, 'd', 'e', 'v', 0, 0, 0, 2, 0, 0, 0, 3,   /* [0, 16) START */
    0, 0, 0, 7,                                             /* [16, 20) PART */
    0x7e, 0, 0, 0, 7,                                       /* [20, 25) footer */
    0x7e, 0, 0, 0, 9,                                       /* [25, 30) id 9 */
    0x42, 0, 0, 0, 7,                                       /* [30, 35) no mark */
};

static void test_section_decoders(void **state)
{
    lm_stream *s = stream_new_mem(sections, sizeof(sections));
    wire_section h;
    wire_footer f;

    (void)state;
    assert_int_equal(wire_get_section_header(s, WIRE_VM_SECTION_START, 100, &h), WIRE_OK);
    assert_int_equal(h.type, WIRE_VM_SECTION_START);
    assert_int_equal(h.at, 100);
    assert_int_equal(h.id, 7);
    assert_string_equal(h.idstr, "dev");
    assert_int_equal(h.idstr_len, 3);
    assert_int_equal(h.idstr_at, 4);
    assert_int_equal(h.instance, 2);
    assert_int_equal(h.version, 3);
    assert_int_equal(lm_stream_offset(s), 16);

    assert_int_equal(wire_get_section_header(s, WIRE_VM_SECTION_PART, 15, &h), WIRE_OK);
    assert_int_equal(h.id, 7);
    assert_string_equal(h.idstr, "");
    assert_int_equal(h.instance, 0);
    assert_int_equal(lm_stream_offset(s), 20);

    assert_int_equal(wire_get_footer(s, 7, &f), WIRE_OK);
    assert_int_equal(f.at, 20);
    assert_int_equal(wire_get_footer(s, 7, &f), WIRE_EID);
    assert_int_equal(f.at, 25);
    assert_int_equal(f.id, 9);
    assert_int_equal(wire_get_footer(s, 7, &f), WIRE_EMARK);
    assert_int_equal(f.at, 30);
    assert_int_equal(f.mark, 0x42);
    /* a bad mark leaves what follows it unread */
    assert_int_equal(lm_stream_offset(s), 31);
    assert_int_equal(lm_stream_error(s), 0);
    stream_free(s);

    /* Every prefix of the START header is a latched truncation. */
    for (size_t n = 0; n < 16; n++) {
        s = stream_new_mem(sections, n);
        assert_int_equal(wire_get_section_header(s, WIRE_VM_SECTION_FULL, 0, &h),
                         WIRE_ESTREAM);
        assert_non_null(strstr(lm_stream_error_msg(s), "truncated"));
        stream_free(s);
    }
    s = stream_new_mem(sections + 20, 3);
    assert_int_equal(wire_get_footer(s, 7, &f), WIRE_ESTREAM);
    stream_free(s);

    /* A NUL inside the name: the count says so, for callers that care. */
    {
        static const uint8_t nul[] = { 0, 0, 0, 1, 3, 'd', 0, 'v', 0, 0, 0, 0, 0, 0, 0, 1 };

        s = stream_new_mem(nul, sizeof(nul));
        assert_int_equal(wire_get_section_header(s, WIRE_VM_SECTION_FULL, 0, &h), WIRE_OK);
        assert_int_equal(h.idstr_len, 3);
        assert_int_equal(strlen(h.idstr), 1);
        assert_int_equal(h.version, 1);
        stream_free(s);
    }
}

static void test_command_decoder(void **state)
{
    static const uint8_t good[] = { 0, 2, 0, 4, 0, 0, 0, 1 };   /* PING 1 */
    static const uint8_t badlen[] = { 0, 2, 0, 7 };
    static const uint8_t unknown[] = { 0, 99, 0, 0 };
    static const uint8_t invalid[] = { 0, 0, 0, 0 };
    static const uint8_t discard[] = { 0, 6, 0, 19 };           /* one byte short */
    wire_command c;
    lm_stream *s;

    (void)state;
    s = stream_new_mem(good, sizeof(good));
    assert_int_equal(wire_get_command(s, 40, &c), WIRE_OK);
    assert_int_equal(c.at, 40);
    assert_int_equal(c.cmd, WIRE_CMD_PING);
    assert_int_equal(c.len, 4);
    assert_non_null(c.def);
    assert_string_equal(c.def->name, "PING");
    /* the payload is the caller's */
    assert_int_equal(lm_stream_offset(s), 4);
    stream_free(s);

    s = stream_new_mem(badlen, sizeof(badlen));
    assert_int_equal(wire_get_command(s, 0, &c), WIRE_ELEN);
    assert_int_equal(c.cmd, 2);
    assert_int_equal(c.len, 7);
    stream_free(s);

    s = stream_new_mem(unknown, sizeof(unknown));
    assert_int_equal(wire_get_command(s, 0, &c), WIRE_EUNKNOWN);
    assert_int_equal(c.cmd, 99);
    assert_null(c.def);
    stream_free(s);

    s = stream_new_mem(invalid, sizeof(invalid));
    assert_int_equal(wire_get_command(s, 0, &c), WIRE_EUNKNOWN);
    stream_free(s);

    s = stream_new_mem(discard, sizeof(discard));
    assert_int_equal(wire_get_command(s, 0, &c), WIRE_ELEN);
    stream_free(s);

    for (size_t n = 0; n < 4; n++) {
        s = stream_new_mem(good, n);
        assert_int_equal(wire_get_command(s, 0, &c), WIRE_ESTREAM);
        assert_true(lm_stream_error(s) != 0);
        stream_free(s);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_command_table),
        cmocka_unit_test(test_return_path_table),
        cmocka_unit_test(test_section_decoders),
        cmocka_unit_test(test_command_decoder),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
