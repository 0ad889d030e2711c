"""bench/run.py: a fast subset runs end to end and writes sane JSON; wrk's output is read right.

The subset (start-up and idle RSS) needs no external tool: socat joins it only
when installed.  The load workloads (iperf3, wrk, nginx) are not run here; they
take minutes and want a quiet machine: `python3 bench/run.py --quick`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

from conftest import ROOT

BENCH = ROOT / "bench" / "run.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_quick_startup_and_idle_write_sane_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "startup,idle", "--json", str(out),
         "--python", sys.executable, "--no-lock"],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "start-up, host half" in done.stdout and "idle RSS, enclave half" in done.stdout
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    assert results["meta"]["cores"] >= 1 and results["meta"]["python"].startswith("3.")
    figures = results["figures"]
    for role in ("host", "enclave"):
        startup = figures[f"startup_{role}"]
        assert len(startup["qproxy"]["runs"]) >= 5
        assert 1 < startup["qproxy"]["median"] < 5000, startup
        assert startup["met"] in (True, False)
        idle = figures[f"idle_{role}_rss"]
        assert len(idle["qproxy"]["runs"]) >= 3
        assert 1 < idle["qproxy"]["median"] < 500, idle
        if shutil.which("socat"):
            assert idle["socat"]["median"] > 0 and idle["qproxy_socat"] > 0
    assert results["targets_missed"] == [f["label"] for f in figures.values() if f["met"] is False]


WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:40000/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    2.00ms  40.00ms   90.00%
    Req/Sec     8.00k   500.00     9.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    2.50ms
     90%    6.10ms
     99%    1.20s
  32000 requests in 2.00s, 4.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  15995.50
Transfer/sec:      2.00MB
"""


def test_wrk_output_is_read_with_its_units():
    parsed = load_bench().parse_wrk(WRK_OUTPUT)
    assert parsed["rate"] == 15995.5 and parsed["requests"] == 32000
    assert (parsed["p50"], parsed["p90"], parsed["p99"]) == (0.85, 6.1, 1200.0)
    assert parsed["errors"] == 6


def test_ratios_and_targets():
    bench = load_bench()
    figure = bench.make_figure("x", "req/s", {"direct": [10, 30, 20], "socat": [4, 5, 6], "qproxy": [6, 5, 7]},
                               ">= 1.2x socat", lambda f: f["qproxy_socat"] >= 1.2)
    assert figure["qproxy"] == {"median": 6, "min": 5, "max": 7, "runs": [6, 5, 7]}
    assert figure["qproxy_socat"] == 1.2 and figure["qproxy_direct"] == 0.3 and figure["met"] is True
