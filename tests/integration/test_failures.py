#!/usr/bin/env python3
"""Cancel and crashes in the middle of a migration.

The migration is slowed down with max-bandwidth so there is a wide window
in which it is certainly active (several MiB moved, most still to go) when
the case acts.  What must hold afterwards:
  cancel            source cancelled, running, writers progress, 0 bad pages;
                    destination exits non-zero with
                    "incoming migration failed: <reason>" on stderr.
  destination dies  source failed with an error-desc, keeps running, 0 bad;
                    and a new migration from it to a fresh destination works.
  source dies       destination exits non-zero with the same message and is
                    never seen running (no arrival check either).
"""

import re

import lmtest
from lmtest import (PAGE_SIZE, TestFailure, check, check_destination,
                    check_runstate, check_source_done, check_verified,
                    check_writes_advance, describe_exit, free_tcp_port,
                    mem_bytes, note, ram, test, wait_incoming_exit, wait_listening,
                    wait_migration, wait_until)

MEM = "128M"
PAGES = mem_bytes(MEM) // PAGE_SIZE
SLOW = 16 << 20             # bytes/s: 128 MiB take ~8 s
DIRTY_RATE = 2000
MIDWAY = 8 << 20            # act once this much has been sent


def slow_pair(env, uri):
    dst = env.guest("dst", mem=MEM, incoming=uri)
    src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE)
    wait_listening(uri, dst)
    wait_until(lambda: src.info()["writes"] > 0, 30, "the source's writers to start")
    src.set_params(max_bandwidth=SLOW)
    src.cmd("migrate", {"uri": uri})

    def midway():
        info = src.query_migrate()
        check(info.get("status") in ("setup", "active"),
              "migration ended %r before the case could act (error-desc %r)",
              info.get("status"), info.get("error-desc"))
        return info if ram(info, "transferred") >= MIDWAY else None
    info = wait_until(midway, 30, "%d MiB to be sent" % (MIDWAY >> 20))
    check(ram(info, "transferred") < mem_bytes(MEM) // 2,
          "max-bandwidth %d MiB/s not applied: %d MiB already sent",
          SLOW >> 20, ram(info, "transferred") >> 20)
    return src, dst


def check_dst_failed(dst, timeout=30):
    rc = wait_incoming_exit(dst, timeout)
    err = dst.stderr()
    check(rc is not None and rc > 0, "destination: %s, expected a non-zero exit status; "
          "stderr:\n%s", describe_exit(rc), dst.stderr_tail())
    m = re.search(r"incoming migration failed: *(\S.*)", err)
    check(m is not None, "destination stderr lacks 'incoming migration failed: <reason>':\n%s",
          dst.stderr_tail())
    check("arrival check" not in err, "a failed destination ran its arrival check:\n%s",
          dst.stderr_tail())
    note("destination: %s: %s" % (describe_exit(rc), m.group(0)))


def check_source_survived(src):
    check_runstate(src, "running")
    check_writes_advance(src)
    check_verified(src, PAGES, cached=False)


@test("migrate_cancel mid-migration")
def _(env):
    src, dst = slow_pair(env, "tcp:127.0.0.1:%d" % free_tcp_port("127.0.0.1"))
    src.cmd("migrate_cancel")
    info = wait_migration(src, until=("cancelled",), timeout=30)
    check_source_survived(src)
    check_dst_failed(dst)
    info = src.query_migrate()
    check(info.get("status") == "cancelled", "source status %r after cancel", info.get("status"))


@test("destination killed mid-migration: source fails, keeps running, migrates again")
def _(env):
    src, dst = slow_pair(env, "tcp:127.0.0.1:%d" % free_tcp_port("127.0.0.1"))
    dst.kill()
    info = wait_migration(src, until=("failed",), timeout=30)
    desc = info.get("error-desc")
    check(isinstance(desc, str) and desc.strip(), "failed migration has no error-desc: %r", info)
    note("source error-desc: %s" % desc)
    check_source_survived(src)
    # The failure must leave the source able to migrate again.
    uri = "unix:" + env.path("again.sock")
    dst2 = env.guest("dst2", mem=MEM, incoming=uri, dirty_rate=DIRTY_RATE)
    wait_listening(uri, dst2)
    src.set_params(max_bandwidth=100 << 30)     # 100 GiB/s: unlimited
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120)
    check_source_done(src, info)
    check_destination(dst2, PAGES, dirtying=True)


@test("source killed mid-migration: destination exits non-zero, never runs")
def _(env):
    src, dst = slow_pair(env, "unix:" + env.path("mig.sock"))
    wait_until(lambda: dst.query_migrate().get("status") == "active", 30,
               "the destination to be loading (status active)")
    check_runstate(dst, "inmigrate")
    src.kill()
    states = set()

    def gone():
        if not dst.alive():
            return True
        try:
            states.add(dst.runstate())
        except TestFailure:
            return not dst.alive()       # QMP went away as it exits
        check("running" not in states, "destination reached 'running' after its source died")
        return False
    wait_until(gone, 30, "the destination to give up")
    note("destination run states seen after the kill: %s" % sorted(states))
    check_dst_failed(dst, timeout=5)


if __name__ == "__main__":
    lmtest.main()
