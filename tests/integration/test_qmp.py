#!/usr/bin/env python3
"""QMP compatibility: what a QEMU management script relies on.

Checked against QEMU's documented behaviour: the greeting shape,
query-version (QEMU's shape, this build's version from meson.build),
capabilities negotiation (commands refused before it, a second negotiation
refused), error classes (CommandNotFound for unknown commands, GenericError
for bad input and bad arguments), "id" echo, the migration parameter and
capability lists with QEMU's defaults, query-status run states, stop/cont
with STOP/RESUME events, MIGRATION events only with the "events" capability,
migrate-incoming on port 0 reporting the real socket-address, capabilities
frozen while a migration runs, and the guest's own x-guest-info.

If QEMU's baseline client (/work/shared/bench/qemu-baseline/qmp.py, or
$LMTEST_QEMU_QMP) is present, one case drives a whole migration with it,
exactly as the QEMU benchmark driver does; elsewhere that case is skipped.
"""

import importlib.util
import os
import re
import time

import lmtest
from lmtest import (PAGE_SIZE, QMP, QMPError, check, check_destination, check_verified,
                    check_runstate, check_source_done, free_tcp_port, mem_bytes,
                    note, ram, skip, test, wait_listening, wait_migration,
                    wait_until, tcp_listening)

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE
QEMU_DEFAULT_MAX_BW = 134217728


def expect_error(fn, cls, what):
    try:
        r = fn()
    except QMPError as e:
        check(e.cls == cls, "%s: error class %r (%s), expected %r", what, e.cls, e.desc, cls)
        check(isinstance(e.desc, str) and e.desc.strip(), "%s: empty error desc", what)
        return e
    raise lmtest.TestFailure("%s: succeeded (%r), expected a %s error" % (what, r, cls))


def raw_error(reply, cls, what):
    check("error" in reply, "%s: reply %r, expected an error", what, reply)
    e = reply["error"]
    check(e.get("class") == cls, "%s: class %r (%s), expected %r", what, e.get("class"),
          e.get("desc"), cls)
    check(isinstance(e.get("desc"), str) and e["desc"].strip(), "%s: empty desc", what)


@test("greeting has the QEMU shape")
def _(env):
    g = env.guest("g", mem=MEM, connect=False)
    q = g.connect(negotiate=False)
    gr = q.greeting["QMP"]
    v = gr.get("version", {})
    qv = v.get("qemu", {})
    for k in ("major", "minor", "micro"):
        check(isinstance(qv.get(k), int), "greeting version.qemu.%s is %r", k, qv.get(k))
    check("package" in v, "greeting version lacks 'package': %r", v)
    check(isinstance(gr.get("capabilities"), list), "greeting capabilities %r",
          gr.get("capabilities"))
    note("greeting: %s" % q.greeting)


def project_version():
    """meson.build's project version: what the binary under test was built as."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "meson.build")
    with open(path, encoding="utf-8") as f:
        m = re.search(r"project\([^)]*?\bversion\s*:\s*'([^']+)'", f.read(), re.S)
    check(m, "no project version in %s", path)
    return m.group(1)


@test("query-version: QEMU 7.2's shape, this build's version, as the greeting")
def _(env):
    g = env.guest("g", mem=MEM, connect=False)
    q = g.connect(negotiate=False)
    check(q.execute_raw("qmp_capabilities").get("return") == {}, "qmp_capabilities failed")
    v = q.execute("query-version")
    check(v.get("qemu") == {"major": 7, "minor": 2, "micro": 0}, "query-version qemu %r", v)
    want = "livemig " + project_version()
    check(v.get("package") == want, "query-version package %r, expected %r", v.get("package"),
          want)
    check(v == q.greeting["QMP"]["version"], "query-version %r differs from the greeting's %r",
          v, q.greeting["QMP"]["version"])


@test("commands before qmp_capabilities: CommandNotFound")
def _(env):
    g = env.guest("g", mem=MEM, connect=False)
    q = g.connect(negotiate=False)
    raw_error(q.execute_raw("query-status"), "CommandNotFound", "query-status before negotiation")
    check(q.execute_raw("qmp_capabilities").get("return") == {}, "qmp_capabilities did not return {}")
    check(q.execute("query-status")["status"] == "running", "query-status after negotiation")


@test("second qmp_capabilities: CommandNotFound")
def _(env):
    g = env.guest("g", mem=MEM)
    raw_error(g.qmp.execute_raw("qmp_capabilities"), "CommandNotFound", "second qmp_capabilities")


@test("unknown command: CommandNotFound")
def _(env):
    g = env.guest("g", mem=MEM)
    expect_error(lambda: g.cmd("no-such-command"), "CommandNotFound", "no-such-command")


@test("malformed input: GenericError, connection survives")
def _(env):
    g = env.guest("g", mem=MEM)
    q = g.qmp
    cases = [
        (b'{"execute": "query-status",,}\n', "invalid JSON"),
        (b'[1, 2, 3]\n', "non-object"),
        (b'{"arguments": {}}\n', "no execute"),
        (b'{"execute": 42}\n', "execute not a string"),
        (b'{"execute": "query-status", "arguments": [1]}\n', "arguments not an object"),
    ]
    for n, (data, what) in enumerate(cases):
        q.send_raw(data)
        # A probe with an id marks the end of the replies to the bad input
        # (a streaming parser may answer one bad line with several errors).
        probe = "probe-%d" % n
        q.send({"execute": "query-status", "id": probe})
        errors = []
        while True:
            reply = q.reply(10.0)
            if reply.get("id") == probe:
                break
            errors.append(reply)
        check(errors, "%s: no error reply before the next command's reply", what)
        for e in errors:
            raw_error(e, "GenericError", what)
        check(reply.get("return", {}).get("status") == "running",
              "%s: connection unusable afterwards: %r", what, reply)


@test("bad arguments: GenericError")
def _(env):
    g = env.guest("g", mem=MEM)
    expect_error(lambda: g.cmd("migrate", {}), "GenericError", "migrate without uri")
    expect_error(lambda: g.cmd("migrate", {"uri": "bogus:whatever"}), "GenericError",
                 "migrate to an unknown transport")
    expect_error(lambda: g.cmd("migrate-set-parameters", {"downtime-limit": "abc"}),
                 "GenericError", "downtime-limit as a string")
    expect_error(lambda: g.cmd("migrate-set-parameters", {"no-such-parameter": 1}),
                 "GenericError", "unknown parameter")
    expect_error(lambda: g.cmd("migrate-set-capabilities", {"capabilities": [
        {"capability": "no-such-capability", "state": True}]}), "GenericError",
        "unknown capability")
    expect_error(lambda: g.cmd("migrate", {"uri": "tcp:127.0.0.1:%d" % free_tcp_port("127.0.0.1")}),
                 "GenericError", "migrate to a port nobody listens on")
    check(g.runstate() == "running", "guest not running after refused commands")


@test("id is echoed in replies")
def _(env):
    g = env.guest("g", mem=MEM)
    r = g.qmp.execute_raw("query-status", id="abc-1")
    check(r.get("id") == "abc-1", "reply %r lacks id abc-1", r)
    r = g.qmp.execute_raw("no-such-command", id=17)
    check(r.get("id") == 17 and "error" in r, "error reply %r lacks id 17", r)


@test("query-migrate-parameters: QEMU defaults")
def _(env):
    g = env.guest("g", mem=MEM)
    p = g.cmd("query-migrate-parameters")
    check(p.get("downtime-limit") == 300, "downtime-limit %r, expected 300", p.get("downtime-limit"))
    check(p.get("max-bandwidth") in (0, QEMU_DEFAULT_MAX_BW),
          "max-bandwidth %r, expected 0 (unlimited) or QEMU's %d", p.get("max-bandwidth"),
          QEMU_DEFAULT_MAX_BW)
    qemu = {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
            "throttle-trigger-threshold": 50, "max-cpu-throttle": 99,
            "multifd-channels": 2, "multifd-compression": "none"}
    wrong = {k: p[k] for k, v in qemu.items() if k in p and p[k] != v}
    check(not wrong, "parameters differ from QEMU's defaults: %r", wrong)
    note("parameters: %s" % p)


@test("query-migrate-capabilities: QEMU names, all off")
def _(env):
    g = env.guest("g", mem=MEM)
    caps = g.cmd("query-migrate-capabilities")
    check(isinstance(caps, list), "reply %r is not a list", caps)
    names = {}
    for c in caps:
        check(set(c) >= {"capability", "state"}, "entry %r lacks capability/state", c)
        names[c["capability"]] = c["state"]
    for need in ("events", "auto-converge"):
        check(need in names, "capability %r missing (have %s)", need, sorted(names))
    on = [k for k, v in names.items() if v]
    check(not on, "capabilities on by default: %s", on)


@test("migrate-set-parameters / -capabilities round trip")
def _(env):
    g = env.guest("g", mem=MEM)
    g.set_params(downtime_limit=123, max_bandwidth=77 << 20)
    p = g.cmd("query-migrate-parameters")
    check(p.get("downtime-limit") == 123 and p.get("max-bandwidth") == 77 << 20,
          "after set: downtime-limit %r max-bandwidth %r", p.get("downtime-limit"),
          p.get("max-bandwidth"))
    g.set_caps(events=True, auto_converge=True)
    caps = {c["capability"]: c["state"] for c in g.cmd("query-migrate-capabilities")}
    check(caps.get("events") is True and caps.get("auto-converge") is True, "caps %r", caps)
    g.set_caps(auto_converge=False)
    caps = {c["capability"]: c["state"] for c in g.cmd("query-migrate-capabilities")}
    check(caps.get("auto-converge") is False and caps.get("events") is True, "caps %r", caps)


@test("query-status: running source, inmigrate destination")
def _(env):
    src = env.guest("src", mem=MEM)
    dst = env.guest("dst", mem=MEM, incoming="defer")
    check_runstate(src, "running")
    st = dst.cmd("query-status")
    # QEMU 7.2 says inmigrate from the start with -incoming defer; livemig's
    # API names the state before any migration prelaunch.  Never running.
    check(st.get("status") in ("inmigrate", "prelaunch") and st.get("running") is False,
          "deferred destination: %r, expected inmigrate (or prelaunch), running false", st)
    info = dst.query_migrate()
    check(info.get("status") in (None, "none") or info == {},
          "destination before migrate-incoming: query-migrate %r", info)


@test("migrate-incoming refused by a guest that runs or ran; migrate by one waiting to receive")
def _(env):
    uri = "unix:" + env.path("mig.sock")
    g = env.guest("g", mem=MEM, dirty_rate=2000)
    wait_until(lambda: g.info()["writes"] > 0, 30, "writers to start")
    e = expect_error(lambda: g.qmp.execute("migrate-incoming", {"uri": uri}), "GenericError",
                     "migrate-incoming on a running guest")
    check("running" in e.desc, "the refusal does not say the guest runs: %r", e.desc)
    check(not os.path.exists(uri[5:]), "a refused migrate-incoming still listens on %s", uri)
    g.cmd("stop")
    expect_error(lambda: g.qmp.execute("migrate-incoming", {"uri": uri}), "GenericError",
                 "migrate-incoming on a paused guest")
    g.cmd("cont")
    check_runstate(g, "running")
    lmtest.check_writes_advance(g)
    check_verified(g, PAGES, cached=False)
    check(g.query_migrate().get("status") in (None, "none"),
          "a refused migrate-incoming left a status: %r", g.query_migrate())
    dst = env.guest("dst", mem=MEM, incoming="defer")
    e = expect_error(lambda: dst.qmp.execute("migrate", {"uri": "unix:" + env.path("x.sock")}),
                     "GenericError", "migrate on a destination waiting for its guest")
    check("incoming" in e.desc, "refusal does not say why: %r", e.desc)


@test("stop during the load: the destination arrives paused, cont starts it")
def _(env):
    uri = "unix:" + env.path("mig.sock")
    dst = env.guest("dst", mem=MEM, incoming="defer", dirty_rate=1000)
    src = env.guest("src", mem=MEM, dirty_rate=1000)
    dst.cmd("stop")           # QEMU: while inmigrate this clears autostart
    check_runstate(dst, "inmigrate")
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    src.cmd("migrate", {"uri": uri})
    check_source_done(src, wait_migration(src, timeout=120))
    wait_migration(dst, timeout=60)
    check_runstate(dst, "paused")
    w0 = dst.info()["writes"]
    check(dst.info()["writes"] == w0, "a paused destination's writers run")
    dst.cmd("cont")
    check_runstate(dst, "running")
    lmtest.check_writes_advance(dst)
    check_verified(dst, PAGES, cached=True)
    check_verified(dst, PAGES, cached=False)


@test("stop / cont with STOP and RESUME events")
def _(env):
    g = env.guest("g", mem=MEM, dirty_rate=2000)
    wait_until(lambda: g.info()["writes"] > 0, 30, "writers to start")
    g.cmd("stop")
    g.qmp.wait_event("STOP", timeout=10)
    st = check_runstate(g, "paused")
    check(st.get("running") is False, "paused but running=%r", st.get("running"))
    w0 = g.info()["writes"]
    w1 = g.info()["writes"]
    check(w0 == w1, "writes moved while paused (%d -> %d)", w0, w1)
    g.cmd("cont")
    g.qmp.wait_event("RESUME", timeout=10)
    check_runstate(g, "running")
    lmtest.check_writes_advance(g)
    for e in g.qmp.events:
        ts = e.get("timestamp", {})
        check(isinstance(ts.get("seconds"), int) and isinstance(ts.get("microseconds"), int),
              "event %r lacks a {seconds, microseconds} timestamp", e)


def migrate_pair(env, events):
    uri = "unix:" + env.path("mig.sock")
    dst = env.guest("dst", mem=MEM, incoming="defer", dirty_rate=1000)
    src = env.guest("src", mem=MEM, dirty_rate=1000)
    if events:
        src.set_caps(events=True)
        dst.set_caps(events=True)
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120)
    check_source_done(src, info)
    check_destination(dst, PAGES, dirtying=True)
    # Anything emitted before the final state is on the wire by now; one
    # more round trip flushes what is queued behind it.
    src.cmd("query-status")
    dst.cmd("query-status")
    src.qmp.poll_events(0.2)
    dst.qmp.poll_events(0.2)
    return src, dst


@test("MIGRATION events with the events capability")
def _(env):
    src, dst = migrate_pair(env, events=True)
    for g in (src, dst):
        seq = [e["data"]["status"] for e in g.qmp.events_named("MIGRATION")]
        note("%s MIGRATION: %s" % (g.name, seq))
        want = ["setup", "active", "completed"] if g is src else ["active", "completed"]
        it = iter(seq)
        check(all(s in it for s in want), "%s: MIGRATION statuses %s do not contain %s in order",
              g.name, seq, want)
        check(seq and seq[-1] == "completed", "%s: last MIGRATION status %r", g.name,
              seq[-1] if seq else None)
    check(src.qmp.events_named("STOP"), "source sent no STOP event at switch-over")
    check(dst.qmp.events_named("RESUME"), "destination sent no RESUME event")


@test("no MIGRATION events without the events capability")
def _(env):
    src, dst = migrate_pair(env, events=False)
    for g in (src, dst):
        seq = g.qmp.events_named("MIGRATION")
        check(not seq, "%s sent MIGRATION events with the capability off: %s", g.name, seq)


@test("migrate-incoming on tcp port 0 reports the real socket-address")
def _(env):
    dst = env.guest("dst", mem=MEM, incoming="defer")
    src = env.guest("src", mem=MEM)
    dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    info = dst.query_migrate()
    sa = info.get("socket-address")
    check(sa, "destination query-migrate has no socket-address: %r", info)
    port = None
    if isinstance(sa, list):
        for a in sa:
            if isinstance(a, dict) and a.get("port") is not None:
                port = int(a["port"])
                break
    elif isinstance(sa, str):
        port = int(sa.rsplit(":", 1)[1])
    check(port, "cannot find a port in socket-address %r", sa)
    check(port != 0 and tcp_listening(port), "socket-address port %r is not listening", port)
    note("socket-address %r" % sa)
    src.cmd("migrate", {"uri": "tcp:127.0.0.1:%d" % port})
    info = wait_migration(src, timeout=120)
    check_source_done(src, info)
    check_destination(dst, PAGES)


@test("capabilities are frozen while migrating; parameters change live")
def _(env):
    uri = "unix:" + env.path("mig.sock")
    dst = env.guest("dst", mem=MEM, incoming=uri)
    src = env.guest("src", mem=MEM)
    wait_listening(uri, dst)
    src.set_params(max_bandwidth=8 << 20)          # 64 MiB take 8 s
    src.cmd("migrate", {"uri": uri})
    wait_until(lambda: src.query_migrate().get("status") == "active", 30, "status active")
    expect_error(lambda: src.set_caps(auto_converge=True), "GenericError",
                 "migrate-set-capabilities while active")
    src.set_params(max_bandwidth=100 << 30)
    check(src.cmd("query-migrate-parameters")["max-bandwidth"] == 100 << 30,
          "max-bandwidth not updated while active")
    info = wait_migration(src, timeout=60)
    check(info["total-time"] < 8000, "raising max-bandwidth live had no effect: total-time %s ms",
          info["total-time"])
    check_source_done(src, info)
    check_destination(dst, PAGES)


@test("migrate_cancel and migrate-cancel are both accepted")
def _(env):
    g = env.guest("g", mem=MEM)
    for name in ("migrate_cancel", "migrate-cancel"):
        try:
            g.cmd(name)
        except QMPError as e:
            check(e.cls != "CommandNotFound", "%s: %s", name, e)
    check_runstate(g, "running")


@test("x-guest-info reports the guest's configuration")
def _(env):
    g = env.guest("g", mem=MEM, vcpus=3, dirty_rate=1500, pattern="hotset", fill="text",
                  tracker="cooperative")
    i = g.info()
    want = {"mem": mem_bytes(MEM), "pages": PAGES, "vcpus": 3, "dirty-rate": 1500,
            "pattern": "hotset", "fill": "text", "dirty-tracker": "cooperative"}
    wrong = {k: (i.get(k), v) for k, v in want.items() if i.get(k) != v}
    check(not wrong, "x-guest-info (got, expected): %r", wrong)
    g.cmd("x-guest-set-dirty-rate", {"rate": -1})
    check(g.info().get("dirty-rate") == -1, "dirty-rate after x-guest-set-dirty-rate -1: %r",
          g.info().get("dirty-rate"))
    lmtest.check_verified(g, PAGES, cached=False)


def _load_qemu_qmp():
    path = os.environ.get("LMTEST_QEMU_QMP", "/work/shared/bench/qemu-baseline/qmp.py")
    if not os.path.exists(path):
        skip("QEMU baseline qmp.py not found at %s (set LMTEST_QEMU_QMP)" % path)
    spec = importlib.util.spec_from_file_location("qemu_baseline_qmp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@test("QEMU's baseline QMP client drives a migration")
def _(env):
    qmod = _load_qemu_qmp()
    dst = env.guest("dst", mem=MEM, incoming="defer", dirty_rate=1000, connect=False)
    src = env.guest("src", mem=MEM, dirty_rate=1000, connect=False)
    s = qmod.QMP(src.qmp_path)
    d = qmod.QMP(dst.qmp_path)
    try:
        for q in (s, d):
            q.cmd("migrate-set-capabilities",
                  {"capabilities": [{"capability": "events", "state": True}]})
        s.cmd("migrate-set-parameters", {"max-bandwidth": 100 << 30})
        port = free_tcp_port("127.0.0.1")
        uri = "tcp:127.0.0.1:%d" % port
        d.cmd("migrate-incoming", {"uri": uri})
        wait_listening(uri, dst)
        s.cmd("migrate", {"uri": uri})
        deadline = time.monotonic() + 120
        while True:
            info = s.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            check(time.monotonic() < deadline, "migration not done after 120 s: %r", info)
            s.poll_events(0.2)
        check(info["status"] == "completed", "status %r (%r)", info["status"],
              info.get("error-desc"))
        ev = d.wait_event("MIGRATION", lambda data: data.get("status") == "completed", timeout=30)
        check(ev is not None, "destination sent no MIGRATION completed event")
        stop = s.wait_event("STOP", timeout=10)
        resume = d.wait_event("RESUME", timeout=30)
        check(stop is not None and resume is not None, "STOP %r / RESUME %r events", stop, resume)
        obs = (qmod.QMP.ts(resume) - qmod.QMP.ts(stop)) * 1000
        note("total-time %s ms, downtime %s ms, observed STOP->RESUME %.0f ms, %d MiB"
             % (info.get("total-time"), info.get("downtime"), obs, ram(info, "transferred") >> 20))
        try:
            s.cmd("no-such-command")
            raise lmtest.TestFailure("unknown command did not raise QMPError")
        except qmod.QMPError:
            pass
    finally:
        s.close()
        d.close()
    check_source_done(src, info)
    check_destination(dst, PAGES, dirtying=True)


if __name__ == "__main__":
    lmtest.main()
