#!/usr/bin/env python3
"""Convergence, auto-converge and max-bandwidth.

The guest dirties about 3x faster than max-bandwidth lets the source send,
with a tight downtime-limit, so the dirty set can never get under the
switch-over threshold on its own:
  * without auto-converge the migration must still be active after several
    dirty-sync rounds, never throttle the guest, and cancel cleanly;
  * with auto-converge the source must throttle the guest
    (cpu-throttle-percentage > 0 seen in query-migrate) until it converges,
    and the destination must verify.
The guest's real dirty rate is measured first: if it cannot dirty well above
the bandwidth the premise is false and the case fails saying so.

max-bandwidth: the rate measured in the bulk phase (the span of samples
between 10% and 90% of RAM sent, transferred over total-time from the
source's own query-migrate) must be within 10% of the limit.
"""

import time

import lmtest
from lmtest import (PAGE_SIZE, check, check_destination, check_runstate,
                    check_source_done, check_verified, check_writes_advance,
                    mem_bytes, note, ram, test, wait_listening, wait_migration,
                    wait_until)

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE
BANDWIDTH = 32 << 20        # bytes/s
DIRTY_RATE = 25000          # pages/s = ~98 MiB/s, ~3x the bandwidth
DOWNTIME_MS = 30
SYNC_ROUNDS = 5             # dirty syncs that must pass without convergence


def measure_dirty_rate(src, window=1.0):
    w0, t0 = src.info()["writes"], time.monotonic()
    wait_until(lambda: time.monotonic() - t0 >= window, window + 5, "the measuring window")
    w1, t1 = src.info()["writes"], time.monotonic()
    return (w1 - w0) / (t1 - t0)


def hot_pair(env):
    uri = "unix:" + env.path("mig.sock")
    dst = env.guest("dst", mem=MEM, incoming=uri, dirty_rate=1000)
    src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE)
    wait_listening(uri, dst)
    wait_until(lambda: src.info()["writes"] > 0, 30, "the source's writers to start")
    rate = measure_dirty_rate(src)
    note("guest dirties %.0f pages/s (%.0f MiB/s); max-bandwidth %d MiB/s"
         % (rate, rate * PAGE_SIZE / 2**20, BANDWIDTH >> 20))
    check(rate * PAGE_SIZE >= 2 * BANDWIDTH,
          "the guest dirties only %.0f pages/s (%.1f MiB/s, asked for %d pages/s): not well above "
          "max-bandwidth %d MiB/s, so convergence cannot be tested",
          rate, rate * PAGE_SIZE / 2**20, DIRTY_RATE, BANDWIDTH >> 20)
    return uri, src, dst


@test("dirty rate above bandwidth: no convergence without auto-converge, then cancel", timeout=300)
def _(env):
    uri, src, dst = hot_pair(env)
    src.set_params(max_bandwidth=BANDWIDTH, downtime_limit=DOWNTIME_MS)
    src.cmd("migrate", {"uri": uri})
    last = {}

    def rounds_pass():
        info = src.query_migrate()
        last.update(info)
        st = info.get("status")
        check(st in ("setup", "active"),
              "without auto-converge the migration should not converge, but it is %r after "
              "%d dirty syncs (error-desc %r)", st, ram(info, "dirty-sync-count"),
              info.get("error-desc"))
        check((info.get("cpu-throttle-percentage") or 0) == 0,
              "guest throttled to %s%% with auto-converge off", info.get("cpu-throttle-percentage"))
        return ram(info, "dirty-sync-count") >= SYNC_ROUNDS
    wait_until(rounds_pass, 150, "%d dirty-sync rounds" % SYNC_ROUNDS)
    note("after %d syncs: transferred %d MiB, remaining %d MiB, dirty-pages-rate %d"
         % (ram(last, "dirty-sync-count"), ram(last, "transferred") >> 20,
            ram(last, "remaining") >> 20, ram(last, "dirty-pages-rate")))
    src.cmd("migrate_cancel")
    info = wait_migration(src, until=("cancelled",), timeout=30)
    check_runstate(src, "running")
    check_writes_advance(src)
    check_verified(src, PAGES, cached=False, what=" after cancel")
    rc = lmtest.wait_incoming_exit(dst, 30)
    check(rc is not None and rc > 0, "destination after cancel: %s, expected a non-zero exit; "
          "stderr:\n%s", lmtest.describe_exit(rc), dst.stderr_tail())


@test("auto-converge throttles the guest until the migration converges", timeout=300)
def _(env):
    uri, src, dst = hot_pair(env)
    src.set_caps(auto_converge=True)
    # Bigger throttle steps than QEMU's 20/10 defaults keep the case short;
    # the guest needs ~70% throttle before the dirty rate drops below the
    # bandwidth.
    src.set_params(max_bandwidth=BANDWIDTH, downtime_limit=DOWNTIME_MS,
                   cpu_throttle_initial=40, cpu_throttle_increment=20)
    seen = {"throttle": 0, "syncs": 0}

    def sample(info):
        seen["throttle"] = max(seen["throttle"], info.get("cpu-throttle-percentage", 0) or 0)
        seen["syncs"] = max(seen["syncs"], ram(info, "dirty-sync-count"))
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=240, on_sample=sample)
    note("converged after %s ms, %d dirty syncs, max throttle %d%%, downtime %s ms, %d MiB sent"
         % (info.get("total-time"), seen["syncs"], seen["throttle"], info.get("downtime"),
            ram(info, "transferred") >> 20))
    check(seen["throttle"] > 0, "migration converged but cpu-throttle-percentage was never > 0 "
          "(auto-converge did not throttle the guest)")
    check_source_done(src, info)
    check_destination(dst, PAGES, dirtying=True)


@test("max-bandwidth is honoured within 10% in the bulk phase", timeout=180)
def _(env):
    mem = "256M"
    limit = 50 << 20
    uri = "unix:" + env.path("mig.sock")
    dst = env.guest("dst", mem=mem, incoming=uri)
    src = env.guest("src", mem=mem, fill="random")
    wait_listening(uri, dst)
    src.set_params(max_bandwidth=limit)
    got = src.cmd("query-migrate-parameters").get("max-bandwidth")
    check(got == limit, "query-migrate-parameters max-bandwidth %r after setting %d", got, limit)
    samples = []

    def sample(info):
        if info.get("status") == "active":
            samples.append((time.monotonic(), info.get("total-time"), ram(info, "transferred")))
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120, on_sample=sample)
    total = mem_bytes(mem)
    bulk = [s for s in samples if 0.1 * total <= s[2] <= 0.9 * total]
    check(len(bulk) >= 2, "only %d active samples in the bulk phase (of %d samples); "
          "total-time %s ms", len(bulk), len(samples), info.get("total-time"))
    (l0, t0, b0), (l1, t1, b1) = bulk[0], bulk[-1]
    if isinstance(t0, int) and isinstance(t1, int) and t1 > t0:
        span = (t1 - t0) / 1000.0
        clock = "source total-time"
    else:
        span = l1 - l0
        clock = "local clock (query-migrate has no total-time while active)"
    check(span >= 1.0, "bulk phase spans only %.2f s (%s)", span, clock)
    rate = (b1 - b0) / span
    overall = ram(info, "transferred") / (info["total-time"] / 1000.0)
    note("bulk %.1f MiB/s over %.1f s (%s); overall %.1f MiB/s; limit %d MiB/s"
         % (rate / 2**20, span, clock, overall / 2**20, limit >> 20))
    check(abs(rate / limit - 1) <= 0.10, "bulk-phase rate %.1f MiB/s is not within 10%% of "
          "max-bandwidth %d MiB/s", rate / 2**20, limit >> 20)
    check(overall <= 1.10 * limit, "overall rate %.1f MiB/s exceeds max-bandwidth %d MiB/s by "
          "more than 10%%", overall / 2**20, limit >> 20)
    check_source_done(src, info)
    check_destination(dst, total // PAGE_SIZE)


if __name__ == "__main__":
    lmtest.main()
