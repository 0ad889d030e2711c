"""The files under examples/ are what users copy: each must be valid and consistent with qproxy.py."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import ROOT, run_qproxy

EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("config", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid(config):
    result = run_qproxy("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: valid")


@pytest.mark.skipif(not shutil.which("sh"), reason="needs a POSIX shell")
@pytest.mark.parametrize("script", ["start.sh", "app.sh"])
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
