"""What a budget buys on this CPU: latency of compressed models beside their parameter and MAC ratios.

    python benchmarks/budget_latency.py [--models vgg-fmnist ...] [--rounds 31]

For each Fashion-MNIST model (the trained weights from the cache when present, else the seeded
random initialisation: widths differ, the cost of a width does not) and each target (a fraction of
parameters or MACs kept, ``allocation="error"`` and ``"uniform"``, method ``merge``; one MAC target
also with ``round_to=8``), every compressed model is timed against the original in the same run,
alternating: each round times the original and then the compressed model back to back (the order
swapped every other round), so that load from other processes falls on both alike, and the round's
ratio is compressed / original, in wall-clock time and in the thread's CPU time (which leaves out
the time other processes held the core). One thread, batch 1 and batch 64; the table reports the
median ratios over rounds (and the median times). The machine's load average is recorded before
and after. Results go to ``benchmarks/results/budget_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
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
#: (metric, fraction kept, round_to) of every compressed variant.
TARGETS = (
    ("params", 0.5, 1),
    ("params", 0.25, 1),
    ("macs", 0.5, 1),
    ("macs", 0.25, 1),
    ("macs", 0.5, 8),
)
BATCHES = (1, 64)


def load(name: str) -> tuple[nn.Module, str]:
    """The trained model if the training cache holds it (never trains here), else seeded random."""
    from neuronmerge.lab.training import cache_paths, recipe_for, trained_model

    weights, sidecar = cache_paths(name, recipe_for(name), 0, default_cache_dir())
    if weights.is_file() and sidecar.is_file():
        return trained_model(name, progress=False)[0], "trained"
    torch.manual_seed(0)
    return create_model(name).eval(), "random"


def seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Wall-clock and this thread's CPU seconds per call (CPU time does not count the time other
    processes held the core: on a loaded machine it is the steadier measure)."""
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(repeats):
            model(x)
        return (time.perf_counter() - wall) / repeats, (time.thread_time() - cpu) / repeats


def bench(name: str, rounds: int) -> dict[str, Any]:
    model, weights = load(name)
    spec = get_spec(name)
    example = spec.example_inputs()
    variants: dict[str, nn.Module] = {"original": model}
    rows: dict[str, dict[str, Any]] = {"original": {"params": 1.0, "macs": 1.0}}
    params, macs = count_parameters(model), count_flops(model, example[:1])
    for metric, fraction, round_to in TARGETS:
        for allocation in ("error", "uniform"):
            key = f"{metric} {fraction} {allocation}" + (f" round_to {round_to}" if round_to > 1 else "")
            target = {f"target_{metric}": fraction}
            small = nm.compress(
                model,
                example,
                allocation=allocation,  # type: ignore[arg-type]
                round_to=round_to,
                **target,  # type: ignore[arg-type]
            ).model
            variants[key] = small
            rows[key] = {
                "metric": metric,
                "target": fraction,
                "allocation": allocation,
                "round_to": round_to,
                "params": round(count_parameters(small) / params, 4),
                "macs": round(count_flops(small, example[:1]) / macs, 4),
            }
    for batch in BATCHES:
        x = torch.randn(batch, *example.shape[1:])
        repeats = max(1, 64 // batch) * 4
        for module in variants.values():  # warm-up
            seconds(module, x, 2)
        original = variants["original"]
        base: list[tuple[float, float]] = []
        for key, module in variants.items():
            if key == "original":
                continue
            times: list[tuple[float, float]] = []
            wall, cpu = [], []
            for round_ in range(rounds):
                pair = [(original, base), (module, times)]
                for timed, into in pair if round_ % 2 == 0 else reversed(pair):
                    into.append(seconds(timed, x, repeats))
                wall.append(times[-1][0] / base[-1][0])
                cpu.append(times[-1][1] / base[-1][1])
            rows[key][f"ms_batch{batch}"] = round(1000 * statistics.median(t for t, _ in times), 4)
            rows[key][f"latency_batch{batch}"] = round(statistics.median(wall), 3)
            rows[key][f"cpu_batch{batch}"] = round(statistics.median(cpu), 3)
        rows["original"][f"ms_batch{batch}"] = round(1000 * statistics.median(t for t, _ in base), 4)
        rows["original"][f"latency_batch{batch}"] = 1.0
        rows["original"][f"cpu_batch{batch}"] = 1.0
    return {"model": name, "weights": weights, "params": params, "macs": macs, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = [round(v, 2) for v in os.getloadavg()]
    results: list[dict[str, Any]] = []
    for name in args.models:  # written after every model: a long run keeps what it measured
        result = bench(name, args.rounds)
        results.append(result)
        load = {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]}
        summary = {"threads": 1, "rounds": args.rounds, "cpus": os.cpu_count(), "load_average": load}
        args.out.write_text(json.dumps({**summary, "models": results}, indent=1) + "\n")
        print(result["model"], f"({result['weights']} weights)", flush=True)
        for key, row in result["rows"].items():
            print(
                f"  {key:<32} params {row['params']:.2f} MACs {row['macs']:.2f} "
                f"latency b1 {row['latency_batch1']:.2f} b64 {row['latency_batch64']:.2f} "
                f"CPU b1 {row['cpu_batch1']:.2f} b64 {row['cpu_batch64']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
