#!/usr/bin/env python3
"""The `compress` capability between two real processes.

QEMU 7.2's compress-threads format: COMPRESS_PAGE records in the main stream,
compressed by the source's ring pool and decompressed by the destination's.
A dirtying guest with compressible (text) content must arrive verified with
1 and 2 compression threads, with query-migrate's compression object showing
real compression; mismatched capabilities are refused.
"""

import lmtest
from lmtest import (PAGE_SIZE, check, check_destination, check_source_done, mem_bytes,
                    note, test, wait_listening, wait_migration, wait_until)

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE


def compress_pair(env, threads, dthreads):
    uri = "unix:" + env.path("mig.sock")
    dst = env.guest("dst", mem=MEM, incoming="defer", fill="text", dirty_rate=500)
    src = env.guest("src", mem=MEM, dirty_rate=500, fill="text")
    dst.set_caps(compress=True)
    dst.set_params(decompress_threads=dthreads)
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    src.set_caps(compress=True)
    src.set_params(compress_threads=threads, compress_level=1)
    wait_until(lambda: src.info()["writes"] > 0, 30, "the source's writers to start")
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120)
    check_source_done(src, info)
    check_destination(dst, PAGES, dirtying=True)
    comp = info.get("compression")
    check(comp is not None, "query-migrate has no compression object: %r", info)
    check(comp["pages"] > PAGES // 2, "only %d pages went compressed", comp["pages"])
    check(comp["compression-rate"] > 2.0, "compression rate %.2f on text pages",
          comp["compression-rate"])
    note("%d threads: %d pages compressed, rate %.2f, busy %d, %d ms total"
         % (threads, comp["pages"], comp["compression-rate"], comp["busy"],
            info.get("total-time", 0)))


@test("compress with 1 thread: dirtying text guest arrives verified")
def _(env):
    compress_pair(env, 1, 1)


@test("compress with 2 threads: dirtying text guest arrives verified")
def _(env):
    compress_pair(env, 2, 2)


@test("compress on the source only: the destination refuses the first compressed page")
def _(env):
    uri = "unix:" + env.path("mig.sock")
    dst = env.guest("dst", mem=MEM, incoming=uri)
    src = env.guest("src", mem=MEM, fill="text")
    wait_listening(uri, dst)
    src.set_caps(compress=True)
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, until=("failed",), timeout=60)
    check(info.get("status") == "failed", "source status %r", info.get("status"))
    rc = dst.wait_exit(30)
    dst.expect_exit = True
    check(rc == 1, "destination exit status %r", rc)
    check("compress capability is off" in dst.stderr(),
          "destination stderr does not say why:\n%s", dst.stderr_tail())
    check(src.runstate() == "running", "source run state %r", src.runstate())


if __name__ == "__main__":
    lmtest.main()
