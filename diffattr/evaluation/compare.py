"""One comparison of every evaluated method: a markdown + CSV table and a PNG plot.

Columns: LDS with its bootstrap CI per query set (held-out, generated) and, with two or more
retraining seeds per subset, as a share of the seed-noise ceiling; the counterfactual effect
(pixel L2 and feature distance of the regenerated image, per removal fraction, with bootstrap CIs
over queries, and the paired difference to the random-removal control, which is its own row), and
the fit (featurization) and scoring times. A method that failed appears as ``failed: <reason>``.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffattr.evaluation.lds import LDSResult, SeedCeiling, ceiling_from_seed_corr

log = logging.getLogger(__name__)

QUERY_SETS = ("held_out", "generated")
RANDOM_CONTROL = "random (control)"


@dataclass
class MethodResult:
    """What the harness measured for one method.

    ``counterfactual``: fraction label (e.g. "1%") -> {"l2": mean pixel L2, "feature": mean feature
    cosine distance over the counterfactual queries, "l2_ci" / "feature_ci": their bootstrap CIs,
    "l2_vs_random" / "feature_vs_random" (+ "_ci"): the paired difference to the random control}
    (see :func:`diffattr.evaluation.counterfactual.summarize`).
    """

    method: str
    error: str | None = None
    lds: dict[str, LDSResult] = field(default_factory=dict)
    counterfactual: dict[str, dict[str, Any]] = field(default_factory=dict)
    fit_seconds: float | None = None
    score_seconds: float | None = None
    set_errors: dict[str, str] = field(default_factory=dict)  # query set -> why it has no score
    # query set -> {"best": lambda, "lds": {lambda: mean LDS}} when the ridge was swept
    lambda_search: dict[str, dict[str, Any]] = field(default_factory=dict)
    # query set -> LDS on the group subsets (see diffattr.evaluation.groups); empty when disabled
    group_lds: dict[str, LDSResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d = self._image_dict()
        if self.group_lds:  # only then: results of evaluations without groups stay as they were
            d["group_lds"] = {k: v.to_dict() for k, v in self.group_lds.items()}
        return d

    def _image_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "error": self.error,
            "lds": {k: v.to_dict() for k, v in self.lds.items()},
            "counterfactual": self.counterfactual,
            "fit_seconds": self.fit_seconds,
            "score_seconds": self.score_seconds,
            "set_errors": self.set_errors,
            "lambda_search": self.lambda_search,
        }


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _fractions(results: list[MethodResult]) -> list[str]:
    seen: list[str] = []
    for r in results:
        for k in r.counterfactual:
            if k not in seen:
                seen.append(k)
    return sorted(seen, key=lambda s: float(s.rstrip("%")))


def _interval(ci: Any, digits: int) -> str:
    if not ci:
        return "-"
    return f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _cf_cells(cell: dict[str, Any], key: str, digits: int) -> list[str]:
    """``mean [CI]`` and ``paired difference to random [CI]`` of one counterfactual distance."""
    value = _fmt(cell.get(key), digits)
    if cell.get(f"{key}_ci"):
        value += " " + _interval(cell[f"{key}_ci"], digits)
    diff = cell.get(f"{key}_vs_random")
    vs = (
        "-"
        if diff is None
        else f"{diff:+.{digits}f} " + _interval(cell[f"{key}_vs_random_ci"], digits)
    )
    return [value, vs]


def table_rows(
    results: list[MethodResult], ceilings: dict[str, SeedCeiling] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (strings, as written to markdown and CSV).

    With ``ceilings`` (query set -> :class:`SeedCeiling`), each LDS is also given as a share of
    its ceiling and two rows show the seed-to-seed correlation and the ceiling itself."""
    ceilings = ceilings or {}
    fracs = _fractions(results)
    qsets = [q for q in QUERY_SETS if any(q in r.lds for r in results)]
    header = ["method"]
    for q in qsets:
        header += [f"LDS {q}", f"LDS {q} 95% CI"]
        if q in ceilings:
            header.append(f"{q} % of ceiling")
    for f in fracs:
        header += [f"cf L2 @{f}", f"cf L2 - random @{f}", f"cf feature @{f}"]
        header.append(f"cf feature - random @{f}")
    gsets = [q for q in QUERY_SETS if any(q in r.group_lds for r in results)]
    for q in gsets:
        header += [f"group LDS {q}", f"group LDS {q} 95% CI"]
    header += ["fit s", "score s"]
    rows = []
    for r in results:
        if r.error is not None:
            reason = " ".join(r.error.split())[:200]
            rows.append([r.method, f"failed: {reason}"] + [""] * (len(header) - 2))
            continue
        row = [r.method]
        for q in qsets:
            res = r.lds.get(q)
            if res:
                row += [_fmt(res.mean), f"[{_fmt(res.ci_low)}, {_fmt(res.ci_high)}]"]
            elif q in r.set_errors:
                row += [f"n/a: {r.set_errors[q].split(':')[0]}", "-"]
            else:
                row += ["-", "-"]
            if q in ceilings:
                c = ceilings[q].ceiling
                row.append(f"{100 * res.mean / c:.0f}%" if res and c > 0 else "-")
        for f in fracs:
            cell = r.counterfactual.get(f, {})
            l2, l2_vs = _cf_cells(cell, "l2", 3)
            feat, feat_vs = _cf_cells(cell, "feature", 4)
            row += [l2, l2_vs, feat, feat_vs]
        for q in gsets:
            g = r.group_lds.get(q)
            row += [_fmt(g.mean), f"[{_fmt(g.ci_low)}, {_fmt(g.ci_high)}]"] if g else ["-", "-"]
        row += [_fmt(r.fit_seconds, 1), _fmt(r.score_seconds, 1)]
        rows.append(row)
    if ceilings:
        rows += _ceiling_rows(ceilings, qsets, len(header))
    return header, rows


def _ceiling_rows(
    ceilings: dict[str, SeedCeiling], qsets: list[str], width: int
) -> list[list[str]]:
    seed_row, ceil_row = ["retrained seed vs seed (r)"], ["seed-noise ceiling"]
    for q in qsets:
        c = ceilings.get(q)
        if c is None:
            seed_row += ["-", "-"]
            ceil_row += ["-", "-"]
            continue
        seed_row += [_fmt(c.mean), f"[{_fmt(c.ci_low)}, {_fmt(c.ci_high)}]", "-"]
        lo, hi = (ceiling_from_seed_corr(v, c.seeds) for v in (c.ci_low, c.ci_high))
        ceil_row += [_fmt(c.ceiling), f"[{_fmt(lo)}, {_fmt(hi)}]", "100%"]
    pad = ["-"] * (width - len(seed_row))
    return [seed_row + pad, ceil_row + pad]


def write_table(
    results: list[MethodResult],
    folder: Path,
    ceilings: dict[str, SeedCeiling] | None = None,
    notes_extra: list[str] | None = None,
) -> tuple[Path, Path]:
    """``comparison.md`` and ``comparison.csv`` in ``folder`` (``notes_extra``: more notes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(results, ceilings)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    notes = [
        "",
        "LDS: Spearman correlation across retrained subsets between a method's subset score sums "
        "and the negative measured query loss, averaged over queries; CI: bootstrap over queries.",
    ]
    if any(h.startswith("cf ") for h in header):
        notes.append(
            "cf: counterfactual distance between the image regenerated (same initial noise) after "
            "removing the method's top-k training images and the original generation; higher = the "
            "method found images that mattered more; [CI]: bootstrap over the counterfactual queries. "
            "'- random': the mean paired difference to removing as many random images for the same "
            "query; the method beats chance only where its interval lies above 0."
        )
    if any(h.startswith("group LDS") for h in header):
        notes.append(
            "group LDS: the same LDS on retrained subsets that each keep a random half of the "
            "training groups, whole (GGDA's group removal); the prediction is the query's scores "
            "summed over the kept groups' images, so it shows how well summed image scores "
            "predict removing whole groups."
        )
    for q, c in (ceilings or {}).items():
        notes.append(
            f"Seed-noise ceiling ({q}): two retraining seeds of the same subset give losses whose "
            f"Spearman correlation across subsets is r = {c.mean:.3f}; with the evaluation's "
            f"target (the mean of {c.seeds} seeds) the best possible predictor reaches about "
            f"sqrt({c.seeds} r / (1 + {c.seeds - 1} r)) = {c.ceiling:.3f} (independent seed "
            "noise assumed); '% of ceiling' divides each LDS by it."
        )
    for r in results:
        for q, err in r.set_errors.items():
            notes.append(f"{r.method} has no {q} scores: {' '.join(err.split())[:300]}")
        if r.lambda_search:
            chosen = ", ".join(f"{q} {v['best']:g}" for q, v in r.lambda_search.items())
            n = max(len(v["lds"]) for v in r.lambda_search.values())
            notes.append(
                f"{r.method}: ridge lambda chosen per query set as the best LDS of {n} values on "
                f"these same subsets (D-TRAK's protocol; optimistic): {chosen}"
            )
    notes += notes_extra or []
    md_path, csv_path = folder / "comparison.md", folder / "comparison.csv"
    md_path.write_text("\n".join(md + notes) + "\n")
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return md_path, csv_path


def plot(results: list[MethodResult], path: Path) -> Path:
    """Bar chart of LDS (with CI) per query set, and counterfactual L2 against removal fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok and r.lds]
    fracs = _fractions(results)
    ncols = 2 if fracs else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0, 0]
    qsets = [q for q in QUERY_SETS if any(q in r.lds for r in ok)]
    width = 0.8 / max(1, len(qsets))
    for i, q in enumerate(qsets):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(ok):
            if q in r.lds:
                res = r.lds[q]
                xs.append(j + i * width)
                ys.append(res.mean)
                lo.append(res.mean - res.ci_low)
                hi.append(res.ci_high - res.mean)
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=q)
    ax.set_xticks([j + width * (len(qsets) - 1) / 2 for j in range(len(ok))])
    ax.set_xticklabels([r.method for r in ok], rotation=30, ha="right")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title("Linear datamodeling score (95% CI)")
    if qsets:
        ax.legend()
    failed = [r.method for r in results if not r.ok]
    if failed:
        ax.text(
            0.01,
            0.98,
            "failed: " + ", ".join(failed),
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color="red",
        )
    if fracs:
        ax2 = axes[0, 1]
        xs_f = [float(f.rstrip("%")) for f in fracs]
        for r in results:
            if not r.ok or not r.counterfactual:
                continue
            ys_f = [r.counterfactual.get(f, {}).get("l2", math.nan) for f in fracs]
            style = "--" if r.method == RANDOM_CONTROL else "-"
            ax2.plot(xs_f, ys_f, style, marker="o", label=r.method)
        ax2.set_xlabel("training images removed (%)")
        ax2.set_ylabel("pixel L2 to original generation")
        ax2.set_title("Counterfactual: remove top-k, retrain, regenerate")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison(
    results: list[MethodResult],
    folder: Path,
    ceilings: dict[str, SeedCeiling] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Path]:
    """Table (markdown, CSV) and plot (PNG) of ``results`` in ``folder`` (``notes``: more notes
    under the table)."""
    md, csv_path = write_table(results, folder, ceilings, notes)
    png = plot(results, Path(folder) / "comparison.png")
    return {"markdown": md, "csv": csv_path, "plot": png}
