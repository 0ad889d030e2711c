#!/bin/sh
# The smallest root filesystem that runs qproxy's enclave half: an enclave's image is loaded
# into the enclave's own memory, so every byte of it is memory the service cannot use.
#
#   examples/build-rootfs.sh OUT [PYTHON3]     (PYTHON3: default /usr/bin/python3, 3.11 or newer)
#
# No Docker needed (examples/Dockerfile.minimal runs it in a build stage). OUT, new or empty,
# gets, each at the same absolute path as on this machine:
#   - PYTHON3's binary (and a python3 link to it);
#   - the shared libraries ldd lists for it and for the extension modules below, and
#     libgcc_s, which glibc dlopen()s when a thread exits (ldd cannot see it);
#   - the standard-library modules qproxy imports, and only those, as bytecode with no
#     source (x.pyc where x.py was); rootfs_stdlib.py finds them by running both halves and
#     check-config through their paths, so the list follows qproxy.py as it changes (and
#     adds the Unicode codecs, which the bytes of a message can pick: it says why);
#   - qproxy.py as bytecode, /opt/qproxy/qproxy.pyc: no source to compile at each start,
#     and no syntax tree kept in memory as for a script (README, "Performance");
#   - empty /tmp, and /dev, /proc, /sys for the enclave's init to mount on.
# Nothing in /etc: the enclave half resolves no names (it dials 127.0.0.1 and vsock), reads no
# user database, and logs in UTC.
#
# Entry point (the last line printed): python3 -I -S /opt/qproxy/qproxy.pyc enclave --config FILE.
# -I: no PYTHON* variable, user folder or current folder changes what runs; -S: no site
# module, whose start-up costs time and memory and whose imports the image does not hold.
# Exit 0 with the sizes printed; non-zero with a reason on stderr.
set -eu
umask 022

FLAGS="-I -S"
QPROXY_TARGET=/opt/qproxy/qproxy.pyc

die() {
    echo "build-rootfs.sh: $*" >&2
    exit 1
}

[ $# -eq 1 ] || [ $# -eq 2 ] || { echo "usage: $0 OUT [PYTHON3]" >&2; exit 2; }
out=$1
here=$(cd "$(dirname "$0")" && pwd)
qproxy=$here/../qproxy.py
[ -f "$qproxy" ] || die "no qproxy.py beside examples/ ($qproxy)"
python=$("${2:-/usr/bin/python3}" -c 'import os, sys; print(os.path.realpath(sys.executable))') ||
    die "cannot run ${2:-/usr/bin/python3}"
[ ! -e "$out" ] || [ -z "$(ls -A "$out")" ] || die "$out is not empty"
mkdir -p "$out"
out=$(cd "$out" && pwd)

# A file of this machine into OUT at the same path, symbolic links followed.
install_file() {
    mkdir -p "$out$(dirname "$1")"
    cp -L "$1" "$out$1"
}

# The libraries ldd names for each file given, one path a line; "not found" stops the build.
libraries() {
    for elf in "$@"; do
        listed=$(ldd "$elf") || die "ldd $elf failed"
        case $listed in *"not found"*) die "ldd $elf: $listed" ;; esac
        printf '%s\n' "$listed" | sed -n 's/^.*[[:space:]]\(\/[^[:space:]]*\) (0x[0-9a-f]*)$/\1/p'
    done
}

# shellcheck disable=SC2086  # FLAGS is a list of options
"$python" "$here/rootfs_stdlib.py" "$qproxy" "$out" "$QPROXY_TARGET" $FLAGS

install_file "$python"
bin=$(dirname "$python")
[ "$(basename "$python")" = python3 ] || ln -s "$(basename "$python")" "$out$bin/python3"

extensions=$(find "$out" -name '*.so')
# shellcheck disable=SC2086  # one path a word
libs=$(libraries "$python" $extensions | sort -u)
libc=$(printf '%s\n' "$libs" | grep '/libc\.so\.6$') || die "ldd names no libc.so.6 for $python"
libgcc_s=$(dirname "$libc")/libgcc_s.so.1
[ -e "$libgcc_s" ] || die "no $libgcc_s beside $libc: glibc loads it when a thread exits"
libs=$(printf '%s\n%s\n' "$libs" "$libgcc_s" | sort -u)
for lib in $libs; do
    install_file "$lib"
done

mkdir -p "$out/dev" "$out/proc" "$out/sys" "$out/tmp"
chmod 1777 "$out/tmp"

# The sizes, in bytes.
size() { du -scb "$@" | tail -n 1 | cut -f 1; }
stdlib=$("$python" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
modules=$(find "$out$stdlib" -name '*.pyc' | wc -l)
# shellcheck disable=SC2086
printf '%10d  %s\n' \
    "$(size "$out$python")" "python3 ($python)" \
    "$(size $(printf '%s\n' "$libs" | sed "s|^|$out|"))" "shared libraries ($(printf '%s\n' "$libs" | wc -l))" \
    "$(size "$out$stdlib")" "standard library ($modules modules as bytecode, $(printf '%s\n' "$extensions" | grep -c .) extension modules)" \
    "$(size "$out$QPROXY_TARGET")" "qproxy ($QPROXY_TARGET)" \
    "$(size "$out")" "in all, in $out"
echo "entry point: $bin/python3 $FLAGS $QPROXY_TARGET enclave --config FILE"
