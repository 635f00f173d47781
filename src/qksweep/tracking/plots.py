"""Plots logged as run artifacts (matplotlib, Agg)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..names import CURVES
from . import runs



def learning_curves_png(history: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in keys if history.get(k)]) for title, keys in CURVES]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            steps, vals = zip(*sorted(history[k]))
            ax.plot(steps, vals, marker="o", ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def log_learning_curves(uri: str, run_id: str) -> None:
    c = runs.client(uri)
    keys = [k for _, ks in CURVES for k in ks]
    history = {k: [(m.step, m.value) for m in runs.retrying(lambda k=k: c.get_metric_history(run_id, k), what="metric history")]
               for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        png = learning_curves_png(history, Path(tmp) / "learning_curves.png")
        if png is not None:
            runs.log_artifact_file(uri, run_id, png, "plots")
