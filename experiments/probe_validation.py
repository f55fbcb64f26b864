"""How many synthetic probes, and how many optimisation steps, does merge-ls need? (validation split)

Runs merge-ls at ratios 0.5-0.8 with probes made under several settings and prints the validation
accuracy (the 5,000 training images ``trained_model`` holds out; never the test split) and the time
spent on probes, one JSON line per setting::

    .venv/bin/python experiments/probe_validation.py vgg-fmnist auto:auto:0.01 256:100:0.01 512:40:0.01
    .venv/bin/python experiments/probe_validation.py kim 2048:100:0 1024:100:0.01 2048:50:0

A setting is ``count:steps:tolerance[:learning_rate]``; ``auto`` takes ``probes.schedule``'s choice.
``kim`` is the authors' LeNet-300-100 checkpoint. ``experiments/probe_validation.json`` holds the
lines that chose the defaults of ``neuronmerge.probes``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import neuronmerge as nm
from neuronmerge import probes
from neuronmerge.capture import capture
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.data import load_fashion_mnist, train_val_split
from neuronmerge.lab.training import VAL_SEED, VAL_SIZE, trained_model

KIM2020 = Path("/work/shared/checkpoints/kim2020/LeNet_300_100.original.300_100.bias.pth.tar")
RATIOS = (0.5, 0.6, 0.7, 0.8)


def run(name: str, settings: list[str]) -> list[dict[str, Any]]:
    if name == "kim":
        model = nm.load_checkpoint(KIM2020, "lenet-300-100")
    else:
        model, _ = trained_model(name, progress=False)
    model.eval()
    images, labels = load_fashion_mnist("train")
    _, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    x, y = images[val], labels[val]
    example = x[:2]
    gm = capture(model, example)
    rows = []
    for setting in settings:
        parts = setting.split(":")
        count, steps, tolerance = parts[:3]
        probes.LEARNING_RATE = float(parts[3]) if len(parts) > 3 else 0.05
        options: dict[str, Any] = {"tolerance": float(tolerance), "progress": False}
        if count != "auto":
            options["count"] = int(count)
        if steps != "auto":
            options["steps"] = int(steps)
        started = time.perf_counter()
        made = probes.synthesize_probes(gm, example, **options)
        seconds = time.perf_counter() - started
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
                "val_accuracy": val_accuracy,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2:])
