"""The README's command sequence on a tiny model: train -> generate -> featurize -> attribute.

Checks that the CLI's results are exactly what the Python API gives for the same inputs, that
trajectories saved by `generate` reach Journey-TRAK, and that reopening a feature folder with other
arguments or another model is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.registry import make_attributor
from diffattr.cli import main
from diffattr.config import DataConfig
from diffattr.data import load_dataset
from diffattr.data.images import load_image
from diffattr.diffusion.model import load_model
from diffattr.testing import TINY_UNET

TINY = {
    "seed": 0,
    "data": {"source": "digits-2", "size": 8, "limit": 24},
    "model": {**TINY_UNET, "attention_head_dim": 4},
    "scheduler": {"num_train_timesteps": 100},
    "train": {"steps": 6, "batch_size": 8, "lr_warmup_steps": 2, "checkpoint_every": 3},
    "sample": {"num_inference_steps": 4},
}
TRAK_ARGS = ["--timesteps", "2", "--proj-dim", "64", "--batch-size", "8"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    paths = {"root": root, "cfg": cfg, "run": root / "run", "gen": root / "gen"}
    assert main(["-q", "train", "--config", str(cfg), "--out", str(paths["run"])]) == 0
    gen_args = ["-q", "generate", "--model", str(paths["run"]), "--n", "3", "--seed", "0"]
    assert main([*gen_args, "--steps", "4", "--out", str(paths["gen"])]) == 0
    return paths


def featurize(run: Path, method: str, out: Path, *extra: str) -> int:
    return main(
        ["-q", "featurize", "--model", str(run), "--method", method, "--out", str(out), *extra]
    )


def attribute(run: Path, feats: Path, *extra: str) -> int:
    return main(["-q", "attribute", "--model", str(run), "--features", str(feats), *extra])


def test_generate_writes_pngs_grid_and_trajectory(workspace):
    gen = workspace["gen"]
    for name in ["0000.png", "0001.png", "0002.png", "grid.png", "trajectory.safetensors"]:
        assert (gen / name).exists(), name


def test_attribute_matches_the_python_api(workspace, capsys):
    run, gen, feats = workspace["run"], workspace["gen"], workspace["root"] / "feats-trak"
    assert featurize(run, "trak", feats, *TRAK_ARGS) == 0
    out = workspace["root"] / "scores"
    assert attribute(run, feats, "--images", str(gen), "--top-k", "3", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    cli_scores = Scores.load(out)
    assert cli_scores.query_names == ["0000.png", "0001.png", "0002.png"]  # grid.png is no query

    model = load_model(run)
    train = load_dataset(DataConfig(source="digits-2", size=8, limit=24))
    images = torch.stack([load_image(gen / n, model.image_shape) for n in cli_scores.query_names])
    attributor = make_attributor(
        "trak", model, work_dir=feats, timesteps=2, proj_dim=64, batch_size=8
    )
    attributor.fit(train)
    api_scores = attributor.score(Queries(images=images, names=cli_scores.query_names))
    np.testing.assert_array_equal(cli_scores.train_ids, train.ids.numpy())
    np.testing.assert_allclose(cli_scores.values, api_scores.values, rtol=1e-5, atol=1e-6)
    best_id, _ = api_scores.top_k(1)[0][0]
    assert f"id {best_id:6d}" in printed


def test_journey_trak_gets_the_saved_trajectory(workspace):
    run, gen, feats = workspace["run"], workspace["gen"], workspace["root"] / "feats-journey"
    args = ["--proj-dim", "64", "--batch-size", "8", "--option", "query_draws=1"]
    assert featurize(run, "journey-trak", feats, *args) == 0
    out = workspace["root"] / "scores-journey"
    assert attribute(run, feats, "--image", str(gen / "0001.png"), "--out", str(out)) == 0
    scores = Scores.load(out)
    assert scores.per_step is not None and scores.per_step.shape[:2] == (4, 1)
    np.testing.assert_allclose(scores.values, scores.per_step.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_feature_folder_refuses_other_arguments_and_models(workspace, caplog):
    run, feats = workspace["run"], workspace["root"] / "feats-pixel"
    assert featurize(run, "pixel", feats) == 0
    code = featurize(run, "trak", feats, *TRAK_ARGS)
    assert code == 2 and "method" in caplog.text

    other = workspace["root"] / "other-run"
    cfg = yaml.safe_load(workspace["cfg"].read_text())
    cfg["seed"] = 1
    (workspace["root"] / "other.yaml").write_text(yaml.safe_dump(cfg))
    assert (
        main(
            ["-q", "train", "--config", str(workspace["root"] / "other.yaml"), "--out", str(other)]
        )
        == 0
    )
    caplog.clear()
    image = str(workspace["gen"] / "0000.png")
    code = attribute(other, feats, "--image", image)
    assert code == 2 and "model hash" in caplog.text


# ----------------------------------------------------------------- bad input: one line, exit != 0


@pytest.mark.parametrize("n", ["0", "-3", "two"])
def test_generate_refuses_a_non_positive_count(workspace, n, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-q", "generate", "--model", str(workspace["run"]), "--n", n, "--out", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--n: expected an integer >= 1" in err and "Traceback" not in err


@pytest.mark.parametrize("k", ["0", "-1"])
def test_attribute_refuses_a_non_positive_top_k(workspace, k, capsys):
    with pytest.raises(SystemExit) as exc:
        attribute(workspace["run"], workspace["root"], "--image", "x.png", "--top-k", k)
    assert exc.value.code == 2 and "--top-k: expected an integer >= 1" in capsys.readouterr().err


def test_attribute_without_a_store_is_one_clear_error(workspace, caplog):
    empty = workspace["root"] / "empty-folder"
    empty.mkdir(exist_ok=True)
    image = str(workspace["gen"] / "0000.png")
    assert attribute(workspace["run"], empty, "--image", image) == 2
    assert "no diffattr record" in caplog.text and str(empty) in caplog.text
    caplog.clear()
    assert attribute(workspace["run"], workspace["root"] / "nowhere", "--image", image) == 2
    assert "no such folder" in caplog.text


def test_featurize_with_data_of_another_size_is_one_clear_error(workspace, caplog, tmp_path):
    args = ["--data", "digits-2", "--size", "16", *TRAK_ARGS]
    assert featurize(workspace["run"], "trak", tmp_path / "f", *args) == 2
    assert "gives 1x16x16 images but the model" in caplog.text and "takes 1x8x8" in caplog.text
    assert not (tmp_path / "f").exists()


def test_ggda_featurizes_and_attributes_from_the_command_line(workspace, tmp_path, capsys):
    feats = tmp_path / "ggda"
    extra = ["--option", 'groups={"kmeans": 3}', "--option", "timesteps_per_image=1"]
    assert featurize(workspace["run"], "ggda", feats, *TRAK_ARGS, *extra) == 0
    assert attribute(workspace["run"], feats, "--image", str(workspace["gen"] / "0000.png")) == 0
    out = capsys.readouterr().out
    assert "0000.png: top-3 of 3 groups by ggda" in out  # groups, not tied images
    assert out.count("cluster-") == 3 and "stability: exact" in out  # r = 1: no halves


def test_negative_train_steps_are_refused(workspace, caplog, tmp_path):
    cfg = yaml.safe_load(workspace["cfg"].read_text())
    cfg["train"]["steps"] = -5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "train", "--config", str(bad), "--out", str(tmp_path / "m")]) == 2
    assert "train.steps=-5; expected an integer >= 1" in caplog.text
    assert not (tmp_path / "m").exists()


def test_evaluate_checks_method_names_before_any_work(tmp_path, caplog):
    out = tmp_path / "eval"
    code = main(
        ["-q", "evaluate", "--config", "configs/eval/digits2-smoke.yaml", "--methods",
         "pixel,nosuch", "--out", str(out)]
    )  # fmt: skip
    assert code == 2 and "methods.nosuch" in caplog.text and "valid names" in caplog.text
    assert not out.exists()  # nothing was trained
    from diffattr.evaluation.config import load_eval_config
    from diffattr.evaluation.harness import check_methods

    cfg = load_eval_config("configs/eval/digits2-smoke.yaml")
    check_methods(cfg, list(cfg.methods), "smoke")  # every configured entry is valid
    with pytest.raises(ValueError, match="methods.trak: .*unknown option"):
        check_methods(load_eval_config_with(cfg, trak={"timestepz": 3}), ["trak"], "x")


def load_eval_config_with(cfg, **methods):
    import dataclasses

    return dataclasses.replace(cfg, methods={**cfg.methods, **methods})


def test_top_k_csv_has_top_k_rows_and_stability_is_printed(workspace, capsys):
    run, gen, feats = workspace["run"], workspace["gen"], workspace["root"] / "feats-dtrak-k"
    assert featurize(run, "d-trak", feats, *TRAK_ARGS) == 0
    out = workspace["root"] / "scores-k"
    assert attribute(run, feats, "--images", str(gen), "--top-k", "4", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    lines = (out / "top_k.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 3 * 4  # header + 4 rows per query
    assert printed.count("stability: ") == 3 and "of the top-4 shared" in printed
    saved = json.loads((out / "scores.json").read_text())["stability"]
    assert saved["top_k"] == 4 and len(saved["per_query"]) == 3


def test_a_demo_style_feature_folder_is_accepted(workspace):
    """The demo writes its features with fit_into_folder; attribute must reopen them."""
    from diffattr.attribution.saved import fit_into_folder

    run = workspace["run"]
    model = load_model(run)
    data_cfg = DataConfig(source="digits-2", size=8, limit=24)
    feats = workspace["root"] / "demo-features" / "d-trak"
    fit_into_folder(
        model, run, "d-trak", {"timesteps": 2, "proj_dim": 64}, data_cfg, load_dataset(data_cfg),
        feats, progress=False,
    )  # fmt: skip
    assert attribute(run, feats, "--image", str(workspace["gen"] / "0002.png")) == 0


def test_too_small_kronecker_dim_is_one_clear_error(workspace, caplog):
    feats = workspace["root"] / "feats-small-k"
    assert featurize(workspace["run"], "trak", feats, "--proj-dim", "16") == 2
    assert "kronecker projector needs dim >= the number of layers" in caplog.text
