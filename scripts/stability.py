"""How stable is a ranking? Top-k overlap between two independent noise seeds, per setting.

For every setting (noise policy, training timesteps x draws, query timesteps x draws, ``t_min``)
the whole pipeline is run twice, with noise seed A and noise seed B: training features, kernel,
query features, scores. The table gives, averaged over the queries, how many of the top-k training
images the two seeds share, how often their top-1 agrees, their Spearman correlation over all
training images, the stability figure ``diffattr attribute`` reports (two halves of one seed's
query samples) so one can see how well it predicts the seed-to-seed agreement, and the cost.

To measure many settings from one pass, per-timestep features are computed once per (method,
policy, seed) on a grid (``--train-grid`` training timesteps, ``--query-grid`` query timesteps,
``--query-draws`` draws) with the package's own featurizer (:func:`per_step_features`), and each
setting averages the subset of timesteps it uses: exactly what the attributors compute for it
(uniform timesteps ``t_i = t_min + floor(i (T - t_min) / count)`` must lie on the grids).

    python scripts/stability.py --model runs/demo/model --queries runs/demo/generated \
        --methods d-trak,das --noise shared --settings 10x1:10x1,10x1:100x1,100x1:100x1

Setting syntax: ``TRAINxDRAWS:QUERYxDRAWS`` (optionally ``@TMIN``). Seconds are the measured
seconds per (image, timestep, draw) row of this run times the rows a setting needs, so settings are
compared at equal load; ``fit s`` is the training set, ``query s`` one query.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffattr.attribution.featurize import FeaturizeArgs, per_step_features  # noqa: E402
from diffattr.attribution.methods.common import content_ids  # noqa: E402
from diffattr.attribution.methods.das import residual_norms  # noqa: E402
from diffattr.attribution.projectors import ProjectorConfig  # noqa: E402
from diffattr.attribution.scoring import TrakKernel  # noqa: E402
from diffattr.attribution.timesteps import TimestepPolicy  # noqa: E402
from diffattr.stats import spearman_columns, top_k_overlap  # noqa: E402

log = logging.getLogger("stability")

# method -> (output function, unit-normalise each gradient, residual weighting)
METHODS = {
    "trak": ("loss", False, False),
    "d-trak": ("square", False, False),
    "das": ("average", True, True),
}


@dataclass
class Setting:
    train_t: int
    train_d: int
    query_t: int
    query_d: int
    t_min: int = 0
    t_max: int | None = None

    @classmethod
    def parse(cls, text: str) -> Setting:
        body, _, band = text.partition("@")
        tr, qu = body.split(":")
        tt, td = (int(v) for v in tr.split("x"))
        qt, qd = (int(v) for v in qu.split("x"))
        lo, _, hi = band.partition("-")
        return cls(tt, td, qt, qd, int(lo) if lo else 0, int(hi) if hi else None)

    def label(self) -> str:
        extra = ""
        if self.t_min or self.t_max is not None:
            extra = f", t in [{self.t_min}, {'T' if self.t_max is None else self.t_max})"
        return f"{self.train_t}x{self.train_d} / {self.query_t}x{self.query_d}{extra}"

    def timesteps(self, count: int, T: int) -> list[int]:
        hi = T if self.t_max is None else self.t_max
        if hi == T:  # exactly the package's uniform policy
            return TimestepPolicy(count=count, t_min=self.t_min, num_train_timesteps=T).timesteps()
        return [self.t_min + (i * (hi - self.t_min)) // count for i in range(count)]


def grid_columns(grid: list[int], wanted: list[int], what: str) -> list[int]:
    pos = {t: i for i, t in enumerate(grid)}
    missing = [t for t in wanted if t not in pos]
    if missing:
        raise SystemExit(f"{what}: timesteps {missing[:5]} are not on the featurized grid")
    return [pos[t] for t in wanted]


def featurize_grid(
    model, images, ids, timesteps, draws, args, batch_images
) -> tuple[torch.Tensor, float]:
    """``(n, S, D, k)`` per-draw features on the grid and the seconds per row."""
    args = FeaturizeArgs(**{**args.__dict__, "num_noise": draws})
    t0 = time.perf_counter()
    out = []
    for a in range(0, images.shape[0], batch_images):
        f = per_step_features(
            model,
            images[a : a + batch_images],
            ids[a : a + batch_images],
            timesteps,
            args,
            keep_draws=True,
        )
        out.append(f.float())
    feats = torch.cat(out)
    rows = images.shape[0] * len(timesteps) * draws
    return feats, (time.perf_counter() - t0) / rows


def cached(cache, key, grid, draws, compute) -> tuple[torch.Tensor, float]:
    """Grid features ``(n, len(grid), draws, k)`` from ``cache`` when a superset is saved there."""
    path = None if cache is None else Path(cache) / f"{key}.pt"
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        pos = {int(t): i for i, t in enumerate(saved["grid"])}
        if all(t in pos for t in grid) and saved["feats"].shape[2] >= draws:
            cols = [pos[t] for t in grid]
            return saved["feats"][:, cols, :draws], float(saved["s_per_row"])
    log.info("featurizing %s: %d timesteps x %d draws", key, len(grid), draws)
    feats, s_row = compute(grid, draws)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"grid": torch.tensor(grid), "feats": feats, "s_per_row": s_row}, path)
    return feats, s_row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/model")
    p.add_argument("--queries", default="runs/demo/generated", help="folder of query PNGs")
    p.add_argument("--methods", default="d-trak,das")
    p.add_argument("--noise", default="shared", help="comma-separated noise policies")
    p.add_argument("--seeds", default="0,1", help="two noise seeds")
    p.add_argument("--settings", required=True, help="TRAINxD:QUERYxD[@TMIN],...")
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument(
        "--cache", default=None, help="folder to keep the grid features in (reused when present)"
    )
    p.add_argument("--train-grid", type=int, default=None, help="featurize this uniform grid")
    p.add_argument("--query-grid", type=int, default=None, help="featurize this uniform grid")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from diffattr.config import DataConfig
    from diffattr.data import load_dataset
    from diffattr.data.images import load_image
    from diffattr.diffusion.model import load_model

    model = load_model(args.model)
    data_cfg = model.record["config"]["data"]
    train = load_dataset(DataConfig(**data_cfg))
    files = sorted(Path(args.queries).glob("[0-9][0-9][0-9][0-9].png"))  # not grid.png
    if not files:
        raise SystemExit(f"{args.queries}: no generated images 0000.png ...")
    images = torch.stack([load_image(f, model.image_shape) for f in files])
    T = int(model.scheduler.config.num_train_timesteps)
    settings = [Setting.parse(s) for s in args.settings.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    assert len(seeds) == 2, "--seeds takes two seeds"
    train_grid = sorted({t for s in settings for t in s.timesteps(s.train_t, T)})
    query_grid = sorted({t for s in settings for t in s.timesteps(s.query_t, T)})
    full = Setting(1, 1, 1, 1)
    if args.train_grid:  # a wider grid than the settings need: cached for later settings
        train_grid = sorted(set(train_grid) | set(full.timesteps(args.train_grid, T)))
    if args.query_grid:
        query_grid = sorted(set(query_grid) | set(full.timesteps(args.query_grid, T)))
    train_draws = max(s.train_d for s in settings)
    query_draws = max(s.query_d for s in settings)
    log.info(
        "%d training images, %d queries; grids: %d training timesteps x %d draws, %d query "
        "timesteps x %d draws",
        len(train),
        images.shape[0],
        len(train_grid),
        train_draws,
        len(query_grid),
        query_draws,
    )
    qids = content_ids(images)
    rows = []
    for method in args.methods.split(","):
        output, normalize, residual = METHODS[method]
        for policy in args.noise.split(","):
            per_seed = []
            for seed in seeds:
                fa = FeaturizeArgs(
                    output=output,
                    noise=policy,
                    normalize=normalize,
                    projector=ProjectorConfig(kind="kronecker", dim=args.proj_dim),
                    batch_size=64,
                    seed=seed,
                )
                key = f"{method}-{policy}-{seed}-{args.proj_dim}-{model.model_hash()[:12]}"
                tf, t_row = cached(
                    args.cache, f"{key}-train", train_grid, train_draws,
                    lambda g, d, fa=fa: featurize_grid(model, train.images, train.ids, g, d, fa, 16),
                )  # fmt: skip
                qf, q_row = cached(
                    args.cache, f"{key}-query", query_grid, query_draws,
                    lambda g, d, fa=fa: featurize_grid(model, images, qids, g, d, fa, 1),
                )  # fmt: skip
                per_seed.append((fa, tf, qf, t_row, q_row))
            for s in settings:
                scores, halves, split = [], [], []
                for fa, tf, qf, _, _ in per_seed:
                    tcols = grid_columns(train_grid, s.timesteps(s.train_t, T), "training")
                    qcols = grid_columns(query_grid, s.timesteps(s.query_t, T), "query")
                    phi = tf[:, tcols, : s.train_d].mean(dim=2).mean(dim=1)
                    qsel = qf[:, qcols, : s.query_d]  # (m, S, D, k)
                    kern = TrakKernel(phi)
                    weight = torch.ones(len(train), dtype=torch.float64)
                    if residual:
                        ts = [train_grid[c] for c in tcols]
                        weight = residual_norms(
                            model,
                            train,
                            ts,
                            FeaturizeArgs(**{**fa.__dict__, "num_noise": s.train_d}),
                        )

                    def score(q: torch.Tensor, kern=kern, weight=weight) -> np.ndarray:
                        return (kern.scores(q).double() * weight[None]).numpy()

                    scores.append(score(qsel.mean(dim=2).mean(dim=1)))
                    flat = qsel.reshape(qsel.shape[0], -1, qsel.shape[-1])
                    if flat.shape[1] >= 2:
                        halves.append(
                            (score(flat[:, 0::2].mean(dim=1)), score(flat[:, 1::2].mean(dim=1)))
                        )
                    # Both sides halved: two independent half-budget attributions of one seed.
                    tflat = tf[:, tcols, : s.train_d].reshape(len(train), -1, tf.shape[-1])
                    if tflat.shape[1] >= 2 and flat.shape[1] >= 2:
                        pair = []
                        for h in (0, 1):
                            kh = TrakKernel(tflat[:, h::2].mean(dim=1))
                            wh = torch.ones(len(train), dtype=torch.float64)
                            if residual:
                                ts = [train_grid[c] for c in tcols]
                                wh = residual_norms(
                                    model,
                                    train,
                                    ts[h::2] if s.train_d == 1 else ts,
                                    FeaturizeArgs(**{**fa.__dict__, "num_noise": s.train_d}),
                                )
                            qh = flat[:, h::2].mean(dim=1)
                            pair.append((kh.scores(qh).double() * wh[None]).numpy())
                        split.append(pair)
                a, b = scores
                k = args.top_k
                overlap = top_k_overlap(a, b, k)
                top1 = top_k_overlap(a, b, 1)
                rho = spearman_columns(a.T, b.T)
                half = (
                    np.mean([top_k_overlap(h[0], h[1], k).mean() for h in halves])
                    if halves
                    else float("nan")
                )
                both = (
                    np.mean([top_k_overlap(h[0], h[1], k).mean() for h in split])
                    if split
                    else float("nan")
                )
                t_row = np.mean([ps[3] for ps in per_seed])
                q_row = np.mean([ps[4] for ps in per_seed])
                rows.append(
                    [
                        method,
                        policy,
                        s.label(),
                        f"{overlap.mean() * k:.2f} ± {overlap.std() * k:.2f}",
                        f"{int(round(top1.sum()))}/{len(top1)}",
                        f"{np.nanmean(rho):.3f}",
                        f"{half * k:.2f}",
                        f"{both * k:.2f}",
                        f"{t_row * len(train) * s.train_t * s.train_d:.0f}",
                        f"{q_row * s.query_t * s.query_d:.2f}",
                    ]
                )
                log.info("%s", " | ".join(rows[-1]))
    header = [
        "method",
        "noise",
        "timesteps x draws (train / query)",
        f"top-{args.top_k} shared by 2 seeds (mean ± sd)",
        "top-1 agree",
        "Spearman",
        f"query halves' top-{args.top_k} overlap (1 seed)",
        f"train+query halves' top-{args.top_k} overlap (1 seed)",
        "fit s",
        "query s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
