"""The files under examples/ are what users copy: each must be valid, consistent with qproxy.py,
and work: the enclave image's scripts run for real, in a network namespace, and the smallest
image's root filesystem is built for real and runs the enclave half, chrooted into."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (DEADLINE, LOG_LINES_SHOWN, QPROXY, ROOT, Half, free_port, inbound, outbound, recv_all,
                      run_qproxy, wait_for)

EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("config", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid(config):
    result = run_qproxy("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: valid")


@pytest.mark.skipif(not shutil.which("sh"), reason="needs a POSIX shell")
@pytest.mark.parametrize("script", ["start.sh", "app.sh", "build-rootfs.sh"])
def test_example_scripts_parse(script):
    assert subprocess.run(["sh", "-n", str(EXAMPLES / script)]).returncode == 0


def test_dockerfile_copies_what_start_sh_runs():
    dockerfile = (EXAMPLES / "Dockerfile").read_text()
    copies = dict(re.findall(r"^COPY (\S+) (\S+)$", dockerfile, re.M))
    for source in copies:
        assert (ROOT / source).exists(), source
    start = (EXAMPLES / "start.sh").read_text()
    assert "cd /root" in start and "python3 -m qproxy enclave --config /root/config_qproxy.toml" in start
    assert {"/root/qproxy.py", "/root/config_qproxy.toml", "/root/app.sh", "/root/start.sh"} <= set(copies.values())
    assert 'CMD ["/root/start.sh"]' in dockerfile  # a shell wrapper, not python3 directly


def test_systemd_unit_runs_the_host_half():
    unit = (EXAMPLES / "qproxy-host.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    assert exec_start[1:4] == ["/opt/qproxy/qproxy.py", "host", "--config"]
    assert exec_start[-1].isdigit()  # the enclave's CID
    assert "RestartPreventExitStatus=2" in unit  # a config error is not fixed by restarting
    assert re.search(r"^Type=notify$", unit, re.M)  # the host half says READY=1 (test_control_link.py)


# --- the enclave image's scripts, run for real -------------------------------------------
#
# start.sh, app.sh and config_qproxy.toml as the Dockerfile lays them out in /root, here in
# a temporary folder instead (the only change to start.sh: its paths), run with dash (/bin/sh
# on Debian) in a network namespace of their own, where lo starts down as in an enclave. The
# enclave half uses emulated vsock (QPROXY_VSOCK_EMULATION): Unix socket files, which other
# network namespaces reach, so the host half runs outside, and curl goes through it.

ENCLAVE_SHELL = shutil.which("dash")
MISSING = [tool for tool in ("unshare", "dash", "nc", "curl") if not shutil.which(tool)]


def _why_no_namespace() -> str | None:
    if os.geteuid() != 0:
        return "needs root, for a network namespace"
    if MISSING:
        return f"needs {', '.join(MISSING)} (Debian: util-linux, dash, netcat-openbsd, curl)"
    usage = subprocess.run(["nc", "-h"], capture_output=True, text=True).stderr
    if "OpenBSD netcat" not in usage:
        return "needs OpenBSD's nc, the one the Dockerfile installs (Debian: netcat-openbsd)"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "unshare -n is not allowed here"
    return None


WHY_NOT = _why_no_namespace()
needs_namespace = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

LO_FLAGS = "/sys/class/net/lo/flags"
# start.sh's `python3`: this interpreter (a venv's included), each start noted with its time.
COUNTING_PYTHON = '#!/bin/sh\necho "$(date +%s.%N) $*" >> "{starts}"\nexec "{python}" "$@"\n'


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group pgid."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _listening(pid: int, port: int) -> bool:
    """Whether something listens on 127.0.0.1:port in the network namespace of process pid."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return False
    return f" 0100007F:{port:04X} 00000000:0000 0A " in table


class EnclaveImage:
    """The image's /root in a temporary folder, its start.sh run in a new network namespace."""

    def __init__(self, folder: Path, config: str | None = None, python3: str | None = None,
                 lo_flags: str = LO_FLAGS):
        """config: the text of config_qproxy.toml (default: the vendor's, adapted); python3: the
        script start.sh runs as python3, {starts} and {python} in it filled in; lo_flags: the
        file start.sh reads lo's flags from."""
        self.folder = folder
        self.root = folder / "root"
        self.root.mkdir(parents=True)
        self.vsock_dir = folder / "vsock"
        self.vsock_dir.mkdir()
        self.starts = folder / "starts"  # one line per `python3 ...` that start.sh runs
        self.host_ports = {5050: free_port(), 5443: free_port()}
        shutil.copy(QPROXY, self.root / "qproxy.py")  # COPY qproxy.py /root/qproxy.py
        shutil.copy(EXAMPLES / "app.sh", self.root / "app.sh")
        original = (EXAMPLES / "start.sh").read_text()
        start = original.replace("/root", str(self.root)).replace(LO_FLAGS, lo_flags)
        assert start.replace(str(self.root), "/root").replace(lo_flags, LO_FLAGS) == original
        (self.root / "start.sh").write_text(start)
        self.config = self.root / "config_qproxy.toml"
        self.config.write_text(self._vendor_config() if config is None else config)
        bin_dir = folder / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "python3"
        wrapper.write_text((python3 or COUNTING_PYTHON).format(starts=self.starts, python=sys.executable))
        wrapper.chmod(0o755)
        self.env = {key: value for key, value in os.environ.items()
                    if key not in ("QPROXY_LISTEN_CID", "QPROXY_CONTROL_PORT", "TOKIO_WORKER_THREADS", "RUST_LOG")}
        self.env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
                        QPROXY_VSOCK_EMULATION=str(self.vsock_dir))
        self.log_path = folder / "start.sh.log"
        self.log_file = None
        self.process = None
        self.host = None

    def _vendor_config(self) -> str:
        """The vendor's configuration, with free host ports and log folders in the temporary folder."""
        text = (EXAMPLES / "config_qproxy.toml").read_text()
        replacements = [(f"host_port = {port}", f"host_port = {host_port}") for port, host_port in self.host_ports.items()]
        replacements += [('host_log_dir = "/var/log/qproxy"', f'host_log_dir = "{self.folder / "host-logs"}"'),
                         ('enclave_log_dir = "/var/log/qproxy"', f'enclave_log_dir = "{self.folder / "enclave-logs"}"')]
        for old, new in replacements:
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        (self.folder / "host-logs").mkdir()
        (self.folder / "enclave-logs").mkdir()
        return text

    def start(self) -> None:
        """sh start.sh (dash) in a new network namespace, in a process group of its own."""
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            ["unshare", "-n", ENCLAVE_SHELL, str(self.root / "start.sh")], env=self.env, cwd=self.folder,
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_host(self) -> Half:
        """The host half, outside the namespace, on the same emulated vsock folder."""
        self.host = Half("host", ["--config", str(self.config), "4"], self.env, self.folder / "host-stderr.log")
        return self.host

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start_times(self) -> list[float]:
        if not self.starts.exists():
            return []
        return [float(line.split()[0]) for line in self.starts.read_text().splitlines()]

    def wait_app(self, timeout: float = DEADLINE) -> None:
        """Wait until app.sh's nc listens on 127.0.0.1:5050 in the namespace."""
        wait_for(lambda: _listening(self.process.pid, 5050), "app.sh listening on 5050 in the namespace", timeout)

    def wait_enclave_connected(self) -> None:
        host_log = self.folder / "host-logs" / "host.log"
        wait_for(lambda: host_log.exists() and "control: enclave half connected" in host_log.read_text(),
                 "the enclave half's control connection, in the host half's log")

    def curl(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{self.host_ports[5050]}/"],
            capture_output=True, text=True, timeout=DEADLINE + 5,
        )

    def close(self) -> None:
        """End every process of the group (the namespace goes with its last one), in bounded time."""
        if self.host:
            self.host.kill()
        if self.process is None:
            return
        pgid = self.process.pid
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, DEADLINE)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            end = time.monotonic() + grace
            while _group_members(pgid) and time.monotonic() < end:
                time.sleep(0.05)
        self.process.wait(DEADLINE)
        self.log_file.close()
        assert not _group_members(pgid), f"processes of start.sh left: {_group_members(pgid)}"


@pytest.fixture
def image_factory(tmp_path, request):
    images = []

    def make(**kwargs) -> EnclaveImage:
        image = EnclaveImage(tmp_path / f"image-{len(images)}", **kwargs)
        images.append(image)
        return image

    yield make
    failed = getattr(request.node, "report_call", None) and request.node.report_call.failed
    for image in images:
        image.close()
        if failed:  # shown under the failure as the teardown's output
            print(f"--- start.sh's output ({image.folder.name})", image.log(), sep="\n")
            for log_file in sorted(image.folder.glob("*-logs/*.log")) + [image.folder / "host-stderr.log"]:
                if log_file.exists():
                    lines = log_file.read_text(errors="replace").splitlines()[-LOG_LINES_SHOWN:]
                    print(f"--- {log_file.relative_to(image.folder)}", *lines, sep="\n")


@needs_namespace
def test_walkthrough_answers_curl_and_curl_returns(image_factory):
    """The vendor's walk-through: curl through the host half gets "Hello world!", and returns."""
    image = image_factory()
    image.start()
    image.start_host()
    image.wait_enclave_connected()
    image.wait_app()
    for _ in range(2):  # app.sh serves one connection after the other
        result = image.curl()
        assert (result.returncode, result.stdout, result.stderr) == (0, "Hello world!\n", "")
    assert "brought the loopback interface lo up" in (image.folder / "enclave-logs" / "enclave.log").read_text()
    assert len(image.start_times()) == 1


@needs_namespace
def test_start_sh_starts_the_app_when_lo_flags_cannot_be_read(image_factory):
    """No readable /sys/class/net/lo/flags: start.sh waits its 10 s, then starts the app all the same."""
    image = image_factory(lo_flags="/nonexistent/sys/class/net/lo/flags")
    image.start()
    image.start_host()
    image.wait_enclave_connected()
    image.wait_app(timeout=DEADLINE + 10)
    result = image.curl()
    assert (result.returncode, result.stdout, result.stderr) == (0, "Hello world!\n", "")
    assert image.process.poll() is None  # start.sh, exec'd into app.sh, still runs


@needs_namespace
def test_start_sh_stops_on_a_configuration_error(image_factory):
    """Exit 2 of the enclave half is not restarted: start.sh stops, app and all, after one start."""
    image = image_factory(config="[[inbound_connections]]\nhost_port = 5050\nenclave_port = 5050\n")
    image.start()
    wait_for(lambda: image.process.poll() is not None, "start.sh to stop after the enclave half's exit 2")
    time.sleep(3)  # the old start.sh restarted every second
    assert len(image.start_times()) == 1, image.log()
    log = image.log()
    assert "qproxy: error:" in log and "vsock_port" in log
    assert "start.sh: qproxy enclave exited with 2" in log and "stopping" in log
    assert image.process.returncode == -signal.SIGTERM


@needs_namespace
def test_start_sh_restarts_other_exits_with_a_back_off(image_factory):
    """Exits 1 and 3 and a signal are restarted, 1 s, then 2 s, then 4 s later."""
    failing = ('#!/bin/sh\necho "$(date +%s.%N) $*" >> "{starts}"\n'
               'case $(wc -l < "{starts}") in\n  1) exit 1 ;;\n  2) exit 3 ;;\n  3) kill -KILL $$ ;;\n  *) exit 3 ;;\nesac\n')
    image = image_factory(python3=failing)
    image.start()
    wait_for(lambda: len(image.start_times()) >= 4, "4 starts of the enclave half", timeout=DEADLINE)
    times = image.start_times()
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert 0.9 < gaps[0] < 2.5 and 1.9 < gaps[1] < 3.5 and 3.9 < gaps[2] < 5.5, gaps  # not every second
    log = image.log()
    for status, delay in (("1", 1), ("3", 2), ("137", 4)):
        assert f"start.sh: qproxy enclave exited with {status}; restarting in {delay} s" in log, log


# --- the smallest image: build-rootfs.sh's root filesystem, Dockerfile.minimal ------------

BUILD_ROOTFS = EXAMPLES / "build-rootfs.sh"
MINIMAL = EXAMPLES / "Dockerfile.minimal"
IMAGE_PYTHON = "/usr/bin/python3"  # build-rootfs.sh's default: the distribution's, as in Dockerfile.minimal
# Debian's python3.11 makes about 12.9 MB. A module that brings a big library with it (ssl: 5 MB of
# libcrypto) must be a decision, not an accident of an import.
IMAGE_BUDGET = 16_000_000
CHROOT = shutil.which("chroot")


def minimal_stages() -> list[str]:
    """Dockerfile.minimal's stages, each from its FROM line on."""
    return re.split(r"(?m)^(?=FROM )", MINIMAL.read_text())[1:]


def minimal_entry_point() -> list[str]:
    return json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", minimal_stages()[-1], re.M).group(1))


def test_minimal_dockerfile_builds_the_rootfs_with_the_script_and_ends_from_scratch():
    build, *_, last = minimal_stages()
    stage = re.match(r"FROM debian:bookworm-slim AS (\S+)\n", build).group(1)
    # The script finds qproxy.py one folder up and its helper beside it, as in the repository.
    copied = {source: target for *sources, target in (line.split() for line in re.findall(r"^COPY (.+)$", build, re.M))
              for source in sources}
    assert copied == {"qproxy.py": "/src/qproxy.py", "examples/build-rootfs.sh": "/src/examples/",
                      "examples/rootfs_stdlib.py": "/src/examples/"}
    assert "\nRUN sh /src/examples/build-rootfs.sh /rootfs\n" in build
    assert last.startswith("FROM scratch\n")
    assert f"\nCOPY --from={stage} /rootfs/ /\n" in last
    configs = dict(re.findall(r"^COPY (examples/\S+\.toml) (\S+)$", last, re.M))
    assert all((ROOT / source).exists() for source in configs)
    entry_point = minimal_entry_point()
    assert entry_point[-3:-1] == ["enclave", "--config"] and entry_point[-1] in configs.values()


def _why_no_chroot() -> str | None:
    if os.geteuid() != 0:
        return "needs root, for chroot"
    if not CHROOT:
        return "needs chroot (Debian: coreutils)"
    version = subprocess.run([IMAGE_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True) if os.access(IMAGE_PYTHON, os.X_OK) else None
    if not version or version.stdout.strip() != "True":
        return f"needs {IMAGE_PYTHON}, Python 3.11 or newer, to build the image from"
    return None


WHY_NO_CHROOT = _why_no_chroot()


@pytest.mark.skipif(WHY_NO_CHROOT is not None, reason=WHY_NO_CHROOT or "")
def test_build_rootfs_makes_an_image_that_runs_the_enclave_half(tmp_path, echo_server):
    """build-rootfs.sh for real; chrooted into, its files run the enclave half as Dockerfile.minimal's entry
    point does, with no environment but emulated vsock, and it relays both ways for a host half outside."""
    rootfs = tmp_path / "rootfs"
    built = subprocess.run(["sh", str(BUILD_ROOTFS), str(rootfs)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    command = re.search(r"^entry point: (.+) enclave --config FILE$", built.stdout, re.M).group(1).split()
    assert minimal_entry_point()[:-3] == command  # the Dockerfile runs what the script built
    total = int(re.search(r"^ *(\d+)  in all", built.stdout, re.M).group(1))
    assert total < IMAGE_BUDGET, built.stdout
    assert not list(rootfs.rglob("*.py")), "the image holds bytecode only"

    inside = rootfs / "tmp"  # the enclave half's /tmp, the host half's tmp_path/rootfs/tmp
    (inside / "vsock").mkdir()
    host_port, app_port, control_port = free_port(), free_port(), free_port()
    config = inside / "qproxy.toml"
    config.write_text(inbound(host_port, echo_server.port) + outbound("127.0.0.1", echo_server.port, app_port))
    ports = {"QPROXY_CONTROL_PORT": str(control_port), "RUST_LOG": "debug"}
    host = Half("host", ["--config", str(config), "4"], dict(ports, QPROXY_VSOCK_EMULATION=str(inside / "vsock")),
                tmp_path / "host.log")
    with open(tmp_path / "enclave.log", "wb") as enclave_log:
        enclave = subprocess.Popen([CHROOT, str(rootfs), *command, "enclave", "--config", "/tmp/qproxy.toml"],
                                   env=dict(ports, QPROXY_VSOCK_EMULATION="/tmp/vsock"), stdout=enclave_log,
                                   stderr=subprocess.STDOUT)
    try:
        host.wait_log("control: enclave half connected")
        for port, request in ((host_port, b"inbound, into the image"), (app_port, b"outbound, out of the image")):
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
                client.sendall(request)
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == request
        enclave.send_signal(signal.SIGTERM)
        assert enclave.wait(DEADLINE) == 0
    finally:
        if enclave.poll() is None:
            enclave.kill()
            enclave.wait()
        host.kill()
        print("--- the enclave half's log", (tmp_path / "enclave.log").read_text(errors="replace"), sep="\n")
