"""What a budget buys on this CPU: latency of compressed models beside their parameter and MAC ratios.

    python benchmarks/budget_latency.py [--models vgg-fmnist ...] [--rounds 15]

For each Fashion-MNIST model (the trained weights from the cache when present, else the seeded
random initialisation: widths differ, the cost of a width does not) and each target (a fraction of
parameters or MACs kept, ``allocation="error"`` and ``"uniform"``), the compressed model is timed
against the original in the same run: every round times every variant once, in turn (interleaved,
so that load from other processes falls on all of them alike), at batch 1 and batch 64, one thread;
the table reports medians over rounds and the ratio to the original's median. Results go to
``benchmarks/results/budget_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuronmerge as nm
from neuronmerge.evaluate import count_flops, count_parameters
from neuronmerge.lab.training import default_cache_dir
from neuronmerge.models import create_model, get_spec

OUT = Path(__file__).resolve().parent / "results" / "budget_latency.json"
MODELS = ("lenet-300-100", "vgg-fmnist", "alexnet-fmnist", "resnet-fmnist")
TARGETS = (("params", 0.5), ("params", 0.25), ("macs", 0.5), ("macs", 0.25))
BATCHES = (1, 64)


def load(name: str) -> tuple[nn.Module, str]:
    """The trained model if the training cache holds it (never trains here), else seeded random."""
    from neuronmerge.lab.training import cache_paths, recipe_for, trained_model

    weights, sidecar = cache_paths(name, recipe_for(name), 0, default_cache_dir())
    if weights.is_file() and sidecar.is_file():
        return trained_model(name, progress=False)[0], "trained"
    torch.manual_seed(0)
    return create_model(name).eval(), "random"


def seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
        return (time.perf_counter() - started) / repeats


def bench(name: str, rounds: int) -> dict[str, Any]:
    model, weights = load(name)
    spec = get_spec(name)
    example = spec.example_inputs()
    variants: dict[str, nn.Module] = {"original": model}
    rows: dict[str, dict[str, Any]] = {"original": {"params": 1.0, "macs": 1.0}}
    params, macs = count_parameters(model), count_flops(model, example[:1])
    for metric, fraction in TARGETS:
        for allocation in ("error", "uniform"):
            key = f"{metric} {fraction} {allocation}"
            target = {f"target_{metric}": fraction}
            small = nm.compress(model, example, allocation=allocation, **target).model  # type: ignore[arg-type]
            variants[key] = small
            rows[key] = {
                "metric": metric,
                "target": fraction,
                "allocation": allocation,
                "params": round(count_parameters(small) / params, 4),
                "macs": round(count_flops(small, example[:1]) / macs, 4),
            }
    for batch in BATCHES:
        x = torch.randn(batch, *example.shape[1:])
        repeats = max(1, 64 // batch) * 2
        for module in variants.values():  # warm-up
            seconds(module, x, 2)
        times: dict[str, list[float]] = {key: [] for key in variants}
        for _ in range(rounds):
            for key, module in variants.items():
                times[key].append(seconds(module, x, repeats))
        base = statistics.median(times["original"])
        for key in variants:
            median = statistics.median(times[key])
            rows[key][f"ms_batch{batch}"] = round(1000 * median, 4)
            rows[key][f"latency_batch{batch}"] = round(median / base, 3)
    return {"model": name, "weights": weights, "params": params, "macs": macs, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [bench(name, args.rounds) for name in args.models]
    args.out.write_text(json.dumps({"threads": 1, "models": results}, indent=1) + "\n")
    for result in results:
        print(result["model"], f"({result['weights']} weights)")
        for key, row in result["rows"].items():
            print(
                f"  {key:<22} params {row['params']:.2f} MACs {row['macs']:.2f} "
                f"latency b1 {row['latency_batch1']:.2f} b64 {row['latency_batch64']:.2f}"
            )


if __name__ == "__main__":
    main()
