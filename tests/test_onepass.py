"""One pass for many methods: stores filled together are bit-identical to each filled alone, each
(image chunk, timestep, draw) is forwarded once, and the CLI / attributor folders use it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffattr.attribution.base import Queries
from diffattr.attribution.featurize import FeaturizeArgs, featurize
from diffattr.attribution.onepass import StoreRequest, chunks, featurize_many
from diffattr.attribution.projectors import ProjectorConfig
from diffattr.attribution.registry import make_attributor
from diffattr.attribution.saved import fit_into_folders, open_folder
from diffattr.attribution.timesteps import TimestepPolicy
from diffattr.data.dataset import ImageDataset
from diffattr.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int = 7) -> ImageDataset:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    ids = torch.randperm(500, generator=g)[:n]
    return ImageDataset(name="tiny", images=images, ids=ids)


def _args(kind: str = "kronecker", **kw) -> FeaturizeArgs:
    base = dict(
        timesteps=TimestepPolicy(kind="uniform", count=4),
        projector=ProjectorConfig(kind=kind, dim=96, seed=2),
        batch_size=3,
        shard_size=4,
    )
    return FeaturizeArgs(**{**base, **kw})


def _mixed(kind: str) -> list[FeaturizeArgs]:
    """Stores of the TRAK family's kinds: other outputs, normalisation, timesteps, draws and
    aggregates, all in one pass."""
    return [
        _args(kind, output="loss", label="a"),
        _args(kind, output="square", aggregate="halves", label="b"),
        _args(kind, output="average", normalize=True, num_noise=2, label="c"),
        _args(kind, output="loss", normalize=True, label="d"),
        _args(
            kind,
            output="square",
            timesteps=TimestepPolicy(kind="uniform", count=3, t_min=100),
            aggregate="per-step",
            label="e",
        ),
        _args(
            kind,
            output="loss",
            timesteps=TimestepPolicy(kind="random", count=5, seed=4),
            label="f",
        ),
    ]


class CountingModel:
    """The model with its forward calls counted (timestep of each call's rows)."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls: list[tuple[int, int]] = []
        self.__dict__.update({k: getattr(model, k) for k in ("unet", "scheduler")})

    def __getattr__(self, name):
        return getattr(self.model, name)

    def eps(self, x_t, t, labels=None):
        self.calls.append((int(t[0]), int(x_t.shape[0])))
        return self.model.eps(x_t, t, labels)


@pytest.mark.parametrize("kind", ["kronecker", "gaussian", "identity"])
def test_stores_together_are_bit_identical_to_each_alone(tmp_path: Path, kind: str) -> None:
    model, data = tiny_model(), _data()
    all_args = _mixed(kind)
    together = featurize_many(
        model,
        data,
        [StoreRequest(a, tmp_path / "together" / a.label) for a in all_args],
        progress=False,
    )
    for a, store in zip(all_args, together, strict=True):
        alone = featurize(model, data, tmp_path / "alone" / a.label, a, progress=False)
        assert store.manifest["identity"] == alone.manifest["identity"]
        assert torch.equal(store.features, alone.features), a.label
        assert float(store.features.abs().max()) > 0


def test_each_row_is_forwarded_once(tmp_path: Path) -> None:
    data = _data()
    all_args = _mixed("kronecker")
    counted = CountingModel(tiny_model())
    featurize_many(
        counted,
        data,
        [StoreRequest(a, tmp_path / a.label) for a in all_args],
        progress=False,
    )
    union = sorted({t for a in all_args for t in a.timesteps.timesteps()})
    # shards of 4 and 3 images: chunks of 2 + 2 and 3 (batch_size 3); draw 1 only at store c's
    # timesteps
    draw1 = len(all_args[2].timesteps.timesteps())
    assert sorted(n for _, n in counted.calls) == sorted([2, 2, 3] * (len(union) + draw1))
    separate = CountingModel(tiny_model())
    for a in all_args:
        featurize(separate, data, tmp_path / "sep" / a.label, a, progress=False)
    alone = sum(len(a.timesteps.timesteps()) * a.num_noise for a in all_args)
    assert len(separate.calls) == 3 * alone and alone > len(union) + draw1


def test_same_store_in_two_folders_is_computed_once(tmp_path: Path) -> None:
    data = _data()
    counted = CountingModel(tiny_model())
    a = _args(label="x")
    one, two = featurize_many(
        counted,
        data,
        [StoreRequest(a, tmp_path / "m1" / "s"), StoreRequest(a, tmp_path / "m2" / "s")],
        progress=False,
    )
    assert len(counted.calls) == 3 * 4  # three chunks (2 + 2, 3) x 4 timesteps, once
    assert torch.equal(one.features, two.features) and two.path == tmp_path / "m2" / "s"
    # Reopening the copy needs nothing computed.
    again = featurize(counted, data, tmp_path / "m2" / "s", a, progress=False)
    assert len(counted.calls) == 12 and torch.equal(again.features, one.features)


def test_killed_pass_resumes_only_what_is_missing(tmp_path: Path) -> None:
    model, data = tiny_model(), _data()
    all_args = _mixed("kronecker")[:3]
    reqs = [StoreRequest(a, tmp_path / "run" / a.label) for a in all_args]

    class Killed(RuntimeError):
        pass

    def kill(i: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        featurize_many(model, data, reqs, progress=False, on_shard=kill)
    # Shard 0 of every store is complete; store b also loses it (as if killed while writing).
    (tmp_path / "run" / "b" / "shards" / "shard_00000.done.json").unlink()
    counted = CountingModel(model)
    stores = featurize_many(counted, data, reqs, progress=False)
    ref = featurize_many(
        model, data, [StoreRequest(a, tmp_path / "ref" / a.label) for a in all_args], progress=False
    )
    for s, r in zip(stores, ref, strict=True):
        assert torch.equal(s.features, r.features)
    # Shard 1 (one chunk of 3) for all three stores; shard 0 (two chunks of 2) only for b (its
    # 4 timesteps, one draw).
    sizes = [n for _, n in counted.calls]
    assert sizes.count(2) == 2 * 4 and sizes.count(3) == 4 + 4  # c's second draw: 4 more


def test_chunks_are_balanced() -> None:
    assert [c.stop - c.start for c in chunks(34, 16)] == [12, 11, 11]
    assert [c.stop - c.start for c in chunks(32, 16)] == [16, 16]
    assert [c.stop - c.start for c in chunks(1, 16)] == [1]


FAMILY = ("trak", "d-trak", "das", "grad-dot", "grad-cos", "diff-retrac")
COMMON = {"timesteps": 6, "t_min": 0, "proj_dim": 96, "batch_size": 4}


def test_family_in_one_pass_scores_exactly_as_alone(tmp_path: Path) -> None:
    model, data = tiny_model(), _data(9)
    queries = Queries(images=torch.rand(2, 1, 8, 8) * 2 - 1, names=["q0", "q1"])
    counted = CountingModel(model)
    together = fit_into_folders(
        counted,
        "tiny",
        {m: COMMON for m in FAMILY},
        {"source": "tiny"},
        data,
        {m: tmp_path / "together" / m for m in FAMILY},
        progress=False,
    )
    # 9 images in shards of 256: chunks of 3 x 6 timesteps, forwarded once for all six methods
    # (das's residuals too: they come from the same forwards).
    grad_calls = 3 * 6
    assert len([c for c in counted.calls if c[1] == 3]) == grad_calls
    for m in FAMILY:
        alone = make_attributor(m, model, work_dir=tmp_path / "alone" / m, **COMMON)
        alone.fit(data)
        a, b = alone.score(queries), together[m].score(queries)
        assert torch.equal(torch.as_tensor(a.values), torch.as_tensor(b.values)), m
        assert torch.equal(torch.as_tensor(a.halves), torch.as_tensor(b.halves)), m


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffattr.cli", "-q", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny model folder trained for 2 steps on 12 digits-2 images at 8x8 (T = 20)."""
    import yaml

    from diffattr.config import load_config
    from diffattr.testing import TINY_UNET

    folder = tmp_path_factory.mktemp("onepass-cli")
    cfg = load_config(ROOT / "configs" / "digits2.yaml").to_dict()
    cfg["data"].update(size=8, limit=12)
    cfg["model"].update(
        {k: TINY_UNET[k] for k in ("sample_size", "block_out_channels", "norm_num_groups")}
    )
    cfg["model"].update(down_block_types=TINY_UNET["down_block_types"])
    cfg["model"].update(up_block_types=TINY_UNET["up_block_types"])
    cfg["scheduler"]["num_train_timesteps"] = 20
    cfg["train"].update(steps=2, batch_size=4, checkpoint_every=2, lr_warmup_steps=0)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    r = _cli("train", "--config", str(folder / "tiny.yaml"), "--out", str(folder / "model"))
    assert r.returncode == 0, r.stderr
    return folder


def test_cli_featurizes_several_methods_into_one_folder_each(tiny_run: Path) -> None:
    out = tiny_run / "feats"
    r = _cli(
        "featurize",
        "--model",
        str(tiny_run / "model"),
        "--method",
        "trak,d-trak,pixel",
        "--option",
        "proj_dim=64",
        "--option",
        "d-trak:timesteps=5",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    from diffattr.diffusion.model import load_model

    model = load_model(tiny_run / "model")
    for m in ("trak", "d-trak", "pixel"):
        attributor, train = open_folder(model, out / m, progress=False)
        assert len(train) == 12
    rec = open_folder(model, out / "d-trak", progress=False)[0]
    opts = dataclasses.asdict(rec.options)  # type: ignore[attr-defined]
    assert opts["timesteps"] == 5 and opts["proj_dim"] == 64
    assert (
        dataclasses.asdict(open_folder(model, out / "trak", progress=False)[0].options)["timesteps"]
        == 100
    )  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "option, message",
    [
        ("lam=0.1", "none of the methods pixel, unet-features has it"),
        ("das:timesteps=3", "'das' is not one of the methods given"),
    ],
)
def test_cli_option_errors_name_the_methods(tiny_run: Path, option: str, message: str) -> None:
    r = _cli(
        "featurize",
        "--model",
        str(tiny_run / "model"),
        "--method",
        "pixel,unet-features",
        "--option",
        option,
        "--out",
        str(tiny_run / "bad"),
    )
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
