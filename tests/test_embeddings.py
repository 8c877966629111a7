"""The embedding-similarity baselines (clip, dino, unet-features) and the generic store loop.

Checkpoints are tiny random transformers models saved with ``save_pretrained`` (model and image
processor) and loaded through the user's code path (``make_attributor(..., model=folder)``).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffattr.attribution.base import Queries
from diffattr.attribution.methods.embedding import (
    CheckpointError,
    CheckpointNotFoundError,
    EmbeddingAttributor,
)
from diffattr.attribution.registry import make_attributor
from diffattr.attribution.store import (
    FeatureStore,
    IncompleteStoreError,
    StoreMismatchError,
    fill_store,
)
from diffattr.attribution.timesteps import noise_for
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import DiffusionModel
from diffattr.errors import OptionError
from diffattr.testing import tiny_clip_folder, tiny_dino_folder, tiny_model

N = 10


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    return tiny_model(num_train_timesteps=100)


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    images = torch.rand(N, 1, 8, 8, generator=g) * 2 - 1
    return ImageDataset("toy", images, torch.arange(N) * 7 + 3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "clip": tiny_clip_folder(root / "clip"),
        "clip-other": tiny_clip_folder(root / "clip-other", seed=1),
        "clip-48": tiny_clip_folder(root / "clip-48", size=48),
        "dino": tiny_dino_folder(root / "dino"),
        "dino-48": tiny_dino_folder(root / "dino-48", size=48),
    }


def build(name: str, model: Any, work: Path | None, /, **options: Any) -> EmbeddingAttributor:
    attr = make_attributor(name, model, work, **options)
    assert isinstance(attr, EmbeddingAttributor)
    return attr


def copies(train: ImageDataset) -> Queries:
    return Queries(train.images.clone(), [f"copy-{int(i)}" for i in train.ids])


VARIANTS = [
    ("clip", {}),
    ("dino", {}),
    ("dino", {"pooling": "mean"}),
    ("unet-features", {}),
    ("unet-features", {"pooling": "mean", "num_noise": 3}),
    ("unet-features", {"timestep": 50, "num_noise": 2}),
    ("pixel", {}),
]


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_exact_copies_rank_first(name, options, model, train, ckpt) -> None:
    if name in ("clip", "dino"):
        options = {**options, "model": str(ckpt[name])}
    attr = make_attributor(name, model, None, **options)
    attr.fit(train)
    s = attr.score(copies(train))
    np.testing.assert_array_equal(s.values.argmax(axis=1), np.arange(N))
    np.testing.assert_allclose(np.diag(s.values), 1.0, atol=1e-5)
    assert (s.halves is not None) == (options.get("num_noise", 1) >= 2)
    json.dumps(s.config)
    if name != "pixel":
        assert {"fit_s", "score_s"} <= set(s.config["timing"])
        assert "embedder" in s.config


def test_halves_give_a_stability_figure(model, train) -> None:
    attr = build("unet-features", model, None, num_noise=4)
    attr.fit(train)
    s = attr.score(copies(train))
    assert s.halves is not None
    for half in s.halves:  # each half alone still ranks the exact copy first
        np.testing.assert_array_equal(half.argmax(axis=1), np.arange(N))
    stab = s.stability(1)
    assert stab is not None and np.all(stab.overlap == 1.0)
    # the full embedding is the mean of the two halves (2 + 2 draws)
    q = attr.embedder.embed(train.images[:1], None)
    full, halves = attr.split(q)
    assert halves is not None
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2)


def test_store_round_trip_without_recompute(model, train, ckpt, tmp_path) -> None:
    work = tmp_path / "work"
    first = build("clip", model, work, model=str(ckpt["clip"]), batch_size=3, shard_size=4)
    first.fit(train)
    s1 = first.score(copies(train))
    folders = [p for p in work.iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("clip-")
    store = FeatureStore.open(folders[0])
    assert store.manifest["num_shards"] == 3 and store.feature_shape == (N, 16)
    assert store.manifest["identity"]["data_hash"] == train.data_hash()

    second = build("clip", model, work, model=str(ckpt["clip"]), batch_size=3, shard_size=4)
    rows: list[int] = []
    embed = second.embedder.embed

    def counting(images: torch.Tensor, labels: Any) -> torch.Tensor:
        rows.append(int(images.shape[0]))
        return embed(images, labels)

    second.embedder.embed = counting
    second.fit(train)
    assert sum(rows) <= 1  # the feature-shape probe only: the store was read, not recomputed
    np.testing.assert_array_equal(second.score(copies(train)).values, s1.values)
    torch.testing.assert_close(second.train_full, store.features, rtol=0, atol=0)


def test_other_model_or_data_gets_another_folder_or_is_refused(
    model, train, ckpt, tmp_path
) -> None:
    work = tmp_path / "work"
    a = build("clip", model, work, model=str(ckpt["clip"]))
    a.fit(train)
    b = build("clip", model, work, model=str(ckpt["clip-other"]))
    other_data = train.select_ids(train.ids[:6])
    assert b.store_path(train) != a.store_path(train)
    assert a.store_path(other_data) != a.store_path(train)
    b.fit(train)
    assert len([p for p in work.iterdir() if p.is_dir()]) == 2

    # Forced into the first model's folder, another model or data set is refused by field name.
    b.store_path = lambda data: a.store_path(train)  # type: ignore[method-assign]
    with pytest.raises(StoreMismatchError, match=r"embedder\.weights_sha256"):
        b.fit(train)
    a2 = build("clip", model, work, model=str(ckpt["clip"]))
    a2.store_path = lambda data: a.store_path(train)  # type: ignore[method-assign]
    with pytest.raises(StoreMismatchError, match="data_hash"):
        a2.fit(other_data)


def test_same_checkpoint_elsewhere_shares_the_store(model, train, ckpt, tmp_path) -> None:
    """The identity is the checkpoint's content (weights, configs), not its path."""
    import shutil

    moved = Path(shutil.copytree(ckpt["dino"], tmp_path / "moved-dino"))
    a = build("dino", model, tmp_path / "w", model=str(ckpt["dino"]))
    b = build("dino", model, tmp_path / "w", model=str(moved))
    assert a.store_path(train) == b.store_path(train)
    c = build("dino", model, tmp_path / "w", model=str(moved), pooling="mean")
    assert c.store_path(train) != a.store_path(train)


def test_unet_features_equal_a_brute_force_reference(model, train, tmp_path) -> None:
    t, seed = 30, 4
    attr = build("unet-features", model, tmp_path, timestep=t, seed=seed, num_noise=2, batch_size=1)
    attr.fit(train)
    abar = model.scheduler.alphas_cumprod[t]
    captured: list[torch.Tensor] = []
    handle = model.unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        refs = []
        for x in train.images:
            draws = []
            for d in range(2):
                noise = noise_for(seed, 0, t, d, (1, 8, 8), "shared")
                x_t = abar**0.5 * x[None] + (1 - abar) ** 0.5 * noise[None]
                with torch.no_grad():
                    model.unet(x_t, torch.tensor([t]))
                draws.append(captured.pop().flatten(1))
            refs.append(torch.stack(draws, dim=1))
    finally:
        handle.remove()
    ref = torch.cat(refs)  # (N, 2 draws, d); with 2 draws each half is one draw
    # queries (embedded one at a time) and the store (batch_size 1) match the reference exactly
    q = attr.embedder.embed(train.images[:1], None)
    torch.testing.assert_close(q, ref[:1], rtol=0, atol=0)
    stored = FeatureStore.open(attr.store_path(train)).features
    torch.testing.assert_close(stored, ref, rtol=0, atol=0)
    torch.testing.assert_close(attr.train_full, ref.mean(dim=1), rtol=0, atol=0)


def test_unet_noise_does_not_depend_on_the_image(model, train) -> None:
    """Shared noise: an image's embedding is the same alone, in a batch, under any id or name."""
    attr = build("unet-features", model, None)
    alone = attr.embedder.embed(train.images[3:4], None)
    batch = attr.embedder.embed(train.images.flip(0), None)
    torch.testing.assert_close(batch[N - 1 - 3 : N - 3], alone)
    renamed = ImageDataset("other", train.images, train.ids + 1000)
    attr.fit(renamed)
    torch.testing.assert_close(attr.train_full[3:4], alone)


def test_the_processor_size_comes_from_the_checkpoint(model, train, ckpt) -> None:
    for name in ("clip", "dino"):
        for key, size in ((name, 32), (f"{name}-48", 48)):
            attr = build(name, model, None, model=str(ckpt[key]))
            assert attr.embedder.pixels is not None
            px = attr.embedder.pixels(train.images[:2])
            assert tuple(px.shape) == (2, 3, size, size)


def test_grey_images_become_uint8_rgb() -> None:
    from diffattr.attribution.methods.embedding import to_uint8_rgb

    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    (img,) = to_uint8_rgb(x)
    assert img.dtype == np.uint8 and img.shape == (2, 2, 3)
    np.testing.assert_array_equal(img[..., 0], [[0, 128], [255, 255]])
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    with pytest.raises(ValueError, match="1 or 3"):
        to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def test_a_full_clip_checkpoint_is_accepted(model, train, tmp_path) -> None:
    """Real CLIP folders (openai/clip-vit-*) hold the whole CLIPModel, model_type 'clip'."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 99,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 16,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "full")
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(tmp_path / "full")
    attr = build("clip", model, None, model=str(tmp_path / "full"))
    attr.fit(train)
    assert attr.score(copies(train)).values.argmax(axis=1).tolist() == list(range(N))


# ----------------------------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_or_wrong_folders_are_one_line_errors(model, ckpt, tmp_path) -> None:
    missing = tmp_path / "nope" / "clip-vit-base-patch32"
    with pytest.raises(CheckpointNotFoundError) as exc:
        make_attributor("clip", model, None, model=str(missing))
    assert str(missing) in _one_line(exc) and "no such folder" in str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as exc:
        make_attributor("clip", model, None, model=str(empty))
    assert str(empty) in _one_line(exc) and "no config.json" in str(exc.value)
    assert "CLIP checkpoint folder" in str(exc.value)

    with pytest.raises(CheckpointError) as exc:
        make_attributor("clip", model, None, model=str(ckpt["dino"]))
    assert str(ckpt["dino"]) in _one_line(exc) and "'dinov2'" in str(exc.value)
    with pytest.raises(CheckpointError) as exc:
        make_attributor("dino", model, None, model=str(ckpt["clip"]))
    assert str(ckpt["clip"]) in _one_line(exc) and "DINOv2" in str(exc.value)

    no_proc = tmp_path / "no-proc"
    no_proc.mkdir()
    (no_proc / "config.json").write_text((ckpt["clip"] / "config.json").read_text())
    with pytest.raises(CheckpointError) as exc:
        make_attributor("clip", model, None, model=str(no_proc))
    assert str(no_proc) in _one_line(exc) and "preprocessor_config.json" in str(exc.value)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        (no_weights / f).write_text((ckpt["clip"] / f).read_text())
    with pytest.raises(CheckpointError) as exc:
        make_attributor("clip", model, None, model=str(no_weights))
    assert str(no_weights) in _one_line(exc)

    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a folder"):
        make_attributor("dino", model, None, model=str(a_file))


def test_a_diffusers_model_folder_is_refused_saying_what_it_is(model, tmp_path) -> None:
    """`--option model=<the diffusion model's folder>`: the error names the folder, what it holds
    and what the method expects (never "a None checkpoint")."""
    from diffattr.diffusion.model import save_model

    pipeline = save_model(model, tmp_path / "model")
    for method, name in (("clip", "CLIP (vision)"), ("dino", "DINOv2")):
        with pytest.raises(CheckpointError) as exc:
            make_attributor(method, model, None, model=str(pipeline / "unet"))
        text = _one_line(exc)
        assert "None" not in text
        assert f"{method}: model={pipeline / 'unet'} is not a {name} checkpoint" in text
        assert "a diffusers UNet2DModel (its config.json has a _class_name" in text
        assert "save_pretrained" in text and "preprocessor_config.json" in text
        assert ("open_clip:ARCH" in text and "openclip extra" in text) == (method == "clip")
        with pytest.raises(CheckpointError) as exc:
            make_attributor(method, model, None, model=str(pipeline))
        assert "a diffusers DDPMPipeline folder (model_index.json" in _one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        make_attributor("clip", model, None, model=str(pipeline / "scheduler"))
    assert "no config.json (it holds scheduler_config.json)" in _one_line(exc)


def test_a_hub_id_that_cannot_be_fetched_is_one_clear_error(model, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as exc:
        make_attributor("clip", model, None, model="nobody-here/no-such-clip")
    text = _one_line(exc)
    assert "no-such-clip" in text and "hub id" in text


def test_open_clip_absent_is_a_clear_error(model, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(CheckpointError, match=r"openclip extra") as exc:
        make_attributor("clip", model, None, model="open_clip:ViT-B-32", pretrained="openai")
    assert "open_clip:ViT-B-32" in _one_line(exc)


def test_open_clip_models_are_used_when_installed(model, train, monkeypatch) -> None:
    """The open_clip path with a stand-in module (the package itself is an optional extra)."""
    made: list[tuple[str, str]] = []

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(3 * 8 * 8, 12)

        def encode_image(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.flatten(1))

    def preprocess(image: Any) -> torch.Tensor:
        return torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) / 255

    def create_model_and_transforms(arch: str, pretrained: str, device: Any) -> tuple:
        made.append((arch, pretrained))
        return Tower(), None, preprocess

    fake = types.ModuleType("open_clip")
    fake.create_model_and_transforms = create_model_and_transforms  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    attr = build("clip", model, None, model="open_clip:ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert made == [("ViT-B-32", "laion2b_s34b_b79k")]
    attr.fit(train)
    assert attr.score(copies(train)).values.argmax(axis=1).tolist() == list(range(N))
    assert attr.config()["embedder"]["backend"] == "open_clip"


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("clip", {}, "model"),
        ("clip", {"model": ""}, "model"),
        ("clip", {"model": "x/y", "pretrained": "openai"}, "pretrained"),
        ("clip", {"model": "open_clip:ViT-B-32"}, "pretrained"),
        ("dino", {"model": "x/y", "pooling": "max"}, "pooling"),
        ("unet-features", {"timestep": -1}, "timestep"),
        ("unet-features", {"num_noise": 0}, "num_noise"),
        ("unet-features", {"pooling": "cls"}, "pooling"),
        ("unet-features", {"batch_size": 0}, "batch_size"),
        ("unet-features", {"shard_size": True}, "shard_size"),
    ],
)
def test_bad_options_name_the_field(name, options, field, model) -> None:
    with pytest.raises(OptionError, match=field):
        make_attributor(name, model, None, **options)


def test_a_timestep_beyond_the_schedule_is_refused(model) -> None:
    with pytest.raises(ValueError, match=r"timestep: 100 is not in \[0, 100\)"):
        make_attributor("unet-features", model, None, timestep=100)


def test_cli_style_folders_take_the_model_option(model, train, ckpt, tmp_path) -> None:
    """``diffattr featurize --method clip --option model=...`` goes through fit_into_folder."""
    from diffattr.attribution.saved import fit_into_folder

    out = tmp_path / "features" / "clip"
    attr = fit_into_folder(
        model, "m", "clip", {"model": str(ckpt["clip"])}, {"source": "toy"}, train, out, False
    )
    assert attr.score(copies(train)).values.shape == (N, N)
    record = json.loads((out / "diffattr.json").read_text())
    assert record["identity"]["options"]["model"] == str(ckpt["clip"])


# ----------------------------------------------------------------------------------- fill_store


def test_fill_store_resumes_and_refuses(tmp_path) -> None:
    ids = torch.tensor([5, 1, 9, 2, 7])
    values = torch.arange(10.0).reshape(5, 2)
    computed: list[int] = []

    def compute(sl: slice) -> torch.Tensor:
        computed.append(sl.start)
        return values[sl]

    class Killed(Exception):
        pass

    def kill_after_first(i: int) -> None:
        raise Killed

    ident = {"what": "test", "n": 5}
    with pytest.raises(Killed):
        fill_store(tmp_path / "s", ident, ids, 2, compute, (2,), False, on_shard=kill_after_first)
    with pytest.raises(IncompleteStoreError):
        FeatureStore.open(tmp_path / "s")
    store = fill_store(tmp_path / "s", ident, ids, 2, compute, (2,), False)
    assert computed == [0, 2, 4]  # shard 0 was not computed again
    torch.testing.assert_close(store.features, values)
    assert store.ids.tolist() == ids.tolist()
    with pytest.raises(StoreMismatchError, match="what"):
        fill_store(tmp_path / "s", {**ident, "what": "other"}, ids, 2, compute, (2,), False)
    with pytest.raises(ValueError, match="shape"):
        fill_store(tmp_path / "t", ident, ids, 2, lambda sl: values[sl, :1], (2,), False)
    with pytest.raises(ValueError, match="non-finite"):
        fill_store(tmp_path / "u", ident, ids, 2, lambda sl: values[sl] / 0, (2,), False)
