/*
 * src/cpr/ over a real socketpair: a source's memfd block handed to a
 * destination's reservation (the bytes appear there, and a write on one
 * side is seen on the other: the same pages), a descriptor that holds less
 * than the block refused with the reservation left in place, a peer that
 * does not speak the preamble refused, and each mode's checks of block
 * kinds and URIs.  Every wait is bounded (CPR_TIMEOUT_MS).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cpr/cpr.h"

#define NPAGES 64
#define LEN (NPAGES * RAM_PAGE_SIZE)

typedef struct side {
    ram_state r;
    uint8_t *host;
    int memfd;
} side;

static void source_open(side *s)
{
    lm_error err = { 0 };

    memset(s, 0, sizeof(*s));
    s->memfd = memfd_create("test-cpr", MFD_CLOEXEC);
    assert_true(s->memfd >= 0);
    assert_int_equal(ftruncate(s->memfd, LEN), 0);
    s->host = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, s->memfd, 0);
    assert_true(s->host != MAP_FAILED);
    for (uint64_t i = 0; i < LEN; i++)
        s->host[i] = (uint8_t)(i * 7 + i / RAM_PAGE_SIZE);
    assert_int_equal(ram_register(&s->r, "ram0", s->host, LEN, RAM_PAGE_SIZE, &err), 0);
    assert_int_equal(cpr_register(&s->r, 0, s->memfd, 0, &err), 0);
    assert_int_equal(s->r.blocks[0].backing, CPR_BACKING_MEMFD);
}

static void dest_open(side *s)
{
    lm_error err = { 0 };

    memset(s, 0, sizeof(*s));
    s->memfd = -1;
    s->host = mmap(NULL, LEN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    assert_true(s->host != MAP_FAILED);
    assert_int_equal(ram_register(&s->r, "ram0", s->host, LEN, RAM_PAGE_SIZE, &err), 0);
    assert_int_equal(cpr_register(&s->r, 0, -1, 0, &err), 0);
    assert_int_equal(s->r.blocks[0].backing, CPR_BACKING_AWAIT);
}

static void side_close(side *s)
{
    cpr_release(&s->r);
    munmap(s->host, LEN);
    if (s->memfd >= 0)
        close(s->memfd);
}

typedef struct recv_job {
    side *d;
    int fd;
    int ret;
    lm_error err;
} recv_job;

static void *recv_main(void *arg)
{
    recv_job *j = arg;

    j->ret = cpr_receive(&j->d->r, j->fd, -1, &j->err);
    return NULL;
}

/* Run cpr_send against cpr_receive on a socketpair; the source's result. */
static int exchange(side *s, side *d, recv_job *j, lm_error *err)
{
    int sv[2], ret;
    pthread_t t;

    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    *j = (recv_job){ .d = d, .fd = sv[1] };
    assert_int_equal(pthread_create(&t, NULL, recv_main, j), 0);
    ret = cpr_send(&s->r, sv[0], -1, err);
    pthread_join(t, NULL);
    close(sv[0]);
    close(sv[1]);
    return ret;
}

static void test_transfer_maps(void **state)
{
    side s, d;
    recv_job j;
    lm_error err = { 0 };

    (void)state;
    source_open(&s);
    dest_open(&d);
    assert_int_equal(exchange(&s, &d, &j, &err), 0);
    assert_int_equal(j.ret, 0);
    assert_memory_equal(d.host, s.host, LEN);
    assert_true(d.r.blocks[0].fd >= 0);
    assert_int_equal(d.r.blocks[0].backing, CPR_BACKING_MEMFD);
    /* the same pages, not a copy */
    s.host[5 * RAM_PAGE_SIZE] ^= 0xff;
    assert_int_equal(d.host[5 * RAM_PAGE_SIZE], s.host[5 * RAM_PAGE_SIZE]);
    /* a failed load gives the memory back: the reservation again */
    d.r.blocks[0].ignored = true;
    cpr_incoming_failed(&d.r);
    assert_int_equal(d.r.blocks[0].fd, -1);
    assert_int_equal(d.r.blocks[0].backing, CPR_BACKING_AWAIT);
    side_close(&s);
    side_close(&d);
}

static void test_short_descriptor_refused(void **state)
{
    side s, d;
    recv_job j;
    lm_error err = { 0 };

    (void)state;
    source_open(&s);
    dest_open(&d);
    /* after registration: the descriptor now holds half the block */
    munmap(s.host, LEN);
    assert_int_equal(ftruncate(s.memfd, LEN / 2), 0);
    s.host = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, s.memfd, 0);
    assert_true(s.host != MAP_FAILED);
    assert_true(exchange(&s, &d, &j, &err) < 0);
    assert_non_null(strstr(err.msg, "refused"));
    assert_non_null(strstr(err.msg, "fewer than"));
    assert_true(j.ret < 0);
    assert_int_equal(d.r.blocks[0].fd, -1);
    assert_int_equal(d.r.blocks[0].backing, CPR_BACKING_AWAIT);
    side_close(&s);
    side_close(&d);
}

static void test_not_a_preamble(void **state)
{
    static const uint8_t qevm[12] = { 'Q', 'E', 'V', 'M', 0, 0, 0, 3, 7, 0, 0, 0 };
    side d;
    int sv[2];
    pthread_t t;
    recv_job j;
    uint8_t reply[64];

    (void)state;
    dest_open(&d);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    j = (recv_job){ .d = &d, .fd = sv[1] };
    assert_int_equal(pthread_create(&t, NULL, recv_main, &j), 0);
    assert_int_equal(write(sv[0], qevm, sizeof(qevm)), (ssize_t)sizeof(qevm));
    pthread_join(t, NULL);
    assert_int_equal(j.ret, -EPROTO);
    assert_non_null(strstr(j.err.msg, "is its mode cpr-transfer?"));
    close(sv[1]);
    assert_int_equal(read(sv[0], reply, sizeof(reply)), 0);   /* no answer, closed */
    close(sv[0]);
    side_close(&d);
}

static void test_mode_checks(void **state)
{
    side s, d;
    ram_state anon = { 0 };
    static uint8_t page[RAM_PAGE_SIZE] __attribute__((aligned(4096)));
    lm_error err = { 0 };
    cpr_config c = { .mode = CPR_MODE_REBOOT, .uri_kind = URI_FILE };

    (void)state;
    source_open(&s);
    dest_open(&d);
    assert_int_equal(ram_register(&anon, "anon", page, sizeof(page), RAM_PAGE_SIZE, &err), 0);

    assert_int_equal(cpr_check(&anon, &c, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "anonymous"));
    assert_int_equal(cpr_check(&s.r, &c, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "memfd"));
    c.uri_kind = URI_TCP;
    assert_int_equal(cpr_check(&s.r, &c, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "file: URI"));

    c = (cpr_config){ .mode = CPR_MODE_TRANSFER, .uri_kind = URI_TCP };
    assert_int_equal(cpr_check(&s.r, &c, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "unix:"));
    c.uri_kind = URI_UNIX;
    assert_int_equal(cpr_check(&s.r, &c, &err), 0);
    assert_true(s.r.blocks[0].ignored);
    c.conflict = "multifd";
    assert_int_equal(cpr_check(&s.r, &c, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "multifd"));
    c.conflict = NULL;
    assert_int_equal(cpr_check(&anon, &c, &err), -EINVAL);
    c.incoming = true;
    assert_int_equal(cpr_check(&d.r, &c, &err), 0);
    assert_int_equal(cpr_check(&s.r, &c, &err), -EINVAL);   /* memory of its own */

    /* a reservation has no memory outside cpr-transfer */
    c = (cpr_config){ .mode = CPR_MODE_NORMAL, .uri_kind = URI_UNIX, .incoming = true };
    assert_int_equal(cpr_check(&d.r, &c, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "set mode cpr-transfer"));
    /* normal mode with x-ignore-shared: a memfd is sent, not left in place */
    c = (cpr_config){ .mode = CPR_MODE_NORMAL, .uri_kind = URI_UNIX, .ignore_shared = true };
    assert_int_equal(cpr_check(&s.r, &c, &err), 0);
    assert_false(s.r.blocks[0].ignored);
    assert_true(s.r.ignore_shared);
    side_close(&s);
    side_close(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_transfer_maps),
        cmocka_unit_test(test_short_descriptor_refused),
        cmocka_unit_test(test_not_a_preamble),
        cmocka_unit_test(test_mode_checks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
