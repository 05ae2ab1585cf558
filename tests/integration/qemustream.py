"""qemustream -- an independent walker for QEMU v3 precopy streams.

Used by the stream tests to (1) check that what livemig writes to file: is
laid out as QEMU's format documents it, and (2) find the byte offsets of
landmarks (section headers, RAM records, footers, the EOF byte, ...) where
damage must be caught by the loader.  Written from the documented format
(magic "QEVM", version 3, CONFIGURATION, START/PART/END/FULL sections with
footers, the "ram" section's records, EOF, optional VMDESCRIPTION); it does
not share code with livemig.

Scope: one channel, no multifd, no postcopy, 4 KiB target pages.  Device
sections other than "ram" carry no length on the wire; their size comes from
the VMDESCRIPTION JSON if present, otherwise from finding their footer.

parse(data) returns a Stream or raises StreamError(offset, message).
"""

import json
import struct

MAGIC = 0x5145564D
VERSION = 3

EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND = range(9)
FOOTER = 0x7E

F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
PAGE = 4096
FLAG_MASK = PAGE - 1


class StreamError(Exception):
    def __init__(self, offset, msg):
        super().__init__("offset %d: %s" % (offset, msg))
        self.offset = offset


class Stream:
    def __init__(self):
        self.size = 0
        self.marks = {}          # landmark name -> byte offset
        self.sections = []       # (offset, type, section_id, idstr)
        self.blocks = {}         # RAM block idstr -> used_length
        self.page_data = []      # offsets of PAGE payloads
        self.zero_fill = []      # offsets of ZERO fill bytes
        self.pages_seen = {}     # block -> set of page indexes
        self.machine = None      # configuration section's machine name
        self.eof = None          # offset of the EOF byte
        self.vmdesc = None       # parsed VMDESCRIPTION JSON, if any

    def mark(self, name, off):
        self.marks.setdefault(name, off)


class _Reader:
    def __init__(self, data):
        self.d = data
        self.pos = 0

    def need(self, n, what):
        if self.pos + n > len(self.d):
            raise StreamError(self.pos, "stream ends inside %s" % what)

    def u8(self, what="a byte"):
        self.need(1, what)
        v = self.d[self.pos]
        self.pos += 1
        return v

    def be16(self, what="a be16"):
        self.need(2, what)
        v = struct.unpack_from(">H", self.d, self.pos)[0]
        self.pos += 2
        return v

    def be32(self, what="a be32"):
        self.need(4, what)
        v = struct.unpack_from(">I", self.d, self.pos)[0]
        self.pos += 4
        return v

    def be64(self, what="a be64"):
        self.need(8, what)
        v = struct.unpack_from(">Q", self.d, self.pos)[0]
        self.pos += 8
        return v

    def take(self, n, what):
        self.need(n, what)
        v = self.d[self.pos:self.pos + n]
        self.pos += n
        return v

    def counted(self, what):
        n = self.u8(what + " length")
        return bytes(self.take(n, what)).decode("latin-1")


def _find_vmdesc(data):
    """(eof_offset, json) when the stream ends with EOF, VMDESCRIPTION."""
    lo = max(0, len(data) - (10 << 20))
    pos = len(data)
    while True:
        pos = data.rfind(b"\x00\x06", lo, pos)
        if pos < 0:
            return None
        if pos + 6 <= len(data):
            n = struct.unpack_from(">I", data, pos + 2)[0]
            if pos + 6 + n == len(data) and data[pos + 6:pos + 7] == b"{":
                try:
                    return pos, json.loads(bytes(data[pos + 6:]).decode("utf-8"))
                except ValueError:
                    pass
        if pos == lo:
            return None


def _vmsd_size(entry):
    size = sum(f.get("size", 0) for f in entry.get("fields", []))
    for sub in entry.get("subsections", []):
        name = sub.get("vmsd_name", "")
        size += 1 + 1 + len(name) + 4 + _vmsd_size(sub)
    return size


def parse(data):
    s = Stream()
    s.size = len(data)
    r = _Reader(data)
    vm = _find_vmdesc(data)
    if vm is not None:
        s.vmdesc = vm[1]
    if r.be32("the magic") != MAGIC:
        raise StreamError(0, "bad magic (not QEVM)")
    s.mark("magic", 0)
    if r.be32("the version") != VERSION:
        raise StreamError(4, "version is not 3")
    s.mark("version", 7)
    by_id = {}
    last_block = [None]

    def footer(sid):
        off = r.pos
        t = r.u8("a section footer")
        if t != FOOTER:
            raise StreamError(off, "expected section footer 0x7e, found 0x%02x" % t)
        got = r.be32("a section footer id")
        if got != sid:
            raise StreamError(off + 1, "footer for section %d, expected %d" % (got, sid))
        s.mark("footer", off)
        s.mark("footer-id", off + 4)
        return off

    def ram_records(start):
        if start:
            off = r.pos
            w = r.be64("the RAM size record")
            if w & FLAG_MASK != F_MEM_SIZE:
                raise StreamError(off, "ram START does not begin with MEM_SIZE (flags 0x%x)"
                                  % (w & FLAG_MASK))
            total = w & ~FLAG_MASK
            s.mark("mem-size", off + 4)
            got = 0
            while got < total:
                boff = r.pos
                name = r.counted("a RAM block name")
                length = r.be64("a RAM block length")
                s.blocks[name] = length
                s.pages_seen.setdefault(name, set())
                s.mark("block-idstr", boff + 1)
                s.mark("block-length", r.pos - 8 + 4)
                got += length
            if got != total:
                raise StreamError(r.pos, "block lengths sum to %d, MEM_SIZE says %d" % (got, total))
        while True:
            off = r.pos
            w = r.be64("a RAM record header")
            flags, addr = w & FLAG_MASK, w & ~FLAG_MASK
            if flags == F_EOS:
                s.mark("eos-start" if start else "eos", off + 7)
                return
            kind = flags & ~F_CONTINUE
            if kind not in (F_ZERO, F_PAGE):
                raise StreamError(off, "unexpected RAM record flags 0x%x" % flags)
            if flags & F_CONTINUE:
                if last_block[0] is None:
                    raise StreamError(off, "CONTINUE before any named RAM record")
                block = last_block[0]
                s.mark("continue-flags", off + 7)
            else:
                noff = r.pos
                block = r.counted("a RAM block name")
                s.mark("page-idstr", noff + 1)
                last_block[0] = block
            if block not in s.blocks:
                raise StreamError(off, "RAM record for unknown block %r" % block)
            if addr + PAGE > s.blocks[block]:
                raise StreamError(off, "RAM record offset 0x%x beyond block %r" % (addr, block))
            s.mark("page-flags", off + 7)
            s.mark("page-addr", off + 2)
            if kind == F_ZERO:
                s.zero_fill.append(r.pos)
                r.u8("a zero page fill byte")
            else:
                s.page_data.append(r.pos)
                r.take(PAGE, "page data")
            s.pages_seen[block].add(addr // PAGE)

    def device_payload_len(sid, idstr, inst, payload):
        if s.vmdesc is not None:
            for dev in s.vmdesc.get("devices", []):
                if dev.get("name") == idstr and dev.get("instance_id", 0) == inst:
                    return _vmsd_size(dev)
        # No description: the payload runs to the first footer for this
        # section that is followed by a plausible record type.
        pat = bytes([FOOTER]) + struct.pack(">I", sid)
        pos = payload
        while True:
            pos = data.find(pat, pos)
            if pos < 0:
                raise StreamError(payload, "cannot find the end of section %r" % idstr)
            nxt = pos + 5
            if nxt < len(data) and data[nxt] in (EOF, START, PART, END, FULL, COMMAND):
                return pos - payload
            pos += 1

    while True:
        off = r.pos
        t = r.u8("a record type")
        if t == CONFIG:
            s.mark("config", off)
            n = r.be32("the machine name length")
            s.mark("config-name", r.pos)
            s.machine = bytes(r.take(n, "the machine name")).decode("latin-1")
            while r.pos < len(data) and data[r.pos] == SUBSECTION:
                r.u8()
                name = r.counted("a subsection name")
                r.be32("a subsection version")
                if name == "configuration/capabilities":
                    for _ in range(r.be32("the capability count")):
                        r.counted("a capability name")
                elif name == "configuration/target-page-bits":
                    r.be32("target-page-bits")
                elif name == "configuration/uuid":
                    r.take(16, "the uuid")
                else:
                    raise StreamError(off, "unknown configuration subsection %r" % name)
        elif t in (START, FULL):
            sid = r.be32("a section id")
            idoff = r.pos
            idstr = r.counted("a section name")
            inst = r.be32("an instance id")
            ver = r.be32("a version id")
            by_id[sid] = idstr
            s.sections.append((off, t, sid, idstr))
            if idstr == "ram":
                if t != START:
                    raise StreamError(off, "ram in a FULL section")
                if ver != 4:
                    raise StreamError(r.pos - 4, "ram section version %d, not 4" % ver)
                s.mark("ram-start", off)
                s.mark("ram-section-id", off + 4)
                s.mark("ram-idstr", idoff + 1)
                s.mark("ram-version", r.pos - 1)
                ram_records(True)
                s.mark("after-ram-start", r.pos + 5)
            else:
                s.mark("device-type", off)
                s.mark("device-idstr", idoff + 1)
                s.mark("device-version", r.pos - 1)
                n = device_payload_len(sid, idstr, inst, r.pos)
                s.mark("device-payload", r.pos)
                if n > 0:
                    s.mark("device-payload-last", r.pos + n - 1)
                r.take(n, "section %r" % idstr)
            foff = footer(sid)
            if idstr != "ram":
                s.marks["device-footer-id"] = foff + 4
        elif t in (PART, END):
            sid = r.be32("a section id")
            if by_id.get(sid) != "ram":
                raise StreamError(off, "PART/END for section id %d (%r)" % (sid, by_id.get(sid)))
            s.sections.append((off, t, sid, "ram"))
            s.mark("part-section-id", off + 4)
            ram_records(False)
            footer(sid)
        elif t == COMMAND:
            r.be16("a command")
            r.take(r.be16("a command length"), "command data")
        elif t == EOF:
            s.eof = off
            s.mark("eof", off)
            break
        else:
            raise StreamError(off, "unknown record type 0x%02x" % t)
    if r.pos != len(data):
        if vm is None or vm[0] != s.eof:
            raise StreamError(r.pos, "%d bytes after EOF that are not a VMDESCRIPTION"
                              % (len(data) - r.pos))
    return s
