/*
 * CPR: fd-backed RAM blocks, the checks of each mode, and cpr-transfer's
 * preamble, in which the source hands each block's descriptor to the
 * destination over the main unix connection.  See cpr.h for the design and
 * docs/format.md (section 8) for the bytes.
 *
 * The preamble, before the QEVM header, on the main connection:
 *
 *   source -> destination  one sendmsg: be32 "LCPR", be32 version 1,
 *                          be32 n, then per block counted idstr, be64
 *                          length, be64 offset in its descriptor; the n
 *                          descriptors ride on it in one SCM_RIGHTS message,
 *                          in block order.
 *   destination -> source  be32 "LCPR", be32 status (0: mapped, go on;
 *                          else an errno), be16 len, len bytes of message.
 *
 * Both ends check first that the peer runs as the same uid or as root
 * (SO_PEERCRED): the socket is owner-only already (transport.c), this also
 * covers a socket file someone else created at the path the source uses.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <endian.h>

#include "cpr/cpr.h"
#include "util/error.h"
#include "util/time.h"

/* ------------------------------------------------------------ registration */

/* memfd (or unlinked: gone with its last holder), or a named file. */
static int cpr_classify(int fd, uint64_t *size, lm_error *err)
{
    char proc[64], target[4096];
    struct stat st;
    ssize_t n;

    if (fstat(fd, &st) < 0)
        return error_set_errno(err, -errno, "fstat of the RAM descriptor");
    *size = S_ISREG(st.st_mode) ? (uint64_t)st.st_size : UINT64_MAX;
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    n = readlink(proc, target, sizeof(target) - 1);
    if (n > 0) {
        target[n] = 0;
        if (!strncmp(target, "/memfd:", 7))
            return CPR_BACKING_MEMFD;
    }
    if (S_ISREG(st.st_mode) && st.st_nlink == 0)
        return CPR_BACKING_MEMFD;
    return CPR_BACKING_FILE;
}

int cpr_register(ram_state *r, int i, int fd, uint64_t offset, lm_error *err)
{
    ramblock *b = &r->blocks[i];
    uint64_t size;
    int kind;

    if (offset % RAM_PAGE_SIZE)
        return error_set(err, -EINVAL, "RAM block '%s': descriptor offset %" PRIu64 " is not "
                         "page aligned", b->idstr, offset);
    if (fd < 0) {
        if (offset)
            return error_set(err, -EINVAL, "RAM block '%s': an offset needs a descriptor",
                             b->idstr);
        b->backing = CPR_BACKING_AWAIT;
        return 0;
    }
    kind = cpr_classify(fd, &size, err);
    if (kind < 0)
        return kind;
    if (size != UINT64_MAX && (offset > size || size - offset < b->length))
        return error_set(err, -EINVAL, "RAM block '%s': its descriptor holds %" PRIu64 " bytes, "
                         "not the %" PRIu64 " from offset %" PRIu64 " the block needs",
                         b->idstr, size, b->length, offset);
    b->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (b->fd < 0) {
        b->fd = -1;
        return error_set_errno(err, -errno, "RAM block '%s': dup of its descriptor", b->idstr);
    }
    b->fd_offset = offset;
    b->backing = kind;
    return 0;
}

void cpr_release(ram_state *r)
{
    for (int i = 0; i < r->nblocks; i++) {
        if (r->blocks[i].fd >= 0)
            close(r->blocks[i].fd);
        r->blocks[i].fd = -1;
    }
}

/* ------------------------------------------------------------ checks */

static const char *const mode_names[] = { "normal", "cpr-reboot", "cpr-transfer" };

int cpr_check(ram_state *r, const cpr_config *c, lm_error *err)
{
    const char *mode = mode_names[c->mode];

    if (c->mode == CPR_MODE_TRANSFER && c->uri_kind != URI_UNIX)
        return error_set(err, -EINVAL, "mode cpr-transfer hands RAM over on a unix: socket; "
                         "use a unix: URI");
    if (c->mode == CPR_MODE_REBOOT && c->uri_kind != URI_FILE)
        return error_set(err, -EINVAL, "mode cpr-reboot saves to a file (the two processes "
                         "do not run together); use a file: URI");
    if (c->mode != CPR_MODE_NORMAL && c->conflict)
        return error_set(err, -EINVAL, "mode %s cannot be combined with the %s capability",
                         mode, c->conflict);
    if (c->mode == CPR_MODE_NORMAL && c->ignore_shared && c->conflict)
        return error_set(err, -EINVAL, "x-ignore-shared cannot be combined with the %s "
                         "capability", c->conflict);
    r->ignore_shared = c->ignore_shared;
    for (int i = 0; i < r->nblocks; i++) {
        ramblock *b = &r->blocks[i];

        if (b->backing == CPR_BACKING_AWAIT && !(c->incoming && c->mode == CPR_MODE_TRANSFER))
            return error_set(err, -EINVAL, "RAM block '%s' has no memory of its own (it waits "
                             "for a cpr-transfer source's): set mode cpr-transfer", b->idstr);
        switch (c->mode) {
        case CPR_MODE_NORMAL:
            /* QEMU's x-ignore-shared leaves named shared files in place */
            b->ignored = c->ignore_shared && b->backing == CPR_BACKING_FILE;
            break;
        case CPR_MODE_REBOOT:
            if (b->backing == CPR_BACKING_ANON)
                return error_set(err, -EINVAL, "mode cpr-reboot: RAM block '%s' is anonymous "
                                 "memory, which dies with this process; put guest RAM in a "
                                 "shared file (e.g. --mem-backend file:/dev/shm/NAME)",
                                 b->idstr);
            if (b->backing == CPR_BACKING_MEMFD)
                return error_set(err, -EINVAL, "mode cpr-reboot: RAM block '%s' is in a memfd "
                                 "(or an unlinked file), which dies with this process; put "
                                 "guest RAM in a shared file (e.g. --mem-backend "
                                 "file:/dev/shm/NAME)", b->idstr);
            b->ignored = c->ignore_shared;
            break;
        case CPR_MODE_TRANSFER:
            if (b->backing == CPR_BACKING_ANON)
                return error_set(err, -EINVAL, "mode cpr-transfer: RAM block '%s' is %s; "
                                 "register it with lm_ram_register_fd (--mem-backend memfd "
                                 "or file:PATH)", b->idstr,
                                 c->incoming ? "memory of its own, but a cpr-transfer "
                                               "destination maps the source's"
                                             : "anonymous memory, which has no descriptor "
                                               "to hand over");
            if (c->incoming && b->backing != CPR_BACKING_AWAIT)
                return error_set(err, -EINVAL, "mode cpr-transfer: destination RAM block '%s' "
                                 "has memory of its own; register it with fd -1 (reserved "
                                 "address space) to map the source's", b->idstr);
            b->ignored = true;      /* as QEMU 10: every block stays in place */
            break;
        }
    }
    return 0;
}

/* ------------------------------------------------------------ I/O */

int cpr_check_peer(int fd, const char *what, lm_error *err)
{
    struct ucred cr;
    socklen_t len = sizeof(cr);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0)
        return error_set_errno(err, -errno, "cpr-transfer: cannot learn who the %s is "
                               "(SO_PEERCRED)", what);
    if (cr.uid != geteuid() && cr.uid != 0)
        return error_set(err, -EPERM, "cpr-transfer: the %s (pid %d) runs as uid %u; only "
                         "uid %u (ours) or root may have the guest's memory", what,
                         (int)cr.pid, (unsigned)cr.uid, (unsigned)geteuid());
    return 0;
}

/* Wait until fd is ready for `events`; -ECANCELED / -ETIMEDOUT. */
static int cpr_wait(int fd, short events, int cancel_fd, int64_t deadline, const char *what,
                    lm_error *err)
{
    for (;;) {
        struct pollfd p[2] = { { .fd = fd, .events = events }, { .fd = cancel_fd, .events = POLLIN } };
        int64_t left = deadline - time_now_ms();
        int n;

        if (left <= 0)
            return error_set(err, -ETIMEDOUT, "cpr-transfer: no %s within %d s", what,
                             CPR_TIMEOUT_MS / 1000);
        n = poll(p, cancel_fd >= 0 ? 2 : 1, (int)left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return error_set_errno(err, -errno, "cpr-transfer: poll");
        if (cancel_fd >= 0 && (p[1].revents & POLLIN))
            return error_set(err, -ECANCELED, "migration cancelled");
        if (p[0].revents)
            return 0;
    }
}

/* Read exactly len bytes (the first recvmsg may bring descriptors). */
static int cpr_read(int fd, void *buf, size_t len, int cancel_fd, int64_t deadline,
                    int *fds, int *nfds, const char *what, lm_error *err)
{
    size_t got = 0;

    while (got < len) {
        union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * RAM_MAX_BLOCKS)]; } ctl;
        struct iovec iov = { (char *)buf + got, len - got };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        ssize_t n;
        int ret;

        if (fds) {
            mh.msg_control = ctl.buf;
            mh.msg_controllen = sizeof(ctl.buf);
        }
        if ((ret = cpr_wait(fd, POLLIN, cancel_fd, deadline, what, err)))
            return ret;
        n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n < 0)
            return error_set_errno(err, -errno, "cpr-transfer: reading the %s", what);
        for (struct cmsghdr *c = fds ? CMSG_FIRSTHDR(&mh) : NULL; c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int *in = (int *)CMSG_DATA(c);
            for (int j = 0; j < k; j++) {
                if (*nfds < RAM_MAX_BLOCKS)
                    fds[(*nfds)++] = in[j];
                else
                    close(in[j]);
            }
        }
        if (fds && (mh.msg_flags & MSG_CTRUNC))
            return error_set(err, -EPROTO, "cpr-transfer: more descriptors than %d RAM blocks",
                             RAM_MAX_BLOCKS);
        if (n == 0)
            return error_set(err, -ECONNRESET, "cpr-transfer: the peer closed the connection "
                             "before the whole %s", what);
        got += (size_t)n;
    }
    return 0;
}

static int cpr_write(int fd, const void *buf, size_t len, const int *fds, int nfds,
                     int cancel_fd, int64_t deadline, const char *what, lm_error *err)
{
    size_t put = 0;

    while (put < len) {
        union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * RAM_MAX_BLOCKS)]; } ctl;
        struct iovec iov = { (char *)buf + put, len - put };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        ssize_t n;
        int ret;

        if (put == 0 && nfds > 0) {     /* the descriptors ride on the first byte */
            memset(&ctl, 0, sizeof(ctl));
            mh.msg_control = ctl.buf;
            mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
            struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
            memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
        }
        if ((ret = cpr_wait(fd, POLLOUT, cancel_fd, deadline, what, err)))
            return ret;
        n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n < 0)
            return error_set_errno(err, -errno, "cpr-transfer: sending the %s", what);
        put += (size_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------ source */

static void put_be32(uint8_t **p, uint32_t v) { v = htobe32(v); memcpy(*p, &v, 4); *p += 4; }
static void put_be64(uint8_t **p, uint64_t v) { v = htobe64(v); memcpy(*p, &v, 8); *p += 8; }
static uint32_t get_be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get_be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

int cpr_send(ram_state *r, int fd, int cancel_fd, lm_error *err)
{
    enum { CPR_ANNOUNCE_MAX = 12 + RAM_MAX_BLOCKS * (1 + 255 + 16) };
    uint8_t *p, reply[10];
    char msg[CPR_MSG_MAX + 1];
    int fds[RAM_MAX_BLOCKS], ret;
    int64_t deadline = time_now_ms() + CPR_TIMEOUT_MS;
    uint32_t status;
    uint16_t len;

    uint8_t *out = malloc(CPR_ANNOUNCE_MAX);
    if (!out)
        return error_set(err, -ENOMEM, "cpr-transfer: out of memory");
    p = out;
    if ((ret = cpr_check_peer(fd, "destination", err)))
        goto out;
    put_be32(&p, CPR_MAGIC);
    put_be32(&p, CPR_VERSION);
    put_be32(&p, (uint32_t)r->nblocks);
    for (int i = 0; i < r->nblocks; i++) {
        const ramblock *b = &r->blocks[i];
        size_t n = strlen(b->idstr);

        *p++ = (uint8_t)n;
        memcpy(p, b->idstr, n);
        p += n;
        put_be64(&p, b->length);
        put_be64(&p, b->fd_offset);
        fds[i] = b->fd;     /* cpr_check: every block has one in this mode */
    }
    if ((ret = cpr_write(fd, out, (size_t)(p - out), fds, r->nblocks, cancel_fd, deadline,
                         "RAM descriptors", err)))
        goto out;
    if ((ret = cpr_read(fd, reply, sizeof(reply), cancel_fd, deadline, NULL, NULL,
                        "destination's answer to the RAM descriptors", err)))
        goto out;
    status = get_be32(reply + 4);
    len = (uint16_t)(reply[8] << 8 | reply[9]);
    if (get_be32(reply) != CPR_MAGIC || len > CPR_MSG_MAX) {
        ret = error_set(err, -EPROTO, "cpr-transfer: the destination answered the RAM "
                        "descriptors with something else (not a livemig cpr-transfer "
                        "destination?)");
        goto out;
    }
    if ((ret = cpr_read(fd, msg, len, cancel_fd, deadline, NULL, NULL, "destination's answer",
                        err)))
        goto out;
    msg[len] = 0;
    if (status)
        ret = error_set(err, status > 4095 ? -EPROTO : -(int)status, "cpr-transfer: the "
                        "destination refused the guest's memory: %s", msg);
out:
    free(out);
    return ret;
}

/* ------------------------------------------------------------ destination */

/* Put the reservation back over a block we mapped. */
static void cpr_unmap(ramblock *b)
{
    void *p = mmap(b->host, b->length, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);

    if (p == MAP_FAILED)    /* cannot happen for a range we own; never leave it mapped */
        abort();
    if (b->fd >= 0)
        close(b->fd);
    b->fd = -1;
    b->fd_offset = 0;
    b->backing = CPR_BACKING_AWAIT;
}

void cpr_incoming_failed(ram_state *r)
{
    for (int i = 0; i < r->nblocks; i++)
        if (r->blocks[i].ignored && r->blocks[i].fd >= 0)
            cpr_unmap(&r->blocks[i]);
}

/* Check one announced block against ours and map its descriptor. */
static int cpr_map(ram_state *r, const char *name, uint64_t length, uint64_t offset, int fd,
                   lm_error *err)
{
    int i = ram_find(r, name), kind;
    uint64_t size;
    ramblock *b;

    if (i < 0)
        return error_set(err, -ENOENT, "RAM block '%s' of the source is unknown here", name);
    b = &r->blocks[i];
    if (b->backing != CPR_BACKING_AWAIT)
        return error_set(err, -EINVAL, "RAM block '%s' announced twice", name);
    if (length != b->length)
        return error_set(err, -EINVAL, "RAM block '%s' is %" PRIu64 " bytes at the source but "
                         "%" PRIu64 " here", name, length, b->length);
    if (offset % RAM_PAGE_SIZE)
        return error_set(err, -EINVAL, "RAM block '%s': offset %" PRIu64 " is not page "
                         "aligned", name, offset);
    kind = cpr_classify(fd, &size, err);
    if (kind < 0)
        return kind;
    if (size != UINT64_MAX && (offset > size || size - offset < length))
        return error_set(err, -EINVAL, "RAM block '%s': the descriptor holds %" PRIu64 " bytes, "
                         "fewer than offset %" PRIu64 " + length %" PRIu64, name, size, offset,
                         length);
    if (mmap(b->host, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
             (off_t)offset) == MAP_FAILED)
        return error_set_errno(err, -errno, "RAM block '%s': cannot map the source's "
                               "memory", name);
    b->fd = fd;
    b->fd_offset = offset;
    b->backing = kind;
    return 0;
}

int cpr_receive(ram_state *r, int fd, int cancel_fd, lm_error *err)
{
    int64_t deadline = time_now_ms() + CPR_TIMEOUT_MS;
    int fds[RAM_MAX_BLOCKS], nfds = 0, used = 0, ret;
    uint8_t head[12], rec[16], reply[10 + CPR_MSG_MAX];
    char name[256];
    uint32_t n = 0;
    lm_error verdict = { 0 };

    if ((ret = cpr_check_peer(fd, "source", err)))
        return ret;     /* a stranger: not even an answer */
    if ((ret = cpr_read(fd, head, sizeof(head), cancel_fd, deadline, fds, &nfds,
                        "RAM descriptors", err)))
        goto out;
    if (get_be32(head) != CPR_MAGIC || get_be32(head + 4) != CPR_VERSION) {
        ret = error_set(err, -EPROTO, "cpr-transfer: the source did not start with the RAM "
                        "descriptors (magic 0x%08x version %u; is its mode cpr-transfer?)",
                        get_be32(head), get_be32(head + 4));
        goto out;
    }
    n = get_be32(head + 8);
    if (n > RAM_MAX_BLOCKS || (int)n != nfds) {
        ret = error_set(err, -EPROTO, "cpr-transfer: %u RAM blocks announced with %d "
                        "descriptors", n, nfds);
        goto out;
    }
    /* Read the whole announcement before judging it, so the source always
     * gets an answer it can read. */
    struct { char name[256]; uint64_t length, offset; } *blk = calloc(n ? n : 1, sizeof(*blk));
    if (!blk) {
        ret = error_set(err, -ENOMEM, "cpr-transfer: out of memory");
        goto out;
    }
    for (uint32_t i = 0; i < n && !ret; i++) {
        uint8_t l;
        if (!(ret = cpr_read(fd, &l, 1, cancel_fd, deadline, NULL, NULL, "RAM block list", err)) &&
            !(ret = cpr_read(fd, name, l, cancel_fd, deadline, NULL, NULL, "RAM block list", err)) &&
            !(ret = cpr_read(fd, rec, 16, cancel_fd, deadline, NULL, NULL, "RAM block list", err))) {
            name[l] = 0;
            snprintf(blk[i].name, sizeof(blk[i].name), "%s", name);
            blk[i].length = get_be64(rec);
            blk[i].offset = get_be64(rec + 8);
        }
    }
    if (!ret) {
        for (uint32_t i = 0; i < n; i++) {
            used++;     /* fds[i] is the block's on success, closed here otherwise */
            if (cpr_map(r, blk[i].name, blk[i].length, blk[i].offset, fds[i], &verdict)) {
                close(fds[i]);
                break;
            }
        }
        for (int i = 0; i < r->nblocks && !verdict.code; i++)
            if (r->blocks[i].backing == CPR_BACKING_AWAIT)
                error_set(&verdict, -EINVAL, "RAM block '%s' of this side is not among the "
                          "source's", r->blocks[i].idstr);
        if (verdict.code)
            cpr_incoming_failed(r);     /* what was mapped goes again */
    }
    free(blk);
    if (ret)
        goto out;
    {
        uint8_t *p = reply;
        size_t len = verdict.code ? strlen(verdict.msg) : 0;
        if (len > CPR_MSG_MAX)
            len = CPR_MSG_MAX;
        put_be32(&p, CPR_MAGIC);
        put_be32(&p, verdict.code ? (uint32_t)-verdict.code : 0);
        *p++ = (uint8_t)(len >> 8);
        *p++ = (uint8_t)len;
        memcpy(p, verdict.msg, len);
        ret = cpr_write(fd, reply, 10 + len, NULL, 0, cancel_fd, deadline, "answer", err);
    }
    if (verdict.code) {
        *err = verdict;
        error_prefix(err, "cpr-transfer: refused the source's memory");
        ret = verdict.code;
    } else if (ret) {
        cpr_incoming_failed(r);
    }
out:
    for (int i = used; i < nfds; i++)
        close(fds[i]);
    return ret;
}
