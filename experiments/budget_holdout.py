"""Whether ``merge-ls``'s allocation check should score each probe with a model fitted without it
(``allocation_check.HELD_OUT``), on the validation split; writes experiments/budget_holdout.json.

    python experiments/budget_holdout.py [--models lenet-300-100 alexnet-fmnist ...] [--out F]

``merge-ls`` fits its merge on the probes, and its check (``allocation_check``) scores the
candidate widths on the same probes: an in-sample error, which favours widths whose fit has more
freedom to match those probes. On the nets without BatchNorm the check kept allocations that then
lost to the uniform widths on validation (alexnet-fmnist at 50% of the parameters kept: the
allocation's probe error 15 times lower than uniform's, its validation accuracy 0.58 lower;
``budget_choice.json``). Here, for every model trained here and fraction kept (0.1 ... 0.9),
every candidate of the check (uniform, and the allocation at each band of
``allocation_check.BANDS``) is built on every probe and scored in-sample, as the library does, and
also cross-fitted (``allocation_check.folds``: fitted on one half of the probes, scored on the
other, both ways), with the paired t statistic of each against uniform's. ``merge`` and ``prune``
(no check: their allocation is the band of ``budget.BAND``) are run both ways too, since the target
compares the best data-free method of each allocation. Only the 5,000 validation images held out of
the training split are scored; the test split is never read here.

``summary``: for each rule (measure, significance z, candidates), merge-ls's pick and the best
method's allocated accuracy (merge and prune allocated, merge-ls's pick) minus the best uniform one,
in every cell. The comparison fixed in advance is the measure alone (in-sample against held-out at
the library's z and candidates); the other rules are listed to show how much a wider search moves,
not chosen from. ``paired`` gives, per cell, the validation images merge-ls's pick gets right that
its uniform widths get wrong and the reverse (a difference of a few images is noise). Torch runs on
one thread (a shared machine).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from budget_validation import cli, gain_summary
from probe_files import probe_batches

import neuronmerge as nm
from neuronmerge import allocation_check, api, engine, lsq
from neuronmerge.capture import as_input_tuple
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.training import trained_model
from neuronmerge.options import Options

HERE = Path(__file__).resolve().parent
OUT = HERE / "budget_holdout.json"
MODELS = ("alexnet-fmnist", "lenet-300-100", "vgg-fmnist", "resnet-fmnist")
KEPT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MEASURES = ("in_sample", "held_out")
SIGNIFICANCE = (0.0, 1.0, 2.0)
CANDIDATES = (("uniform", "band 0.1", "band 0.2"), ("uniform", "band 0.1"), ("uniform", "band 0.2"))
#: Thresholds on the uniform widths' mean probe error below which they are kept untried
#: (``allocation_check.NEGLIGIBLE``); 0: never.
NEGLIGIBLE = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def paired_t(baseline: torch.Tensor, candidate: torch.Tensor) -> float:
    """``allocation_check.significance``, rounded for the JSON."""
    return round(allocation_check.significance(baseline, candidate), 3)


@torch.no_grad()
def predictions(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Top-1 class of every image, in batches."""
    return torch.cat([model(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])


def run_model(name: str, data: Any, save: Any) -> dict[str, Any]:
    model, info = trained_model(name, progress=False)
    example = data.test[0][:2]
    images, labels = data.val
    rows: list[dict[str, Any]] = []
    outcome = {"model": name, "epochs": info["epochs"], "rows": rows}
    probes = probe_batches(name, model, example)
    source = lsq.MeasuredMoments(tuple(as_input_tuple(b) for b in probes))
    inputs = as_input_tuple(example)
    for kept in KEPT:
        for method in ("merge", "prune"):
            for allocation in ("uniform", "error"):
                result = nm.compress(
                    model, example, target_params=kept, method=method, allocation=allocation
                )
                rows.append(
                    {
                        "kept": kept,
                        "method": method,
                        "candidate": allocation,
                        "val_accuracy": round(accuracy(result.model, images, labels), 2),
                        "widths": [s.kept for s in result.report.sites],
                    }
                )
        options = Options.of(method="merge-ls", target_params=kept)
        chosen = options.method_object()
        gm = engine.capture(model, inputs)
        groups, _ = engine.groups(gm, options, chosen)
        uniform = api._uniform_widths(gm, groups, inputs, options, chosen)
        candidates = {
            "uniform": uniform,
            **dict(api._band_widths(gm, groups, inputs, options, chosen, source, uniform)),
        }
        errors: dict[str, dict[str, torch.Tensor]] = {}
        uniform_right = None
        for label, keep in candidates.items():
            started = time.perf_counter()
            in_sample, built = api._probe_errors(
                gm, groups, keep, options, inputs, chosen, source, held_out=False
            )
            held_out, _ = api._probe_errors(
                gm, groups, keep, options, inputs, chosen, source, held_out=True
            )
            assert built is not None
            errors[label] = {"in_sample": in_sample, "held_out": held_out}
            right = predictions(built[0], images) == labels
            uniform_right = right if uniform_right is None else uniform_right
            row = {
                "kept": kept,
                "method": "merge-ls",
                "candidate": label,
                "val_accuracy": round(100 * float(right.double().mean()), 2),
                "gained": int((right & ~uniform_right).sum()),
                "lost": int((~right & uniform_right).sum()),
                **{m: float(f"{float(e.mean()):.6g}") for m, e in errors[label].items()},
                **{f"t_{m}": paired_t(errors["uniform"][m], e) for m, e in errors[label].items()},
                "widths": [keep[g.name] for g in groups],
                "seconds": round(time.perf_counter() - started, 2),
            }
            rows.append(row)
            save(outcome)
            print(name, kept, {k: v for k, v in row.items() if k != "widths"}, flush=True)
    return outcome


def pick(cell: dict[str, Any], candidates: tuple[str, ...], measure: str, z: float) -> str:
    """``allocation_check``'s rule: in order, a candidate replaces the best so far when its mean
    error is lower and its paired t against uniform exceeds ``z``."""
    best = "uniform"
    for label in candidates[1:]:
        if label in cell and cell[label][f"t_{measure}"] > z:
            if cell[label][measure] < cell[best][measure]:
                best = label
    return best


def _gains(
    models: dict[str, Any], measure: str, z: float, candidates: tuple[str, ...], negligible: float
) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]], dict[str, list[int]]]:
    """Per cell: merge-ls's pick minus its uniform widths, best allocated minus best uniform over
    the three methods (validation accuracy), and the pick's images gained and lost."""
    own, best, paired = [], [], {}
    for name, result in models.items():
        for kept in KEPT:
            rows = [r for r in result["rows"] if r["kept"] == kept]
            cell = {r["candidate"]: r for r in rows if r["method"] == "merge-ls"}
            if "uniform" not in cell:
                continue
            settled = cell["uniform"][measure] < negligible
            chosen = cell["uniform" if settled else pick(cell, candidates, measure, z)]
            uniform = [r["val_accuracy"] for r in rows if r["candidate"] == "uniform"]
            allocated = [
                r["val_accuracy"]
                for r in rows
                if r["candidate"] == "error" and r["method"] != "merge-ls"
            ] + [chosen["val_accuracy"]]
            own.append((name, kept, round(chosen["val_accuracy"] - cell["uniform"]["val_accuracy"], 2)))
            best.append((name, kept, round(max(allocated) - max(uniform), 2)))
            paired[f"{name} {kept:.0%}"] = [chosen["gained"], chosen["lost"]]
    return own, best, paired


def summary(models: dict[str, Any]) -> dict[str, Any]:
    """Every rule's gains (``_gains``); ``chosen``: the negligible threshold, at the library's
    measure, z and candidates, with the largest mean merge-ls gain (the smaller on a tie)."""
    rules: dict[str, Any] = {}
    for measure in MEASURES:
        for z in SIGNIFICANCE:
            for candidates in CANDIDATES:
                own, best, _ = _gains(models, measure, z, candidates, 0.0)
                if own:
                    rules[f"{measure} z {z} among {'/'.join(candidates)}"] = {
                        "merge_ls": gain_summary(own),
                        "best_data_free": gain_summary(best),
                    }
    thresholds: dict[str, Any] = {}
    for negligible in NEGLIGIBLE:
        own, best, paired = _gains(models, "in_sample", 1.0, CANDIDATES[0], negligible)
        if own:
            thresholds[str(negligible)] = {
                "negligible": negligible,
                "merge_ls": gain_summary(own),
                "best_data_free": gain_summary(best),
                "pick_gained_lost": paired,
            }
    chosen = max(
        thresholds.values(),
        key=lambda t: (t["merge_ls"]["mean_gain"], -t["negligible"]),
        default=None,
    )
    return {
        "rules": rules,
        "negligible": thresholds,
        "chosen_negligible": None if chosen is None else chosen["negligible"],
    }


def main() -> None:
    cli(__doc__ or "", OUT, MODELS, run_model, summary)


if __name__ == "__main__":
    main()
