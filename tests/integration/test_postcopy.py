#!/usr/bin/env python3
"""Postcopy: the destination runs first and pulls what is missing.

Real `livemig guest` processes over real sockets:
  * a guest that dirties faster than any link (writers at full speed,
    sequential, so the same pages are rewritten across the switch) finishes
    in postcopy after migrate-start-postcopy, with and without multifd in
    the precopy phase; the destination's writers run (and fault) before the
    last page, and its arrival check after the last page proves every page:
    0 lost, 0 stale;
  * the automatic switch (x-postcopy-after) takes such a guest to postcopy
    by itself, and never an idle one;
  * postcopy asked for when nothing is left (an idle guest): the listen
    thread reaches the stream's EOF while the main thread may still be
    inside the package -- 50 runs;
  * failures before the destination confirmed the package (it fails, it
    dies): the source takes its guest back and it runs; after it (either
    side killed): both report failure, run state internal-error, nothing
    hangs;
  * a hostile stream (commands out of order, packages too long or beyond
    the stream, discards outside a block) and a hostile return path (page
    requests that are not one page of a known block, a message of the
    wrong length): a clear error, no crash.
"""

import os
import re
import socket
import threading
import time

import lmtest
from lmtest import be16 as _be16, be32 as _be32, be64 as _be64, counted as _counted
from lmtest import (PAGE_SIZE, TestFailure, check, check_destination,
                    check_runstate, check_writes_advance, describe_exit,
                    mem_bytes, note, ram, test, wait_incoming_exit,
                    wait_listening, wait_migration, wait_until)

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE


def pair(env, mem=MEM, dirty_rate="max", pattern="sequential", multifd=False,
         dst_environ=None, tcp=False, preempt=False):
    if tcp:
        uri = "tcp:127.0.0.1:%d" % lmtest.free_tcp_port("127.0.0.1")
    else:
        uri = "unix:" + env.path("mig.sock")
    dst = env.guest("dst", mem=mem, incoming="defer", environ=dst_environ,
                    dirty_rate=dirty_rate, pattern=pattern)
    src = env.guest("src", mem=mem, dirty_rate=dirty_rate, pattern=pattern)
    # No switch-over can ever be due: precopy at 64 MiB/s against writers
    # at full speed; only postcopy (unlimited by default) finishes it.
    if dirty_rate == "max":
        src.set_params(downtime_limit=1, max_bandwidth=64 << 20)
    caps = {"postcopy-ram": True}
    if multifd:
        caps["multifd"] = True
    if preempt:
        caps["postcopy-preempt"] = True
    dst.set_caps(**caps)
    src.set_caps(**caps)
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    if dirty_rate:
        wait_until(lambda: src.info()["writes"] > 1000, 30, "the source's writers to start")
    return uri, src, dst


def statuses_of(seen):
    def sample(info):
        st = info.get("status")
        if not seen or seen[-1] != st:
            seen.append(st)
    return sample


def check_postcopy_done(src, dst, sinfo, pages=PAGES):
    check(ram(sinfo, "postcopy-bytes") > 0, "the source sent nothing after the switch: %r",
          sinfo.get("ram"))
    check_runstate(src, "postmigrate")
    dinfo = check_destination(dst, pages, dirtying=True)
    note("source: total %s ms, downtime %s ms, postcopy %d KiB, %d requests served; "
         "destination: %s requests, latency p50 %s us p99 %s us max %s us"
         % (sinfo.get("total-time"), sinfo.get("downtime"), ram(sinfo, "postcopy-bytes") >> 10,
            ram(sinfo, "postcopy-requests"), dinfo.get("x-postcopy-requests"),
            dinfo.get("x-postcopy-latency-p50-us"), dinfo.get("x-postcopy-latency-p99-us"),
            dinfo.get("x-postcopy-latency-max-us")))
    return dinfo


def start_then_postcopy(src, uri, after_syncs=2):
    src.cmd("migrate", {"uri": uri})
    wait_until(lambda: ram(src.query_migrate(), "dirty-sync-count") >= after_syncs, 60,
               "%d dirty syncs before the switch" % after_syncs)
    src.cmd("migrate-start-postcopy")


@test("a guest precopy cannot finish completes in postcopy; every page verified", timeout=240)
def _(env):
    uri, src, dst = pair(env)
    seen = []
    start_then_postcopy(src, uri)
    sinfo = wait_migration(src, timeout=120, on_sample=statuses_of(seen))
    note("source statuses: %s" % " -> ".join(s for s in seen if s))
    check_postcopy_done(src, dst, sinfo)


@test("postcopy after multifd precopy: no precopy page lands after a postcopy one",
      timeout=240)
def _(env):
    uri, src, dst = pair(env, multifd=True)
    start_then_postcopy(src, uri, after_syncs=3)
    sinfo = wait_migration(src, timeout=120)
    check(ram(sinfo, "multifd-bytes") > 0, "multifd carried nothing in precopy: %r",
          sinfo.get("ram"))
    check_postcopy_done(src, dst, sinfo)


@test("postcopy-preempt: requested pages on their own channel; every page verified",
      timeout=240)
def _(env):
    uri, src, dst = pair(env, preempt=True)
    start_then_postcopy(src, uri)
    sinfo = wait_migration(src, timeout=120)
    check_postcopy_done(src, dst, sinfo)


@test("postcopy-preempt after multifd precopy", timeout=240)
def _(env):
    uri, src, dst = pair(env, preempt=True, multifd=True, tcp=True)
    start_then_postcopy(src, uri, after_syncs=3)
    sinfo = wait_migration(src, timeout=120)
    check_postcopy_done(src, dst, sinfo)


@test("postcopy-preempt on the source only: the destination has no channel for it",
      timeout=120)
def _(env):
    uri, src, dst = pair(env)
    dst.expect_exit = True      # its load fails: the source went away mid-stream
    src.set_caps(postcopy_preempt=True)
    start_then_postcopy(src, uri)
    sinfo = wait_migration(src, until=("failed",), timeout=60)
    note("source: %s" % sinfo.get("error-desc"))
    check_runstate(src, "running")


def bandwidth_limited(env, preempt):
    uri, src, dst = pair(env, tcp=True, preempt=preempt)
    src.set_params(max_postcopy_bandwidth=16 << 20)
    seen = []
    start_then_postcopy(src, uri)
    sinfo = wait_migration(src, timeout=120, on_sample=statuses_of(seen))
    check("postcopy-active" in seen, "never saw postcopy-active: %s", seen)
    dinfo = check_postcopy_done(src, dst, sinfo)
    check((dinfo.get("x-postcopy-requests") or 0) > 0,
          "the destination's writers never faulted on a missing page: %r", dinfo)
    check(len(dinfo.get("postcopy-latency-dist") or []) == 24,
          "postcopy-latency-dist is not 24 buckets: %r", dinfo.get("postcopy-latency-dist"))
    vb = dinfo.get("postcopy-vcpu-blocktime")
    check(isinstance(vb, list) and len(vb) == 2,
          "postcopy-vcpu-blocktime is not one figure per writer (2): %r", vb)
    note("per-vCPU blocktime %s ms, total %s ms" % (vb, dinfo.get("postcopy-blocktime")))


@test("postcopy over tcp with a bandwidth limit: writers fault and are served", timeout=240)
def _(env):
    bandwidth_limited(env, False)


@test("postcopy-preempt over tcp with a bandwidth limit", timeout=240)
def _(env):
    bandwidth_limited(env, True)


@test("x-postcopy-after: a guest that cannot converge switches by itself", timeout=240)
def _(env):
    uri, src, dst = pair(env)
    src.set_params(x_postcopy_after=60000)
    t0 = time.monotonic()
    src.cmd("migrate", {"uri": uri})
    sinfo = wait_migration(src, timeout=120)
    note("switched and completed in %.1f s" % (time.monotonic() - t0))
    check(time.monotonic() - t0 < 55, "it took the 60 s limit, not the forecast, to switch")
    check_postcopy_done(src, dst, sinfo)


@test("x-postcopy-after: a guest that converges never switches", timeout=240)
def _(env):
    uri, src, dst = pair(env, dirty_rate=2000, pattern="random")
    src.set_params(x_postcopy_after=60000, downtime_limit=300)
    seen = []
    src.cmd("migrate", {"uri": uri})
    sinfo = wait_migration(src, timeout=120, on_sample=statuses_of(seen))
    check(ram(sinfo, "postcopy-bytes") == 0 and "postcopy-active" not in seen,
          "a converging guest went to postcopy: statuses %s, ram %r", seen, sinfo.get("ram"))
    check_destination(dst, PAGES, dirtying=True)


@test("postcopy with nothing left: the listen thread may reach EOF inside the package, "
      "50 runs", timeout=600)
def _(env):
    for i in range(50):
        try:
            uri = "unix:" + env.path("mig%d.sock" % i)
            dst = env.guest("dst%d" % i, mem="16M", incoming="defer")
            src = env.guest("src%d" % i, mem="16M", dirty_rate=0)
            dst.set_caps(postcopy_ram=True)
            src.set_caps(postcopy_ram=True)
            dst.cmd("migrate-incoming", {"uri": uri})
            wait_listening(uri, dst)
            src.cmd("migrate", {"uri": uri})
            src.cmd("migrate-start-postcopy")
            sinfo = wait_migration(src, timeout=60)
            check(ram(sinfo, "postcopy-bytes") > 0, "no postcopy phase: %r", sinfo.get("ram"))
            check_destination(dst, mem_bytes("16M") // PAGE_SIZE)
            check(src.quit() == 0 and dst.quit() == 0, "a guest did not quit cleanly")
        except TestFailure as ex:
            raise TestFailure("run %d of 50: %s" % (i, ex))


def check_source_resumed(src, sinfo, what):
    check(sinfo.get("status") == "failed", "source status %r after %s", sinfo.get("status"), what)
    check_runstate(src, "running")
    check_writes_advance(src)


@test("the destination fails inside the package: the source takes its guest back",
      timeout=180)
def _(env):
    uri, src, dst = pair(env, dst_environ={"LIVEMIG_FAULT": "dst:package:0"})
    start_then_postcopy(src, uri)
    sinfo = wait_migration(src, until=("failed",), timeout=60)
    note("source: %s" % sinfo.get("error-desc"))
    check_source_resumed(src, sinfo, "a package the destination could not load")
    rc = wait_incoming_exit(dst)
    check(rc == 1, "destination exit %s, expected 1", describe_exit(rc))
    check("dst:package:0" in dst.stderr(), "the destination does not say what failed:\n%s",
          dst.stderr_tail())


@test("the destination dies inside the package: the source takes its guest back",
      timeout=180)
def _(env):
    uri, src, dst = pair(env, dst_environ={"LIVEMIG_FAULT": "dst:package:1"})
    dst.expect_exit = True
    start_then_postcopy(src, uri)
    sinfo = wait_migration(src, until=("failed",), timeout=60)
    note("source: %s" % sinfo.get("error-desc"))
    check_source_resumed(src, sinfo, "a destination that died in the package")


def slow_postcopy(env):
    """A postcopy that stays active for seconds: max-postcopy-bandwidth."""
    uri, src, dst = pair(env, tcp=True)
    src.set_params(max_postcopy_bandwidth=4 << 20)
    start_then_postcopy(src, uri)
    wait_until(lambda: src.query_migrate().get("status") == "postcopy-active", 30,
               "the source to reach postcopy-active")
    wait_until(lambda: dst.runstate() == "running", 30, "the destination to run the guest")
    return src, dst


@test("the destination is killed in postcopy: the source fails, keeps the guest stopped",
      timeout=180)
def _(env):
    src, dst = slow_postcopy(env)
    dst.expect_exit = True
    dst.kill()
    sinfo = wait_migration(src, until=("failed",), timeout=60)
    err = sinfo.get("error-desc") or ""
    note("source: %s" % err)
    check("neither side has all of its memory" in err, "the error does not say the guest is "
          "split: %r", err)
    check_runstate(src, "internal-error")
    try:
        src.cmd("cont")
        raise TestFailure("cont was accepted on a source whose guest ran on the destination")
    except lmtest.QMPError as e:
        note("cont refused: %s" % e)


@test("the source is killed in postcopy: the destination fails and exits", timeout=180)
def _(env):
    src, dst = slow_postcopy(env)
    src.expect_exit = True
    src.kill()
    rc = wait_incoming_exit(dst, timeout=60)
    check(rc == 1, "destination exit %s, expected 1", describe_exit(rc))
    check(re.search(r"postcopy failed after the guest started here", dst.stderr()),
          "the destination does not say the guest is split:\n%s", dst.stderr_tail())


# ------------------------------------------------------------ a cut link

class Proxy:
    """A TCP relay between source and destination that can be cut: every
    connection through it is shut down and closed at once (both peers see
    their sockets end, as when a link dies with a reset)."""

    def __init__(self, target_port):
        self.target = target_port
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.socks = []
        self.lock = threading.Lock()
        self.cut_done = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                d = a.recv(1 << 20)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                if self.cut_done:
                    c.close()
                    u.close()
                    continue
                self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    def cut(self):
        with self.lock:
            self.cut_done = True
            for x in self.socks:
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                x.close()
        self.srv.close()


def cut_case(env, preempt, after_switch):
    uri, src, dst = pair(env, tcp=True, preempt=preempt)
    proxy = Proxy(int(uri.rsplit(":", 1)[1]))
    via = "tcp:127.0.0.1:%d" % proxy.port
    src.set_params(max_postcopy_bandwidth=4 << 20)
    src.cmd("migrate", {"uri": via})
    wait_until(lambda: ram(src.query_migrate(), "dirty-sync-count") >= 2, 60, "two syncs")
    if after_switch:
        src.cmd("migrate-start-postcopy")
        wait_until(lambda: src.query_migrate().get("status") == "postcopy-active", 30,
                   "postcopy-active")
        wait_until(lambda: dst.runstate() == "running", 30, "the destination to run")
    proxy.cut()
    sinfo = wait_migration(src, until=("failed",), timeout=60)
    note("source: %s" % sinfo.get("error-desc"))
    dst.expect_exit = True
    rc = wait_incoming_exit(dst, timeout=60)
    check(rc == 1, "destination exit %s, expected 1", describe_exit(rc))
    if after_switch:
        check_runstate(src, "internal-error")
        check("postcopy failed after the guest started here" in dst.stderr(),
              "the destination does not say the guest is split:\n%s", dst.stderr_tail())
    else:
        check_runstate(src, "running")
        check_writes_advance(src)


@test("the link is cut in precopy with postcopy-ram on: the source runs on", timeout=180)
def _(env):
    cut_case(env, False, False)


@test("the link is cut in postcopy: both fail, nothing hangs", timeout=180)
def _(env):
    cut_case(env, False, True)


@test("the link is cut in postcopy with preempt: both fail, nothing hangs", timeout=180)
def _(env):
    cut_case(env, True, True)


# ------------------------------------------------------------ hostile stream





def cmd(n, data=b""):
    return b"\x08" + _be16(n) + _be16(len(data)) + data


HEADER = lmtest.STREAM_HEADER
OPEN_RP = cmd(1)
ADVISE = cmd(3, _be64(4096) + _be64(4096))
LISTEN = cmd(4)
RUN = cmd(5)


def ram_start(mem=MEM):
    return (b"\x01" + _be32(1) + _counted("ram") + _be32(0) + _be32(4) +
            _be64(mem_bytes(mem) | 0x4) + _counted("guest.ram") + _be64(mem_bytes(mem)) +
            _be64(0x10) + b"\x7e" + _be32(1))


def discard(start, length, name="guest.ram"):
    return cmd(6, b"\x00" + _counted(name) + b"\x00" + _be64(start) + _be64(length))


def packaged(blob, length=None):
    return cmd(7, _be32(len(blob) if length is None else length)) + blob


BASE = HEADER + OPEN_RP + ADVISE + ram_start()
HOSTILE = {
    "pages before ADVISE": (HEADER + OPEN_RP + ram_start() + ADVISE,
                            r"POSTCOPY_ADVISE after the ram section began"),
    "a discard outside the block": (BASE + discard(mem_bytes(MEM) - 4096, 8192),
                                    r"range 0 .* is not whole pages inside RAM block"),
    "a discard before ADVISE": (HEADER + OPEN_RP + discard(0, 4096),
                                r"POSTCOPY_RAM_DISCARD before POSTCOPY_ADVISE"),
    "LISTEN outside a package": (BASE + LISTEN, r"POSTCOPY_LISTEN outside a package"),
    "RUN before LISTEN": (BASE + packaged(RUN), r"POSTCOPY_RUN before POSTCOPY_LISTEN"),
    "LISTEN twice": (BASE + packaged(LISTEN + LISTEN), r"POSTCOPY_LISTEN twice"),
    "a package in a package": (BASE + packaged(packaged(RUN)), r"PACKAGED inside a package"),
    "a package above the cap": (BASE + cmd(7, _be32(0x7fffffff)),
                                r"PACKAGED of 2147483647 bytes"),
    "a package beyond the stream": (BASE + cmd(7, _be32(100000)) + b"\x00" * 100,
                                    r"(?i)end|truncat|closed"),
    "a package without RUN": (BASE + packaged(LISTEN), r"ended without POSTCOPY_RUN"),
    "a device section after LISTEN": (
        BASE + packaged(LISTEN + RUN) + b"\x04" + _be32(9) + _counted("guest") + _be32(0) +
        _be32(1), r"device section 'guest' after POSTCOPY_LISTEN|ended"),
}


def feed(env, tag, data):
    path = env.path("h.sock")
    dst = env.guest("dst", mem=MEM, incoming="unix:" + path)
    wait_listening("unix:" + path, dst)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(10)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        # drain the return path until the destination closes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if not s.recv(65536):
                    break
            except socket.timeout:
                break
            except OSError:
                break
    finally:
        s.close()
    rc = wait_incoming_exit(dst, timeout=60)
    check(rc == 1, "%s: destination exit %s, expected 1 (refused); stderr:\n%s", tag,
          describe_exit(rc), dst.stderr_tail())
    return dst.stderr()


def _register_hostile(tag, data, pattern):
    @test("hostile stream: %s is refused" % tag, timeout=120)
    def _(env):
        err = feed(env, tag, data)
        line = next((l for l in err.splitlines() if "migration failed" in l), "")
        check(re.search(pattern, line), "%s: error %r does not match %r", tag, line, pattern)
        note(line)


for _tag, (_data, _pat) in HOSTILE.items():
    _register_hostile(_tag, _data, _pat)


# ------------------------------------------------------------ hostile return path

def fake_destination(path, reply, found):
    """Accept the source, read until its PACKAGED command, answer `reply`."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(30)

    def run():
        try:
            c, _ = srv.accept()
            c.settimeout(30)
            buf = b""
            marker = b"\x08\x00\x07\x00\x04"
            while marker not in buf:
                d = c.recv(1 << 20)
                if not d:
                    return
                buf = buf[-8:] + d
            found.append(True)
            c.sendall(reply)
            while c.recv(1 << 20):
                pass
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def rp(t, data):
    return _be16(t) + _be16(len(data)) + data


BAD_RP = {
    "a request for an unknown block": (rp(3, _be64(0) + _be32(4096) + _counted("nosuch")),
                                       r"unknown RAM block 'nosuch'"),
    "an unaligned request": (rp(3, _be64(100) + _be32(4096) + _counted("guest.ram")),
                             r"is not one page inside RAM block 'guest.ram'"),
    "a request beyond the block": (rp(3, _be64(mem_bytes(MEM)) + _be32(4096) +
                                      _counted("guest.ram")),
                                   r"is not one page inside RAM block 'guest.ram'"),
    "REQ_PAGES with a wrong length": (rp(4, _be64(0) + _be32(4096)[:3]),
                                      r"(?i)length|bytes"),
}


def _register_bad_rp(tag, reply, pattern):
    @test("hostile return path in postcopy: %s fails cleanly, the guest runs on" % tag,
          timeout=120)
    def _(env):
        path = env.path("fake.sock")
        found = []
        srv, t = fake_destination(path, reply, found)
        src = env.guest("src", mem=MEM, dirty_rate=2000)
        src.set_caps(postcopy_ram=True)
        src.cmd("migrate", {"uri": "unix:" + path})
        src.cmd("migrate-start-postcopy")
        sinfo = wait_migration(src, until=("failed",), timeout=60)
        srv.close()
        check(found, "%s: the source never sent its package", tag)
        err = sinfo.get("error-desc") or ""
        check(re.search(pattern, err), "%s: error %r does not match %r", tag, err, pattern)
        note(err)
        check_runstate(src, "running")
        check_writes_advance(src)


for _tag, (_reply, _pat) in BAD_RP.items():
    _register_bad_rp(_tag, _reply, _pat)


if __name__ == "__main__":
    lmtest.main()
