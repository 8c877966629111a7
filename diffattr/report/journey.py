"""Journey plot: which training images mattered at which sampling step (Journey-TRAK).

``Scores.per_step`` ``(n_steps, n_queries, n_train)`` holds one attribution per sampling step of
the query's own generation; early steps decide the layout, late steps the details, so a training
image can matter early and not at all at the end.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

TOP_IDS = 5


def journey_series(
    per_step: np.ndarray, timesteps: np.ndarray, train_ids: np.ndarray, top: int = TOP_IDS
) -> dict[str, Any]:
    """The ``top`` training images by mean score over steps, each with its per-step scores.

    ``per_step``: ``(n_steps, n_train)`` for the one query; ``timesteps``: ``(n_steps,)``."""
    order = np.argsort(-per_step.mean(axis=0), kind="stable")[:top]
    return {
        "timesteps": [int(t) for t in timesteps],
        "series": [
            {"id": int(train_ids[j]), "values": [float(v) for v in per_step[:, j]]} for j in order
        ],
    }


def journey_png(series: dict[str, Any]) -> str:
    """The series as a line plot, base64 PNG (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(len(series["timesteps"]))
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=110)
    for s in series["series"]:
        ax.plot(steps, s["values"], marker="o", ms=3, label=f"id {s['id']}")
    ax.axhline(0.0, color="#999", lw=0.8)
    ticks = steps[:: max(1, len(steps) // 10)]
    ax.set_xticks(ticks, [str(series["timesteps"][i]) for i in ticks])
    ax.set_xlabel("sampling step (timestep; generation runs left to right)")
    ax.set_ylabel("score at that step")
    ax.legend(fontsize=8, ncol=min(5, len(series["series"])), loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
