"""A sweep drawn as the paper's Fig. 1: accuracy against pruning ratio and against parameter count.

matplotlib runs on its Agg backend (files only, no display), imported when a plot is asked for, so
that importing neuronmerge stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from neuronmerge.io import atomic_write
from neuronmerge.lab import require


def plot_sweep(outcome: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a two-panel PNG of ``outcome`` (``sweep``'s result): one curve per method, markers
    filled for data-free methods and hollow for data-aware ones, the unpruned model as a dashed line.
    """
    matplotlib = require("matplotlib", "plotting a sweep")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    methods: dict[str, list[dict[str, Any]]] = {}
    for row in outcome["results"]:
        methods.setdefault(row["method"], []).append(row)
    figure, (by_ratio, by_params) = plt.subplots(1, 2, figsize=(10, 4), dpi=80, sharey=True)
    for name, rows in methods.items():
        rows = sorted(rows, key=lambda row: row["ratio"])
        face = None if rows[0]["data_free"] else "none"
        style = {"marker": "o", "markersize": 4, "label": name, "markerfacecolor": face}
        (line,) = by_ratio.plot([r["ratio"] for r in rows], [r["accuracy"] for r in rows], **style)
        style["color"] = line.get_color()
        by_params.plot([r["params"] for r in rows], [r["accuracy"] for r in rows], **style)
    for axis in (by_ratio, by_params):
        axis.axhline(outcome["baseline_accuracy"], color="black", linestyle="--", linewidth=1)
        axis.grid(alpha=0.3)
    by_ratio.set_xlabel("pruning ratio (fraction of neurons removed per layer)")
    by_ratio.set_ylabel(f"test accuracy on {outcome['dataset']} (%)")
    by_params.set_xlabel("parameters")
    by_params.set_xscale("log")
    by_params.xaxis.set_minor_formatter(NullFormatter())  # only decades labelled: no overlaps
    by_ratio.legend(fontsize=8, loc="lower left")
    figure.suptitle(
        f"{outcome['model']}: no fine-tuning (dashed: unpruned, {outcome['baseline_accuracy']:.2f}%)"
    )
    figure.tight_layout()
    target = Path(path)
    try:
        atomic_write(target, lambda temp: figure.savefig(temp, format="png"))
    finally:
        plt.close(figure)
    return target
