#!/usr/bin/env python3
"""CPR: guest RAM handed over instead of copied (mode cpr-transfer and
cpr-reboot, capability x-ignore-shared; docs/format.md section 8).

Everything goes through real `livemig guest` processes and QMP, the way
QEMU is driven: `migrate-set-parameters {"mode": ...}` on both sides,
`migrate-incoming` on the destination (started with --incoming defer),
`migrate` on the source.

  cpr-transfer   a source whose RAM is a memfd (--mem-backend memfd, its
                 writers running) to a destination started with
                 --mem-backend memfd, which reserves address space and
                 allocates nothing: the source completes, no page went over
                 the stream (ram.normal 0, ram.transferred below the version
                 table plus slack), the destination's arrival check proves
                 every page and it runs with its writers progressing; its
                 RssAnon stays far below the guest size while its RssShmem
                 covers it (the pages it checked are the source's memfd
                 pages, mapped), and its mapping is the memfd.  The
                 migration socket is mode 0600.
  refusals       a destination with less RAM than the source refuses the
                 memory (source: failed, error naming the sizes; it runs on
                 and writes; the destination exits 1 and never ran); a
                 listener run as `nobody` at the path the source connects
                 to gets no descriptor (SO_PEERCRED: the source fails naming
                 the uid, runs on); `nobody` cannot connect to a
                 destination's socket (EACCES: owner-only).  Skipped when
                 setpriv is missing or we may not change uid.
  cpr-reboot     a source on a shared file under /dev/shm saves with
                 x-ignore-shared to a file that holds no page (a few KiB for
                 the whole guest; `livemig analyze` finds it complete),
                 quits; a new process on the same file restores and its
                 arrival check proves every page.  The
                 same save from a memfd guest is refused naming the memfd,
                 and the guest runs on.
  x-ignore-shared  in mode normal, two processes on one /dev/shm file: a
                 live migration over unix: sends no page and the arrival
                 check proves every one; a file saved with the capability
                 is refused by a destination without it (configuration).
  cancel         a cpr-transfer destination that takes the descriptors and
                 never answers: migrate_cancel ends it at once, the guest
                 runs on with every page intact.

Harness: lmtest.py (every wait bounded, a watchdog per case).
Run alone: LIVEMIG=build/tools/livemig python3 tests/integration/test_cpr.py
"""

import os
import socket
import shutil
import stat
import subprocess
import tempfile
import time

import lmtest
from lmtest import (QMPError, check, check_destination, check_runstate,
                    check_writes_advance, mem_bytes, note, ram, skip, wait_migration,
                    wait_incoming_exit, wait_listening)

MEM = "256M"
PAGE_SIZE = 4096
STREAM_SLACK = 64 << 10      # header, block list, footers, vmdesc


def cpr_pair(env, src_mem=MEM, dst_mem=MEM, rate=5000):
    src = env.guest("src", mem=src_mem, dirty_rate=rate, extra=("--mem-backend", "memfd"))
    dst = env.guest("dst", mem=dst_mem, incoming="defer", dirty_rate=1000,
                    extra=("--mem-backend", "memfd"))
    for g in (src, dst):
        g.set_caps(events=True)
        g.set_params(mode="cpr-transfer")
        check(g.cmd("query-migrate-parameters").get("mode") == "cpr-transfer",
              "%s: mode not cpr-transfer after set", g.name)
    return src, dst


def proc_status(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise lmtest.TestFailure("no %s in /proc/%d/status" % (key, pid))


def have_setpriv():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "true"], capture_output=True, timeout=10)
    return r.returncode == 0


def as_nobody(code, timeout=20):
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "/usr/bin/python3", "-c", code]


def open_dir():
    """A directory anyone may enter (the case's own dir is 0700)."""
    d = tempfile.mkdtemp(prefix="lmt-cpr-")
    os.chmod(d, 0o777)
    return d


@lmtest.test("cpr-transfer: memfd RAM handed over, no page copied, no second copy allocated")
def _(env):
    src, dst = cpr_pair(env)
    check_writes_advance(src)
    uri = "unix:" + env.path("mig.sock")
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    mode = stat.S_IMODE(os.stat(env.path("mig.sock")).st_mode)
    check(mode == 0o600, "migration socket mode %o, expected 600", mode)
    anon_before = proc_status(dst.pid, "RssAnon")
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=60)
    lmtest.check_source_done(src, info)
    pages = mem_bytes(MEM) // PAGE_SIZE
    check(ram(info, "normal") == 0, "source sent %d pages in full", ram(info, "normal"))
    check(ram(info, "transferred") < pages * 4 + STREAM_SLACK,
          "source transferred %d bytes: more than device state", ram(info, "transferred"))
    check_destination(dst, pages, dirtying=True)
    anon = proc_status(dst.pid, "RssAnon")
    shmem = proc_status(dst.pid, "RssShmem")
    note("destination RssAnon %d MiB (before %d MiB), RssShmem %d MiB, guest %d MiB"
         % (anon >> 20, anon_before >> 20, shmem >> 20, mem_bytes(MEM) >> 20))
    check(anon < mem_bytes(MEM) // 2, "destination RssAnon %d MiB for a %d MiB guest: it "
          "allocated RAM of its own", anon >> 20, mem_bytes(MEM) >> 20)
    check(shmem >= mem_bytes(MEM) * 9 // 10, "destination RssShmem %d MiB: the pages it "
          "checked are not the shared ones", shmem >> 20)
    with open("/proc/%d/maps" % dst.pid) as f:
        check("/memfd:livemig-guest-ram" in f.read(), "destination maps no guest memfd")
    info = dst.info()
    check(info["writes"] > 0, "destination writers did not run")


@lmtest.test("cpr-transfer: a destination with other sizes refuses, the source runs on")
def _(env):
    src, dst = cpr_pair(env, src_mem=MEM, dst_mem="128M")
    uri = "unix:" + env.path("mig.sock")
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, until=("failed",), timeout=60)
    msg = info.get("error-desc") or ""
    check("refused" in msg and "bytes at the source" in msg,
          "source error %r does not say the destination refused the sizes", msg)
    check_runstate(src, "running")
    check_writes_advance(src)
    lmtest.check_verified(src, mem_bytes(MEM) // PAGE_SIZE, cached=False)
    rc = wait_incoming_exit(dst, timeout=30)
    check(rc == 1, "destination exit status %r, expected 1", rc)
    check("arrival check" not in dst.stderr(), "the refusing destination ran its guest")
    note("refused: %s" % msg)


@lmtest.test("cpr-transfer: a listener of another uid gets no descriptor; strangers cannot connect")
def _(env):
    if not have_setpriv():
        skip("needs root and setpriv to run a peer as nobody")
    d = open_dir()
    try:
        path = os.path.join(d, "stranger.sock")
        code = ("import socket,sys\n"
                "s=socket.socket(socket.AF_UNIX);s.bind(%r);s.listen(1)\n"
                "print('listening',flush=True)\n"
                "c,_=s.accept()\n"
                "c.settimeout(15)\n"
                "try:\n  c.recv(1)\nexcept Exception:\n  pass\n" % path)
        p = subprocess.Popen(as_nobody(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            if p.stdout.readline().strip() != b"listening":
                p.kill()
                raise lmtest.TestFailure("the stranger did not listen: %r" % p.stderr.read())
            os.chmod(path, 0o777)    # a socket root may connect to anyway
            src = env.guest("src", mem="64M", dirty_rate=2000,
                            extra=("--mem-backend", "memfd"))
            src.set_params(mode="cpr-transfer")
            src.cmd("migrate", {"uri": "unix:" + path})
            info = wait_migration(src, until=("failed",), timeout=30)
            msg = info.get("error-desc") or ""
            check("uid 65534" in msg, "source error %r does not name the stranger's uid", msg)
            check_runstate(src, "running")
            check_writes_advance(src)
            note("source refused: %s" % msg)
        finally:
            p.kill()
            p.wait(10)
        # A destination's socket in a directory anyone may enter: owner-only.
        dst = env.guest("dst", mem="64M", incoming="defer", extra=("--mem-backend", "memfd"))
        dst.set_params(mode="cpr-transfer")
        dpath = os.path.join(d, "dst.sock")
        dst.cmd("migrate-incoming", {"uri": "unix:" + dpath})
        wait_listening("unix:" + dpath, dst)
        code = ("import socket,sys\n"
                "s=socket.socket(socket.AF_UNIX)\n"
                "try:\n  s.connect(%r)\nexcept PermissionError:\n  sys.exit(7)\n"
                "sys.exit(0)\n" % dpath)
        r = subprocess.run(as_nobody(code), capture_output=True, timeout=20)
        check(r.returncode == 7, "nobody's connect to the destination socket: exit %d (%r), "
              "expected EACCES", r.returncode, r.stderr)
        st = dst.query_migrate().get("status")
        check(st == "setup", "destination status %r after the stranger's attempt", st)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@lmtest.test("cpr-transfer: a destination that never answers: cancel is quick, the guest runs on")
def _(env):
    path = env.path("silent.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(1)
    try:
        src = env.guest("src", mem="64M", dirty_rate=2000, extra=("--mem-backend", "memfd"))
        src.set_params(mode="cpr-transfer")
        src.cmd("migrate", {"uri": "unix:" + path})
        conn, _ = lst.accept()          # takes the descriptors, never answers
        t0 = time.monotonic()
        src.cmd("migrate_cancel")
        info = wait_migration(src, until=("cancelled",), timeout=5)
        dt = time.monotonic() - t0
        check(dt < 3, "cancel took %.1f s", dt)
        check_runstate(src, "running")
        check_writes_advance(src)
        lmtest.check_verified(src, (64 << 20) // PAGE_SIZE, cached=False)
        conn.close()
        note("cancelled in %.2f s: %s" % (dt, info.get("error-desc")))
    finally:
        lst.close()


@lmtest.test("cpr-reboot: save with RAM left in its shared file, quit, restore in a new process")
def _(env):
    shm = "/dev/shm/lmt-cpr-%d" % os.getpid()
    try:
        src = env.guest("src", mem=MEM, dirty_rate=5000, extra=("--mem-backend", "file:" + shm))
        check_writes_advance(src)
        src.set_caps(events=True, x_ignore_shared=True)
        src.set_params(mode="cpr-reboot")
        state = env.path("vm.state")
        src.cmd("migrate", {"uri": "file:" + state})
        info = wait_migration(src, timeout=60)
        lmtest.check_source_done(src, info)
        pages = mem_bytes(MEM) // PAGE_SIZE
        size = os.path.getsize(state)
        check(size < pages * 4 + STREAM_SLACK, "state file is %d bytes: pages went into it",
              size)
        check(ram(info, "normal") == 0, "source sent %d pages", ram(info, "normal"))
        # the analyzer reads the state file: complete, the block left in place
        r = subprocess.run([env.livemig, "analyze", state], capture_output=True, timeout=60)
        out = r.stdout.decode("utf-8", "replace")
        check(r.returncode == 0 and "x-ignore-shared" in out,
              "livemig analyze on the state file: exit %d\n%s%s", r.returncode, out,
              r.stderr.decode("utf-8", "replace"))
        rc = src.quit()
        check(rc == 0, "source quit with %r", rc)
        dst = env.guest("dst", mem=MEM, incoming="defer", dirty_rate=1000,
                        extra=("--mem-backend", "file:" + shm))
        dst.set_caps(events=True, x_ignore_shared=True)
        dst.set_params(mode="cpr-reboot")
        dst.cmd("migrate-incoming", {"uri": "file:" + state})
        check_destination(dst, pages, dirtying=True)
        note("state file %d bytes for %d MiB of RAM" % (size, mem_bytes(MEM) >> 20))
    finally:
        try:
            os.unlink(shm)
        except OSError:
            pass


@lmtest.test("cpr-reboot refuses memfd RAM (it dies with the process); the guest runs on")
def _(env):
    src = env.guest("src", mem="64M", dirty_rate=2000, extra=("--mem-backend", "memfd"))
    src.set_caps(x_ignore_shared=True)
    src.set_params(mode="cpr-reboot")
    try:
        src.cmd("migrate", {"uri": "file:" + env.path("vm.state")})
        info = wait_migration(src, until=("failed",), timeout=30)
        msg = info.get("error-desc") or ""
    except QMPError as e:
        msg = e.desc or ""
    check("memfd" in msg and "shared file" in msg, "error %r does not explain the memfd", msg)
    check_runstate(src, "running")
    check_writes_advance(src)
    note("refused: %s" % msg)


@lmtest.test("x-ignore-shared in mode normal: a shared file stays in place; both sides must agree")
def _(env):
    shm = "/dev/shm/lmt-xis-%d" % os.getpid()
    try:
        src = env.guest("src", mem="64M", dirty_rate=3000, extra=("--mem-backend", "file:" + shm))
        src.set_caps(x_ignore_shared=True)
        # With it: no page on the stream, every page verified on arrival.
        dst = env.guest("dst", mem="64M", incoming="defer", dirty_rate=1000,
                        extra=("--mem-backend", "file:" + shm))
        dst.set_caps(x_ignore_shared=True)
        uri = "unix:" + env.path("mig.sock")
        dst.cmd("migrate-incoming", {"uri": uri})
        wait_listening(uri, dst)
        src.cmd("migrate", {"uri": uri})
        info = wait_migration(src, timeout=60)
        lmtest.check_source_done(src, info)
        check(ram(info, "normal") == 0, "source sent %d pages", ram(info, "normal"))
        check_destination(dst, (64 << 20) // PAGE_SIZE, dirtying=True)
        # The destination saves the same way; a restore without the
        # capability refuses the file at its configuration.
        dst.set_caps(x_ignore_shared=True)
        state = env.path("vm.state")
        dst.cmd("migrate", {"uri": "file:" + state})
        wait_migration(dst, timeout=60)
        bad = env.guest("bad", mem="64M", incoming="defer", extra=("--mem-backend", "file:" + shm))
        bad.cmd("migrate-incoming", {"uri": "file:" + state})
        rc = wait_incoming_exit(bad, timeout=30)
        check(rc == 1, "destination without x-ignore-shared: exit %r", rc)
        check("x-ignore-shared" in bad.stderr() and "arrival check" not in bad.stderr(),
              "the refusal does not name the capability:\n%s", bad.stderr_tail())
    finally:
        try:
            os.unlink(shm)
        except OSError:
            pass


if __name__ == "__main__":
    lmtest.main()
