"""Scorers against closed forms computed independently in float64 with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.attribution.scoring import (
    DEFAULT_LAMBDA_SCALE,
    TrakKernel,
    choose_lambda,
    cosine_scores,
    dot_scores,
    gram,
    trak_scores,
    trak_scores_lambda_path,
    trak_scores_per_step,
)


def _feats(n: int, m: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)).astype(np.float32), rng.normal(size=(m, k)).astype(np.float32)


def _closed_form(train: np.ndarray, query: np.ndarray, lam: float) -> np.ndarray:
    phi = train.astype(np.float64)
    q = query.astype(np.float64)
    a = phi.T @ phi + lam * np.eye(phi.shape[1])
    return q @ np.linalg.solve(a, phi.T)


@pytest.mark.parametrize("lam", [1e-3, 0.1, 1.0, 25.0])
def test_trak_matches_closed_form(lam: float) -> None:
    train, query = _feats(40, 5, 12)
    got = trak_scores(torch.from_numpy(train), torch.from_numpy(query), lam=lam)
    assert got.dtype == torch.float32 and got.shape == (5, 40)
    np.testing.assert_allclose(got.numpy(), _closed_form(train, query, lam), rtol=1e-4, atol=1e-6)


def test_trak_more_features_than_rows_needs_and_uses_ridge() -> None:
    # n < k: Phi^T Phi is singular, the ridge makes it solvable and the closed form still holds.
    train, query = _feats(6, 3, 20, seed=1)
    got = trak_scores(train, query, lam=0.5)
    np.testing.assert_allclose(got.numpy(), _closed_form(train, query, 0.5), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not positive definite"):
        trak_scores(train, query, lam=0.0)


@pytest.mark.parametrize("block", [1, 7, 40, 1000])
def test_block_size_does_not_change_results(block: int) -> None:
    train, query = _feats(40, 4, 9, seed=2)
    ref = trak_scores(train, query, lam=0.3, block=10_000).numpy()
    np.testing.assert_allclose(
        trak_scores(train, query, lam=0.3, block=block).numpy(), ref, rtol=1e-6
    )
    np.testing.assert_allclose(
        gram(train, block=block).numpy(), train.astype(np.float64).T @ train, rtol=1e-10
    )
    np.testing.assert_allclose(
        dot_scores(train, query, block=block).numpy(),
        query.astype(np.float64) @ train.T.astype(np.float64),
        rtol=1e-5,
    )


def test_lambda_rule_as_documented() -> None:
    train, query = _feats(30, 3, 8, seed=3)
    phi = train.astype(np.float64)
    expected = DEFAULT_LAMBDA_SCALE * np.trace(phi.T @ phi) / phi.shape[1]
    assert choose_lambda(train) == pytest.approx(expected, rel=1e-12)
    assert choose_lambda(train, scale=0.5) == pytest.approx(50 * expected, rel=1e-12)
    # lam=None uses the rule.
    np.testing.assert_allclose(
        trak_scores(train, query).numpy(),
        _closed_form(train, query, expected),
        rtol=1e-4,
        atol=1e-6,
    )
    # The rule makes scores invariant to a global rescaling of the features.
    np.testing.assert_allclose(
        trak_scores(3.0 * train, 3.0 * query).numpy(), trak_scores(train, query).numpy(), rtol=1e-4
    )
    # All-zero features: defined (lambda falls back to 1), scores are zero.
    assert choose_lambda(np.zeros((4, 3), np.float32)) == 1.0


def test_per_step_equals_loop_over_steps() -> None:
    rng = np.random.default_rng(4)
    train = rng.normal(size=(25, 3, 6)).astype(np.float32)
    query = rng.normal(size=(4, 3, 6)).astype(np.float32)
    got = trak_scores_per_step(train, query, lam=0.2)
    assert got.shape == (3, 4, 25)
    for s in range(3):
        np.testing.assert_allclose(
            got[s].numpy(), _closed_form(train[:, s], query[:, s], 0.2), rtol=1e-4, atol=1e-6
        )
    # lambda=None: each step gets its own rule-chosen lambda.
    auto = trak_scores_per_step(train, query)
    for s in range(3):
        lam = choose_lambda(train[:, s])
        np.testing.assert_allclose(
            auto[s].numpy(), _closed_form(train[:, s], query[:, s], lam), rtol=1e-4, atol=1e-6
        )


def test_dot_and_cosine() -> None:
    train, query = _feats(11, 3, 5, seed=5)
    train[4] = 0.0
    t64, q64 = train.astype(np.float64), query.astype(np.float64)
    np.testing.assert_allclose(dot_scores(train, query).numpy(), q64 @ t64.T, rtol=1e-5, atol=1e-6)
    expected = np.zeros((3, 11))
    for a in range(3):
        for b in range(11):
            nb = np.linalg.norm(t64[b])
            expected[a, b] = 0.0 if nb == 0 else q64[a] @ t64[b] / (np.linalg.norm(q64[a]) * nb)
    got = cosine_scores(train, query, block=4).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(got[:, 4] == 0.0)


def test_bad_inputs_are_named() -> None:
    train, query = _feats(5, 2, 4)
    with pytest.raises(ValueError, match="dimension 4 but query features have 3"):
        trak_scores(train, query[:, :3])
    with pytest.raises(ValueError, match="2-d"):
        trak_scores(train[None], query)
    bad = train.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dot_scores(bad, query)
    with pytest.raises(ValueError, match="block"):
        trak_scores(train, query, block=0)


def test_kernel_is_reusable_across_query_batches() -> None:
    train, query = _feats(30, 6, 7, seed=6)
    k = TrakKernel(train, lam=0.4, block=8, device="cpu")
    parts = torch.cat([k.scores(query[:2]), k.scores(query[2:])])
    np.testing.assert_allclose(parts.numpy(), _closed_form(train, query, 0.4), rtol=1e-4, atol=1e-6)
    assert k.lam == 0.4


def test_lambda_path_equals_one_solve_per_lambda() -> None:
    lams = [1e-2, 0.5, 3.0, 40.0]
    for n, k in ((40, 12), (6, 20)):  # more rows than features, and fewer (rank-deficient gram)
        train, query = _feats(n, 5, k, seed=n)
        path = trak_scores_lambda_path(
            torch.from_numpy(train), torch.from_numpy(query), lams, block=7
        )
        assert len(path) == len(lams)
        for lam, got in zip(lams, path, strict=True):
            assert got.dtype == torch.float32 and got.shape == (5, n)
            np.testing.assert_allclose(
                got.numpy(), _closed_form(train, query, lam), rtol=1e-4, atol=1e-6
            )
    with pytest.raises(ValueError, match="lambda"):
        trak_scores_lambda_path(torch.from_numpy(train), torch.from_numpy(query), [0.0])
    with pytest.raises(ValueError, match="no lambda"):
        trak_scores_lambda_path(torch.from_numpy(train), torch.from_numpy(query), [])
