"""lmtest -- harness for livemig's integration tests (Python 3 stdlib only).

A test file registers cases with the @test decorator and ends with
`lmtest.main()`.  main() prints a TAP stream (`1..N`, `ok 1 - name`,
`not ok 2 - name`, `ok 3 - name # SKIP reason`) that meson counts case by
case, with diagnostics as `#` lines.

Design:

* The system under test is the `livemig` binary (env LIVEMIG, set by
  meson.build).  Each case gets an Env: a private temp dir plus every
  `livemig guest` process the case starts there, each with its own QMP unix
  socket and its stdout/stderr captured to files in the dir.
* Nothing waits without a bound.  Every QMP read has a timeout; conditions
  are polled (every 50 ms) against a deadline by wait_until(); every case
  runs under a SIGALRM watchdog that turns a hang anywhere into a failure of
  that case.  There are no sleeps used as synchronisation: a poll loop
  always re-checks the real condition.
* Children never outlive the harness.  They are started with
  PR_SET_PDEATHSIG=SIGKILL (so even a SIGKILLed harness leaves no guests
  behind) and every Env kills and reaps its guests at the end of its case,
  pass or fail.  SIGTERM/SIGINT (meson's timeout) kill everything first.
* A guest that is still running at the end of a case is asked to `quit` and
  must exit 0 (under ASan that is where leaks are reported); a guest that
  exited on its own without the case expecting it fails the case.  A case
  marks an expected exit by calling Guest.wait_exit() or Guest.kill().

Ownership: the harness owns every process it starts and every file under
the Env dir; cases own nothing they must free.  The module keeps one piece
of process-wide state: the list of live children, used only by the signal
handlers for the final cleanup.
"""

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

PAGE_SIZE = 4096
POLL_S = 0.05                 # query-migrate polling period
DEFAULT_CASE_TIMEOUT = 240    # seconds per case (watchdog)
QUIT_LIMIT_S = 5              # a guest must be gone this soon after QMP quit

# ----------------------------------------------------------------- errors


class TestFailure(AssertionError):
    """A check failed; the message says what was expected and what was seen."""


class Timeout(TestFailure):
    """A bounded wait ran out."""


class Skip(Exception):
    """The case cannot run here (e.g. no IPv6 loopback)."""


class QMPError(Exception):
    """The server answered {"error": {"class": ..., "desc": ...}}."""

    def __init__(self, cmd, cls, desc):
        super().__init__("%s: %s: %s" % (cmd, cls, desc))
        self.cmd = cmd
        self.cls = cls
        self.desc = desc


class QMPClosed(TestFailure):
    """The server closed the connection."""


def check(cond, msg, *args):
    if not cond:
        raise TestFailure(msg % args if args else msg)

def guest_version_table(path, doc, pages=None):
    """The demo guest's version table from the FULL "guest" section of a
    saved stream, located with `livemig analyze --json` output `doc` (be64
    pages, be32 fill, be32 version a page: docs/cli.md, the demo guest
    model).  `pages`, when given, is the page count the table must have."""
    secs = [s for s in doc["sections"] if s["idstr"] == "guest" and s["type"] == "FULL"]
    check(len(secs) == 1, "expected one FULL 'guest' section: %r", secs)
    s = secs[0]
    header = 1 + 4 + 1 + len("guest") + 4 + 4
    with open(path, "rb") as f:
        f.seek(s["start"] + header)
        payload = f.read(s["end"] - 5 - s["start"] - header)
    n, _fill = struct.unpack(">QI", payload[:12])
    check((pages is None or n == pages) and len(payload) == 12 + 4 * n,
          "guest state: %d pages in %d bytes", n, len(payload))
    return struct.unpack(">%dI" % n, payload[12:])


def skip(reason):
    raise Skip(reason)


def note(msg):
    """A TAP diagnostic line, shown in meson's log."""
    for line in str(msg).splitlines() or [""]:
        sys.stdout.write("# %s\n" % line)
    sys.stdout.flush()


# ----------------------------------------------------------------- binary


def find_livemig():
    path = os.environ.get("LIVEMIG")
    if path:
        return path
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for d in ("build-tests", "build", "build-asan"):
        for sub in ("livemig", "tools/livemig"):
            cand = os.path.join(root, d, sub)
            if os.access(cand, os.X_OK):
                return cand
    raise TestFailure("livemig binary not found: set LIVEMIG=/path/to/livemig")


# ----------------------------------------------------------------- children

_live_children = []           # Popen objects not yet reaped (signal cleanup only)

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:               # pragma: no cover - glibc is always there on Debian
    _libc = None


def _child_setup():
    # PR_SET_PDEATHSIG (1): the kernel SIGKILLs the child when we die.
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def spawn(argv, stdout, stderr, pass_fds=(), cwd=None, env=None):
    """Start a child that dies with the harness and is reaped by it."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                         stderr=stderr, pass_fds=tuple(pass_fds), cwd=cwd,
                         env=env, preexec_fn=_child_setup)
    _live_children.append(p)
    return p


def reap(p, timeout):
    """Wait for p at most timeout s; SIGKILL it if it is still there."""
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait(10)
    finally:
        if p.returncode is not None and p in _live_children:
            _live_children.remove(p)


def _kill_all_children():
    for p in list(_live_children):
        try:
            p.kill()
            p.wait(5)
        except Exception:
            pass
        if p in _live_children:
            _live_children.remove(p)


def describe_exit(rc):
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return "killed by signal %s" % signal.Signals(-rc).name
        except ValueError:
            return "killed by signal %d" % -rc
    return "exit status %d" % rc


# ----------------------------------------------------------------- waiting


def wait_until(fn, timeout, what, interval=POLL_S):
    """Poll fn() until it returns a true value (returned) or timeout s pass."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise Timeout("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


# ----------------------------------------------------------------- QMP


class QMP:
    """QMP client over a unix socket: one JSON message per line.

    execute() returns the "return" value or raises QMPError; events that
    arrive meanwhile are kept in self.events (each with "_rx", the local
    monotonic time it was read).  Every read is bounded by a timeout.
    """

    def __init__(self, path, timeout=30.0, negotiate=True, alive=None):
        """Connect (retrying until the socket accepts, at most timeout s),
        read the greeting and, if negotiate, send qmp_capabilities.  alive()
        is polled while retrying so a server that died fails fast."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if alive is not None and not alive():
                    raise TestFailure("QMP server for %s exited before accepting" % path)
                if time.monotonic() >= deadline:
                    raise Timeout("QMP socket %s not accepting after %.0f s (%s)"
                                  % (path, timeout, e))
                time.sleep(0.02)
        self.path = path
        self.sock = s
        self.buf = b""
        self.events = []
        self.negotiated = False
        self.greeting = self.recv(timeout=max(1.0, deadline - time.monotonic()))
        if "QMP" not in self.greeting:
            raise TestFailure("bad QMP greeting: %r" % (self.greeting,))
        if negotiate:
            self.negotiate()

    def negotiate(self):
        self.execute("qmp_capabilities")
        self.negotiated = True

    # -- raw I/O
    def send_raw(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise QMPClosed("QMP %s: send failed: %s" % (self.path, e))

    def send(self, obj, fds=None):
        data = json.dumps(obj).encode() + b"\n"
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.send_raw(data)

    def recv(self, timeout):
        """Next message (reply or event), at most timeout s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout("QMP %s: no message within %.1f s" % (self.path, timeout))
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                raise QMPClosed("QMP %s: read failed: %s" % (self.path, e))
            if not data:
                raise QMPClosed("QMP %s: connection closed by the server" % self.path)
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        line = line.strip()
        if not line:
            return self.recv(max(0.0, deadline - time.monotonic()))
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise TestFailure("QMP %s: server sent invalid JSON %r: %s" % (self.path, line[:200], e))
        if not isinstance(msg, dict):
            raise TestFailure("QMP %s: server sent a non-object %r" % (self.path, msg))
        return msg

    def reply(self, timeout):
        """Next reply ({"return"} or {"error"}), queueing events."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if "event" in msg:
                msg["_rx"] = time.monotonic()
                self.events.append(msg)
                continue
            if "return" in msg or "error" in msg:
                return msg
            raise TestFailure("QMP %s: unexpected message %r" % (self.path, msg))

    # -- commands
    def execute_raw(self, cmd, args=None, timeout=30.0, id=None, fds=None):
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        if id is not None:
            msg["id"] = id
        self.send(msg, fds)
        r = self.reply(timeout)
        if cmd == "qmp_capabilities" and "return" in r:
            self.negotiated = True
        return r

    def execute(self, cmd, args=None, timeout=30.0):
        r = self.execute_raw(cmd, args, timeout)
        if "error" in r:
            e = r["error"]
            if not isinstance(e, dict):
                raise TestFailure("%s: malformed error reply %r" % (cmd, r))
            raise QMPError(cmd, e.get("class"), e.get("desc"))
        return r["return"]

    # -- events
    def poll_events(self, timeout=0.0):
        """Read events already sent (waiting at most timeout s for the first)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if b"\n" not in self.buf:
                self.sock.settimeout(max(0.001, left))
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    return self.events
                except OSError:
                    return self.events
                if not data:
                    return self.events
                self.buf += data
                continue
            msg = self.recv(1.0)
            if "event" in msg:
                msg["_rx"] = time.monotonic()
                self.events.append(msg)
            else:
                raise TestFailure("QMP %s: reply with no command pending: %r" % (self.path, msg))

    def events_named(self, name):
        return [e for e in self.events if e.get("event") == name]

    def wait_event(self, name, pred=None, timeout=30.0):
        """The first event `name` whose data satisfies pred, or Timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("event") == name and (pred is None or pred(e.get("data", {}))):
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout("no %s event within %.0f s (events seen: %s)"
                              % (name, timeout, [x.get("event") for x in self.events]))
            self.poll_events(min(left, 0.2))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ----------------------------------------------------------------- guests


class Guest:
    """One `livemig guest` process with its QMP socket and logs.

    Keyword arguments map to `livemig guest` options (None = the tool's
    default); extra= appends raw arguments, pass_fds= keeps descriptors open
    in the child (same numbers), environ= adds environment variables (e.g.
    LIVEMIG_FAULT).  connect=False leaves QMP unconnected until first use.
    """

    def __init__(self, env, name, mem="64M", vcpus=2, dirty_rate=None,
                 pattern=None, fill=None, seed=None, tracker=None,
                 incoming=None, verify_on_arrival=None, extra=(),
                 pass_fds=(), connect=True, startup_timeout=60.0, environ=None):
        self.env = env
        self.name = name
        self.mem = mem
        self.qmp_path = env.path(name + ".qmp")
        if len(self.qmp_path) > 100:
            raise TestFailure("QMP socket path too long for AF_UNIX: %s" % self.qmp_path)
        self.out_path = env.path(name + ".out")
        self.err_path = env.path(name + ".err")
        argv = [env.livemig, "guest", "--mem", str(mem), "--vcpus", str(vcpus),
                "--qmp", "unix:" + self.qmp_path]
        if dirty_rate is not None:
            argv += ["--dirty-rate", str(dirty_rate)]
        if pattern:
            argv += ["--pattern", pattern]
        if fill:
            argv += ["--fill", fill]
        if seed is not None:
            argv += ["--seed", str(seed)]
        if tracker:
            argv += ["--dirty-tracker", tracker]
        if incoming:
            argv += ["--incoming", incoming]
        if verify_on_arrival is not None:
            argv += ["--verify-on-arrival", verify_on_arrival]
        argv += list(extra)
        self.argv = argv
        self.expect_exit = False
        self.quit_seconds = 0.0
        self._qmp = None
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            child_env = None
            if environ:
                child_env = dict(os.environ)
                child_env.update({k: str(v) for k, v in environ.items()})
            self.proc = spawn(argv, out, err, pass_fds=pass_fds, cwd=env.dir, env=child_env)
        env.guests.append(self)
        if connect:
            self.connect(startup_timeout)

    # -- process
    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def returncode(self):
        return self.proc.poll()

    def stderr(self):
        try:
            with open(self.err_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stderr_tail(self, n=25):
        lines = self.stderr().splitlines()
        return "\n".join(lines[-n:])

    def wait_exit(self, timeout):
        """Expect the process to exit by itself within timeout s; returns rc."""
        self.expect_exit = True
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Timeout("%s did not exit within %.0f s; stderr:\n%s"
                          % (self.name, timeout, self.stderr_tail()))
        if self.proc in _live_children:
            _live_children.remove(self.proc)
        return rc

    def kill(self, sig=signal.SIGKILL):
        self.expect_exit = True
        if self.alive():
            self.proc.send_signal(sig)
        reap(self.proc, 10)

    def cpu_seconds(self):
        """utime+stime of the whole process, from /proc/PID/stat."""
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    # -- QMP
    def connect(self, timeout=30.0, negotiate=True):
        self._qmp = QMP(self.qmp_path, timeout=timeout, negotiate=negotiate,
                        alive=self.alive)
        return self._qmp

    @property
    def qmp(self):
        if self._qmp is None:
            self.connect()
        return self._qmp

    def disconnect(self):
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def cmd(self, name, args=None, timeout=30.0):
        try:
            return self.qmp.execute(name, args, timeout)
        except QMPClosed:
            raise TestFailure("%s: QMP connection lost during %s (%s); stderr:\n%s"
                              % (self.name, name, describe_exit(self.proc.poll()),
                                 self.stderr_tail()))

    def query_migrate(self):
        return self.cmd("query-migrate")

    def runstate(self):
        return self.cmd("query-status")["status"]

    def info(self):
        return self.cmd("x-guest-info")

    def verify(self, cached=False, timeout=120.0):
        args = {"cached": True} if cached else {}
        return self.cmd("x-guest-verify", args, timeout=timeout)

    def set_caps(self, **caps):
        self.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": k.replace("_", "-"), "state": bool(v)} for k, v in caps.items()]})

    def set_params(self, **params):
        self.cmd("migrate-set-parameters", {k.replace("_", "-"): v for k, v in params.items()})

    def quit(self, timeout=20.0):
        """QMP quit; returns the exit status (the process must go away)."""
        self.expect_exit = True
        t0 = time.monotonic()
        try:
            if not self.qmp.negotiated:
                self.qmp.negotiate()
            self.qmp.execute("quit", timeout=10.0)
        except (QMPClosed, TestFailure, QMPError, OSError):
            pass   # reported through the exit status below
        self.disconnect()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            reap(self.proc, 0)
            raise Timeout("%s did not exit within %.0f s of quit; stderr:\n%s"
                          % (self.name, timeout, self.stderr_tail()))
        finally:
            self.quit_seconds = time.monotonic() - t0
        if self.proc in _live_children:
            _live_children.remove(self.proc)
        return rc


# ----------------------------------------------------------------- environment


class Env:
    """Per-case temp dir and guests; cleanup() kills and reaps everything."""

    def __init__(self, case_name):
        # Short: a unix socket path must fit in 108 bytes.
        slug = re.sub(r"[^A-Za-z0-9]+", "-", case_name).strip("-")[:20]
        self.dir = tempfile.mkdtemp(prefix="lmt-%s-" % slug)
        self.livemig = find_livemig()
        self.guests = []

    def path(self, name):
        return os.path.join(self.dir, name)

    def guest(self, name, **kw):
        return Guest(self, name, **kw)

    def cleanup(self):
        """Stop every guest; returns a list of problems (empty if clean)."""
        problems = []
        for g in self.guests:
            try:
                rc = g.proc.poll()
                if rc is None:
                    if g.expect_exit:
                        g.kill()
                        continue
                    try:
                        rc = g.quit()
                    except Timeout as e:
                        problems.append(str(e))
                        continue
                    if rc != 0:
                        problems.append("%s: %s after quit (expected 0); stderr:\n%s"
                                        % (g.name, describe_exit(rc), g.stderr_tail()))
                    elif g.quit_seconds > QUIT_LIMIT_S:
                        # Exiting means joining threads: one that needs
                        # seconds was blocked in a wait nobody interrupted.
                        problems.append("%s took %.1f s to exit after quit (limit %d s)"
                                        % (g.name, g.quit_seconds, QUIT_LIMIT_S))
                elif not g.expect_exit and rc != 0:
                    problems.append("%s exited unexpectedly: %s; stderr:\n%s"
                                    % (g.name, describe_exit(rc), g.stderr_tail()))
            finally:
                g.disconnect()
                if g.proc.poll() is None:
                    reap(g.proc, 0)
                if g.proc in _live_children:
                    _live_children.remove(g.proc)
        if os.environ.get("LMTEST_KEEP"):
            note("kept %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return problems


# ----------------------------------------------------------------- helpers


def free_tcp_port(host):
    """A port that is free right now on host (for --incoming tcp:HOST:PORT)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def have_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def tcp_listening(port):
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state = parts[1], parts[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def unix_listening(path):
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                # Flags 00010000 = __SO_ACCEPTCON: a listening socket.
                if len(parts) >= 8 and parts[-1] == path and int(parts[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


def wait_listening(uri, guest=None, timeout=30.0):
    """Wait until the destination listens on uri (tcp:/unix:), without
    connecting (a probe connection would be taken for the migration)."""
    if uri.startswith("tcp:"):
        port = int(uri.rsplit(":", 1)[1])
        probe = lambda: tcp_listening(port)
    elif uri.startswith("unix:"):
        path = uri[5:]
        probe = lambda: unix_listening(path)
    else:
        return

    def ok():
        if guest is not None and not guest.alive():
            raise TestFailure("%s exited (%s) before listening on %s; stderr:\n%s"
                              % (guest.name, describe_exit(guest.returncode()), uri,
                                 guest.stderr_tail()))
        return probe()
    wait_until(ok, timeout, "a listener on %s" % uri)


TERMINAL = ("completed", "failed", "cancelled")


def wait_migration(g, until=("completed",), timeout=120.0, on_sample=None):
    """Poll g's query-migrate every 50 ms until its status is in `until`.

    A terminal status not in `until` fails at once with error-desc.
    on_sample(info) sees every sample (may raise).  Returns the last info."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if not g.alive():
            raise TestFailure("%s exited (%s) while waiting for migration %s; stderr:\n%s"
                              % (g.name, describe_exit(g.returncode()), "/".join(until),
                                 g.stderr_tail()))
        info = g.query_migrate()
        last = info
        if on_sample is not None:
            on_sample(info)
        st = info.get("status")
        if st in until:
            return info
        if st in TERMINAL:
            raise TestFailure("%s: migration ended %s (wanted %s): error-desc %r"
                              % (g.name, st, "/".join(until), info.get("error-desc")))
        if time.monotonic() >= deadline:
            raise Timeout("%s: migration still %r after %.0f s (wanted %s); ram %s"
                          % (g.name, st, timeout, "/".join(until), info.get("ram")))
        time.sleep(POLL_S)


# Big-endian fields and counted strings of QEMU's stream, for tests that
# write streams by hand.
def be16(v):
    return v.to_bytes(2, "big")


def be32(v):
    return v.to_bytes(4, "big")


def be64(v):
    return v.to_bytes(8, "big")


def counted(name):
    return bytes([len(name)]) + name.encode()


# A livemig stream's header and configuration section (machine livemig-1).
STREAM_HEADER = b"QEVM" + be32(3) + b"\x07" + be32(9) + b"livemig-1"


def ram(info, key, default=0):
    return (info.get("ram") or {}).get(key, default)


def mem_bytes(mem):
    m = re.fullmatch(r"(\d+)([KMG]?)", str(mem))
    check(m is not None, "bad size %r", mem)
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def check_verified(g, pages, cached, what=""):
    """x-guest-verify (cached = the arrival check) must report 0 bad pages."""
    v = g.verify(cached=cached)
    label = "arrival check" if cached else "fresh verify"
    for k in ("checked", "bad"):
        check(k in v, "%s %s: reply lacks %r: %r", g.name, label, k, v)
    check(v["bad"] == 0, "%s %s%s: %d bad pages (lost %s stale %s torn %s misplaced %s), examples %s",
          g.name, label, what, v["bad"], v.get("lost"), v.get("stale"), v.get("torn"),
          v.get("misplaced"), v.get("examples"))
    check(v["checked"] == pages, "%s %s: checked %d pages, guest has %d",
          g.name, label, v["checked"], pages)
    return v


def check_runstate(g, want):
    st = g.cmd("query-status")
    check(st.get("status") == want, "%s: run state %r, expected %r (%r)",
          g.name, st.get("status"), want, st)
    if want == "running":
        check(st.get("running") is True, "%s: query-status running=%r with status running",
              g.name, st.get("running"))
    return st


def check_writes_advance(g, timeout=15.0, min_delta=50):
    """The guest's writers are running: x-guest-info writes grows."""
    w0 = g.info()["writes"]
    wait_until(lambda: g.info()["writes"] >= w0 + min_delta, timeout,
               "%s's writers to make progress (writes %d)" % (g.name, w0))


def check_arrival_line(g, pages):
    err = g.stderr()
    m = re.search(r"arrival check: (\d+) pages checked, (\d+) bad", err)
    check(m is not None, "%s: no 'arrival check: N pages checked, N bad' line on stderr:\n%s",
          g.name, g.stderr_tail())
    check(int(m.group(1)) == pages and int(m.group(2)) == 0,
          "%s: stderr says %r, expected %d pages, 0 bad", g.name, m.group(0), pages)


def check_destination(dst, pages, dirtying=False):
    """Everything a completed destination must show."""
    dinfo = wait_migration(dst, timeout=60)
    check_verified(dst, pages, cached=True)
    check_verified(dst, pages, cached=False)
    check_arrival_line(dst, pages)
    check_runstate(dst, "running")
    if dirtying:
        check_writes_advance(dst)
    return dinfo


EXIT_GRACE_S = 10            # a failed destination must exit this soon


def wait_incoming_exit(g, timeout=60.0):
    """Wait for a destination that should give up to exit; returns its rc.

    While waiting, its query-migrate is watched: once it says failed or
    cancelled the process has EXIT_GRACE_S to exit, so a destination that
    notices the failure but stays up fails fast with the error it holds."""
    deadline = time.monotonic() + timeout
    ended = None
    while True:
        rc = g.returncode()
        if rc is not None:
            return g.wait_exit(1)
        if ended is None:
            try:
                if g._qmp is None:
                    g.connect(timeout=1, negotiate=True)
                info = g.query_migrate()
                if info.get("status") in ("failed", "cancelled"):
                    ended = (time.monotonic(), info.get("status"), info.get("error-desc"))
            except TestFailure:
                pass        # not serving QMP (yet, or any more)
        now = time.monotonic()
        if ended is not None and now - ended[0] > EXIT_GRACE_S:
            g.expect_exit = True
            raise TestFailure("%s: incoming migration %s (error-desc %r) but the process did not "
                              "exit within %d s" % (g.name, ended[1], ended[2], EXIT_GRACE_S))
        if now >= deadline:
            g.expect_exit = True
            raise Timeout("%s did not exit within %.0f s; stderr:\n%s"
                          % (g.name, timeout, g.stderr_tail()))
        time.sleep(POLL_S)


def check_dst_failed(dst, pattern, timeout=60):
    """The destination exits 1 saying why (its reason matches pattern) and
    never ran its guest (no arrival check).  Returns the reason."""
    rc = wait_incoming_exit(dst, timeout)
    err = dst.stderr()
    # 1 is the status of a failed incoming migration; under ASan a leak
    # report would turn it into 23, hence the exact value.
    check(rc == 1, "destination: %s, expected exit status 1; stderr:\n%s",
          describe_exit(rc), dst.stderr_tail())
    check(not re.search(r"Sanitizer|runtime error:", err), "destination: sanitizer report:\n%s",
          dst.stderr_tail(60))
    m = re.search(r"incoming migration failed: *(\S.*)", err)
    check(m is not None, "destination stderr lacks 'incoming migration failed: <reason>':\n%s",
          dst.stderr_tail())
    check(re.search(pattern, m.group(1)) is not None,
          "destination's reason %r does not match %r", m.group(1), pattern)
    check("arrival check" not in err, "a failed destination ran its arrival check:\n%s",
          dst.stderr_tail())
    note("destination: %s" % m.group(1))
    return m.group(1)


def check_source_done(src, info):
    check(info.get("status") == "completed", "source status %r", info.get("status"))
    check_runstate(src, "postmigrate")


# ----------------------------------------------------------------- runner

_cases = []
_session = {"dir": None}
shared = {}                   # results one case leaves for later cases


def session_dir():
    """A temp dir that lives for the whole file (for files shared by cases)."""
    if _session["dir"] is None:
        _session["dir"] = tempfile.mkdtemp(prefix="lmtest-session-")
    return _session["dir"]


def test(name, timeout=DEFAULT_CASE_TIMEOUT):
    """Register fn(env) as a TAP case."""
    def deco(fn):
        _cases.append((name, fn, timeout))
        return fn
    return deco


def _on_alarm(signum, frame):
    raise Timeout("case exceeded its time limit (watchdog)")


def _on_term(signum, frame):
    _kill_all_children()
    sys.stdout.write("Bail out! interrupted by signal %d\n" % signum)
    sys.stdout.flush()
    os._exit(1)


def _tap_name(name):
    return name.replace("#", "")


def main():
    """Run every registered case and print TAP; exit 1 if any failed."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    only = os.environ.get("LMTEST_ONLY")     # substring filter for local runs
    sys.stdout.write("1..%d\n" % len(_cases))
    sys.stdout.flush()
    failures = 0
    for i, (name, fn, timeout) in enumerate(_cases, 1):
        if only and only not in name:
            sys.stdout.write("ok %d - %s # SKIP not selected by LMTEST_ONLY\n" % (i, _tap_name(name)))
            sys.stdout.flush()
            continue
        t0 = time.monotonic()
        env = None
        result, detail = "ok", None
        try:
            env = Env(name)
            signal.alarm(timeout)
            try:
                fn(env)
            finally:
                signal.alarm(0)
        except Skip as e:
            result, detail = "skip", str(e)
        except (TestFailure, QMPError) as e:
            result, detail = "fail", "%s: %s" % (type(e).__name__, e)
        except Exception:
            result, detail = "fail", traceback.format_exc()
        problems = []
        if env is not None:
            try:
                problems = env.cleanup()
            except Exception:
                problems = [traceback.format_exc()]
        if problems and result != "fail":
            result = "fail"
            detail = "cleanup: " + "\n".join(problems)
        elif problems:
            detail += "\n(also at cleanup: %s)" % "\n".join(problems)
        dt = time.monotonic() - t0
        if result == "ok":
            sys.stdout.write("ok %d - %s\n" % (i, _tap_name(name)))
        elif result == "skip":
            sys.stdout.write("ok %d - %s # SKIP %s\n" % (i, _tap_name(name), detail))
        else:
            failures += 1
            sys.stdout.write("not ok %d - %s\n" % (i, _tap_name(name)))
            note(detail)
        note("%s: %.1f s" % (name, dt))
        sys.stdout.flush()
    _kill_all_children()
    if _session["dir"] is not None and not os.environ.get("LMTEST_KEEP"):
        shutil.rmtree(_session["dir"], ignore_errors=True)
    sys.exit(1 if failures else 0)
