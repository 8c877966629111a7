"""Similarity baselines in an embedding space: ``clip``, ``dino`` and ``unet-features``.

``score[q, i] = cos(e(x_q), e(x_i))`` for an image embedding ``e``:

- ``clip``: the image embedding (``image_embeds``) of a CLIP vision tower, a transformers
  checkpoint (``CLIPVisionModelWithProjection``, a local ``save_pretrained`` folder or a hub id) or
  an open_clip model (``model="open_clip:ViT-B-32"``, ``pretrained=<tag or file>``; needs the
  ``openclip`` extra);
- ``dino``: a DINOv2 checkpoint's CLS token (``pooling="cls"``) or its mean patch token
  (``"mean"``);
- ``unet-features``: the attributed diffusion model's own mid-block activations of the image noised
  to ``timestep`` (noise shared by all images, averaged over ``num_noise`` draws), flattened or
  spatially averaged.

Images (float32 ``(n, C, H, W)`` in ``[-1, 1]``, grey or RGB) go to a checkpoint as 8-bit RGB and
its own image processor (``preprocessor_config.json``) resizes, crops and normalises them. The
training set's embeddings are computed once into a feature store (:func:`fill_store`: sharded,
resumable, refusing another embedding model or data set); queries are embedded one at a time, so a
query's scores never depend on its name, position or batch-mates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.conditioning import condition, model_inputs, pixel_shape
from diffattr.attribution.featurize import merge_halves
from diffattr.attribution.methods.common import (
    WorkDir,
    check_int,
    make_scores,
    short_hash,
)
from diffattr.attribution.scoring import cosine_scores
from diffattr.attribution.store import fill_store
from diffattr.attribution.timesteps import noise_for
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import eval_mode
from diffattr.errors import UserError
from diffattr.repro import state_dict_hash, to_jsonable

# unet-features: the default timestep. Measured with scripts/near_copies.py on the digits-2
# evaluation model (all 290 training images as sources, flatten pooling): exact copies are top-1 at
# every t; copies with pixel noise sigma 0.3 / 0.6 are top-1 for t=0: 95% / 61%, t=10: 96% / 59%,
# t=50: 94% / 55%, t=100: 93% / 50%, t=200: 91% / 47%, t=500: 91% / 42%. Small t keeps the most
# of the image's content; 10 and 0 tie (within a few of 290 images), recovery falls steadily
# beyond 50. Mean pooling loses to flatten on noisy copies (68% / 22% at t=10)
# but halves the median rank of 1-pixel shifts (43 vs 81).
DEFAULT_TIMESTEP = 10
POOLINGS = {"dino": ("cls", "mean"), "unet-features": ("flatten", "mean")}
OPEN_CLIP_PREFIX = "open_clip:"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class CheckpointError(UserError, ValueError):
    """An embedding checkpoint that is not what the method needs, or could not be loaded."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """An embedding checkpoint folder that does not exist."""


# ----------------------------------------------------------------------------------- options


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")


@dataclass
class EmbedOptions:
    """``batch_size``: training images per forward pass (queries go one at a time);
    ``shard_size``: training images per feature-store shard."""

    batch_size: int = 32
    shard_size: int = 256

    def __post_init__(self) -> None:
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.shard_size, "shard_size", 1)


def _check_model(value: Any, example: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"model: expected a checkpoint folder (save_pretrained) or a hub id such as "
            f"{example}, got {value!r}"
        )


@dataclass
class ClipOptions(EmbedOptions):
    """``model``: a transformers CLIP checkpoint folder or hub id (e.g.
    ``openai/clip-vit-base-patch32``), or ``open_clip:<architecture>`` with ``pretrained`` an
    open_clip tag (``laion2b_s34b_b79k``) or weights file."""

    model: str | None = None
    pretrained: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_model(self.model, "openai/clip-vit-base-patch32 or open_clip:ViT-B-32")
        assert self.model is not None
        if self.model.startswith(OPEN_CLIP_PREFIX):
            if not self.model[len(OPEN_CLIP_PREFIX) :]:
                raise ValueError(
                    "model: 'open_clip:' needs an architecture, e.g. open_clip:ViT-B-32"
                )
            if not isinstance(self.pretrained, str) or not self.pretrained:
                raise ValueError(
                    f"pretrained: {self.model} needs an open_clip pretrained tag or weights file, "
                    f"got {self.pretrained!r}"
                )
        elif self.pretrained is not None:
            raise ValueError(
                "pretrained: only for open_clip models (model='open_clip:<architecture>'); a "
                "transformers checkpoint carries its own weights"
            )


@dataclass
class DinoOptions(EmbedOptions):
    """``model``: a transformers DINOv2 checkpoint folder or hub id (e.g.
    ``facebook/dinov2-small``); ``pooling``: ``cls`` (the CLS token) or ``mean`` (patch tokens)."""

    model: str | None = None
    pooling: str = "cls"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_model(self.model, "facebook/dinov2-small")
        _check_choice(self.pooling, "pooling", POOLINGS["dino"])


@dataclass
class UNetFeatureOptions(EmbedOptions):
    """``timestep``: the diffusion timestep the image is noised to; ``num_noise``: noise draws
    averaged (shared by every image, seeded by ``(seed, timestep, draw)``); ``pooling``:
    ``flatten`` the mid-block activations or ``mean`` them over space."""

    timestep: int = DEFAULT_TIMESTEP
    num_noise: int = 1
    pooling: str = "flatten"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.timestep, "timestep", 0)
        check_int(self.num_noise, "num_noise", 1)
        _check_choice(self.pooling, "pooling", POOLINGS["unet-features"])
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")


# ----------------------------------------------------------------------------------- images


def to_uint8_rgb(images: Tensor) -> list[np.ndarray]:
    """``(n, C, H, W)`` in ``[-1, 1]`` (C = 1 or 3) -> ``n`` uint8 ``(H, W, 3)`` arrays."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (n, 1 or 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    x = ((images.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) * 127.5).round()
    x = x.to(torch.uint8).expand(-1, 3, -1, -1)
    return [img.permute(1, 2, 0).contiguous().numpy() for img in x]


def _sha256_json(obj: Any) -> str:
    text = json.dumps(to_jsonable(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _content(config: dict[str, Any]) -> dict[str, Any]:
    """A config without where it was read from or which library version wrote it."""
    return {
        k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"
    }


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------------- embedders


@dataclass
class Embedder:
    """An image embedding: ``embed(images (m, C, H, W), labels or None) -> (m, *shape)`` float32
    on CPU; ``identity``: everything that decides its values (a store records and compares it);
    ``info``: recorded, not compared (where the checkpoint was read from); ``pixels``: what the
    network sees, ``(m, 3, h, w)`` (checkpoints with an image processor)."""

    identity: dict[str, Any]
    embed: Callable[[Tensor, Tensor | None], Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    pixels: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class HFKind:
    """A transformers checkpoint family a method accepts."""

    method: str
    model_types: tuple[str, ...]
    model_class: str
    what: str
    example: str
    name: str  # in messages: "not a CLIP (vision) checkpoint"
    other: str = ""  # another accepted form, for the messages


HF_KINDS = {
    "clip": HFKind(
        "clip",
        ("clip", "clip_vision_model"),
        "CLIPVisionModelWithProjection",
        "a transformers CLIP checkpoint folder (save_pretrained)",
        "openai/clip-vit-base-patch32",
        name="CLIP (vision)",
        other="open_clip:ARCH with pretrained=TAG (the openclip extra: pip install "
        "'diffattr[openclip]')",
    ),
    "dino": HFKind(
        "dino",
        ("dinov2",),
        "Dinov2Model",
        "a transformers DINOv2 checkpoint folder (save_pretrained)",
        "facebook/dinov2-small",
        name="DINOv2",
    ),
}


def _expected(kind: HFKind) -> str:
    """What ``kind.method``'s ``model`` option takes, for the error messages."""
    text = (
        f"{kind.method} expects {kind.what} holding a config.json with model_type "
        f"{' or '.join(repr(t) for t in kind.model_types)} (e.g. a {kind.model_class}) and "
        f"preprocessor_config.json, a hub id such as {kind.example}"
    )
    return f"{text}, or {kind.other}" if kind.other else text


def _found_in(path: Path, config: dict[str, Any] | None) -> str:
    """What a checkpoint folder holds instead of the expected checkpoint (its config or files)."""
    if config is not None:
        if config.get("model_type") is not None:
            return f"a transformers {config['model_type']!r} checkpoint"
        if "_class_name" in config:
            return (
                f"a diffusers {config['_class_name']} (its config.json has a _class_name, no "
                "transformers model_type)"
            )
        return "its config.json has no model_type"
    index = path / "model_index.json"
    if index.is_file():
        try:
            pipeline = json.loads(index.read_text()).get("_class_name", "pipeline")
        except (json.JSONDecodeError, AttributeError, OSError):
            pipeline = "pipeline"
        return f"a diffusers {pipeline} folder (model_index.json, no config.json)"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "an empty folder (no config.json)"
    more = f", ... ({len(names)} entries)" if len(names) > 5 else ""
    return f"no config.json (it holds {', '.join(names[:5])}{more})"


def _not_a_checkpoint(path: Path | str, kind: HFKind, found: str) -> CheckpointError:
    return CheckpointError(
        f"{kind.method}: model={path} is not a {kind.name} checkpoint: {found}; {_expected(kind)}"
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers warnings or progress bars while loading (errors are re-raised as ours)."""
    from transformers.utils import logging as tlog

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def resolve_checkpoint(source: str, kind: HFKind) -> tuple[str, bool]:
    """``(location, is_local_folder)``; one-line errors for a missing or wrong folder.

    An existing path must be a folder with a ``config.json`` of an accepted ``model_type`` and a
    ``preprocessor_config.json``; a string that is not a path on disk is taken as a hub id when
    it looks like one (``name`` or ``org/name``). A wrong folder's error says what it holds
    instead (e.g. a diffusers UNet) and what ``kind`` expects.
    """
    path = Path(source).expanduser()
    expected = f"expected {kind.what} or a hub id such as {kind.example}"
    if not path.exists():
        if HUB_ID.match(source) and not source.startswith("."):
            return source, False
        raise CheckpointNotFoundError(f"{path}: no such folder; {expected}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; {expected}")
    config = path / "config.json"
    if not config.exists():
        raise _not_a_checkpoint(path, kind, _found_in(path, None))
    try:
        values = json.loads(config.read_text())
        model_type = values.get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config}: not a JSON object ({exc}); {expected}") from None
    if model_type not in kind.model_types:
        raise _not_a_checkpoint(path, kind, _found_in(path, values))
    if not (path / "preprocessor_config.json").exists():
        raise CheckpointError(
            f"{path}: no preprocessor_config.json; save the checkpoint's image processor into "
            "the folder too (processor.save_pretrained), it decides resizing and normalisation"
        )
    return str(path), True


def _check_model_type(model_type: Any, where: str, kind: HFKind) -> None:
    if model_type not in kind.model_types:
        found = f"a {model_type!r} checkpoint" if model_type else "a config without model_type"
        raise _not_a_checkpoint(where, kind, found)


def load_hf(kind: HFKind, source: str, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """``(network, image processor, identity)`` of a transformers checkpoint (eval mode).

    The identity holds sha256s of the loaded weights (state dict), of the model config and of the
    processor config: another checkpoint, wherever it lies, gets another identity."""
    import transformers

    location, local = resolve_checkpoint(source, kind)
    try:
        with _quiet_transformers():
            if not local:
                config = transformers.AutoConfig.from_pretrained(location)
                _check_model_type(getattr(config, "model_type", None), location, kind)
            processor = transformers.AutoImageProcessor.from_pretrained(location)
            net = getattr(transformers, kind.model_class).from_pretrained(location)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        where = location if local else f"{location}: no such folder, and as a hub id it"
        raise CheckpointError(
            f"{where} could not be loaded ({_one_line(exc)}); {kind.method} expects {kind.what} "
            "or a hub id (offline: one already in the Hugging Face cache)"
        ) from None
    net = net.to(device).eval()
    identity = {
        "backend": "transformers",
        "class": kind.model_class,
        "weights_sha256": state_dict_hash(net),
        "config_sha256": _sha256_json(_content(net.config.to_dict())),
        # The class too: the torchvision ("fast") and PIL processors resize slightly differently.
        "processor_class": type(processor).__name__,
        "processor": to_jsonable(_content(processor.to_dict())),
    }
    return net, processor, identity


def pixel_values(processor: Any, images: Tensor) -> Tensor:
    """The checkpoint processor's input ``(m, 3, h, w)`` for images in ``[-1, 1]``."""
    batch = processor(
        images=to_uint8_rgb(images), return_tensors="pt", input_data_format="channels_last"
    )
    return torch.as_tensor(batch["pixel_values"], dtype=torch.float32)


def hf_embedder(method: str, source: str, device: torch.device, pooling: str = "") -> Embedder:
    """``clip`` (``image_embeds``) or ``dino`` (CLS / mean patch token) embedder."""
    kind = HF_KINDS[method]
    net, processor, identity = load_hf(kind, source, device)

    @torch.inference_mode()
    def embed(images: Tensor, labels: Tensor | None) -> Tensor:
        out = net(pixel_values=pixel_values(processor, images).to(device))
        if method == "clip":
            e = out.image_embeds
        elif pooling == "mean":
            e = out.last_hidden_state[:, 1:].mean(dim=1)
        else:
            e = out.pooler_output
        return e.detach().to("cpu", torch.float32)

    if method == "dino":
        identity = {**identity, "pooling": pooling}
    return Embedder(
        identity, embed, {"checkpoint": source}, lambda images: pixel_values(processor, images)
    )


def open_clip_embedder(model: str, pretrained: str, device: torch.device) -> Embedder:
    """An open_clip image tower (``model="open_clip:<arch>"``), imported only when asked for."""
    arch = model[len(OPEN_CLIP_PREFIX) :]
    try:
        import open_clip
    except ImportError:
        raise CheckpointError(
            f"clip: model {model!r} needs the open_clip package, which is not installed; install "
            "the openclip extra (pip install 'diffattr[openclip]') or use a transformers CLIP "
            "checkpoint folder"
        ) from None
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"clip: open_clip could not build {arch!r} with pretrained={pretrained!r} "
            f"({_one_line(exc)})"
        ) from None
    net.eval()
    from PIL import Image

    @torch.inference_mode()
    def embed(images: Tensor, labels: Tensor | None) -> Tensor:
        x = torch.stack([preprocess(Image.fromarray(a)) for a in to_uint8_rgb(images)])
        return net.encode_image(x.to(device)).detach().to("cpu", torch.float32)

    identity = {
        "backend": "open_clip",
        "arch": arch,
        "weights_sha256": state_dict_hash(net),
        "preprocess": repr(preprocess),
    }
    return Embedder(identity, embed, {"checkpoint": model, "pretrained": pretrained})


def mid_block_output(model: Any, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
    """The UNet's ``mid_block`` output for noisy images ``x_t`` at timesteps ``t`` (the forward
    stops there: the up blocks are not run)."""
    unet = model.unet
    if getattr(unet, "mid_block", None) is None:
        raise ValueError("unet-features: the diffusion model's UNet has no mid block")
    captured: list[Tensor] = []

    class _Stop(Exception):
        pass

    def hook(module: Any, inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = unet.mid_block.register_forward_hook(hook)
    try:
        with contextlib.suppress(_Stop):
            model.eps(x_t, t, labels)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("unet-features: the mid block did not run")
    return captured[0]


def unet_draws(
    model: Any, images: Tensor, labels: Tensor | None, opts: UNetFeatureOptions
) -> Tensor:
    """Pooled mid-block activations per noise draw, ``(m, num_noise, d)`` float32 on CPU."""
    unet = model.unet
    device, dtype = model.device, next(unet.parameters()).dtype
    x0 = images.to(device=device, dtype=dtype)
    t = torch.full((x0.shape[0],), opts.timestep, dtype=torch.int64, device=device)
    y = None if labels is None else labels.to(device)
    out = []
    with eval_mode(unet), torch.inference_mode():
        for d in range(opts.num_noise):
            noise = noise_for(opts.seed, 0, opts.timestep, d, tuple(x0.shape[1:]), "shared")
            noise = noise.to(device=device, dtype=dtype).expand_as(x0)
            act = mid_block_output(model, model.scheduler.add_noise(x0, noise, t), t, y)
            pooled = act.flatten(1) if opts.pooling == "flatten" else act.mean(dim=(2, 3))
            out.append(pooled.to("cpu", torch.float32))
    return torch.stack(out, dim=1)


def unet_embedder(model: Any, opts: UNetFeatureOptions) -> Embedder:
    """Mid-block features; with ``num_noise >= 2`` two half means ``(m, 2, d)`` (the stability
    figure), else ``(m, d)``."""
    T = int(model.scheduler.config.num_train_timesteps)
    if opts.timestep >= T:
        raise ValueError(f"timestep: {opts.timestep} is not in [0, {T}) (the model's schedule)")
    if getattr(model.unet, "mid_block", None) is None:
        raise ValueError("unet-features: the diffusion model's UNet has no mid block")
    image_shape = pixel_shape(model)

    def embed(images: Tensor, labels: Tensor | None) -> Tensor:
        if tuple(images.shape[1:]) != image_shape:
            raise ValueError(
                f"unet-features: images are {tuple(images.shape[1:])}, the model takes {image_shape}"
            )
        # A latent model's UNet sees the images' VAE latents.
        draws = unet_draws(model, model_inputs(model, images), labels, opts)
        if opts.num_noise == 1:
            return draws[:, 0]
        return torch.stack([draws[:, 0::2].mean(dim=1), draws[:, 1::2].mean(dim=1)], dim=1)

    scheduler = {k: v for k, v in dict(model.scheduler.config).items() if not k.startswith("_")}
    identity = {
        "backend": "unet-mid-block",
        "model_hash": model.model_hash(),
        "scheduler": to_jsonable(scheduler),
        "timestep": opts.timestep,
        "num_noise": opts.num_noise,
        "noise": "shared",
        "seed": opts.seed,
        "pooling": opts.pooling,
    }
    return Embedder(identity, embed)


# ----------------------------------------------------------------------------------- attributors


class EmbeddingAttributor:
    """Embed the training set into a store once, embed queries in memory, score by cosine.

    Subclasses set ``name`` and build their :class:`Embedder` in :meth:`make_embedder` (called at
    construction, so a bad checkpoint is refused before any work)."""

    name: str = "embedding"

    def __init__(
        self, model: Any, work_dir: Path | None, options: EmbedOptions, progress: bool = False
    ) -> None:
        self.model = model
        self.options = options
        self.progress = progress
        self.work = WorkDir(work_dir)
        self.device = torch.device(getattr(model, "device", "cpu"))
        self.embedder = self.make_embedder()
        self.train: ImageDataset | None = None
        self.timing: dict[str, float] = {}
        self.info: dict[str, Any] = {}

    # -- hooks
    def make_embedder(self) -> Embedder:
        raise NotImplementedError

    def labels(
        self, labels: Tensor | None, texts: list[str] | None, n: int, what: str
    ) -> Tensor | None:
        """The conditioning for the embedder: class labels or text token ids (only the diffusion
        model's own features use one)."""
        return None

    def samples(self) -> int:
        """Noise draws behind one embedding (>= 2: embeddings are two half means)."""
        return 1

    # -- protocol
    def embed_all(self, images: Tensor, labels: Tensor | None, batch: int) -> Tensor:
        parts = [
            self.embedder.embed(
                images[a : a + batch], None if labels is None else labels[a : a + batch]
            )
            for a in range(0, images.shape[0], batch)
        ]
        return torch.cat(parts)

    def store_path(self, train: ImageDataset) -> Path:
        """``<work_dir>/<method>-<hash>``: the hash covers the embedder's identity, the store
        layout and the data, so another embedding model or training set gets another folder."""
        h = short_hash(
            self.name, self.embedder.identity, self.options.shard_size, train.data_hash()
        )
        return self.work.sub(f"{self.name}-{h}")

    def fit(self, train: ImageDataset) -> None:
        """Embed ``train`` into its store (or reuse the store) and keep the embeddings."""
        if len(train) == 0:
            raise ValueError(f"{self.name}: empty training set")
        t0 = time.perf_counter()
        labels = self.labels(train.labels, train.captions, len(train), "training images")
        shape = tuple(
            self.embedder.embed(train.images[:1], None if labels is None else labels[:1]).shape[1:]
        )
        folder = self.store_path(train)
        identity = {
            "label": self.name,
            "embedder": self.embedder.identity,
            "data_hash": train.data_hash(),
            "n": len(train),
            "shard_size": self.options.shard_size,
            "feature_shape": [len(train), *shape],
        }

        def compute(sl: slice) -> Tensor:
            y = None if labels is None else labels[sl]
            return self.embed_all(train.images[sl], y, self.options.batch_size)

        store = fill_store(
            folder,
            identity,
            train.ids,
            self.options.shard_size,
            compute,
            shape,
            progress=self.progress,
            label=self.name,
            extra={"batch_size": self.options.batch_size, **self.embedder.info},
        )
        feats = store.features
        if not torch.equal(store.ids, train.ids.to(torch.int64)):
            raise ValueError(f"{folder}: the store's ids are not the training set's ids")
        self.train_full, self.train_halves = self.split(feats)
        self.train = train
        self.info["store"] = None if self.work.temporary else str(folder)
        self.timing["fit_s"] = time.perf_counter() - t0

    def split(self, feats: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Embeddings ``(m, d)`` of all samples and the two half embeddings (or None)."""
        if self.samples() < 2:
            return feats, None
        return merge_halves(feats, self.samples()), (feats[:, 0], feats[:, 1])

    def score(self, queries: Queries) -> Scores:
        if self.train is None:
            raise RuntimeError(f"{self.name}: call fit(train) before score(queries)")
        train = self.train
        t0 = time.perf_counter()
        labels = self.labels(queries.labels, queries.prompts, len(queries), "queries")
        q = self.embed_all(queries.images, labels, 1)
        q_full, q_halves = self.split(q)
        t1 = time.perf_counter()
        values = cosine_scores(self.train_full, q_full)
        halves = None
        if self.train_halves is not None and q_halves is not None:
            halves = [cosine_scores(a, b) for a, b in zip(self.train_halves, q_halves, strict=True)]
        self.timing["embed_queries_s"] = t1 - t0
        self.timing["score_s"] = time.perf_counter() - t0
        return make_scores(self, train, queries, values, halves=halves)

    def config(self) -> dict[str, Any]:
        """Options, the embedding model's identity (hashes, not paths), where it came from and
        timing, all JSON-able."""
        return {
            "options": to_jsonable(self.options),
            "embedder": to_jsonable(self.embedder.identity),
            **to_jsonable({**self.embedder.info, **self.info}),
            "timing": dict(self.timing),
        }


class ClipSimilarity(EmbeddingAttributor):
    """``clip``: cosine similarity of CLIP image embeddings."""

    name = "clip"
    options: ClipOptions

    def make_embedder(self) -> Embedder:
        model = str(self.options.model)
        if model.startswith(OPEN_CLIP_PREFIX):
            return open_clip_embedder(model, str(self.options.pretrained), self.device)
        return hf_embedder("clip", model, self.device)


class DinoSimilarity(EmbeddingAttributor):
    """``dino``: cosine similarity of DINOv2 embeddings."""

    name = "dino"
    options: DinoOptions

    def make_embedder(self) -> Embedder:
        return hf_embedder("dino", str(self.options.model), self.device, self.options.pooling)


class UNetFeatureSimilarity(EmbeddingAttributor):
    """``unet-features``: cosine similarity of the diffusion model's mid-block activations."""

    name = "unet-features"
    options: UNetFeatureOptions

    def make_embedder(self) -> Embedder:
        return unet_embedder(self.model, self.options)

    def labels(
        self, labels: Tensor | None, texts: list[str] | None, n: int, what: str
    ) -> Tensor | None:
        return condition(self.model, labels, texts, n, what)

    def samples(self) -> int:
        return self.options.num_noise
