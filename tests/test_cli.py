"""The command line: every command is listed and documented, and user errors are one clear line."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest

from diffattr.cli import _data_config, build_parser, main
from diffattr.config import config_from_dict
from diffattr.diffusion.model import build_model, save_model
from diffattr.errors import UserError
from diffattr.testing import TINY_UNET

COMMANDS = ["train", "generate", "data", "methods", "featurize", "attribute", "evaluate", "demo"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--" in capsys.readouterr().out  # its options are listed


def test_train_and_generate_options_match_the_readme():
    parser = build_parser()
    args = parser.parse_args(["train", "--config", "configs/digits2.yaml", "--out", "runs/digits2"])
    assert args.config == "configs/digits2.yaml" and args.out == "runs/digits2"
    args = parser.parse_args(
        ["generate", "--model", "runs/digits2", "--n", "16", "--seed", "0", "--out", "gen/"]
    )
    assert (args.n, args.seed, args.out) == (16, 0, "gen/")


def test_data_list_and_inspect(capsys):
    assert main(["data", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ["digits", "digits-2", "cifar10", "cifar2", "artbench10", "imagefolder"]:
        assert name in listed
    assert main(["data", "inspect", "digits-2", "--size", "8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_shape"] == [1, 8, 8]
    assert set(info["classes"]) == {"0", "1"}


def test_missing_data_folder_is_one_clear_error(tmp_path, caplog):
    code = main(["data", "inspect", "cifar2", "--data-root", str(tmp_path / "nowhere")])
    assert code == 2
    assert "nowhere" in caplog.text


# ------------------------------------------------------- data defaults that agree with the model

TINY16 = {
    "seed": 0,
    "data": {"source": "digits-2", "size": 16, "limit": 24},
    "model": {**TINY_UNET, "sample_size": 16, "attention_head_dim": 4},
    "scheduler": {"num_train_timesteps": 100},
}


@pytest.fixture(scope="module")
def model16(tmp_path_factory) -> Path:
    """An untrained tiny 16x16 model that records digits-2 at size 16, 24 images (as `train`
    records its config), saved like `diffattr train` saves one."""
    path = tmp_path_factory.mktemp("model16") / "model"
    save_model(build_model(config_from_dict(TINY16)), path)
    return path


def _featurize(model: Path, out: Path, *extra: str) -> int:
    return main(["-q", "featurize", "--model", str(model), "--out", str(out), *extra])


def _data_of(features: Path) -> dict:
    return json.loads((features / "diffattr.json").read_text())["identity"]["data"]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        ([], {"source": "digits-2", "size": 16, "limit": 24}),  # the recorded data
        (["--data", "digits-2"], {"source": "digits-2", "size": 16, "limit": 24}),  # the README's
        (["--data", "digits-2", "--limit", "10"], {"source": "digits-2", "size": 16, "limit": 10}),
        (["--data", "digits", "--limit", "12"], {"source": "digits", "size": 16, "limit": 12}),
    ],
)
def test_featurize_reads_the_data_at_the_models_size(model16, tmp_path, extra, want):
    """`train --config configs/digits2.yaml` then `featurize --data digits-2` (the README's tour):
    the data is read at the model's 16x16, the recorded settings kept when --data names the
    recorded source, and another source is read at the model's size."""
    out = tmp_path / "feats"
    assert _featurize(model16, out, "--method", "pixel", *extra) == 0
    data = _data_of(out)
    assert {k: data[k] for k in want} == want


def test_a_model_without_a_record_reads_data_at_its_size(model16, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model16, bare)
    (bare / "diffattr.json").unlink()  # a plain diffusers pipeline folder
    out = tmp_path / "feats"
    assert _featurize(bare, out, "--method", "pixel", "--data", "digits-2", "--limit", "8") == 0
    assert _data_of(out)["size"] == 16


def test_size_given_by_the_user_wins(model16, tmp_path, caplog):
    code = _featurize(model16, tmp_path / "f", "--method", "pixel", "--data", "digits-2",
                      "--size", "8")  # fmt: skip
    assert code == 2  # read at 8 as asked, then refused before any folder is written
    (message,) = _errors(caplog)
    assert "gives 1x8x8 images" in message and "takes 1x16x16" in message
    assert not (tmp_path / "f").exists()


def test_a_source_that_cannot_give_the_models_size_is_one_line_error(tmp_path, caplog):
    args = build_parser().parse_args(
        ["featurize", "--model", "M64", "--data", "digits-2", "--method", "pixel", "--out", "x"]
    )
    model64 = types.SimpleNamespace(record={}, image_shape=(1, 64, 64))
    with pytest.raises(UserError) as exc:
        _data_config(args, model64)
    text = str(exc.value)
    assert "M64 takes 64x64" in text and "digits-2 can be read only at sizes 8..32" in text
    # --size is the user's choice: passed through (the data set loader then says what it takes)
    args.size = 16
    assert _data_config(args, model64).size == 16
    # a source that resizes to any size reads at the model's
    args.size, args.data, args.data_root = None, "imagefolder", str(tmp_path)
    assert _data_config(args, model64).size == 64


# ------------------------------------------------------------------ bad input: one line each


def test_a_params_pattern_that_matches_nothing_is_one_line_error(model16, tmp_path, caplog):
    code = _featurize(model16, tmp_path / "f", "--method", "unlearn",
                      "--option", 'params=["nosuch.*", "up_blocks.*"]')  # fmt: skip
    assert code == 2
    (message,) = _errors(caplog)
    assert "\n" not in message and message.startswith("params: pattern 'nosuch.*' matches no")
    assert "'up_blocks.*'" not in message  # only the bad pattern is named
    assert "conv_in.weight" in message and "up_blocks.*" in message  # names and groups
    assert "up-blocks" in message and "all" in message  # unlearn's named groups
    # Refused before the folder was written: the corrected command works into the same --out.
    assert not (tmp_path / "f" / "diffattr.json").exists()
    for method in ("unlearn", "trak"):
        out = tmp_path / f"bad-{method}"
        args = ("--method", method, "--option", 'params=["nosuch.*"]')
        assert _featurize(model16, out, *args) == 2 and not (out / "diffattr.json").exists()


@pytest.mark.parametrize(("method", "kind"), [("clip", "CLIP (vision)"), ("dino", "DINOv2")])
def test_a_diffusers_folder_as_embedding_model_is_one_line_error(
    model16, tmp_path, caplog, method, kind
):
    unet = model16 / "unet"
    code = _featurize(model16, tmp_path / "f", "--method", method, "--option", f"model={unet}")
    assert code == 2
    (message,) = _errors(caplog)
    assert "\n" not in message and "None" not in message
    assert f"model={unet} is not a {kind} checkpoint" in message
    assert "a diffusers UNet2DModel" in message and "save_pretrained" in message
    assert ("open_clip:" in message) == (method == "clip")


def test_featurize_an_ensemble_then_attribute_with_it(model16, tmp_path, capsys, caplog):
    """`featurize --ensemble B,C` records the other models; `attribute` scores with all three
    (each model's d-trak, standardised per query, averaged) and refuses a changed member."""
    import numpy as np

    from diffattr.attribution.base import Queries, Scores
    from diffattr.attribution.ensemble import standardise
    from diffattr.attribution.registry import make_attributor
    from diffattr.data import load_dataset
    from diffattr.data.images import load_image, save_image
    from diffattr.diffusion.model import load_model

    others = []
    for seed in (1, 2):
        path = tmp_path / f"m{seed}"
        save_model(build_model(config_from_dict({**TINY16, "seed": seed})), path)
        others.append(path)
    opts = ["--timesteps", "2", "--proj-dim", "64", "--option", "stability=false"]
    out = tmp_path / "ens"
    members = ",".join(map(str, others))
    assert _featurize(model16, out, "--method", "d-trak", *opts, "--ensemble", members) == 0
    image = tmp_path / "q.png"
    train = load_dataset(config_from_dict(TINY16).data)
    save_image(train.images[3], image)
    scores_dir = tmp_path / "scores"
    code = main(["-q", "attribute", "--model", str(model16), "--features", str(out),
                 "--image", str(image), "--out", str(scores_dir)])  # fmt: skip
    assert code == 0
    got = Scores.load(scores_dir)
    q = Queries(images=load_image(image, (1, 16, 16))[None], names=["q.png"])
    parts = []
    for path in [model16, *others]:
        one = make_attributor("d-trak", load_model(path), timesteps=2, proj_dim=64, stability=False)
        one.fit(train)
        parts.append(one.score(q).values)
    want = np.mean([standardise(p) for p in parts], axis=0)
    np.testing.assert_allclose(got.values, want, atol=1e-5)
    assert len(got.config["ensemble"]["members"]) == 3
    # A member retrained since: its hash no longer matches the features.
    save_model(build_model(config_from_dict({**TINY16, "seed": 7})), others[1])
    caplog.clear()
    code = main(["-q", "attribute", "--model", str(model16), "--features", str(out),
                 "--image", str(image)])  # fmt: skip
    assert code != 0
    (message,) = _errors(caplog)
    assert str(others[1]) in message and "hash" in message and "\n" not in message


def test_a_folder_from_before_an_option_existed_still_reopens(model16, tmp_path, caplog):
    """A feature folder recorded before `normalize` existed (its options lack the key) is the
    same as one at the new option's default: featurizing into it again resumes; asking for
    another value is refused."""
    out = tmp_path / "old"
    opts = ["--method", "d-trak", "--timesteps", "2", "--proj-dim", "64"]
    assert _featurize(model16, out, *opts) == 0
    record = json.loads((out / "diffattr.json").read_text())
    del record["identity"]["options"]["normalize"]
    (out / "diffattr.json").write_text(json.dumps(record))
    assert _featurize(model16, out, *opts) == 0
    caplog.clear()
    assert _featurize(model16, out, *opts, "--option", "normalize=true") != 0
    (message,) = _errors(caplog)
    assert "normalize" in message
