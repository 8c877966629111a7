"""Random projections of per-sample gradients to ``k`` dimensions (the "RP" in TRAK).

Kinds (:class:`ProjectorConfig` ``kind``):

- ``identity``: no projection; the raw gradient, parameters concatenated in selection order
  (tests and tiny models).
- ``gaussian`` / ``rademacher``: a dense ``p x k`` matrix with i.i.d. N(0, 1) or +-1 entries scaled
  by ``1/sqrt(k)``. It is never materialised: the rows belonging to parameter ``name``, block ``j``
  (``block_size`` rows) are generated on demand from a generator seeded by
  ``derive_seed(seed, name, j)``, so the matrix is reproducible and does not depend on batch size,
  block order or which other parameters are selected. Blocks are cached up to ``cache_bytes``.
  The numbers come from the generator of the device the gradients live on (CPU or CUDA Philox), so
  a store records its device type and features from different device types are never mixed.
- ``kronecker`` (LoGra-style): for every ``nn.Linear`` / ``nn.Conv2d`` layer with weight
  ``W`` (out, in) (conv: (out, in*kh*kw)), the per-sample gradient is
  ``dW = sum_pos g_pos a_pos^T`` (``g``: gradient at the layer output, ``a``: layer input, conv:
  im2col patches). We project ``P_out^T dW P_in = sum_pos (P_out^T g_pos)(P_in^T a_pos)^T``
  (``k_out x k_in``, flattened row-major) from activations captured by forward hooks and output
  gradients from one ordinary batched backward of the summed outputs, never forming ``dW``. This
  equals the dense projection of ``vec_rowmajor(dW)`` by ``kron(P_out, P_in)``. A selected bias is
  handled as an extra input column of ones (``[W | b]``, ``P_in`` gets one more row). ``P_in`` and
  ``P_out`` are Gaussian, scaled by ``1/sqrt(k_in)`` and ``1/sqrt(k_out)``, seeded by
  ``derive_seed(seed, layer name, "in"|"out")`` and drawn on the CPU (same on every device). Selected
  parameters of other layers (norm scales/shifts, embeddings) are **skipped** (logged and listed
  in ``skipped``): they are a tiny fraction of a UNet's parameters.

Kronecker dim split rule (``split_dims``): layers are visited in increasing ``d_in * d_out``; each
gets the budget ``remaining // layers_left`` with ``k_out = min(d_out, isqrt(budget))`` and
``k_in = min(d_in, budget // k_out)`` (then ``k_out`` is raised to ``min(d_out, budget // k_in)``
when ``k_in`` hit its cap). Unused budget of small layers flows to larger ones, so the total is
``<= dim`` and close to it; every layer gets at least 1 x 1 (``dim`` must be >= number of layers).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from diffattr.errors import OptionError
from diffattr.repro import derive_seed, write_json_atomic

log = logging.getLogger(__name__)

PROJECTOR_KINDS = ("identity", "gaussian", "rademacher", "kronecker")
# How many bytes of generated dense-matrix blocks to keep (values never depend on it; speed does).
# Override with the environment variable DIFFATTR_PROJECTOR_CACHE_MB (e.g. on a large GPU).
DEFAULT_CACHE_BYTES = int(float(os.environ.get("DIFFATTR_PROJECTOR_CACHE_MB", "512")) * 2**20)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


@dataclass
class ProjectorConfig:
    """How gradients are projected. ``dim``: target ``k`` (ignored by identity);
    ``block_size``: rows of the dense matrix generated at a time; ``dtype``: projection dtype."""

    kind: str = "kronecker"
    dim: int = 2048
    seed: int = 0
    block_size: int = 8192
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in PROJECTOR_KINDS:
            raise ValueError(
                f"projector.kind: {self.kind!r} is unknown; expected one of {PROJECTOR_KINDS}"
            )
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"projector.dim: expected an int >= 1, got {self.dim!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"projector.block_size: expected an int >= 1, got {self.block_size!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(
                f"projector.dtype: expected 'float32' or 'float64', got {self.dtype!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProjectorConfig:
        known = {"kind", "dim", "seed", "block_size", "dtype"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"projector config: unknown fields {sorted(unknown)}; expected {sorted(known)}"
            )
        return cls(**dict(d))

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ProjectorConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


class Projector(Protocol):
    """Maps per-sample gradients (name -> ``(B, *shape)``) to features ``(B, dim)``."""

    config: ProjectorConfig
    dim: int

    def project(self, grads: Mapping[str, Tensor]) -> Tensor: ...


def _check_names(grads: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    for name, g in grads.items():
        if name not in shapes:
            raise KeyError(
                f"projector: gradient for {name!r}, which the projector was not built for"
            )
        if tuple(g.shape[1:]) != tuple(shapes[name]):
            raise ValueError(
                f"projector: gradient {name!r} has shape {tuple(g.shape[1:])}, want {tuple(shapes[name])}"
            )
    missing = [n for n in shapes if n not in grads]
    if missing:
        raise KeyError(f"projector: no gradient for {missing[:5]}")


class IdentityProjector:
    """The raw gradient: parameters concatenated in ``param_shapes`` order, each row-major."""

    def __init__(self, config: ProjectorConfig, param_shapes: Mapping[str, Sequence[int]]) -> None:
        self.config = config
        self.shapes = {n: tuple(int(s) for s in v) for n, v in param_shapes.items()}
        self.dim = sum(math.prod(s) for s in self.shapes.values())

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        _check_names(grads, self.shapes)
        dt = self.config.torch_dtype
        return torch.cat(
            [grads[n].reshape(grads[n].shape[0], -1).to(dt) for n in self.shapes], dim=1
        )


def random_matrix(
    kind: str,
    rows: int,
    cols: int,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """``(rows, cols)`` i.i.d. N(0,1) (``gaussian``) or +-1 (``rademacher``) entries, unscaled.

    Drawn in float32 from a generator of ``device``'s type seeded with ``seed``, then cast.
    ``out``: optional contiguous float32 scratch buffer with at least ``rows`` rows of ``cols``
    (filled in place, same values as a fresh tensor; saves an allocation per block).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    if out is not None:
        m = out[:rows]
    else:
        m = torch.empty(rows, cols, device=device, dtype=torch.float32)
    if kind == "gaussian":
        m.normal_(generator=g)
    elif kind == "rademacher":
        m.random_(0, 2, generator=g).mul_(2).sub_(1)
    else:
        raise ValueError(f"random_matrix: kind {kind!r} is not 'gaussian' or 'rademacher'")
    return m if dtype == torch.float32 else m.to(dtype)


class DenseProjector:
    """Block-wise generated dense JL projection; see the module docstring.

    Blocks are kept unscaled; the ``1/sqrt(k)`` scale is applied once to the projected output.
    """

    def __init__(
        self,
        config: ProjectorConfig,
        param_shapes: Mapping[str, Sequence[int]],
        cache_bytes: int | None = None,
    ) -> None:
        if config.kind not in ("gaussian", "rademacher"):
            raise ValueError(f"DenseProjector: kind {config.kind!r} is not dense")
        self.config = config
        self.shapes = {n: tuple(int(s) for s in v) for n, v in param_shapes.items()}
        self.dim = config.dim
        self.scale = 1.0 / math.sqrt(config.dim)
        self.cache_bytes = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
        self._cache: dict[tuple[str, int, str], Tensor] = {}
        self._cached = 0
        self._scratch: dict[str, Tensor] = {}

    def blocks(self, name: str) -> list[tuple[int, int, int]]:
        """``(block index, first row, end row)`` of parameter ``name``'s slice of the matrix."""
        p = math.prod(self.shapes[name])
        bs = self.config.block_size
        return [(j, r0, min(r0 + bs, p)) for j, r0 in enumerate(range(0, p, bs))]

    def block_matrix(self, name: str, j: int, rows: int, device: torch.device) -> Tensor:
        """Unscaled ``(rows, k)`` slice for block ``j`` of ``name``.

        Cached while under ``cache_bytes``; otherwise generated into a reused scratch buffer, so
        the returned tensor is only valid until the next call (clone it to keep it).
        """
        key = (name, j, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        seed = derive_seed(self.config.seed, name, j)
        dt = self.config.torch_dtype
        size = rows * self.dim * torch.empty((), dtype=dt).element_size()
        if self._cached + size <= self.cache_bytes:
            m = random_matrix(self.config.kind, rows, self.dim, seed, device, dt)
            self._cache[key] = m
            self._cached += size
            return m
        buf = self._scratch.get(str(device))
        if buf is None:
            buf = torch.empty(self.config.block_size, self.dim, device=device, dtype=torch.float32)
            self._scratch[str(device)] = buf
        return random_matrix(self.config.kind, rows, self.dim, seed, device, dt, out=buf)

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        """name -> ``(B, *shape)`` gradients to ``(B, k)`` features."""
        _check_names(grads, self.shapes)
        first = next(iter(grads.values()))
        out = torch.zeros(
            first.shape[0], self.dim, device=first.device, dtype=self.config.torch_dtype
        )
        for name in self.shapes:
            g = grads[name].reshape(first.shape[0], -1).to(self.config.torch_dtype)
            for j, r0, r1 in self.blocks(name):
                out.addmm_(g[:, r0:r1], self.block_matrix(name, j, r1 - r0, g.device))
        return out.mul_(self.scale)

    def materialize(self, device: torch.device | str = "cpu") -> Tensor:
        """The whole scaled ``(p, k)`` matrix (tests and tiny models only)."""
        dev = torch.device(device)
        parts = [
            self.block_matrix(name, j, r1 - r0, dev).clone()
            for name in self.shapes
            for j, r0, r1 in self.blocks(name)
        ]
        return torch.cat(parts, dim=0).mul_(self.scale)


# ----------------------------------------------------------------------------------------------
# Kronecker (LoGra-style) projection
# ----------------------------------------------------------------------------------------------


@dataclass
class KroneckerLayer:
    """One projected layer. ``d_in`` counts the bias column when ``bias`` is set."""

    name: str
    module: nn.Module
    weight_name: str
    bias_name: str | None
    d_in: int
    d_out: int
    k_in: int = 0
    k_out: int = 0

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out


def split_dims(dim: int, sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(k_in, k_out)`` per layer for layer sizes ``(d_in, d_out)``; rule in the module docstring."""
    if dim < len(sizes):
        raise OptionError(
            f"projector.dim: the kronecker projector needs dim >= the number of layers "
            f"({len(sizes)}), got {dim}"
        )
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], i))
    out: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    remaining = dim
    for pos, i in enumerate(order):
        d_in, d_out = sizes[i]
        budget = max(1, remaining // (len(order) - pos))
        k_out = min(d_out, max(1, math.isqrt(budget)))
        k_in = min(d_in, max(1, budget // k_out))
        k_out = min(d_out, max(1, budget // k_in))
        out[i] = (k_in, k_out)
        remaining -= k_in * k_out
    return out


def expand_inputs(layer: KroneckerLayer, a: Tensor) -> Tensor:
    """Per-position inputs ``(B, P, d_in)`` of one call: ``a`` is the layer input (conv
    ``(B, C, H, W)``, turned into im2col patches in ``F.unfold`` order, channel-major, matching
    ``W.reshape(d_out, -1)``; Linear ``(B, ..., n_w)``, every non-batch leading dim a position),
    with a ones column appended for the bias."""
    m = layer.module
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(
            a, m.kernel_size, m.dilation, cast(tuple[int, ...], m.padding), m.stride
        ).transpose(1, 2)
    else:
        cols = a.reshape(a.shape[0], -1, a.shape[-1])
    if layer.bias_name is not None:
        cols = torch.cat([cols, cols.new_ones(*cols.shape[:2], 1)], dim=2)
    return cols


def expand_grads(layer: KroneckerLayer, g: Tensor) -> Tensor:
    """Per-position output gradients ``(B, P, d_out)`` of one call (conv ``(B, d_out, H', W')``;
    Linear ``(B, ..., d_out)``), in the positions' order of :func:`expand_inputs`."""
    if isinstance(layer.module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def expand_rows(layer: KroneckerLayer, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position inputs ``(B, P, d_in)`` and output gradients ``(B, P, d_out)`` of one call
    (:func:`expand_inputs`, :func:`expand_grads`)."""
    return expand_inputs(layer, a), expand_grads(layer, g)


def layer_rows(
    layer: KroneckerLayer, calls: Sequence[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """:func:`expand_rows` of every call of the layer in one forward, positions concatenated
    (a layer used twice contributes both calls' positions to one gradient)."""
    rows = [expand_rows(layer, a, g) for a, g in calls]
    if len(rows) == 1:
        return rows[0]
    return torch.cat([r[0] for r in rows], dim=1), torch.cat([r[1] for r in rows], dim=1)


def output_gradients(
    layers: KroneckerProjector,
    calls: Mapping[str, list[tuple[Tensor, Tensor]]],
    total: Tensor,
    retain_graph: bool = False,
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """Per layer, per call: ``(input, gradient of the scalar total at the call's output)``.

    ``calls``: what ``layers.capture()`` recorded during the forward that produced ``total``.
    Samples do not interact inside a UNet (GroupNorm and attention are per sample), so the gradient
    of a *sum* of per-sample terms at a layer's output is, row by row, each sample's own. A call
    whose output did not reach ``total`` gets a zero gradient. ``retain_graph``: keep the forward
    graph for another output function's backward (several outputs of one forward)."""
    outs = [out for ly in layers.layers for (_, out) in calls[ly.name]]
    grads = iter(torch.autograd.grad(total, outs, allow_unused=True, retain_graph=retain_graph))
    pairs: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for ly in layers.layers:
        if not calls[ly.name]:
            raise RuntimeError(f"kronecker layers: layer {ly.name!r} was not called in the forward")
        pairs[ly.name] = []
        for a, out in calls[ly.name]:
            g = next(grads)
            pairs[ly.name].append((a, torch.zeros_like(out) if g is None else g.detach()))
    return pairs


def _conv_ok(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


class KroneckerProjector:
    """LoGra-style per-layer ``P_out (x) P_in`` projection; see the module docstring.

    ``param_names``: the selected parameter names (of ``model``). Layers are kept in
    ``model.named_modules()`` order; features are the layers' ``k_out x k_in`` blocks concatenated.
    """

    def __init__(
        self, config: ProjectorConfig, model: nn.Module, param_names: Sequence[str]
    ) -> None:
        if config.kind != "kronecker":
            raise ValueError(f"KroneckerProjector: kind {config.kind!r} is not 'kronecker'")
        self.config = config
        selected = set(param_names)
        layers: list[KroneckerLayer] = []
        covered: set[str] = set()
        for mname, m in model.named_modules():
            prefix = f"{mname}." if mname else ""
            wname, bname = f"{prefix}weight", f"{prefix}bias"
            if wname not in selected:
                continue
            has_bias = getattr(m, "bias", None) is not None and bname in selected
            if isinstance(m, nn.Linear):
                d_in, d_out = m.in_features, m.out_features
            elif isinstance(m, nn.Conv2d) and _conv_ok(m):
                d_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                d_out = m.out_channels
            else:
                continue
            layers.append(
                KroneckerLayer(
                    mname, m, wname, bname if has_bias else None, d_in + int(has_bias), d_out
                )
            )
            covered.add(wname)
            if has_bias:
                covered.add(bname)
        if not layers:
            raise ValueError(
                "projector: kind 'kronecker' found no selected nn.Linear/nn.Conv2d weight among the "
                "selected parameters"
            )
        self.skipped = [n for n in param_names if n not in covered]
        if self.skipped:
            log.info(
                "kronecker projector skips %d selected parameters that are not Linear/Conv2d "
                "weights or biases (e.g. %s)",
                len(self.skipped),
                ", ".join(self.skipped[:4]),
            )
        for layer, (k_in, k_out) in zip(
            layers, split_dims(config.dim, [(ly.d_in, ly.d_out) for ly in layers]), strict=True
        ):
            layer.k_in, layer.k_out = k_in, k_out
        self.layers = layers
        self.dim = sum(ly.dim for ly in layers)
        self.covered = [n for n in param_names if n in covered]
        self._mats: dict[tuple[str, str, str], Tensor] = {}

    # -- matrices ---------------------------------------------------------------------------
    def matrices(self, layer: KroneckerLayer, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Scaled ``P_in`` ``(d_in, k_in)`` and ``P_out`` ``(d_out, k_out)`` of ``layer``."""
        dev = torch.device(device)
        out = []
        for side, rows, cols in (("in", layer.d_in, layer.k_in), ("out", layer.d_out, layer.k_out)):
            key = (layer.name, side, str(dev))
            m = self._mats.get(key)
            if m is None:
                # Small (d x k) factors: drawn on the CPU so every device gets the same matrix.
                seed = derive_seed(self.config.seed, layer.name, side)
                m = random_matrix("gaussian", rows, cols, seed, "cpu", self.config.torch_dtype)
                m = m.mul_(1.0 / math.sqrt(cols)).to(dev)
                self._mats[key] = m
            out.append(m)
        return out[0], out[1]

    def dense_equivalent(self, layer: KroneckerLayer, device: torch.device | str = "cpu") -> Tensor:
        """``kron(P_out, P_in)``: ``(d_out * d_in, k_out * k_in)``; tests only."""
        p_in, p_out = self.matrices(layer, device)
        return torch.kron(p_out, p_in)

    # -- capture ----------------------------------------------------------------------------
    @contextmanager
    def capture(self) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
        """Hooks recording, per layer and call, ``(input, output)``; the output keeps its graph."""
        store: dict[str, list[tuple[Tensor, Tensor]]] = {ly.name: [] for ly in self.layers}
        handles = []
        for ly in self.layers:

            def hook(
                mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor, name: str = ly.name
            ) -> None:
                store[name].append((inp[0].detach(), out))

            handles.append(ly.module.register_forward_hook(hook))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def input_factor(self, layer: KroneckerLayer, a: Tensor) -> Tensor:
        """Projected inputs ``P_in^T a_pos``: ``(B, P, k_in)`` for one call's input ``a``."""
        dt = self.config.torch_dtype
        p_in, _ = self.matrices(layer, a.device)
        m = layer.module
        if isinstance(m, nn.Conv2d):
            # P_in^T applied to every im2col patch == a convolution with P_in as its kernels.
            n_w = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            kern = p_in[:n_w].T.reshape(layer.k_in, m.in_channels, *m.kernel_size)
            bias = p_in[n_w] if layer.bias_name is not None else None
            pa = F.conv2d(a.to(dt), kern, bias, m.stride, m.padding, m.dilation)
            return pa.flatten(2).transpose(1, 2)
        pa = a.to(dt).reshape(a.shape[0], -1, a.shape[-1]) @ p_in[: a.shape[-1]]
        if layer.bias_name is not None:
            pa = pa + p_in[a.shape[-1]]
        return pa

    def output_factor(self, layer: KroneckerLayer, g: Tensor) -> Tensor:
        """Projected output gradients ``P_out^T g_pos``: ``(B, P, k_out)`` for one call."""
        _, p_out = self.matrices(layer, g.device)
        return expand_grads(layer, g.to(self.config.torch_dtype)) @ p_out

    def factors(self, layer: KroneckerLayer, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Projected input ``(B, P, k_in)`` and projected output gradient ``(B, P, k_out)``."""
        return self.input_factor(layer, a), self.output_factor(layer, g)

    def _rows(self, layer: KroneckerLayer, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`expand_rows` in the projector's dtype."""
        dt = self.config.torch_dtype
        return expand_rows(layer, a.to(dt), g.to(dt))

    def layer_grad(self, layer: KroneckerLayer, calls: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Explicit per-sample ``[dW | db]``: ``(B, d_out, d_in)`` (tests, exact norms)."""
        total: Tensor | None = None
        for a, g in calls:
            cols, gr = self._rows(layer, a, g)
            dw = torch.einsum("bpo,bpi->boi", gr, cols)
            total = dw if total is None else total + dw
        assert total is not None
        return total

    def features(
        self,
        acts: Mapping[str, list[Tensor]],
        gouts: Mapping[str, list[Tensor]],
        with_norms: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Projected features ``(B, dim)`` and, if asked, exact squared gradient norms ``(B,)``.

        ``acts[name]`` / ``gouts[name]``: per call of the layer, its input and the gradient of the
        summed outputs at its output (batched, one row per sample).
        """
        out = self.features_of_outputs(acts, [gouts], [with_norms])
        return out[0]

    def features_of_outputs(
        self,
        acts: Mapping[str, list[Tensor]],
        gouts: Sequence[Mapping[str, list[Tensor]]],
        with_norms: Sequence[bool],
    ) -> list[tuple[Tensor, Tensor | None]]:
        """:meth:`features` of several output functions' gradients from one forward.

        ``gouts[o]``: the output gradients of output function ``o`` (as in :meth:`features`);
        ``with_norms[o]``: also its exact squared norms. Each layer's projected inputs (and, for
        the norms, its per-position inputs) are computed once and shared by every output; each
        output's result is exactly what :meth:`features` gives it alone (same operations on the
        same tensors).
        """
        if len(gouts) != len(with_norms):
            raise ValueError("features_of_outputs: one with_norms flag per output is needed")
        blocks: list[list[Tensor]] = [[] for _ in gouts]
        sqs: list[Tensor | None] = [None for _ in gouts]
        dt = self.config.torch_dtype
        for ly in self.layers:
            inputs = acts[ly.name]
            if not inputs:
                raise RuntimeError(
                    f"kronecker projector: layer {ly.name!r} was not called in the forward"
                )
            pas = [self.input_factor(ly, a) for a in inputs]
            for o, g_by_layer in enumerate(gouts):
                grads = g_by_layer[ly.name]
                if len(grads) != len(inputs):
                    raise RuntimeError(
                        f"kronecker projector: layer {ly.name!r} has {len(inputs)} inputs but "
                        f"{len(grads)} output gradients"
                    )
                feat: Tensor | None = None
                for pa, g in zip(pas, grads, strict=True):
                    f = torch.einsum("bpo,bpi->boi", self.output_factor(ly, g), pa).flatten(1)
                    feat = f if feat is None else feat + f
                assert feat is not None
                blocks[o].append(feat)
            wanted = [o for o, w in enumerate(with_norms) if w]
            if wanted:
                norms = _sq_norms(
                    ly,
                    [a.to(dt) for a in inputs],
                    [[g.to(dt) for g in gouts[o][ly.name]] for o in wanted],
                )
                for o, s in zip(wanted, norms, strict=True):
                    prev = sqs[o]
                    sqs[o] = s if prev is None else prev + s
        return [(torch.cat(b, dim=1), sq) for b, sq in zip(blocks, sqs, strict=True)]


def _cat_positions(parts: list[Tensor]) -> Tensor:
    """Per-call ``(B, P_c, d)`` rows of one layer concatenated over its calls: ``(B, sum P_c, d)``."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _sq_norms(
    layer: KroneckerLayer, inputs: list[Tensor], grads_by_output: list[list[Tensor]]
) -> list[Tensor]:
    """Exact ``||[dW | db]||_F^2`` per sample ``(B,)`` of each output function's gradients
    (``grads_by_output[o]``: the output gradient of every call of the layer), from the calls'
    ``inputs``; ``||db||^2 = ||sum_pos g_pos||^2`` is added when the bias is selected.

    Conv2d: ``dW`` per sample from one grouped weight-gradient convolution (the batch as groups),
    two to three times faster than im2col patches. Linear: with all positions stacked,
    ``||sum_p g_p a_p^T||^2 = sum_{p,q} (g_p.g_q)(a_p.a_q)``; the Gram form costs
    ``P^2 (d_in + d_out)``, forming ``dW`` costs ``P d_in d_out``; the cheaper is taken (the input
    Gram computed once for all outputs).
    """
    m = layer.module
    bias = layer.bias_name is not None
    out: list[Tensor] = []
    if isinstance(m, nn.Conv2d):
        for grads in grads_by_output:
            dw: Tensor | None = None
            for a, g in zip(inputs, grads, strict=True):
                w = _conv_weight_grads(m, a, g)
                dw = w if dw is None else dw + w
            assert dw is not None
            sq = torch.linalg.vector_norm(dw.flatten(1), dim=1).square()
            if bias:
                db = torch.stack([g.sum(dim=(2, 3)) for g in grads]).sum(dim=0)
                sq = sq + db.pow(2).sum(dim=1)
            out.append(sq)
        return out
    cols = _cat_positions([a.reshape(a.shape[0], -1, a.shape[-1]) for a in inputs])
    P, d_in = cols.shape[1], layer.d_in
    gram = P * (d_in + layer.d_out) < d_in * layer.d_out
    ga = None
    for grads in grads_by_output:
        gr = _cat_positions([expand_grads(layer, g) for g in grads])
        if gram:
            if ga is None:
                # The ones column of [W | b] adds 1 to every input dot product.
                ga = cols @ cols.transpose(1, 2) + (1.0 if bias else 0.0)
            out.append((ga * (gr @ gr.transpose(1, 2))).sum(dim=(1, 2)))
            continue
        sq = torch.bmm(gr.transpose(1, 2), cols).pow(2).sum(dim=(1, 2))
        if bias:
            sq = sq + gr.sum(dim=1).pow(2).sum(dim=1)
        out.append(sq)
    return out


def _conv_weight_grads(m: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients ``(B, out, in, kh, kw)`` of one call: input ``a``
    ``(B, in, H, W)``, output gradient ``g`` ``(B, out, H', W')``."""
    B = a.shape[0]
    w = conv2d_weight(
        a.reshape(1, B * a.shape[1], *a.shape[2:]),
        (B * m.out_channels, m.in_channels, *m.kernel_size),
        g.reshape(1, B * g.shape[1], *g.shape[2:]),
        m.stride,
        cast(tuple[int, ...], m.padding),
        m.dilation,
        groups=B,
    )
    return w.reshape(B, m.out_channels, m.in_channels, *m.kernel_size)


@dataclass
class ProjectorInfo:
    """What a built projector covers (recorded in a feature store's manifest)."""

    dim: int
    covered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    layer_dims: dict[str, list[int]] = field(default_factory=dict)


def make_projector(
    cfg: ProjectorConfig,
    param_shapes: Mapping[str, Sequence[int]],
    model: nn.Module | None = None,
) -> IdentityProjector | DenseProjector | KroneckerProjector:
    """Build the projector ``cfg`` describes for parameters ``param_shapes`` (name -> shape).

    ``model`` (the UNet) is required for ``kronecker``, which needs the layers, not just shapes.
    Rebuilding from the same config and parameters gives exactly the same matrices.
    """
    if cfg.kind == "identity":
        return IdentityProjector(cfg, param_shapes)
    if cfg.kind in ("gaussian", "rademacher"):
        return DenseProjector(cfg, param_shapes)
    if model is None:
        raise ValueError(
            "make_projector: kind 'kronecker' needs the model (its Linear/Conv2d layers)"
        )
    return KroneckerProjector(cfg, model, list(param_shapes))


def projector_info(proj: IdentityProjector | DenseProjector | KroneckerProjector) -> ProjectorInfo:
    if isinstance(proj, KroneckerProjector):
        return ProjectorInfo(
            dim=proj.dim,
            covered=list(proj.covered),
            skipped=list(proj.skipped),
            layer_dims={ly.name: [ly.k_out, ly.k_in] for ly in proj.layers},
        )
    return ProjectorInfo(dim=proj.dim, covered=list(proj.shapes))


@contextmanager
def outputs_in_graph(layers: KroneckerProjector) -> Iterator[None]:
    """Make the layers' weights require grad (restored after), so every layer output is in the
    autograd graph even for a frozen UNet; only gradients at the outputs are asked for, so no
    weight gradient is formed."""
    weights: list[Tensor] = [cast(Tensor, ly.module.weight) for ly in layers.layers]
    saved = [bool(w.requires_grad) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, r in zip(weights, saved, strict=True):
            w.requires_grad_(r)
