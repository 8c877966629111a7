"""Method quality from an evaluation folder (``diffattr evaluate``): each method's LDS.

LDS measures how well a method's scores predict the effect of retraining without subsets of the
data; it belongs to the model it was measured on. The report says whether that is this very model
(same hash), a model trained from the same config, or another one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffattr.errors import UserError
from diffattr.repro import RECORD_NAME, to_jsonable

CONFIG_SECTIONS = ("data", "model", "scheduler", "train")
NO_EVAL = (
    "No evaluation exists for this model: no LDS was measured, so nothing here says how well "
    "these methods predict retraining for it. Run `diffattr evaluate` and pass --eval."
)


def config_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Dotted keys (data/model/scheduler/train) where two experiment configs differ; keys only
    one side records are skipped (older records lack newer defaults)."""
    out = []
    for section in CONFIG_SECTIONS:
        a, b = ours.get(section) or {}, theirs.get(section) or {}
        for key in sorted(set(a) & set(b)):
            if to_jsonable(a[key]) != to_jsonable(b[key]):
                out.append(f"{section}.{key}")
    return out


def _relation(results: dict[str, Any], eval_dir: Path, model: Any) -> tuple[str, str]:
    if results.get("model_hash") == model.model_hash():
        return "this model", "evaluated on this model (same model hash)"
    ours = (model.record or {}).get("config") or {}
    record_path = eval_dir / RECORD_NAME
    theirs: dict[str, Any] = {}
    if record_path.exists():
        ident = json.loads(record_path.read_text()).get("identity", {})
        theirs = (ident.get("eval_config") or {}).get("experiment") or {}
    if not ours or not theirs:
        return "other model", "evaluated on another model (its config could not be compared)"
    diffs = config_differences(ours, theirs)
    if not diffs:
        return (
            "same config",
            "evaluated on a model of the same config (another training run, not this model)",
        )
    return (
        "other config",
        "evaluated on a model of another config (differs in "
        + ", ".join(diffs[:6])
        + ("..." if len(diffs) > 6 else "")
        + "); its LDS is only indicative here",
    )


def _lds(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        qset: {
            "mean": r.get("mean"),
            "ci_low": r.get("ci_low"),
            "ci_high": r.get("ci_high"),
            "n_subsets": r.get("n_subsets"),
        }
        for qset, r in (entry.get("lds") or {}).items()
    }


def quality(eval_dir: Path | None, model: Any, methods: list[str]) -> dict[str, Any]:
    """The method-quality section (JSON-able). ``eval_dir`` None: says no evaluation exists."""
    if eval_dir is None:
        return {"eval_dir": None, "relation": "none", "message": NO_EVAL, "methods": []}
    path = Path(eval_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"--eval {eval_dir}: no results.json; is it a `diffattr evaluate` folder?")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    relation, message = _relation(results, Path(eval_dir), model)
    by_name = {m.get("method"): m for m in results.get("methods", [])}
    rows: list[dict[str, Any]] = []
    for name in methods:
        entry = by_name.get(name)
        if entry is None or entry.get("error"):
            why = "not evaluated" if entry is None else f"evaluation failed: {entry['error']}"
            rows.append({"method": name, "lds": {}, "note": why})
        else:
            rows.append({"method": name, "lds": _lds(entry), "note": None})
    return {
        "eval_dir": str(eval_dir),
        "relation": relation,
        "message": message,
        "eval_model_hash": results.get("model_hash"),
        "methods": rows,
    }
