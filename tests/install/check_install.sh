#!/usr/bin/env bash
#
# check_install.sh -- `meson install` into a temporary DESTDIR and check
# the installed package as a user of it would see it.  Speaks TAP.
#
#   check_install.sh MESON BUILD_DIR SOURCE_DIR
#
# The rest comes from the environment (tests/install/meson.build sets it):
#   LM_PREFIX LM_LIBDIR LM_INCLUDEDIR LM_BINDIR LM_MANDIR   install dirs
#   LM_VERSION      the project version; LM_SOVERSION its major number
#   LM_CC           the build's C compiler (the test programs must link
#                   with the same sanitizer runtime as the library)
#   LM_SANITIZE     the build's b_sanitize ("none", "address,undefined", ...)
#
# Skips (exit 77, TAP "1..0 # SKIP") only when a tool it needs is missing:
# pkg-config, nm, readelf -- all from scripts/setup.sh's package list.

set -uo pipefail

# meson test points LD_LIBRARY_PATH at the build tree; nothing here may
# find the library there instead of in the installed tree.
unset LD_LIBRARY_PATH

meson=$1
build=$2
src=$3

for tool in pkg-config nm readelf; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "1..0 # SKIP $tool not found (scripts/setup.sh installs it)"
        exit 77
    fi
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/livemig-install.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
dest=$tmp/root

# Absolute install paths inside the DESTDIR (libdir etc. may be relative).
abs() { case $1 in /*) echo "$dest$1" ;; *) echo "$dest$LM_PREFIX/$1" ;; esac; }
libdir=$(abs "$LM_LIBDIR")
incdir=$(abs "$LM_INCLUDEDIR")
bindir=$(abs "$LM_BINDIR")
mandir=$(abs "$LM_MANDIR")
so=liblivemig.so.$LM_SOVERSION

read -r -a cc <<<"$LM_CC"
san=()
[[ $LM_SANITIZE != none && -n $LM_SANITIZE ]] && san=("-fsanitize=$LM_SANITIZE")

n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() {
    n=$((n + 1)); failed=$((failed + 1))
    echo "not ok $n - $1"
    shift
    for line in "$@"; do echo "# $line"; done
}
# diag FILE: a file's content as TAP comments
diag() { sed 's/^/# /' "$1"; }

echo "1..10"

# 1. meson install --destdir
if "$meson" install -C "$build" --no-rebuild --destdir "$dest" >"$tmp/install.log" 2>&1; then
    ok "meson install --destdir"
else
    not_ok "meson install --destdir failed"
    diag "$tmp/install.log"
    echo "Bail out! nothing was installed"
    exit 1
fi

# 2. every file of the package is where it belongs
missing=()
for f in "$libdir/liblivemig.so.$LM_VERSION" "$libdir/$so" "$libdir/liblivemig.so" \
         "$libdir/liblivemig.a" "$libdir/pkgconfig/livemig.pc" \
         "$incdir/livemig/livemig.h" "$incdir/livemig/qmp.h" "$incdir/livemig/analyze.h" \
         "$bindir/livemig" "$mandir/man1/livemig.1"; do
    [[ -e $f ]] || missing+=("missing: ${f#"$dest"}")
done
[[ -L $libdir/$so && $(readlink "$libdir/$so") == liblivemig.so.$LM_VERSION ]] ||
    missing+=("$so is not a link to liblivemig.so.$LM_VERSION")
if [[ ${#missing[@]} -eq 0 ]]; then
    ok "installed: library (shared, static), headers, livemig.pc, livemig, livemig.1"
else
    not_ok "installed files" "${missing[@]}"
fi

# 3. the soname
soname=$(readelf -d "$libdir/liblivemig.so.$LM_VERSION" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
if [[ $soname == "$so" ]]; then
    ok "soname is $so"
else
    not_ok "soname is '$soname', expected $so"
fi

# 4. the exported symbols are exactly the lm_* functions the installed
# headers declare: none missing, no internal one leaking.  The headers are
# preprocessed first so that names in comments do not count.
printf '#include <livemig/livemig.h>\n#include <livemig/qmp.h>\n#include <livemig/analyze.h>\n#include <livemig/tls.h>\n' |
    "${cc[@]}" -E -P -I"$incdir" -x c - 2>"$tmp/cpp.err" |
    grep -oE '\blm_[a-z0-9_]+[[:space:]]*\(' | sed 's/[[:space:]]*($//' | sort -u >"$tmp/declared"
nm -D --defined-only "$libdir/liblivemig.so.$LM_VERSION" | awk '{print $NF}' |
    grep -vxE '_init|_fini|_edata|_end|__bss_start' | sort -u >"$tmp/exported"
extra=$(comm -13 "$tmp/declared" "$tmp/exported" | tr '\n' ' ')
absent=$(comm -23 "$tmp/declared" "$tmp/exported" | tr '\n' ' ')
ndecl=$(wc -l <"$tmp/declared")
if [[ $ndecl -gt 0 && -z $extra && -z $absent ]]; then
    ok "liblivemig.so exports exactly the $ndecl lm_* functions of include/livemig/"
else
    not_ok "exported symbols differ from the public API ($ndecl declared)" \
        "exported but not public: ${extra:-none}" "public but not exported: ${absent:-none}"
    [[ $ndecl -gt 0 ]] || diag "$tmp/cpp.err"
fi

# 5. the installed livemig links the shared library and runs from the tree
needed=$(readelf -d "$bindir/livemig" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
if [[ " $needed " != *" $so "* ]]; then
    not_ok "livemig does not link $so" "NEEDED: $needed"
elif LD_LIBRARY_PATH=$libdir "$bindir/livemig" --help >"$tmp/help.out" 2>&1 &&
     grep -q analyze "$tmp/help.out"; then
    ok "installed livemig links $so and runs"
else
    not_ok "installed livemig --help failed"
    diag "$tmp/help.out"
fi

# pkg-config against the installed tree: its .pc first, and the sysroot
# prefixes the -I / -L paths it prints with the DESTDIR.
export PKG_CONFIG_PATH=$libdir/pkgconfig
export PKG_CONFIG_SYSROOT_DIR=$dest

# 6. livemig.pc: version, private requirements for a static link
ver=$(pkg-config --modversion livemig 2>&1)
reqs=$(pkg-config --print-requires-private livemig 2>&1 | awk '{print $1}' | sort | tr '\n' ' ')
slibs=$(pkg-config --static --libs livemig 2>&1)
if [[ $ver == "$LM_VERSION" && $reqs == "gnutls jansson libxxhash libzstd zlib " && $slibs == *pthread* ]]; then
    ok "livemig.pc: version $ver, Requires.private $reqs, threads in Libs.private"
else
    not_ok "livemig.pc" "version: $ver" "Requires.private: $reqs" "static libs: $slibs"
fi

# 7. a program built with only `cc $(pkg-config --cflags --libs livemig)`
read -r -a pc_cflags <<<"$(pkg-config --cflags livemig)"
read -r -a pc_libs <<<"$(pkg-config --libs livemig)"
if "${cc[@]}" "${san[@]}" -std=c11 -Wall -Wextra -Werror -o "$tmp/embed" \
        "$src/tests/install/embed.c" "${pc_cflags[@]}" "${pc_libs[@]}" >"$tmp/cc.log" 2>&1; then
    ok "embed.c compiles and links with pkg-config --cflags --libs livemig"
else
    not_ok "embed.c does not build against the installed tree"
    diag "$tmp/cc.log"
fi

# 8. ... and runs against the installed shared library
needed=$(readelf -d "$tmp/embed" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
if [[ ! -x $tmp/embed ]]; then
    not_ok "embed (shared) not run: it did not build"
elif [[ " $needed " != *" $so "* ]]; then
    not_ok "embed does not link $so" "NEEDED: $needed"
elif LD_LIBRARY_PATH=$libdir "$tmp/embed" >"$tmp/embed.out" 2>&1; then
    ok "embed (shared): a migration between two contexts through the installed library"
    diag "$tmp/embed.out"
else
    not_ok "embed (shared) failed"
    diag "$tmp/embed.out"
fi

# 9. the same program linked statically with pkg-config --static: proves
# Requires.private / Libs.private are complete.
static_libs=()
for w in $(pkg-config --static --libs livemig); do
    if [[ $w == -llivemig ]]; then
        static_libs+=(-Wl,-Bstatic -llivemig -Wl,-Bdynamic)
    else
        static_libs+=("$w")
    fi
done
if ! "${cc[@]}" "${san[@]}" -std=c11 -o "$tmp/embed-static" "$src/tests/install/embed.c" \
        "${pc_cflags[@]}" "${static_libs[@]}" >"$tmp/cc-static.log" 2>&1; then
    not_ok "embed.c does not link with liblivemig.a and pkg-config --static --libs"
    diag "$tmp/cc-static.log"
elif readelf -d "$tmp/embed-static" | grep -q 'NEEDED.*liblivemig'; then
    not_ok "embed-static still needs liblivemig.so"
elif "$tmp/embed-static" >"$tmp/embed-static.out" 2>&1; then
    ok "embed (static): links with pkg-config --static --libs livemig and runs"
else
    not_ok "embed (static) failed"
    diag "$tmp/embed-static.out"
fi

# 10. the man page names every option docs/cli.md documents
# (the option tables' rows and the lines that show a livemig command line;
# not, e.g., meson's options in its Tests section)
opts=$(grep -E '^\| `--|livemig ' "$src/docs/cli.md" |
       grep -oE -- '--[a-z][a-z0-9-]*[a-z0-9]' | sort -u)
page=$(sed 's/\\-/-/g' "$mandir/man1/livemig.1" 2>/dev/null)
absent=()
for o in $opts; do
    grep -qe "$o\b" <<<"$page" || absent+=("$o")
done
if [[ -n $page && ${#absent[@]} -eq 0 ]]; then
    ok "livemig.1 names all $(wc -w <<<"$opts") options of docs/cli.md"
else
    not_ok "livemig.1 lacks options of docs/cli.md: ${absent[*]:-(no page)}"
fi

exit $((failed > 0))
