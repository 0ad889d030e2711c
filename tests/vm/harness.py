#!/usr/bin/env python3
"""Run qproxy's guest-side checks over real AF_VSOCK, in a Linux VM under QEMU.

This machine's own vsock belongs to whatever runs it, so nothing here touches
it.  Instead the harness boots a throwaway guest under QEMU's software
emulation and lets the two halves of qproxy talk over the vsock loopback
transport (CID 1) of the guest's own kernel.  The guest's root filesystem is
the enclave image (examples/build-rootfs.sh) with the test harness beside it,
so every check also proves the image complete:

1. The kernel: the Debian cloud kernel package (``linux-image-cloud-amd64``
   names the version), fetched with ``apt-get download`` and unpacked into
   cache/kernel/ once; only vmlinuz and the three vsock modules are kept.
2. The harness, cached as cache/harness-KEY.cpio.gz: busybox, the vsock
   modules, and for the checks alone a whole standard library, compiled, and
   the shared libraries its extension modules need, under /harness.  KEY
   changes when any of those inputs does.
3. The enclave image, cached as cache/image-KEY.cpio.gz:
   examples/build-rootfs.sh's output for the guest's python3, unchanged.  KEY
   covers the script, its helper, qproxy.py and the python3.
4. The part that changes, rebuilt on every run (a few hundred kilobytes):
   /init (init.sh), tests/vm/guest/, and the image's entry point, which the
   checks start each half with (python3 -I -S /opt/qproxy/qproxy.pyc, under
   env -i): so a half can import only what the image holds.  The kernel
   unpacks the archives concatenated into one initrd, each over the one
   before: the image is laid over the harness as built.
5. QEMU boots it; /init runs each check, a Python script that prints
   ``PASS name`` or ``FAIL name: reason``, and powers off.  The harness reads
   those lines from the serial console and prints ``N passed, M failed`` last.
   A timeout (default 600 s) is around the whole boot.

Usage: tests/vm/run.sh [-v] [--timeout S] [--list] [CHECK...]
Exit 0 when every check passed, 1 otherwise, 77 when the tools it needs are
missing (the reason is printed; ``.ci/run`` shows how to install them).
Environment: QPROXY_VM_PYTHON (the python3 to put in the guest; default
/usr/bin/python3), QPROXY_VM_TIMEOUT, QPROXY_VM_KERNEL_PACKAGE (pin a package).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VM = Path(__file__).resolve().parent
ROOT = VM.parent.parent
QPROXY = ROOT / "qproxy.py"
BUILD_ROOTFS = ROOT / "examples" / "build-rootfs.sh"
IMAGE_INPUTS = (BUILD_ROOTFS, ROOT / "examples" / "rootfs_stdlib.py", QPROXY)  # what the image is made of
GUEST = VM / "guest"
CACHE = VM / "cache"
KERNEL = CACHE / "kernel"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vsock_loopback")  # in load order
STDLIB_LEFT_OUT = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                   "distutils", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
HARNESS_FORMAT = 1  # bump when build_harness changes what it puts in the archive
ENTRY_POINT = re.compile(r"^entry point: (.+) enclave --config FILE$", re.M)  # build-rootfs.sh's last line
EXIT_SKIP = 77
DEFAULT_TIMEOUT = 600.0  # the whole boot; about 100 s on a quiet 2-core machine, twice that or more under load
RESULT = re.compile(r"^(PASS|FAIL) (\w+)\b:? ?(.*)$")


class Skip(Exception):
    """A tool the harness needs is missing and cannot be fetched here."""


class ImageFailed(Exception):
    """examples/build-rootfs.sh could not build the enclave image: every check fails."""


def checks() -> list[str]:
    """The guest checks, by name: tests/vm/guest/check_NAME.py."""
    return sorted(path.stem[len("check_"):] for path in GUEST.glob("check_*.py"))


def log(message: str) -> None:
    print(f"vm: {message}", flush=True)


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


# ---------------------------------------------------------------------------
# Inputs: qemu, busybox, cpio, the kernel, the guest's python
# ---------------------------------------------------------------------------

def need_tool(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/bin/{name}" if os.access(f"/bin/{name}", os.X_OK) else None)
    if not path:
        raise Skip(f"{name} is not installed (apt-get install -y qemu-system-x86 busybox-static cpio; "
                   f"{name} comes from {package})")
    return path


def kernel_package() -> str:
    pinned = os.environ.get("QPROXY_VM_KERNEL_PACKAGE")
    if pinned:
        return pinned
    try:
        depends = run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise Skip(f"cannot resolve the kernel package: apt-cache depends {KERNEL_META_PACKAGE} failed ({error})")
    found = re.search(r"Depends: (linux-image-\S+)", depends)
    if not found:
        raise Skip(f"cannot resolve the kernel package: apt-cache depends {KERNEL_META_PACKAGE} names no kernel "
                   "(run apt-get update)")
    return found.group(1)


def fetch_kernel() -> Path:
    """cache/kernel/ with vmlinuz and modules/*.ko, fetched through apt the first time."""
    wanted = [KERNEL / "vmlinuz", KERNEL / "package"] + [KERNEL / "modules" / f"{name}.ko" for name in MODULES]
    if all(path.exists() for path in wanted):
        return KERNEL
    package = kernel_package()
    log(f"fetching the kernel package {package} into {KERNEL} (once)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="kernel-") as scratch:
        os.chmod(scratch, 0o755)  # apt's _apt user may write the download there
        try:
            run(["apt-get", "download", package], cwd=scratch)
            deb = next(Path(scratch).glob("*.deb"))
            run(["dpkg-deb", "-x", str(deb), f"{scratch}/x"])
        except (OSError, subprocess.CalledProcessError, StopIteration) as error:
            detail = getattr(error, "stderr", "") or error
            raise Skip(f"cannot fetch the kernel package {package} with apt-get download: {str(detail).strip()}")
        unpacked = Path(scratch) / "x"
        vmlinuz = next(unpacked.glob("boot/vmlinuz-*"), None)
        if vmlinuz is None:
            raise Skip(f"the kernel package {package} holds no boot/vmlinuz-*")
        staging = Path(scratch) / "kernel"
        (staging / "modules").mkdir(parents=True)
        shutil.copy(vmlinuz, staging / "vmlinuz")
        for name in MODULES:
            module = next(unpacked.glob(f"lib/modules/*/kernel/net/vmw_vsock/{name}.ko"), None)
            if module is None:
                raise Skip(f"the kernel package {package} has no {name}.ko (needs CONFIG_VSOCKETS_LOOPBACK=m)")
            shutil.copy(module, staging / "modules" / f"{name}.ko")
        (staging / "package").write_text(package + "\n")
        shutil.rmtree(KERNEL, ignore_errors=True)
        staging.rename(KERNEL)
    return KERNEL


def guest_python() -> dict:
    """The python3 that goes into the guest: its binary, version and standard library."""
    candidate = os.environ.get("QPROXY_VM_PYTHON") or ("/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                                                       else sys.executable)
    probe = ("import json, os, sys, sysconfig; print(json.dumps({'executable': os.path.realpath(sys.executable), "
             "'version': sys.version, 'stdlib': sysconfig.get_path('stdlib'), "
             "'platstdlib': sysconfig.get_path('platstdlib')}))")
    try:
        info = json.loads(run([candidate, "-c", probe]).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError) as error:
        raise Skip(f"cannot use {candidate} as the guest's python3: {error}")
    info["dynload"] = os.path.join(info["platstdlib"], "lib-dynload")
    stat = os.stat(info["executable"])
    info["stamp"] = [stat.st_size, stat.st_mtime]
    return info


# ---------------------------------------------------------------------------
# Building the initramfs: the cached harness and image, the per-run overlay
# ---------------------------------------------------------------------------

def shared_libraries(paths: list[str]) -> set[str]:
    """Every library ldd names for these executables and extension modules."""
    found: set[str] = set()
    for path in paths:
        result = subprocess.run(["ldd", path], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            match = re.search(r"(?:=> )?(/\S+) \(0x", line)
            if match:
                found.add(match.group(1))
    return found


def make_cpio(stage: Path, archive: Path) -> None:
    """A gzip'd newc archive of the stage, every file owned by root."""
    names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=stage, check=True,
                           capture_output=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=stage, input=names,
                          check=True, capture_output=True)
    with gzip.open(archive, "wb", compresslevel=1) as packed:
        packed.write(cpio.stdout)


def build_harness(archive: Path, busybox: str, python: dict) -> None:
    """busybox with its applet links, and under /harness the vsock modules and, for the checks alone, a whole
    standard library, compiled, and the libraries its extension modules need: init.sh puts these two on the
    checks' PYTHONPATH and LD_LIBRARY_PATH, which the halves they start do not get."""
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="harness-") as scratch:
        stage = Path(scratch)
        for folder in ("bin", "dev", "proc", "sys", "tmp", "etc", "root", "harness/modules", "harness/lib"):
            (stage / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, stage / "bin/busybox")
        for applet in run([busybox, "--list"]).stdout.split():
            if applet != "busybox":
                os.symlink("busybox", stage / "bin" / applet)
        for name in MODULES:
            shutil.copy(KERNEL / "modules" / f"{name}.ko", stage / "harness/modules" / f"{name}.ko")
        shutil.copytree(python["stdlib"], stage / "harness/stdlib", symlinks=False, ignore_dangling_symlinks=True,
                        ignore=lambda folder, names: [n for n in names if n in STDLIB_LEFT_OUT
                                                      or n.startswith("config-") or n.startswith("_test")])
        shutil.copytree(python["dynload"], stage / "harness/lib-dynload",
                        ignore=lambda folder, names: [n for n in names if n.startswith("_test")])
        extensions = [str(path) for path in (stage / "harness/lib-dynload").glob("*.so")]
        # Less python3's own libraries: the image has those, as the interpreter does not start without them.
        for library in shared_libraries(extensions) - shared_libraries([python["executable"]]):
            shutil.copy(os.path.realpath(library), stage / "harness/lib" / os.path.basename(library))
        # Compiled once here, not by every python3 the guest starts (seconds each under emulation).
        run([python["executable"], "-m", "compileall", "-q", "-j", "0", "-s", str(stage), "-p", "/",
             str(stage / "harness/stdlib")])
        # The parent VM's side of the checks resolves "localhost" and runs a half as nobody.
        (stage / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        (stage / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        make_cpio(stage, archive)


def harness_archive(busybox: str, python: dict) -> Path:
    inputs = {
        "format": HARNESS_FORMAT,
        "kernel": (KERNEL / "package").read_text().strip(),
        "busybox": [busybox, os.path.getsize(busybox), os.path.getmtime(busybox)],
        "python": [python["executable"], python["version"], python["stamp"], python["stdlib"]],
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    archive = CACHE / f"harness-{key}.cpio.gz"
    if not archive.exists():
        log("building the test harness's part of the initramfs (busybox, vsock modules, the checks' standard "
            "library); cached for later runs")
        for old in CACHE.glob("harness-*.cpio.gz"):
            old.unlink()
        partial = archive.with_suffix(".partial")
        build_harness(partial, busybox, python)
        partial.rename(archive)
    return archive


def image_archive(python: dict) -> tuple[Path, str]:
    """The enclave image examples/build-rootfs.sh builds for the guest's python3, as an archive, and the command
    its entry point runs a half with ("/usr/bin/python3 -I -S /opt/qproxy/qproxy.pyc")."""
    digest = hashlib.sha256(json.dumps([python["executable"], python["version"], python["stamp"]]).encode())
    for path in IMAGE_INPUTS:
        digest.update(path.read_bytes())
    key = digest.hexdigest()[:16]
    archive, command = CACHE / f"image-{key}.cpio.gz", CACHE / f"image-{key}.command"
    if not archive.exists():
        log("building the enclave image with examples/build-rootfs.sh; cached until it, qproxy.py or python3 changes")
        for old in [*CACHE.glob("image-*.cpio.gz"), *CACHE.glob("image-*.command")]:
            old.unlink()
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="build-") as scratch:
            rootfs = Path(scratch) / "rootfs"
            built = subprocess.run(["sh", str(BUILD_ROOTFS), str(rootfs), python["executable"]],
                                   capture_output=True, text=True)
            entry_point = ENTRY_POINT.search(built.stdout)
            if built.returncode != 0 or not entry_point:
                raise ImageFailed(f"examples/build-rootfs.sh exited with {built.returncode}: "
                                  f"{(built.stderr or built.stdout).strip()}")
            for line in built.stdout.splitlines():
                log(line)
            command.write_text(entry_point.group(1))
            partial = archive.with_suffix(".partial")
            make_cpio(rootfs, partial)
            partial.rename(archive)
    return archive, command.read_text()


def build_overlay(archive: Path, selected: list[str], half: str) -> None:
    """/init, the guest checks laid out as in the repository under /qproxy, and the command they start a half with."""
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="overlay-") as scratch:
        stage = Path(scratch)
        shutil.copy(VM / "init.sh", stage / "init")
        os.chmod(stage / "init", 0o755)
        guest = stage / "qproxy/tests/vm/guest"
        guest.mkdir(parents=True)
        for script in GUEST.glob("*.py"):
            shutil.copy(script, guest / script.name)
        (stage / "checks").write_text("".join(f"{name}\n" for name in selected))
        (stage / "harness").mkdir()
        (stage / "harness/half").write_text(f"{half}\n")
        make_cpio(stage, archive)


# ---------------------------------------------------------------------------
# Booting and reading the results
# ---------------------------------------------------------------------------

def boot(qemu: str, initrd: Path, timeout: float, verbose: bool, console_log: Path) -> tuple[list[str], bool]:
    """Boot the guest; return the console's lines and whether it powered off in time."""
    argv = [
        qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1024",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(KERNEL / "vmlinuz"), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init",
    ]
    lines: list[str] = []
    with open(console_log, "w") as saved:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)

        def read() -> None:
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
                lines.append(line)
                saved.write(line + "\n")
                saved.flush()
                if verbose or RESULT.match(line):
                    print(line if RESULT.match(line) else f"  | {line}", flush=True)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            process.wait(timeout)
            finished = True
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            finished = False
        reader.join(5)
    return lines, finished


def results(lines: list[str], selected: list[str], finished: bool, timeout: float) -> dict:
    """name -> (passed, reason, detail lines) for every selected check, missing ones failed."""
    found: dict = {}
    current = None
    exits = {}
    since_last: list[str] = []  # console lines since the previous check ended: a crash's traceback
    for line in lines:
        match = RESULT.match(line)
        if match and match.group(2) in selected:
            current = match.group(2)
            found[current] = (match.group(1) == "PASS", match.group(3) or "", [])
            continue
        exited = re.match(r"^qproxy-vm: check (\S+) exited with (\d+)", line)
        if exited:
            exits[exited.group(1)] = (exited.group(2), since_last[-40:])
            since_last = []
            current = None
            continue
        since_last.append(line)
        if current and line.startswith("    "):
            found[current][2].append(line)
        else:
            current = None
    for name in selected:
        if name not in found:
            if name in exits:
                status, output = exits[name]
                found[name] = (False, f"no result line (the script exited with {status})",
                               [f"    {line}" for line in output])
                continue
            elif finished:
                why = "no result line: the guest powered off before running it (see the console log)"
            else:
                why = f"no result: the VM did not finish within {timeout:.0f} s"
            found[name] = (False, why, [])
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="CHECK", help="run only these checks (default: all)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the whole guest console")
    parser.add_argument("--list", action="store_true", help="print the names of the checks and exit")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("QPROXY_VM_TIMEOUT", DEFAULT_TIMEOUT)),
                        help=f"seconds the whole VM run may take (default {DEFAULT_TIMEOUT:.0f})")
    args = parser.parse_args(argv)
    available = checks()
    if args.list:
        print("\n".join(available))
        return 0
    unknown = [name for name in args.names if name not in available]
    if unknown:
        parser.error(f"no such check: {', '.join(unknown)} (there are: {', '.join(available)})")
    selected = args.names or available

    started = time.monotonic()
    try:
        qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
        busybox = need_tool("busybox", "busybox-static")
        need_tool("cpio", "cpio")
        fetch_kernel()
        python = guest_python()
        CACHE.mkdir(parents=True, exist_ok=True)
        harness = harness_archive(busybox, python)
        image, half = image_archive(python)
    except Skip as error:
        print(f"SKIP: {error}")
        print("0 passed, 0 failed")
        return EXIT_SKIP
    except ImageFailed as error:
        print(f"vm: {error}")
        for name in selected:
            print(f"FAIL {name}: the enclave image could not be built (examples/build-rootfs.sh)")
        print(f"0 passed, {len(selected)} failed")
        return 1
    console_log = CACHE / "console.log"
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="run-") as run_dir:
        overlay = Path(run_dir) / "overlay.cpio.gz"
        build_overlay(overlay, selected, half)
        initrd = Path(run_dir) / "initrd.gz"
        with open(initrd, "wb") as joined:  # the kernel unpacks concatenated archives in turn, each over the last
            for part in (harness, image, overlay):
                with open(part, "rb") as piece:
                    shutil.copyfileobj(piece, joined)
        log(f"booting {(KERNEL / 'package').read_text().strip()} under qemu (software emulation, "
            f"timeout {args.timeout:.0f} s); {len(selected)} checks; console in {console_log.relative_to(ROOT)}")
        lines, finished = boot(qemu, initrd, args.timeout, args.verbose, console_log)
    outcome = results(lines, selected, finished, args.timeout)
    printed = {RESULT.match(line).group(2) for line in lines if RESULT.match(line)}
    for name in selected:
        passed, why, detail = outcome[name]
        if name not in printed:
            print(f"FAIL {name}: {why}")
    failures = [name for name in selected if not outcome[name][0]]
    for name in sorted(selected, key=lambda name: name in failures):  # failures last, nearest the summary
        passed, why, detail = outcome[name]
        if detail:
            print(f"--- {name}: {why}")
            print("\n".join(detail))
    if not finished:
        print(f"vm: the VM did not power off within {args.timeout:.0f} s and was killed")
    log(f"took {time.monotonic() - started:.1f} s")
    print(f"{len(selected) - len(failures)} passed, {len(failures)} failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
