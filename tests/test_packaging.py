"""Packaging: pip installs the `qproxy` command; qproxy.py runs as a lone file with nothing beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import QPROXY, ROOT


def test_pip_install_gives_the_qproxy_command(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the work tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "build", "cache"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
        check=True, timeout=300,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    version = subprocess.run([str(target / "bin" / "qproxy"), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"qproxy {read_version()}"
    check = subprocess.run([str(target / "bin" / "qproxy"), "check-config", str(ROOT / "examples" / "config_qproxy.toml")],
                           capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stderr
    assert "host: listen tcp 0.0.0.0:5050 -> vsock <enclave CID>:9995" in check.stdout
    assert sorted(path.name for path in target.glob("*.py")) == ["qproxy.py"], "only qproxy is a top-level module"


def read_version() -> str:
    import qproxy
    return qproxy.__version__


def test_runs_as_a_lone_file_without_site_packages(tmp_path):
    shutil.copy(QPROXY, tmp_path / "qproxy.py")
    result = subprocess.run([sys.executable, "-I", "-S", "qproxy.py", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "host" in result.stdout and "enclave" in result.stdout


def test_runs_as_a_module_from_its_folder(tmp_path):
    """python3 -m qproxy, as examples/start.sh runs it: the lone file, imported rather than run as a script."""
    shutil.copy(QPROXY, tmp_path / "qproxy.py")
    result = subprocess.run([sys.executable, "-m", "qproxy", "check-config", str(ROOT / "examples" / "config_qproxy.toml")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{ROOT / 'examples' / 'config_qproxy.toml'}: valid")


# tomli is the one exception below 3.11; tomllib is the standard library's from 3.11 on.
ALLOWED = {"__future__", "tomli", "tomllib"}


def test_imports_only_the_standard_library():
    import ast
    tree = ast.parse(QPROXY.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:  # Python 3.9: ask whether each module comes from the standard library's folder
        import importlib.util
        import sysconfig
        stdlib_dir = sysconfig.get_paths()["stdlib"]
        def is_stdlib(name):
            spec = importlib.util.find_spec(name)
            return spec is not None and (spec.origin in ("built-in", "frozen") or str(spec.origin).startswith(stdlib_dir))
        outside = {name for name in imported - ALLOWED if not is_stdlib(name)}
    else:
        outside = imported - set(stdlib) - ALLOWED
    assert not outside, f"qproxy.py imports from outside the standard library: {outside}"
