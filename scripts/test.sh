#!/usr/bin/env bash
#
# test.sh -- build livemig with sanitizers and run every test.
#
#   ./scripts/test.sh            ASan+UBSan build in build-asan/, all suites
#   ./scripts/test.sh --tsan     TSan build (clang) in build-tsan/, unit suite
#   ./scripts/test.sh --release  plain release build in build/, all suites
#
# The last line printed is always the summary, `N passed, N failed` (plus
# `, N skipped` when something was skipped), and the exit status is non-zero
# when anything failed (a build failure counts as one failure).
#
# How the numbers are counted: meson writes one JSON record per test program
# to <builddir>/meson-logs/testlog.json.  Our test programs speak TAP (cmocka
# with CMOCKA_MESSAGE_OUTPUT=TAP, and the Python integration harness), so each
# record's stdout carries one `ok` / `not ok` line per case; we count those.
# A program that failed as a whole (crash, sanitizer abort, timeout, bad plan)
# without a failing case line adds one failure, so a sanitizer report can
# never hide behind cases that passed before it.  Records without TAP lines
# count as one test each.

set -euo pipefail

cd "$(dirname "$0")/.."

mode=asan
for arg in "$@"; do
    case "$arg" in
    --tsan) mode=tsan ;;
    --release) mode=release ;;
    -h|--help)
        sed -n '3,11p' "$0" | sed 's/^# \{0,1\}//'
        exit 0 ;;
    *)
        echo "test.sh: unknown option '$arg' (try --help)" >&2
        exit 2 ;;
    esac
done

PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] || PYTHON=python3

# Sanitizer reports are fatal: the process aborts at the first report, so
# the test that triggered it fails instead of printing a warning nobody reads.
export ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:detect_leaks=1:print_stacktrace=1
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1
export TSAN_OPTIONS=halt_on_error=1:abort_on_error=1:second_deadlock_stack=1

summary_fail() {
    echo "test.sh: $1" >&2
    echo "0 passed, 1 failed"
    exit 1
}

# setup_dir DIR [meson options...]: configure DIR, or reconfigure it with
# the same options when it exists (wiping it if meson cannot reuse it).
setup_dir() {
    local dir=$1
    shift
    if [[ -f $dir/meson-private/coredata.dat ]]; then
        meson setup --reconfigure "$dir" "$@" || meson setup --wipe "$dir" "$@"
    else
        meson setup "$dir" "$@"
    fi
}

./scripts/setup.sh --deps-only --test-deps || summary_fail "installing the build dependencies failed"

suite_args=()
case $mode in
asan)
    dir=build-asan
    setup_dir $dir -Db_sanitize=address,undefined -Db_lundef=false \
        || summary_fail "meson setup $dir failed"
    ;;
tsan)
    dir=build-tsan
    CC=clang setup_dir $dir -Db_sanitize=thread -Db_lundef=false \
        || summary_fail "meson setup $dir failed"
    suite_args=(--suite unit)
    # The one race livemig has on purpose -- migration threads reading guest
    # RAM while the guest's writers write it -- is suppressed in
    # tests/tsan.supp by the writer side only; any other race stays fatal.
    export TSAN_OPTIONS="$TSAN_OPTIONS:suppressions=$PWD/tests/tsan.supp"
    ;;
release)
    dir=build
    setup_dir $dir --buildtype=release || summary_fail "meson setup $dir failed"
    ;;
esac

ninja -C $dir || summary_fail "build in $dir failed"

log=$dir/meson-logs/testlog.json
rm -f "$log"
rc=0
meson test -C $dir --print-errorlogs "${suite_args[@]}" || rc=$?

[[ -f $log ]] || summary_fail "meson test wrote no $log (exit status $rc)"

# Count cases; the summary is the last line of output whatever happens.
"$PYTHON" - "$log" "$rc" <<'EOF'
import json
import re
import sys

log, meson_rc = sys.argv[1], int(sys.argv[2])
BAD = {"FAIL", "ERROR", "TIMEOUT", "INTERRUPT", "UNEXPECTEDPASS"}
case_re = re.compile(r"^(not ok|ok)\b[^#]*(?:#\s*(\w+))?", re.IGNORECASE)
passed = failed = skipped = 0
failed_names = []

with open(log, encoding="utf-8", errors="replace") as f:
    for line in f:
        line = line.strip()
        if not line:
            continue
        rec = json.loads(line)
        res = rec.get("result", "ERROR")
        p = fl = sk = 0
        cases = 0
        subtests = rec.get("subtests")   # newer meson may record them
        if isinstance(subtests, list) and subtests:
            for st in subtests:
                r = st.get("result", "ERROR") if isinstance(st, dict) else "ERROR"
                cases += 1
                if r == "SKIP":
                    sk += 1
                elif r in BAD:
                    fl += 1
                else:
                    p += 1
        else:
            for out in (rec.get("stdout") or "").splitlines():
                if out.startswith("Bail out!"):
                    fl += 1
                    continue
                m = case_re.match(out)
                if not m:
                    continue
                cases += 1
                ok = m.group(1).lower() == "ok"
                directive = (m.group(2) or "").upper()
                if directive.startswith("SKIP") and ok:
                    sk += 1
                elif directive == "TODO":
                    # not ok # TODO is an expected failure; ok # TODO is not.
                    if ok:
                        fl += 1
                    else:
                        p += 1
                elif ok:
                    p += 1
                else:
                    fl += 1
        if cases == 0:
            if res == "SKIP":
                sk += 1
            elif res in BAD:
                fl += 1
            else:
                p += 1
        elif res in BAD and fl == 0:
            fl += 1          # died after its cases passed (sanitizer, leak, bad plan)
        if res in BAD:
            failed_names.append("%s (%s)" % (rec.get("name", "?"), res))
        passed += p
        failed += fl
        skipped += sk

if meson_rc != 0 and failed == 0:
    failed += 1
    failed_names.append("meson test exited with status %d" % meson_rc)
if failed_names:
    print("failed: " + ", ".join(failed_names))
line = "%d passed, %d failed" % (passed, failed)
if skipped:
    line += ", %d skipped" % skipped
print(line)
sys.exit(1 if failed else 0)
EOF
