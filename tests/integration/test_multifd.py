#!/usr/bin/env python3
"""multifd: RAM over parallel channels, end to end, with fault injection.

Every case starts real `livemig guest` processes (the source and one or more
destinations started with `--incoming defer`), gives both sides the same
`multifd` capability and parameters, and demands the full end state.

  matrix     1, 2, 4 and 8 channels over tcp and unix, idle and dirtying
             guests, each multifd-compression (none, zlib, zstd) and each
             zero-page-detection mode, but not their cross product.  Checked:
             source completed / postmigrate, ram.multifd-bytes > 0 and what
             the settings imply (compression shrinks text, zero pages are
             not sent in full unless zero-page-detection=none); destination
             completed, the cached arrival check and a fresh x-guest-verify
             both 0 bad, running, its writers progress.
  order      a proxy between source and destination forwards the source's
             connections in reverse or random order (channels before the
             main stream), so the destination must classify each by its
             first bytes; the guest must still verify.
  refusals   a fake source (raw sockets) connects channels in reverse order
             before a garbage / truncated main stream, and channels with a
             wrong magic, version or UUID, a duplicate id or an id out of
             range: the destination exits non-zero, never runs, and its
             stderr names the problem.
  faults     LIVEMIG_FAULT=SIDE:POINT:CHANNEL for every point on both sides
             (src: connect, handshake, packet, sync; dst: handshake, packet,
             sync), each twice with 2-4 channels and another channel: the
             source ends `failed` within FAIL_BOUND_S with an error-desc that
             names the channel and the injection where the source itself
             fails (connect, packet, sync; any error-desc otherwise); the
             faulted process logs the injection; the source still runs,
             writes and verifies, has as many threads as before and no new
             descriptor but the two lasting ones (see LASTING); the
             destination exits non-zero without running, naming its own
             injected fault; and the same source then migrates to a fresh
             destination, leaving no more descriptors than before.  Then
             src:packet and dst:packet again with LIVEMIG_FAULT's 4th field
             (SIDE:POINT:CHANNEL:N, the N-th hit) on a 256 MiB guest, N a
             quarter into the channel's share of the first pass: the same
             checks, and the faulted process logs that very hit; the
             destination's reason names a packet number inside the first
             pass (query-migrate has no ram figures once failed).
  network    a proxy cuts a channel (in the middle of a packet, of a zstd
             payload) or the main stream mid-migration, or stalls a channel
             and then the source is cancelled (must end `cancelled`), the
             destination is cancelled or killed, or the source is killed:
             the same checks as for the faults, without a hang.
  bandwidth  max-bandwidth must bound a multifd migration, and zstd on text
             must then finish first.
  stress     20 migrations back to back, each to a fresh destination with a
             random channel count (1-8) and compression (none / zstd), the
             guest travelling along the chain, every hop verified
             (LMTEST_SEED reproduces the draw).

Harness: lmtest.py (every wait bounded, watchdog per case).  Helpers this
file needs that the harness lacks (a guest started with an environment
variable, the proxy, raw handshakes) are defined here.
"""

import contextlib
import os
import random
import re
import socket
import struct
import threading
import time

import lmtest
from lmtest import check_dst_failed
from lmtest import (PAGE_SIZE, TestFailure, check, check_destination,
                    check_runstate, check_source_done, check_verified,
                    check_writes_advance, describe_exit, free_tcp_port,
                    mem_bytes, note, ram, test, wait_incoming_exit,
                    wait_listening, wait_migration, wait_until)

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE
DIRTY_RATE = 2000            # pages/s: low, so every run converges quickly
MF_MAGIC = 0x11223344
MF_VERSION = 1
MF_PACKET_PAGES = 128        # pages in a full multifd packet
FAIL_BOUND_S = 15            # a faulted migration must end within this


# ----------------------------------------------------------------- helpers

def tcp_uri():
    return "tcp:127.0.0.1:%d" % free_tcp_port("127.0.0.1")


def unix_uri(env, name="mig.sock"):
    return "unix:" + env.path(name)


@contextlib.contextmanager
def fault_env(spec):
    """LIVEMIG_FAULT=spec for the children started inside the block only
    (lmtest.spawn passes our environment on; the harness has no env=)."""
    old = os.environ.get("LIVEMIG_FAULT")
    if spec:
        os.environ["LIVEMIG_FAULT"] = spec
    else:
        os.environ.pop("LIVEMIG_FAULT", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LIVEMIG_FAULT", None)
        else:
            os.environ["LIVEMIG_FAULT"] = old


def configure(guests, channels, compression=None, zero=None):
    """The same capability and parameters on every side, as QEMU needs."""
    params = {"multifd_channels": channels}
    if compression:
        params["multifd_compression"] = compression
    if zero:
        params["zero_page_detection"] = zero
    for g in guests:
        g.set_caps(multifd=True)
        g.set_params(**params)
        got = g.cmd("query-migrate-parameters")
        check(got.get("multifd-channels") == channels, "%s: multifd-channels %r after set %d",
              g.name, got.get("multifd-channels"), channels)
        if compression:
            check(got.get("multifd-compression") == compression,
                  "%s: multifd-compression %r after set %r", g.name,
                  got.get("multifd-compression"), compression)


def incoming(dst, uri):
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)


def new_dst(env, name, channels, compression=None, zero=None, uri=None, dirty_rate=None,
            fault=None, mem=MEM):
    with fault_env(fault):
        dst = env.guest(name, mem=mem, incoming="defer", dirty_rate=dirty_rate)
    configure([dst], channels, compression, zero)
    if uri:
        incoming(dst, uri)
    return dst


def summary(info):
    note("total-time %s ms, downtime %s ms, transferred %d KiB, multifd-bytes %d KiB, normal %d, "
         "duplicate %d, dirty-sync-count %d" % (
             info.get("total-time"), info.get("downtime"), ram(info, "transferred") >> 10,
             ram(info, "multifd-bytes") >> 10, ram(info, "normal"), ram(info, "duplicate"),
             ram(info, "dirty-sync-count")))


def migrate_ok(src, dst, uri, dirtying, timeout=90, pages=PAGES):
    """Migrate src to dst (already listening on uri) and check both ends
    (guests of `pages` pages)."""
    w0 = src.info()["writes"]
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=timeout)
    summary(info)
    check_source_done(src, info)
    check(ram(info, "multifd-bytes") > 0, "multifd on, but query-migrate ram.multifd-bytes is %r",
          ram(info, "multifd-bytes"))
    check(ram(info, "multifd-bytes") <= ram(info, "transferred"),
          "multifd-bytes %d > transferred %d", ram(info, "multifd-bytes"),
          ram(info, "transferred"))
    sent = ram(info, "normal") + ram(info, "duplicate")
    check(sent >= pages, "source sent %d pages (normal+duplicate), the guest has %d", sent, pages)
    if dirtying:
        check(src.info()["writes"] > w0, "the source did not write during the migration")
    check_destination(dst, pages, dirtying=dirtying)
    return info


# ----------------------------------------------------------------- matrix

def matrix(env, channels, transport, dirty, compression="none", fill=None, zero=None):
    uri = tcp_uri() if transport == "tcp" else unix_uri(env)
    rate = DIRTY_RATE if dirty else 0
    # The destination gets the same workload: its writers start once it
    # runs, which is how check_destination() sees that it does.
    dst = new_dst(env, "dst", channels, compression, zero, uri, dirty_rate=rate)
    src = env.guest("src", mem=MEM, dirty_rate=rate, fill=fill)
    configure([src], channels, compression, zero)
    if dirty:
        wait_until(lambda: src.info()["writes"] >= 500, 30, "the source's writers to dirty")
    info = migrate_ok(src, dst, uri, dirty)
    mfb = ram(info, "multifd-bytes")
    normal_bytes = ram(info, "normal") * PAGE_SIZE
    if compression in ("zlib", "zstd") and fill == "text":
        # Text pages compress ~3x; the wire must show it.
        check(mfb < normal_bytes * 0.6, "%s on text: multifd-bytes %d for %d bytes of normal "
              "pages: not compressed", compression, mfb, normal_bytes)
        note("%s: %.2fx on the wire" % (compression, normal_bytes / mfb))
    elif compression == "none" and zero != "legacy":
        check(mfb >= normal_bytes, "no compression: multifd-bytes %d < normal pages' %d bytes",
              mfb, normal_bytes)
    return info


@test("1 channel, tcp, idle, no compression")
def _(env):
    matrix(env, 1, "tcp", False)


@test("2 channels, unix, dirtying, no compression")
def _(env):
    matrix(env, 2, "unix", True)


@test("4 channels, tcp, dirtying, zstd on text")
def _(env):
    matrix(env, 4, "tcp", True, "zstd", fill="text")


@test("8 channels, unix, idle, zstd on text")
def _(env):
    matrix(env, 8, "unix", False, "zstd", fill="text")


@test("8 channels, tcp, dirtying, no compression")
def _(env):
    matrix(env, 8, "tcp", True)


@test("2 channels, tcp, idle, zlib on text")
def _(env):
    matrix(env, 2, "tcp", False, "zlib", fill="text")


@test("4 channels, unix, dirtying, zlib on text")
def _(env):
    matrix(env, 4, "unix", True, "zlib", fill="text")


@test("1 channel, unix, dirtying, zstd on random (incompressible)")
def _(env):
    matrix(env, 1, "unix", True, "zstd")


def zero_case(env, mode):
    # A zero-filled guest whose writers give it random pages as it runs: the
    # migration has both kinds, and the destination must get both right.
    info = matrix(env, 2, "tcp", True, fill="zero", zero=mode)
    dup, normal, mfb = ram(info, "duplicate"), ram(info, "normal"), ram(info, "multifd-bytes")
    if mode == "none":
        check(dup == 0, "zero-page-detection=none: %d pages reported as duplicate", dup)
        check(normal >= PAGES and mfb >= PAGES * PAGE_SIZE,
              "zero-page-detection=none: every page must travel in full (normal %d, "
              "multifd-bytes %d, guest %d pages)", normal, mfb, PAGES)
    else:
        check(dup >= PAGES // 2, "zero-page-detection=%s: only %d duplicate (zero) pages of %d "
              "in a zero-filled guest", mode, dup, PAGES)
        check(mfb < PAGES * PAGE_SIZE // 4, "zero-page-detection=%s: multifd-bytes %d: zero "
              "pages were sent in full", mode, mfb)
        # Where the zero pages went: legacy writes a ZERO record (8-byte
        # header + fill byte) per page on the main stream, multifd puts them
        # in the packets' zero lists.  The main stream's other big item is
        # the guest's version table, 4 bytes per page (docs/cli.md).
        main_extra = ram(info, "transferred") - mfb - PAGES * 4
        if mode == "legacy":
            check(main_extra >= dup * 8, "zero-page-detection=legacy: only %d main-stream bytes "
                  "beyond the device state for %d zero pages: no ZERO records?", main_extra, dup)
        else:
            check(main_extra < dup * 2, "zero-page-detection=multifd: %d main-stream bytes "
                  "beyond the device state for %d zero pages: ZERO records on the main stream?",
                  main_extra, dup)


@test("64 channels (the most accepted) over tcp, dirtying")
def _(env):
    # Every accepted multifd-channels value must work: this is the one that
    # used to time out (more connections than the listen backlog, each
    # silent until all were connected).
    matrix(env, 64, "tcp", dirty=True)


@test("32 channels over unix, idle, zstd on text")
def _(env):
    matrix(env, 32, "unix", dirty=False, compression="zstd", fill="text")


@test("zero-page-detection=none (zero-filled, dirtying)")
def _(env):
    zero_case(env, "none")


@test("zero-page-detection=legacy (zero-filled, dirtying)")
def _(env):
    zero_case(env, "legacy")


@test("zero-page-detection=multifd (zero-filled, dirtying)")
def _(env):
    zero_case(env, "multifd")


@test("multifd-compression differs between the sides: both fail cleanly")
def _(env):
    uri = tcp_uri()
    dst = new_dst(env, "dst", 2, "none", uri=uri)
    src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE)
    configure([src], 2, "zstd")
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, until=("failed",), timeout=FAIL_BOUND_S)
    note("source error-desc: %s" % info.get("error-desc"))
    check_source_survived(src)
    check_dst_failed(dst, r"compression")


# ----------------------------------------------------------------- order

class Proxy:
    """Forwards a source's migration connections to the destination in a
    chosen order, optionally breaking one of them.

    order: "reverse" (channels by descending id, then the main stream) or
    "random" (shuffled, the main stream never first).  The source connects
    the main stream first; the proxy accepts all 1 + n, then connects to the
    destination one by one in the new order (the kernel's accept queue is
    FIFO, so that is the order the destination accepts them in) and pumps
    bytes both ways, two threads per connection.

    faults: {key: (action, nbytes)}, key "main" or a channel id; after
    nbytes of the source's bytes on that connection were forwarded,
    "cut" shuts both of its sockets down (both peers see the connection end
    there, in the middle of a packet unless nbytes falls on a boundary), and
    "stall" stops forwarding it (the source's writes block once the socket
    buffers are full; the destination waits for bytes that never come).
    `tripped` is set when that happened.  A stalled connection still ends
    when the destination closes its side (the destination died or gave up)
    or on release(): then both sockets are shut, as a dead peer's kernel
    would reset them.  (The source closing its side cannot end a stall: its
    FIN queues behind the bytes nobody reads, as on a real network.)
    "partition" is a stall that only release() or close() ends: the flow
    is lost in both directions, whatever the peers do.  close() ends
    everything."""

    def __init__(self, listen_path, target_uri, n, order="reverse", rng=None, faults=None):
        self.path = listen_path
        self.target = target_uri
        self.n = n
        self.order = order
        self.rng = rng or random.Random(0)
        self.faults = dict(faults or {})
        self.tripped = threading.Event()
        self.ended = []
        self.released = threading.Event()
        self.error = None
        self.sent_order = None
        self.socks = []
        self.threads = []
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(listen_path)
        self.lsock.listen(16)
        self.lsock.settimeout(30)
        self.uri = "unix:" + listen_path
        t = threading.Thread(target=self._run, daemon=True)
        t.start()
        self.threads.append(t)

    def _peek(self, s, n):
        deadline = time.monotonic() + 30
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            data = s.recv(n, socket.MSG_PEEK)
            if len(data) >= n or not data or time.monotonic() > deadline:
                s.settimeout(None)
                return data
            # Not all there yet; peeking again at once would spin.
            time.sleep(0.001)

    def _connect(self):
        if self.target.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(self.target[5:])
        else:
            host, port = self.target[4:].rsplit(":", 1)
            s = socket.create_connection((host, int(port)), timeout=10)
        s.settimeout(None)
        return s

    @staticmethod
    def _shut(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pump(self, a, b, ended, fault=None):
        """Copy a to b.  `ended` is this connection's event: set by close()
        and when the destination's side ends (a is the destination's)."""
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        left = fault[1] if fault else None
        try:
            while True:
                want = len(buf) if left is None else min(len(buf), left)
                if want == 0:
                    self.tripped.set()
                    if fault[0] == "stall":
                        ended.wait(120)
                    elif fault[0] == "partition":
                        self.released.wait(120)
                    self._shut(a, b)
                    return
                k = a.recv_into(buf, want)
                if not k:
                    b.shutdown(socket.SHUT_WR)
                    return
                b.sendall(view[:k])
                if left is not None:
                    left -= k
        except OSError:
            self._shut(a, b)
        finally:
            if fault is None and ended is not None:
                ended.set()

    def _run(self):
        try:
            conns = {}
            for _ in range(self.n + 1):
                c, _addr = self.lsock.accept()
                c.settimeout(None)
                self.socks.append(c)
                head = self._peek(c, 4)
                if head == b"QEVM":
                    key = "main"
                else:
                    init = self._peek(c, 25)
                    if len(init) < 25 or struct.unpack(">I", init[:4])[0] != MF_MAGIC:
                        raise TestFailure("proxy: a source connection starts with %r" % init)
                    key = init[24]
                if key in conns:
                    raise TestFailure("proxy: the source opened %r twice" % (key,))
                conns[key] = c
            keys = sorted((k for k in conns if k != "main"), reverse=True) + ["main"]
            if self.order == "random":
                # Shuffled, except that the main stream never comes first:
                # that is the order a source uses anyway.
                self.rng.shuffle(keys)
                if keys[0] == "main":
                    j = self.rng.randrange(1, len(keys))
                    keys[0], keys[j] = keys[j], keys[0]
            self.sent_order = keys
            for k in keys:
                d = self._connect()
                self.socks.append(d)
                ended = threading.Event()
                self.ended.append(ended)
                # Source to destination (maybe faulty), and back: the
                # latter's end (the destination closed) releases a stall.
                for a, b, e, f in ((conns[k], d, ended, self.faults.get(k)),
                                   (d, conns[k], ended, None)):
                    if f is None and a is conns[k]:
                        e = None
                    t = threading.Thread(target=self._pump, args=(a, b, e, f), daemon=True)
                    t.start()
                    self.threads.append(t)
        except Exception as e:      # reported by the case through self.error
            self.error = "%s: %s" % (type(e).__name__, e)

    def release(self):
        """End every stall and partition (both sockets shut)."""
        self.released.set()
        for e in self.ended:
            e.set()

    def close(self):
        self.release()
        self._shut(*self.socks, self.lsock)
        for t in self.threads:
            t.join(5)
        for s in self.socks + [self.lsock]:
            s.close()
        alive = [t for t in self.threads if t.is_alive()]
        check(not alive, "proxy: %d threads still running after close", len(alive))


def order_case(env, n, order, seed, compression="none", fill=None):
    target = tcp_uri()
    dst = new_dst(env, "dst", n, compression, uri=target, dirty_rate=DIRTY_RATE)
    src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE, fill=fill)
    configure([src], n, compression)
    proxy = Proxy(env.path("proxy.sock"), target, n, order, random.Random(seed))
    try:
        migrate_ok(src, dst, proxy.uri, dirtying=True)
        check(proxy.error is None, "proxy: %s", proxy.error)
        note("connections reached the destination in the order %s" % proxy.sent_order)
        check(proxy.sent_order is not None and proxy.sent_order[0] != "main",
              "the proxy did not put a channel first: %r", proxy.sent_order)
    finally:
        proxy.close()


@test("channels connect in reverse order, before the main stream (4 channels)")
def _(env):
    order_case(env, 4, "reverse", 0)


@test("channels and main stream connect in random order (8 channels, zstd)")
def _(env):
    seed = int(os.environ.get("LMTEST_SEED", random.randrange(1 << 30)))
    note("seed %d (LMTEST_SEED=%d reproduces the order)" % (seed, seed))
    order_case(env, 8, "random", seed, "zstd", fill="text")


# ----------------------------------------------------------------- refusals

def handshake(cid, magic=MF_MAGIC, version=MF_VERSION, uuid=bytes(16)):
    """A channel's 64-byte handshake (docs/format.md section 5)."""
    pkt = struct.pack(">II", magic, version) + uuid + bytes([cid]) + bytes(39)
    assert len(pkt) == 64
    return pkt


MAIN_HEADER = b"QEVM" + struct.pack(">I", 3)


def raw_connect(uri):
    if uri.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(uri[5:])
    else:
        host, port = uri[4:].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=10)
    return s




def refusal_case(env, n, conns, pattern, transport="tcp"):
    """conns: the byte strings a fake source sends, one connection each, in
    order (None: connect and send nothing).  All stay open until the
    destination has exited."""
    uri = tcp_uri() if transport == "tcp" else unix_uri(env)
    dst = new_dst(env, "dst", n, uri=uri)
    socks = []
    try:
        for data in conns:
            s = raw_connect(uri)
            socks.append(s)
            if data:
                try:
                    s.sendall(data)
                except OSError:
                    # The destination may already have refused an earlier
                    # connection and closed this one: its stderr decides.
                    pass
        check_dst_failed(dst, pattern)
    finally:
        for s in socks:
            s.close()


@test("fake source: 4 channels in reverse order, then a garbage main connection")
def _(env):
    conns = [handshake(i) for i in (3, 2, 1, 0)] + [b"GARBAGE!" * 8]
    refusal_case(env, 4, conns, r"neither the main stream nor a channel \(first bytes 47 41 52 42\)")


@test("fake source: 3 channels in reverse order, then a main stream with a bad version")
def _(env):
    # multifd_accept() took every channel and the main connection (the
    # failure comes from the stream loader), so the receive threads ran and
    # had to be stopped by the failure path.
    conns = [handshake(i) for i in (2, 1, 0)] + [b"QEVM" + struct.pack(">I", 0xdead) + bytes(64)]
    refusal_case(env, 3, conns, r"(?i)version", transport="unix")


@test("fake source: 2 channels, then a main stream that ends after its header")
def _(env):
    uri = tcp_uri()
    dst = new_dst(env, "dst", 2, uri=uri)
    socks = [raw_connect(uri) for _ in range(3)]
    try:
        socks[0].sendall(handshake(1))
        socks[1].sendall(handshake(0))
        socks[2].sendall(MAIN_HEADER)
        socks[2].shutdown(socket.SHUT_WR)
        check_dst_failed(dst, r"truncated at byte offset 8\b")
    finally:
        for s in socks:
            s.close()


@test("refused: a channel with a wrong magic")
def _(env):
    refusal_case(env, 2, [MAIN_HEADER, handshake(0), handshake(1, magic=0x11223345)],
                 r"neither the main stream nor a channel \(first bytes 11 22 33 45\)")


@test("refused: a channel with a wrong version")
def _(env):
    refusal_case(env, 2, [handshake(0, version=2)], r"unsupported version 2", transport="unix")


@test("refused: a channel with a wrong UUID")
def _(env):
    refusal_case(env, 2, [MAIN_HEADER, handshake(1, uuid=b"\x01" * 16)], r"UUID")


@test("refused: a duplicate channel id")
def _(env):
    refusal_case(env, 3, [handshake(1), MAIN_HEADER, handshake(1)],
                 r"channel id 1 connected twice", transport="unix")


@test("refused: a channel id out of range")
def _(env):
    refusal_case(env, 2, [handshake(0), handshake(2)], r"channel id 2 out of range")


@test("refused: two main connections")
def _(env):
    refusal_case(env, 2, [MAIN_HEADER, MAIN_HEADER], r"second main stream connection")


# ----------------------------------------------------------------- faults

def proc_tasks(pid):
    return sorted(os.listdir("/proc/%d/task" % pid), key=int)


def proc_fds(pid):
    out = {}
    d = "/proc/%d/fd" % pid
    for f in os.listdir(d):
        try:
            out[int(f)] = os.readlink(os.path.join(d, f))
        except OSError:
            pass            # closed while we listed
    return product_fds(pid, out)


# Descriptors a source may own after its first migration and keep: the
# uffd-wp tracker's /proc/self/pagemap (for the tracker's life) and the
# migration's cancel eventfd (kept until the next migrate replaces it).
# Each at most once: a second copy is a leak.
LASTING = (re.compile(r"^/proc/\d+/pagemap$"), re.compile(r"^anon_inode:\[eventfd\]$"))


def has_symbolizer_child(pid):
    """Does pid have an llvm-symbolizer child?  The ThreadSanitizer runtime
    starts one (and keeps two pipes to it) the first time it matches a
    report against its suppressions: those pipes are the sanitizer's."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and comm.startswith("llvm-symbolize"):
            return True
    return False


def product_fds(pid, fds):
    """fds without the sanitizer runtime's symbolizer pipes, if it has them."""
    if not has_symbolizer_child(pid):
        return fds
    return {fd: t for fd, t in fds.items() if not t.startswith("pipe:")}


def new_fds(before, after):
    """Descriptors in after that are not the same open file in before."""
    return {fd: t for fd, t in after.items() if before.get(fd) != t}


def check_no_leak(src, tasks0, fds0, what):
    """Same number of threads as before the migration; no new descriptor
    but the lasting ones above (the QMP client connection was open before)."""
    def settled():
        return len(proc_tasks(src.pid)) == len(tasks0) and \
            not [t for t in new_fds(fds0, proc_fds(src.pid)).values()
                 if not any(p.match(t) for p in LASTING)]
    try:
        wait_until(settled, 10, "the source to release its migration threads and sockets")
    except lmtest.Timeout:
        extra = new_fds(fds0, proc_fds(src.pid))
        raise TestFailure("%s: source has %d threads (was %d) and new descriptors %s"
                          % (what, len(proc_tasks(src.pid)), len(tasks0), extra))
    extra = new_fds(fds0, proc_fds(src.pid))
    for p in LASTING:
        dup = [t for t in extra.values() if p.match(t)]
        check(len(dup) <= 1, "%s: source holds %d new %s descriptors: %s", what, len(dup),
              p.pattern, extra)
    return extra


def check_source_survived(src, pages=PAGES):
    check_runstate(src, "running")
    check_writes_advance(src)
    check_verified(src, pages, cached=False)


def prepare_source(env, n, fault=None, compression=None, mem=MEM):
    with fault_env(fault):
        src = env.guest("src", mem=mem, dirty_rate=DIRTY_RATE)
    configure([src], n, compression)
    wait_until(lambda: src.info()["writes"] >= 200, 30, "the source's writers to dirty")
    return src, proc_tasks(src.pid), proc_fds(src.pid)


def check_source_ended(src, t0, until, desc_pat=None):
    """The source's migration ended `until` within FAIL_BOUND_S of t0."""
    info = wait_migration(src, until=(until,),
                          timeout=max(1.0, FAIL_BOUND_S - (time.monotonic() - t0)))
    desc = info.get("error-desc")
    note("%s after %.2f s; source error-desc: %s" % (until, time.monotonic() - t0, desc))
    if until == "failed":
        check(isinstance(desc, str) and desc.strip(), "failed migration without error-desc: %r",
              info)
        if desc_pat:
            check(re.search(desc_pat, desc), "source error-desc %r does not match %r",
                  desc, desc_pat)
    return info


def migrate_again(env, src, n, tasks0, fds0, transport, compression=None, mem=MEM):
    """After a failure: the same source migrates to a fresh destination,
    and that leaves no more descriptors than the failure did."""
    uri = unix_uri(env, "again.sock") if transport == "tcp" else tcp_uri()
    dst2 = new_dst(env, "dst2", n, compression, uri=uri, dirty_rate=DIRTY_RATE, mem=mem)
    fds1 = proc_fds(src.pid)
    migrate_ok(src, dst2, uri, dirtying=True, pages=mem_bytes(mem) // PAGE_SIZE)
    check_no_leak(src, tasks0, fds0, "after the second migration")
    grown = new_fds(fds1, proc_fds(src.pid))
    check(len(proc_fds(src.pid)) == len(fds1), "the successful migration left %d descriptors "
          "more than the failed one did: %s", len(proc_fds(src.pid)) - len(fds1), grown)


# (side, point, pattern of the source's error-desc, pattern of the
# destination's reason).  The source's own faults must be what it reports
# (the channel, and the injection where the source itself decides to fail);
# a destination fault reaches the source as some broken connection, so any
# error-desc will do there, and the destination must report its injection.
FAULTS = [
    ("src", "connect", r"multifd channel {ch}\b.*injected", r"."),
    # The hook garbles the handshake's magic and the channel carries on: the
    # source cannot see that, the destination refuses the connection and
    # closes everything, and the source reports whichever of its
    # connections (main or a channel) it finds reset first.
    ("src", "handshake", None, r"first bytes ee 22 33 44"),
    # The channel's first packet is the setup SYNC: it is torn after half
    # its header.  The destination may see that or the main stream end
    # first, as the source closes everything.
    ("src", "packet", r"multifd channel {ch}\b", r"."),
    ("src", "sync", r"multifd channel {ch}\b.*injected fault before the SYNC", r"."),
    ("dst", "handshake", None, r"handshake"),
    ("dst", "packet", None, r"multifd channel {ch}\b.*injected fault after packet"),
    ("dst", "sync", None, r"multifd channel {ch}\b.*injected fault at the SYNC barrier"),
]


def fault_case(env, side, point, n, ch, src_pat, dst_pat, transport, nth=None, mem=MEM):
    """nth: the hit of the point that fails (LIVEMIG_FAULT's 4th field;
    None = the first).  The faulted process must log that very hit, and a
    destination that drops a channel after a packet must name a packet
    number that lies inside the first pass (at least nth - 1: numbers are
    global, and below the guest's size in packets)."""
    spec = "%s:%s:%d" % (side, point, ch) + (":%d" % nth if nth else "")
    pages = mem_bytes(mem) // PAGE_SIZE
    note("LIVEMIG_FAULT=%s on the %s, %d channels, %s, %s guest" % (spec, side, n, transport,
                                                                    mem))
    uri = tcp_uri() if transport == "tcp" else unix_uri(env)
    dst = new_dst(env, "dst", n, uri=uri, fault=spec if side == "dst" else None, mem=mem)
    src, tasks0, fds0 = prepare_source(env, n, fault=spec if side == "src" else None, mem=mem)

    t0 = time.monotonic()
    src.cmd("migrate", {"uri": uri})
    check_source_ended(src, t0, "failed", src_pat and src_pat.format(ch=ch))
    check_source_survived(src, pages)
    extra = check_no_leak(src, tasks0, fds0, "after the failure")
    note("descriptors the source keeps after its first migration: %s" % sorted(extra.values()))
    reason = check_dst_failed(dst, dst_pat.format(ch=ch))
    faulted = src if side == "src" else dst
    logged = "injected fault: %s %s on channel %d" % (side, point, ch)
    if nth:
        logged += " (hit %d)" % nth
    check(logged in faulted.stderr(), "%s never logged %r for %s:\n%s", faulted.name, logged,
          spec, faulted.stderr_tail())
    if nth and side == "dst" and point == "packet":
        m = re.search(r"injected fault after packet (\d+)", reason)
        check(m and nth - 1 <= int(m.group(1)) < pages // MF_PACKET_PAGES,
              "%s: the destination's reason %r names no packet between %d and %d (the first "
              "pass)", spec, reason, nth - 1, pages // MF_PACKET_PAGES)
    if side == "dst":
        check("injected" in reason or "handshake" in reason,
              "destination's reason does not name the injected fault: %r", reason)
    # The fault fired once per process: the same source migrates again.
    migrate_again(env, src, n, tasks0, fds0, transport, mem=mem)


def _fault_test(side, point, n, ch, src_pat, dst_pat, transport):
    @test("fault %s:%s on channel %d of %d (%s)" % (side, point, ch, n, transport), timeout=120)
    def _(env):
        fault_case(env, side, point, n, ch, src_pat, dst_pat, transport)


# Every point twice: 2-4 channels, a changing channel, both transports.
for _i, (_side, _point, _sp, _dp) in enumerate(FAULTS):
    _n = 2 + _i % 3
    _fault_test(_side, _point, _n, (_i * 5 + 1) % _n, _sp, _dp, ("tcp", "unix")[_i % 2])
    _fault_test(_side, _point, 4, (_i + 2) % 4 if _point != "connect" else 3, _sp, _dp,
                ("unix", "tcp")[_i % 2])


# The same faults on a later hit (LIVEMIG_FAULT=SIDE:POINT:CHANNEL:N): a
# channel torn by the source, or dropped by the destination, in the middle
# of a 256 MiB migration -- a quarter into that channel's share of the first
# pass, with 512 KiB packets -- instead of at its setup SYNC.
MID_MEM = "256M"


def _mid_fault_test(side, point, n, ch, transport):
    src_pat, dst_pat = [(sp, dp) for s_, p_, sp, dp in FAULTS if (s_, p_) == (side, point)][0]
    nth = mem_bytes(MID_MEM) // PAGE_SIZE // MF_PACKET_PAGES // n // 4

    @test("fault %s:%s:%d:%d mid-migration, %d channels, %s guest (%s)"
          % (side, point, ch, nth, n, MID_MEM, transport), timeout=180)
    def _(env):
        fault_case(env, side, point, n, ch, src_pat, dst_pat, transport, nth=nth, mem=MID_MEM)


_mid_fault_test("src", "packet", 2, 1, "tcp")
_mid_fault_test("src", "packet", 4, 2, "unix")
_mid_fault_test("dst", "packet", 3, 0, "unix")
_mid_fault_test("dst", "packet", 2, 1, "tcp")


# ------------------------------------------------------- broken connections

def network_case(env, n, key, action, nbytes, then, compression=None, strict=False):
    """A proxy breaks connection `key` (a Proxy fault action after nbytes);
    then `then`: "wait" (the migration must fail on its own), "cancel"
    (migrate_cancel on the source), "cancel-dst" (on the destination),
    "kill-dst" or "kill-src".  After a source-side cancel the stall is
    released before the destination is checked, unless `strict`: then the
    destination must notice by itself that its source is gone."""
    target = tcp_uri()
    dst = new_dst(env, "dst", n, compression, uri=target)
    src, tasks0, fds0 = prepare_source(env, n, compression=compression)
    proxy = Proxy(env.path("proxy.sock"), target, n, faults={key: (action, nbytes)})
    try:
        t0 = time.monotonic()
        src.cmd("migrate", {"uri": proxy.uri})
        check(proxy.tripped.wait(FAIL_BOUND_S), "the proxy never reached byte %d of %r "
              "(error %s)", nbytes, key, proxy.error)
        check(proxy.error is None, "proxy: %s", proxy.error)
        if then != "wait":
            # A stalled migration stays up: act once the destination took
            # every connection and loads (the proxy trips as soon as the
            # stalled connection reaches its byte, maybe before the others
            # are even connected).
            wait_until(lambda: dst.query_migrate().get("status") == "active", 10,
                       "the destination to be loading")
            info = src.query_migrate()
            check(info.get("status") in ("setup", "active"),
                  "source status %r with a stalled channel (error-desc %r)",
                  info.get("status"), info.get("error-desc"))
        if then == "kill-src":
            src.kill()
            seen = set()

            def gone():
                if not dst.alive():
                    return True
                try:
                    seen.add(dst.runstate())
                except TestFailure:
                    return not dst.alive()
                check("running" not in seen, "destination reached 'running' after its source "
                      "died")
                return False
            wait_until(gone, FAIL_BOUND_S, "the destination to give up")
            check_dst_failed(dst, r".", timeout=5)
            return
        t0 = time.monotonic()
        if then == "cancel":
            src.cmd("migrate_cancel")
            check_source_ended(src, t0, "cancelled")
            if not strict:
                proxy.release()
        elif then == "cancel-dst":
            dst.cmd("migrate_cancel")
            check_dst_failed(dst, r"cancel", timeout=FAIL_BOUND_S)
            check_source_ended(src, t0, "failed")
        else:
            if then == "kill-dst":
                dst.kill()
            info = check_source_ended(src, t0, "failed")
            if info.get("x-outcome-unknown"):
                # The cut came after the source had handed EOF to the
                # kernel: it cannot know that the destination did not get
                # it, so it must keep the guest stopped (no split brain).
                # Here the destination cannot have run: it must fail.
                check(then == "wait", "outcome unknown after %s", then)
                check_runstate(src, "postmigrate")
                check_dst_failed(dst, r".", timeout=FAIL_BOUND_S)
                note("the cut came after the commit point: source kept the guest stopped")
                src.cmd("cont")
        check_source_survived(src)
        check_no_leak(src, tasks0, fds0, "after the failure")
        if then in ("wait", "cancel"):
            check_dst_failed(dst, r".", timeout=FAIL_BOUND_S)
    finally:
        proxy.close()
    migrate_again(env, src, n, tasks0, fds0, "tcp", compression)


@test("channel 1 of 4 cut in the middle of a packet, mid-migration")
def _(env):
    # 8 MiB into the channel: well inside the first pass (64 MiB / 4),
    # and 100 bytes into a packet's header.
    network_case(env, 4, 1, "cut", 64 + 8 * (1 << 20) + 100, "wait")


@test("channel 0 of 2 cut in the middle of its zstd payload, mid-migration")
def _(env):
    network_case(env, 2, 0, "cut", 3 * (1 << 20) + 12345, "wait", compression="zstd")


@test("main stream cut mid-migration (3 channels)")
def _(env):
    # The main stream carries little with multifd: its header, the block
    # list, EOS markers.  Cut it after the setup (its ram START ends at
    # byte 83), inside the first PART section, while pages flow.
    network_case(env, 3, "main", "cut", 90, "wait")


@test("migrate_cancel with a channel stalled after its handshake (source waits at SYNC)")
def _(env):
    network_case(env, 3, 2, "stall", 64, "cancel")


@test("migrate_cancel with a channel stalled mid-data")
def _(env):
    network_case(env, 4, 3, "stall", 4 << 20, "cancel")


@test("migrate_cancel on the destination while it waits at a SYNC for a stalled channel")
def _(env):
    network_case(env, 2, 1, "stall", 64, "cancel-dst")


@test("destination killed with a channel stalled mid-data")
def _(env):
    network_case(env, 2, 0, "stall", 2 << 20, "kill-dst")


@test("source killed with a channel stalled: destination exits non-zero, never runs")
def _(env):
    network_case(env, 4, 1, "stall", 1 << 20, "kill-src")


# A partitioned channel never delivers again, but the main stream does: when
# the peer goes away the main stream ends, and a side waiting at a SYNC
# barrier for the lost channel must notice that instead of waiting forever.

@test("partitioned channel, then the source is cancelled: the destination gives up")
def _(env):
    network_case(env, 3, 1, "partition", 64, "cancel", strict=True)


@test("partitioned channel, then the destination is killed: the source fails")
def _(env):
    network_case(env, 2, 1, "partition", 64, "kill-dst", strict=True)


# ----------------------------------------------------------------- bandwidth

LIMIT = 32 << 20               # bytes/s: 64 MiB take ~2 s uncompressed


def limited(env, compression, fill):
    uri = tcp_uri()
    dst = new_dst(env, "dst-" + compression, 2, compression, uri=uri)
    src = env.guest("src-" + compression, mem=MEM, fill=fill)
    configure([src], 2, compression)
    src.set_params(max_bandwidth=LIMIT)
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=30)
    summary(info)
    check_destination(dst, PAGES)
    return info


@test("max-bandwidth limits multifd; zstd on text finishes first under it")
def _(env):
    plain = limited(env, "none", "text")
    secs = plain["total-time"] / 1000.0
    rate = ram(plain, "transferred") / secs
    note("none: %.2f s, %.1f MiB/s (limit %d MiB/s)" % (secs, rate / (1 << 20), LIMIT >> 20))
    check(rate <= LIMIT * 1.3, "max-bandwidth %d MiB/s not applied with multifd: %d MiB moved "
          "at %.1f MiB/s", LIMIT >> 20, ram(plain, "transferred") >> 20, rate / (1 << 20))
    zstd = limited(env, "zstd", "text")
    note("zstd: %.2f s, %d MiB on the wire" % (zstd["total-time"] / 1000.0,
                                                ram(zstd, "transferred") >> 20))
    check(zstd["total-time"] < plain["total-time"] * 0.7,
          "zstd on text took %d ms under max-bandwidth, no compression %d ms",
          zstd["total-time"], plain["total-time"])


# ----------------------------------------------------------------- stress

STRESS_HOPS = 20


@test("stress: %d migrations back to back, random channels and compression" % STRESS_HOPS,
      timeout=200)
def _(env):
    seed = int(os.environ.get("LMTEST_SEED", random.randrange(1 << 30)))
    note("seed %d (LMTEST_SEED=%d reproduces the draw)" % (seed, seed))
    rng = random.Random(seed)
    src = env.guest("g0", mem=MEM, dirty_rate=DIRTY_RATE, fill="text")
    t0 = time.monotonic()
    for hop in range(1, STRESS_HOPS + 1):
        n = rng.randint(1, 8)
        comp = rng.choice(("none", "zstd"))
        uri = tcp_uri() if rng.random() < 0.5 else unix_uri(env, "m%d.sock" % hop)
        dst = new_dst(env, "g%d" % hop, n, comp, uri=uri, dirty_rate=DIRTY_RATE)
        configure([src], n, comp)
        note("hop %d: %d channels, %s, %s" % (hop, n, comp, uri.split(":")[0]))
        try:
            migrate_ok(src, dst, uri, dirtying=True)
        except TestFailure as e:
            raise TestFailure("hop %d (%d channels, %s, %s): %s" % (hop, n, comp, uri, e))
        rc = src.quit()
        check(rc == 0, "%s: %s after quit", src.name, describe_exit(rc))
        src = dst
    note("%d hops in %.1f s" % (STRESS_HOPS, time.monotonic() - t0))


if __name__ == "__main__":
    lmtest.main()
