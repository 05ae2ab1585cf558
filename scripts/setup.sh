#!/usr/bin/env bash
#
# setup.sh -- install what livemig needs on Debian 12 and build it.
#
#   ./scripts/setup.sh              install packages (if missing), then a release
#                                   build in build/ (./build/livemig)
#   ./scripts/setup.sh --deps-only  only the install step (scripts/test.sh uses it)
#
# The package list is the single source of truth for the build and test
# dependencies.  The apt step is skipped when dpkg-query says every package is
# already installed, so a rerun costs only the incremental ninja build.  It
# must run unattended (CI has no stdin): apt-get is non-interactive and never
# prompts.  Runs as root; as another user it uses `sudo -n` when available.

set -euo pipefail

cd "$(dirname "$0")/.."

# gcc and the sanitizer runtimes (libasan8, libubsan1) come with
# build-essential; libclang-rt-14-dev holds clang's TSan/ASan runtimes
# (scripts/test.sh --tsan and the clang compile check in .ci/run) and
# libFuzzer's (libclang_rt.fuzzer*.a: the -Dfuzz=true targets,
# scripts/fuzz.sh and .ci/run's fuzz step; docs/fuzzing.md).
PACKAGES=(
    build-essential
    clang
    libclang-rt-14-dev
    meson
    ninja-build
    pkg-config
    libjansson-dev
    libcmocka-dev
    libzstd-dev
    libxxhash-dev
    zlib1g-dev
    libgnutls28-dev
    libunistring-dev
    python3
)

# Only the test suite needs these (scripts/test.sh asks for them with
# --test-deps): the analyzer's tests run a real QEMU 7.2 and compare its
# stream with its own memory dump; the silent-link test drops a connection's
# packets with nftables; the TLS test makes its CAs and certificates with
# gnutls-bin's certtool at test time.
TEST_PACKAGES=(
    qemu-system-x86
    nftables
    gnutls-bin
)

deps_only=0
for arg in "$@"; do
    case "$arg" in
    --deps-only) deps_only=1 ;;
    --test-deps) PACKAGES+=("${TEST_PACKAGES[@]}") ;;
    -h|--help)
        sed -n '3,7p' "$0" | sed 's/^# \{0,1\}//'
        exit 0 ;;
    *)
        echo "setup.sh: unknown option '$arg' (try --help)" >&2
        exit 2 ;;
    esac
done

missing_packages() {
    local p status
    for p in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        # "ii " = wanted install, installed, no error flag.
        if [[ "$status" != ii* ]]; then
            echo "$p"
        fi
    done
}

install_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        echo "setup.sh: dpkg-query not found: this script supports Debian 12 only" >&2
        exit 1
    fi
    local missing
    missing=$(missing_packages)
    if [[ -z "$missing" ]]; then
        echo "setup.sh: all packages already installed"
        return 0
    fi
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo -n)
        else
            echo "setup.sh: need root to install:" $missing >&2
            exit 1
        fi
    fi
    echo "setup.sh: installing:" $missing
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update </dev/null
    # shellcheck disable=SC2086 # one word per package
    "${sudo[@]}" apt-get install -y --no-install-recommends $missing </dev/null
}

build_release() {
    # A build dir made by another meson version cannot be reconfigured;
    # --wipe recreates it with the same options.
    if [[ -f build/meson-private/coredata.dat ]]; then
        meson setup --reconfigure build --buildtype=release \
            || meson setup --wipe build --buildtype=release
    else
        meson setup build --buildtype=release
    fi
    ninja -C build
    # The documented entry point is ./build/livemig; meson puts the tool
    # where its meson.build lives, so link it if it is not already there.
    if [[ ! -e build/livemig && -x build/tools/livemig ]]; then
        ln -s tools/livemig build/livemig
    fi
}

install_packages
if [[ $deps_only -eq 0 ]]; then
    build_release
fi
