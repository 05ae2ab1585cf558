#!/usr/bin/env python3
"""Live migration over every transport, idle and dirtying guests.

Each case starts a destination (`livemig guest --incoming URI`) and a source,
migrates, and then demands the full end state:
  source    query-migrate completed, run state postmigrate;
  dest      query-migrate completed, the cached arrival check and a fresh
            x-guest-verify both report 0 bad pages out of all pages, the
            stderr verdict line says so, run state running, and (dirtying
            guests) its writers make progress.
A dirtying source must also have kept writing during the migration and the
migration must have re-sent pages (normal + duplicate > pages), which is what
exercises the dirty tracker: a missed write shows up as a stale page.
"""

import os
import socket

import lmtest
from lmtest import (PAGE_SIZE, check, check_destination, check_source_done,
                    free_tcp_port, have_ipv6_loopback, mem_bytes, note, ram,
                    skip, test, wait_listening, wait_migration, wait_until)

MEM = "128M"
PAGES = mem_bytes(MEM) // PAGE_SIZE
DIRTY_RATE = 5000          # pages/s: far below any sane bandwidth, so it converges


def summary(info):
    note("total-time %s ms, downtime %s ms, transferred %d MiB, normal %d, duplicate %d, "
         "dirty-sync-count %d" % (info.get("total-time"), info.get("downtime"),
                                  ram(info, "transferred") >> 20, ram(info, "normal"),
                                  ram(info, "duplicate"), ram(info, "dirty-sync-count")))


def wait_dirtying(src, n=1000):
    wait_until(lambda: src.info()["writes"] >= n, 30,
               "the source's writers to start dirtying")


def check_source_after(src, info, w0, dirtying):
    check_source_done(src, info)
    check(ram(info, "total") == mem_bytes(MEM), "source ram.total %d, expected %d",
          ram(info, "total"), mem_bytes(MEM))
    sent = ram(info, "normal") + ram(info, "duplicate")
    check(sent >= PAGES, "source sent %d pages (normal+duplicate), guest has %d", sent, PAGES)
    if dirtying:
        w1 = src.info()["writes"]
        check(w1 > w0, "source guest did not write during the migration (writes %d -> %d)", w0, w1)
        check(sent > PAGES, "dirtying guest: no page was re-sent (normal+duplicate %d, pages %d): "
              "dirty tracking did not report the %d writes made during the migration",
              sent, PAGES, w1 - w0)


def live(env, uri, dirty_rate=0, tracker=None, pattern=None):
    # The destination gets the same workload: its writers start once it
    # runs, which is how the case sees that it does.
    dst = env.guest("dst", mem=MEM, incoming=uri, dirty_rate=dirty_rate, tracker=tracker,
                    pattern=pattern)
    src = env.guest("src", mem=MEM, dirty_rate=dirty_rate, tracker=tracker, pattern=pattern)
    wait_listening(uri, dst)
    if dirty_rate:
        wait_dirtying(src)
    w0 = src.info()["writes"]
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=150)
    summary(info)
    check_source_after(src, info, w0, dirty_rate > 0)
    check_destination(dst, PAGES, dirtying=dirty_rate > 0)
    return src, dst


def unix_uri(env):
    return "unix:" + env.path("mig.sock")


def tcp4_uri():
    return "tcp:127.0.0.1:%d" % free_tcp_port("127.0.0.1")


def tcp6_uri():
    if not have_ipv6_loopback():
        skip("no IPv6 loopback (::1) on this machine")
    return "tcp:[::1]:%d" % free_tcp_port("::1")


@test("idle guest over unix:")
def _(env):
    live(env, unix_uri(env))


@test("dirtying guest over unix:")
def _(env):
    live(env, unix_uri(env), dirty_rate=DIRTY_RATE)


@test("idle guest over tcp:127.0.0.1")
def _(env):
    live(env, tcp4_uri())


@test("dirtying guest over tcp:127.0.0.1 (hotset pattern)")
def _(env):
    live(env, tcp4_uri(), dirty_rate=DIRTY_RATE, pattern="hotset")


@test("idle guest over tcp:[::1]")
def _(env):
    live(env, tcp6_uri())


@test("dirtying guest over tcp:[::1]")
def _(env):
    live(env, tcp6_uri(), dirty_rate=DIRTY_RATE)


def tracker_case(env, tracker):
    src, _ = live(env, unix_uri(env), dirty_rate=DIRTY_RATE, tracker=tracker)
    used = src.info().get("dirty-tracker")
    check(used == tracker, "source x-guest-info dirty-tracker %r, asked for %r", used, tracker)


@test("dirty tracker uffd-wp (dirtying guest)")
def _(env):
    tracker_case(env, "uffd-wp")


@test("dirty tracker cooperative (dirtying guest)")
def _(env):
    tracker_case(env, "cooperative")


def migrate_dirtying(src, uri):
    """Migrate a dirtying source guest to `uri` and wait (bounded) for the
    end; the source must have completed and stopped writing."""
    wait_dirtying(src)
    w0 = src.info()["writes"]
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=150)
    summary(info)
    check_source_after(src, info, w0, True)
    return info


# -- to a file and back: exec:, file:, fd:

def save_live(env, uri, state):
    src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE)
    info = migrate_dirtying(src, uri)
    size = os.path.getsize(state)
    check(size >= mem_bytes(MEM), "saved stream is %d bytes, less than the %d bytes of RAM",
          size, mem_bytes(MEM))
    note("saved %d bytes" % size)


def restore(env, name, incoming, pass_fds=()):
    dst = env.guest(name, mem=MEM, incoming=incoming, pass_fds=pass_fds, dirty_rate=DIRTY_RATE)
    check_destination(dst, PAGES, dirtying=True)
    return dst


@test("exec: save (cat > FILE), restore with exec:cat FILE and with file:FILE")
def _(env):
    state = env.path("state.mig")
    save_live(env, "exec:cat > %s" % state, state)
    restore(env, "dst-exec", "exec:cat %s" % state)
    restore(env, "dst-file", "file:" + state)


@test("file: live save and restore")
def _(env):
    state = env.path("state.mig")
    save_live(env, "file:" + state, state)
    restore(env, "dst", "file:" + state)


@test("fd: live migration over a socketpair")
def _(env):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        dst = env.guest("dst", mem=MEM, incoming="fd:%d" % b.fileno(), pass_fds=[b.fileno()],
                        dirty_rate=DIRTY_RATE)
        src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE, pass_fds=[a.fileno()])
        uri = "fd:%d" % a.fileno()
    finally:
        # Only the guests hold the ends now, so either side sees EOF if the
        # other dies.
        a.close()
        b.close()
    info = migrate_dirtying(src, uri)
    check_destination(dst, PAGES, dirtying=True)


@test("fd: save to an open file, restore from an open file")
def _(env):
    state = env.path("state.mig")
    with open(state, "wb") as f:
        src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE, pass_fds=[f.fileno()])
        uri = "fd:%d" % f.fileno()
    info = migrate_dirtying(src, uri)
    with open(state, "rb") as f:
        restore(env, "dst", "fd:%d" % f.fileno(), pass_fds=[f.fileno()])


if __name__ == "__main__":
    lmtest.main()
