"""Near copies: does a method rank a training image first when the query is (almost) that image?

For ``--n`` training images drawn with a fixed seed, three queries each: the exact image, the image
plus Gaussian pixel noise (``--sigma`` in [-1, 1] units, clipped back to [-1, 1]) and the image
shifted by one pixel (right, edge column repeated). For every method variant the table gives the
share of queries whose top-1 is the source image, its 95% Clopper-Pearson interval and the
source's median rank.

    python scripts/near_copies.py --model runs/demo/model --n 20 \
        --variants "trak;d-trak;das;pixel;d-trak per-sample=d-trak:noise=per-sample"

``--variants``: ``;``-separated entries ``LABEL=METHOD:key=value,key=value`` (or just ``METHOD``
for its defaults); values are parsed as JSON when they parse. Feature stores are cached in
``--work`` and reused by later runs. ``--folders`` adds attributors saved by ``diffattr featurize`` or the demo
(``runs/demo/features/d-trak``), scored as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffattr.attribution.base import Queries  # noqa: E402
from diffattr.attribution.registry import make_attributor  # noqa: E402
from diffattr.attribution.saved import open_folder  # noqa: E402

log = logging.getLogger("near_copies")


def parse_variants(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        label, _, spec = entry.partition("=") if "=" in entry.split(":")[0] else ("", "", entry)
        method, _, opts = spec.partition(":")
        options: dict[str, Any] = {}
        for pair in filter(None, opts.split(",")):
            key, _, raw = pair.partition("=")
            try:
                options[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                options[key.strip()] = raw
        out.append((label.strip() or method.strip(), method.strip(), options))
    return out


def perturbations(images: torch.Tensor, sigma: float, seed: int) -> dict[str, torch.Tensor]:
    """``exact``, ``noise`` and ``shift`` versions of ``images`` ``(n, C, H, W)`` in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    noisy = (images + sigma * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    shifted = torch.cat([images[..., :1], images[..., :-1]], dim=-1)
    return {"exact": images.clone(), f"noise {sigma:g}": noisy, "shift 1px": shifted}


def binomial_interval(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a share ``hits / n``: with 100 sources a measured
    95% is [89, 98], so one 20-image sample cannot tell 90% from 100%."""
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/model")
    p.add_argument("--n", type=int, default=20, help="training images used as sources")
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="trak;d-trak;das;grad-cos;diff-retrac;pixel")
    p.add_argument(
        "--kinds",
        default="exact,noise,shift",
        help="which perturbations to query with (comma-separated: exact, noise, shift)",
    )
    p.add_argument("--work", default="runs/trust-work", help="feature-store cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument(
        "--folders",
        default="",
        help="comma-separated attributor folders (`diffattr featurize` / the demo's "
        "runs/demo/features/<method>) to score too, without refitting",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from diffattr.config import DataConfig
    from diffattr.data import load_dataset
    from diffattr.diffusion.model import load_model

    model = load_model(args.model)
    train = load_dataset(DataConfig(**model.record["config"]["data"]))
    rng = np.random.default_rng(args.seed)
    rows_idx = np.sort(rng.choice(len(train), size=min(args.n, len(train)), replace=False))
    sources = train.ids[torch.as_tensor(rows_idx)].numpy()
    kinds = perturbations(train.images[torch.as_tensor(rows_idx)], args.sigma, args.seed)
    wanted = {k.strip() for k in args.kinds.split(",")}
    kinds = {k: v for k, v in kinds.items() if k.split()[0] in wanted}
    names = list(kinds)
    images = torch.cat([kinds[k] for k in names])
    queries = Queries(images, [f"{k}:{int(i)}" for k in names for i in sources])
    table = []
    variants: list[tuple[str, Any]] = [
        (label, lambda m=method, o=options: make_attributor(m, model, Path(args.work), **o))
        for label, method, options in parse_variants(args.variants)
    ]
    for folder in filter(None, args.folders.split(",")):
        variants.append(
            (f"{Path(folder).name} ({folder})", lambda f=folder: open_folder(model, f)[0])
        )
    for label, build in variants:
        t0 = time.perf_counter()
        attr = build()
        attr.fit(train)
        t1 = time.perf_counter()
        scores = attr.score(queries)
        t2 = time.perf_counter()
        order = np.argsort(-scores.values, axis=1, kind="stable")
        ranked = scores.train_ids[order]
        row = [label]
        for j in range(len(names)):
            block = ranked[j * len(sources) : (j + 1) * len(sources)]
            ranks = np.array(
                [int(np.flatnonzero(r == s)[0]) + 1 for r, s in zip(block, sources, strict=True)]
            )
            hits = int(np.sum(ranks == 1))
            lo, hi = binomial_interval(hits, len(ranks))
            row.append(
                f"{100 * hits / len(ranks):.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] "
                f"(median rank {np.median(ranks):g})"
            )
        row += [f"{t1 - t0:.0f}", f"{(t2 - t1) / len(queries):.2f}"]
        table.append(row)
        log.info("%s", " | ".join(row))
    header = ["method", *[f"top-1 = source: {k}" for k in names], "fit s", "s / query"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    text = "\n".join(lines)
    print(text)
    print(
        f"\n{len(sources)} training images of {len(train)} ({model.model_hash()[:12]}), seed {args.seed}"
    )
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
