#!/usr/bin/env python3
"""x-integrity: every page checksummed on the wire and in files, checked by
the library on arrival (docs/format.md section 9).

Every case starts real `livemig guest` processes and sets `x-integrity` on
both sides unless it says otherwise.

  complete   precopy (unix, dirtying), multifd with 2 channels (tcp,
             dirtying; zstd on text; legacy zero pages, i.e. ZERO records on
             the main stream), postcopy without and with the
             preempt channel, and a plain file: save and restore: each
             completes and the destination verifies every page (the arrival
             check and a fresh x-guest-verify), runs and writes.
  corrupt    LIVEMIG_FAULT flips one byte of a page after the source hashed
             it: on the main stream (src:corrupt-page:0:N), on a multifd
             channel (src:corrupt-mfpage:CH:N), on postcopy's preempt
             channel (src:corrupt-page:1:1): the destination exits 1 naming
             the block, the page, the channel and the byte offset, and never
             runs its arrival check; in precopy the source ends failed and
             runs its guest again.  A byte flipped in a page of a saved file
             is refused the same way, by the loader and by `livemig analyze`.
  mismatch   x-integrity on one side only, either way: the destination
             refuses the stream at its configuration and says so.
  mapped-ram a file saved with mapped-ram (one worker, multifd's two, a live
             save) restores and verifies; a byte flipped in a present page
             and a bit flipped in the bitmap are each refused, naming the
             page and its file offset / the block's bitmap.
  refused    x-integrity with compress: migrate is refused.

Harness: lmtest.py (every wait bounded, watchdog per case).
"""

import os
import re
import struct
import subprocess

import lmtest
from lmtest import check_dst_failed
from lmtest import (PAGE_SIZE, be64, check, check_destination, check_runstate,
                    check_source_done, check_writes_advance, counted, describe_exit,
                    free_tcp_port, mem_bytes, note, ram, test, wait_incoming_exit,
                    wait_listening, wait_migration, wait_until)

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE
BLOCK = "guest.ram"
DIRTY_RATE = 2000


def tcp_uri():
    return "tcp:127.0.0.1:%d" % free_tcp_port("127.0.0.1")


def pair(env, uri, caps=None, params=None, src_on=True, dst_on=True, dirty_rate=DIRTY_RATE,
         src_environ=None, fill=None, pattern=None):
    """A destination listening on uri and a source, both configured."""
    dst = env.guest("dst", mem=MEM, incoming="defer", dirty_rate=dirty_rate, pattern=pattern)
    src = env.guest("src", mem=MEM, dirty_rate=dirty_rate, environ=src_environ, fill=fill,
                    pattern=pattern)
    for g, on in ((dst, dst_on), (src, src_on)):
        c = dict(caps or {})
        c["x-integrity"] = on
        g.set_caps(**c)
        if params:
            g.set_params(**params)
        got = {x["capability"]: x["state"] for x in g.cmd("query-migrate-capabilities")}
        check(got.get("x-integrity") is on, "%s: x-integrity %r after set %r", g.name,
              got.get("x-integrity"), on)
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    if dirty_rate:
        wait_until(lambda: src.info()["writes"] >= 500, 30, "the source's writers to start")
    return src, dst


def summary(what, info):
    note("%s: total-time %s ms, downtime %s ms, transferred %d KiB, multifd-bytes %d KiB"
         % (what, info.get("total-time"), info.get("downtime"),
            ram(info, "transferred") >> 10, ram(info, "multifd-bytes") >> 10))




def check_src_resumed(src):
    info = wait_migration(src, until=("failed",), timeout=60)
    note("source: %s" % info.get("error-desc"))
    check_runstate(src, "running")
    check_writes_advance(src)
    return info


# The error a checksum mismatch must give: block, page, channel, offset.
def corrupt_pattern(channel):
    return (r"integrity: page 0x[0-9a-f]+ of RAM block '%s' does not match its checksum "
            r"\(%s" % (BLOCK, channel))


# ------------------------------------------------------------ complete

@test("precopy over unix, dirtying: completes, every page verified")
def _(env):
    uri = "unix:" + env.path("mig.sock")
    src, dst = pair(env, uri)
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120)
    summary("precopy", info)
    check_source_done(src, info)
    check_destination(dst, PAGES, dirtying=True)


@test("multifd, 2 channels over tcp, dirtying: completes, every page verified")
def _(env):
    uri = tcp_uri()
    src, dst = pair(env, uri, caps={"multifd": True}, params={"multifd_channels": 2})
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120)
    summary("multifd", info)
    check_source_done(src, info)
    check(ram(info, "multifd-bytes") > 0, "multifd carried nothing: %r", info.get("ram"))
    check_destination(dst, PAGES, dirtying=True)


@test("multifd, 2 channels, zstd on text: completes, every page verified")
def _(env):
    uri = tcp_uri()
    src, dst = pair(env, uri, caps={"multifd": True},
                    params={"multifd_channels": 2, "multifd_compression": "zstd"}, fill="text")
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120)
    summary("multifd zstd", info)
    check_source_done(src, info)
    check_destination(dst, PAGES, dirtying=True)


@test("multifd, 2 channels, legacy zero pages: ZERO records on the main stream, verified")
def _(env):
    uri = tcp_uri()
    src, dst = pair(env, uri, caps={"multifd": True}, fill="zero",
                    params={"multifd_channels": 2, "zero_page_detection": "legacy"})
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120)
    summary("multifd legacy zero", info)
    check_source_done(src, info)
    check(ram(info, "duplicate") > PAGES // 2, "few zero pages: %r", info.get("ram"))
    check_destination(dst, PAGES, dirtying=True)


def postcopy_case(env, preempt):
    uri = "unix:" + env.path("mig.sock")
    caps = {"postcopy-ram": True}
    if preempt:
        caps["postcopy-preempt"] = True
    src, dst = pair(env, uri, caps=caps, dirty_rate="max", pattern="sequential")
    # precopy cannot converge against writers at full speed: postcopy must
    src.set_params(downtime_limit=1, max_bandwidth=64 << 20)
    src.cmd("migrate", {"uri": uri})
    wait_until(lambda: ram(src.query_migrate(), "dirty-sync-count") >= 2, 60,
               "two dirty syncs before the switch")
    src.cmd("migrate-start-postcopy")
    return src, dst


@test("postcopy: completes, every page verified", timeout=240)
def _(env):
    src, dst = postcopy_case(env, preempt=False)
    info = wait_migration(src, timeout=120)
    summary("postcopy", info)
    check(ram(info, "postcopy-bytes") > 0, "no postcopy phase: %r", info.get("ram"))
    check_runstate(src, "postmigrate")
    check_destination(dst, PAGES, dirtying=True)


@test("postcopy-preempt: completes, every page verified", timeout=240)
def _(env):
    src, dst = postcopy_case(env, preempt=True)
    info = wait_migration(src, timeout=120)
    summary("postcopy-preempt", info)
    check(ram(info, "postcopy-bytes") > 0, "no postcopy phase: %r", info.get("ram"))
    check_runstate(src, "postmigrate")
    check_destination(dst, PAGES, dirtying=True)


def save_file(env, path):
    src = env.guest("src", mem=MEM, fill="random", seed=5)
    src.set_caps(**{"x-integrity": True})
    src.cmd("stop")
    src.cmd("migrate", {"uri": "file:" + path})
    wait_migration(src, timeout=60)
    return src


def restore(env, path, name="dst"):
    dst = env.guest(name, mem=MEM, incoming="defer")
    dst.set_caps(**{"x-integrity": True})
    dst.cmd("migrate-incoming", {"uri": "file:" + path})
    return dst


def analyze(env, path):
    return subprocess.run([env.livemig, "analyze", path], capture_output=True, text=True,
                          timeout=60)


@test("a plain file: save and restore: completes, every page verified; analyze agrees")
def _(env):
    path = env.path("guest.mig")
    save_file(env, path)
    r = analyze(env, path)
    check(r.returncode == 0, "livemig analyze: exit %d\n%s%s", r.returncode, r.stdout, r.stderr)
    dst = restore(env, path)
    check_destination(dst, PAGES)


# ------------------------------------------------------------ corrupt

@test("a byte flipped in a page on the main stream: refused, the source resumes")
def _(env):
    uri = "unix:" + env.path("mig.sock")
    src, dst = pair(env, uri, src_environ={"LIVEMIG_FAULT": "src:corrupt-page:0:200"})
    src.cmd("migrate", {"uri": uri})
    check_dst_failed(dst, corrupt_pattern("main stream") + r", record at byte offset \d+")
    check_src_resumed(src)
    check("injected fault: src corrupt-page on channel 0" in src.stderr(),
          "the source does not log the injection:\n%s",
          src.stderr_tail())


@test("a byte flipped in a page on a multifd channel: refused, the source resumes")
def _(env):
    uri = tcp_uri()
    src, dst = pair(env, uri, caps={"multifd": True}, params={"multifd_channels": 2},
                    src_environ={"LIVEMIG_FAULT": "src:corrupt-mfpage:1:5"})
    src.cmd("migrate", {"uri": uri})
    check_dst_failed(dst, r"multifd channel 1: " + corrupt_pattern("packet \\d+ at byte "
                      "offset \\d+ of the channel"))
    check_src_resumed(src)


@test("a byte flipped in a page on the preempt channel: refused before it is installed",
      timeout=240)
def _(env):
    src, dst = postcopy_case_fault(env)
    check_dst_failed(dst, corrupt_pattern("preempt channel"))
    info = wait_migration(src, until=("failed",), timeout=60)
    note("source: %s" % info.get("error-desc"))


def postcopy_case_fault(env):
    uri = "unix:" + env.path("mig.sock")
    src, dst = pair(env, uri, caps={"postcopy-ram": True, "postcopy-preempt": True},
                    dirty_rate="max", pattern="sequential",
                    src_environ={"LIVEMIG_FAULT": "src:corrupt-page:1:1"})
    # the source's writers never let precopy finish; the destination faults
    # pages at once when it runs (the preempt channel carries them)
    src.set_params(downtime_limit=1, max_bandwidth=64 << 20)
    dst.expect_exit = True
    src.cmd("migrate", {"uri": uri})
    wait_until(lambda: ram(src.query_migrate(), "dirty-sync-count") >= 1, 60,
               "a dirty sync before the switch")
    src.cmd("migrate-start-postcopy")
    return src, dst


def first_page_payload(data):
    """File offset of the first PAGE record's payload: be64(0 | PAGE) then
    the block's counted name (the first record of a pass names it)."""
    head = be64(0x08) + counted(BLOCK)
    i = data.find(head)
    check(i > 0, "no PAGE record for page 0 of %s in the file", BLOCK)
    return i + len(head)


@test("a byte flipped in a page of a saved file: the restore and analyze refuse it")
def _(env):
    path = env.path("guest.mig")
    save_file(env, path)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = first_page_payload(data) + 1000
    data[at] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    r = analyze(env, path)
    check(r.returncode != 0 and "does not match its checksum" in r.stdout + r.stderr,
          "livemig analyze accepted a corrupt page: exit %d\n%s%s", r.returncode, r.stdout,
          r.stderr)
    dst = restore(env, path)
    check_dst_failed(dst, corrupt_pattern("main stream") + r", record at byte offset %d"
                      % (at - 1000 - 8 - len(counted(BLOCK))))


# ------------------------------------------------------------ mapped-ram

def save_mapped(env, path, channels=None, live=False, name="src", fill="random"):
    src = env.guest(name, mem=MEM, fill=fill, seed=5, dirty_rate=2000 if live else None)
    caps = {"x-integrity": True, "mapped-ram": True}
    if channels:
        caps["multifd"] = True
    src.set_caps(**caps)
    if channels:
        src.set_params(multifd_channels=channels)
    if live:
        wait_until(lambda: src.info()["writes"] >= 500, 30, "the source's writers to start")
    else:
        src.cmd("stop")
    src.cmd("migrate", {"uri": "file:" + path})
    wait_migration(src, timeout=60)
    return src


def restore_mapped(env, path, channels=None, name="dst"):
    dst = env.guest(name, mem=MEM, incoming="defer")
    caps = {"x-integrity": True, "mapped-ram": True}
    if channels:
        caps["multifd"] = True
    dst.set_caps(**caps)
    if channels:
        dst.set_params(multifd_channels=channels)
    dst.cmd("migrate-incoming", {"uri": "file:" + path})
    return dst


def mapped_layout(path):
    """The first block's bitmap and pages offsets, from its mapped-ram header
    (docs/format.md section 6): walk header, configuration, ram START."""
    with open(path, "rb") as f:
        d = f.read(8192)
    pos = 8 + 1 + 4 + 9                      # QEVM, version, CONFIGURATION, name
    check(d[pos] == 0x05, "no capabilities subsection in %s", path)
    pos += 1 + 1 + d[pos + 1] + 4            # type, counted name, version
    count = struct.unpack(">I", d[pos:pos + 4])[0]
    pos += 4
    caps = []
    for _ in range(count):
        caps.append(d[pos + 1:pos + 1 + d[pos]].decode())
        pos += 1 + d[pos]
    check(sorted(caps) == ["mapped-ram", "x-integrity"], "capabilities %r", caps)
    pos += 1 + 4                             # START, section id
    pos += 1 + d[pos] + 8                    # "ram", instance, version
    pos += 8                                 # MEM_SIZE
    pos += 1 + d[pos] + 8                    # block idstr, length
    _, _, bitmap, pages = struct.unpack(">IQQQ", d[pos:pos + 28])
    return bitmap, pages


def flip(path, at, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ mask]))


@test("mapped-ram: a saved file restores, every page verified (1 worker, multifd 2, live)")
def _(env):
    # the live save starts from zero pages that its writers fill at random:
    # the file has absent (zero) pages and present ones
    for i, (channels, live) in enumerate(((None, False), (2, False), (None, True))):
        path = env.path("guest%d.mig" % i)
        src = save_mapped(env, path, channels, live, name="src%d" % i,
                          fill="zero" if live else "random")
        if i == 0:
            # the table between bitmap and pages leaves QEMU's layout readable
            r = analyze(env, path)
            check(r.returncode == 0, "livemig analyze: exit %d\n%s%s", r.returncode, r.stdout,
                  r.stderr)
        dst = restore_mapped(env, path, channels, name="dst%d" % i)
        check_destination(dst, PAGES)
        check(src.quit() == 0 and dst.quit() == 0, "a guest did not quit cleanly")
        note("channels %s, live %s: verified" % (channels, live))


@test("mapped-ram: a flipped page byte is refused, naming the page and its file offset")
def _(env):
    path = env.path("guest.mig")
    save_mapped(env, path)
    bitmap, pages = mapped_layout(path)
    with open(path, "rb") as f:
        f.seek(bitmap)
        word = int.from_bytes(f.read(8), "little")
    page = next(i for i in range(64) if word >> i & 1)      # a present page
    at = pages + page * PAGE_SIZE + 123
    flip(path, at)
    dst = restore_mapped(env, path)
    check_dst_failed(dst, r"integrity: page 0x%x of RAM block '%s' does not match its "
                      r"checksum \(file offset %d\)" % (page * PAGE_SIZE, BLOCK, at - 123))


@test("mapped-ram: a flipped bitmap bit is refused, naming the block's bitmap")
def _(env):
    path = env.path("guest.mig")
    save_mapped(env, path)
    bitmap, _ = mapped_layout(path)
    flip(path, bitmap + 3, 0x10)
    dst = restore_mapped(env, path)
    check_dst_failed(dst, r"integrity: the bitmap or checksum table of RAM block '%s' "
                      r"\(bitmap at file offset %d" % (BLOCK, bitmap))


# ------------------------------------------------------------ mismatch

@test("x-integrity on the source only: the destination refuses the configuration")
def _(env):
    uri = "unix:" + env.path("mig.sock")
    src, dst = pair(env, uri, dst_on=False)
    src.cmd("migrate", {"uri": uri})
    check_dst_failed(dst, r"configuration: the stream was saved with x-integrity .* this "
                      r"side has the capability off")
    check_src_resumed(src)


@test("x-integrity on the destination only: the destination refuses the configuration")
def _(env):
    uri = "unix:" + env.path("mig.sock")
    src, dst = pair(env, uri, src_on=False)
    src.cmd("migrate", {"uri": uri})
    check_dst_failed(dst, r"configuration: the stream was saved without x-integrity .* "
                      r"this side has the capability on")
    check_src_resumed(src)


@test("x-integrity with compress: migrate is refused")
def _(env):
    g = env.guest("src", mem=MEM)
    for caps, uri, what in (({"compress": True}, "unix:" + env.path("x.sock"), "compress"),):
        g.set_caps(**dict(caps, **{"x-integrity": True}))
        try:
            g.cmd("migrate", {"uri": uri})
            raise lmtest.TestFailure("migrate with x-integrity and %s was accepted" % what)
        except lmtest.QMPError as e:
            check("x-integrity cannot be combined with" in str(e), "refusal: %s", e)
            note("refused: %s" % e)
        g.set_caps(**dict({k: False for k in caps}, **{"x-integrity": False}))
    check_runstate(g, "running")


if __name__ == "__main__":
    lmtest.main()
