#!/usr/bin/env python3
"""make-corpus.py -- (re)generate the fuzz targets' seed corpora.

    tests/fuzz/make-corpus.py [--livemig PATH] [--qemu72 DIR] [--out DIR]

Every seed is cut from real bytes (docs/fuzzing.md):
  * the QEMU 7.2 captures in /work/shared/testdata/qemu72/ (README.md there
    says what each file is): heads of the precopy and multifd main streams,
    the multifd channels with their page data left out (handshake and
    packet headers) or with it (the zlib payloads for the codec), the
    return path's messages;
  * livemig's own streams: a `livemig guest --mem 64K` saved with QMP
    `migrate file:...` (plain and mapped-ram, text and zero fill), and the
    QMP conversation `livemig migrate` has with the guest, recorded by a
    proxy on the guest's socket.
The files are named after what they hold and are rewritten each run
(deterministic for the QEMU parts; livemig's guest content is seeded).
"""
import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

TARGETS = ["loadvm", "analyze", "multifd_packet", "multifd_codec", "mappedram",
           "returnpath", "qmp"]
INIT, HDR, PAGE = 64, 1344, 4096
NO_HOLE = struct.pack(">II", 0, 0)


def put(out, target, name, data):
    if target == "analyze" and not name.startswith("livemig-mapped-ram"):
        data = NO_HOLE + data      # fuzz_hole_file's prefix: no hole
    path = os.path.join(out, target, name)
    with open(path, "wb") as f:
        f.write(data)


# ---- QEMU 7.2 captures -----------------------------------------------------

def channel_packets(data):
    """(handshake, [(header, payload)]) of a recorded multifd channel."""
    init, pos, pkts = data[:INIT], INIT, []
    while pos + HDR <= len(data):
        hdr = data[pos:pos + HDR]
        flags, _alloc, normal, next_size = struct.unpack_from(">IIII", hdr, 8)
        plen = next_size if flags & 0x0e else normal * PAGE
        pkts.append((hdr, data[pos + HDR:pos + HDR + plen]))
        pos += HDR + plen
    return init, pkts


def qemu_seeds(qdir, out):
    def rd(name):
        with open(os.path.join(qdir, name), "rb") as f:
            return f.read()

    pre = rd("precopy-q35.mig")
    for kib in (4, 16):
        put(out, "loadvm", "qemu72-precopy-head%dk" % kib, pre[:kib * 1024])
        if kib == 4:
            put(out, "analyze", "qemu72-precopy-head%dk" % kib, pre[:kib * 1024])
    # header + EOF + VMDESCRIPTION (the README gives the EOF's offset)
    eof = 390323
    assert pre[eof] == 0x1f or pre[eof] == 0x00, "EOF not where README.md says"
    put(out, "analyze", "qemu72-precopy-header-vmdesc", pre[:8] + pre[eof:])
    for kind in ("nocomp", "zlib"):
        main = rd("multifd-%s.main" % kind)
        put(out, "loadvm", "qemu72-multifd-%s-main-head16k" % kind, main[:16384])
        put(out, "analyze", "qemu72-multifd-%s-main-head16k" % kind, main[:16384])
        for chan in ("a", "b"):
            init, pkts = channel_packets(rd("multifd-%s.chan-%s" % (kind, chan)))
            hdrs = b"".join(h for h, _ in pkts[:8])
            put(out, "multifd_packet", "qemu72-%s-chan-%s-headers" % (kind, chan), init + hdrs)
            if kind != "zlib":
                continue
            # The channel's deflate stream, packet by packet, up to ~48 KiB.
            seed, used = bytearray(b"\x00"), 0
            for h, payload in pkts:
                normal = struct.unpack_from(">I", h, 16)[0]
                if not normal:
                    continue
                if used and used + len(payload) > 48 * 1024:
                    break
                seed += bytes([normal - 1]) + struct.pack(">I", len(payload)) + payload
                used += len(payload)
            put(out, "multifd_codec", "qemu72-zlib-chan-%s" % chan, bytes(seed))
    d2s = rd("postcopy-return-path.d2s")
    put(out, "returnpath", "qemu72-postcopy-d2s", d2s)
    pos, i = 0, 0
    while pos + 4 <= len(d2s) and i < 16:     # the first 16 on their own
        typ, ln = struct.unpack_from(">HH", d2s, pos)
        put(out, "returnpath", "qemu72-postcopy-msg%02d-type%d" % (i, typ), d2s[pos:pos + 4 + ln])
        pos += 4 + ln
        i += 1
    # postcopy recovery: RECV_BITMAP for the target's 100-page "pc.ram"
    # (16 bytes of little-endian words, end mark), then RESUME_ACK(1)
    bits = bytes([0xff] * 12) + bytes([0x0f, 0, 0, 0])
    rb = (struct.pack(">HHB", 5, 7, 6) + b"pc.ram" + struct.pack(">Q", 16) + bits +
          struct.pack(">Q", 0x0123456789abcdef) + struct.pack(">HHI", 6, 4, 1))
    put(out, "returnpath", "recover-recv-bitmap-resume-ack", rb)


# ---- livemig's own streams -------------------------------------------------

class QmpProxy:
    """Forwards a unix socket to the guest's, keeping what clients sent."""

    def __init__(self, listen_path, target_path):
        self.target, self.sent = target_path, []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(listen_path)
        self.sock.listen(4)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.target)
            rec = bytearray()
            self.sent.append(rec)
            threading.Thread(target=self.pump, args=(c, s, rec), daemon=True).start()
            threading.Thread(target=self.pump, args=(s, c, None), daemon=True).start()

    @staticmethod
    def pump(a, b, rec):
        while True:
            try:
                d = a.recv(65536)
            except OSError:
                d = b""
            if not d:
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if rec is not None:
                rec += d
            b.sendall(d)


def qmp_quit(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
    f.flush()
    f.readline()
    s.close()


def wait_for(path, proc):
    for _ in range(300):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit("make-corpus: livemig guest exited early")
        time.sleep(0.05)
    sys.exit("make-corpus: no QMP socket at " + path)


def save_guest(livemig, tmp, name, fill, caps):
    """Save a 64 KiB guest to a file; returns (file bytes, QMP client bytes)."""
    sock, proxy_sock = os.path.join(tmp, name + ".qmp"), os.path.join(tmp, name + ".proxy")
    path = os.path.join(tmp, name + ".mig")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    g = subprocess.Popen([livemig, "guest", "--mem", "64K", "--fill", fill,
                          "--qmp", "unix:" + sock], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock, g)
        proxy = QmpProxy(proxy_sock, sock)
        cmd = [livemig, "migrate", "--qmp", proxy_sock]
        for c in caps:
            cmd += ["--cap", c + "=on"]
        subprocess.run(cmd + ["file:" + path], env=env, check=True, timeout=60,
                       stdout=subprocess.DEVNULL)
        time.sleep(0.2)
        qmp_quit(sock)
        g.wait(timeout=30)
    finally:
        if g.poll() is None:
            g.kill()
            g.wait()
    with open(path, "rb") as f:
        data = f.read()
    # The temporary directory's random name would make every run differ.
    sent = b"".join(bytes(r) for r in proxy.sent).replace(tmp.encode(), b"/tmp/corpus")
    return data, sent


def hole_encode(data):
    """fuzz_mappedram's and fuzz_analyze's input (fuzz_hole_file in
    fuzz_util.h): be32 hole offset, be32 hole length, the file
    without its longest run of zero bytes (the empty part of the pages
    region), which the target puts back as a sparse hole."""
    best_at, best_len, i, n = 0, 0, 0, len(data)
    while i < n:
        if data[i] == 0:
            j = i
            while j < n and data[j] == 0:
                j += 1
            if j - i > best_len:
                best_at, best_len = i, j - i
            i = j
        else:
            i += 1
    return struct.pack(">II", best_at, best_len) + data[:best_at] + data[best_at + best_len:]


def livemig_seeds(livemig, out):
    tmp = tempfile.mkdtemp(prefix="lmcorpus-")
    try:
        for fill in ("text", "zero"):
            plain, qmp = save_guest(livemig, tmp, "plain-" + fill, fill, [])
            put(out, "loadvm", "livemig-64k-%s" % fill, plain)
            if fill == "zero":     # loadvm has the text one; this keeps analyze small
                put(out, "analyze", "livemig-64k-%s" % fill, plain)
            put(out, "qmp", "livemig-migrate-file-%s" % fill, qmp)
            mapped, qmp = save_guest(livemig, tmp, "mapped-" + fill, fill, ["mapped-ram"])
            put(out, "mappedram", "livemig-64k-%s" % fill, hole_encode(mapped))
            put(out, "analyze", "livemig-mapped-ram-64k-%s" % fill, hole_encode(mapped))
            put(out, "qmp", "livemig-migrate-mapped-ram-%s" % fill, qmp)
            if fill == "text":
                # One line per seed too: each request on its own.
                for k, line in enumerate(qmp.splitlines(keepends=True)[:12]):
                    put(out, "qmp", "livemig-migrate-line%02d" % k, line)
                # Pages for the zstd codec: the text pages of the plain stream,
                # compressed by the zstd tool, two packets of 8 pages each.
                pages = extract_pages(plain)[:16]
                seed = bytearray(b"\x01")
                for part in (pages[:8], pages[8:16]):
                    z = subprocess.run(["zstd", "-q", "-c", "-3"], input=b"".join(part),
                                       stdout=subprocess.PIPE, check=True).stdout
                    seed += bytes([len(part) - 1]) + struct.pack(">I", len(z)) + z
                put(out, "multifd_codec", "livemig-text-pages-zstd", bytes(seed))
    finally:
        shutil.rmtree(tmp)


def extract_pages(stream):
    """The 4 KiB page bodies of a plain livemig stream: found as runs of
    printable text (the guest's text fill), aligned to the page size."""
    pages, i = [], 0
    while i + PAGE <= len(stream):
        chunk = stream[i:i + PAGE]
        if all(32 <= b < 127 or b in (9, 10) for b in chunk[:64]) and \
                sum(32 <= b < 127 or b in (9, 10) for b in chunk) > PAGE * 0.95:
            pages.append(chunk)
            i += PAGE
        else:
            i += 1
    return pages


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--livemig", default=os.path.join(here, "..", "..", "build", "livemig"))
    ap.add_argument("--qemu72", default="/work/shared/testdata/qemu72")
    ap.add_argument("--out", default=os.path.join(here, "corpus"))
    a = ap.parse_args()
    for t in TARGETS:
        d = os.path.join(a.out, t)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    qemu_seeds(a.qemu72, a.out)
    livemig_seeds(a.livemig, a.out)
    for t in TARGETS:
        d = os.path.join(a.out, t)
        files = os.listdir(d)
        print("%-16s %3d seeds %7d bytes" % (t, len(files),
              sum(os.path.getsize(os.path.join(d, f)) for f in files)))


if __name__ == "__main__":
    main()
