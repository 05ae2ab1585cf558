#!/usr/bin/env python3
"""`livemig vm`: a real KVM guest migrated between two processes.

Every case runs `livemig vm` processes with the VM's own test guest
(tools/livemig/vmguest/pattern.s, env LIVEMIG_VM_GUEST): a boot sector
that increments the first word of every page from 1 MiB to the end of RAM
in order, forever, and counts passes in a header at 0x500, printing each
pass on COM1.  The destinations run with --check: before the guest runs
there, its memory must be a consistent snapshot of that pattern (every
page at pass P or P + 1, the P + 1 ones a prefix that matches the cursor),
or the VM exits 3.

  precopy      a running 16 MiB VM to a tcp: destination: both sides
               complete, the source is stopped (postmigrate, its vCPU no
               longer exits), the destination checked its arrival, runs on
               (its pass counter and its serial output go past the source's
               last pass), and a stopped snapshot of it passes x-vm-check
               and a check of a pmemsave dump done here, in Python.  The
               KVM dirty log is the tracker, with at least two syncs.
  multifd      the same over 2 multifd channels.
  mapped-ram   a save of the running VM to a mapped-ram file (without and
               with 2 multifd channels), `livemig analyze --json` naming
               every vCPU state device in it, and a restore from it into a
               fresh process (incoming defer) that checks and runs on.
  kills        a migration slowed by max-bandwidth, one side SIGKILLed
               mid-way: with the destination gone the source fails the
               migration and its guest runs on (pass counter and serial
               output advance, its pattern still consistent); with the
               source gone the destination exits 1 and never ran its guest.
  bad state    a plain-stream save whose vCPU state is then made invalid
               in the file (an MSR index KVM does not know; CR0 with paging
               but not protection; a register block of the wrong size): the
               restore fails with an error naming
               the device and what KVM refused, the destination exits 1,
               and its guest never ran (no serial output).

Skipped, saying why, without /dev/kvm or without `livemig vm` in the
build.  Guest code is emulated on the test machines (~1 M instructions/s),
so the guest is small and every wait is generous but bounded.
"""

import json
import os
import re
import struct
import time

import lmtest
from lmtest import (Guest, QMPError, TestFailure, check, describe_exit, free_tcp_port,
                    note, reap, skip, spawn, test, wait_migration, wait_until)

VM_GUEST = os.environ.get("LIVEMIG_VM_GUEST", "")
MEM = "16M"
PAGE = 4096
HDR = 0x500
MAGIC = 0x47564d4c
WAIT_S = 60
STATE_DEVICES = ("kvm-regs", "kvm-sregs", "kvm-msrs", "kvm-events", "kvm-mp-state",
                 "kvm-clock")


def need_kvm():
    if not VM_GUEST or not os.path.exists(VM_GUEST):
        skip("livemig vm was not built (no linux/kvm.h): no test guest at %r" % VM_GUEST)
    if not os.path.exists("/dev/kvm"):
        skip("/dev/kvm is missing: no KVM on this machine")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        skip("/dev/kvm is not readable and writable by this user")


class VM(Guest):
    """One `livemig vm` process: QMP socket, stdout/stderr and serial files."""

    def __init__(self, env, name, mem=MEM, incoming=None, check_arrival=True,
                 connect=True, extra=()):
        self.env = env
        self.name = name
        self.mem = mem
        self.qmp_path = env.path(name + ".qmp")
        self.out_path = env.path(name + ".out")
        self.err_path = env.path(name + ".err")
        self.serial_path = env.path(name + ".serial")
        argv = [env.livemig, "vm", "--mem", mem, "--qmp", "unix:" + self.qmp_path,
                "--serial", self.serial_path]
        if incoming:
            argv += ["--incoming", incoming]
        else:
            argv += ["--boot", VM_GUEST]
        if check_arrival:
            argv += ["--check"]
        argv += list(extra)
        self.argv = argv
        self.expect_exit = False
        self.quit_seconds = 0.0
        self._qmp = None
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = spawn(argv, out, err, cwd=env.dir)
        env.guests.append(self)
        if connect:
            self.connect(60.0)

    def info(self):
        return self.cmd("x-vm-info")

    def serial(self):
        try:
            with open(self.serial_path, "rb") as f:
                return f.read().decode("ascii", "replace")
        except OSError:
            return ""

    def serial_passes(self):
        return [int(x, 16) for x in re.findall(r"pass ([0-9a-f]{8})\n", self.serial())]


def wait_pass(vm, at_least, what):
    return wait_until(lambda: vm.info()["pass"] >= at_least and vm.info(), WAIT_S,
                      "%s: %s (pass >= %d)" % (vm.name, what, at_least))


def check_pattern_dump(path, mem):
    """The test guest's rule (vmcheck.h), on a pmemsave dump, in Python."""
    with open(path, "rb") as f:
        ram = f.read()
    check(len(ram) == mem, "pmemsave wrote %d bytes, expected %d", len(ram), mem)
    magic, p, c, start, n = struct.unpack_from("<5I", ram, HDR)
    check(magic == MAGIC, "dump: no test guest header (magic %#x)", magic)
    counts = [struct.unpack_from("<I", ram, start + i * PAGE)[0] for i in range(n)]
    k = 0
    while k < n and counts[k] == p + 1:
        k += 1
    bad = [i for i in range(k, n) if counts[i] != p]
    check(not bad, "dump: page %s has count %s; pass %d cursor %d, %d pages ahead",
          bad[:1], [counts[i] for i in bad[:1]], p, c, k)
    check(k == c or k == c + 1 or (k == 0 and c == n),
          "dump: %d pages ahead of pass %d but the cursor is %d", k, p, c)
    return p


def check_arrived(src, dst, env):
    """After a completed migration: source stopped, destination checked, runs on."""
    lmtest.check_runstate(src, "postmigrate")
    si = src.info()
    check(not si["running"], "source vCPU still running after the migration: %r", si)
    last = max(src.serial_passes() or [0])
    err = dst.stderr()
    check("arrival check: consistent" in err, "%s: no consistent arrival check on stderr:\n%s",
          dst.name, dst.stderr_tail())
    lmtest.check_runstate(dst, "running")
    # the guest goes on where it was: passes beyond the source's last
    wait_pass(dst, si["pass"] + 3, "guest progress after arrival")
    wait_until(lambda: max(dst.serial_passes() or [0]) >= last + 2, WAIT_S,
               "%s: serial output past the source's last pass %d" % (dst.name, last))
    first = min(dst.serial_passes())
    check(first >= last, "destination printed pass %d, before the source's last %d",
          first, last)
    # the source stayed stopped all that time
    check(src.info()["exits"] == si["exits"], "source vCPU ran after the migration: %r -> %r",
          si["exits"], src.info()["exits"])
    # a stopped snapshot passes both checks
    dst.cmd("stop")
    c = dst.cmd("x-vm-check")
    check(c["ok"], "%s: x-vm-check: %r", dst.name, c)
    dump = env.path(dst.name + ".ram")
    mem = lmtest.mem_bytes(dst.mem)
    dst.cmd("pmemsave", {"val": 0, "size": mem, "filename": dump})
    p = check_pattern_dump(dump, mem)
    check(p == c["pass"], "pmemsave pass %d, x-vm-check pass %d", p, c["pass"])
    dst.cmd("cont")
    wait_pass(dst, p + 1, "progress after cont")
    note("%s: source stopped at pass %d, destination checked at %d" % (dst.name, si["pass"], p))


def live_migration(env, caps=None, params=None, postcopy=False, cpr=False):
    need_kvm()
    extra = ["--mem-backend", "memfd"] if cpr else []
    src = VM(env, "src", check_arrival=False, extra=extra)
    wait_pass(src, 3, "guest running")
    port = free_tcp_port("127.0.0.1")
    uri = "unix:" + env.path("cpr.sock") if cpr else "tcp:127.0.0.1:%d" % port
    dst = VM(env, "dst", incoming="defer", extra=extra)
    for vm in (src, dst):
        if caps:
            vm.set_caps(**caps)
        if params:
            vm.set_params(**params)
    dst.cmd("migrate-incoming", {"uri": uri})
    lmtest.wait_listening(uri, dst)
    src.cmd("migrate", {"uri": uri})
    if postcopy:
        wait_until(lambda: lmtest.ram(src.query_migrate(), "dirty-sync-count") >= 1, WAIT_S,
                   "a dirty sync before the switch")
        src.cmd("migrate-start-postcopy")
    info = wait_migration(src, timeout=WAIT_S)
    dinfo = wait_migration(dst, timeout=WAIT_S)
    check(info.get("x-dirty-tracker") == "kvm-dirty-log", "tracker %r",
          info.get("x-dirty-tracker"))
    check(lmtest.ram(info, "dirty-sync-count") >= (1 if postcopy or cpr else 2),
          "dirty-sync-count %r", lmtest.ram(info, "dirty-sync-count"))
    if cpr:
        check(lmtest.ram(info, "normal") == 0 and lmtest.ram(info, "duplicate") == 0,
              "cpr-transfer sent pages: %r", info.get("ram"))
        with open("/proc/%d/status" % dst.pid) as f:
            st = dict(l.split(":", 1) for l in f.read().splitlines() if ":" in l)
        anon_kib = int(st["RssAnon"].split()[0])
        shmem_kib = int(st["RssShmem"].split()[0])
        mem_kib = lmtest.mem_bytes(dst.mem) // 1024
        # the guest's pages are the memfd's (shared), and less anonymous
        # memory than one copy of them is resident (sanitizers add their own)
        check(shmem_kib >= mem_kib // 2 and anon_kib < mem_kib,
              "the destination VM has %d KiB anonymous, %d KiB shared memory for a %d KiB "
              "guest: a copy of its RAM?", anon_kib, shmem_kib, mem_kib)
        note("cpr-transfer: the destination maps the source's memfd (RssAnon %d KiB, RssShmem "
             "%s)" % (anon_kib, st["RssShmem"].strip()))
    if postcopy:
        check(lmtest.ram(info, "postcopy-bytes") > 0, "no postcopy phase: %r", info.get("ram"))
        check((dinfo.get("x-postcopy-requests") or 0) > 0,
              "the vCPU never faulted on a missing page (through KVM): %r", dinfo)
        note("postcopy: the vCPU faulted on %d pages through KVM and userfaultfd, fault p50 "
             "%s us" % (dinfo.get("x-postcopy-requests"), dinfo.get("x-postcopy-latency-p50-us")))
    note("%s: %d ms, downtime %s ms, %d syncs, %d pages sent" % (
        "postcopy" if postcopy else "cpr-transfer" if cpr else "multifd" if caps else "precopy",
        info.get("total-time", -1), info.get("downtime"),
        lmtest.ram(info, "dirty-sync-count"), lmtest.ram(info, "normal") +
        lmtest.ram(info, "duplicate")))
    check_arrived(src, dst, env)


@test("precopy: a running KVM guest migrates and runs on, pattern intact")
def t_precopy(env):
    live_migration(env)


@test("postcopy with preempt: the vCPU faults on missing pages through KVM, pattern intact")
def t_postcopy(env):
    # precopy cannot finish at 16 MiB/s with a 1 ms limit: postcopy does
    live_migration(env, caps={"postcopy-ram": True, "postcopy-preempt": True},
                   params={"max-bandwidth": 16 << 20, "downtime-limit": 1}, postcopy=True)


@test("cpr-transfer: a KVM guest's memfd is handed over, not copied; it runs on")
def t_cpr_transfer(env):
    live_migration(env, params={"mode": "cpr-transfer"}, cpr=True)


@test("multifd 2 channels: a running KVM guest migrates and runs on, pattern intact")
def t_multifd(env):
    live_migration(env, caps={"multifd": True}, params={"multifd-channels": 2})


def slow_migration(env):
    """A source and a destination with a migration at 4 MB/s, half-way."""
    need_kvm()
    src = VM(env, "src", check_arrival=False)
    wait_pass(src, 2, "guest running")
    port = free_tcp_port("127.0.0.1")
    uri = "tcp:127.0.0.1:%d" % port
    dst = VM(env, "dst", incoming=uri)
    lmtest.wait_listening(uri, dst)
    src.set_params(**{"max-bandwidth": 4 << 20})
    src.cmd("migrate", {"uri": uri})
    wait_until(lambda: src.query_migrate().get("status") == "active" and
               lmtest.ram(src.query_migrate(), "transferred") > (2 << 20), WAIT_S,
               "the migration to be under way")
    return src, dst


@test("kill the destination mid-migration: the source VM keeps running")
def t_kill_destination(env):
    src, dst = slow_migration(env)
    dst.kill()
    info = wait_migration(src, until=("failed",), timeout=WAIT_S)
    note("source: %s" % info.get("error-desc"))
    lmtest.check_runstate(src, "running")
    p = src.info()["pass"]
    wait_pass(src, p + 3, "guest progress after the failed migration")
    last = max(src.serial_passes())
    wait_until(lambda: max(src.serial_passes()) > last, WAIT_S, "more serial output")
    src.cmd("stop")
    c = src.cmd("x-vm-check")
    check(c["ok"], "source after the failed migration: x-vm-check %r", c)
    src.cmd("cont")


@test("kill the source mid-migration: the destination fails and never runs the guest")
def t_kill_source(env):
    src, dst = slow_migration(env)
    src.kill()
    rc = dst.wait_exit(WAIT_S)
    check(rc == 1, "destination: %s (expected exit status 1); stderr:\n%s", describe_exit(rc),
          dst.stderr_tail())
    check("incoming migration failed" in dst.stderr(), "destination stderr:\n%s",
          dst.stderr_tail())
    check(dst.serial() == "", "the destination's guest ran: %r", dst.serial()[:200])
    note("destination: %s" % dst.stderr_tail(1))


@test("QMP: pmemsave and x-vm-check refuse what they cannot do")
def t_qmp_refusals(env):
    need_kvm()
    vm = VM(env, "vm", check_arrival=False)
    wait_pass(vm, 1, "guest running")
    mem = lmtest.mem_bytes(vm.mem)
    for args, want in (({"val": mem - 4096, "size": 8192, "filename": env.path("x")},
                        "not inside"),
                       ({"val": -1, "size": 1, "filename": env.path("x")}, "not inside"),
                       ({"val": 0, "size": 1}, "needs"),
                       ({"val": 0, "size": 1, "filename": env.path("no/such/dir")},
                        "cannot open")):
        try:
            vm.cmd("pmemsave", args)
            raise TestFailure("pmemsave %r succeeded" % args)
        except QMPError as e:
            check(want in e.desc, "pmemsave %r: %r does not say %r", args, e.desc, want)
    try:
        vm.cmd("x-vm-check")
        raise TestFailure("x-vm-check of a running guest succeeded")
    except QMPError as e:
        check("running" in e.desc, "x-vm-check while running: %r", e.desc)
    # a dump of part of RAM is exactly that part: the header page
    vm.cmd("stop")
    vm.cmd("pmemsave", {"val": HDR, "size": 20, "filename": env.path("hdr")})
    with open(env.path("hdr"), "rb") as f:
        magic, p, _c, start, n = struct.unpack("<5I", f.read())
    check(magic == MAGIC and start == 1 << 20 and n == (mem >> 12) - 256,
          "header dump: magic %#x start %#x pages %d", magic, start, n)
    check(vm.cmd("x-vm-check")["pass"] == p, "x-vm-check and pmemsave disagree on the pass")
    vm.cmd("cont")


def analyze(env, path):
    out_path, err_path = env.path("analyze.out"), env.path("analyze.err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = spawn([env.livemig, "analyze", path, "--json"], out, err)
    try:
        rc = p.wait(WAIT_S)
    finally:
        reap(p, 0)
    with open(out_path) as f:
        text = f.read()
    check(rc == 0, "livemig analyze %s: %s: %s", path, describe_exit(rc),
          open(err_path).read()[-2000:])
    return json.loads(text)


def save(env, src, path, caps=None):
    if caps:
        src.set_caps(**caps)
    src.cmd("migrate", {"uri": "file:" + path})
    wait_migration(src, timeout=WAIT_S)


def mapped_ram_round_trip(env, channels=None):
    need_kvm()
    caps = {"mapped-ram": True}
    params = {}
    if channels:
        caps["multifd"] = True
        params["multifd-channels"] = channels
    src = VM(env, "src", check_arrival=False)
    wait_pass(src, 3, "guest running")
    path = env.path("vm.mig")
    if params:
        src.set_params(**params)
    save(env, src, path, caps=caps)
    doc = analyze(env, path)
    names = {s["idstr"] for s in doc["sections"]}
    missing = [d for d in STATE_DEVICES if d not in names]
    check(not missing, "analyze lists no section for %s (it has %s)", missing, sorted(names))
    dst = VM(env, "dst", incoming="defer")
    dst.set_caps(**caps)
    if params:
        dst.set_params(**params)
    dst.cmd("migrate-incoming", {"uri": "file:" + path})
    wait_migration(dst, timeout=WAIT_S)
    check_arrived(src, dst, env)


@test("mapped-ram: save a running KVM guest to a file, analyze it, restore and run on")
def t_mapped_ram(env):
    mapped_ram_round_trip(env)


@test("mapped-ram with multifd 2 channels: save, analyze, restore, run on")
def t_mapped_ram_multifd(env):
    mapped_ram_round_trip(env, channels=2)


def section_payload(doc, idstr):
    secs = [s for s in doc["sections"] if s["idstr"] == idstr and s["type"] == "FULL"]
    check(len(secs) == 1, "expected one FULL %r section: %r", idstr, secs)
    return secs[0]["start"] + 1 + 4 + 1 + len(idstr) + 4 + 4


def restore_refused(env, src_path, name, patch, want):
    """Copy src_path, patch it, restore it: the VM must exit 1 naming `want`."""
    with open(src_path, "rb") as f:
        data = bytearray(f.read())
    patch(data)
    path = env.path(name + ".mig")
    with open(path, "wb") as f:
        f.write(data)
    dst = VM(env, name, incoming="file:" + path, connect=False)
    rc = dst.wait_exit(WAIT_S)
    err = dst.stderr()
    check(rc == 1, "%s: %s (expected exit status 1); stderr:\n%s", name, describe_exit(rc),
          dst.stderr_tail())
    for w in want:
        check(w in err, "%s: stderr does not say %r:\n%s", name, w, dst.stderr_tail())
    check(dst.serial() == "", "%s: the guest ran: serial %r", name, dst.serial()[:200])
    note("%s: %s" % (name, [l for l in err.splitlines() if "failed" in l][:1]))


@test("bad vCPU state: a stream KVM refuses fails the restore, the guest never runs")
def t_bad_state(env):
    need_kvm()
    src = VM(env, "src", check_arrival=False)
    wait_pass(src, 2, "guest running")
    path = env.path("good.mig")
    save(env, src, path)
    doc = analyze(env, path)

    def bad_msr(data):
        at = section_payload(doc, "kvm-msrs")
        n = struct.unpack_from(">I", data, at)[0]
        check(n > 0, "the kvm-msrs section has no MSR")
        struct.pack_into(">IQ", data, at + 4, 0xdeadbeef, 0x1234)

    def bad_cr0(data):
        at = section_payload(doc, "kvm-sregs")
        size = struct.unpack_from(">I", data, at)[0]
        check(size >= 232, "kvm-sregs has %d bytes", size)
        # struct kvm_sregs: 8 segments x 24 bytes, gdt and idt x 16, then cr0
        struct.pack_into("<Q", data, at + 4 + 224, 0x80000000)   # PG without PE

    def bad_size(data):
        at = section_payload(doc, "kvm-regs")
        size = struct.unpack_from(">I", data, at)[0]
        struct.pack_into(">I", data, at, size + 8)

    restore_refused(env, path, "msr", bad_msr, ["kvm-msrs", "KVM refused MSR 0xdeadbeef"])
    restore_refused(env, path, "size", bad_size, ["kvm-regs", "bytes of general registers from the source"])
    restore_refused(env, path, "cr0", bad_cr0, ["kvm-sregs", "KVM refused", "cr0=0x80000000"])
    # and the good file still restores
    dst = VM(env, "dst", incoming="file:" + path)
    wait_migration(dst, timeout=WAIT_S)
    wait_pass(dst, src.info()["pass"] + 1, "guest progress after restore")


if __name__ == "__main__":
    lmtest.main()
