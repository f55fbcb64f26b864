"""Choosing the data-free allocation on the validation split: which error curve ranks the groups of
``merge-ls``, and how far a group may move from the uniform widths (``budget.BAND``); writes
experiments/budget_validation.json.

    python experiments/budget_validation.py [--models lenet-300-100 alexnet-fmnist ...]

For every model trained here and every fraction of parameters kept (0.1 ... 0.9), each data-free
method (merge, prune, merge-ls on synthetic probes) compresses to the target with uniform widths and
with the allocated ones at every trust band of ``BANDS`` (``budget.allocate(..., band=)``: each
group's kept fraction within ``band`` of the uniform one; 1.0 leaves it free); ``merge-ls`` with
either curve (``least-squares``: its own residual on the probes' moments; ``merge``: the weights'
merge residual). The probes are made once per model and kept on disk (``probe_files``).
Only the 5,000 validation images held out of the training split are scored; the
test split is never read here. The choice (``summary``): for each (merge-ls curve, band), the best
method's allocated accuracy minus the best method's uniform accuracy in every (model, fraction)
cell; the setting with the largest mean gain is chosen, the smaller band on a tie.
Torch runs on one thread (a shared machine).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from probe_files import probe_batches

import neuronmerge as nm
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.settings import overridden
from neuronmerge.lab.sweep import fashion_mnist_eval_data
from neuronmerge.lab.training import trained_model

HERE = Path(__file__).resolve().parent
OUT = HERE / "budget_validation.json"
MODELS = ("lenet-300-100", "alexnet-fmnist", "vgg-fmnist", "resnet-fmnist")
KEPT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BANDS = (0.2, 0.5, 1.0)
METHODS = ("merge", "prune", "merge-ls")


def variants() -> list[tuple[str, str, str | None, float | None]]:
    """(method, allocation, merge-ls curve, band) of every row."""
    rows: list[tuple[str, str, str | None, float | None]] = [(m, "uniform", None, None) for m in METHODS]
    for band in BANDS:
        rows += [("merge", "error", None, band), ("prune", "error", None, band)]
        rows += [("merge-ls", "error", curve, band) for curve in ("least-squares", "merge")]
    return rows


def run_model(name: str, data: Any, save: Any) -> dict[str, Any]:
    model, info = trained_model(name, progress=False)
    example = data.test[0][:2]
    rows: list[dict[str, Any]] = []
    outcome = {
        "model": name,
        "epochs": info["epochs"],
        "baseline_val_accuracy": round(accuracy(model, *data.val), 2),
        "rows": rows,
    }
    probes = probe_batches(name, model, example)
    for kept in KEPT:
        for method, allocation, curve, band in variants():
            options: dict[str, Any] = {"target_params": kept, "method": method}
            options.update(allocation=allocation, calibration=probes if method == "merge-ls" else None)
            started = time.perf_counter()
            result = _compress(model, example, options, curve != "merge", band)
            row = {
                "kept": kept,
                "method": method,
                "allocation": allocation,
                "curve": curve,
                "band": band,
                "params": result.report.params_after,
                "val_accuracy": round(accuracy(result.model, *data.val), 2),
                "widths": [s.kept for s in result.report.sites],
                "seconds": round(time.perf_counter() - started, 2),
            }
            rows.append(row)
            save(outcome)
            print(
                f"{name} {kept:.1f} {method} {allocation} {curve} {band}: "
                f"val {row['val_accuracy']} {row['widths']}",
                flush=True,
            )
    return outcome


def _compress(
    model: Any, example: Any, options: dict[str, Any], least_squares: bool, band: float | None
) -> Any:
    """``nm.compress`` with the allocation's two settings set for this call only (and merge-ls's
    check against uniform widths off: this measures the allocation alone)."""
    with overridden(band=1.0 if band is None else band, least_squares_curves=least_squares, check=False):
        return nm.compress(model, example, **options)


def summary(models: dict[str, Any]) -> dict[str, Any]:
    """Per (merge-ls curve, band): best allocated minus best uniform in every cell; the choice."""
    settings: dict[str, Any] = {}
    for curve in ("least-squares", "merge"):
        for band in BANDS:
            gains = []
            for name, result in models.items():
                for kept in KEPT:
                    cell = [r for r in result["rows"] if r["kept"] == kept]
                    uniform = [r["val_accuracy"] for r in cell if r["allocation"] == "uniform"]
                    allocated = [
                        r["val_accuracy"]
                        for r in cell
                        if r["allocation"] == "error"
                        and r["band"] == band
                        and (r["method"] != "merge-ls" or r["curve"] == curve)
                    ]
                    if uniform and len(allocated) == len(METHODS):
                        gains.append((name, kept, round(max(allocated) - max(uniform), 2)))
            if len(gains) < len(models) * len(KEPT):  # a setting not run on every model
                continue
            settings[f"{curve} band {band}"] = {
                "curve": curve,
                "band": band,
                **gain_summary(gains),
            }
    chosen = max(settings.values(), key=lambda s: (s["mean_gain"], -s["band"]), default=None)
    return {"settings": settings, "chosen": chosen}


def gain_summary(gains: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Mean and worst validation gain over uniform of ``(model, kept, gain)`` cells, and the cells
    below uniform (shared with ``budget_choice``)."""
    return {
        "mean_gain": round(sum(g for *_, g in gains) / len(gains), 3),
        "worst": min(g for *_, g in gains),
        "cells_below_uniform": [f"{n} {k:.0%}: {g:+.2f}" for n, k, g in gains if g < 0],
        "cells": len(gains),
    }


def cli(
    doc: str,
    out: Path,
    models: Sequence[str],
    run_model: Callable[..., None],
    summary: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """Run ``run_model`` on the chosen models, writing each result and the summary to ``out`` as it
    comes (shared with ``budget_choice``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(models))
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = fashion_mnist_eval_data()
    outcome: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {"models": {}}

    def save(result: dict[str, Any]) -> None:
        outcome["models"][result["model"]] = result
        outcome["summary"] = summary(outcome["models"])
        args.out.write_text(json.dumps(outcome, indent=1) + "\n")

    for name in args.models:
        run_model(name, data, save)


def main() -> None:
    cli(__doc__ or "", OUT, MODELS, run_model, summary)


if __name__ == "__main__":
    main()
