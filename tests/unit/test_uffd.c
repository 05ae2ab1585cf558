/*
 * Postcopy's destination RAM (src/uffd): a thread that touches missing
 * guest pages sleeps in the kernel, the fault thread asks for each page
 * once, the placer installs pages atomically (UFFDIO_COPY / ZEROPAGE) and
 * wakes it, an older copy of a page already placed is dropped, and a page
 * that was present before it arrived is refused.  Skipped where
 * userfaultfd is not available.  Every wait is bounded.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "ram/ram.h"
#include "stream/stream.h"
#include "uffd/uffd.h"
#include "util/time.h"

#define NPAGES 32
#define T_MS 10000

typedef struct fixture {
    ram_state ram;
    uint8_t *mem;
    uffd_ram *u;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t asked[NPAGES];
    int nasked;
} fixture;

static void on_request(void *opaque, const ramblock *b, uint64_t page)
{
    fixture *f = opaque;

    (void)b;
    pthread_mutex_lock(&f->lock);
    if (f->nasked < NPAGES)
        f->asked[f->nasked++] = page;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
}

/* Wait (bounded) until `n` requests came; returns how many did. */
static int wait_requests(fixture *f, int n)
{
    struct timespec dl = time_deadline_ms(T_MS);
    int got;

    pthread_mutex_lock(&f->lock);
    while (f->nasked < n && pthread_cond_timedwait(&f->cond, &f->lock, &dl) == 0)
        ;
    got = f->nasked;
    pthread_mutex_unlock(&f->lock);
    return got;
}

/* Place one record through the placer, as the listen thread would. */
static int place(fixture *f, uint64_t page, uint64_t flags, uint8_t byte, char *msg)
{
    uint8_t data[RAM_PAGE_SIZE];
    lm_stream *s;
    ram_placer pl = uffd_placer(f->u, 0);
    int ret;

    memset(data, byte, sizeof(data));
    s = stream_new_mem(data, flags == RAM_ZERO ? 1 : sizeof(data));
    ret = pl.ops->record(pl.impl, &f->ram, s, &f->ram.blocks[0], page * RAM_PAGE_SIZE, flags,
                         0);
    if (msg)
        snprintf(msg, 256, "%s", lm_stream_error_msg(s));
    stream_free(s);
    return ret;
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    lm_error err = { 0 };

    f->mem = mmap(NULL, NPAGES * RAM_PAGE_SIZE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(f->mem != MAP_FAILED);
    f->mem[20 * RAM_PAGE_SIZE] = 1;     /* present before registration */
    assert_int_equal(ram_register(&f->ram, "pc.ram", f->mem, NPAGES * RAM_PAGE_SIZE,
                                  RAM_PAGE_SIZE, NULL), 0);
    ram_load_start(&f->ram);
    pthread_mutex_init(&f->lock, NULL);
    {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&f->cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    f->u = uffd_open(&f->ram, NULL, 0, &err);
    if (!f->u) {
        print_message("skipped: %s\n", err.msg);
        munmap(f->mem, NPAGES * RAM_PAGE_SIZE);
        ram_load_finish(&f->ram);
        free(f);
        *state = NULL;
        return 0;
    }
    assert_int_equal(uffd_start_faults(f->u, on_request, f, &err), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;

    if (!f)
        return 0;
    uffd_close(f->u);
    munmap(f->mem, NPAGES * RAM_PAGE_SIZE);
    ram_load_finish(&f->ram);
    pthread_cond_destroy(&f->cond);
    pthread_mutex_destroy(&f->lock);
    free(f);
    return 0;
}

/* The guest: reads pages 5, 9 and 5 again; each read waits for its page. */
typedef struct toucher {
    fixture *f;
    uint8_t seen[3];
    atomic_bool done;
} toucher;

static void *touch(void *arg)
{
    toucher *t = arg;
    const uint64_t pages[3] = { 5, 9, 5 };

    for (int i = 0; i < 3; i++)
        t->seen[i] = *(volatile uint8_t *)(t->f->mem + pages[i] * RAM_PAGE_SIZE + 100);
    atomic_store(&t->done, true);
    return NULL;
}

static void test_faults_pull_pages(void **state)
{
    fixture *f = *state;
    toucher t = { .f = f };
    pthread_t th;
    uffd_stats st;
    char msg[256];

    if (!f)
        skip();
    assert_int_equal(pthread_create(&th, NULL, touch, &t), 0);
    /* the first read faults: page 5 asked for, the thread waits */
    assert_int_equal(wait_requests(f, 1), 1);
    assert_int_equal(f->asked[0], 5);
    assert_false(atomic_load(&t.done));
    assert_int_equal(place(f, 5, RAM_PAGE, 0x55, NULL), 0);
    /* then page 9 */
    assert_int_equal(wait_requests(f, 2), 2);
    assert_int_equal(f->asked[1], 9);
    assert_int_equal(place(f, 9, RAM_PAGE, 0x99, NULL), 0);
    pthread_join(th, NULL);
    assert_true(atomic_load(&t.done));
    assert_int_equal(t.seen[0], 0x55);
    assert_int_equal(t.seen[1], 0x99);
    assert_int_equal(t.seen[2], 0x55);
    assert_int_equal(f->nasked, 2);                 /* page 5 asked for once */

    /* the background stream: a zero page, and an older copy of page 5 */
    assert_int_equal(place(f, 12, RAM_ZERO, 0, NULL), 0);
    assert_int_equal(f->mem[12 * RAM_PAGE_SIZE], 0);
    assert_int_equal(place(f, 5, RAM_PAGE, 0x11, NULL), 0);
    assert_int_equal(f->mem[5 * RAM_PAGE_SIZE], 0x55);      /* not overwritten */
    assert_true(bitmap_test(f->ram.blocks[0].rmap, 5));
    assert_true(bitmap_test(f->ram.blocks[0].rmap, 12));
    /* a page that was there before it arrived: the memory was not discarded */
    assert_int_equal(place(f, 20, RAM_PAGE, 0x20, msg), -1);
    assert_non_null(strstr(msg, "present before it arrived"));
    /* a compressed page has no place in postcopy */
    assert_int_equal(place(f, 13, RAM_COMPRESS_PAGE, 0, msg), -1);
    assert_non_null(strstr(msg, "only ZERO and PAGE"));

    uffd_get_stats(f->u, &st);
    assert_int_equal(st.copied, 2);
    assert_int_equal(st.zeroed, 1);
    assert_int_equal(st.present, 1);
    assert_int_equal(st.requests, 2);
    assert_true(st.faults >= 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_faults_pull_pages, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
