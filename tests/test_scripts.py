"""The benchmark scripts still run (tiny settings; their numbers are not checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_bench_featurize_quick_prints_every_row():
    lines = _run("scripts/bench_featurize.py", "--quick", "--baseline-python", "/nonexistent")
    rows = [ln.split() for ln in lines if ln.startswith("tiny")]
    labels = [" ".join(r[1:3]) for r in rows]
    assert labels.count("diffattr kronecker") == 2 and labels.count("diffattr dense") == 2
    kron = [r for r in rows if r[2] == "kronecker"]
    assert all(float(r[4]) > 0 for r in kron)  # img/s parsed as a number
    assert sum("not available" in ln for ln in lines) == 4  # both baselines, both k


def test_bench_featurize_memory_table():
    lines = _run("scripts/bench_featurize.py", "--quick", "--memory", "8,24", "--steps", "2")
    rows = [ln.split() for ln in lines if ln.strip() and ln.split()[0] in ("8", "24")]
    assert [r[0] for r in rows] == ["8", "24"]
    assert float(rows[1][3]) > float(rows[0][3])  # the store grows with the images


def test_bench_featurize_family_table():
    lines = _run("scripts/bench_featurize.py", "--quick", "--family")
    rows = {" ".join(ln.split()[1:-4]): ln.split()[-4:] for ln in lines if ln.startswith("tiny")}
    assert list(rows) == [
        "trak",
        "d-trak",
        "das",
        "grad-dot",
        "grad-cos",
        "diff-retrac",
        "together (one pass)",
        "sum of the six alone",
    ]
    assert rows["das"][2] == "1.00"  # the ratio's reference
    assert float(rows["together (one pass)"][0]) > 0


def test_bench_featurize_text_to_image_row():
    lines = _run("scripts/bench_featurize.py", "--quick", "--t2i")
    rows = {ln[:44].strip(): ln[44:].split() for ln in lines if ln.startswith("LoRA")}
    assert set(rows) == {"LoRA training step (1 image)", "LoRA-only featurization (1 image, 1 t)"}
    assert rows["LoRA training step (1 image)"][1] == "1.00"  # the ratio's reference
    assert float(rows["LoRA-only featurization (1 image, 1 t)"][0]) > 0


def test_bench_retrain_runs_one_by_one_and_stacked():
    lines = _run(
        "scripts/bench_retrain.py",
        "--models",
        "tiny",
        "--stacks",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--n",
        "32",
    )
    hows = [ln[14:28].strip() for ln in lines if ln.startswith("tiny")]
    assert hows == ["one by one", "stack x2"]
