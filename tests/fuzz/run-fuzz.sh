#!/usr/bin/env bash
#
# run-fuzz.sh EXE CORPUS_DIR SECONDS [libFuzzer options...]
#
# One bounded libFuzzer run of EXE from the seed corpus CORPUS_DIR (read
# only: new inputs go to a temporary directory that is removed afterwards),
# the meson test suite `fuzz`'s command.  Exits non-zero on a crash, leak,
# timeout or sanitizer report; the reproducer is kept as
# $FUZZ_ARTIFACTS/<target>-crash-* (default: the current directory).
set -euo pipefail

exe=$1 corpus=$2 secs=$3
shift 3
name=$(basename "$exe")
work=$(mktemp -d "${TMPDIR:-/tmp}/lmfuzz-XXXXXX")
trap 'rm -rf "$work"' EXIT
artifacts=${FUZZ_ARTIFACTS:-$PWD}
mkdir -p "$artifacts"

# -timeout: one input running 10 s is a hang; -rss_limit_mb bounds memory.
# The corpus directory comes second, so libFuzzer only reads it.
exec "$exe" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=262144 \
    -print_final_stats=1 -artifact_prefix="$artifacts/$name-" "$@" "$work" "$corpus"
