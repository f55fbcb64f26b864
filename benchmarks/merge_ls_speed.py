"""How long does data-free ``merge-ls`` take, against the fixed probe settings it used before?

Run from the repository root (``--threads 1`` on a machine whose cores other work shares)::

    .venv/bin/python benchmarks/merge_ls_speed.py [--models NAME ...] [--json PATH] [--full-baseline]
    .venv/bin/python benchmarks/merge_ls_speed.py --markdown benchmarks/results/merge_ls_speed.json
    .venv-zoo/bin/python benchmarks/merge_ls_speed.py --models resnet50

For each model, in one run:

* ``new_s``: ``neuronmerge.compress(model, x, 0.5, method="merge-ls")`` end to end with an empty probe
  cache: probes sized by the model's cost (``probes.schedule``, early stopping), moments, the
  least-squares merge, the BatchNorm repair (``norm_repair``) and the verifying forward.
  ``next_ratio_s``: the same call at ratio 0.6 right after (the probes are reused).
* ``old_s``: what the call cost before (2048 probes x 100 steps at rate 0.05 for every model and
  every call, no early stopping): the same pipeline with ``calibration=synthesize_probes(model, x,
  2048, steps=100, rate=0.05, tolerance=0)``. Synthesising those probes takes up to an hour per conv
  net on two cores, so unless ``--full-baseline`` the probe part is *extrapolated* from
  ``BASELINE_STEPS`` timed steps of one full 512-probe batch (the loop is the same code, step after
  step, so time per step is constant; on models over a GMAC per input, of a 32-probe batch, scaled
  to 512) and ``old_estimated`` says so; the rest of the old call (moments on 2048 probes, merge,
  BatchNorm re-measurement) is run and timed, except on those large models, where ``old_s`` is the
  old probes alone: a lower bound.
* ``speedup``: ``old_s / new_s``; ``probes``, ``optimised`` and ``steps``: what the new schedule
  chose (probes returned, probes optimised, the rest derived; steps at most: early stopping may take
  fewer). ``new_cpu_s`` and ``old_cpu_s``: the same in CPU seconds (this process, one thread), and
  ``speedup_cpu`` is their ratio: on a shared machine the wall clock measures the other sessions'
  load as much as this code.
* ``propagated_s`` and ``noise_s``: the same call at ratio 0.5 with the probe-free moment sources of
  ``neuronmerge.lab.propagate`` (``PropagatedMoments``: closed forms; ``NoiseMoments``: noise run
  with batch-normalised BatchNorms), making the source included; ``null`` where a model has no
  BatchNorm (neither applies); not run on models over a GMAC per input. They are not the default:
  they lost 10-45 validation points against the probes at ratios 0.6-0.8
  (``experiments/moments_validation.json``); the columns say what their speed would buy.

Models use random weights (seeded) with randomised BatchNorm statistics: the cost does not depend on
what the weights learned, except through early stopping. ``conv3-bn-32`` is the 3-conv-layer BatchNorm
net at 3 x 32 x 32 (32-64-64 channels) of issue 12; ``resnet50`` needs torchvision (the zoo venv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuronmerge as nm
from neuronmerge import probes
from neuronmerge.capture import capture
from neuronmerge.evaluate import count_flops
from neuronmerge.lab.propagate import NoiseMoments, PropagatedMoments, Unsupported, compress_with

OUT = Path(__file__).parent / "results" / "merge_ls_speed.json"
#: Optimisation steps of the old schedule that are timed to extrapolate its probe cost.
BASELINE_STEPS = 3
OLD_PROBES, OLD_STEPS, OLD_BATCH, OLD_RATE = 2048, 100, 512, 0.05
#: Models above this many MACs per input time the old steps on batches of ``LARGE_BATCH``.
LARGE_MACS, LARGE_BATCH = 1e9, 32


def conv3_bn_32() -> nn.Module:
    """The issue's 3-conv-layer BatchNorm net at 3 x 32 x 32 (32-64-64 channels, ~60k parameters)."""
    layers: list[nn.Module] = []
    width = 3
    for out, pool in ((32, True), (64, True), (64, False)):
        layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if pool else []
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _fmnist(name: str) -> Callable[[], tuple[nn.Module, torch.Tensor]]:
    return lambda: (nm.create_model(name), torch.zeros(2, 1, 28, 28))


def _resnet50() -> tuple[nn.Module, torch.Tensor]:
    import torchvision  # the zoo venv

    return torchvision.models.resnet50(), torch.zeros(2, 3, 224, 224)


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "lenet-300-100": _fmnist("lenet-300-100"),
    "vgg-fmnist": _fmnist("vgg-fmnist"),
    "alexnet-fmnist": _fmnist("alexnet-fmnist"),
    "resnet-fmnist": _fmnist("resnet-fmnist"),
    "conv3-bn-32": lambda: (conv3_bn_32(), torch.zeros(2, 3, 32, 32)),
    "resnet50": _resnet50,
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, example = MODELS[name]()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval(), example


def _timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = run()
    return time.perf_counter() - started, value


def _timed_cpu(run: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds of ``run`` (CPU: this process's, which other sessions' load on a shared
    machine inflates far less than the wall clock)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def old_probe_seconds(
    model: nn.Module, example: torch.Tensor, macs: float, full: bool
) -> tuple[float, float, bool]:
    """Wall and CPU seconds the old fixed schedule spends on probes: measured, or extrapolated from
    a few steps."""
    gm = capture(model, example)
    if full:
        wall, cpu = _timed_cpu(
            lambda: probes.synthesize_probes(
                gm, example, OLD_PROBES, steps=OLD_STEPS, rate=OLD_RATE, tolerance=0, progress=False
            )
        )
        return wall, cpu, False
    # One warm-up step, then BASELINE_STEPS timed ones, of one full batch; on a model over
    # ``LARGE_MACS`` (whose per-input cost no longer depends on the batch size), of a smaller one.
    batch = OLD_BATCH if macs < LARGE_MACS else LARGE_BATCH
    probes.synthesize_probes(gm, example, batch, steps=1, rate=OLD_RATE, tolerance=0, progress=False)
    wall, cpu = _timed_cpu(
        lambda: probes.synthesize_probes(
            gm, example, batch, steps=BASELINE_STEPS, rate=OLD_RATE, tolerance=0, progress=False
        )
    )
    scale = OLD_STEPS * OLD_PROBES / batch / BASELINE_STEPS
    return wall * scale, cpu * scale, True


def probe_free(model: nn.Module, example: torch.Tensor) -> dict[str, float | None]:
    """Seconds of ``merge-ls`` at ratio 0.5 with each probe-free source (``None``: not applicable)."""
    free: dict[str, float | None] = {}
    for label, kind in (("propagated_s", PropagatedMoments), ("noise_s", NoiseMoments)):
        started = time.perf_counter()
        try:
            compress_with(model, example, 0.5, kind.of(capture(model, example), example))
            free[label] = round(time.perf_counter() - started, 2)
        except Unsupported:
            free[label] = None
    return free


def measure(name: str, full_baseline: bool, free_only: bool = False) -> dict[str, Any]:
    model, example = build(name)
    with torch.no_grad():
        macs = count_flops(model, example[:1])
    if free_only:  # the probe-free sources alone
        return {"model": name, "macs_per_input": macs, **probe_free(model, example)}
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    plan = probes.schedule(macs, batchnorm=batchnorm)
    probes._CACHE.clear()
    new_s, new_cpu = _timed_cpu(lambda: nm.compress(model, example, 0.5, method="merge-ls"))
    next_s, _ = _timed(lambda: nm.compress(model, example, 0.6, method="merge-ls"))
    # The old call: fixed 2048 x 100 probes (extrapolated), then the same pipeline on 2048 probes.
    old_probe_s, old_probe_cpu, estimated = old_probe_seconds(model, example, macs, full_baseline)
    rest_s = rest_cpu = 0.0
    if macs < LARGE_MACS:  # on a large model, the old probes alone make the (lower-bound) figure
        gm = capture(model, example)
        stand_in = probes.synthesize_probes(gm, example, OLD_PROBES, steps=0, progress=False)
        rest_s, rest_cpu = _timed_cpu(
            lambda: nm.compress(model, example, 0.5, method="merge-ls", calibration=stand_in)
        )
    old_s, old_cpu = old_probe_s + rest_s, old_probe_cpu + rest_cpu
    free = probe_free(model, example) if macs < LARGE_MACS else {}
    return {
        "model": name,
        "macs_per_input": macs,
        "probes": plan.count,
        "optimised": plan.optimised,
        "steps": plan.steps,
        "new_s": round(new_s, 2),
        "new_cpu_s": round(new_cpu, 2),
        "next_ratio_s": round(next_s, 2),
        "old_s": round(old_s, 1),
        "old_cpu_s": round(old_cpu, 1),
        "old_estimated": estimated,
        "speedup": round(old_s / new_s, 1),
        "speedup_cpu": round(old_cpu / new_cpu, 1),
        **free,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| model | probes (optimised) x steps | merge-ls now: wall s (CPU s) | next ratio (s) "
        "| before: wall s (CPU s) | speed-up wall (CPU) | propagated (s, speed-up) "
        "| noise (s, speed-up) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "old_s" not in row:  # probe-free sources only (``--free-only``)
            lines.append(
                f"| {row['model']} | - | - | - | - | - | {row.get('propagated_s') or '-'} | "
                f"{row.get('noise_s') or '-'} |"
            )
            continue
        before = f"{row['old_s']} ({row.get('old_cpu_s', '-')}){' est.' if row['old_estimated'] else ''}"
        free = [
            "-" if row.get(key) is None else f"{row[key]} ({round(row['old_s'] / row[key])}x)"
            for key in ("propagated_s", "noise_s")
        ]
        model = f"{row['model']}{' (superseded: see JSON)' if 'superseded' in row else ''}"
        lines.append(
            f"| {model} | {row['probes']} ({row.get('optimised', row['probes'])}) x {row['steps']} "
            f"| {row['new_s']} ({row.get('new_cpu_s', '-')}) | {row['next_ratio_s']} | {before} "
            f"| {row['speedup']}x ({row.get('speedup_cpu', '-')}x) | {free[0]} | {free[1]} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "resnet50"])
    parser.add_argument("--json", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-baseline", action="store_true")
    parser.add_argument(
        "--free-only", action="store_true", help="time only the probe-free sources (resnet50)"
    )
    parser.add_argument("--markdown", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.full_baseline, args.free_only))
        print(json.dumps(rows[-1]), flush=True)
    results = {
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    if args.json.exists():  # keep rows of models not rerun (resnet50 runs in the zoo venv)
        previous = json.loads(args.json.read_text())
        rerun = {row["model"] for row in rows}
        results["rows"] = [r for r in previous.get("rows", []) if r["model"] not in rerun] + rows
        # Records written beside the rows (validation of the schedule, notes) stay.
        results = {**previous, **results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
