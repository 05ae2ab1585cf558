#!/usr/bin/env python3
"""The module include graph of src/ has no cycle (design note 9).

A module is a folder of src/.  Module A depends on module B when a file of A
includes "B/...".  A cycle (ram includes multifd, multifd includes ram) means
the two are one concept split in two, or that a low layer knows a high one:
the page path's seams exist to prevent exactly that.  Prints TAP: one case
for the graph being acyclic, naming every cycle it finds, and one listing the
layers (a topological order), for the record.
"""

import os
import re
import sys

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^/"]+)/[^"]+"', re.M)


def graph(src):
    deps = {}
    for mod in sorted(os.listdir(src)):
        path = os.path.join(src, mod)
        if not os.path.isdir(path):
            continue
        edges = deps.setdefault(mod, set())
        for name in sorted(os.listdir(path)):
            if not name.endswith((".c", ".h")):
                continue
            with open(os.path.join(path, name), encoding="utf-8") as f:
                for target in INCLUDE.findall(f.read()):
                    if target != mod and os.path.isdir(os.path.join(src, target)):
                        edges.add(target)
    return deps


def cycles(deps):
    """Every elementary cycle found by a depth-first search (each once)."""
    found, seen = [], set()

    def walk(node, stack):
        for nxt in sorted(deps.get(node, ())):
            if nxt in stack:
                cyc = stack[stack.index(nxt):] + [nxt]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    found.append(cyc)
            elif len(stack) < len(deps):
                walk(nxt, stack + [nxt])
    for start in sorted(deps):
        walk(start, [start])
    return found


def layers(deps):
    order, done = [], set()
    while len(done) < len(deps):
        ready = sorted(m for m in deps if m not in done and deps[m] <= done)
        if not ready:
            return None
        order.append(ready)
        done.update(ready)
    return order


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
    deps = graph(src)
    print("1..2")
    cyc = cycles(deps)
    if cyc:
        print("not ok 1 - the module include graph of src/ has no cycle")
        for c in cyc:
            print("# cycle: " + " -> ".join(c))
    else:
        print("ok 1 - the module include graph of src/ has no cycle (%d modules)" % len(deps))
    order = layers(deps)
    if order is None:
        print("not ok 2 - src/ modules form layers")
    else:
        print("ok 2 - src/ modules form layers")
        for i, layer in enumerate(order):
            print("# layer %d: %s" % (i, " ".join(layer)))
    return 1 if cyc or order is None else 0


if __name__ == "__main__":
    sys.exit(main())
