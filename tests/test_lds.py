"""LDS: Spearman (against scipy), the sign convention, score/loss alignment, bootstrap CI."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from diffattr.attribution.base import Scores
from diffattr.evaluation.lds import lds, subset_score_sums
from diffattr.evaluation.subsets import make_subsets
from diffattr.stats import bootstrap_ci, rankdata, spearman, spearman_columns


def _scores(values: np.ndarray, train_ids: np.ndarray, names: list[str]) -> Scores:
    return Scores(values=values, train_ids=train_ids, query_names=names, method="synthetic")


def test_rankdata_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(30, 7)).astype(float)  # many ties
    np.testing.assert_array_equal(rankdata(x, axis=0), scipy.stats.rankdata(x, axis=0))
    np.testing.assert_array_equal(rankdata(x, axis=1), scipy.stats.rankdata(x, axis=1))


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_matches_scipy(ties):
    rng = np.random.default_rng(1)
    n, q = 40, 25
    if ties:
        a = rng.integers(0, 6, size=(n, q)).astype(float)
        b = rng.integers(0, 4, size=(n, q)).astype(float) + 0.1 * a
    else:
        a = rng.normal(size=(n, q))
        b = 0.5 * a + rng.normal(size=(n, q))
    ours = spearman_columns(a, b)
    ref = np.array([scipy.stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(q)])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert spearman(a[:, 0], b[:, 0]) == pytest.approx(ref[0], abs=1e-12)


def test_spearman_constant_column_is_nan():
    a = np.ones((10, 1))
    b = np.arange(10.0)[:, None]
    assert np.isnan(spearman_columns(a, b)[0])


def test_subset_score_sums_brute_force():
    rng = np.random.default_rng(2)
    ids = np.arange(100, 130)
    subsets = make_subsets(ids, 6, 0.5, seed=3)
    values = rng.normal(size=(4, 30)).astype(np.float32)
    perm = rng.permutation(30)  # score columns in another id order than the subsets
    s = _scores(values[:, perm], ids[perm], [f"q{i}" for i in range(4)])
    got = subset_score_sums(s, subsets)
    for m in range(6):
        members = set(subsets.ids(m).tolist())
        for q in range(4):
            want = sum(float(values[q, j]) for j in range(30) if int(ids[j]) in members)
            assert got[m, q] == pytest.approx(want, rel=1e-5, abs=1e-5)


def _setup(seed: int, n_train=50, n_sub=20, n_q=8):
    rng = np.random.default_rng(seed)
    ids = np.arange(n_train) * 3 + 7
    subsets = make_subsets(ids, n_sub, 0.5, seed=seed)
    values = rng.normal(size=(n_q, n_train)).astype(np.float32)
    names = [f"q{i}" for i in range(n_q)]
    return rng, ids, subsets, values, names


def test_lds_is_one_for_monotone_decreasing_loss():
    rng, ids, subsets, values, names = _setup(0)
    s = _scores(values, ids, names)
    sums = subsets.masks.astype(np.float64) @ values.astype(np.float64).T
    # Higher score sum = more helpful = lower loss; any strictly decreasing map keeps LDS = 1.
    losses = np.exp(-sums) + 5.0
    res = lds(s, subsets, losses, names, n_boot=100)
    np.testing.assert_allclose(res.per_query, 1.0, atol=1e-12)
    assert res.mean == pytest.approx(1.0)
    # The opposite sign convention gives -1: the sign is really applied.
    res_neg = lds(s, subsets, sums**3, names, n_boot=100)
    np.testing.assert_allclose(res_neg.per_query, -1.0, atol=1e-12)


def test_lds_aligns_queries_by_name_and_columns_by_id():
    rng, ids, subsets, values, names = _setup(1)
    losses = rng.normal(size=(len(subsets), len(names)))
    base = lds(_scores(values, ids, names), subsets, losses, names, n_boot=50)
    qp, cp = rng.permutation(len(names)), rng.permutation(len(ids))
    shuffled = _scores(values[qp][:, cp], ids[cp], [names[i] for i in qp])
    res = lds(shuffled, subsets, losses, names, n_boot=50)
    np.testing.assert_allclose(res.per_query, base.per_query[qp], atol=1e-12)
    # Brute force for one query: scipy on the explicit subset sums and negative losses.
    q = 3
    sums = [values[q, subsets.masks[m]].astype(np.float64).sum() for m in range(len(subsets))]
    want = scipy.stats.spearmanr(sums, -losses[:, q]).statistic
    assert base.per_query[q] == pytest.approx(want, abs=1e-12)


def test_lds_near_zero_for_random_scores():
    rng, ids, subsets, values, names = _setup(2, n_train=60, n_sub=64, n_q=400)
    losses = rng.normal(size=(64, 400))
    res = lds(_scores(values, ids, names), subsets, losses, names, n_boot=200)
    # Each per-query Spearman over 64 subsets has sd ~ 1/sqrt(63) = 0.126; the mean of 400 has sd
    # ~ 0.0063, so |mean| < 0.04 fails with probability ~1e-10 while still catching a real signal.
    assert abs(res.mean) < 0.04
    assert 0.08 < res.per_query.std() < 0.18
    assert res.ci_low < 0.0 < res.ci_high or abs(res.mean) < 0.02


def test_lds_constant_scores_count_as_zero():
    rng, ids, subsets, values, names = _setup(3, n_q=3)
    values[1] = 0.0
    res = lds(_scores(values, ids, names), subsets, rng.normal(size=(len(subsets), 3)), names)
    assert res.n_undefined == 1 and res.per_query[1] == 0.0


def test_lds_rejects_mismatched_shapes():
    rng, ids, subsets, values, names = _setup(4)
    with pytest.raises(ValueError, match="losses have shape"):
        lds(_scores(values, ids, names), subsets, np.zeros((3, 3)), names)
    with pytest.raises(ValueError, match="no ground truth"):
        lds(_scores(values, ids, names), subsets, np.zeros((len(subsets), 2)), ["a", "b"])


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    rng = np.random.default_rng(5)
    v = rng.normal(0.3, 0.2, size=50)
    lo, hi = bootstrap_ci(v, n_boot=2000, seed=7)
    assert lo < v.mean() < hi
    assert (lo, hi) == bootstrap_ci(v, n_boot=2000, seed=7)
    assert (lo, hi) != bootstrap_ci(v, n_boot=2000, seed=8)
    # The percentile CI of the mean is about mean +- 1.96 * sd / sqrt(n).
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size)
    assert hi - lo == pytest.approx(2 * half, rel=0.15)
    # Brute force: the same resamples drawn one by one give the same interval.
    g = np.random.default_rng(7)
    idx = g.integers(0, v.size, size=(2000, v.size))
    means = np.array([v[idx[b]].mean() for b in range(2000)])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def test_seed_ceiling_is_the_seed_to_seed_spearman_and_its_implied_ceiling():
    from diffattr.evaluation.lds import ceiling_from_seed_corr, seed_ceiling

    rng = np.random.default_rng(5)
    f = rng.normal(size=(40, 1, 6))
    losses = f + 0.8 * rng.normal(size=(40, 3, 6))  # 3 seeds, independent seed noise
    names = [f"q{i}" for i in range(6)]
    c = seed_ceiling(losses, names, n_boot=200)
    want = [
        np.mean([scipy.stats.spearmanr(losses[:, a, q], losses[:, b, q])[0]
                 for a, b in [(0, 1), (0, 2), (1, 2)]])
        for q in range(6)
    ]  # fmt: skip
    np.testing.assert_allclose(c.per_query, want, rtol=1e-12)
    r = float(np.mean(want))
    assert c.mean == pytest.approx(r) and c.seeds == 3
    assert c.ceiling == pytest.approx(np.sqrt(3 * r / (1 + 2 * r)))
    assert c.ceiling_one_seed == pytest.approx(np.sqrt(r))
    assert c.ci_low <= c.mean <= c.ci_high
    assert ceiling_from_seed_corr(-0.1, 2) == 0.0
    # The best predictor (the noise-free f) reaches about the ceiling against the seed mean.
    best = np.mean(
        [scipy.stats.spearmanr(f[:, 0, q], losses[:, :, q].mean(1))[0] for q in range(6)]
    )
    assert abs(best - c.ceiling) < 0.15
    with pytest.raises(ValueError, match="at least 2 retraining seeds"):
        seed_ceiling(losses[:, :1], names)


def test_counterfactual_summary_pairs_each_query_with_the_random_control():
    from diffattr.evaluation.compare import RANDOM_CONTROL
    from diffattr.evaluation.counterfactual import summarize

    recs = []
    l2 = {"m": [3.0, 5.0, 4.0, 6.0], RANDOM_CONTROL: [2.0, 2.5, 4.5, 3.0]}
    for method, values in l2.items():
        for q, v in enumerate(values):
            recs.append({"method": method, "query": f"q{q}", "fraction": "10%", "l2": v,
                         "feature": v / 10})  # fmt: skip
    s = summarize(recs, n_boot=500, seed=1)
    cell = s["m"]["10%"]
    assert cell["n"] == 4 and cell["l2"] == pytest.approx(4.5)
    diff = np.array(l2["m"]) - np.array(l2[RANDOM_CONTROL])
    assert cell["l2_vs_random"] == pytest.approx(diff.mean())
    assert cell["l2_vs_random_ci"] == list(bootstrap_ci(diff, 500, 1))
    assert cell["feature_vs_random"] == pytest.approx(diff.mean() / 10)
    assert "l2_vs_random" not in s[RANDOM_CONTROL]["10%"]
