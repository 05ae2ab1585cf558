#!/usr/bin/env bash
#
# fuzz.sh -- a fuzzing campaign with the libFuzzer targets (docs/fuzzing.md).
#
#   ./scripts/fuzz.sh [SECONDS] [TARGET...]   each TARGET (default: all) for
#                                             SECONDS (default 600), one
#                                             after the other
#   ./scripts/fuzz.sh --list                  the targets
#
# Builds build-fuzz/ (clang, -Dfuzz=true: libFuzzer + ASan + UBSan), runs
# every target from its seed corpus tests/fuzz/corpus/<target>/ with the new
# inputs it finds kept in build-fuzz/fuzz-corpus/<target>/ (so a campaign
# goes on where the last one stopped; the committed seeds are only read).
# A crash, leak, timeout or sanitizer report leaves its reproducer in
# build-fuzz/fuzz-artifacts/ (replay: build-fuzz/tests/fuzz/fuzz_<target>
# FILE).  Extra libFuzzer options can be given in FUZZ_FLAGS, e.g.
# FUZZ_FLAGS=-jobs=2.  Exits non-zero when any target found something.

set -euo pipefail

cd "$(dirname "$0")/.."

TARGETS=(loadvm analyze multifd_packet multifd_codec mappedram returnpath qmp)

secs=600
sel=()
for arg in "$@"; do
    case "$arg" in
    --list) printf '%s\n' "${TARGETS[@]}"; exit 0 ;;
    -h|--help) sed -n '3,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *[!0-9]*) sel+=("$arg") ;;
    *) secs=$arg ;;
    esac
done
[[ ${#sel[@]} -gt 0 ]] || sel=("${TARGETS[@]}")
for t in "${sel[@]}"; do
    [[ " ${TARGETS[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target '$t' (--list)" >&2; exit 2; }
done

if [[ ! -f build-fuzz/build.ninja ]]; then
    CC=clang meson setup build-fuzz -Dfuzz=true -Dtests=false -Db_lundef=false --buildtype=debugoptimized
fi
ninja -C build-fuzz

art=$PWD/build-fuzz/fuzz-artifacts
mkdir -p "$art"
found=()
for t in "${sel[@]}"; do
    keep=build-fuzz/fuzz-corpus/$t
    mkdir -p "$keep"
    log=build-fuzz/fuzz-$t.log
    echo "== $t: $secs s (log $log)"
    rc=0
    # shellcheck disable=SC2086 # FUZZ_FLAGS is a list of options
    build-fuzz/tests/fuzz/fuzz_$t -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -max_len=262144 -print_final_stats=1 -artifact_prefix="$art/$t-" ${FUZZ_FLAGS:-} \
        "$keep" "tests/fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec)' "$log" | sed 's/^/   /' || true
    echo "   corpus: $(find "$keep" -type f | wc -l) new inputs kept in $keep"
    if [[ $rc -ne 0 ]]; then
        found+=("$t")
        echo "   FOUND (exit $rc):"
        grep -E 'ERROR: |SUMMARY: |runtime error|Test unit written' "$log" | head -5 | sed 's/^/     /'
    fi
done
if [[ ${#found[@]} -gt 0 ]]; then
    echo "fuzz.sh: found something in: ${found[*]} (reproducers in $art)"
    exit 1
fi
echo "fuzz.sh: nothing found in ${#sel[@]} target(s), $secs s each"
