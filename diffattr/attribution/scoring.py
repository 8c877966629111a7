"""Scorers: turn training features ``(n, k)`` and query features ``(m, k)`` into scores ``(m, n)``.

The TRAK kernel score of query ``q`` against training image ``i`` is

    score[q, i] = phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i

with ``Phi`` the ``(n, k)`` matrix of training features. It is computed so that neither the
``(n, k)`` matrix nor the ``(m, n)`` result ever has to exist in float64:

1. ``G = Phi^T Phi`` is accumulated in float64 over blocks of training rows (``block`` rows are
   upcast at a time), so 50,000 x k features cost ``block x k`` float64 memory, not ``n x k``.
2. ``G + lambda I = L L^T`` (float64 Cholesky) and ``W = (G + lambda I)^{-1} Phi_q^T`` (``k x m``)
   by two triangular solves; no explicit inverse is formed.
3. ``scores = (Phi W)^T`` block by block over training rows, each block upcast to float64 and the
   result stored as float32.

Lambda rule (:func:`choose_lambda`): ``lambda = c * trace(G) / k`` with ``c = 0.01`` by default,
i.e. one hundredth of the mean eigenvalue of ``G``. Why this rule:

- it scales with the features, so multiplying every feature by ``a`` leaves the scores' ranking
  and relative sizes unchanged (``G`` and ``lambda`` both scale by ``a^2``);
- it keeps ``G + lambda I`` well conditioned (condition number at most ``1 + k / c``) also when
  ``n < k`` (then ``G`` is singular and unregularised TRAK is undefined);
- it is small enough (1% of the average eigenvalue) that the directions the training set spans
  well are barely damped, so the scores stay close to TRAK's ``(Phi^T Phi)^{-1}`` kernel.

D-TRAK and DAS tune ``lambda`` by sweeping it against LDS; pass ``lam`` explicitly to do that.

Every scorer handles the query rows **one at a time** (:func:`per_query`): BLAS kernels may sum in
another order for another number of right-hand sides, so scoring queries together could make a
query's scores depend, in the last bits, on which other queries came with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_LAMBDA_SCALE = 0.01
DEFAULT_BLOCK = 8192

ArrayLike = Tensor | np.ndarray


def _as_tensor(x: ArrayLike, what: str, ndim: int) -> Tensor:
    t = torch.as_tensor(x)
    if t.ndim != ndim:
        raise ValueError(f"{what}: expected a {ndim}-d array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _check_pair(train: Tensor, query: Tensor) -> None:
    if train.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"features: training features have dimension {train.shape[-1]} but query features "
            f"have {query.shape[-1]}; were they made with the same projector?"
        )
    if not bool(torch.isfinite(train).all()):
        raise ValueError("training features contain NaN or inf")
    if not bool(torch.isfinite(query).all()):
        raise ValueError("query features contain NaN or inf")


def per_query(query_feats: Tensor, one: Callable[[Tensor], Tensor]) -> Tensor:
    """``one`` applied to each query row ``(1, k)`` alone, results stacked along dim 0."""
    if query_feats.shape[0] == 0:
        return one(query_feats)
    return torch.cat([one(query_feats[j : j + 1].clone()) for j in range(query_feats.shape[0])])


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected an int >= 1, got {block!r}")


def gram(
    train_feats: ArrayLike, block: int = DEFAULT_BLOCK, device: torch.device | str | None = None
) -> Tensor:
    """``Phi^T Phi`` in float64, ``(k, k)``, accumulated over ``block`` training rows at a time.

    ``device``: where to accumulate (default: the features' device); only one block of rows is
    moved there at a time, so CPU-resident features can use a GPU without copying them all.
    """
    phi = _as_tensor(train_feats, "train_feats", 2)
    _check_block(block)
    dev = phi.device if device is None else torch.device(device)
    k = phi.shape[1]
    g = torch.zeros(k, k, dtype=torch.float64, device=dev)
    for start in range(0, phi.shape[0], block):
        rows = phi[start : start + block].to(dev, torch.float64)
        g += rows.T @ rows
    return g


def lambda_from_gram(g: Tensor, scale: float = DEFAULT_LAMBDA_SCALE) -> float:
    """``scale * trace(g) / k`` (the module's lambda rule); 1.0 when ``g`` is all zeros."""
    if scale <= 0:
        raise ValueError(f"lambda_scale: expected > 0, got {scale!r}")
    k = g.shape[0]
    lam = float(scale * torch.trace(g).item() / k)
    # All-zero features give all-zero scores whatever lambda is; 1.0 just keeps the solve defined.
    return lam if lam > 0 else 1.0


def choose_lambda(
    train_feats: ArrayLike, scale: float = DEFAULT_LAMBDA_SCALE, block: int = DEFAULT_BLOCK
) -> float:
    """The documented default ridge: ``scale * trace(Phi^T Phi) / k`` (see module docstring)."""
    return lambda_from_gram(gram(train_feats, block), scale)


def _cholesky(g: Tensor, lam: float) -> Tensor:
    """Lower Cholesky factor of ``g + lam I`` (float64), or a clear error if it is not PD."""
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lambda: expected a finite value >= 0, got {lam!r}")
    k = g.shape[0]
    a = g + lam * torch.eye(k, dtype=torch.float64, device=g.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info.item()) != 0:
        raise ValueError(
            f"TRAK kernel: Phi^T Phi + {lam:g} I is not positive definite in float64 "
            f"(k={k}); use a larger lambda (or lambda=None for the default rule)"
        )
    return chol


class TrakKernel:
    """The training-set half of TRAK scoring, built once and reused for many query batches.

    ``TrakKernel(train_feats (n, k), lam=None)`` keeps the features, the chosen ``lam`` and the
    float64 Cholesky factor of ``Phi^T Phi + lam I``; :meth:`scores` maps ``(m, k)`` query features
    to float32 ``(m, n)`` scores (on the features' device). ``device`` is where the float64 work
    runs (e.g. the model's GPU while the features stay in CPU memory).
    """

    def __init__(
        self,
        train_feats: ArrayLike,
        lam: float | None = None,
        block: int = DEFAULT_BLOCK,
        lambda_scale: float = DEFAULT_LAMBDA_SCALE,
        device: torch.device | str | None = None,
    ) -> None:
        self.phi = _as_tensor(train_feats, "train_feats", 2)
        _check_block(block)
        if not bool(torch.isfinite(self.phi).all()):
            raise ValueError("training features contain NaN or inf")
        self.block = block
        self.device = self.phi.device if device is None else torch.device(device)
        g = gram(self.phi, block, self.device)
        self.lam = float(lambda_from_gram(g, lambda_scale) if lam is None else lam)
        self.chol = _cholesky(g, self.lam)

    def scores(self, query_feats: ArrayLike) -> Tensor:
        """``phi_q^T (Phi^T Phi + lam I)^{-1} phi_i`` for every query and training row."""
        q = _as_tensor(query_feats, "query_feats", 2).to(self.phi.device)
        _check_pair(self.phi, q)
        return per_query(q, self._scores_one)

    def _scores_one(self, q: Tensor) -> Tensor:
        w = torch.cholesky_solve(q.T.to(self.device, torch.float64), self.chol)  # (k, 1)
        out = torch.empty(1, self.phi.shape[0], dtype=torch.float32, device=self.phi.device)
        for start in range(0, self.phi.shape[0], self.block):
            rows = self.phi[start : start + self.block].to(self.device, torch.float64)
            out[:, start : start + rows.shape[0]] = (rows @ w).T.to(self.phi.device, torch.float32)
        return out


def trak_scores_lambda_path(
    train_feats: ArrayLike,
    query_feats: ArrayLike,
    lams: list[float],
    block: int = DEFAULT_BLOCK,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """TRAK kernel scores for several ridges at the cost of about one.

    With ``Phi^T Phi = V diag(s) V^T``,
    ``phi_q^T (Phi^T Phi + lam I)^{-1} phi_i = (phi_q V) diag(1 / (s + lam)) (phi_i V)^T``: one
    eigendecomposition, one projection of queries and training rows onto ``V``, then one product
    per ``lam``. Returns float32 ``(m, n)`` per ``lam`` (equal to :func:`trak_scores` up to
    rounding). D-TRAK picks its ridge from such a sweep.
    """
    phi = _as_tensor(train_feats, "train_feats", 2)
    q = _as_tensor(query_feats, "query_feats", 2)
    _check_pair(phi, q)
    _check_block(block)
    if not lams:
        raise ValueError("lambda path: no lambda values")
    for lam in lams:
        if not np.isfinite(lam) or lam <= 0:
            raise ValueError(f"lambda path: every lambda must be finite and > 0, got {lam!r}")
    dev = phi.device if device is None else torch.device(device)
    s, v = torch.linalg.eigh(gram(phi, block, dev))  # (k,), (k, k) float64
    pv = torch.cat(
        [phi[i : i + block].to(dev, torch.float64) @ v for i in range(0, phi.shape[0], block)]
    )  # (n, k)
    s = s.clamp(min=0.0)  # eigh can return tiny negatives for a PSD matrix

    def one(row: Tensor) -> Tensor:  # (1, k) -> (L, n): every lambda for this query
        qv = row.to(dev, torch.float64) @ v
        return torch.cat([(qv / (s + lam)) @ pv.T for lam in lams])

    path = per_query(q, lambda row: one(row)[None])  # (m, L, n)
    return [path[:, i].to(phi.device, torch.float32) for i in range(len(lams))]


def trak_scores(
    train_feats: ArrayLike,
    query_feats: ArrayLike,
    lam: float | None = None,
    block: int = DEFAULT_BLOCK,
    lambda_scale: float = DEFAULT_LAMBDA_SCALE,
) -> Tensor:
    """TRAK kernel scores ``phi_q^T (Phi^T Phi + lam I)^{-1} phi_i``.

    ``train_feats`` ``(n, k)``, ``query_feats`` ``(m, k)`` -> float32 ``(m, n)``.
    ``lam=None`` uses :func:`choose_lambda` with ``lambda_scale``. ``block`` bounds how many
    training rows are upcast to float64 at once; it does not change the result beyond rounding.
    """
    return TrakKernel(train_feats, lam=lam, block=block, lambda_scale=lambda_scale).scores(
        query_feats
    )


def trak_scores_per_step(
    train_feats: ArrayLike,
    query_feats: ArrayLike,
    lam: float | None = None,
    block: int = DEFAULT_BLOCK,
    lambda_scale: float = DEFAULT_LAMBDA_SCALE,
) -> Tensor:
    """Per-step TRAK: ``train_feats`` ``(n, S, k)``, ``query_feats`` ``(m, S, k)`` -> ``(S, m, n)``.

    Step ``s`` uses its own kernel ``(Phi_s^T Phi_s + lam_s I)^{-1}`` built from the step-``s``
    training features only (Journey-TRAK's per-timestep attribution). With ``lam=None`` each
    step's lambda follows the rule on its own Gram matrix.
    """
    phi = _as_tensor(train_feats, "train_feats", 3)
    q = _as_tensor(query_feats, "query_feats", 3)
    if phi.shape[1] != q.shape[1]:
        raise ValueError(
            f"per-step features: training features have {phi.shape[1]} steps, queries {q.shape[1]}"
        )
    steps = [
        trak_scores(phi[:, s], q[:, s], lam=lam, block=block, lambda_scale=lambda_scale)
        for s in range(phi.shape[1])
    ]
    return torch.stack(steps)


def dot_scores(
    train_feats: ArrayLike, query_feats: ArrayLike, block: int = DEFAULT_BLOCK
) -> Tensor:
    """Plain inner products ``<phi_q, phi_i>``: ``(n, k)``, ``(m, k)`` -> float32 ``(m, n)``.

    Accumulated in float64 per block of training rows (TracIn sums of many small products).
    """
    phi = _as_tensor(train_feats, "train_feats", 2)
    q = _as_tensor(query_feats, "query_feats", 2).to(phi.device)
    _check_pair(phi, q)
    _check_block(block)

    def one(row: Tensor) -> Tensor:
        q64 = row.to(torch.float64)
        out = torch.empty(1, phi.shape[0], dtype=torch.float32, device=phi.device)
        for start in range(0, phi.shape[0], block):
            rows = phi[start : start + block].to(torch.float64)
            out[:, start : start + rows.shape[0]] = (q64 @ rows.T).to(torch.float32)
        return out

    return per_query(q, one)


def unit_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm (float64); all-zero rows stay zero."""
    x64 = x.to(torch.float64)
    return x64 / x64.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_scores(
    train_feats: ArrayLike, query_feats: ArrayLike, block: int = DEFAULT_BLOCK, eps: float = 1e-12
) -> Tensor:
    """Cosine similarities ``<phi_q, phi_i> / (|phi_q| |phi_i|)`` -> float32 ``(m, n)``.

    A zero feature vector has cosine 0 with everything (instead of NaN).
    """
    phi = _as_tensor(train_feats, "train_feats", 2)
    q = _as_tensor(query_feats, "query_feats", 2).to(phi.device)
    _check_pair(phi, q)
    _check_block(block)

    def one(row: Tensor) -> Tensor:
        qn = unit_rows(row, eps)
        out = torch.empty(1, phi.shape[0], dtype=torch.float32, device=phi.device)
        for start in range(0, phi.shape[0], block):
            rows = unit_rows(phi[start : start + block], eps)
            out[:, start : start + rows.shape[0]] = (qn @ rows.T).to(torch.float32)
        return out

    return per_query(q, one)
