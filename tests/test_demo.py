"""The demo: the shipped model is what configs/digits2.yaml trains, and `diffattr demo` writes one
report (HTML / JSON, PDF where Chromium is) and ends with three commands that run."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffattr.config import load_config
from diffattr.demo import DEMO_METHODS, SHIPPED_MODEL, demo_methods, next_commands
from diffattr.diffusion.model import build_model, load_model
from diffattr.repro import read_record, state_dict_hash
from diffattr.testing import TINY_UNET

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT.joinpath(*SHIPPED_MODEL)


def test_shipped_model_is_the_one_the_config_trains() -> None:
    model = load_model(SHIPPED)  # checks the weights against the recorded model hash
    record = read_record(SHIPPED)
    assert record["finished"] and record["model_hash"] == model.model_hash()
    cfg = load_config(ROOT / "configs" / "digits2.yaml")
    # Same settings as the shipped config (so --retrain makes the same kind of model) ...
    assert record["config"]["model"] == cfg.to_dict()["model"]
    assert record["config"]["train"] == cfg.to_dict()["train"]
    assert record["config"]["data"]["source"] == cfg.data.source
    # ... and the config still builds this architecture: same parameters, names and shapes.
    fresh = build_model(cfg).unet.state_dict()
    shipped = model.unet.state_dict()
    assert {k: tuple(v.shape) for k, v in fresh.items()} == {
        k: tuple(v.shape) for k, v in shipped.items()
    }
    assert state_dict_hash(model.unet) != state_dict_hash(build_model(cfg).unet)  # trained
    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) < 8 * 2**20


def test_demo_methods_share_their_timesteps() -> None:
    """The one pass forwards each (image, timestep) once for both methods only when das's
    timesteps are among d-trak's (on the shipped model's 1000-step schedule)."""
    from diffattr.attribution.registry import make_options

    model = load_model(SHIPPED)
    T = model.num_train_timesteps

    def timesteps(method: str) -> set[int]:
        opts = make_options(method, **DEMO_METHODS[method])
        return set(opts.timestep_policy(T).timesteps())

    assert timesteps("das") < timesteps("d-trak")
    assert DEMO_METHODS["das"]["batch_size"] == DEMO_METHODS["d-trak"]["batch_size"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffattr.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=900,
    )


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`diffattr demo --config <tiny>`: a 2-step tiny model instead of the shipped one."""
    work = tmp_path_factory.mktemp("demo")
    cfg = load_config(ROOT / "configs" / "digits2.yaml").to_dict()
    cfg["data"].update(size=8, limit=16)
    cfg["model"].update(
        {
            k: TINY_UNET[k]
            for k in (
                "sample_size",
                "block_out_channels",
                "norm_num_groups",
                "down_block_types",
                "up_block_types",
            )
        }
    )
    cfg["scheduler"]["num_train_timesteps"] = 20
    cfg["train"].update(steps=2, batch_size=4, checkpoint_every=2, lr_warmup_steps=0)
    cfg["sample"]["num_inference_steps"] = 4
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    res = _cli(["-q", "demo", "--out", "runs/demo", "--config", "tiny.yaml"], work)
    assert res.returncode == 0, res.stderr
    return work, res


def test_demo_writes_one_report_and_ends_with_three_commands(tiny_demo) -> None:
    work, res = tiny_demo
    out = work / "runs" / "demo"
    assert (out / "report" / "report.html").exists() and (out / "report" / "report.json").exists()
    assert not (out / "report.html").exists()  # the one report is the copyright report
    data = json.loads((out / "report" / "report.json").read_text())
    assert [m["name"] for m in data["methods"]] == list(DEMO_METHODS)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(DEMO_METHODS)
    for m in ("d-trak", "das"):  # built with the demo's options
        options = read_record(out / "features" / m)["identity"]["options"]
        assert options["timesteps"] == DEMO_METHODS[m]["timesteps"]
        # [100, 550) of 1000 timesteps is [2, 11) of the tiny model's 20
        assert options["t_max"] == demo_methods(20)[m]["t_max"] == 11
    lines = res.stdout.strip().splitlines()
    assert lines[-4].startswith("done in")
    printed = [line.strip() for line in lines[-3:]]
    assert printed == next_commands(Path("runs/demo"), "diffattr")
    for command in printed:  # each runs as printed (with this interpreter)
        argv = shlex.split(command)
        r = _cli(["-q", *argv[1:]], work)
        assert r.returncode == 0, (command, r.stderr)
    assert (out / "report-0005" / "report.json").exists()
    assert (out / "features" / "grad-cos" / "diffattr.json").exists()


def test_a_folder_an_older_demo_made_with_other_options_is_rebuilt(tiny_demo) -> None:
    work, _ = tiny_demo
    folder = work / "runs" / "demo" / "features" / "d-trak"
    record_path = folder / "diffattr.json"
    record = json.loads(record_path.read_text())
    record["identity"]["options"]["t_max"] = None  # as made before the demo's t_max
    record_path.write_text(json.dumps(record))
    res = _cli(["demo", "--out", "runs/demo", "--config", "tiny.yaml"], work)
    assert res.returncode == 0, res.stderr
    assert "rebuilding" in res.stderr and "d-trak" in res.stderr
    assert read_record(folder)["identity"]["options"]["t_max"] == 11


def test_retrain_replaces_the_model_and_what_was_made_from_it(tiny_demo) -> None:
    work, _ = tiny_demo
    out = work / "runs" / "demo"
    before = read_record(out / "model")["model_hash"]
    stale = out / "features" / "stale-marker"
    stale.write_text("x")
    cfg = yaml.safe_load((work / "tiny.yaml").read_text())
    cfg["seed"] = 1
    (work / "tiny1.yaml").write_text(yaml.safe_dump(cfg))
    res = _cli(["-q", "demo", "--out", "runs/demo", "--retrain", "--config", "tiny1.yaml"], work)
    assert res.returncode == 0, res.stderr
    assert read_record(out / "model")["model_hash"] != before
    assert not stale.exists() and (out / "report" / "report.json").exists()
