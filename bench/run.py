#!/usr/bin/env python3
"""bench/run.py: qproxy against its peers at their best and a direct connection, in one command.

    python3 bench/run.py            # the full run, about seventeen minutes
    python3 bench/run.py --quick    # fewer, shorter runs: about six minutes

Method
------
Chains carry the same traffic to the same server, on loopback only, each with
two hops (host: TCP listener -> Unix socket, enclave: Unix socket -> the
server), each hop its own process in its own session, as in production:

* direct:     the client straight to the server (the ceiling);
* socat:      ``socat TCP-LISTEN:A,fork,reuseaddr UNIX-CONNECT:S`` then
              ``socat UNIX-LISTEN:S,fork TCP:127.0.0.1:B`` (8 KiB buffer, for reference);
* socat-256k: the same with ``-b 262144``, socat at its best in bulk;
* asyncio:    bench/peers/asyncio_relay.py, an asyncio Protocol relay;
* uvloop:     the same relay on uvloop's event loop, when the peers' Python
              (--peer-python, by default the one that runs qproxy) imports uvloop;
* qproxy:     ``qproxy.py host`` on A -> emulated vsock (a Unix socket, as
              QPROXY_VSOCK_EMULATION makes it) -> ``qproxy.py enclave`` -> B.

qproxy listens with a backlog of 1024, so socat's listeners, the asyncio relay
and nginx get 1024 too (``--socat-backlog 0`` gives socat its default of 5).

Workloads, each with a warm-up and then at least three runs, medians
reported (min, max and every run in the JSON).  Runs go round the chains in
turn, a different chain first each round, so slow drift on the machine hits
every chain alike.  Around every measured run the CPU time (user + system,
reaped children included) of every process in each hop's session is read
from /proc, so each rate comes with its CPU cost per unit of work.

* throughput: one iperf3 stream: Gbit/s and CPU seconds per GB;
* keepalive:  ``wrk --latency`` against nginx "Hello world!" at 1, 10, 50 and
              200 connections: requests per second and CPU per request, and
              the 50/90/99 % latency at 50;
* churn:      wrk -c50 with ``Connection: close``, i.e. connections per second;
* egress:     qproxy only: requests per second, each on a new connection, through
              the egress proxy (CONNECT, its 200, then GET through the tunnel) and
              through an outbound entry to the same nginx, served by one pair of
              halves; a load generator of this file's own (two processes, 50
              requests in flight) drives both, and nginx straight (its ceiling);
* conns:      1,000 idle connections held through every chain to a server in
              this process: peak RSS, threads and fds of each hop while they
              are held, how long until fds and threads are back at the
              baseline taken before they opened, and the RSS after that;
* stall:      1,000 clients that never read, each sent 1 MiB, held while 1,000
              others each fetch 256 KiB through qproxy: peak RSS of each half
              (its buffer_memory bound), then its RSS once they are all closed;
* startup:    exec of each half (qproxy with the vendor's walk-through config)
              to the first successful connect() to its listener, polled every 1 ms;
* idle:       VmRSS of each half started with no traffic.

qproxy.py is copied when the run starts and the copy is measured, so an
edit made meanwhile cannot mix two versions in one table (its sha256 is in the
header).  Everything started is killed and every temporary folder removed on exit,
whatever the exit (failure, Ctrl-C, SIGTERM).  The exit code is 0 whether or
not the targets are met; it is non-zero only when the benchmark itself failed.
Standard library only, Python 3.9+.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import datetime
import errno
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_JSON = BENCH / "results" / "latest.json"

WORKLOADS = ("startup", "idle", "conns", "stall", "throughput", "keepalive", "churn", "egress")
CHAINS = ("direct", "socat", "socat-256k", "asyncio", "uvloop", "qproxy")  # the table's columns, in order
PEERS = ("socat", "socat-256k", "asyncio", "uvloop")  # what qproxy is compared with (direct is the ceiling)
SOCATS = ("socat", "socat-256k")
SOCAT_BEST_BUFFER = 262144  # socat -b: its best in bulk (the default is 8 KiB)
RELAY = BENCH / "peers" / "asyncio_relay.py"
KEEPALIVE_CONNECTIONS = (1, 10, 50, 200)  # wrk -c for the keep-alive scaling; 50 carries the targets
PACKAGES = {"iperf3": "iperf3", "wrk": "wrk", "nginx": "nginx-light", "socat": "socat"}
NEEDS = {  # tools a workload cannot run without (the others use socat only if present)
    "throughput": ("iperf3", "socat"),
    "keepalive": ("wrk", "nginx", "socat"),
    "churn": ("wrk", "nginx", "socat"),
    "egress": ("nginx",),  # its load generator is this file's own
    "conns": (),
    "stall": (),
    "startup": (),
    "idle": (),
}
INSTALL_COMMAND = "apt-get install -y --no-install-recommends iperf3 wrk nginx-light socat"
VSOCK_PORT = 9995  # the walk-through's vsock ports: files in each chain's own folder
VSOCK_PORT_2 = 9994
ENCLAVE_CID = "4"


class BenchError(Exception):
    """The benchmark itself failed (not: qproxy missed a target)."""


class Unsupported(Exception):
    """The qproxy.py measured lacks what a workload measures (an older copy, --qproxy): the workload
    is left out with a note, and the run goes on."""


@dataclasses.dataclass
class Settings:
    runs: int  # measured runs per chain and workload
    scaling_runs: int  # measured runs per chain at the keep-alive levels other than 50 (at most `runs`)
    seconds: int  # length of one iperf3 or wrk run
    warmup: int  # length of the warm-up run
    starts: int  # measured starts per half
    conns: int  # connections held at once
    settle: float  # seconds an idle half is left alone before its RSS is read


QUICK = Settings(runs=3, scaling_runs=3, seconds=2, warmup=1, starts=5, conns=1000, settle=0.5)
FULL = Settings(runs=5, scaling_runs=3, seconds=5, warmup=2, starts=9, conns=1000, settle=1.0)


# ---------------------------------------------------------------------------
# Processes and folders: everything started is stopped, everything made removed
# ---------------------------------------------------------------------------


class Scope:
    """Processes and temporary folders that live until the `with` block ends, however it ends."""

    def __init__(self):
        self.processes: list[subprocess.Popen] = []
        self.folders: list[Path] = []
        self.closers: list[Callable[[], None]] = []

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def folder(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"qproxy-bench-{name}-"))
        self.folders.append(path)
        return path

    def spawn(self, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start argv in its own process group (so forked children go with it), output to log."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        process.log = log  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 3.0) -> None:
        """Signal the process group we started, then kill what is left of it after the grace period."""
        if process.poll() is None:
            signal_group(process.pid, sig)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                signal_group(process.pid, signal.SIGKILL)
                process.wait()
        signal_group(process.pid, signal.SIGKILL)  # forked children (socat) outliving their parent
        if process in self.processes:
            self.processes.remove(process)

    def close(self) -> None:
        for closer in reversed(self.closers):
            closer()
        self.closers.clear()
        for process in reversed(list(self.processes)):
            self.stop(process)
        for path in self.folders:
            shutil.rmtree(path, ignore_errors=True)
        self.folders.clear()


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(process: subprocess.Popen, lines: int = 15) -> str:
    try:
        text = Path(process.log).read_text(errors="replace")  # type: ignore[attr-defined]
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_tool(argv: list[str], timeout: float) -> str:
    """Run a client tool to completion within a deadline; its stdout, or BenchError."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s: {' '.join(argv)}") from None
    if done.returncode != 0 and argv[0] != "iperf3":  # iperf3 -J reports its errors in the JSON
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


# ---------------------------------------------------------------------------
# Sockets and /proc
# ---------------------------------------------------------------------------


PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never the same one twice in a run (the kernel
    may offer a port it just offered again)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in PORTS_HANDED_OUT:
            PORTS_HANDED_OUT.add(port)
            return port


def try_connect(address: tuple | str) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(address)
            return True
        except OSError:
            return False


def is_listening(address: tuple | str) -> bool:
    """Whether a TCP port or Unix socket path is in the listen state, found without connecting to it."""
    if isinstance(address, str):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == address and fields[3] == "00010000":
                return True
        return False
    suffix = f":{address[1]:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == "0A":
                return True
    return False


def wait_until(ready: Callable[[], bool], process: subprocess.Popen | None, what: str,
               timeout: float = 10.0, interval: float = 0.01) -> float:
    """Poll until ready() is true; the perf_counter() when it was.  Fails if the process dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return time.perf_counter()
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what}: exited {process.returncode} before it listened:\n{log_tail(process)}")
        if time.monotonic() > deadline:
            tail = f":\n{log_tail(process)}" if process is not None else ""
            raise BenchError(f"{what}: not listening after {timeout:.0f} s{tail}")
        time.sleep(interval)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB), Threads, and the number of open fds of a process."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            status[key] = int(value.split()[0])
    status["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return status


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# /proc/PID/stat fields after "(comm)": the session, and utime stime cutime cstime
STAT_SESSION, STAT_CPU = 3, slice(11, 15)


def proc_stats() -> list[tuple[int, list[str]]]:
    """Every process's pid and /proc/PID/stat fields after the command name (which may hold spaces)."""
    stats = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            stats.append((int(entry.name), text.rpartition(")")[2].split()))
    return stats


def session_members(leader: int) -> list[int]:
    """The processes of a hop: every hop leads its own session (Scope.spawn), socat's forks included."""
    return [pid for pid, fields in proc_stats() if int(fields[STAT_SESSION]) == leader]


def session_cpu(leaders: list[int]) -> float:
    """CPU seconds (user + system) spent so far by the sessions of these hops: their live processes'
    own time plus what their reaped children spent (socat forks one per connection and reaps them).
    A child that ends between two readings moves from its own line to its parent's cutime/cstime,
    so the difference of two readings is the CPU the hops spent in between."""
    ticks = sum(sum(int(n) for n in fields[STAT_CPU]) for _, fields in proc_stats()
                if int(fields[STAT_SESSION]) in leaders)
    return ticks / CLOCK_TICKS


def session_status(leader: int) -> dict[str, int]:
    """proc_status() summed over a hop's processes (VmRSS counts pages shared by socat's forks in each)."""
    total = {"VmRSS": 0, "VmHWM": 0, "Threads": 0, "fds": 0}
    for pid in session_members(leader):
        try:
            status = proc_status(pid)
        except OSError:  # ended meanwhile
            continue
        for key in total:
            total[key] += status.get(key, 0)
    return total


def raise_fd_limit(wanted: int = 8192) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted * 4))
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        raise BenchError(f"need {wanted} open files, the hard limit is {hard}: raise it (ulimit -Hn)")


# ---------------------------------------------------------------------------
# The chains: direct, the peers, qproxy
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What every workload needs to know: the interpreters, qproxy.py, the settings, the chains."""

    python: str
    peer_python: str  # runs the asyncio and uvloop relays
    qproxy: Path
    settings: Settings
    socat_backlog: int
    tools: dict[str, str]
    uvloop: str | None  # the version peer_python imports, None when it cannot
    chains: tuple[str, ...]  # those this machine can run, in CHAINS order


@dataclasses.dataclass
class Chain:
    name: str
    port: int  # where the client connects
    pids: dict[str, int] = dataclasses.field(default_factory=dict)  # hop ("host", "enclave") -> its session leader
    logs: dict[str, Path] = dataclasses.field(default_factory=dict)  # hop -> its output (the egress row reads them)


def qproxy_env(vsock_dir: Path, rust_log: str | None = "warn") -> dict:
    env = dict(os.environ, QPROXY_VSOCK_EMULATION=str(vsock_dir))
    env.pop("RUST_LOG", None)
    if rust_log:
        env["RUST_LOG"] = rust_log
    return env


def spawn_halves(ctx: Context, scope: Scope, name: str,
                 config_text: str) -> tuple[Path, subprocess.Popen, subprocess.Popen]:
    """Both halves of qproxy started with this config, over emulated vsock in a folder of their own:
    that vsock folder, the enclave half, the host half (not yet listening)."""
    folder = scope.folder(name)
    vsock_dir = folder / "vsock"
    vsock_dir.mkdir()
    config = folder / "bench.toml"
    config.write_text(config_text)
    env = qproxy_env(vsock_dir)
    enclave = scope.spawn([ctx.python, str(ctx.qproxy), "enclave", "--config", str(config)], folder / "enclave.log", env)
    host = scope.spawn([ctx.python, str(ctx.qproxy), "host", "--config", str(config), ENCLAVE_CID],
                       folder / "host.log", env)
    return vsock_dir, enclave, host


def start_qproxy(ctx: Context, scope: Scope, target_port: int) -> Chain:
    """host half on a free port -> emulated vsock -> enclave half -> 127.0.0.1:target_port."""
    port = free_port()
    vsock_dir, enclave, host = spawn_halves(
        ctx, scope, "qproxy",
        f"[[inbound_connections]]\nhost_port = {port}\nenclave_port = {target_port}\nvsock_port = {VSOCK_PORT}\n")
    wait_until(lambda: is_listening(str(vsock_dir / str(VSOCK_PORT))), enclave, "qproxy enclave half")
    wait_until(lambda: is_listening(("127.0.0.1", port)), host, "qproxy host half")
    return Chain("qproxy", port, {"host": host.pid, "enclave": enclave.pid})


def socat_listen_options(ctx: Context) -> str:
    return f",backlog={ctx.socat_backlog}" if ctx.socat_backlog else ""


def peer_hops(ctx: Context, name: str, port: int, path: str, target_port: int) -> dict[str, list[str]]:
    """The argv of a peer's two hops: host (127.0.0.1:port -> Unix socket path), enclave (path -> target_port)."""
    if name in SOCATS:
        socat = [ctx.tools["socat"]] + (["-b", str(SOCAT_BEST_BUFFER)] if name == "socat-256k" else [])
        backlog = socat_listen_options(ctx)
        return {"host": socat + [f"TCP-LISTEN:{port},fork,reuseaddr{backlog}", f"UNIX-CONNECT:{path}"],
                "enclave": socat + [f"UNIX-LISTEN:{path},fork{backlog}", f"TCP:127.0.0.1:{target_port}"]}
    relay = [ctx.peer_python, str(RELAY)] + (["--uvloop"] if name == "uvloop" else [])
    return {"host": relay + [f"tcp:127.0.0.1:{port}", f"unix:{path}"],
            "enclave": relay + [f"unix:{path}", f"tcp:127.0.0.1:{target_port}"]}


def start_peer(ctx: Context, scope: Scope, name: str, target_port: int) -> Chain:
    """A peer's enclave hop on a Unix socket, then its host hop on a free port, both listening."""
    folder = scope.folder(name)
    path, port = str(folder / "vsock"), free_port()
    hops = peer_hops(ctx, name, port, path, target_port)
    enclave = scope.spawn(hops["enclave"], folder / "enclave.log")
    host = scope.spawn(hops["host"], folder / "host.log")
    wait_until(lambda: is_listening(path), enclave, f"{name} enclave hop")
    wait_until(lambda: is_listening(("127.0.0.1", port)), host, f"{name} host hop")
    return Chain(name, port, {"host": host.pid, "enclave": enclave.pid})


def start_chains(ctx: Context, scope: Scope, target_port: int, names: tuple[str, ...] | None = None) -> list[Chain]:
    """The chains named (by default every one this machine can run), all reaching 127.0.0.1:target_port."""
    chains = []
    for name in names or ctx.chains:
        if name == "direct":
            chains.append(Chain("direct", target_port))
        elif name == "qproxy":
            chains.append(start_qproxy(ctx, scope, target_port))
        else:
            chains.append(start_peer(ctx, scope, name, target_port))
    return chains


def relayed(ctx: Context) -> tuple[str, ...]:
    """The chains with hops to measure: all but direct."""
    return tuple(name for name in ctx.chains if name != "direct")


def interleave(chains: list[Chain], runs: int, once: Callable[[Chain], dict]) -> dict[str, list[dict]]:
    """`runs` rounds over all chains, a different one first each round, so drift hits them all alike."""
    results: dict[str, list[dict]] = {chain.name: [] for chain in chains}
    for turn in range(runs):
        shift = turn % len(chains)
        for chain in chains[shift:] + chains[:shift]:
            results[chain.name].append(once(chain))
            time.sleep(0.3)  # let forked children and closing sockets settle between runs
    return results


def quiet_cpu(leaders: list[int], timeout: float = 10.0) -> float:
    """session_cpu() once each hop is down to its own process.  While a fork is being reaped, a read
    of /proc can miss its CPU (the parent read before the reaping, the child after) or count it twice."""
    deadline = time.monotonic() + timeout
    while any(len(session_members(leader)) > 1 for leader in leaders) and time.monotonic() < deadline:
        time.sleep(0.05)
    return session_cpu(leaders)


def with_cpu(chain: Chain, run: Callable[[], dict]) -> dict:
    """run()'s result plus "cpu": the CPU seconds both hops spent on it, closing its connections
    included (None for direct)."""
    leaders = list(chain.pids.values())
    before = quiet_cpu(leaders)
    result = run()
    result["cpu"] = quiet_cpu(leaders) - before if leaders else None
    return result


def rounds(ctx: Context, chains: list[Chain], once: Callable[[Chain, int], dict],
           warmup: bool = True, runs: int | None = None) -> dict[str, list[dict]]:
    """A warm-up run on each chain (unless they are warm already), then interleaved measured runs
    (by default settings.runs), each with its CPU cost."""
    if warmup:
        for chain in chains:
            once(chain, ctx.settings.warmup)
    return interleave(chains, runs or ctx.settings.runs,
                      lambda chain: with_cpu(chain, lambda: once(chain, ctx.settings.seconds)))


# ---------------------------------------------------------------------------
# Figures: medians, ratios, targets
# ---------------------------------------------------------------------------


def summary(values: list) -> dict:
    numbers = [value for value in values if value is not None]
    return {
        "median": statistics.median(numbers) if numbers else None,
        "min": min(numbers) if numbers else None,
        "max": max(numbers) if numbers else None,
        "runs": values,
    }


def median_of(figure: dict, chain: str) -> float | None:
    return figure[chain]["median"] if figure.get(chain) else None


def make_figure(label: str, unit: str, runs: dict[str, list], target: str = "",
                check: Callable[[dict], bool] | None = None, decimals: int = 1, higher: bool = False) -> dict:
    """One row of the table: each chain's runs summarised, qproxy's ratio to every other chain and to
    the best peer, and the target met or not.  higher: more is better (rates); else less (costs, times)."""
    figure: dict = {"label": label, "unit": unit, "decimals": decimals, "higher_is_better": higher}
    for chain in CHAINS:
        figure[chain] = summary(runs[chain]) if chain in runs else None
    ours = median_of(figure, "qproxy")
    medians = {chain: median for chain in CHAINS if chain != "qproxy" and (median := median_of(figure, chain))}
    figure["ratios"] = {chain: ours / median for chain, median in medians.items()} if ours is not None else {}
    peers = [chain for chain in PEERS if chain in medians]
    figure["best_peer"] = (max if higher else min)(peers, key=medians.__getitem__) if peers else None
    figure["qproxy_best"] = figure["ratios"].get(figure["best_peer"])
    figure["target"] = target
    figure["met"] = None
    if check is not None and figure["qproxy"] is not None:
        try:
            figure["met"] = bool(check(figure))
        except (TypeError, KeyError):  # a value the check needs is missing
            figure["met"] = False
    return figure


def versus(peer: str, factor: float, higher: bool) -> tuple[str, Callable[[dict], bool]]:
    """A target on qproxy's median as a multiple of one peer's: at least factor (rates) or at most (costs)."""
    if higher:
        return f">= {factor:g}x {peer}", lambda f: f["ratios"][peer] >= factor
    return f"<= {factor:g}x {peer}", lambda f: f["ratios"][peer] <= factor


def column(results: dict[str, list[dict]], key: str) -> dict[str, list]:
    return {chain: [run[key] for run in runs] for chain, runs in results.items()}


def cpu_per(results: dict[str, list[dict]], work: Callable[[dict], float]) -> dict[str, list]:
    """Each relayed chain's CPU seconds per unit of work (work(run) units in that run), run by run."""
    return {chain: [run["cpu"] / work(run) for run in runs]
            for chain, runs in results.items() if runs and runs[0]["cpu"] is not None}


# ---------------------------------------------------------------------------
# Workload: single-stream throughput (iperf3)
# ---------------------------------------------------------------------------


def iperf3_once(ctx: Context, chain: Chain, seconds: int) -> dict:
    argv = [ctx.tools["iperf3"], "-c", "127.0.0.1", "-p", str(chain.port), "-t", str(seconds), "-J",
            "--connect-timeout", "5000"]
    for attempt in range(3):
        report = json.loads(run_tool(argv, timeout=seconds + 30) or "{}")
        error = report.get("error")
        if not error:
            received = report["end"]["sum_received"]
            return {"gbps": received["bits_per_second"] / 1e9, "bytes": received["bytes"]}
        if "busy" not in error:  # the server still closing the last test: try again
            break
        time.sleep(0.5)
    raise BenchError(f"iperf3 through {chain.name}: {error}")


def run_throughput(ctx: Context, scope: Scope) -> dict:
    folder = scope.folder("iperf3")
    port = free_port()
    server = scope.spawn([ctx.tools["iperf3"], "-s", "-B", "127.0.0.1", "-p", str(port)], folder / "iperf3.log")
    wait_until(lambda: is_listening(("127.0.0.1", port)), server, "iperf3 server")
    chains = start_chains(ctx, scope, port)
    results = rounds(ctx, chains, lambda chain, seconds: iperf3_once(ctx, chain, seconds))
    figures = {
        "throughput": make_figure("throughput, 1 stream", "Gbit/s", column(results, "gbps"),
                                  *versus("socat-256k", 1.15, higher=True), decimals=2, higher=True),
        "throughput_cpu": make_figure("CPU per GB moved, both hops", "s",
                                      cpu_per(results, lambda run: run["bytes"] / 1e9),
                                      *versus("socat-256k", 0.8, higher=False), decimals=2),
    }
    figures["throughput"]["raw"] = results
    return figures


# ---------------------------------------------------------------------------
# Workloads: keep-alive and churn (wrk against nginx)
# ---------------------------------------------------------------------------


def nginx_config(folder: Path, port: int, nginx: str) -> str:
    """A minimal nginx: one worker, no access log, "Hello world!", keep-alive kept alive."""
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    temp_paths = "".join(
        f"    {name}_temp_path {folder}/{name}_temp;\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if name == "client_body" or f"--without-http_{name}_module" not in built
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # else the workers would drop to nobody
    return (
        f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}error_log stderr warn;\n"
        f"pid {folder}/nginx.pid;\n"
        "events { worker_connections 4096; }\n"
        "http {\n    access_log off;\n"
        f"{temp_paths}"
        "    keepalive_requests 1000000;\n    keepalive_timeout 75s;\n"
        f"    server {{\n        listen 127.0.0.1:{port} backlog=1024;\n"
        '        location / { return 200 "Hello world!"; }\n    }\n}\n'
    )


def start_nginx(ctx: Context, scope: Scope) -> int:
    folder = scope.folder("nginx")
    port = free_port()
    (folder / "nginx.conf").write_text(nginx_config(folder, port, ctx.tools["nginx"]))
    server = scope.spawn([ctx.tools["nginx"], "-p", str(folder), "-e", "stderr", "-c", str(folder / "nginx.conf")],
                         folder / "nginx.log")
    wait_until(lambda: is_listening(("127.0.0.1", port)), server, "nginx")
    return port


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(output: str) -> dict:
    """Requests/sec, the 50/90/99 % latency lines (ms) and the error counts of wrk --latency."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    done = re.search(r"^\s*(\d+) requests in", output, re.M)
    if not rate or not done:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    result = {"rate": float(rate.group(1)), "requests": int(done.group(1))}
    for percent, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M):
        result[f"p{percent}"] = float(value) * UNITS_MS[unit]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["errors"] = sum(int(n) for n in errors.groups()) if errors else 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["errors"] += int(non_2xx.group(1)) if non_2xx else 0
    return result


def wrk_once(ctx: Context, chain: Chain, seconds: int, connections: int = 50, close: bool = False) -> dict:
    threads = 1 if connections == 1 else 2
    argv = [ctx.tools["wrk"], f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    output = run_tool(argv + [f"http://127.0.0.1:{chain.port}/"], timeout=seconds + 30)
    result = parse_wrk(output)
    if result["requests"] == 0:
        raise BenchError(f"wrk through {chain.name}: no request completed in {seconds} s:\n{output}")
    return result


def per_request(run: dict) -> float:
    """A wrk run's requests in millions: CPU seconds per million requests are microseconds per request."""
    return run["requests"] / 1e6


def run_keepalive(ctx: Context, scope: Scope) -> dict:
    """wrk at each of KEEPALIVE_CONNECTIONS, the chains interleaved at each; warmed up once, before the
    first.  50 connections, which carries the targets, gets the full count of runs."""
    chains = start_chains(ctx, scope, start_nginx(ctx, scope))
    figures = {}
    for connections in KEEPALIVE_CONNECTIONS:
        results = rounds(ctx, chains, lambda chain, seconds, c=connections: wrk_once(ctx, chain, seconds, c),
                         warmup=connections == KEEPALIVE_CONNECTIONS[0],
                         runs=ctx.settings.runs if connections == 50 else ctx.settings.scaling_runs)
        figures.update(keepalive_figures(connections, results))
    return figures


def keepalive_figures(connections: int, results: dict[str, list[dict]]) -> dict:
    """Requests/s and CPU per request at this many connections; at 50 the latencies too, and the targets."""
    key = f"keepalive_c{connections}"
    target = versus("asyncio", 1.25, higher=True) if connections == 50 else ("", None)
    figures = {f"{key}_rate": make_figure(f"keep-alive c{connections}", "req/s", column(results, "rate"),
                                          *target, decimals=0, higher=True)}
    if connections == 50:
        for percent in (50, 90, 99):
            target = versus("asyncio", 1, higher=False) if percent == 99 else ("", None)
            figures[f"{key}_p{percent}"] = make_figure(f"keep-alive c{connections} latency p{percent}", "ms",
                                                       column(results, f"p{percent}"), *target, decimals=2)
    figures[f"{key}_cpu"] = make_figure(f"keep-alive c{connections}: CPU per request", "us",
                                        cpu_per(results, per_request))
    figures[f"{key}_rate"]["errors"] = column(results, "errors")
    figures[f"{key}_rate"]["raw"] = results
    return figures


def run_churn(ctx: Context, scope: Scope) -> dict:
    chains = start_chains(ctx, scope, start_nginx(ctx, scope))
    results = rounds(ctx, chains, lambda chain, seconds: wrk_once(ctx, chain, seconds, close=True))
    # The target is set against uvloop, the fastest peer at accepting; without it, against asyncio.
    peer = "uvloop" if "uvloop" in ctx.chains else "asyncio"
    target, check = versus(peer, 1.1, higher=True)
    if peer != "uvloop":
        target += " (uvloop absent)"
    rate = make_figure("churn, Connection: close", "conn/s", column(results, "rate"), target, check,
                       decimals=0, higher=True)
    rate["errors"] = column(results, "errors")
    rate["raw"] = results
    return {
        "churn_rate": rate,
        "churn_p99": make_figure("churn latency p99", "ms", column(results, "p99"), decimals=2),
        "churn_cpu": make_figure("churn: CPU per connection", "us", cpu_per(results, per_request)),
    }


# ---------------------------------------------------------------------------
# Workload: the egress proxy (HTTP CONNECT) against an outbound entry, a new connection per request
# ---------------------------------------------------------------------------


LOAD_PROCESSES = 2  # load-generator processes: one Python loop alone would cap the rate before the halves do
LOAD_CONNECTIONS = 50  # requests in flight at once over all of them, as churn's wrk -c50
LOAD_DRAIN = 10.0  # seconds the requests in flight at the end of a run get to finish
HELLO = b"Hello world!"  # the body of nginx's every reply (nginx_config)


def check_egress_support(ctx: Context, scope: Scope) -> None:
    """Unsupported when the qproxy.py measured predates [egress] (`--qproxy` an older copy): its check-config
    rejects the table by name.  Any other problem shows when the halves start."""
    config = scope.folder("egress-check") / "egress.toml"
    config.write_text('[egress]\nproxy_port = 3128\nvsock_port = 8000\nallow = ["127.0.0.0/8"]\n')
    done = subprocess.run([ctx.python, str(ctx.qproxy), "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if done.returncode != 0 and "unknown key 'egress'" in done.stderr + done.stdout:
        raise Unsupported("this qproxy.py has no [egress] table")


def start_qproxy_egress(ctx: Context, scope: Scope, upstream: int) -> list[Chain]:
    """One pair of halves that reaches 127.0.0.1:upstream both ways, so the two are compared like for like:
    an outbound entry (the enclave half listens on a port of its own for it) and an [egress] table whose
    CONNECT proxy may reach that port (a 127.0.0.x target needs an address rule, loopback being a
    special-purpose range).  The chains "outbound" and "egress", whose hops are the same two processes."""
    outbound_port, proxy_port = free_port(), free_port()
    vsock_dir, enclave, host = spawn_halves(
        ctx, scope, "qproxy-egress",
        f'[[outbound_connections]]\nhostname = "127.0.0.1"\ntcp_port = {upstream}\n'
        f"enclave_port = {outbound_port}\nvsock_port = {VSOCK_PORT}\n\n"
        f'[egress]\nproxy_port = {proxy_port}\nvsock_port = {VSOCK_PORT_2}\nallow = ["127.0.0.0/8:{upstream}"]\n')
    for vsock_port in (VSOCK_PORT, VSOCK_PORT_2):
        wait_until(lambda: is_listening(str(vsock_dir / str(vsock_port))), host, "qproxy host half")
    for port in (outbound_port, proxy_port):
        wait_until(lambda: is_listening(("127.0.0.1", port)), enclave, "qproxy enclave half")
    pids = {"host": host.pid, "enclave": enclave.pid}
    logs = {"host": host.log, "enclave": enclave.log}  # type: ignore[attr-defined]
    return [Chain("outbound", outbound_port, pids, logs), Chain("egress", proxy_port, pids, logs)]


@dataclasses.dataclass
class Exchange:
    """One request on its own connection, as the load generator's loop carries it."""

    sock: socket.socket
    tunnelling: bool  # a CONNECT sent, its answer not read yet
    received: bytearray = dataclasses.field(default_factory=bytearray)


class LoadGenerator:
    """`connections` requests in flight at once, each on a new connection to 127.0.0.1:port, each reply read
    to its EOF (Connection: close).  With tunnel, each first asks the proxy on port for a tunnel to
    127.0.0.1:upstream and reads its 200, as a client behind HTTPS_PROXY does; else it sends the GET at once.
    One selector loop in one process: no threads, so the GIL costs nothing."""

    def __init__(self, port: int, upstream: int, tunnel: bool, connections: int):
        self.address = ("127.0.0.1", port)
        self.tunnel = tunnel
        self.connections = connections
        target = f"127.0.0.1:{upstream}"
        self.connect = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        self.get = f"GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()
        self.selector = selectors.DefaultSelector()
        self.end = 0.0
        self.counts = {"in_time": 0, "requests": 0, "errors": 0, "first_error": None}

    def run(self, seconds: float) -> dict:
        """Requests completed within `seconds` (in_time: the rate) and in all (requests: the CPU the halves
        spent includes those in flight at the end, let finish), errors, and this process's CPU seconds."""
        cpu = time.process_time()
        self.end = time.perf_counter() + seconds
        for _ in range(self.connections):
            self.open()
        deadline = self.end + LOAD_DRAIN
        while self.selector.get_map() and time.perf_counter() < deadline:
            for key, events in self.selector.select(0.1):
                self.ready(key.data, events)
        for key in list(self.selector.get_map().values()):
            self.fail(key.data, f"no reply {LOAD_DRAIN:.0f} s after the run ended")
        self.selector.close()
        return dict(self.counts, seconds=seconds, cpu=time.process_time() - cpu)

    def open(self) -> None:
        """A new connection, unless the run is over; its first bytes go once the connect is done.  A connect
        that fails at once (no port left, say) is counted and tried again, so the load stays as it was."""
        while time.perf_counter() < self.end:
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as curl does: no Nagle delay
            status = sock.connect_ex(self.address)
            if status in (0, errno.EINPROGRESS):
                self.selector.register(sock, selectors.EVENT_WRITE, Exchange(sock, self.tunnel))
                return
            sock.close()
            self.count_error(f"connect: {os.strerror(status)}")

    def ready(self, exchange: Exchange, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self.connected(exchange)
        elif exchange.tunnelling:
            self.read_answer(exchange)
        else:
            self.read_reply(exchange)

    def connected(self, exchange: Exchange) -> None:
        status = exchange.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status:
            self.fail(exchange, f"connect: {os.strerror(status)}")
            return
        if self.send(exchange, self.connect if exchange.tunnelling else self.get):
            self.selector.modify(exchange.sock, selectors.EVENT_READ, exchange)

    def send(self, exchange: Exchange, data: bytes) -> bool:
        """A request of a few dozen bytes into an empty send buffer goes whole, or the exchange fails."""
        try:
            sent = exchange.sock.send(data)
        except OSError as error:
            self.fail(exchange, f"send: {error}")
            return False
        if sent != len(data):
            self.fail(exchange, f"send: {sent} of {len(data)} bytes")
            return False
        return True

    def receive(self, exchange: Exchange) -> bytes | None:
        """What the socket has (b"" at EOF); None when nothing yet or when the exchange failed."""
        try:
            return exchange.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as error:
            self.fail(exchange, f"recv: {error}")
            return None

    def read_answer(self, exchange: Exchange) -> None:
        """The proxy's answer to the CONNECT: on its 200, the GET goes through the tunnel."""
        data = self.receive(exchange)
        if data is None:
            return
        if not data:
            self.fail(exchange, "the proxy closed before it answered the CONNECT")
            return
        exchange.received += data
        head, found, rest = exchange.received.partition(b"\r\n\r\n")
        if not found:
            return
        if not head.startswith(b"HTTP/1.1 200"):
            status_line = bytes(head.partition(b"\r")[0])
            self.fail(exchange, f"the proxy answered {status_line!r}")
            return
        exchange.tunnelling = False
        exchange.received = bytearray(rest)  # none expected: nginx says nothing before the GET
        self.send(exchange, self.get)

    def read_reply(self, exchange: Exchange) -> None:
        data = self.receive(exchange)
        if data:
            exchange.received += data
            return
        if data is None:
            return
        if not (exchange.received.startswith(b"HTTP/1.1 200") and exchange.received.endswith(HELLO)):
            self.fail(exchange, f"reply {bytes(exchange.received[:60])!r}")
            return
        self.close(exchange)
        self.counts["requests"] += 1
        self.counts["in_time"] += time.perf_counter() < self.end
        self.open()

    def fail(self, exchange: Exchange, why: str) -> None:
        self.close(exchange)
        self.count_error(why)
        self.open()

    def count_error(self, why: str) -> None:
        self.counts["errors"] += 1
        self.counts["first_error"] = self.counts["first_error"] or why

    def close(self, exchange: Exchange) -> None:
        self.selector.unregister(exchange.sock)
        exchange.sock.close()


def load_process(port: int, upstream: int, tunnel: bool, connections: int, seconds: float, results) -> None:
    """The body of one load-generator process: its counts go back through results (a Pipe's end)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bench's to handle: it stops this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # and by SIGTERM, which should end it without a traceback
    results.send(LoadGenerator(port, upstream, tunnel, connections).run(seconds))
    results.close()


def generate_load(port: int, upstream: int, tunnel: bool, seconds: float) -> dict:
    """LOAD_CONNECTIONS requests in flight over LOAD_PROCESSES forked processes: their counts summed, the rate
    over the run's length, and how busy they were (1.0: every process used a whole CPU all along)."""
    forked = multiprocessing.get_context("fork")  # the loop's code as it is, without importing this file again
    workers = []
    try:
        for share in range(LOAD_PROCESSES):
            connections = LOAD_CONNECTIONS // LOAD_PROCESSES + (share < LOAD_CONNECTIONS % LOAD_PROCESSES)
            receiver, sender = forked.Pipe(duplex=False)
            worker = forked.Process(target=load_process, args=(port, upstream, tunnel, connections, seconds, sender),
                                    daemon=True)
            worker.start()
            sender.close()
            workers.append((worker, receiver))
        counts = [load_result(worker, receiver, seconds + LOAD_DRAIN + 30) for worker, receiver in workers]
    finally:
        for worker, receiver in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(5)
            receiver.close()
    total = {key: sum(count[key] for count in counts) for key in ("in_time", "requests", "errors", "cpu")}
    return {"rate": total["in_time"] / seconds, "requests": total["requests"], "errors": total["errors"],
            "first_error": next((count["first_error"] for count in counts if count["first_error"]), None),
            "client_busy": total["cpu"] / (seconds * LOAD_PROCESSES)}


def load_result(worker: multiprocessing.Process, receiver, timeout: float) -> dict:
    try:
        if receiver.poll(timeout):
            return receiver.recv()
    except EOFError:
        pass
    raise BenchError(f"a load-generator process gave no result within {timeout:.0f} s (exit code {worker.exitcode})")


def load_once(chain: Chain, seconds: int, upstream: int) -> dict:
    """One run of the load generator through the chain: CONNECT first on "egress", straight on the others."""
    result = generate_load(chain.port, upstream, chain.name == "egress", seconds)
    if result["requests"] == 0:
        raise BenchError(f"no request completed through {chain.name} in {seconds} s: {result['first_error']}")
    return result


def relative_to(figure: dict, reference: dict, name: str) -> None:
    """figure's qproxy median over reference's, shown in the ratio column in place of the best peer: the
    same load another way through the same halves."""
    ours, theirs = median_of(figure, "qproxy"), median_of(reference, "qproxy")
    figure["relative_to"] = {"name": name, "ratio": ours / theirs if ours and theirs else None}


def log_lines(chain: Chain) -> dict[str, list[str]]:
    """What each half logged (RUST_LOG=warn: its warnings and errors), the last 20 lines."""
    return {role: Path(log).read_text(errors="replace").splitlines()[-20:] for role, log in chain.logs.items()}


def run_egress(ctx: Context, scope: Scope) -> dict:
    """The same load generator against nginx straight (its own ceiling), through an outbound entry, and
    through the egress proxy's CONNECT, one tunnel per request: requests/s and CPU of both halves per request.
    The CONNECT rows' ratio is to the outbound entry's: what a destination costs when the rules, not an
    entry of its own, let the enclave reach it."""
    check_egress_support(ctx, scope)
    upstream = start_nginx(ctx, scope)
    chains = [Chain("direct", upstream), *start_qproxy_egress(ctx, scope, upstream)]
    results = rounds(ctx, chains, lambda chain, seconds: load_once(chain, seconds, upstream))
    rates, errors, busy = column(results, "rate"), column(results, "errors"), column(results, "client_busy")
    cpu = cpu_per(results, per_request)
    ways = {"egress": ("CONNECT", "a new tunnel per request"),
            "outbound": ("outbound entry", "a new connection per request")}
    figures = {}
    for way, (name, each) in ways.items():
        rate = make_figure(f"egress: {name}, {each}", "req/s", {"direct": rates["direct"], "qproxy": rates[way]},
                           decimals=0, higher=True)
        rate["errors"] = {"direct": errors["direct"], "qproxy": errors[way]}
        rate["client_busy"] = {"direct": busy["direct"], "qproxy": busy[way]}
        rate["raw"] = {"direct": results["direct"], "qproxy": results[way]}
        figures[f"egress_{way}_rate"] = rate
    for way, (name, _) in ways.items():
        figures[f"egress_{way}_cpu"] = make_figure(f"egress: {name}: CPU per request", "us", {"qproxy": cpu[way]})
    relative_to(figures["egress_egress_rate"], figures["egress_outbound_rate"], "outbound")
    relative_to(figures["egress_egress_cpu"], figures["egress_outbound_cpu"], "outbound")
    figures["egress_egress_rate"]["log"] = log_lines(chains[-1])
    return figures


# ---------------------------------------------------------------------------
# Workload: 1,000 concurrent idle connections
# ---------------------------------------------------------------------------


GREETING = b"+"
PARTIAL_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n"  # never finished: the connection stays idle


class LoopbackServer(threading.Thread):
    """A selector loop on a loopback port: ready(key, events) serves a connection, accepted(conn) takes a new one."""

    def __init__(self):
        super().__init__(daemon=True)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)

    def run(self) -> None:
        while not self.stopping.is_set():
            for key, events in self.selector.select(0.1):
                if key.fileobj is self.listener:
                    self.accept_all()
                else:
                    self.ready(key, events)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()

    def accept_all(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self.accepted(conn)

    def accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def ready(self, key: selectors.SelectorKey, events: int) -> None:
        raise NotImplementedError

    def drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


class HoldServer(LoopbackServer):
    """Accepts connections, greets each with one byte, reads and drops what comes, closes on EOF."""

    def accepted(self, conn: socket.socket) -> None:
        conn.send(GREETING)
        self.selector.register(conn, selectors.EVENT_READ)

    def ready(self, key: selectors.SelectorKey, events: int) -> None:
        conn = key.fileobj
        try:
            if conn.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.drop(conn)


def open_held(port: int, count: int, deadline: float) -> list[socket.socket]:
    """Open count connections, each with a partial request, and wait for every server greeting."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(sock)
            sock.sendall(PARTIAL_REQUEST)
            if time.monotonic() > deadline:
                raise BenchError(f"opened only {len(held)} of {count} connections in time")
        for sock in held:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            if sock.recv(1) != GREETING:
                raise BenchError("a held connection was closed before the server greeted it")
    except (OSError, BenchError) as error:
        close_all(held)
        raise BenchError(f"holding {count} connections: {error}") from None
    return held


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()
    socks.clear()


def hop_status(pids: dict[str, int]) -> dict[str, dict]:
    return {role: session_status(pid) for role, pid in pids.items()}


def settled(pids: dict[str, int], timeout: float = 10.0) -> dict[str, dict]:
    """Each hop's status once its fd and thread counts hold still for half a second."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        now = hop_status(pids)
        counts = {role: (s["fds"], s["Threads"]) for role, s in now.items()}
        if counts == last or time.monotonic() > deadline:
            return now
        last = counts
        time.sleep(0.5)


def wait_released(pids: dict[str, int], baseline: dict[str, dict], timeout: float = 15.0) -> dict[str, float | None]:
    """Seconds until each hop's fds and threads are back at (or under) baseline; None if never."""
    start = time.perf_counter()
    released: dict[str, float | None] = {role: None for role in pids}
    while time.perf_counter() - start < timeout:
        for role, pid in pids.items():
            if released[role] is None:
                status = session_status(pid)
                if status["fds"] <= baseline[role]["fds"] and status["Threads"] <= baseline[role]["Threads"]:
                    released[role] = time.perf_counter() - start
        if None not in released.values():
            break
        time.sleep(0.02)
    return released


def hold_once(chain: Chain, count: int, baseline: dict[str, dict], settle: float) -> dict:
    """Hold count connections through the chain and sample its hops (the peak), close them, time the
    release, and read the hops' RSS once released and left alone for `settle` seconds (the after)."""
    held = open_held(chain.port, count, time.monotonic() + 60)
    try:
        peak = {role: {"VmRSS": 0, "Threads": 0, "fds": 0} for role in chain.pids}
        both = 0
        for _ in range(6):
            now = hop_status(chain.pids)
            for role, status in now.items():
                for key in peak[role]:
                    peak[role][key] = max(peak[role][key], status[key])
            both = max(both, sum(status["VmRSS"] for status in now.values()))
            time.sleep(0.1)
    finally:
        close_all(held)
    released = wait_released(chain.pids, baseline)
    time.sleep(settle)
    after = sum(status["VmRSS"] for status in hop_status(chain.pids).values())
    result = {"rss": both / 1024, "after_rss": after / 1024}
    for role in chain.pids:
        result[f"{role}_rss"] = peak[role]["VmRSS"] / 1024
        result[f"{role}_threads"] = peak[role]["Threads"]
        result[f"{role}_fds"] = peak[role]["fds"]
        result[f"{role}_released"] = released[role]
    return result


def run_conns(ctx: Context, scope: Scope) -> dict:
    server = HoldServer()
    server.start()
    scope.closers.append(server.stop)
    count = ctx.settings.conns
    raise_fd_limit(count * 3)
    chains = start_chains(ctx, scope, server.port, relayed(ctx))
    baselines = {}
    for chain in chains:
        close_all(open_held(chain.port, 100, time.monotonic() + 30))  # warm-up
        baselines[chain.name] = settled(chain.pids)
    results = interleave(chains, ctx.settings.runs,
                         lambda chain: hold_once(chain, count, baselines[chain.name], ctx.settings.settle))
    figures = {
        "conns_rss": make_figure(f"{count} conns: peak RSS, both hops", "MB", column(results, "rss"),
                                 "lowest of all", lambda f: f["qproxy_best"] < 1),
        "conns_after_rss": make_figure(f"{count} conns: RSS after, both hops", "MB", column(results, "after_rss")),
    }
    for role in ("host", "enclave"):
        figures[f"conns_{role}_rss"] = make_figure(
            f"{count} conns: {role} peak RSS", "MB", column(results, f"{role}_rss"), "< 100 MB",
            lambda f: f["qproxy"]["max"] < 100)
        figures[f"conns_{role}_threads"] = make_figure(
            f"{count} conns: {role} peak threads", "", column(results, f"{role}_threads"), decimals=0)
        figures[f"conns_{role}_threads"]["peak_fds"] = column(results, f"{role}_fds")
        figures[f"conns_{role}_released"] = make_figure(
            f"{count} conns: {role} fds+threads freed", "s", column(results, f"{role}_released"), "all, every run",
            lambda f: None not in f["qproxy"]["runs"], decimals=2)
        figures[f"conns_{role}_released"]["none_means"] = "NOT FREED"
        figures[f"conns_{role}_released"]["baseline"] = {name: status[role] for name, status in baselines.items()}
    return figures


# ---------------------------------------------------------------------------
# Workload: 1,000 stalled peers while 1,000 others transfer (the memory ceiling)
# ---------------------------------------------------------------------------


STALLED = b"S"  # the client's first byte: it will never read
ACTIVE = b"A"  # the client's first byte: it reads everything to EOF
SENT_TO = {STALLED: 1024 * 1024, ACTIVE: 256 * 1024}  # bytes the server sends each kind
PAYLOAD = memoryview(b"x" * max(SENT_TO.values()))
STALLED_RCVBUF = 4096  # a stalled client's receive buffer: the bytes pile up in the proxy, not in it
ACTIVE_AT_ONCE = 20  # 1,000 stalled + 20 stays under qproxy's 1,024 connections per direction (-t)


@dataclasses.dataclass
class Peer:
    """One server-side connection: what its client said it is, and how much it has been sent."""

    kind: bytes | None = None
    sent: int = 0


class StallServer(HoldServer):
    """Reads one byte from each connection: a stalled one is sent 1 MiB as fast as its socket takes
    it and kept open; an active one is sent 256 KiB, half-closed, and closed on the client's EOF.
    Clients send nothing after their first byte: anything readable later is their end."""

    def __init__(self):
        super().__init__()
        self.stalled = 0  # stalled clients that have said so
        self.stalled_sent = 0  # bytes sent to them so far

    def accepted(self, conn: socket.socket) -> None:
        self.selector.register(conn, selectors.EVENT_READ, Peer())

    def ready(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data.kind is None:
            self.identify(key.fileobj, key.data)
            return
        if events & selectors.EVENT_WRITE:
            self.send(key.fileobj, key.data)
        if events & selectors.EVENT_READ and key.fileobj.fileno() >= 0:  # not dropped by send()
            super().ready(key, events)

    def identify(self, conn: socket.socket, peer: Peer) -> None:
        """The client's first byte says what it is; from then on the server sends to it."""
        try:
            kind = conn.recv(1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            kind = b""
        if kind not in SENT_TO:
            self.drop(conn)
            return
        peer.kind = kind
        if kind == STALLED:
            self.stalled += 1
        self.selector.modify(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)

    def send(self, conn: socket.socket, peer: Peer) -> None:
        """As much as the socket takes; once all is out, an active peer is half-closed."""
        try:
            sent = conn.send(PAYLOAD[peer.sent:SENT_TO[peer.kind]])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(conn)
            return
        peer.sent += sent
        if peer.kind == STALLED:
            self.stalled_sent += sent
        if peer.sent == SENT_TO[peer.kind]:
            if peer.kind == ACTIVE:
                conn.shutdown(socket.SHUT_WR)
            self.selector.modify(conn, selectors.EVENT_READ, peer)


class PeakSampler:
    """The highest VmRSS and VmHWM (kB) of each half seen so far, read at most every interval seconds."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05):
        self.pids = pids
        self.interval = interval
        self.last = 0.0
        self.peak = {role: 0 for role in pids}

    def sample(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < self.interval:
            return
        self.last = time.monotonic()
        for role, pid in self.pids.items():
            status = proc_status(pid)
            self.peak[role] = max(self.peak[role], status["VmRSS"], status["VmHWM"])


def open_stalled(port: int, count: int, deadline: float) -> list[socket.socket]:
    """Open count clients with a small receive buffer that say they are stalled and never read."""
    stalled: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            stalled.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)  # before connect: it sets the window
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            sock.sendall(STALLED)
            if time.monotonic() > deadline:
                raise BenchError(f"opened only {len(stalled)} of {count} stalled connections in time")
    except (OSError, BenchError) as error:
        close_all(stalled)
        raise BenchError(f"opening {count} stalled connections: {error}") from None
    return stalled


def wait_piled_up(server: StallServer, count: int, sampler: PeakSampler, deadline: float) -> None:
    """Until every stalled client has reached the server and the bytes sent to them stop moving (0.5 s)."""
    while server.stalled < count:
        if time.monotonic() > deadline:
            raise BenchError(f"only {server.stalled} of {count} stalled connections reached the server")
        sampler.sample()
        time.sleep(0.02)
    sent, since = -1, time.monotonic()
    while time.monotonic() - since < 0.5 and time.monotonic() < deadline:
        if server.stalled_sent != sent:
            sent, since = server.stalled_sent, time.monotonic()
        sampler.sample()
        time.sleep(0.02)


def open_active(port: int, selector: selectors.BaseSelector) -> None:
    """One active client: says so and waits, non-blocking, for its bytes (their count in its key's data)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(ACTIVE)
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ, [0])


def read_active(key: selectors.SelectorKey, selector: selectors.BaseSelector) -> bool:
    """Read what an active client has; at EOF check it got every byte, close it, and say it is done."""
    try:
        data = key.fileobj.recv(262144)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as error:
        raise BenchError(f"an active transfer failed after {key.data[0]} bytes: {error}") from None
    if data:
        key.data[0] += len(data)
        return False
    selector.unregister(key.fileobj)
    key.fileobj.close()
    if key.data[0] != SENT_TO[ACTIVE]:
        raise BenchError(f"an active transfer got {key.data[0]} of {SENT_TO[ACTIVE]} bytes")
    return True


def transfer_active(port: int, count: int, sampler: PeakSampler | None, deadline: float) -> float:
    """count active clients, ACTIVE_AT_ONCE at a time, each read to EOF; seconds for them all."""
    started = time.perf_counter()
    selector = selectors.DefaultSelector()
    opened = done = 0
    try:
        while done < count:
            while opened < count and len(selector.get_map()) < ACTIVE_AT_ONCE:
                open_active(port, selector)
                opened += 1
            for key, _ in selector.select(0.05):
                done += read_active(key, selector)
            if sampler is not None:
                sampler.sample()
            if time.monotonic() > deadline:
                raise BenchError(f"only {done} of {count} active transfers finished in time")
    except OSError as error:
        raise BenchError(f"active transfers: {error} after {done} of {count}") from None
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return time.perf_counter() - started


def stall_once(ctx: Context, count: int) -> dict:
    """A fresh chain: idle RSS, then count stalled clients held while count active ones transfer (the
    peak), then all closed: RSS once fds and threads are back at the baseline."""
    with Scope() as scope:
        server = StallServer()
        server.start()
        scope.closers.append(server.stop)
        (chain,) = start_chains(ctx, scope, server.port, ("qproxy",))
        transfer_active(chain.port, ACTIVE_AT_ONCE, None, time.monotonic() + 30)  # warm-up
        baseline = settled(chain.pids)
        time.sleep(ctx.settings.settle)
        idle = {role: proc_status(pid)["VmRSS"] for role, pid in chain.pids.items()}
        sampler = PeakSampler(chain.pids)
        stalled = open_stalled(chain.port, count, time.monotonic() + 60)
        try:
            wait_piled_up(server, count, sampler, time.monotonic() + 30)
            seconds = transfer_active(chain.port, count, sampler, time.monotonic() + 120)
            sampler.sample(force=True)
        finally:
            close_all(stalled)
        released = wait_released(chain.pids, baseline)
        time.sleep(ctx.settings.settle)
        after = {role: proc_status(pid)["VmRSS"] for role, pid in chain.pids.items()}
    result = {"seconds": seconds, "piled_up": server.stalled_sent / 2**20}
    for role in chain.pids:
        result[f"{role}_idle"] = idle[role] / 1024
        result[f"{role}_peak"] = sampler.peak[role] / 1024
        result[f"{role}_after"] = after[role] / 1024
        result[f"{role}_released"] = released[role]
    return result


def run_stall(ctx: Context, scope: Scope) -> dict:
    count = ctx.settings.conns
    raise_fd_limit(count * 3)
    runs = [stall_once(ctx, count) for _ in range(ctx.settings.runs)]
    figures = {}
    for role in ("host", "enclave"):
        def values(key: str) -> list:
            return [run[f"{role}_{key}"] for run in runs]

        idle, after = values("idle"), values("after")
        figures[f"stall_{role}_peak_rss"] = make_figure(
            f"stall: {role} peak RSS", "MB", {"qproxy": values("peak")}, "< 80 MB",
            lambda f: f["qproxy"]["max"] < 80)
        figures[f"stall_{role}_after_rss"] = make_figure(
            f"stall: {role} RSS after", "MB", {"qproxy": after}, "< idle + 5 MB",
            lambda f, idle=idle, after=after: all(a < i + 5 for a, i in zip(after, idle)))
        for key in ("peak_rss", "after_rss"):
            figures[f"stall_{role}_{key}"]["idle"] = summary(idle)
        figures[f"stall_{role}_after_rss"]["released"] = values("released")
    figures["stall_seconds"] = make_figure(
        f"stall: {count} x 256 KiB transfers", "s", {"qproxy": [run["seconds"] for run in runs]}, decimals=2)
    figures["stall_seconds"]["piled_up_mib"] = [run["piled_up"] for run in runs]
    return figures


# ---------------------------------------------------------------------------
# Workloads: start-up time and idle RSS, with the vendor's walk-through config
# ---------------------------------------------------------------------------


def walkthrough_config(folder: Path) -> tuple[Path, int]:
    """examples/config_qproxy.toml with free TCP ports and the logs moved into folder; the first host port."""
    first, second = free_port(), free_port()
    text = (
        f"[[inbound_connections]]\nhost_port = {first}\nenclave_port = {free_port()}\nvsock_port = {VSOCK_PORT}\n\n"
        f"[[inbound_connections]]\nhost_port = {second}\nenclave_port = {free_port()}\nvsock_port = {VSOCK_PORT_2}\n\n"
        f'[log_location]\nhost_log = "host.log"\nenclave_log = "enclave.log"\nlog_level = "info"\n'
        f'host_log_dir = "{folder}/log"\nenclave_log_dir = "{folder}/log"\n'
    )
    path = folder / "config_qproxy.toml"
    path.write_text(text)
    return path, first


@dataclasses.dataclass
class Listening:
    """A proxy process to start, and the listener that shows it is up."""

    argv: list[str]
    address: tuple | str
    env: dict | None = None


def walkthrough_halves(ctx: Context, folder: Path, script: Path | None = None) -> dict[str, Listening]:
    config, host_port = walkthrough_config(folder)
    vsock_dir = folder / "vsock"
    vsock_dir.mkdir()
    env = qproxy_env(vsock_dir, rust_log=None)  # the config's own log level, as the vendor ships it
    qproxy = [ctx.python, str(script or ctx.qproxy)]
    return {
        "host": Listening(qproxy + ["host", "--config", str(config), ENCLAVE_CID], ("127.0.0.1", host_port), env),
        "enclave": Listening(qproxy + ["enclave", "--config", str(config)], str(vsock_dir / str(VSOCK_PORT)), env),
    }


def peer_halves(ctx: Context, folder: Path, name: str) -> dict[str, Listening]:
    path, port = str(folder / "vsock"), free_port()
    hops = peer_hops(ctx, name, port, path, free_port())
    return {"host": Listening(hops["host"], ("127.0.0.1", port)), "enclave": Listening(hops["enclave"], path)}


def starters(ctx: Context) -> dict[str, Callable[[Context, Path], dict[str, Listening]]]:
    """qproxy and, for scale, the peers this machine has (socat-256k starts and idles as socat does)."""
    kinds = {"qproxy": walkthrough_halves}
    for name in ("socat", "asyncio", "uvloop"):
        if name in ctx.chains:
            kinds[name] = functools.partial(peer_halves, name=name)
    return kinds


def time_start(scope: Scope, half: Listening, log: Path) -> float:
    """Milliseconds from just before exec to the first connect() its listener accepts (polled every 1 ms)."""
    started = time.perf_counter()
    process = scope.spawn(half.argv, log, half.env)
    try:
        ready = wait_until(lambda: try_connect(half.address), process, " ".join(half.argv[:3]), interval=0.001)
    finally:
        scope.stop(process, signal.SIGKILL)
    return (ready - started) * 1000


def run_startup(ctx: Context, scope: Scope) -> dict:
    kinds = starters(ctx)
    times: dict[str, dict[str, list]] = {"host": {}, "enclave": {}}
    for name, halves in kinds.items():
        for role in ("host", "enclave"):
            runs = []
            for attempt in range(ctx.settings.starts + 1):  # the first one warms the page cache
                folder = scope.folder(f"start-{name}")
                runs.append(time_start(scope, halves(ctx, folder)[role], folder / f"{role}.log"))
            times[role][name] = runs[1:]
    return {f"startup_{role}": make_figure(
        f"start-up, {role} half", "ms", times[role], "< 150 ms", lambda f: f["qproxy"]["median"] < 150)
        for role in ("host", "enclave")}


def idle_once(ctx: Context, halves: Callable[[Context, Path], dict[str, Listening]], name: str) -> dict[str, float]:
    """VmRSS (MB) of each half started alone with no traffic, after it has settled."""
    with Scope() as scope:
        folder = scope.folder(f"idle-{name}")
        processes = {}
        for role, half in sorted(halves(ctx, folder).items(), reverse=True):  # the enclave half first
            processes[role] = scope.spawn(half.argv, folder / f"{role}.out", half.env)
            wait_until(lambda: is_listening(half.address), processes[role], f"{name} {role}")
        time.sleep(ctx.settings.settle)  # the enclave half has dialled the control port by now
        return {role: proc_status(process.pid)["VmRSS"] / 1024 for role, process in processes.items()}


def compiled_halves(ctx: Context, folder: Path) -> dict[str, Listening]:
    """The walk-through halves run from bytecode, python3 qproxy.pyc, as the smallest image runs them:
    without the heap that compiling the source leaves behind."""
    compiled = folder / "qproxy.pyc"
    subprocess.run([ctx.python, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], doraise=True)",
                    str(ctx.qproxy), str(compiled)], check=True)
    return walkthrough_halves(ctx, folder, compiled)


def run_idle(ctx: Context, scope: Scope) -> dict:
    kinds = starters(ctx)
    rss: dict[str, dict[str, list]] = {"host": {}, "enclave": {}}
    for name, halves in kinds.items():
        runs = [idle_once(ctx, halves, name) for _ in range(ctx.settings.runs)]
        for role in rss:
            rss[role][name] = [run[role] for run in runs]
    compiled = [idle_once(ctx, compiled_halves, "qproxy.pyc") for _ in range(ctx.settings.runs)]
    figures = {}
    for role in ("host", "enclave"):
        figures[f"idle_{role}_rss"] = make_figure(
            f"idle RSS, {role} half", "MB", rss[role], "< 20 MB", lambda f: f["qproxy"]["median"] < 20)
        figures[f"idle_{role}_rss_pyc"] = make_figure(
            f"idle RSS, {role} half, from .pyc", "MB", {"qproxy": [run[role] for run in compiled]}, "< 20 MB",
            lambda f: f["qproxy"]["median"] < 20)
    return figures


RUNNERS: dict[str, Callable[[Context, Scope], dict]] = {
    "startup": run_startup,
    "idle": run_idle,
    "conns": run_conns,
    "stall": run_stall,
    "throughput": run_throughput,
    "keepalive": run_keepalive,
    "churn": run_churn,
    "egress": run_egress,
}


# ---------------------------------------------------------------------------
# Tools: found, installed, or the one command that installs them
# ---------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def find_tools(workloads: list[str], install: bool) -> dict[str, str]:
    """Every tool the chosen workloads need, installing from Debian's packages if allowed."""
    needed = {tool for workload in workloads for tool in NEEDS[workload]}
    missing = sorted(tool for tool in needed if not find_tool(tool))
    ci_as_root = os.geteuid() == 0 and bool(os.environ.get("CI"))
    if missing and (install or ci_as_root):
        print(f"bench: installing {', '.join(missing)}: {INSTALL_COMMAND}", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(INSTALL_COMMAND.split(), env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env)
            subprocess.run(INSTALL_COMMAND.split(), env=env)
        missing = sorted(tool for tool in needed if not find_tool(tool))
    if missing:
        print(f"bench: missing {', '.join(missing)}; install them with:\n    {INSTALL_COMMAND}\n"
              "(or run this again with --install, as root)", file=sys.stderr)
        raise SystemExit(1)
    return {tool: path for tool in PACKAGES if (path := find_tool(tool))}


# ---------------------------------------------------------------------------
# Output: header, table, JSON
# ---------------------------------------------------------------------------


def cpu_busy(seconds: float = 1.0) -> float:
    """Percentage of all CPUs busy over a short look, before anything of ours runs."""
    def sample() -> tuple[int, int]:
        fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # total, idle + iowait

    total, idle = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return 100.0 * (1 - (idle2 - idle) / max(1, total2 - total))


@contextlib.contextmanager
def one_bench_at_a_time(wait: bool):
    """Two benchmarks on one machine spoil each other's figures: the second waits for the first."""
    with open(Path(tempfile.gettempdir()) / "qproxy-bench.lock", "a") as lock:
        if wait:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print("bench: another bench run is measuring; waiting for it to finish", flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def output_of(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout or done.stderr).strip() or "?"


def uvloop_version(python: str) -> str | None:
    """uvloop's version as this Python imports it, or None: then there is no uvloop chain."""
    try:
        done = subprocess.run([python, "-c", "import uvloop; print(uvloop.__version__)"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or "?"


def available_chains(tools: dict[str, str], uvloop: str | None) -> tuple[str, ...]:
    """Every chain but those whose relay this machine lacks (socat's, for the workloads that can do without)."""
    return tuple(name for name in CHAINS
                 if (name not in SOCATS or "socat" in tools) and (name != "uvloop" or uvloop))


def describe_run(ctx: Context, source: Path, quick: bool) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": output_of([ctx.python, "-c", "import sys; print(sys.version.split()[0])"]),
        "python_path": ctx.python,
        "peer_python": ctx.peer_python,
        "peer_python_version": output_of([ctx.peer_python, "-c", "import sys; print(sys.version.split()[0])"]),
        "uvloop": ctx.uvloop,
        "chains": list(ctx.chains),
        "qproxy": str(source),
        "qproxy_sha256": hashlib.sha256(ctx.qproxy.read_bytes()).hexdigest(),
        "qproxy_version": output_of([ctx.python, str(ctx.qproxy), "--version"]).replace("qproxy ", ""),
        "mode": "quick" if quick else "full",
        "settings": dataclasses.asdict(ctx.settings),
        "socat_backlog": ctx.socat_backlog or "default (5)",
        "tools": ctx.tools,
        "cpu_busy_before_pct": round(cpu_busy(), 1),
    }


def format_value(value: float | None, decimals: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{decimals}f}"


def format_best(figure: dict) -> str:
    """qproxy's median over the best peer's, and which peer that is; or over what the figure is
    relative_to (the egress row: qproxy's CONNECT proxy over its outbound entry)."""
    if "relative_to" in figure:
        ratio, name = figure["relative_to"]["ratio"], figure["relative_to"]["name"]
    else:
        ratio, name = figure["qproxy_best"], figure["best_peer"]
    return "-" if ratio is None else f"{ratio:.2f}x {name}"


def chain_cell(figure: dict, chain: str) -> str:
    """The chain's median, or what a missing value in any run means (a hop that never freed its fds)."""
    measured = figure.get(chain)
    if measured and figure.get("none_means") and None in measured["runs"]:
        return figure["none_means"]
    return format_value(median_of(figure, chain), figure["decimals"])


def table(figures: dict) -> str:
    """One row per figure, one column per chain measured, then qproxy over the best peer and the target;
    a blank line between workloads."""
    chains = [chain for chain in CHAINS if any(figure.get(chain) for figure in figures.values())]
    header = ("figure", *chains, "qproxy / best peer", "target", "met?")
    rows: list[tuple[str, ...] | None] = [header]
    workload = None
    for figure in figures.values():
        if figure.get("workload") != workload:
            workload = figure.get("workload")
            rows.append(None)
        label = f"{figure['label']} ({figure['unit']})" if figure["unit"] else figure["label"]
        met = {True: "yes", False: "NO", None: ""}[figure["met"]]
        rows.append((label, *(chain_cell(figure, chain) for chain in chains), format_best(figure),
                     figure["target"], met))
    widths = [max(len(row[i]) for row in rows if row) for i in range(len(header))]
    numbers = range(1, len(chains) + 1)  # right-aligned; the words left-aligned
    lines = []
    for row in rows:
        if row is None:
            lines.append("")
            continue
        cells = [cell.rjust(widths[i]) if i in numbers else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines[:1] + lines[2:])  # no blank line under the header


def headline(meta: dict) -> str:
    s = meta["settings"]
    peers = "" if meta["peer_python"] == meta["python_path"] else \
        f"; the asyncio relays run by {meta['peer_python']} (Python {meta['peer_python_version']})"
    lines = [
        f"qproxy bench ({meta['mode']}) {meta['date']}: {meta['cpu']}, {meta['cores']} cores, Linux {meta['kernel']}, "
        f"Python {meta['python']}, qproxy {meta['qproxy_version']} (sha256 {meta['qproxy_sha256'][:12]})",
        f"medians of {s['runs']} runs of {s['seconds']} s after a {s['warmup']} s warm-up ({s['scaling_runs']} "
        f"runs at keep-alive c1, c10, c200; {s['starts']} starts for start-up); listen backlog 1024 for qproxy, "
        f"nginx, the asyncio relays and socat (socat backlog: {meta['socat_backlog']})",
        f"chains: {', '.join(chain + (' ' + meta['uvloop'] if chain == 'uvloop' else '') for chain in meta['chains'])}"
        f"{peers}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs: about six minutes")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads to run (default: all of {','.join(WORKLOADS)})")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results ({DEFAULT_JSON})")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs qproxy.py (default: this one)")
    parser.add_argument("--peer-python", help="interpreter that runs the asyncio and uvloop relays (default: --python)")
    parser.add_argument("--qproxy", type=Path, default=ROOT / "qproxy.py", help="the qproxy.py to measure")
    parser.add_argument("--runs", type=int, help="measured runs per workload (at least 3 for medians that mean much)")
    parser.add_argument("--seconds", type=int, help="length of each iperf3/wrk run")
    parser.add_argument("--socat-backlog", type=int, default=1024,
                        help="backlog= of socat's listeners, like qproxy's 1024 (0: socat's default, 5)")
    parser.add_argument("--no-lock", action="store_true",
                        help="do not wait for another bench run on this machine to finish first")
    parser.add_argument("--install", action="store_true", help=f"install missing tools: {INSTALL_COMMAND}")
    args = parser.parse_args(argv)
    args.workloads = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.workloads if name not in WORKLOADS]
    if unknown or not args.workloads:
        parser.error(f"--only: unknown workload {', '.join(unknown) or '(none)'}; choose from {', '.join(WORKLOADS)}")
    if not args.qproxy.is_file():
        parser.error(f"--qproxy: no file {args.qproxy}")
    args.peer_python = args.peer_python or args.python  # the same interpreter on both sides: a fair race
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    settings = dataclasses.replace(QUICK if args.quick else FULL)
    if args.runs:
        settings.runs = args.runs
        settings.scaling_runs = min(settings.scaling_runs, args.runs)
    if args.seconds:
        settings.seconds = args.seconds
    return settings


def on_sigterm(number: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every Scope, which stops and removes what it holds


def run_workload(ctx: Context, name: str, errors: dict[str, str], skipped: dict[str, str]) -> dict:
    """One workload's figures, its processes and folders gone afterwards; a failure noted in errors,
    a workload that this qproxy.py cannot run in skipped."""
    print(f"  {name}...", end="", flush=True)
    began = time.monotonic()
    try:
        with Scope() as scope:
            figures = RUNNERS[name](ctx, scope)
    except BenchError as error:
        errors[name] = str(error)
        print(f" FAILED: {error}", flush=True)
        return {}
    except Unsupported as reason:
        skipped[name] = str(reason)
        print(f" skipped: {reason}", flush=True)
        return {}
    print(f" {time.monotonic() - began:.0f} s", flush=True)
    for figure in figures.values():
        figure["workload"] = name  # the table groups its rows by it
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    workloads = [name for name in WORKLOADS if name in args.workloads]  # the quiet ones first
    tools = find_tools(workloads, args.install)
    raise_fd_limit()
    figures: dict = {}
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    try:
        with one_bench_at_a_time(not args.no_lock), Scope() as outer:
            # Measure a copy: qproxy.py edited during the run must not mix two versions in one table.
            snapshot = outer.folder("snapshot") / "qproxy.py"
            shutil.copyfile(args.qproxy, snapshot)
            uvloop = uvloop_version(args.peer_python)
            ctx = Context(python=args.python, peer_python=args.peer_python, qproxy=snapshot,
                          settings=settings_from(args), socat_backlog=args.socat_backlog, tools=tools,
                          uvloop=uvloop, chains=available_chains(tools, uvloop))
            meta = describe_run(ctx, args.qproxy.resolve(), args.quick)
            print(headline(meta), flush=True)
            if meta["cpu_busy_before_pct"] > 10:
                print(f"warning: the CPUs were {meta['cpu_busy_before_pct']:.0f} % busy before the run started: "
                      "figures will be noisy", flush=True)
            for name in workloads:
                figures.update(run_workload(ctx, name, errors, skipped))
    except KeyboardInterrupt:
        print("\nbench: interrupted; everything started has been stopped", file=sys.stderr)
        return 130
    missed = [figure["label"] for figure in figures.values() if figure["met"] is False]
    print()
    print(table(figures))
    print()
    print(f"targets missed: {', '.join(missed)}" if missed else "every target measured was met")
    if not ctx.uvloop:
        print(f"note: {ctx.peer_python} cannot import uvloop, so there is no uvloop chain "
              "(pip install uvloop for that Python, or pass --peer-python one that has it)")
    for name, figure in figures.items():
        if any(sum(runs) for runs in figure.get("errors", {}).values()):
            print(f"note: socket errors or non-2xx replies, per run: {figure['errors']} ({figure['label']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(
        {"meta": meta, "figures": figures, "targets_missed": missed, "errors": errors, "skipped": skipped},
        indent=2) + "\n")
    print(f"results: {args.json}")
    if errors:
        print(f"bench: {len(errors)} workload(s) failed: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
