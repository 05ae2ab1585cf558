#!/usr/bin/env python3
"""Migration to and from files: mapped-ram round trips, the analyzer on
mapped-ram files, and malformed files that the loader must refuse.

Everything goes through real `livemig guest` processes and QMP, the way a
user saves and restores a guest: the source gets the capabilities and
parameters, `migrate {"uri": "file:PATH[,offset=N]"}`; the destination is
started with `--incoming defer`, gets the same capabilities and parameters
(both sides must agree, as in QEMU) and then `migrate-incoming` with the
same URI.

  round trips  stopped guests (QMP stop first) and live ones (writers
               running during the save), mapped-ram without multifd and
               with 1, 2 and 4 channels, with and without direct-io
               (skipped when the file system refuses O_DIRECT), random and
               text fills; file:PATH,offset=N (the N bytes before the
               stream are untouched, the analyzer finds the block at the
               shifted offsets); the plain stream to a file.  Checked: the
               source completed; the file is at most RAM + FILE_SLACK bytes
               (a page dirtied again is rewritten in its slot, never
               appended: the live cases also demand that pages really were
               sent more than once); the destination completed, its
               arrival check and a fresh x-guest-verify report 0 bad, it
               runs (and its writers progress after a live save).  Also: a
               direct-io save at an unaligned offset is refused and the
               guest runs on; a file saved with N channels restores with
               other counts and with direct-io; a save at offset=N over an
               older, fuller save leaves stale bytes in the slots of pages
               that are now zero, which the restore and the analyzer must
               ignore; a cancelled live save leaves a file that is refused,
               and the guest saves again fine; on a full file system (a
               small tmpfs in a private mount namespace, skipped where
               unshare/mount are refused) every kind of save fails with
               ENOSPC and the offset, and the guest runs on.
  slow file    a direct-io mapped-ram save to, and a restore from, a file
               whose block device the process may only use at SLOW_BPS (a
               blkio / io cgroup throttle; skipped where there is none, or
               no block device under the test directory): migrate_cancel
               mid-way must end the save (status cancelled) or the restore
               (the destination exits 1 naming the cancel) within
               CANCEL_BOUND_S -- the writes or reads already queued behind
               the one running are dropped, not waited for -- and leave no
               I/O worker behind; the guest then saves and restores fine.
  accounting   a live mapped-ram save counts the pages it writes in
               ram.transferred and switches over after a few passes; a
               mapped-ram save obeys max-bandwidth like a plain one.
  analyzer     `livemig analyze --json` on a mapped-ram save of a stopped
               guest whose RAM is partly zero: the block, its header /
               bitmap / pages offsets as this file's own parser finds them,
               pages present = the guest's non-zero pages (its version
               table, read from the saved device state) = the bits of the
               bitmap read straight from the file; `--extract-ram` gives
               the same image as a plain-stream save of the same stopped
               guest, and as reading every present page at its slot.
  malformed    copies of a good mapped-ram file with one thing wrong:
               truncated at several cut points, the bitmap offset past the
               end of the file, bitmap bits past the block's end, a wrong
               page size, a pages region overlapping the bitmap, a bitmap
               overlapping the stream, versions 2 and 0; a mapped-ram file
               loaded without the capability, a plain file loaded with it,
               a 64 MiB file loaded into a 128 MiB guest.  Each must make `livemig guest --incoming defer` exit 1
               with "incoming migration failed: ..." naming the block and
               the header's offset (or a byte offset / the capability, where
               the damage is in the stream), with no RESUME event, no
               arrival check and never the run state "running".

The header is located by parsing the stream from its start (QEVM header,
CONFIGURATION with its capabilities subsection, the `ram` START section,
MEM_SIZE, the block's counted idstr and be64 length): docs/format.md
section 6, reference section 5.

Harness: lmtest.py (every wait bounded, a watchdog per case).
Run alone: LIVEMIG=build/tools/livemig python3 tests/integration/test_file.py
(LMTEST_ONLY=substring selects cases; every case builds what it needs).
"""

import hashlib
import json
import mmap
import os
import random
import re
import struct
import time

import lmtest
from lmtest import (PAGE_SIZE, QMPError, TestFailure, check, check_destination,
                    check_runstate, check_writes_advance, describe_exit, mem_bytes,
                    note, ram, reap, skip, spawn, test, wait_incoming_exit,
                    wait_migration, wait_until)

MEM = "64M"
RAM = mem_bytes(MEM)
PAGES = RAM // PAGE_SIZE
BLOCK = "guest.ram"
# Stream bytes around the pages: header, configuration, block list, the
# bitmap padded to 1 MiB, the device state (4 bytes a page), VMDESCRIPTION.
FILE_SLACK = 2 << 20
LIVE_RATE = 30000             # pages/s written during a live save
# With direct-io every dirty page is a synchronous 4 KiB O_DIRECT write (one
# worker does ~25k a second here): a rate that one channel can outrun.
LIVE_RATE_DIRECT = 5000
HDR_SIZE = 28
MR_ALIGN = 1 << 20
SAVE_TIMEOUT = 60
# A 64 MiB live save needs well under a second here; this bound only keeps
# a save that never switches over from eating the file's time budget.
LIVE_SAVE_TIMEOUT = 30
ANALYZE_TIMEOUT = 60


# ----------------------------------------------------------------- helpers

def sha256_file(path, start=0, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            b = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


def odirect_refused(directory):
    """None if O_DIRECT works for files in `directory`, else the reason."""
    path = os.path.join(directory, "odirect-probe")
    buf = mmap.mmap(-1, PAGE_SIZE)       # page aligned, as O_DIRECT wants
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError as e:
        return "open(O_DIRECT): %s" % e
    try:
        os.write(fd, buf)
    except OSError as e:
        return "write(O_DIRECT): %s" % e
    finally:
        os.close(fd)
        os.unlink(path)
        buf.close()
    return None


def configure(g, mapped=True, channels=None, direct=None):
    """Capabilities and parameters of one side; None leaves one unset.
    Checks that the side reports what was set."""
    caps = {"events": True, "mapped_ram": mapped}
    if channels is not None:
        caps["multifd"] = True
    g.set_caps(**caps)
    params = {}
    if channels is not None:
        params["multifd_channels"] = channels
    if direct is not None:
        params["direct_io"] = direct
    if params:
        g.set_params(**params)
    got = {c["capability"]: c["state"] for c in g.cmd("query-migrate-capabilities")}
    check(got.get("mapped-ram") is mapped, "%s: mapped-ram %r after set %r", g.name,
          got.get("mapped-ram"), mapped)
    gp = g.cmd("query-migrate-parameters")
    for k, v in params.items():
        check(gp.get(k.replace("_", "-")) == v, "%s: %s is %r after set %r", g.name, k,
              gp.get(k.replace("_", "-")), v)


def uri_of(path, offset=None):
    return "file:" + path + (",offset=%d" % offset if offset is not None else "")


def save(src, path, offset=None, timeout=SAVE_TIMEOUT):
    """migrate to file:PATH; returns the completed query-migrate."""
    src.cmd("migrate", {"uri": uri_of(path, offset)})
    info = wait_migration(src, timeout=timeout)
    check(ram(info, "total") == mem_bytes(src.mem), "%s: ram.total %d", src.name,
          ram(info, "total"))
    check(os.path.isfile(path), "no file at %s after a completed save", path)
    return info


def stopped_source(env, name="src", mem=MEM, fill="random", writes=0):
    """A guest that wrote `writes` pages and was then stopped over QMP."""
    g = env.guest(name, mem=mem, fill=fill, dirty_rate=20000 if writes else None, seed=7)
    if writes:
        wait_until(lambda: g.info()["writes"] >= writes, 30, "%d page writes" % writes)
    g.cmd("stop")
    check_runstate(g, "paused")
    return g


def restore(env, path, mem=MEM, mapped=True, channels=None, direct=None, offset=None,
            dirtying=False, name="dst"):
    """A --incoming defer destination that loads path and must verify."""
    dst = env.guest(name, mem=mem, incoming="defer",
                    dirty_rate=1000 if dirtying else None)
    configure(dst, mapped, channels, direct)
    dst.cmd("migrate-incoming", {"uri": uri_of(path, offset)})
    check_destination(dst, mem_bytes(mem) // PAGE_SIZE, dirtying=dirtying)
    check(not dst.qmp.events_named("STOP"), "%s: STOP event on a restore", dst.name)
    return dst


def check_file_size(path, mem=MEM, base=0):
    size = os.path.getsize(path)
    check(size <= base + mem_bytes(mem) + FILE_SLACK,
          "%s is %d bytes for %d bytes of RAM (offset %d): more than one copy of some pages?",
          path, size, mem_bytes(mem), base)
    return size


def need_odirect(env):
    why = odirect_refused(env.dir)
    if why:
        skip("the file system under %s refuses O_DIRECT (%s)" % (env.dir, why))


# ----------------------------------------------------------------- the file, read by us

def parse_layout(path, base=0):
    """Walk the stream from `base` to the first block's mapped-ram header.

    Returns {"idstr", "length", "header", "version", "page_size", "bitmap",
    "pages", "caps"}: "header" is the header's absolute file offset."""
    with open(path, "rb") as f:
        f.seek(base)
        d = f.read(8192)
    pos = [0]

    def take(n):
        check(pos[0] + n <= len(d), "%s: stream ends at %d while parsing its start", path,
              base + pos[0])
        b = d[pos[0]:pos[0] + n]
        pos[0] += n
        return b

    def counted():
        return take(take(1)[0]).decode()

    magic, version = struct.unpack(">II", take(8))
    check(magic == 0x5145564D and version == 3, "%s: header %#x v%d", path, magic, version)
    check(take(1) == b"\x07", "%s: no CONFIGURATION after the header", path)
    (n,) = struct.unpack(">I", take(4))
    take(n)
    caps = []
    while d[pos[0]] == 0x05:
        take(1)
        name = counted()
        (sv,) = struct.unpack(">I", take(4))
        check(name == "configuration/capabilities" and sv == 1, "subsection %r v%d", name, sv)
        (count,) = struct.unpack(">I", take(4))
        caps += [counted() for _ in range(count)]
    t, sid = struct.unpack(">BI", take(5))
    name = counted()
    inst, ver = struct.unpack(">II", take(8))
    check(t == 1 and name == "ram" and ver == 4, "%s: first section %d %r v%d", path, t, name,
          ver)
    (word,) = struct.unpack(">Q", take(8))
    check(word & 0xFFF == 0x004, "%s: no MEM_SIZE record (word %#x)", path, word)
    idstr = counted()
    (length,) = struct.unpack(">Q", take(8))
    lay = {"idstr": idstr, "length": length, "header": base + pos[0], "caps": caps}
    if "mapped-ram" in caps:
        v, ps, bm, pg = struct.unpack(">IQQQ", take(HDR_SIZE))
        lay.update(version=v, page_size=ps, bitmap=bm, pages=pg)
    return lay


def bitmap_bytes(npages):
    return (npages + 63) // 64 * 8


def read_bitmap(path, lay):
    """Present pages, from the file's bitmap (little-endian 64-bit words)."""
    npages = lay["length"] // PAGE_SIZE
    with open(path, "rb") as f:
        f.seek(lay["bitmap"])
        raw = f.read(bitmap_bytes(npages))
    check(len(raw) == bitmap_bytes(npages), "short bitmap")
    bits = int.from_bytes(raw, "little")
    return [i for i in range(npages) if bits >> i & 1]


def image_from_file(path, lay, present):
    """The block's memory as the layout says: present pages at their slots."""
    img = bytearray(lay["length"])
    with open(path, "rb") as f:
        for i in present:
            f.seek(lay["pages"] + i * PAGE_SIZE)
            img[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = f.read(PAGE_SIZE)
    return bytes(img)


def check_layout(path, lay, base=0):
    """What docs/format.md section 6 says the writer computes."""
    npages = lay["length"] // PAGE_SIZE
    check(lay["idstr"] == BLOCK, "block %r", lay["idstr"])
    check(lay["version"] == 1 and lay["page_size"] == PAGE_SIZE,
          "header version %d page size %d", lay["version"], lay["page_size"])
    check(lay["bitmap"] == lay["header"] + HDR_SIZE, "bitmap at %d, header at %d",
          lay["bitmap"], lay["header"])
    want = (lay["bitmap"] + bitmap_bytes(npages) + MR_ALIGN - 1) // MR_ALIGN * MR_ALIGN
    check(lay["pages"] == want, "pages at %d, expected %d (bitmap end rounded up to 1 MiB)",
          lay["pages"], want)
    check(os.path.getsize(path) >= lay["pages"] + lay["length"],
          "%s ends at %d, before its pages region does (%d)", path, os.path.getsize(path),
          lay["pages"] + lay["length"])


# ----------------------------------------------------------------- the analyzer

def run_analyze(env, path, *args, tag="analyze"):
    out_path, err_path = env.path(tag + ".out"), env.path(tag + ".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = spawn([env.livemig, "analyze", path] + list(args), out, err)
    try:
        rc = p.wait(ANALYZE_TIMEOUT)
    except Exception:
        raise TestFailure("livemig analyze %s did not finish within %d s"
                          % (path, ANALYZE_TIMEOUT))
    finally:
        reap(p, 0)
    with open(out_path, "rb") as f:
        out = f.read().decode("utf-8", "replace")
    with open(err_path, "rb") as f:
        err = f.read().decode("utf-8", "replace")
    check(rc == 0, "livemig analyze %s %s: %s; stderr:\n%s", path, " ".join(args),
          describe_exit(rc), err[-3000:])
    return out


def analyze_json(env, path, *args, tag="analyze"):
    out = run_analyze(env, path, "--json", *args, tag=tag)
    try:
        doc = json.loads(out)
    except ValueError as e:
        raise TestFailure("livemig analyze --json printed invalid JSON (%s): %r" % (e, out[:300]))
    check(doc.get("complete") is True and doc.get("error") is None, "analysis of %s: %r",
          path, doc.get("error"))
    return doc


def the_block(doc):
    check([b["idstr"] for b in doc["ram_blocks"]] == [BLOCK], "blocks %r",
          [b["idstr"] for b in doc["ram_blocks"]])
    return doc["ram_blocks"][0]


def check_analysis(env, path, lay, base=0, tag="analyze"):
    """The analyzer and our own parser agree on the layout; every present
    page is one normal page (a page is never stored twice)."""
    args = ("--offset", str(base)) if base else ()
    doc = analyze_json(env, path, *args, tag=tag)
    check(doc["mapped_ram"] is True, "mapped_ram %r", doc["mapped_ram"])
    b = the_block(doc)
    m = b.get("mapped_ram") or {}
    got = (m.get("header_offset"), m.get("bitmap_offset"), m.get("pages_offset"))
    check(got == (lay["header"], lay["bitmap"], lay["pages"]),
          "analyzer: header/bitmap/pages at %r, the file says %r", got,
          (lay["header"], lay["bitmap"], lay["pages"]))
    c = b["counts"]
    present = read_bitmap(path, lay)
    check(c["pages"] == lay["length"] // PAGE_SIZE and c["pages_present"] == len(present) and
          c["normal_pages"] == len(present), "analyzer counts %r; the bitmap has %d bits set",
          c, len(present))
    return doc, present


# ----------------------------------------------------------------- round trips

def round_trip(env, fill="random", live=False, channels=None, direct=None, mapped=True,
               offset=None, rate=LIVE_RATE):
    """Save one guest to a file and restore it into a fresh one.  With an
    offset, the file first holds `offset` random bytes the save must keep."""
    if direct:
        need_odirect(env)
    path = env.path("save.mig")
    prefix = None
    if offset is not None:
        prefix = random.Random(offset).randbytes(offset)
        with open(path, "wb") as f:
            f.write(prefix)
    if live:
        src = env.guest("src", mem=MEM, fill=fill, dirty_rate=rate, seed=5)
        check_writes_advance(src, min_delta=1000)
    else:
        src = stopped_source(env, fill=fill, writes=2000)
    configure(src, mapped, channels, direct)
    info = save(src, path, offset, timeout=LIVE_SAVE_TIMEOUT if live else SAVE_TIMEOUT)
    check_runstate(src, "postmigrate")
    size = os.path.getsize(path)
    if mapped:
        size = check_file_size(path, base=offset or 0)
    normal = ram(info, "normal")
    if live:
        # Pages sent more than once prove the size check above meant something.
        check(normal > PAGES and ram(info, "dirty-sync-count") >= 2,
              "live save: %d normal pages for %d, %d syncs: the guest did not dirty pages "
              "during the save", normal, PAGES, ram(info, "dirty-sync-count"))
    if prefix is not None:
        check(sha256_file(path, 0, len(prefix)) == hashlib.sha256(prefix).hexdigest(),
              "the %d bytes before offset=%d were changed by the save", len(prefix), offset)
    lay = None
    if mapped:
        lay = parse_layout(path, offset or 0)
        check_layout(path, lay, offset or 0)
        check_analysis(env, path, lay, offset or 0)
    restore(env, path, mapped=mapped, channels=channels, direct=direct, offset=offset,
            dirtying=live)
    note("%s: %d bytes for %d of RAM, %d normal pages sent, %d syncs, save %d ms"
         % (os.path.basename(path), size, RAM, normal, ram(info, "dirty-sync-count"),
            info.get("total-time", -1)))
    return path, lay


def rt_case(name, **kw):
    test(name)(lambda env: round_trip(env, **kw))


rt_case("mapped-ram, stopped guest, no multifd", fill="random")
rt_case("mapped-ram, stopped guest, multifd 1 channel", fill="random", channels=1)
rt_case("mapped-ram, stopped guest, multifd 2 channels, text", fill="text", channels=2)
rt_case("mapped-ram, stopped guest, multifd 4 channels", fill="random", channels=4)
rt_case("mapped-ram, live guest, no multifd", live=True)
rt_case("mapped-ram, live guest, multifd 1 channel", live=True, channels=1)
rt_case("mapped-ram, live guest, multifd 2 channels", live=True, channels=2)
rt_case("mapped-ram, live guest, multifd 4 channels, text", live=True, fill="text", channels=4)
rt_case("mapped-ram + direct-io, stopped guest, no multifd", direct=True)
rt_case("mapped-ram + direct-io, stopped guest, multifd 2 channels", direct=True, channels=2)
rt_case("mapped-ram + direct-io, live guest, multifd 1 channel", live=True, direct=True,
        channels=1, rate=LIVE_RATE_DIRECT)
rt_case("mapped-ram + direct-io, live guest, multifd 4 channels, text", live=True, direct=True,
        fill="text", channels=4, rate=LIVE_RATE_DIRECT)
rt_case("mapped-ram, offset=N (unaligned), multifd 2: bytes before N untouched", channels=2,
        offset=123457)
rt_case("mapped-ram + direct-io, offset=N (4 KiB aligned), live, multifd 2", live=True,
        direct=True, channels=2, offset=3 << 20, rate=LIVE_RATE_DIRECT)
rt_case("plain stream to a file, stopped guest", mapped=False)
rt_case("plain stream to a file, live guest", mapped=False, live=True, fill="text")


@test("direct-io needs a 4 KiB aligned offset: refused, the guest keeps running")
def _(env):
    need_odirect(env)
    src = env.guest("src", mem=MEM, dirty_rate=2000)
    configure(src, True, 2, True)
    path = env.path("save.mig")
    try:
        src.cmd("migrate", {"uri": uri_of(path, 1000)})
        info = wait_migration(src, until=("failed",), timeout=SAVE_TIMEOUT)
        msg = info.get("error-desc") or ""
    except QMPError as e:
        msg = e.desc or ""
    check("direct-io" in msg and "offset" in msg, "error %r does not explain the offset", msg)
    check_runstate(src, "running")
    check_writes_advance(src)
    note("refused: %s" % msg)


@test("live mapped-ram save: page writes count as transferred; it switches over in a few passes")
def _(env):
    src = env.guest("src", mem=MEM, fill="random", dirty_rate=LIVE_RATE, seed=9)
    check_writes_advance(src, min_delta=1000)
    configure(src, True, 2)
    samples = []
    src.cmd("migrate", {"uri": uri_of(env.path("save.mig"))})
    info = wait_migration(src, timeout=LIVE_SAVE_TIMEOUT, on_sample=samples.append)
    written, transferred = ram(info, "normal-bytes"), ram(info, "transferred")
    syncs = ram(info, "dirty-sync-count")
    mbps = max([ram(i, "mbps", 0) or 0 for i in samples] or [0])
    note("normal-bytes %d, transferred %d, %d syncs, highest mbps sampled %.1f, total %d ms"
         % (written, transferred, syncs, mbps, info.get("total-time", -1)))
    problems = []
    # QEMU counts every page a mapped-ram save writes in ram.transferred; the
    # bandwidth estimate that decides the switch-over is made from it.
    if transferred < written:
        problems.append("ram.transferred %d < ram.normal-bytes %d: the page writes are not "
                        "counted" % (transferred, written))
    # Bandwidth known, 64 MiB of RAM fits in downtime-limit (300 ms) many
    # times over: a correct estimate switches over within a few passes.
    if syncs > 20:
        problems.append("%d dirty syncs before switching over (a correct bandwidth estimate "
                        "needs a few)" % syncs)
    check(not problems, "; ".join(problems))


@test("max-bandwidth limits a mapped-ram save as it limits a plain one")
def _(env):
    src = stopped_source(env, fill="random")
    limit = 64 << 20                    # 1 s for 64 MiB
    src.set_params(max_bandwidth=limit)
    configure(src, False)
    plain = save(src, env.path("plain.mig"))
    configure(src, True, 2)
    mapped = save(src, env.path("mapped.mig"))
    note("max-bandwidth %d B/s: plain save %d ms, mapped-ram save %d ms"
         % (limit, plain["total-time"], mapped["total-time"]))
    want = 0.7 * RAM / limit * 1000
    check(plain["total-time"] >= want, "plain save in %d ms at max-bandwidth %d B/s "
          "(expected >= %.0f ms)", plain["total-time"], limit, want)
    check(mapped["total-time"] >= want, "mapped-ram save in %d ms at max-bandwidth %d B/s "
          "(expected >= %.0f ms, as the plain save took %d ms): the limit does not apply to "
          "page writes", mapped["total-time"], limit, want, plain["total-time"])


@test("cancelled live mapped-ram save: guest runs on, partial file refused, a new save works")
def _(env):
    src = env.guest("src", mem=MEM, dirty_rate="max", seed=11)
    check_writes_advance(src, min_delta=1000)
    configure(src, True, 2)
    src.set_params(downtime_limit=1)    # never fits: the save iterates until cancelled
    path = env.path("save.mig")
    src.cmd("migrate", {"uri": uri_of(path)})
    syncs = wait_until(lambda: ram(src.query_migrate(), "dirty-sync-count") >= 3 and
                       ram(src.query_migrate(), "dirty-sync-count"), 20,
                       "three passes of the save")
    src.cmd("migrate_cancel")
    info = wait_migration(src, until=("cancelled",), timeout=20)
    check_runstate(src, "running")
    check_writes_advance(src)
    msg = refused(env, path, name="partial")
    check_names_offset(msg, "cancelled save")
    # The same guest, stopped, saved over the partial file, restores whole.
    src.set_params(downtime_limit=300)
    src.cmd("stop")
    save(src, path)
    check_file_size(path)
    restore(env, path)
    note("cancelled after at least %d syncs; status %s" % (syncs, info.get("status")))


@test("mapped-ram at offset=N over an older save: the slots of pages now zero are ignored")
def _(env):
    base = (1 << 20) + 7
    path = env.path("save.mig")
    prefix = random.Random(base).randbytes(base)
    with open(path, "wb") as f:
        f.write(prefix)
    a = stopped_source(env, name="a", fill="random")
    configure(a, True, 2)
    save(a, path, base)
    b = stopped_source(env, name="b", fill="zero", writes=PAGES // 4)
    configure(b, True, 2)
    save(b, path, base)
    check(sha256_file(path, 0, base) == hashlib.sha256(prefix).hexdigest(),
          "the %d bytes before the offset were changed", base)
    lay = parse_layout(path, base)
    check_layout(path, lay, base)
    present = set(read_bitmap(path, lay))
    clear = [i for i in range(PAGES) if i not in present]
    check(clear and len(present) > 0, "%d pages present: expected a partly zero guest",
          len(present))
    with open(path, "rb") as f:
        f.seek(lay["pages"] + clear[0] * PAGE_SIZE)
        stale = f.read(PAGE_SIZE)
    check(stale != bytes(PAGE_SIZE), "page %d's slot holds zeros: the older save's data is "
          "not there, so this case proves nothing", clear[0])
    out = env.path("ram")
    analyze_json(env, path, "--offset", str(base), "--extract-ram", out)
    with open(os.path.join(out, BLOCK), "rb") as f:
        img = f.read()
    nz = [i for i in clear[:2000] if img[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] != bytes(PAGE_SIZE)]
    check(not nz, "the analyzer extracted stale data for pages whose bit is clear: %s", nz[:8])
    restore(env, path, channels=4, offset=base)


@test("a mapped-ram file restores with other channel counts and direct-io than it was saved")
def _(env):
    files = sample(env)
    restore(env, files["mapped4"], name="nomf")            # saved with 4 channels
    restore(env, files["mapped"], channels=3, name="mf3")  # saved without multifd
    if odirect_refused(env.dir) is None:
        restore(env, files["mapped"], channels=2, direct=True, name="dio")
    else:
        note("direct-io part skipped: O_DIRECT refused here")


def small_fs_livemig(env, size="16m"):
    """A wrapper that runs livemig in a private mount namespace with a
    `size` tmpfs on env.path("small") (gone with the process); skips the
    case where unshare or mount is not permitted."""
    small = env.path("small")
    os.mkdir(small)
    probe = spawn(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs %s" % small],
                  open(os.devnull, "wb"), open(os.devnull, "wb"))
    if reap(probe, 30) != 0:
        skip("cannot mount a tmpfs in a private mount namespace (unshare -m) here")
    wrap = env.path("small-fs.sh")
    with open(wrap, "w") as f:
        f.write("#!/bin/sh\nexec unshare -m sh -c 'mount -t tmpfs -o size=%s tmpfs \"$0\" && "
                "exec \"$@\"' %s %s \"$@\"\n" % (size, small, env.livemig))
    os.chmod(wrap, 0o755)
    return wrap, small


@test("a full file system: each kind of save fails naming ENOSPC and the offset; the guest runs on")
def _(env):
    wrap, small = small_fs_livemig(env)
    real, env.livemig = env.livemig, wrap
    try:
        src = env.guest("src", mem=MEM, dirty_rate=2000)
    finally:
        env.livemig = real
    for label, mapped, channels, direct in (("plain stream", False, None, None),
                                            ("mapped-ram", True, None, None),
                                            ("mapped-ram, 2 channels", True, 2, None),
                                            ("mapped-ram, 2 channels, direct-io", True, 2, True)):
        if direct and odirect_refused(env.dir):
            continue
        configure(src, mapped, channels, direct)
        src.cmd("migrate", {"uri": uri_of(os.path.join(small, "save.mig"))})
        info = wait_migration(src, until=("failed",), timeout=SAVE_TIMEOUT)
        msg = info.get("error-desc") or ""
        check("No space left on device" in msg and re.search(r"offset \d+", msg),
              "%s on a full file system: error-desc %r", label, msg)
        check_runstate(src, "running")
        check_writes_advance(src)
        note("%s: %s" % (label, msg))
    # The guest is whole: saved where there is room, it restores and verifies.
    configure(src, True, 2, False)
    path = env.path("save.mig")
    save(src, path, timeout=LIVE_SAVE_TIMEOUT)
    restore(env, path, channels=2, dirtying=True)


# A slow file: the block throttle of a cgroup.  Only direct I/O is charged
# to the process that issues it (buffered writes are written back later by
# kernel threads), hence direct-io in these cases.

SLOW_BPS = 1 << 20
# A mapped-ram worker has up to 4 requests of at most 1 MiB out (the pool's
# ring): waiting for the queue takes ~4 s at SLOW_BPS, interrupting it only
# the request being written (<= 1 s).
CANCEL_BOUND_S = 2.5


def block_device(directory):
    """"MAJ:MIN" of the whole disk under directory, or skip."""
    st = os.stat(directory)
    sysdir = "/sys/dev/block/%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
    if not os.path.exists(sysdir):
        skip("%s is not on a block device (device %d:%d)"
             % (directory, os.major(st.st_dev), os.minor(st.st_dev)))
    sysdir = os.path.realpath(sysdir)
    if os.path.exists(os.path.join(sysdir, "partition")):
        sysdir = os.path.dirname(sysdir)        # throttles apply to whole disks
    with open(os.path.join(sysdir, "dev")) as f:
        return f.read().strip()


def cgroup_mounts():
    """{"v1": blkio hierarchy, "v2": unified hierarchy} as mounted here."""
    out = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype, opts = line.split()[:4]
            if fstype == "cgroup" and "blkio" in opts.split(","):
                out.setdefault("v1", mnt)
            elif fstype == "cgroup2":
                out.setdefault("v2", mnt)
    return out


class Throttle:
    """A cgroup whose processes get at most `bps` bytes a second of `op`
    ("read" or "write") I/O on the disk under `directory`: cgroup v1 blkio,
    or v2 where the io controller is enabled for children of its root.
    Skips the case where neither is usable (no block device, no controller,
    not permitted).  add(pid) moves a process in, with all its threads and
    the ones it starts later; close() moves them back where they were and
    removes the group."""

    def __init__(self, env, directory, bps, op):
        dev = block_device(directory)
        mounts = cgroup_mounts()
        self.pids = []
        self.dir = None
        if "v1" in mounts and os.path.exists(os.path.join(
                mounts["v1"], "blkio.throttle.%s_bps_device" % op)):
            self.v, self.root = 1, mounts["v1"]
            knob, value = "blkio.throttle.%s_bps_device" % op, "%s %d" % (dev, bps)
        elif "v2" in mounts and "io" in self._read(mounts["v2"], "cgroup.subtree_control"):
            self.v, self.root = 2, mounts["v2"]
            knob, value = "io.max", "%s %sbps=%d" % (dev, op[0], bps)
        else:
            skip("no blkio (cgroup v1) or io (cgroup v2) controller to throttle I/O with")
        path = os.path.join(self.root, "lmtest-%d-%s" % (os.getpid(), os.path.basename(env.dir)))
        try:
            os.mkdir(path)
        except OSError as e:
            skip("cannot create a cgroup under %s: %s" % (self.root, e))
        self.dir = path
        try:
            with open(os.path.join(path, knob), "w") as f:
                f.write(value + "\n")
        except OSError as e:
            self.close()
            skip("cannot throttle %s to %d B/s (%s = %r): %s" % (dev, bps, knob, value, e))
        note("cgroup v%d %s: %s %s at %d B/s" % (self.v, path, op, dev, bps))

    @staticmethod
    def _read(d, name):
        try:
            with open(os.path.join(d, name)) as f:
                return f.read()
        except OSError:
            return ""

    def _cgroup_of(self, pid):
        with open("/proc/%d/cgroup" % pid) as f:
            for line in f:
                _n, ctrls, path = line.rstrip("\n").split(":", 2)
                if (self.v == 1 and "blkio" in ctrls.split(",")) or (self.v == 2 and not ctrls):
                    return os.path.join(self.root, path.lstrip("/"))
        raise TestFailure("pid %d has no cgroup v%d entry" % (pid, self.v))

    def add(self, pid):
        self.pids.append((pid, self._cgroup_of(pid)))
        with open(os.path.join(self.dir, "cgroup.procs"), "w") as f:
            f.write("%d\n" % pid)

    def close(self):
        for pid, home in self.pids:
            try:
                with open(os.path.join(home, "cgroup.procs"), "w") as f:
                    f.write("%d\n" % pid)
            except OSError:
                pass            # it exited
        self.pids = []
        if self.dir:
            # An exited process may linger in the group for a moment.
            wait_until(lambda: not self._read(self.dir, "cgroup.procs").strip(), 10,
                       "%s to empty" % self.dir)
            os.rmdir(self.dir)
            self.dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def io_workers(g):
    """Names of g's mapped-ram I/O threads (the pool names them lm-mapram/N)."""
    names = []
    for t in os.listdir("/proc/%d/task" % g.pid):
        try:
            with open("/proc/%d/task/%s/comm" % (g.pid, t)) as f:
                comm = f.read().strip()
        except OSError:
            continue            # gone meanwhile
        if comm.startswith("lm-mapram"):
            names.append(comm)
    return names


@test("cancel a direct-io mapped-ram save to a slow file: cancelled at once, no queue drained")
def _(env):
    need_odirect(env)
    src = stopped_source(env, fill="random")
    configure(src, True, None, True)        # one I/O worker, every page write throttled
    path = env.path("slow.mig")
    with Throttle(env, env.dir, SLOW_BPS, "write") as thr:
        thr.add(src.pid)
        src.cmd("migrate", {"uri": uri_of(path)})
        # Pages land at SLOW_BPS, so the worker's queue is full by now.
        wait_until(lambda: os.stat(path).st_blocks * 512 >= 2 << 20, 30,
                   "2 MiB of pages in %s" % path)
        info = src.query_migrate()
        check(info.get("status") == "active", "save status %r with 2 MiB of %d written",
              info.get("status"), RAM)
        t0 = time.monotonic()
        src.cmd("migrate_cancel")
        info = wait_migration(src, until=("cancelled",), timeout=60)
        took = time.monotonic() - t0
        note("cancelled after %.2f s with %d MiB of pages on disk (bound %.1f s)"
             % (took, os.stat(path).st_blocks * 512 >> 20, CANCEL_BOUND_S))
        check(took <= CANCEL_BOUND_S, "migrate_cancel took %.2f s on a file written at %d "
              "B/s (bound %.1f s): the save waited for its queued page writes", took,
              SLOW_BPS, CANCEL_BOUND_S)
        check(not io_workers(src), "I/O workers left after the cancel: %s", io_workers(src))
    check_runstate(src, "paused")
    # Unthrottled, the same guest saves over the partial file and restores.
    save(src, path)
    check_file_size(path)
    restore(env, path)


@test("cancel a direct-io mapped-ram restore from a slow file: the destination gives up at once")
def _(env):
    need_odirect(env)
    src = stopped_source(env, fill="random")
    configure(src, True)
    path = env.path("save.mig")
    save(src, path)
    dst = env.guest("dst", mem=MEM, incoming="defer")
    configure(dst, True, None, True)        # every page read throttled
    with Throttle(env, env.dir, SLOW_BPS, "read") as thr:
        thr.add(dst.pid)
        dst.cmd("migrate-incoming", {"uri": uri_of(path)})
        wait_until(lambda: dst.query_migrate().get("status") == "active", 30,
                   "the destination to be loading")
        wait_until(lambda: len(io_workers(dst)) == 1, 10, "its I/O worker")
        t0 = time.monotonic()
        dst.cmd("migrate_cancel")
        try:
            rc = wait_incoming_exit(dst, timeout=CANCEL_BOUND_S + 10)
        except lmtest.Timeout:
            raise TestFailure("the destination still loads %.0f s after migrate_cancel, from "
                              "a file read at %d B/s (bound %.1f s): the cancel did not "
                              "interrupt its reads" % (time.monotonic() - t0, SLOW_BPS,
                                                       CANCEL_BOUND_S))
        took = time.monotonic() - t0
    note("destination exited %.2f s after migrate_cancel (bound %.1f s)" % (took, CANCEL_BOUND_S))
    check(rc == 1, "destination: %s after migrate_cancel, expected 1; stderr:\n%s",
          describe_exit(rc), dst.stderr_tail())
    m = ERR_LINE.search(dst.stderr())
    check(m and "cancel" in m.group(1), "destination's reason does not name the cancel:\n%s",
          dst.stderr_tail())
    check(took <= CANCEL_BOUND_S, "the destination took %.2f s to give up a load from a file "
          "read at %d B/s (bound %.1f s): it read on after the cancel", took, SLOW_BPS,
          CANCEL_BOUND_S)
    restore(env, path, direct=True, name="dst2")


# ----------------------------------------------------------------- analyzer

def sample(env, mem=MEM, tag="a"):
    """A stopped guest with some zero pages, saved three times: a plain
    stream, mapped-ram, mapped-ram with multifd 4.  Built once per file and
    memory size in the session dir; returns {"plain", "mapped", "mapped4"}."""
    key = "sample-%s-%s" % (mem, tag)
    if key in lmtest.shared:
        return lmtest.shared[key]
    d = os.path.join(lmtest.session_dir(), key)
    os.makedirs(d, exist_ok=True)
    files = {k: os.path.join(d, k + ".mig") for k in ("plain", "mapped", "mapped4")}
    src = stopped_source(env, name="sample", mem=mem, fill="zero",
                         writes=mem_bytes(mem) // PAGE_SIZE // 2)
    configure(src, False)
    save(src, files["plain"])
    configure(src, True)
    save(src, files["mapped"])
    configure(src, True, 4)
    save(src, files["mapped4"])
    src.quit()
    lmtest.shared[key] = files
    return files


@test("analyze: a mapped-ram file's block, offsets and present pages (= non-zero pages)")
def _(env):
    files = sample(env)
    path = files["mapped"]
    lay = parse_layout(path)
    check_layout(path, lay)
    doc, present = check_analysis(env, path, lay)
    check(doc["configuration"]["capabilities"] == ["mapped-ram"] and lay["caps"] == ["mapped-ram"],
          "capabilities %r / %r", doc["configuration"]["capabilities"], lay["caps"])
    b = the_block(doc)
    check(b["size"] == RAM and doc["ram_total"] == RAM, "block size %d, total %d", b["size"],
          doc["ram_total"])
    versions = lmtest.guest_version_table(path, doc)
    nonzero = [i for i, v in enumerate(versions) if v]
    check(0 < len(nonzero) < PAGES, "the sample guest should be partly zero: %d of %d pages "
          "written", len(nonzero), PAGES)
    check(present == nonzero, "bitmap: %d pages present, the guest has %d non-zero pages "
          "(first differences %s)", len(present), len(nonzero),
          sorted(set(present) ^ set(nonzero))[:8])
    check(b["counts"]["pages_present"] == len(nonzero), "pages_present %d, non-zero pages %d",
          b["counts"]["pages_present"], len(nonzero))
    kinds = [s["type"] for s in doc["sections"] if s["idstr"] == "ram"]
    check(kinds[0] == "START" and kinds[-1] == "END", "ram sections %r", kinds)
    check(doc["totals"]["page_records"] == 0, "page records in the main stream of a mapped-ram "
          "file: %r", doc["totals"])
    # The same guest saved with 4 channels: the same layout and pages.
    lay4 = parse_layout(files["mapped4"])
    check({k: lay4[k] for k in ("header", "bitmap", "pages")} ==
          {k: lay[k] for k in ("header", "bitmap", "pages")}, "layout with 4 channels %r vs %r",
          lay4, lay)
    check(read_bitmap(files["mapped4"], lay4) == present, "the 4-channel save has another bitmap")
    rc_text = run_analyze(env, path, tag="text")
    for needle in (BLOCK, str(lay["pages"])):
        check(needle in rc_text, "text report lacks %r:\n%s", needle, rc_text[:2000])
    note("%d of %d pages present; header at %d, bitmap at %d, pages at %d"
         % (len(present), PAGES, lay["header"], lay["bitmap"], lay["pages"]))


@test("analyze --extract-ram: mapped-ram image = plain-stream image = pages read at their slots")
def _(env):
    files = sample(env)
    imgs = {}
    for k in ("plain", "mapped", "mapped4"):
        out = env.path("ram-" + k)
        doc = analyze_json(env, files[k], "--extract-ram", out, tag="x-" + k)
        check(doc["extracted"] is True, "%s: extracted %r", k, doc["extracted"])
        p = os.path.join(out, BLOCK)
        check(os.path.getsize(p) == RAM, "%s: image of %d bytes", k, os.path.getsize(p))
        imgs[k] = sha256_file(p)
    check(imgs["mapped"] == imgs["plain"], "the mapped-ram save extracts to another image than "
          "the plain-stream save of the same stopped guest")
    check(imgs["mapped4"] == imgs["plain"], "the 4-channel mapped-ram save extracts to another "
          "image than the plain-stream save")
    lay = parse_layout(files["mapped"])
    mine = image_from_file(files["mapped"], lay, read_bitmap(files["mapped"], lay))
    check(hashlib.sha256(mine).hexdigest() == imgs["mapped"],
          "the analyzer's image differs from the pages read at their slots")


# ----------------------------------------------------------------- malformed files

ERR_LINE = re.compile(r"incoming migration failed: (.*)")


def refused(env, path, mapped=True, channels=None, name="dst", mem=MEM):
    """Load path into a --incoming defer destination; it must exit 1 with a
    reason, never run.  Returns the reason."""
    dst = env.guest(name, mem=mem, incoming="defer")
    configure(dst, mapped, channels)
    try:
        dst.cmd("migrate-incoming", {"uri": uri_of(path)})
    except QMPError as e:
        raise TestFailure("%s: migrate-incoming refused synchronously (%s); the guest should "
                          "report the bad file from its incoming thread" % (dst.name, e.desc))
    seen = []
    qmp = dst.qmp

    def exited():
        if dst.returncode() is not None:
            return True
        try:
            seen.append(dst.runstate())
        except TestFailure:
            pass        # going away
        return False
    wait_until(exited, 30, "%s to give up on %s" % (dst.name, os.path.basename(path)))
    rc = wait_incoming_exit(dst, timeout=5)
    qmp.poll_events(0.2)
    err = dst.stderr()
    check(rc == 1, "%s: %s loading a bad file, expected exit status 1; stderr:\n%s", dst.name,
          describe_exit(rc), dst.stderr_tail())
    check("running" not in seen and not qmp.events_named("RESUME"),
          "%s ran (run states %r, events %r)", dst.name, sorted(set(seen)),
          [e["event"] for e in qmp.events])
    check("arrival check" not in err, "%s ran its arrival check on a bad file:\n%s", dst.name,
          dst.stderr_tail())
    m = ERR_LINE.search(err)
    check(m is not None, "%s: no 'incoming migration failed: ...' line:\n%s", dst.name,
          dst.stderr_tail())
    check("AddressSanitizer" not in err and "runtime error:" not in err,
          "%s: sanitizer report:\n%s", dst.name, dst.stderr_tail())
    return m.group(1)


def damaged(env, src, name, edits=(), size=None):
    """A copy of src with `edits` ((offset, bytes), ...) applied and cut to size."""
    path = env.path(name + ".mig")
    with open(src, "rb") as f:
        data = bytearray(f.read() if size is None else f.read(size))
    for off, b in edits:
        data[off:off + len(b)] = b
    with open(path, "wb") as f:
        f.write(data)
    return path


def check_names_block(msg, lay, what):
    check(BLOCK in msg and str(lay["header"]) in msg,
          "%s: the error does not name block %r and its header's offset %d: %r", what, BLOCK,
          lay["header"], msg)
    note("%s: %s" % (what, msg))


def check_names_offset(msg, what, lo=None, hi=None):
    offs = [int(x) for x in re.findall(r"offset (\d+)", msg)]
    check(offs, "%s: the error names no byte offset: %r", what, msg)
    if lo is not None:
        check(any(lo <= o <= hi for o in offs), "%s: the error's offsets %r are not in [%d, %d]: "
              "%r", what, offs, lo, hi, msg)
    note("%s: %s" % (what, msg))


def hdr_field(lay, field):
    return lay["header"] + {"version": 0, "page_size": 4, "bitmap": 12, "pages": 20}[field]


@test("malformed: truncated mapped-ram files, several cut points")
def _(env):
    src = sample(env)["mapped"]
    lay = parse_layout(src)
    doc = analyze_json(env, src)
    size = os.path.getsize(src)
    end_pages = lay["pages"] + RAM
    # An empty file, the QEVM header, then in the block's region: the
    # header itself, the bitmap, the padding, the pages region (first page,
    # middle, last byte).
    for cut in (0, 5, lay["header"] + 10, lay["bitmap"] + 100, lay["pages"] - 1,
                lay["pages"] + 4096, lay["pages"] + RAM // 2 + 123, end_pages - 1):
        msg = refused(env, damaged(env, src, "cut%d" % cut, size=cut), name="d%d" % cut)
        if cut < lay["bitmap"]:
            check_names_offset(msg, "cut at %d (before the bitmap)" % cut, 0, cut)
        else:
            check_names_block(msg, lay, "cut at %d" % cut)
    # In the stream after the pages: the ram sections, the device state,
    # just before EOF.
    guest = [s for s in doc["sections"] if s["idstr"] == "guest"][0]
    for cut in (end_pages + 3, guest["start"] + 40, doc["eof_offset"]):
        msg = refused(env, damaged(env, src, "cut%d" % cut, size=cut), name="d%d" % cut)
        check_names_offset(msg, "cut at %d of %d" % (cut, size), end_pages, cut)
    # With 4 channels reading: the same refusal, no channel left waiting.
    cut = lay["pages"] + RAM // 3
    msg = refused(env, damaged(env, src, "cut4ch", size=cut), channels=4, name="d4ch")
    check_names_block(msg, lay, "cut at %d, 4 channels" % cut)


@test("malformed: bitmap offset past the end of the file")
def _(env):
    src = sample(env)["mapped"]
    lay = parse_layout(src)
    size = os.path.getsize(src)
    far = size + (8 << 20)
    # Only the bitmap moved: it now lies beyond the file (and the pages region).
    msg = refused(env, damaged(env, src, "bm-far", [(hdr_field(lay, "bitmap"),
                                                      struct.pack(">Q", far))]), name="dfar")
    check_names_block(msg, lay, "bitmap offset %d, file %d bytes" % (far, size))
    # Bitmap and pages both moved past the end, consistently laid out.
    pages = (far + bitmap_bytes(PAGES) + MR_ALIGN - 1) // MR_ALIGN * MR_ALIGN
    msg = refused(env, damaged(env, src, "both-far", [
        (hdr_field(lay, "bitmap"), struct.pack(">Q", far)),
        (hdr_field(lay, "pages"), struct.pack(">Q", pages))]), name="dboth")
    check_names_block(msg, lay, "bitmap at %d and pages at %d, file %d bytes" % (far, pages, size))
    # Offsets near 2^64: no arithmetic overflow may let them pass.
    msg = refused(env, damaged(env, src, "bm-huge", [
        (hdr_field(lay, "bitmap"), struct.pack(">Q", (1 << 64) - 16)),
        (hdr_field(lay, "pages"), struct.pack(">Q", (1 << 64) - 4096))]), name="dhuge")
    check_names_block(msg, lay, "bitmap and pages offsets near 2^64")


@test("malformed: bitmap bits for pages past the block's end")
def _(env):
    mem = "65548K"               # 16387 pages: the last bitmap word has spare bits
    npages = mem_bytes(mem) // PAGE_SIZE
    src = sample(env, mem=mem)["mapped"]
    lay = parse_layout(src)
    check_layout(src, lay)
    restore(env, src, mem=mem, name="good")         # the undamaged file loads
    last = lay["bitmap"] + bitmap_bytes(npages) - 8
    with open(src, "rb") as f:
        f.seek(last)
        (word,) = struct.unpack("<Q", f.read(8))
    word |= 1 << (npages % 64 + 2)
    msg = refused(env, damaged(env, src, "bits", [(last, struct.pack("<Q", word))]), mem=mem)
    check_names_block(msg, lay, "bit %d set in a block of %d pages"
                      % (npages // 64 * 64 + npages % 64 + 2, npages))


@test("malformed: header with a wrong page size")
def _(env):
    src = sample(env)["mapped"]
    lay = parse_layout(src)
    for ps in (8192, 2048, 0, 1 << 63):
        msg = refused(env, damaged(env, src, "ps%d" % ps, [(hdr_field(lay, "page_size"),
                                                            struct.pack(">Q", ps))]),
                      name="d%d" % (ps % 100000))
        check_names_block(msg, lay, "page size %d" % ps)
        check(str(ps) in msg, "page size %d: the error does not say which: %r", ps, msg)


@test("malformed: overlapping offsets (pages over the bitmap, bitmap over the stream)")
def _(env):
    src = sample(env)["mapped"]
    lay = parse_layout(src)
    cases = {
        # A page-aligned pages region starting before the bitmap ends.
        "pages at 0": [(hdr_field(lay, "pages"), struct.pack(">Q", 0))],
        # The bitmap inside the pages region.
        "bitmap inside the pages": [(hdr_field(lay, "bitmap"),
                                     struct.pack(">Q", lay["pages"] + 4096))],
        # The bitmap over the header / the stream before it.
        "bitmap over the header": [(hdr_field(lay, "bitmap"), struct.pack(">Q", lay["header"]))],
        "bitmap at 0": [(hdr_field(lay, "bitmap"), struct.pack(">Q", 0))],
        # An unaligned pages offset.
        "pages unaligned": [(hdr_field(lay, "pages"), struct.pack(">Q", lay["pages"] + 512))],
    }
    for i, (what, edits) in enumerate(cases.items()):
        msg = refused(env, damaged(env, src, "ov%d" % i, edits), name="d%d" % i)
        check_names_block(msg, lay, what)


@test("malformed: header versions 2 and 0")
def _(env):
    src = sample(env)["mapped"]
    lay = parse_layout(src)
    for v in (2, 0, 0xFFFFFFFF):
        msg = refused(env, damaged(env, src, "v%d" % v, [(hdr_field(lay, "version"),
                                                          struct.pack(">I", v))]),
                      name="d%d" % (v & 0xFF))
        check_names_block(msg, lay, "version %d" % v)
        check("version" in msg and str(v) in msg, "version %d: %r", v, msg)


@test("mismatch: mapped-ram file without the capability, plain file with it, another RAM size")
def _(env):
    files = sample(env)
    msg = refused(env, files["mapped"], mapped=False, name="nocap")
    check("mapped-ram" in msg, "mapped-ram file, capability off: %r", msg)
    note("mapped-ram file, capability off: %s" % msg)
    msg = refused(env, files["plain"], mapped=True, name="cap")
    check("mapped-ram" in msg, "plain file, capability on: %r", msg)
    note("plain file, capability on: %s" % msg)
    msg = refused(env, files["plain"], mapped=True, channels=2, name="cap2")
    check("mapped-ram" in msg, "plain file, capability on, 2 channels: %r", msg)
    # A guest of another size refuses the file before reading any page.
    msg = refused(env, files["mapped"], mem="128M", name="big")
    check("67108864" in msg and re.search(r"offset \d+", msg),
          "a 64 MiB save into a 128 MiB guest: %r", msg)
    note("64 MiB file, 128 MiB guest: %s" % msg)
    # And the untouched files do load with the right settings.
    restore(env, files["mapped"], name="ok-mapped")
    restore(env, files["plain"], mapped=False, name="ok-plain")


if __name__ == "__main__":
    lmtest.main()
