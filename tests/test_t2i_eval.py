"""Text-to-image evaluation: LDS by LoRA retraining on a base trained here, and the
customization benchmark (configs/eval/t2i-digit-styles-smoke.yaml, a few steps everywhere)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score

from diffattr.config import ConfigError
from diffattr.data.dataset import DataError
from diffattr.diffusion.lora import lora_state_dict
from diffattr.diffusion.model import load_model
from diffattr.evaluation.config import eval_config_from_dict, load_eval_config
from diffattr.evaluation.customization import ranking_metrics
from diffattr.evaluation.harness import evaluate
from diffattr.evaluation.subsets import load_subsets
from diffattr.repro import MismatchError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "eval" / "t2i-digit-styles-smoke.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i-eval") / "eval"
    result = evaluate(SMOKE, None, out, progress=False)
    return out, result


def _files(folder: pathlib.Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}


def test_every_stage_writes_its_results_and_a_rerun_recomputes_nothing(run):
    out, first = run
    results = json.loads((out / "results.json").read_text())
    assert {m["method"] for m in results["methods"]} == {"pixel", "d-trak", "unlearn"}
    assert all(m["error"] is None and not m["set_errors"] for m in results["methods"])
    custom = results["customization"]
    assert set(custom) == {"pixel", "d-trak", "unlearn"}
    assert all(0.0 <= custom[m]["mAP"]["mean"] <= 1.0 for m in custom)
    assert "Customization benchmark" in (out / "comparison.md").read_text()
    # Group LDS: the LoRA retrained without whole caption groups.
    groups = results["group_subsets"]
    assert len(groups["groups"]["names"]) >= 4
    assert all("group_lds" in m for m in results["methods"])
    before = _files(out)
    again = evaluate(SMOKE, None, out, progress=False)
    assert _files(out) == before  # no model, store or score file rewritten
    for a, b in zip(first.methods, again.methods, strict=True):
        assert a.lds["held_out"].mean == b.lds["held_out"].mean


def test_subset_loras_differ_only_in_the_lora(run):
    out, _ = run
    full = load_model(out / "full_model")
    models = [load_model(p) for p in sorted((out / "models").iterdir())]
    base = load_model(out / "base" / "model")
    assert full.base_hash() == base.model_hash()
    for m in models:
        assert m.base_hash() == full.base_hash()  # the base weights are bit-identical
    assert len({m.lora_hash() for m in [full, *models]}) == len(models) + 1
    record = json.loads((out / "models" / "subset-000-seed-0" / "diffattr.json").read_text())
    kept = sorted(load_subsets(out / "subsets").ids(0).tolist())
    assert sorted(record["train_ids"]) == kept


def test_a_subset_keeping_everything_reproduces_the_full_lora(run, tmp_path):
    from diffattr.data import load_dataset
    from diffattr.diffusion.lora_trainer import train_lora
    from diffattr.evaluation.retrain import LocalAccelerator, TrainJob, job_subset

    out, _ = run
    cfg = load_eval_config(SMOKE)
    exp = cfg.experiment
    exp.base_model = str(out / "base" / "model")
    train = load_dataset(exp.data)
    job = TrainJob("all", exp, train.ids.numpy()[::-1].copy(), tmp_path / "all")
    again = train_lora(exp, job_subset(train, job), job.out_dir, False, LocalAccelerator())
    full = load_model(out / "full_model")
    want, got = lora_state_dict(full.unet), lora_state_dict(again.unet)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_ranking_metrics_match_sklearn_and_hand_counts():
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = rng.normal(size=40)
        relevant = np.zeros(40, dtype=bool)
        relevant[rng.choice(40, size=int(rng.integers(1, 6)), replace=False)] = True
        recall, ap = ranking_metrics(values, relevant)
        assert ap == pytest.approx(average_precision_score(relevant, values))
        top10 = np.argsort(-values)[:10]
        assert recall[10] == relevant[top10].sum() / relevant.sum()
    # Ties count against the exemplars: a constant score finds nothing.
    recall, ap = ranking_metrics(np.zeros(20), np.arange(20) < 2)
    assert recall[10] == 0.0 and ap == pytest.approx((1 / 19 + 2 / 20) / 2)


def _smoke_values() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def test_bad_configs_are_one_line_errors(tmp_path, run):
    values = _smoke_values()
    values.pop("base")
    with pytest.raises(ConfigError, match="no 'base' section"):
        eval_config_from_dict(values)
    values = _smoke_values()
    values["customization"]["caption"] = "a {digit} in some style"
    with pytest.raises(ConfigError, match=r"must contain \{token\}"):
        eval_config_from_dict(values)
    values = _smoke_values()
    values["customization"]["data"] = {"nosuch": 1}
    with pytest.raises(ConfigError, match=r"customization\.data: unknown key"):
        eval_config_from_dict(values)
    values = _smoke_values()
    values["customization"]["sets"][0]["prompts_from"] = "elsewhere"
    with pytest.raises(ConfigError, match="prompts_from"):
        eval_config_from_dict(values)
    values = _smoke_values()
    values["counterfactual"] = {"enabled": True, "queries": 1}
    with pytest.raises(ConfigError, match="not available for text-to-image"):
        eval_config_from_dict(values)
    # An empty style: a customization set whose style the data does not have.
    values = _smoke_values()
    values["customization"]["sets"][0]["style"] = "nosuch"
    path = tmp_path / "bad-style.yaml"
    path.write_text(yaml.safe_dump(values))
    out, _ = run
    with pytest.raises(DataError, match="nosuch") as err:
        evaluate(path, None, tmp_path / "e", progress=False)
    assert "\n" not in str(err.value)
    # The base model changed under a finished evaluation: refused, not mixed.
    values = _smoke_values()
    values["base"]["seed"] = 1
    path = tmp_path / "other-base.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(MismatchError, match="base"):
        evaluate(path, None, out, progress=False)


def test_a_lora_for_another_base_is_refused(run, tmp_path):
    from diffattr.diffusion.lora import LoraLoadError
    from diffattr.diffusion.text2image import TextToImageLoadError, load_text_to_image
    from diffattr.testing import tiny_t2i_folder

    out, _ = run
    other = tiny_t2i_folder(tmp_path / "other")
    with pytest.raises((LoraLoadError, TextToImageLoadError)) as err:
        load_text_to_image(other, lora=out / "full_model")
    assert "\n" not in str(err.value)


def test_a_customized_models_exemplars_rank_first_for_its_generations(tmp_path):
    """A real signal: the shipped base fine-tuned on one exemplar of a style it never saw, under
    a new word; asked for that caption again, its generations are attributed to the exemplar,
    first among a pool of 20 of the base's training images, by at least one method (measured:
    d-trak and unlearn for every query, pixels for 3 of 4: the generations are not copies)."""
    from diffattr.evaluation.customization import run_customization

    values = _smoke_values()
    values.pop("base")
    values["experiment"]["base_model"] = str(ROOT / "assets" / "t2i-digit-styles")
    custom = values["customization"]
    custom["sets"][0]["exemplars"] = 1
    custom["train"].update(steps=200, learning_rate=1.0e-3, batch_size=2)
    custom.update(
        tune="all",
        methods=["pixel", "d-trak"],
        num_inference_steps=20,
        queries_per_set=4,
        prompts_from="exemplars",
    )
    cfg = eval_config_from_dict(values)
    summary = run_customization(cfg, cfg.experiment.base_model, [], tmp_path, progress=False)
    assert max(s["mAP"]["mean"] for s in summary.values()) == 1.0  # first, for every query


def test_shipped_base_is_the_one_its_config_trains():
    """assets/t2i-digit-styles records the config it was trained from, that config is the one in
    configs/, and the config still builds this architecture (names and shapes of every weight)."""
    from diffattr.config import scratch_config_from_dict
    from diffattr.data import load_dataset
    from diffattr.diffusion.t2i_scratch import _components, caption_vocabulary

    cfg = scratch_config_from_dict(
        yaml.safe_load((ROOT / "configs" / "t2i-digit-styles-base.yaml").read_text())
    )
    shipped = load_model(ROOT / "assets" / "t2i-digit-styles")  # checks the recorded hashes
    record = shipped.record
    assert record["scratch_config"] == cfg.to_dict()
    data = load_dataset(cfg.data)
    assert record["data_hash"] == data.data_hash()
    words = caption_vocabulary(data, cfg.text.extra_words)
    assert tuple(record["vae_training"]["words"]) == words
    vae, text_encoder, unet = _components(cfg, len(shipped.tokenizer.get_vocab()), data.image_shape)
    for built, ship in (
        (vae, shipped.vae),
        (text_encoder, shipped.text_encoder),
        (unet, shipped.unet),
    ):
        want = {k: tuple(v.shape) for k, v in ship.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == want


def test_train_cli_makes_a_pipeline_from_scratch_and_reuses_it(tmp_path):
    """`diffattr train` on a kind: text-to-image-scratch config writes a pipeline folder that
    loads as a text-to-image model; a second run reuses it (same hash, nothing retrained)."""
    from diffattr.cli import main

    values = _smoke_values()["base"]
    values["kind"] = "text-to-image-scratch"
    config = tmp_path / "scratch.yaml"
    config.write_text(yaml.safe_dump(values))
    assert main(["-q", "train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    model = load_model(tmp_path / "run" / "model")
    assert model.record["scratch_config"]["vae"]["steps"] == values["vae"]["steps"]
    weights = tmp_path / "run" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["-q", "train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert weights.stat().st_mtime_ns == before
    assert load_model(tmp_path / "run" / "model").model_hash() == model.model_hash()
