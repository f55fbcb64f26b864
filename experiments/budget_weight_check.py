"""Whether ``merge`` and ``prune`` should check their allocation against the uniform widths on the
probes, as ``merge-ls`` does, on the validation split; writes experiments/budget_weight_check.json.

    python experiments/budget_weight_check.py [--models lenet-300-100 alexnet-fmnist ...]

The weight-only methods allocate widths by their merge residual on the weights (``budget``) and
kept that allocation unchecked, while ``merge-ls`` keeps its own only when its outputs on the probes
are significantly closer to the dense model's (``allocation_check``). For every model trained here
and fraction of parameters kept (0.1 ... 0.9), ``merge`` and ``prune`` compress with uniform widths
and with the allocation alone at every band of ``allocation_check.BANDS`` (the check off); each is
scored on the 5,000 validation images held out of the training split and on the model's synthetic
probes (``allocation_check.probe_errors``: mean, and the paired t against uniform), and the
library's own pick (the check on) is recorded. ``merge-ls`` on its data-free path gives its uniform
and its (checked) allocated rows, since the target compares the best data-free method of each
allocation. The probes are the library's own (``probes.cached_probes``), made once per model and
kept on disk (``probe_files``); passing them as ``calibration`` to merge and prune is the data-free
check itself, as those methods read the batches for the check only. The test split is never read.

``summary``: for each rule (``z``: an allocation must be that many standard errors closer than
uniform on the probes; ``negligible``: uniform kept untried below that mean error; ``off``: the
allocation at ``budget.BAND`` kept unchecked, as before), the best allocated validation accuracy
(merge's and prune's pick, merge-ls's) minus the best uniform one, in every cell. Fixed in advance:
the check is adopted with ``allocation_check``'s own settings when it leaves no more cells below
uniform than ``off`` and loses less than ``MATERIAL`` points of mean gain; the other rules are listed
to show how much a wider search would move, not chosen from. Torch runs on one thread.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from budget_validation import cli, gain_summary
from probe_files import probe_batches

import neuronmerge as nm
from neuronmerge import allocation_check, budget
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.settings import overridden
from neuronmerge.lab.training import trained_model

HERE = Path(__file__).resolve().parent
OUT = HERE / "budget_weight_check.json"
MODELS = ("lenet-300-100", "alexnet-fmnist", "vgg-fmnist", "resnet-fmnist")
KEPT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WEIGHT_ONLY = ("merge", "prune")
SIGNIFICANCE = (0.0, 0.5, 1.0, 1.5, 2.0)
NEGLIGIBLE = (0.0, 0.005, 0.02)
#: A loss of mean gain (points) the check may cost and still be adopted.
MATERIAL = 0.1


def run_model(name: str, data: Any, save: Any) -> dict[str, Any]:
    model, info = trained_model(name, progress=False)
    example = data.test[0][:2]
    rows: list[dict[str, Any]] = []
    outcome = {"model": name, "epochs": info["epochs"], "rows": rows}
    started = time.perf_counter()
    probes = probe_batches(name, model, example)
    outcome["probe_seconds"] = round(time.perf_counter() - started, 1)
    dense = allocation_check.outputs(model, probes)

    def scored(result: nm.Result, uniform: torch.Tensor | None) -> dict[str, Any]:
        errors = allocation_check.probe_errors(allocation_check.outputs(result.model, probes), dense)
        return {
            "val_accuracy": round(accuracy(result.model, *data.val), 2),
            "probe_error": round(float(errors.mean()), 6),
            "t": 0.0 if uniform is None else round(allocation_check.significance(uniform, errors), 3),
            "widths": [s.kept for s in result.report.sites],
            "allocation": result.report.allocation,
        }, errors

    def own_probes(*_args: object, **_kwargs: object) -> list[tuple[torch.Tensor, ...]]:
        return list(probes)

    for kept in KEPT:
        for method in WEIGHT_ONLY:
            options: dict[str, Any] = {"target_params": kept, "method": method}
            t0 = time.perf_counter()
            row, uniform = scored(nm.compress(model, example, allocation="uniform", **options), None)
            rows.append({"kept": kept, "method": method, "candidate": "uniform", **row})
            for band in allocation_check.BANDS:
                with overridden(band=band, check=False):
                    result = nm.compress(model, example, **options)
                row, _ = scored(result, uniform)
                rows.append({"kept": kept, "method": method, "candidate": f"band {band}", **row})
            seconds = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            checked = nm.compress(model, example, calibration=probes, **options)
            rows.append(
                {
                    "kept": kept,
                    "method": method,
                    "candidate": "checked",
                    "widths": [s.kept for s in checked.report.sites],
                    "allocation": checked.report.allocation,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "candidates_seconds": seconds,
                }
            )
            save(outcome)
            print(name, kept, method, rows[-4:], flush=True)
        for allocation in ("uniform", "error"):  # merge-ls on its data-free path, the library's
            with overridden(probe_source=own_probes):
                result = nm.compress(
                    model, example, target_params=kept, method="merge-ls", allocation=allocation
                )
            rows.append(
                {
                    "kept": kept,
                    "method": "merge-ls",
                    "candidate": allocation,
                    "val_accuracy": round(accuracy(result.model, *data.val), 2),
                    "widths": [s.kept for s in result.report.sites],
                    "allocation": result.report.allocation,
                }
            )
            save(outcome)
            print(name, kept, rows[-1], flush=True)
    return outcome


def pick(cell: dict[str, dict[str, Any]], z: float | None, negligible: float) -> str:
    """The candidate a rule keeps: ``None``: the allocation at ``budget.BAND``, unchecked; else
    uniform when its probe error is below ``negligible``, else the lowest mean probe error among
    uniform and the bands more than ``z`` standard errors closer than uniform."""
    if z is None:
        return f"band {budget.BAND}"
    if cell["uniform"]["probe_error"] < negligible:
        return "uniform"
    allowed = [c for c, row in cell.items() if c == "uniform" or row["t"] > z]
    return min(allowed, key=lambda c: (cell[c]["probe_error"], c != "uniform"))


def summary(models: dict[str, Any]) -> dict[str, Any]:
    """Per rule: best allocated minus best uniform validation accuracy in every cell, and merge's
    and prune's pick minus their own uniform; ``library_matches``: whether the library's checked
    row kept the widths the rule of its own settings picks here; ``adopted``: see the docstring."""
    rules: dict[str, Any] = {}
    library = (allocation_check.SIGNIFICANCE, allocation_check.NEGLIGIBLE)
    variants: list[tuple[float | None, float]] = [(None, 0.0)]
    variants += [(z, n) for z in SIGNIFICANCE for n in NEGLIGIBLE]
    matches = []
    for z, negligible in variants:
        best, own = [], []
        for name, result in models.items():
            for kept in KEPT:
                at = [r for r in result["rows"] if r["kept"] == kept]
                ls = {r["candidate"]: r["val_accuracy"] for r in at if r["method"] == "merge-ls"}
                if len(ls) < 2:
                    continue
                uniform, allocated = [ls["uniform"]], [ls["error"]]
                for method in WEIGHT_ONLY:
                    cell = {r["candidate"]: r for r in at if r["method"] == method}
                    candidates = {c: r for c, r in cell.items() if c != "checked"}
                    choice = candidates[pick(candidates, z, negligible)]
                    if (z, negligible) == library:
                        matches.append(choice["widths"] == cell["checked"]["widths"])
                    uniform.append(cell["uniform"]["val_accuracy"])
                    allocated.append(choice["val_accuracy"])
                    gain = choice["val_accuracy"] - cell["uniform"]["val_accuracy"]
                    own.append((f"{name} {method}", kept, round(gain, 2)))
                best.append((name, kept, round(max(allocated) - max(uniform), 2)))
        if not best:
            return {}
        label = "off" if z is None else f"z {z} negligible {negligible}"
        rules[label] = {
            "z": z,
            "negligible": negligible,
            "best_data_free": gain_summary(best),
            "weight_only": gain_summary(own),
        }
    off = rules["off"]["best_data_free"]
    checked = rules[f"z {library[0]} negligible {library[1]}"]["best_data_free"]
    adopted = (
        len(checked["cells_below_uniform"]) <= len(off["cells_below_uniform"])
        and checked["mean_gain"] >= off["mean_gain"] - MATERIAL
    )
    return {
        "rules": rules,
        "library": f"z {library[0]} negligible {library[1]}",
        "library_matches": all(matches),
        "adopted": adopted,
    }


def main() -> None:
    cli(__doc__ or "", OUT, MODELS, run_model, summary)


if __name__ == "__main__":
    main()
