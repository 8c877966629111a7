"""The report's content as one JSON-able dict (``report.json``; the HTML renders exactly this).

Sections: ``query``, ``methods`` (per method: top-k with sources and groups, stability, options,
group shares), ``near_copy``, ``agreement``, ``groups``, ``journey``, ``quality``, ``provenance``,
``caveats``, ``timing``. The layout is fixed by ``assets/report_schema.json``
(:data:`SCHEMA_VERSION`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

import diffattr
from diffattr.attribution.base import Scores, describe_stability
from diffattr.attribution.registry import ATTRIBUTORS
from diffattr.report.groups import Groups
from diffattr.report.inputs import MethodRun
from diffattr.repro import environment, to_jsonable

SCHEMA_VERSION = 1

WHAT_SCORES_ESTIMATE = (
    "A method's score for a training image estimates how much training on that image lowered the "
    "model's denoising loss on this image (higher: helped more). It is an estimate: gradient "
    "methods sample timesteps and noise, and the stability line under each method says how much "
    "of its top list survives a second, independent set of samples."
)
CAVEATS = [
    "This is not a legal finding. It reports statistical estimates about one model and its "
    "training data; whether any use is lawful is for a court or counsel, not for this tool.",
    "Influence is not copying: a training image can strongly influence a generation that looks "
    "nothing like it (shared strokes, style, composition), and every image is influenced by many.",
    "The near-copy verdict is a separate signal, measured on pixels, a perceptual hash and "
    "embeddings, never on attribution scores; a copy can be missed if it was cropped, flipped or "
    "recoloured.",
    "Methods disagree; a training image that several methods rank highly is a stronger lead than "
    "one method's first place. Check the method quality (LDS) before relying on one method.",
    "Group shares depend on the grouping given; a group far above its share of the training set "
    "is over-attributed, but small groups have wide intervals.",
]


def clean(obj: Any) -> Any:
    """JSON-able copy of ``obj`` with NaN / inf replaced by None (JSON has no NaN)."""
    obj = to_jsonable(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    return obj


def stability_entry(scores: Scores, k: int) -> dict[str, Any]:
    """The method's stability figure for the query (exact methods: no sampling, no figure)."""
    stab = scores.stability(k)
    return {
        "text": describe_stability(stab, 0),
        "exact": stab is None,
        "top_k": None if stab is None else stab.k,
        "overlap": None if stab is None else float(stab.overlap[0]),
        "rank_corr": None if stab is None else float(stab.rank_corr[0]),
    }


def top_rows(
    scores: Scores, k: int, sources: dict[int, str], groups: Groups, row_of: dict[int, int]
) -> list[dict[str, Any]]:
    """The ``k`` best training images: rank, id, score, source (file or data set:id), group."""
    return [
        {
            "rank": r,
            "id": tid,
            "score": score,
            "source": sources[tid],
            "group": groups.of(row_of[tid]),
        }
        for r, (tid, score) in enumerate(scores.top_k(k)[0], 1)
    ]


def method_section(
    run: MethodRun,
    scores: Scores,
    k: int,
    sources: dict[int, str],
    groups: Groups,
    row_of: dict[int, int],
    group_table: dict[str, Any],
) -> dict[str, Any]:
    ident = run.record["identity"]
    return {
        "name": run.name,
        "description": ATTRIBUTORS[run.name].description,
        "folder": str(run.folder),
        "built": run.built,
        "options": ident["options"],
        "featurized": run.record.get("created"),
        "stability": stability_entry(scores, k),
        "top": top_rows(scores, k, sources, groups, row_of),
        "groups": group_table,
        "n_train": int(scores.values.shape[1]),
    }


def provenance(
    model: Any, model_path: str, runs: list[MethodRun], train: Any, seed: int
) -> dict[str, Any]:
    """Hashes, options, seeds and versions: what is needed to reproduce every number."""
    mh, dh = model.model_hash(), train.data_hash()
    record = model.record if isinstance(model.record, dict) else {}
    lora = getattr(model, "lora_path", None)
    return {
        "model_path": model_path,
        "model_hash": mh,
        "model_hash_short": mh[:12],
        # A text-to-image model: the base model and the LoRA on it (None without one).
        "base_hash": model.base_hash() if hasattr(model, "base_hash") else None,
        "lora_path": None if lora is None else str(lora),
        "lora_hash": model.lora_hash() if hasattr(model, "lora_hash") else None,
        "model_seed": record.get("seed"),
        "model_steps": record.get("steps"),
        "data": {
            "name": train.name,
            "n_train": len(train),
            "hash": dh,
            "hash_short": dh[:12],
            "config": runs[0].record["identity"]["data"],
        },
        "methods": [
            {
                "name": r.name,
                "folder": str(r.folder),
                "built_now": r.built,
                "options": r.record["identity"]["options"],
                "seed": r.record["identity"]["options"].get("seed"),
                "featurized": r.record.get("created"),
            }
            for r in runs
        ],
        "report_seed": seed,
        "environment": {**environment(), "diffattr": diffattr.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def group_summary(groups: Groups, draws: int) -> dict[str, Any]:
    counts = np.bincount(groups.index, minlength=len(groups.names))
    return {
        "spec": groups.spec,
        "label": groups.label,
        "how": groups.how,
        "n_groups": len(groups.names),
        "sizes": {n: int(c) for n, c in zip(groups.names, counts, strict=True)},
        "bootstrap_draws": draws,
        "level": 0.95,
        "interval": (
            "percentile bootstrap over training images (resampled with replacement within the "
            "score vector); half_shares: the share under each of the method's two half-sample "
            "score tables, when it has them"
        ),
    }
