#!/usr/bin/env python3
"""`livemig analyze` on real files: QEMU 7.2 captures, livemig saves, and
streams written by a live qemu-system-x86_64.

  * The QEMU 7.2 precopy capture (shared/testdata/qemu72, found through env
    LIVEMIG_SHARED or by walking up from this file to shared/testdata/qemu72;
    skipped if absent): header, configuration, the ram section, record
    counts, every FULL device section skipped by its VMDESCRIPTION, EOF and
    VMDESCRIPTION offsets, and the SHA-256 of each extracted block.
  * Damaged copies of it (truncated, bytes flipped) are refused with exit 1
    and a message naming a byte offset inside the file; never a crash.
  * A livemig guest saved to file: is analyzed and extracted; every page
    header in the image must match the version table that the same file
    carries as device state; the file restores into a guest that verifies;
    and that guest, saved again, extracts to the identical image.  If the
    library offers mapped-ram, the same guest is saved with it and must
    extract to the same image too.
  * If qemu-system-x86_64 is installed (CI installs Debian's
    qemu-system-x86): a tiny guest (-M none, 8 MiB memory-backend-file of
    known content) is migrated with "exec:cat > FILE", its RAM dumped with
    pmemsave, and the extracted image must equal the dump; the same with the
    compress capability (COMPRESS_PAGE records), and with xbzrle on a
    microvm whose memory is rewritten through qtest during the migration.

Run alone: LIVEMIG=build/tools/livemig python3 tests/integration/test_analyze.py
"""

import hashlib
import json
import os
import random
import shutil
import socket
import struct

import lmtest
from lmtest import (PAGE_SIZE, QMP, TestFailure, check, check_destination,
                    check_runstate, describe_exit, mem_bytes, note, ram, reap,
                    shared, skip, spawn, test, wait_migration, wait_until)

ANALYZE_TIMEOUT = 120

QEMU72_BLOCKS = {
    "pc.ram": (67108864, "3b6a07d0d404fab4e23b6d34bc6696a6a312dd92821332385e5af7c01c421351"),
    "/rom@etc/acpi/tables": (131072, "bc161fb61f5728a17dba4ab4855aaa07d262a6998114fc4fe25beeceaa934ffa"),
    "pc.bios": (262144, "2da2018c7555e50b660a84a273a14a79cb87b9070fe6a90e9f151a53e357f7e6"),
    "pc.rom": (131072, "fa43239bcee7b97ca62f007cc68487560a39e19f74f3dde7486db3f98df8e471"),
    "/rom@etc/table-loader": (4096, "db7e4d1579b731fc2409d946bc15123d50b78b66684a46ebba9bf638feab68c6"),
    "/rom@etc/acpi/rsdp": (4096, "87ebb4e36d920b5eded63b993a66e0524c724bd5c914551ca89a176ca3d491d7"),
}

# ----------------------------------------------------------------- helpers


def testdata_dir():
    """shared/testdata/qemu72, or None."""
    env = os.environ.get("LIVEMIG_SHARED")
    cands = []
    if env:
        cands += [os.path.join(env, "testdata", "qemu72"), os.path.join(env, "qemu72"), env]
    d = os.path.dirname(os.path.abspath(__file__))
    while True:
        cands.append(os.path.join(d, "shared", "testdata", "qemu72"))
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for c in cands:
        if os.path.isfile(os.path.join(c, "precopy-q35.mig")):
            return c
    return None


def qemu72_file(name):
    d = testdata_dir()
    if d is None:
        skip("QEMU 7.2 test data not found (set LIVEMIG_SHARED to the shared/ directory)")
    path = os.path.join(d, name)
    sums = os.path.join(d, "SHA256SUMS")
    if os.path.exists(sums):
        with open(sums) as f:
            want = {l.split()[1]: l.split()[0] for l in f if l.strip()}
        if name in want:
            check(sha256_file(path) == want[name], "%s does not match its SHA256SUMS entry", path)
    return path


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def run_analyze(env, path, *args, tag="analyze"):
    """Run `livemig analyze PATH ARGS`; returns (rc, stdout, stderr).  A
    signal or a sanitizer report fails the case whatever the status."""
    out_path = env.path(tag + ".out")
    err_path = env.path(tag + ".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = spawn([env.livemig, "analyze", path] + list(args), out, err)
    try:
        rc = p.wait(ANALYZE_TIMEOUT)
    except Exception:
        reap(p, 0)
        raise TestFailure("livemig analyze %s did not finish within %d s" % (path, ANALYZE_TIMEOUT))
    finally:
        reap(p, 0)
    with open(out_path, "rb") as f:
        out = f.read().decode("utf-8", "replace")
    with open(err_path, "rb") as f:
        err = f.read().decode("utf-8", "replace")
    check(rc is not None and rc >= 0, "livemig analyze %s: %s; stderr:\n%s", path,
          describe_exit(rc), err[-3000:])
    check("AddressSanitizer" not in err and "runtime error:" not in err,
          "livemig analyze %s: sanitizer report:\n%s", path, err[-3000:])
    return rc, out, err


def analyze_json(env, path, extract=None, tag="analyze", complete=True):
    """The --json document of a file that must be understood; complete=False
    expects exit 3 and `missing` (a part of a migration, not all of it)."""
    args = ["--json"]
    if extract:
        args += ["--extract-ram", extract]
    rc, out, err = run_analyze(env, path, *args, tag=tag)
    check(rc == (0 if complete else 3), "livemig analyze %s: exit %d; stderr:\n%s", path, rc,
          err[-3000:])
    try:
        doc = json.loads(out)
    except ValueError as e:
        raise TestFailure("livemig analyze --json printed invalid JSON (%s): %r" % (e, out[:300]))
    check(doc.get("error") is None, "analysis failed: %r", doc.get("error"))
    check(doc.get("complete") is complete, "complete is %r, expected %r (missing: %r)",
          doc.get("complete"), complete, doc.get("missing"))
    if complete:
        check(doc.get("missing") is None, "complete, yet missing %r", doc.get("missing"))
    else:
        check(isinstance(doc.get("missing"), str) and doc["missing"],
              "incomplete without saying what is missing: %r", doc.get("missing"))
        check("not a complete migration" in err, "stderr does not say it: %r", err[-500:])
    return doc


def block(doc, name):
    for b in doc["ram_blocks"]:
        if b["idstr"] == name:
            return b
    raise TestFailure("no RAM block %r in %s" % (name, [b["idstr"] for b in doc["ram_blocks"]]))


def image_name(idstr):
    return idstr.replace("/", "_")


def check_refused(env, path, tag, what=None):
    """The analyzer must exit 1 naming a byte offset within the file."""
    rc, out, err = run_analyze(env, path, tag=tag)
    check(rc == 1, "%s: exit %d, expected 1; stderr:\n%s", tag, rc, err[-2000:])
    line = [l for l in err.splitlines() if l.startswith("livemig analyze:")]
    check(line, "%s: no 'livemig analyze: ...' error line; stderr:\n%s", tag, err[-2000:])
    offs = [int(x) for x in __import__("re").findall(r"byte offset (\d+)", line[-1])]
    size = os.path.getsize(path)
    check(offs and all(0 <= o <= size for o in offs),
          "%s: error does not name a byte offset inside the %d-byte file: %s", tag, size, line[-1])
    if what:
        check(what in line[-1], "%s: error lacks %r: %s", tag, what, line[-1])
    return line[-1]


# ----------------------------------------------------------------- QEMU 7.2 captures

@test("QEMU 7.2 precopy capture: header, sections, records, EOF, VMDESCRIPTION")
def _(env):
    path = qemu72_file("precopy-q35.mig")
    doc = analyze_json(env, path)
    check(doc["header"] == {"magic": "QEVM", "magic_value": 0x5145564D, "version": 3},
          "header %r", doc["header"])
    check(doc["configuration"]["machine"] == "pc-q35-7.2", "machine %r",
          doc["configuration"]["machine"])
    check(doc["configuration"]["subsections"] == [], "configuration subsections %r",
          doc["configuration"]["subsections"])
    secs = doc["sections"]
    ram_secs = [(s["type"], s["section_id"], s["version_id"]) for s in secs if s["idstr"] == "ram"]
    check(ram_secs == [("START", 2, 4), ("PART", 2, 4), ("END", 2, 4)], "ram sections %r", ram_secs)
    full = [s for s in secs if s["type"] == "FULL"]
    names = [s["idstr"] for s in full]
    # The README lists these first and last; the byte-exact count is 30
    # device sections, each one checked against its footer.
    check(names[:8] == ["timer", "cpu_common", "cpu", "kvm-tpr-opt", "apic", "kvmclock",
                        "fw_cfg", "0000:00:00.0/mch"] and names[-2:] == ["acpi_build",
                                                                         "globalstate"],
          "FULL sections %r", names)
    check(len(full) == 30 and all(s["parsed_by"] == "vmdesc" for s in full),
          "%d FULL device sections (expected 30, each skipped by the VMDESCRIPTION)", len(full))
    for a, b in zip(secs, secs[1:]):
        check(a["end"] == b["start"], "sections not contiguous: %r then %r", a, b)
    check(secs[-1]["end"] == doc["eof_offset"], "last section ends at %d, EOF at %d",
          secs[-1]["end"], doc["eof_offset"])
    check(doc["eof_offset"] == 390323, "EOF record at byte %r, expected 390323",
          doc["eof_offset"])
    check(doc["vmdescription"] == {"offset": 390324, "length": 43786}, "VMDESCRIPTION %r",
          doc["vmdescription"])
    check(doc["trailing_bytes"] == 0, "trailing bytes %r", doc["trailing_bytes"])
    blocks = {b["idstr"]: b["size"] for b in doc["ram_blocks"]}
    check(blocks == {k: v[0] for k, v in QEMU72_BLOCKS.items()}, "blocks %r", blocks)
    check([b["idstr"] for b in doc["ram_blocks"]] == list(QEMU72_BLOCKS), "block order %r",
          [b["idstr"] for b in doc["ram_blocks"]])
    t = doc["totals"]
    check(t["normal_pages"] == 51 and t["zero_pages"] == 16463, "%d PAGE and %d ZERO records, "
          "expected 51 and 16463", t["normal_pages"], t["zero_pages"])
    check(t["compressed_pages"] == 0 and t["xbzrle_pages"] == 0, "totals %r", t)
    check(t["pages"] == t["pages_present"] == 16514, "pages %d present %d", t["pages"],
          t["pages_present"])
    note("%d sections, EOF at %d, VMDESCRIPTION %d bytes" % (len(secs), doc["eof_offset"],
                                                               doc["vmdescription"]["length"]))


@test("QEMU 7.2 precopy capture: extracted blocks have the expected SHA-256")
def _(env):
    path = qemu72_file("precopy-q35.mig")
    out = env.path("ram")
    doc = analyze_json(env, path, extract=out)
    check(doc["extracted"] is True, "extracted %r", doc["extracted"])
    check(sorted(os.listdir(out)) == sorted(image_name(n) for n in QEMU72_BLOCKS),
          "images %r", sorted(os.listdir(out)))
    for name, (size, digest) in QEMU72_BLOCKS.items():
        p = os.path.join(out, image_name(name))
        check(os.path.getsize(p) == size, "%s: %d bytes, expected %d", p, os.path.getsize(p), size)
        got = sha256_file(p)
        check(got == digest, "%s: SHA-256 %s, expected %s", name, got, digest)


@test("QEMU 7.2 multifd main stream: block list and ZERO records")
def _(env):
    path = qemu72_file("multifd-nocomp.main")
    # Its data pages went over the channels: a part of a migration only.
    doc = analyze_json(env, path, complete=False)
    check("pages not in this stream" in doc["missing"], "missing %r", doc["missing"])
    check(block(doc, "pc.ram")["size"] == 67108864, "pc.ram %r", block(doc, "pc.ram"))
    t = doc["totals"]
    check(t["zero_pages"] == 16463 and t["normal_pages"] == 0,
          "main stream of a multifd migration: %d ZERO, %d PAGE records (expected 16463, 0)",
          t["zero_pages"], t["normal_pages"])


@test("streams that end before a whole migration are understood but not complete")
def _(env):
    def be32(v):
        return v.to_bytes(4, "big")
    head = b"QEVM" + be32(3) + b"\x07" + be32(9) + b"livemig-1"
    listed = (head + b"\x01" + be32(1) + b"\x03ram" + be32(0) + be32(4) +
              (8192 | 4).to_bytes(8, "big") + b"\x02m0" + (8192).to_bytes(8, "big") +
              (0x10).to_bytes(8, "big") + b"\x7e" + be32(1))
    cases = {
        "empty": (head + b"\x00", "no RAM block list"),
        "block list only": (listed + b"\x00", "no END of the ram section"),
        "END but no pages": (listed + b"\x03" + be32(1) + (0x10).to_bytes(8, "big") +
                             b"\x7e" + be32(1) + b"\x00", "2 of 2 pages not in this stream"),
    }
    for tag, (data, want) in cases.items():
        path = env.path(tag.replace(" ", "-") + ".mig")
        with open(path, "wb") as f:
            f.write(data)
        doc = analyze_json(env, path, tag=tag.replace(" ", "-"), complete=False)
        check(want in doc["missing"], "%s: missing %r lacks %r", tag, doc["missing"], want)
        note("%s: %s" % (tag, doc["missing"]))


@test("damaged copies of the QEMU 7.2 capture are refused with an offset")
def _(env):
    src = qemu72_file("precopy-q35.mig")
    with open(src, "rb") as f:
        data = f.read()
    doc = analyze_json(env, src, tag="intact")
    secs = doc["sections"]
    eof, size = doc["eof_offset"], len(data)
    cuts = [0, 3, 7, 12, 30, 200, secs[1]["start"] + 3000, secs[3]["start"] + 20,
            secs[20]["start"] + 1, eof, eof + 1, eof + 3, eof + 100, size - 1]
    for n in cuts:
        p = env.path("cut-%d.mig" % n)
        with open(p, "wb") as f:
            f.write(data[:n])
        msg = check_refused(env, p, "cut-%d" % n)
        note("truncated to %d: %s" % (n, msg.split(": ", 2)[-1][:150]))
    part = secs[1]["start"]
    flips = {
        "magic": 0, "version": 7, "config type": 8, "ram START version": secs[0]["start"] + 16,
        "first PART record flags": part + 5 + 7, "device footer": secs[10]["end"] - 5,
        "device footer id": secs[10]["end"] - 1, "device name": secs[12]["start"] + 7,
        "device instance": secs[13]["start"] + 6 + len(secs[13]["idstr"]) + 3,
        "EOF byte": eof, "VMDESCRIPTION marker": eof + 1, "VMDESCRIPTION length": eof + 4,
    }
    for what, off in flips.items():
        p = env.path("flip-%d.mig" % off)
        d = bytearray(data)
        d[off] ^= 0xFF
        with open(p, "wb") as f:
            f.write(d)
        msg = check_refused(env, p, "flip-%s" % what.replace(" ", "-"))
        note("%s flipped at %d: %s" % (what, off, msg.split(": ", 2)[-1][:150]))
    # Random damage anywhere outside page payloads: no crash, ever.
    rng = random.Random(4)
    for k in range(60):
        off = rng.randrange(0, eof + 10)
        d = bytearray(data)
        d[off] ^= 1 << rng.randrange(8)
        p = env.path("rand.mig")
        with open(p, "wb") as f:
            f.write(d)
        rc, out, err = run_analyze(env, p, tag="rand")
        # 3: still parses, but a record now names another page, so one is
        # missing: the analysis must say the migration is not whole.
        check(rc in (0, 1, 3), "random flip at %d: exit %d; stderr:\n%s", off, rc, err[-2000:])
        if rc == 3:
            check("not a complete migration" in err, "random flip at %d: exit 3 without "
                  "saying what is missing: %s", off, err[-500:])
        if rc == 1:
            check("byte offset" in err, "random flip at %d: error names no offset: %s", off, err)


# ----------------------------------------------------------------- livemig saves

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE


def check_image_matches_table(img, versions):
    """Every page of the image holds {le64 index, le64 version} (or is all
    zero at version 0), as the guest's version table says."""
    with open(img, "rb") as f:
        data = f.read()
    check(len(data) == PAGES * PAGE_SIZE, "image %s is %d bytes", img, len(data))
    bad = []
    zero = bytes(PAGE_SIZE)
    for i, v in enumerate(versions):
        page = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        if v == 0:
            ok = page == zero
        else:
            idx, ver = struct.unpack_from("<QQ", page)
            ok = idx == i and ver == v
        if not ok:
            bad.append(i)
    check(not bad, "%d pages of %s disagree with the version table, first %s", len(bad), img,
          bad[:8])


def save_stopped(g, path, caps=None):
    if caps:
        g.set_caps(**caps)
    g.cmd("migrate", {"uri": "file:" + path})
    info = wait_migration(g, timeout=120)
    check(ram(info, "total") == mem_bytes(MEM), "ram.total %d", ram(info, "total"))
    return info


@test("livemig save: analyze, extract, page headers match the saved version table")
def _(env):
    path = os.path.join(lmtest.session_dir(), "guest.mig")
    shared.pop("guest", None)
    src = env.guest("src", mem=MEM, fill="text", dirty_rate=3000, seed=3)
    wait_until(lambda: src.info()["writes"] >= 3000, 30, "3000 page writes")
    src.cmd("stop")
    check_runstate(src, "paused")
    info = save_stopped(src, path)
    out = os.path.join(lmtest.session_dir(), "ram-a")
    doc = analyze_json(env, path, extract=out)
    check(doc["configuration"]["machine"] == "livemig-1", "machine %r",
          doc["configuration"]["machine"])
    check(doc["mapped_ram"] is False, "mapped_ram %r", doc["mapped_ram"])
    b = block(doc, "guest.ram")
    c = b["counts"]
    check(b["size"] == mem_bytes(MEM) and len(doc["ram_blocks"]) == 1, "blocks %r",
          doc["ram_blocks"])
    check(c["pages"] == PAGES and c["pages_present"] == PAGES,
          "pages %d present %d, expected %d", c["pages"], c["pages_present"], PAGES)
    check(c["normal_pages"] == ram(info, "normal") and c["zero_pages"] == ram(info, "duplicate"),
          "records: %d PAGE, %d ZERO; query-migrate says normal %d duplicate %d",
          c["normal_pages"], c["zero_pages"], ram(info, "normal"), ram(info, "duplicate"))
    kinds = [s["type"] for s in doc["sections"] if s["idstr"] == "ram"]
    check(kinds[0] == "START" and kinds[-1] == "END" and set(kinds[1:-1]) <= {"PART"},
          "ram sections %r", kinds)
    check(doc["eof_offset"] is not None and doc["vmdescription"]["offset"] == doc["eof_offset"] + 1,
          "EOF %r, VMDESCRIPTION %r", doc["eof_offset"], doc["vmdescription"])
    img = os.path.join(out, "guest.ram")
    check_image_matches_table(img, lmtest.guest_version_table(path, doc, PAGES))
    shared["guest"] = (path, img)
    note("%d sections, %d PAGE + %d ZERO records" % (len(doc["sections"]), c["normal_pages"],
                                                     c["zero_pages"]))

    # The same stopped guest saved with mapped-ram, if the library has it.
    try:
        src.set_caps(mapped_ram=True)
    except lmtest.QMPError as e:
        note("mapped-ram not available (%s): that part is skipped" % e.desc)
        return
    mr = os.path.join(lmtest.session_dir(), "guest-mr.mig")
    save_stopped(src, mr)
    out_mr = env.path("ram-mr")
    doc = analyze_json(env, mr, extract=out_mr, tag="mapped")
    check(doc["mapped_ram"] is True, "mapped-ram save not recognised as mapped-ram")
    b = block(doc, "guest.ram")
    check(b.get("mapped_ram") is not None, "block %r has no mapped-ram layout", b)
    check(sha256_file(os.path.join(out_mr, "guest.ram")) == sha256_file(img),
          "the mapped-ram save extracts to a different image than the stream save")
    check(os.path.getsize(mr) <= mem_bytes(MEM) + (16 << 20),
          "mapped-ram file of %d bytes for %d bytes of RAM", os.path.getsize(mr), mem_bytes(MEM))


@test("livemig save: the file restores and verifies; saved again it extracts identically")
def _(env):
    if "guest" not in shared:
        raise TestFailure("no saved guest (the previous case failed)")
    path, img = shared["guest"]
    dst = env.guest("dst", mem=MEM, incoming="file:" + path)
    check_destination(dst, PAGES)
    dst.cmd("stop")
    again = env.path("again.mig")
    save_stopped(dst, again)
    out = env.path("ram-b")
    doc = analyze_json(env, again, extract=out)
    check(block(doc, "guest.ram")["counts"]["pages_present"] == PAGES, "pages present %r",
          block(doc, "guest.ram")["counts"])
    check(sha256_file(os.path.join(out, "guest.ram")) == sha256_file(img),
          "the restored guest, saved again, extracts to a different image")


@test("text report names the blocks and offsets; usage errors exit 2")
def _(env):
    if "guest" not in shared:
        raise TestFailure("no saved guest (an earlier case failed)")
    path, _img = shared["guest"]
    rc, out, err = run_analyze(env, path, tag="text")
    check(rc == 0, "exit %d: %s", rc, err)
    for needle in ("QEVM", "livemig-1", "guest.ram", "EOF", "VMDESCRIPTION", "total"):
        check(needle in out, "report lacks %r:\n%s", needle, out[:2000])
    p = spawn([env.livemig, "analyze"], open(os.devnull, "wb"), open(os.devnull, "wb"))
    check(reap(p, 30) == 2, "no FILE: exit %r, expected 2", p.returncode)
    p = spawn([env.livemig, "analyze", path, "--bogus"], open(os.devnull, "wb"),
              open(os.devnull, "wb"))
    check(reap(p, 30) == 2, "bad option: exit %r, expected 2", p.returncode)
    rc, out, err = run_analyze(env, env.dir, tag="dir")
    check(rc == 1 and "not a regular file" in err, "a directory: exit %d, %s", rc, err)


# ----------------------------------------------------------------- real QEMU

QEMU = shutil.which("qemu-system-x86_64")
QMEM = 8 << 20
BIOS_WINDOW = (0xC0000, 0x100000)     # microvm maps ROM over low RAM here


def qemu_guest_image(path, seed):
    """8 MiB of known content: random pages, zero pages, constant pages."""
    rng = random.Random(seed)
    data = bytearray(QMEM)
    for i in range(QMEM // PAGE_SIZE):
        k = i % 5
        if k in (0, 3):
            data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
        elif k == 1:
            data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = bytes([i & 0xFF]) * PAGE_SIZE
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


class Qemu:
    """One qemu-system-x86_64 with a QMP socket (and optionally qtest)."""

    def __init__(self, env, machine, mem_path, qtest=False):
        if QEMU is None:
            skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
        self.env = env
        self.qmp_path = env.path("qemu.qmp")
        self.qt_path = env.path("qemu.qtest")
        argv = [QEMU, "-M", machine + ",memory-backend=mem",
                "-object", "memory-backend-file,id=mem,size=%d,mem-path=%s,share=off"
                % (QMEM, mem_path),
                "-m", "%dM" % (QMEM >> 20), "-nodefaults", "-display", "none", "-S",
                "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        if qtest:
            argv += ["-qtest", "unix:%s,server=on,wait=off" % self.qt_path]
        else:
            argv += ["-accel", "tcg"]
        self.err_path = env.path("qemu.err")
        with open(env.path("qemu.out"), "wb") as out, open(self.err_path, "wb") as err:
            self.proc = spawn(argv, out, err, cwd=env.dir)
        self.qmp = QMP(self.qmp_path, timeout=30, alive=lambda: self.proc.poll() is None)
        self.qt = None
        if qtest:
            self.qt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.qt.settimeout(10)
            self.qt.connect(self.qt_path)
            self.qt_buf = b""

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-2000:]

    def write(self, addr, value):
        """qtest: store a 32-bit value at a guest-physical address."""
        self.qtest(b"write 0x%x 4 0x%08x\n" % (addr, value))

    def qtest(self, cmd):
        self.qt.sendall(cmd)
        while b"\n" not in self.qt_buf:
            d = self.qt.recv(4096)
            if not d:
                raise TestFailure("qtest connection closed; qemu stderr:\n%s" % self.stderr())
            self.qt_buf += d
        line, self.qt_buf = self.qt_buf.split(b"\n", 1)
        check(line.strip() == b"OK", "qtest write: %r", line)

    def write_page(self, addr, data):
        """qtest: store bytes at a guest-physical address."""
        self.qtest(b"write 0x%x %d 0x%s\n" % (addr, len(data), data.hex().encode()))

    def migrate_to_file(self, path):
        """migrate "exec:cat > FILE", waiting until cat has finished."""
        tmp = path + ".part"
        self.qmp.execute("migrate", {"uri": "exec:cat > %s && mv %s %s" % (tmp, tmp, path)})
        info = self.wait_completed()
        wait_until(lambda: os.path.exists(path), 30, "the exec:cat child to finish %s" % path)
        return info

    def wait_completed(self, timeout=120):
        def done():
            i = self.qmp.execute("query-migrate")
            st = i.get("status")
            if st in ("failed", "cancelled"):
                raise TestFailure("QEMU migration %s: %r" % (st, i.get("error-desc")))
            return i if st == "completed" else None
        return wait_until(done, timeout, "the QEMU migration to complete")

    def pmemsave(self, path):
        self.qmp.execute("pmemsave", {"val": 0, "size": QMEM, "filename": path})
        check(os.path.getsize(path) == QMEM, "pmemsave wrote %d bytes", os.path.getsize(path))
        with open(path, "rb") as f:
            return f.read()

    def quit(self):
        try:
            self.qmp.execute("quit", timeout=10)
        except Exception:
            pass
        self.qmp.close()
        if self.qt is not None:
            self.qt.close()
        reap(self.proc, 10)


def qemu_run(env, caps=None):
    """Migrate a stopped -M none guest to a file; returns (doc, image, pmem, info, content)."""
    content = qemu_guest_image(env.path("guest.img"), 11)
    q = Qemu(env, "none", env.path("guest.img"))
    try:
        if caps:
            q.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": c, "state": True} for c in caps]})
        mig = env.path("qemu.mig")
        info = q.migrate_to_file(mig)
        pmem = q.pmemsave(env.path("qemu.pmem"))
    finally:
        q.quit()
    doc = analyze_json(env, mig, extract=env.path("ram"))
    b = block(doc, "mem")
    check(b["size"] == QMEM, "block 'mem' of %d bytes", b["size"])
    with open(env.path("ram/mem"), "rb") as f:
        image = f.read()
    return doc, image, pmem, info, content


@test("real QEMU: exec:cat stream extracts to what pmemsave dumps")
def _(env):
    doc, image, pmem, info, content = qemu_run(env)
    check(doc["configuration"]["machine"] == "none", "machine %r", doc["configuration"]["machine"])
    check(image == pmem, "extracted RAM differs from pmemsave")
    check(image == content, "extracted RAM differs from the guest's memory file")
    c = block(doc, "mem")["counts"]
    check(c["normal_pages"] == ram(info, "normal") and c["zero_pages"] == ram(info, "duplicate"),
          "%d PAGE + %d ZERO records; QEMU counted normal %d duplicate %d", c["normal_pages"],
          c["zero_pages"], ram(info, "normal"), ram(info, "duplicate"))
    check(c["pages_present"] == QMEM // PAGE_SIZE, "pages present %d", c["pages_present"])
    note("QEMU: %d PAGE, %d ZERO records; %d device sections" % (
        c["normal_pages"], c["zero_pages"], sum(s["type"] == "FULL" for s in doc["sections"])))


@test("real QEMU: compress capability (COMPRESS_PAGE, zlib) extracts to the pmemsave dump")
def _(env):
    doc, image, pmem, info, content = qemu_run(env, caps=["compress"])
    c = block(doc, "mem")["counts"]
    check(c["compressed_pages"] > 0, "no COMPRESS_PAGE records: %r", c)
    check(image == pmem and image == content, "extracted RAM differs from pmemsave")
    note("QEMU compress: %d COMPRESS_PAGE, %d PAGE, %d ZERO records" % (
        c["compressed_pages"], c["normal_pages"], c["zero_pages"]))


@test("real QEMU: xbzrle while memory is rewritten extracts to the pmemsave dump")
def _(env):
    content = qemu_guest_image(env.path("guest.img"), 12)
    q = Qemu(env, "microvm", env.path("guest.img"), qtest=True)
    try:
        q.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "xbzrle", "state": True}]})
        # Slow enough that passes repeat while we dirty pages; xbzrle is used
        # from the third time a page is sent (first pass, cache fill, delta).
        q.qmp.execute("migrate-set-parameters", {"max-bandwidth": 2 << 20, "downtime-limit": 1})
        mig = env.path("qemu.mig")
        tmp = mig + ".part"
        q.qmp.execute("migrate", {"uri": "exec:cat > %s && mv %s %s" % (tmp, tmp, mig)})
        # QEMU completes as soon as a pass finds nothing dirty, and small
        # deltas cost it next to nothing to send.  So each poll also rewrites
        # 64 whole pages with random data (256 KiB, sent in full): faster
        # than the 2 MiB/s link drains, so it keeps iterating until we stop.
        k = [0]
        pages = [p for p in range(16, QMEM // PAGE_SIZE, 7)
                 if not BIOS_WINDOW[0] <= p * PAGE_SIZE < BIOS_WINDOW[1]]
        small, full = pages[:64], pages[64:128]
        rng = random.Random(13)

        def dirty_until_xbzrle():
            k[0] += 1
            for p in small:
                q.write(p * PAGE_SIZE + 64 * (k[0] % 16), k[0])
            for p in full:
                q.write_page(p * PAGE_SIZE, rng.randbytes(PAGE_SIZE))
            i = q.qmp.execute("query-migrate")
            check(i.get("status") in ("setup", "active"), "QEMU migration %r: %r",
                  i.get("status"), i.get("error-desc"))
            return (i.get("xbzrle-cache") or {}).get("pages", 0) > 0 and \
                ram(i, "dirty-sync-count") >= 4
        wait_until(dirty_until_xbzrle, 90, "QEMU to send XBZRLE pages")
        # Stop writing, then let it finish: later passes pick up every write.
        q.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30,
                                                 "downtime-limit": 10000})
        q.wait_completed()
        wait_until(lambda: os.path.exists(mig), 30, "the exec:cat child to finish")
        pmem = q.pmemsave(env.path("qemu.pmem"))
    finally:
        q.quit()
    doc = analyze_json(env, mig, extract=env.path("ram"))
    c = block(doc, "mem")["counts"]
    check(c["xbzrle_pages"] > 0, "no XBZRLE records: %r", c)
    with open(env.path("ram/mem"), "rb") as f:
        image = f.read()
    lo, hi = BIOS_WINDOW
    check(image[:lo] == pmem[:lo] and image[hi:] == pmem[hi:],
          "extracted RAM differs from pmemsave outside the ROM window")
    check(image != content, "the rewritten pages did not reach the image")
    note("QEMU xbzrle: %d XBZRLE, %d PAGE, %d ZERO records, %d rounds of writes" % (
        c["xbzrle_pages"], c["normal_pages"], c["zero_pages"], k[0]))


if __name__ == "__main__":
    lmtest.main()
