#!/usr/bin/env python3
"""Damaged streams: truncated and corrupted copies of a saved guest.

A dirtying guest is stopped (QMP stop) and saved with migrate "file:PATH".
The saved file is walked with qemustream (an independent reader of QEMU's
documented format) to check its layout and find landmarks.  Then copies are
truncated at those landmarks and at fixed points, or get one byte flipped,
and each is loaded with `livemig guest --incoming file:COPY`.

A damaged copy must never load quietly and never crash:
  * exit by a signal (crash, sanitizer abort) fails the case;
  * reaching run state "running" fails the case (the damage went unnoticed);
  * structural damage (headers, names, lengths, flags, footers, EOF) must be
    refused by the loader: exit 1 with "incoming migration failed: ..."
    naming a byte offset (no further than the end of a truncated file);
    for truncation the message must also say the stream ended early;
  * damage the wire format cannot see (page contents, device table values)
    may instead be caught by the arrival check: exit 3 with bad pages > 0.
The intact file must restore and verify.
"""

import os
import random
import re
import shutil
import socket
import time

import lmtest
from lmtest import be16 as _be16, be32 as _be32, be64 as _be64, counted as _counted
import qemustream
from lmtest import (PAGE_SIZE, TestFailure, check, check_destination,
                    check_runstate, describe_exit, mem_bytes, note, ram,
                    session_dir, shared, skip, test, wait_incoming_exit,
                    wait_migration, wait_until)

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE
LOAD_TIMEOUT = 60

OFFSET_RE = re.compile(r"(?:offset|byte)s?\b[^0-9\n]{0,16}(0x[0-9a-fA-F]+|\d+)", re.IGNORECASE)
EARLY_END_RE = re.compile(r"truncat|end of (?:file|stream|input|data)|\beof\b|short read|"
                          r"unexpected(?:ly)? end|premature|incomplete|ended early|"
                          r"ends? (?:inside|in the middle|early)", re.IGNORECASE)


def saved():
    if "error" in shared:
        raise TestFailure("no saved stream: %s" % shared["error"])
    check("path" in shared, "no saved stream (the save case did not run)")
    return shared["path"]


def parsed():
    saved()
    if shared.get("parse") is None:
        skip("stream layout unknown (%s)" % shared.get("parse_error", "not parsed"))
    return shared["parse"]


def landmark(name):
    s = parsed()
    if name not in s.marks:
        skip("landmark %r not present in this stream" % name)
    return s.marks[name]


def damaged_copy(env, tag, truncate=None, flip=None):
    src = saved()
    dst = env.path("copy.mig")
    shutil.copyfile(src, dst)
    if truncate is not None:
        os.truncate(dst, truncate)
    if flip is not None:
        with open(dst, "r+b") as f:
            f.seek(flip)
            b = f.read(1)
            check(len(b) == 1, "flip offset %d beyond the %d-byte file", flip, os.path.getsize(src))
            f.seek(flip)
            f.write(bytes([b[0] ^ 0xFF]))
    return dst


def load(env, path, tag):
    """Start a destination on file:path; returns ('exit', rc, g) once it
    exits or ('running', None, g) if it accepted the stream and runs.  A
    loader that reports failure over QMP but does not exit fails here."""
    g = env.guest("dst", mem=MEM, incoming="file:" + path, connect=False)
    deadline = time.monotonic() + LOAD_TIMEOUT

    def running():
        try:
            if g._qmp is None:
                g.connect(timeout=1)
            return g.runstate() == "running"
        except TestFailure:
            return False
    while True:
        if g.returncode() is not None:
            return "exit", g.wait_exit(1), g
        if running():
            return "running", None, g
        try:
            info = g.query_migrate() if g._qmp is not None else {}
        except TestFailure:
            info = {}
        if info.get("status") in ("failed", "cancelled"):
            return "exit", wait_incoming_exit(g, LOAD_TIMEOUT), g
        check(time.monotonic() < deadline, "%s: loader neither refused nor accepted the stream "
              "within %d s; stderr:\n%s", tag, LOAD_TIMEOUT, g.stderr_tail())
        time.sleep(lmtest.POLL_S)


def expect_refused(env, tag, path, truncated_at=None, data_damage=False):
    kind, rc, g = load(env, path, tag)
    err = g.stderr()
    check(kind != "running", "%s: loaded and running: the damage went unnoticed; stderr:\n%s",
          tag, g.stderr_tail())
    g.kill()
    check(rc >= 0, "%s: loader crashed (%s); stderr:\n%s", tag, describe_exit(rc), g.stderr_tail())
    check(rc != 0, "%s: exit status 0 for a damaged stream; stderr:\n%s", tag, g.stderr_tail())
    check("AddressSanitizer" not in err and "runtime error:" not in err,
          "%s: sanitizer report:\n%s", tag, g.stderr_tail(40))
    if rc == 3:
        check(data_damage, "%s: exit 3 (arrival check) but the loader itself should have refused "
              "this damage; stderr:\n%s", tag, g.stderr_tail())
        m = re.search(r"arrival check: (\d+) pages checked, (\d+) bad", err)
        check(m is not None and int(m.group(2)) > 0,
              "%s: exit 3 without an arrival-check report of bad pages:\n%s", tag, g.stderr_tail())
        note("%s: exit 3, %s" % (tag, m.group(0)))
        return
    check(rc == 1, "%s: exit status %d, expected 1 (or 3 for undetectable data damage); "
          "stderr:\n%s", tag, rc, g.stderr_tail())
    m = re.search(r"incoming migration failed: *(\S.*)", err)
    check(m is not None, "%s: stderr lacks 'incoming migration failed: <reason>':\n%s",
          tag, g.stderr_tail())
    msg = m.group(1)
    offs = [int(x, 0) for x in OFFSET_RE.findall(msg)]
    check(offs, "%s: the error does not name a byte offset: %r", tag, msg)
    size = os.path.getsize(path)
    check(any(0 <= o <= size for o in offs), "%s: offsets %s in %r are outside the %d-byte file",
          tag, offs, msg, size)
    if truncated_at is not None:
        check(EARLY_END_RE.search(msg), "%s: the error does not say the stream ended early: %r",
              tag, msg)
    note("%s: %s" % (tag, msg))


# ----------------------------------------------------------------- save

@test("save a stopped dirtying guest with migrate file:")
def _(env):
    path = os.path.join(session_dir(), "saved.mig")
    shared["error"] = "the save case failed"
    src = env.guest("src", mem=MEM, dirty_rate=3000, seed=7)
    wait_until(lambda: src.info()["writes"] >= 3000, 30, "3000 page writes")
    src.cmd("stop")
    check_runstate(src, "paused")
    src.cmd("migrate", {"uri": "file:" + path})
    info = wait_migration(src, timeout=120)
    check(ram(info, "total") == mem_bytes(MEM), "ram.total %d", ram(info, "total"))
    note("saved %d bytes in %s ms" % (os.path.getsize(path), info.get("total-time")))
    shared.pop("error")
    shared["path"] = path
    try:
        with open(path, "rb") as f:
            data = f.read()
        shared["parse"] = qemustream.parse(data)
    except qemustream.StreamError as e:
        shared["parse"] = None
        shared["parse_error"] = "qemustream: %s" % e


@test("saved stream follows the QEMU v3 format")
def _(env):
    saved()
    s = shared.get("parse")
    check(s is not None, "%s", shared.get("parse_error"))
    check("config" in s.marks, "no CONFIGURATION section (a QEMU destination requires one)")
    check(s.blocks.get("guest.ram") == mem_bytes(MEM), "RAM blocks %r, expected guest.ram of %d "
          "bytes", s.blocks, mem_bytes(MEM))
    seen = s.pages_seen["guest.ram"]
    check(len(seen) == PAGES, "%d of %d pages present in the stream", len(seen), PAGES)
    devs = [sec for sec in s.sections if sec[3] == "guest"]
    check(devs and devs[0][1] == qemustream.FULL, "no FULL section for device 'guest': %s",
          [(sec[3], sec[1]) for sec in s.sections if sec[3] != "ram"])
    note("machine %r, %d sections, %d page records, %d zero records, vmdesc %s"
         % (s.machine, len(s.sections), len(s.page_data), len(s.zero_fill),
            "yes" if s.vmdesc is not None else "no"))


@test("intact saved stream restores and verifies")
def _(env):
    g = env.guest("dst", mem=MEM, incoming="file:" + saved())
    check_destination(g, PAGES)


# ----------------------------------------------------------------- truncation

def trunc_case(env, tag, at):
    size = os.path.getsize(saved())
    check(0 <= at < size, "truncation point %d outside the %d-byte stream", at, size)
    expect_refused(env, tag, damaged_copy(env, tag, truncate=at), truncated_at=at)


TRUNCATIONS = [
    ("empty file", lambda: 0),
    ("inside the magic", lambda: 3),
    ("right after the header", lambda: 8),
    ("inside the configuration section", lambda: landmark("config-name") + 2),
    ("inside the RAM block list", lambda: landmark("block-idstr") + 2),
    ("right after the RAM START section", lambda: landmark("after-ram-start")),
    ("inside the first page", lambda: parsed().page_data[0] + 2000),
    ("half way", lambda: os.path.getsize(saved()) // 2),
    ("before the device section", lambda: landmark("device-type")),
    ("inside the device section", lambda: landmark("device-payload") + 2),
    ("before the EOF byte", lambda: landmark("eof")),
]


def _register_trunc(tag, where):
    @test("truncated %s: refused with an offset" % tag)
    def _(env):
        trunc_case(env, "trunc-" + re.sub(r"\W+", "-", tag), where())


for _tag, _where in TRUNCATIONS:
    _register_trunc(_tag, _where)


# ----------------------------------------------------------------- corruption

# (what, landmark, data_damage): data_damage marks bytes the wire format
# cannot check; the arrival check may be what catches those.
FLIPS = [
    ("magic", "magic", False),
    ("version", "version", False),
    ("machine name", "config-name", False),
    ("ram section type", "ram-start", False),
    ("ram section id", "ram-section-id", False),
    ("ram section name", "ram-idstr", False),
    ("ram section version", "ram-version", False),
    ("MEM_SIZE total", "mem-size", False),
    ("block name in the block list", "block-idstr", False),
    ("block length", "block-length", False),
    ("EOS flags", "eos-start", False),
    ("section footer marker", "footer", False),
    ("section footer id", "footer-id", False),
    ("PART section id", "part-section-id", False),
    ("page record flags", "page-flags", False),
    ("page record block name", "page-idstr", False),
    ("page record address (beyond the block)", "page-addr", False),
    ("CONTINUE flag", "continue-flags", False),
    ("device section name", "device-idstr", False),
    ("device section version", "device-version", False),
    ("device state page count", "device-payload", False),
    ("device footer id", "device-footer-id", False),
    ("EOF byte", "eof", False),
    ("device version table entry", "device-payload-last", True),
]


def _register_flip(what, mark, data_damage):
    @test("flipped %s: refused" % what)
    def _(env):
        tag = "flip-" + re.sub(r"\W+", "-", what)
        expect_refused(env, tag, damaged_copy(env, tag, flip=landmark(mark)),
                       data_damage=data_damage)


for _what, _mark, _data in FLIPS:
    _register_flip(_what, _mark, _data)


@test("flipped byte in a page header: caught")
def _(env):
    off = parsed().page_data[len(parsed().page_data) // 2]
    expect_refused(env, "flip-page-header", damaged_copy(env, "flip-page-header", flip=off),
                   data_damage=True)


@test("flipped byte in a page body: caught by the arrival check")
def _(env):
    off = parsed().page_data[len(parsed().page_data) // 3] + 1000
    expect_refused(env, "flip-page-body", damaged_copy(env, "flip-page-body", flip=off),
                   data_damage=True)


RANDOM_FLIPS = 6


def _register_random(k):
    @test("flipped byte at random offset #%d: refused or caught" % (k + 1))
    def _(env):
        size = os.path.getsize(saved())
        s = shared.get("parse")
        end = s.eof + 1 if s is not None else size   # bytes after EOF are description only
        rng = random.Random(0x11FE + k)
        off = rng.randrange(0, end)
        note("offset %d of %d" % (off, end))
        tag = "flip-random-%d" % (k + 1)
        expect_refused(env, tag, damaged_copy(env, tag, flip=off), data_damage=True)


for _k in range(RANDOM_FLIPS):
    _register_random(_k)


# ------------------------------------------------ complete means complete

# A stream that parses cleanly to its EOF but does not carry everything the
# destination registered (its RAM block, every page of it, its device) must
# not run the guest: the loader names the EOF's byte offset and what is
# missing, over a file and over a socket alike.




HEADER = lmtest.STREAM_HEADER
EMPTY = HEADER + b"\x00"
LIST_ONLY = (HEADER + b"\x01" + _be32(1) + _counted("ram") + _be32(0) + _be32(4) +
             _be64(mem_bytes(MEM) | 0x4) + _counted("guest.ram") + _be64(mem_bytes(MEM)) +
             _be64(0x10) + b"\x7e" + _be32(1) + b"\x00")
INCOMPLETE = {
    "header, configuration and EOF": (EMPTY, r"no RAM block list.*device 'guest'"),
    "a RAM block list and EOF": (LIST_ONLY, r"16384 of 16384 pages never arrived"),
}


def expect_incomplete(msg, pattern, eof_at):
    check(re.search(r"EOF at byte offset %d\b" % eof_at, msg), "the error does not name the "
          "EOF at byte offset %d: %r", eof_at, msg)
    check(re.search(pattern, msg), "the error does not say what is missing (%s): %r",
          pattern, msg)


def _register_incomplete(what):
    data, pattern = INCOMPLETE[what]

    @test("file: %s is refused, naming what is missing" % what)
    def _(env):
        path = env.path("incomplete.mig")
        with open(path, "wb") as f:
            f.write(data)
        kind, rc, g = load(env, path, what)
        check(kind != "running", "%s: the destination runs the guest", what)
        check(rc == 1, "%s: exit status %s, expected 1; stderr:\n%s", what, rc, g.stderr_tail())
        check("arrival check" not in g.stderr(), "%s: the arrival check ran", what)
        m = re.search(r"incoming migration failed: *(\S.*)", g.stderr())
        check(m is not None, "no 'incoming migration failed' line:\n%s", g.stderr_tail())
        expect_incomplete(m.group(1), pattern, len(data) - 1)

    @test("tcp: %s is refused, SHUT(1) on the return path" % what)
    def _(env):
        port = lmtest.free_tcp_port("127.0.0.1")
        uri = "tcp:127.0.0.1:%d" % port
        g = env.guest("dst", mem=MEM, incoming=uri)
        lmtest.wait_listening(uri, g)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            # OPEN_RETURN_PATH after the header, as a source sends it.
            c.sendall(data[:len(HEADER)] + b"\x08\x00\x01\x00\x00" + data[len(HEADER):])
            reply = b""
            while len(reply) < 8:
                chunk = c.recv(8 - len(reply))
                check(chunk, "the destination closed without answering on the return path")
                reply += chunk
        check(reply == b"\x00\x01\x00\x04\x00\x00\x00\x01", "return path %r, expected "
              "SHUT with status 1", reply)
        rc = wait_incoming_exit(g, LOAD_TIMEOUT)
        check(rc == 1, "exit status %s, expected 1; stderr:\n%s", rc, g.stderr_tail())
        check("arrival check" not in g.stderr(), "%s: the arrival check ran", what)
        m = re.search(r"incoming migration failed: *(\S.*)", g.stderr())
        check(m is not None, "no 'incoming migration failed' line:\n%s", g.stderr_tail())
        expect_incomplete(m.group(1), pattern, len(data) + 5 - 1)


for _what in INCOMPLETE:
    _register_incomplete(_what)


@test("the saved stream without its device section is refused")
def _(env):
    s = parsed()
    devs = [sec for sec in s.sections if sec[3] == "guest"]
    check(devs, "no device section in the saved stream")
    start = devs[0][0]
    with open(saved(), "rb") as f:
        data = f.read()
    cut = data[:start] + data[s.eof:s.eof + 1]
    path = env.path("nodevice.mig")
    with open(path, "wb") as f:
        f.write(cut)
    kind, rc, g = load(env, path, "no device")
    check(kind != "running" and rc == 1, "no device section: %s rc %s; stderr:\n%s", kind, rc,
          g.stderr_tail())
    m = re.search(r"incoming migration failed: *(\S.*)", g.stderr())
    check(m is not None, "no 'incoming migration failed' line:\n%s", g.stderr_tail())
    expect_incomplete(m.group(1), r"device 'guest' instance 0", start)


if __name__ == "__main__":
    lmtest.main()
