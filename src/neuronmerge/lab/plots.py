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
    figure = sweep_figure(outcome)
    import matplotlib.pyplot as plt

    target = Path(path)
    try:
        atomic_write(target, lambda temp: figure.savefig(temp, format="png"))
    finally:
        plt.close(figure)
    return target


def _count(value: float, _position: object = None) -> str:
    """A tick label for a parameter count: 20k, 1.5M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def sweep_figure(outcome: dict[str, Any]) -> Any:
    """The matplotlib figure ``plot_sweep`` writes (the caller closes it)."""
    matplotlib = require("matplotlib", "plotting a sweep")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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
    # Ticks at 1, 2 and 5 of every decade, labelled 20k, 50k...: a sweep's counts often span less
    # than a decade, where decade ticks alone would leave the axis without a single label.
    by_params.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    by_params.xaxis.set_major_formatter(FuncFormatter(_count))
    by_params.xaxis.set_minor_formatter(NullFormatter())
    by_ratio.legend(fontsize=8, loc="lower left")
    figure.suptitle(
        f"{outcome['model']}: no fine-tuning (dashed: unpruned, {outcome['baseline_accuracy']:.2f}%)"
    )
    figure.tight_layout()
    return figure
