"""The install guard: a broken torchvision in the venv must fail loudly, not deep inside diffusers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_env.py"


def _run_check(extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = f"{extra_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run(
        [sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=300
    )


def test_this_venv_has_no_broken_torchvision():
    # The real venv the tests run in: torchvision either absent or importable with diffusers.
    result = _run_check()
    assert result.returncode == 0, result.stderr
    if importlib.util.find_spec("torchvision") is None:
        assert "ok" in result.stdout


def test_broken_torchvision_is_reported(tmp_path):
    # Simulate the failure measured on CPU machines: torchvision present but its ops missing.
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    result = _run_check(tmp_path)
    assert result.returncode == 1
    assert "torchvision is installed but broken" in result.stderr
    assert "torchvision::nms" in result.stderr


def test_license_is_an_spdx_string():
    """A TOML-table license makes `pip install` print setuptools deprecation warnings."""
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])
