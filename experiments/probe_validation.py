"""How many synthetic probes, and how many optimisation steps, does merge-ls need? (validation split)

Runs merge-ls at ratios 0.5-0.8 with probes made under several settings and prints the validation
accuracy (the 5,000 training images ``trained_model`` holds out; never the test split) and the time
spent on probes, one JSON line per setting::

    .venv/bin/python experiments/probe_validation.py alexnet-fmnist auto 128:50:auto 64:50:2048:0.2:0
    .venv/bin/python experiments/probe_validation.py kim auto 2048:100:2048:0.05

A setting is ``optimised:steps:count[:learning_rate[:noise[:seed[:cos]]]]``
(``probes.synthesize_probes``: the probes optimised, their steps, the probes returned, the rest
derived by ``probes.derive`` with ``noise``; ``cos``: the rate annealed, ``anneal``); ``auto``
alone, or in a field, takes ``probes.schedule``'s choice and the module's defaults. ``kim`` is the
authors' LeNet-300-100 checkpoint. ``PROBE_TOLERANCE`` in the environment overrides the
early-stopping tolerance. ``experiments/probe_validation.json`` holds the lines that chose the
defaults of ``neuronmerge.probes``.

    .venv/bin/python experiments/probe_validation.py reconcile vgg-fmnist 0,1,2,3,4 \
        "100 x 0.05/relative, trust f^2" "60 x 0.08/relative, trust f^2" "60 x 0.08/remeasure"

scores each ``SCHEDULES`` / ``REPAIRS`` pair at ratios 0.1-0.9 per probe seed through merge-ls's
own data-free path (``reconcile``; ``rows_reconcile`` in the JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

import neuronmerge as nm
from neuronmerge import probes
from neuronmerge.capture import capture
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.data import load_fashion_mnist, train_val_split
from neuronmerge.lab.settings import overridden
from neuronmerge.lab.training import VAL_SEED, VAL_SIZE, trained_model

KIM2020 = (
    Path(
        os.environ.get(
            "NEURONMERGE_KIM2020_DIR", Path(__file__).resolve().parents[2] / "shared/checkpoints/kim2020"
        )
    )
    / "LeNet_300_100.original.300_100.bias.pth.tar"
)
RATIOS = (0.5, 0.6, 0.7, 0.8)


def make_probes(
    gm: torch.fx.GraphModule, example: torch.Tensor, setting: str
) -> tuple[list[Any], float, float]:
    """The probes of ``setting`` (module docstring), with their wall and CPU seconds."""
    parts = (setting.split(":") + ["auto"] * 7)[:7]
    optimised, steps, count, rate, noise, seed, anneal = parts
    changes = {} if noise == "auto" else {"probe_noise": float(noise)}
    options: dict[str, Any] = {"progress": False, "seed": 0 if seed == "auto" else int(seed)}
    if anneal != "auto":
        options["anneal"] = anneal == "cos"
    options["tolerance"] = float(os.environ.get("PROBE_TOLERANCE", probes.TOLERANCE))
    for key, value in (("optimised", optimised), ("steps", steps), ("count", count)):
        if value != "auto":
            options[key] = int(value)
    if rate != "auto":
        options["rate"] = float(rate)
    started, cpu = time.perf_counter(), time.process_time()
    with overridden(**changes):
        made = probes.synthesize_probes(gm, example, **options)
    return made, time.perf_counter() - started, time.process_time() - cpu


def validation_setup(
    name: str,
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.fx.GraphModule]:
    """Model ``name`` (``kim``: the authors' LeNet-300-100) in eval mode, the validation images and
    labels ``trained_model`` holds out, an example batch of two of them and the model's capture."""
    if name == "kim":
        model = nm.load_checkpoint(KIM2020, "lenet-300-100")
    else:
        model, _ = trained_model(name, progress=False)
    model.eval()
    images, labels = load_fashion_mnist("train")
    _, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    x, y = images[val], labels[val]
    example = x[:2]
    return model, x, y, example, capture(model, example)


def run(name: str, settings: list[str]) -> list[dict[str, Any]]:
    model, x, y, example, gm = validation_setup(name)
    probes.synthesize_probes(gm, example, 2, steps=1, progress=False)  # one-off imports, untimed
    rows = []
    for setting in settings:
        made, seconds, cpu = make_probes(gm, example, setting)
        val_accuracy = [
            round(
                accuracy(
                    nm.compress(model, example, r, method="merge-ls", calibration=made).model, x, y
                ),
                2,
            )
            for r in RATIOS
        ]
        rows.append(
            {
                "model": name,
                "setting": setting,
                "probes": sum(batch[0].shape[0] for batch in made),
                "probe_seconds": round(seconds, 1),
                "probe_cpu_seconds": round(cpu, 2),
                "val_accuracy": val_accuracy,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


#: ``reconcile``'s schedules (settings above, the seed appended) and BatchNorm repairs
#: (``lsq.BATCHNORM_REPAIR``, ``norm_repair.TRUST_EXPONENT``), each schedule with the repairs listed.
SCHEDULES = {"100 x 0.05": "auto:100:auto:0.05:auto", "60 x 0.08": "auto:60:auto:0.08:auto"}
REPAIRS: dict[str, tuple[Literal["remeasure", "relative"], float]] = {
    "relative, trust f^2": ("relative", 2.0),
    "remeasure": ("remeasure", 0.0),
    "relative, trust f": ("relative", 1.0),
    "relative, trust 1": ("relative", 0.0),
}
ALL_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def reconcile(name: str, seeds: list[int], pairs: list[tuple[str, str]]) -> None:
    """Each (schedule, repair) of ``pairs`` at ``ALL_RATIOS``, one JSON line per seed.

    Unlike ``run`` (which passes the probes as ``calibration``, so merge-ls re-measures BatchNorm
    statistics as it does on data), the probes go through merge-ls's own data-free path, where
    ``lsq.BATCHNORM_REPAIR`` applies: merge-ls's probe source is pointed at them (``overridden``).
    """
    model, x, y, example, gm = validation_setup(name)
    probes.synthesize_probes(gm, example, 2, steps=1, progress=False)  # one-off imports, untimed
    for seed in seeds:
        for schedule in dict.fromkeys(s for s, _ in pairs):
            setting = f"{SCHEDULES[schedule]}:{seed}"
            made, seconds, cpu = make_probes(gm, example, setting)
            for repair in (r for s, r in pairs if s == schedule):
                mode, exponent = REPAIRS[repair]
                with overridden(
                    probe_source=lambda *_args, _made=made, **_kw: list(_made),
                    batchnorm_repair=mode,
                    trust_exponent=exponent,
                ):
                    val_accuracy = [
                        round(accuracy(nm.compress(model, example, r, method="merge-ls").model, x, y), 2)
                        for r in ALL_RATIOS
                    ]
                row = {
                    "model": name,
                    "schedule": schedule,
                    "repair": repair,
                    "seed": seed,
                    "probes": sum(batch[0].shape[0] for batch in made),
                    "probe_cpu_seconds": round(cpu, 2),
                    "val_accuracy": val_accuracy,
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "reconcile":  # reconcile MODEL SEEDS SCHEDULE/REPAIR...  (seeds: 0,1,2)
        wanted = [tuple(pair.split("/")) for pair in sys.argv[4:]]
        reconcile(sys.argv[2], [int(s) for s in sys.argv[3].split(",")], wanted)  # type: ignore[arg-type]
    else:
        run(sys.argv[1], sys.argv[2:])
