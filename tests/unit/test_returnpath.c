/*
 * The return path over a real socketpair: the destination's writer from
 * several threads at once (messages never interleave), and the source's
 * reader thread -- SHUT's verdict, PONG dropped, page requests handed to
 * the message callback, and every way it stops by itself (a bad type, a bad
 * length, the peer closing, a refused message) reported once through
 * `failed` and to the waiting thread.  Every wait is bounded.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "returnpath/returnpath.h"
#include "savevm/wire.h"
#include "util/error.h"

#define T_MS 10000

typedef struct peer {
    int fds[2];                 /* [0] the source's end, [1] the destination's */
    atomic_int failed;
    lm_error fail_err;
    atomic_int messages;
    pthread_mutex_t lock;       /* with cond: a message was taken */
    pthread_cond_t cond;
    uint16_t last_type;
    int refuse;                 /* message callback returns this */
} peer;

static void peer_open(peer *p)
{
    memset(p, 0, sizeof(*p));
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, p->fds), 0);
}

static void peer_close(peer *p)
{
    close(p->fds[0]);
    if (p->fds[1] >= 0)
        close(p->fds[1]);
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->lock);
}

static int on_message(void *opaque, uint16_t type, const uint8_t *data, uint16_t len,
                      lm_error *err)
{
    peer *p = opaque;

    (void)data;
    (void)len;
    pthread_mutex_lock(&p->lock);
    p->last_type = type;
    atomic_fetch_add(&p->messages, 1);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    return p->refuse;
}

static void on_failed(void *opaque, const lm_error *err)
{
    peer *p = opaque;

    p->fail_err = *err;
    atomic_fetch_add(&p->failed, 1);
}

/* Wait (bounded) until n messages were taken; how many were. */
static int wait_messages(peer *p, int n)
{
    struct timespec dl;
    int got;

    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += T_MS / 1000;
    pthread_mutex_lock(&p->lock);
    while (atomic_load(&p->messages) < n &&
           pthread_cond_timedwait(&p->cond, &p->lock, &dl) == 0)
        ;
    got = atomic_load(&p->messages);
    pthread_mutex_unlock(&p->lock);
    return got;
}

static const rp_reader_ops ops_all = { .message = on_message, .failed = on_failed };
static const rp_reader_ops ops_precopy = { .failed = on_failed };

static void raw(int fd, const void *buf, size_t len)
{
    assert_int_equal(write(fd, buf, len), (ssize_t)len);
}

static void test_shut_verdicts(void **state)
{
    peer p;
    lm_error err = { 0 };
    uint32_t status = 99;
    int st;

    (void)state;
    /* SHUT(0) after PONGs: the verdict, and no failure */
    peer_open(&p);
    rp_reader *r = rp_reader_start(p.fds[0], &ops_precopy, &p, &err);
    assert_non_null(r);
    rp_writer *w = rp_writer_new(p.fds[1]);
    assert_int_equal(rp_send_u32(w, WIRE_RP_PONG, 7), 0);
    assert_int_equal(rp_reader_check(r, &st, &err), 0);
    assert_int_equal(rp_send_u32(w, WIRE_RP_SHUT, 0), 0);
    assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), 0);
    assert_int_equal(status, 0);
    /* a verdict before the stream ended is an error when checked */
    assert_int_equal(rp_reader_check(r, &st, &err), -EPROTO);
    assert_int_equal(st, 0);
    assert_non_null(strstr(err.msg, "before the stream ended"));
    rp_reader_stop(r);
    rp_writer_free(w);
    assert_int_equal(p.failed, 0);
    peer_close(&p);

    /* SHUT(1): the destination failed */
    peer_open(&p);
    r = rp_reader_start(p.fds[0], &ops_precopy, &p, &err);
    w = rp_writer_new(p.fds[1]);
    assert_int_equal(rp_send_u32(w, WIRE_RP_SHUT, 1), 0);
    assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), 0);
    assert_int_equal(status, 1);
    assert_int_equal(rp_reader_check(r, &st, &err), -EIO);
    assert_int_equal(st, 1);
    assert_non_null(strstr(err.msg, "destination failed to load"));
    rp_reader_stop(r);
    rp_writer_free(w);
    peer_close(&p);
}

static void test_silence_and_close(void **state)
{
    peer p;
    lm_error err = { 0 };
    uint32_t status;

    (void)state;
    /* no answer: a bounded wait */
    peer_open(&p);
    rp_reader *r = rp_reader_start(p.fds[0], &ops_precopy, &p, &err);
    assert_int_equal(rp_reader_wait_shut(r, 50, &status, &err), -ETIMEDOUT);
    assert_non_null(strstr(err.msg, "did not confirm within 50 ms"));
    /* the peer closes without a verdict: failed once, waiter told */
    close(p.fds[1]);
    p.fds[1] = -1;
    assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), -ECONNRESET);
    assert_non_null(strstr(err.msg, "closed the connection without confirming"));
    rp_reader_stop(r);
    assert_int_equal(p.failed, 1);
    peer_close(&p);
}

static void test_bad_messages(void **state)
{
    static const uint8_t unknown[] = { 0, 9, 0, 0 };
    static const uint8_t bad_len[] = { 0, 1, 0, 3, 0, 0, 0 };     /* SHUT is 4 bytes */
    static const uint8_t too_long[] = { 0, 3, 0x02, 0x01 };         /* 513 > 512 */
    static const uint8_t req[] = { 0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0 };
    const uint8_t *cases[] = { unknown, bad_len, too_long };
    const size_t lens[] = { sizeof(unknown), sizeof(bad_len), sizeof(too_long) };
    lm_error err = { 0 };
    uint32_t status;
    peer p;

    (void)state;
    for (size_t i = 0; i < 3; i++) {
        peer_open(&p);
        rp_reader *r = rp_reader_start(p.fds[0], &ops_all, &p, &err);
        raw(p.fds[1], cases[i], lens[i]);
        assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), -EPROTO);
        assert_non_null(strstr(err.msg, "bad message type"));
        rp_reader_stop(r);
        assert_int_equal(p.failed, 1);
        peer_close(&p);
    }
    /* precopy takes no page request */
    peer_open(&p);
    rp_reader *r = rp_reader_start(p.fds[0], &ops_precopy, &p, &err);
    raw(p.fds[1], req, sizeof(req));
    assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "unexpected message type 4 (REQ_PAGES)"));
    rp_reader_stop(r);
    peer_close(&p);
    /* a callback takes it, then refuses the next one */
    peer_open(&p);
    r = rp_reader_start(p.fds[0], &ops_all, &p, &err);
    raw(p.fds[1], req, sizeof(req));
    rp_writer *w = rp_writer_new(p.fds[1]);
    assert_int_equal(rp_send_u32(w, WIRE_RP_PONG, 1), 0);
    assert_int_equal(wait_messages(&p, 2), 2);
    p.refuse = -EINVAL;
    raw(p.fds[1], req, sizeof(req));
    assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "refused"));
    rp_reader_stop(r);
    rp_writer_free(w);
    peer_close(&p);
}

/* Several threads send through one writer: every message arrives whole. */
typedef struct sender {
    rp_writer *w;
    uint32_t base;
} sender;

#define PER_THREAD 2000

static void *send_many(void *arg)
{
    sender *s = arg;

    for (uint32_t i = 0; i < PER_THREAD; i++)
        if (rp_send_u32(s->w, WIRE_RP_PONG, s->base + i))
            return (void *)1;
    return NULL;
}

static void test_writer_threads(void **state)
{
    peer p;
    pthread_t t[4];
    sender s[4];
    uint8_t msg[8];
    int seen[4] = { 0 };

    (void)state;
    peer_open(&p);
    rp_writer *w = rp_writer_new(p.fds[1]);
    for (int i = 0; i < 4; i++) {
        s[i] = (sender){ w, (uint32_t)i << 24 };
        assert_int_equal(pthread_create(&t[i], NULL, send_many, &s[i]), 0);
    }
    for (int n = 0; n < 4 * PER_THREAD; n++) {
        size_t got = 0;
        while (got < sizeof(msg)) {
            ssize_t r = read(p.fds[0], msg + got, sizeof(msg) - got);
            assert_true(r > 0);
            got += (size_t)r;
        }
        assert_int_equal(msg[0] << 8 | msg[1], WIRE_RP_PONG);
        assert_int_equal(msg[2] << 8 | msg[3], 4);
        uint32_t v = wire_be32(msg + 4);
        int who = (int)(v >> 24);
        assert_true(who < 4);
        assert_int_equal(v & 0xffffff, (uint32_t)seen[who]);   /* in order, per thread */
        seen[who]++;
    }
    for (int i = 0; i < 4; i++) {
        void *ret;
        pthread_join(t[i], &ret);
        assert_null(ret);
    }
    /* not a valid message: refused before anything is written */
    assert_int_equal(rp_send(w, 99, NULL, 0), -EINVAL);
    assert_int_equal(rp_send(w, WIRE_RP_SHUT, "ab", 2), -EINVAL);
    rp_writer_free(w);
    peer_close(&p);
}

/* RECV_BITMAP: the trailer after the message, whole or in single bytes,
 * handed to the bitmap callback once; a size that is not the block's, an
 * unknown block, or no recovery at all (no bitmap op) stop the reader. */
static uint64_t bm_got;
static uint8_t bm_last[64];

static int on_bitmap_bytes(void *opaque, const uint8_t *msg, uint16_t len, uint64_t *bytes,
                           lm_error *err)
{
    (void)opaque;
    if (len != 7 || msg[0] != 6 || memcmp(msg + 1, "pc.ram", 6))
        return error_set(err, -EPROTO, "RECV_BITMAP for an unknown block");
    *bytes = 24;
    return 0;
}

static int on_bitmap(void *opaque, const uint8_t *msg, uint16_t len, const uint8_t *trailer,
                     uint64_t bytes, lm_error *err)
{
    peer *p = opaque;

    (void)msg;
    (void)len;
    (void)err;
    memcpy(bm_last, trailer, bytes);
    bm_got = bytes;
    return on_message(p, WIRE_RP_RECV_BITMAP, NULL, 0, err);
}

static const rp_reader_ops ops_recover = { .message = on_message, .failed = on_failed,
                                           .bitmap_bytes = on_bitmap_bytes,
                                           .bitmap = on_bitmap };

static void trailer24(uint8_t *t, uint64_t size)
{
    memset(t, 0, 24);
    for (int i = 0; i < 8; i++) {
        t[i] = (uint8_t)(size >> (56 - 8 * i));
        t[16 + i] = (uint8_t)(0x0123456789abcdefULL >> (56 - 8 * i));
    }
    t[8] = 0x5a;
}

static void test_recv_bitmap_trailer(void **state)
{
    static const uint8_t name[] = { 6, 'p', 'c', '.', 'r', 'a', 'm' };
    uint8_t t[24], wire[4 + 7 + 24];
    lm_error err = { 0 };
    uint32_t status;
    peer p;

    (void)state;
    trailer24(t, 8);
    /* whole, then a PONG after it: both taken, in order */
    peer_open(&p);
    rp_reader *r = rp_reader_start(p.fds[0], &ops_recover, &p, &err);
    rp_writer *w = rp_writer_new(p.fds[1]);
    assert_int_equal(rp_send_tail(w, WIRE_RP_PONG, "\0\0\0\1", 4, t, 24), -EINVAL);
    assert_int_equal(rp_send_tail(w, WIRE_RP_RECV_BITMAP, name, 7, NULL, 0), -EINVAL);
    assert_int_equal(rp_send_tail(w, WIRE_RP_RECV_BITMAP, name, 7, t, 24), 0);
    assert_int_equal(rp_send_u32(w, WIRE_RP_PONG, 3), 0);
    assert_int_equal(wait_messages(&p, 2), 2);
    assert_int_equal(bm_got, 24);
    assert_memory_equal(bm_last, t, 24);
    assert_int_equal(p.last_type, WIRE_RP_PONG);
    assert_int_equal(p.failed, 0);
    rp_reader_stop(r);
    peer_close(&p);
    rp_writer_free(w);

    /* one byte at a time */
    peer_open(&p);
    bm_got = 0;
    r = rp_reader_start(p.fds[0], &ops_recover, &p, &err);
    wire[0] = 0;
    wire[1] = WIRE_RP_RECV_BITMAP;
    wire[2] = 0;
    wire[3] = 7;
    memcpy(wire + 4, name, 7);
    memcpy(wire + 11, t, 24);
    for (size_t i = 0; i < sizeof(wire); i++)
        raw(p.fds[1], wire + i, 1);
    assert_int_equal(wait_messages(&p, 1), 1);
    assert_int_equal(bm_got, 24);
    rp_reader_stop(r);
    peer_close(&p);

    /* a size that is not the block's: refused before the rest is awaited */
    peer_open(&p);
    r = rp_reader_start(p.fds[0], &ops_recover, &p, &err);
    trailer24(t, 1u << 30);
    memcpy(wire + 11, t, 24);
    raw(p.fds[1], wire, 4 + 7 + 8);
    assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "announces a bitmap of 1073741824 bytes, the block's is 8"));
    rp_reader_stop(r);
    assert_int_equal(p.failed, 1);
    peer_close(&p);

    /* an unknown block */
    peer_open(&p);
    r = rp_reader_start(p.fds[0], &ops_recover, &p, &err);
    wire[5] = 'x';
    raw(p.fds[1], wire, 4 + 7);
    assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "unknown block"));
    rp_reader_stop(r);
    peer_close(&p);

    /* no recovery going on: RECV_BITMAP is unexpected */
    peer_open(&p);
    r = rp_reader_start(p.fds[0], &ops_all, &p, &err);
    raw(p.fds[1], wire, 4 + 7);
    assert_int_equal(rp_reader_wait_shut(r, T_MS, &status, &err), -EPROTO);
    assert_non_null(strstr(err.msg, "unexpected message type 5 (RECV_BITMAP)"));
    rp_reader_stop(r);
    peer_close(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shut_verdicts),
        cmocka_unit_test(test_silence_and_close),
        cmocka_unit_test(test_bad_messages),
        cmocka_unit_test(test_writer_threads),
        cmocka_unit_test(test_recv_bitmap_trailer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
