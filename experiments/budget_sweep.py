"""Accuracy at equal parameter count: uniform widths against the data-free allocation, beside
Torch-Pruning's global pruning; writes experiments/budget_sweep.json.

    python experiments/budget_sweep.py [--models lenet-300-100 ...] [--kept 0.2 0.3 ...]
        [--methods merge prune merge-ls torch-pruning-global]

(an existing JSON keeps its rows of the methods and fractions not rerun).

For every model trained here (``lab.training.trained_model``: cached, trained first if missing) and
every fraction of parameters kept (0.1 ... 0.9), each data-free method (merge, prune, and merge-ls
on synthetic probes) compresses to that target with ``allocation="uniform"`` and
``allocation="error"`` (``nm.compress(..., target_params=f)``, the library's defaults). Torch-Pruning's
magnitude pruner with ``global_pruning=True`` (one importance ranking across the same layers) is run
at the pruning ratio, found by bisection, whose result comes closest to the same parameter count.
No fine-tuning anywhere. ``accuracy`` is on the test split; nothing is chosen here (the allocation's
settings were chosen on the validation split by ``experiments/budget_validation.py``).
Torch runs on one thread (a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuronmerge as nm
from neuronmerge.capture import capture
from neuronmerge.evaluate import accuracy, count_flops, count_parameters
from neuronmerge.lab import require
from neuronmerge.lab.sweep import EvalData, fashion_mnist_eval_data
from neuronmerge.lab.training import trained_model
from neuronmerge.probes import cached_probes

HERE = Path(__file__).resolve().parent
OUT = HERE / "budget_sweep.json"
MODELS = ("lenet-300-100", "vgg-fmnist", "alexnet-fmnist", "resnet-fmnist")
KEPT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ALLOCATIONS = ("uniform", "error")
#: The peer row's method name (``--methods`` takes it like a data-free method).
PEER = "torch-pruning-global"


def torch_pruning_global(
    model: nn.Module, example: torch.Tensor, target: int, producers: set[str]
) -> tuple[nn.Module, float]:
    """Torch-Pruning's global magnitude pruning on ``producers``' channels, at the ratio whose
    parameter count comes closest to ``target`` (bisection on the ratio)."""
    tp = require("torch_pruning", "the Torch-Pruning peer row")

    def pruned(ratio: float) -> nn.Module:
        copied = copy.deepcopy(model).eval()
        ignored = [
            module
            for name, module in copied.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and name not in producers
        ]
        pruner = tp.pruner.MagnitudePruner(
            copied,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            global_pruning=True,
            ignored_layers=ignored,
        )
        pruner.step()
        return copied.eval()

    low, high = 0.0, 1.0
    best: tuple[int, nn.Module, float] | None = None
    for _ in range(16):
        mid = (low + high) / 2
        try:
            candidate = pruned(mid)
        except Exception:  # Torch-Pruning refuses ratios that would empty a layer: go lower
            high = mid
            continue
        count = count_parameters(candidate)
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), candidate, mid)
        if count > target:
            low = mid
        else:
            high = mid
        if abs(count - target) <= 0.002 * target:
            break
    assert best is not None
    return best[1], best[2]


def evaluate(small: nn.Module, data: EvalData, example: torch.Tensor) -> dict[str, Any]:
    """Counts and test accuracy."""
    return {
        "params": count_parameters(small),
        "macs": count_flops(small, example[:1]),
        "accuracy": round(accuracy(small, *data.test), 2),
    }


def _scores(row: dict[str, Any]) -> str:
    return f"test {row['accuracy']:.2f} params {row['params']}"


def run_model(
    name: str,
    data: EvalData,
    fractions: tuple[float, ...],
    plain: tuple[str, ...],
    log: Callable[[str], None],
    save: Callable[[dict[str, Any]], None],
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The rows of ``plain``'s methods (``PEER`` among them: the Torch-Pruning row) at ``fractions``
    for one model, beside ``previous``'s other rows; ``save`` gets the partial result after each
    row (a long run on a shared machine keeps what it measured)."""
    model, info = trained_model(name, progress=False)
    example = data.test[0][:2]
    params = count_parameters(model)
    old = previous or {}

    def kept_before(row: dict[str, Any]) -> bool:
        return row["method"] not in plain or row["kept"] not in fractions

    rows: list[dict[str, Any]] = [r for r in old.get("rows", ()) if kept_before(r)]
    skipped: list[dict[str, Any]] = [s for s in old.get("skipped", ()) if kept_before(s)]
    outcome = {
        "model": name,
        "params": params,
        "macs": count_flops(model, example[:1]),
        "baseline_accuracy": round(accuracy(model, *data.test), 2),
        "epochs": info["epochs"],
        "rows": rows,
        "skipped": skipped,
    }
    methods: dict[str, dict[str, Any]] = {m: {"method": m} for m in plain if m not in ("merge-ls", PEER)}
    if "merge-ls" in plain:
        started = time.perf_counter()
        # The library's data-free path, whose BatchNorm repair (``norm_repair``) differs from what
        # ``calibration`` batches get (re-measuring): made once here, ``compress`` finds them in
        # ``cached_probes``.
        cached_probes(capture(model, example), example)
        log(f"{name}: probes in {time.perf_counter() - started:.0f} s")
        methods["merge-ls"] = {"method": "merge-ls"}
    producers = {p for group in nm.plan(model, example).sites for p in group.producers}
    for kept in fractions:
        target = round(kept * params)
        for method, options in methods.items():
            for allocation in ALLOCATIONS:
                started = time.perf_counter()
                try:
                    result = nm.compress(
                        model, example, target_params=kept, allocation=allocation, **options
                    )
                except nm.InvalidArgumentError as exc:
                    skipped.append(
                        {"kept": kept, "method": method, "allocation": allocation, "reason": str(exc)}
                    )
                    continue
                seconds = time.perf_counter() - started
                row = {
                    "kept": kept,
                    "method": method,
                    "allocation": allocation,
                    **evaluate(result.model, data, example),
                    "widths": [site.kept for site in result.report.sites],
                    "seconds": round(seconds, 2),
                }
                rows.append(row)
                save(outcome)
                log(f"{name} {kept:.1f} {method} {allocation}: {_scores(row)}")
        if PEER not in plain:
            continue
        small, ratio = torch_pruning_global(model, example, target, producers)
        row = {
            "kept": kept,
            "method": PEER,
            "allocation": "global",
            **evaluate(small, data, example),
            "tp_ratio": round(ratio, 4),
        }
        rows.append(row)
        save(outcome)
        log(f"{name} {kept:.1f} {PEER}: {_scores(row)}")
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--kept", type=float, nargs="+", default=list(KEPT))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["merge", "prune", "merge-ls", PEER],
        help="methods to (re)run; an existing --out keeps its rows of the others",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = fashion_mnist_eval_data()
    outcome: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {"models": {}}

    def save(result: dict[str, Any]) -> None:
        outcome["models"][result["model"]] = result
        args.out.write_text(json.dumps(outcome, indent=1) + "\n")

    for name in args.models:
        run_model(
            name,
            data,
            tuple(args.kept),
            tuple(args.methods),
            lambda line: print(line, flush=True),
            save,
            outcome["models"].get(name),
        )


if __name__ == "__main__":
    main()
