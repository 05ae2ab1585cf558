/*
 * The test guest's pattern check (vmcheck.c) on synthetic RAM images:
 * every state the guest can be in at an instruction boundary passes
 * (vmguest/pattern.s lists them), and each kind of damage a migration
 * could cause -- a page left at the previous pass, a page from the future,
 * a cursor that disagrees, a missing header -- fails with the page named.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "vmcheck.h"

#define RAM (2u << 20)               /* 1 MiB low memory + 256 region pages */
#define START 0x100000u
#define PAGES 256u

static uint8_t *image(uint32_t pass, uint32_t cursor, uint32_t ahead)
{
    uint8_t *ram = calloc(1, RAM);
    uint32_t hdr[5] = { VMCHECK_MAGIC, pass, cursor, START, PAGES };

    assert_non_null(ram);
    memcpy(ram + VMCHECK_HDR, hdr, sizeof(hdr));
    for (uint32_t i = 0; i < PAGES; i++) {
        uint32_t c = i < ahead ? pass + 1 : pass;
        memcpy(ram + START + i * 4096u, &c, sizeof(c));
    }
    return ram;
}

static void set_page(uint8_t *ram, uint32_t i, uint32_t c)
{
    memcpy(ram + START + i * 4096u, &c, sizeof(c));
}

static void expect(uint8_t *ram, bool ok, const char *in_msg)
{
    struct vmcheck_report r;

    vmcheck_run(ram, RAM, &r);
    print_message("# %s: %s\n", ok ? "ok" : "broken", r.msg);
    assert_int_equal(r.ok, ok);
    if (in_msg)
        assert_non_null(strstr(r.msg, in_msg));
    free(ram);
}

static void test_consistent(void **state)
{
    expect(image(0, 0, 0), true, "consistent");          /* just started */
    expect(image(7, 100, 100), true, NULL);              /* mid-pass */
    expect(image(7, 100, 101), true, NULL);              /* counter up, cursor not yet */
    expect(image(7, PAGES, PAGES), true, NULL);          /* last page done */
    expect(image(8, PAGES, 0), true, NULL);              /* pass++, cursor not reset */
    expect(image(8, 0, 0), true, NULL);                  /* cursor reset */
}

static void test_broken(void **state)
{
    uint8_t *ram;

    ram = image(7, 100, 100);
    set_page(ram, 50, 7);         /* left behind: the prefix ends there, so page 51 breaks it */
    expect(ram, false, "page 51 ");
    ram = image(7, 100, 100);
    set_page(ram, 200, 8);                               /* from the future */
    expect(ram, false, "page 200 ");
    ram = image(7, 100, 100);
    set_page(ram, 120, 3);                               /* stale by passes */
    expect(ram, false, "page 120 ");
    expect(image(7, 100, 102), false, "cursor says 100");
    expect(image(7, 100, 98), false, "cursor says 100");
    ram = image(7, 0, 0);
    memset(ram + VMCHECK_HDR, 0, 4);
    expect(ram, false, "no test guest header");
    ram = image(7, PAGES + 1, 0);                        /* cursor past the region */
    expect(ram, false, "bad header");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_consistent),
        cmocka_unit_test(test_broken),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
