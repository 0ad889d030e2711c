"""qproxy over real AF_VSOCK: the checks of tests/vm/, run once in a Linux VM under QEMU.

The module boots the VM once (tests/vm/run.sh, about a minute under
software emulation) and reports each guest check as a test of its own.  The
VM's root filesystem is the enclave image examples/build-rootfs.sh builds, and
the halves run from it: a check also fails when the image lacks a module.  It
skips only when the harness cannot get what it needs (qemu, busybox, cpio, or
the kernel package through apt), and says which.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

VM = Path(__file__).resolve().parent / "vm"
RUN = VM / "run.sh"


def load_harness():
    spec = importlib.util.spec_from_file_location("qproxy_vm_harness", VM / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = load_harness()
CHECKS = harness.checks()


@pytest.fixture(scope="module")
def vm_results() -> dict:
    """Run every check in one boot; name -> (passed, the check's output)."""
    timeout = float(os.environ.get("QPROXY_VM_TIMEOUT", harness.DEFAULT_TIMEOUT))
    try:
        finished = subprocess.run(
            ["sh", str(RUN), "--timeout", str(timeout)], capture_output=True, text=True,
            env=dict(os.environ, PYTHON=sys.executable), timeout=timeout + 600,  # + building the first time
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"tests/vm/run.sh did not finish: {error}")
    output = finished.stdout + finished.stderr
    if finished.returncode == harness.EXIT_SKIP:
        reason = next((line[len("SKIP: "):] for line in output.splitlines() if line.startswith("SKIP: ")), output)
        pytest.skip(f"real-vsock VM tests need qemu and a kernel: {reason}")
    found = {}
    for block in re.split(r"(?m)^(?=(?:PASS|FAIL|---) )", output):
        match = harness.RESULT.match(block.splitlines()[0]) if block.strip() else None
        if match:
            found[match.group(2)] = (match.group(1) == "PASS", block.rstrip())
        elif block.startswith("--- "):
            name = block[4:].split(":", 1)[0]
            if name in found:
                found[name] = (found[name][0], found[name][1] + "\n" + block.rstrip())
    if not found:
        pytest.fail(f"tests/vm/run.sh exited with {finished.returncode} and reported no checks:\n{output[-3000:]}")
    found["<output>"] = output
    return found


@pytest.mark.parametrize("check", CHECKS)
def test_vm(vm_results: dict, check: str) -> None:
    passed, report = vm_results.get(check, (False, f"no result for {check}:\n{vm_results['<output>'][-3000:]}"))
    assert passed, report
