"""Run the full sweeps of issue 5 and write them under experiments/sweeps/<name>/.

    python experiments/run_sweeps.py                       # every model, every registered method
    python experiments/run_sweeps.py --only vgg-fmnist --methods prune merge

Models: the three Fashion-MNIST conv nets and LeNet-300-100 trained here (seed 0, their recipes,
from the training cache, trained first if missing) and the authors' LeNet-300-100 checkpoint
(read in place from ../shared/checkpoints/kim2020 or $NEURONMERGE_KIM2020_DIR). Each sweep writes
sweep.json, sweep.csv and sweep.png. Rows of methods not rerun are kept from the previous sweep.json
when it measured the same weights (so ``--methods my-new-method`` adds a curve; ``--replace`` starts
afresh). Then run ``python experiments/sweep_tables.py --write`` to refresh the README tables.
Torch runs on one thread: on a small shared machine OpenMP workers spinning against other processes
cost far more than a second thread gains (a training epoch took about five times longer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from neuronmerge.io import load_checkpoint
from neuronmerge.lab.sweep import (
    DEFAULT_RATIOS,
    available_methods,
    fashion_mnist_eval_data,
    sweep,
    write_sweep,
)
from neuronmerge.lab.training import recipe_for, trained_model
from neuronmerge.models import model_from_state_dict

HERE = Path(__file__).resolve().parent
OUT = HERE / "sweeps"
KIM2020 = Path(
    os.environ.get("NEURONMERGE_KIM2020_DIR", HERE.parents[1] / "shared" / "checkpoints" / "kim2020")
)
#: sweep name -> (architecture, authors' checkpoint file or None for a model trained here)
MODELS: dict[str, tuple[str, str | None]] = {
    "vgg-fmnist": ("vgg-fmnist", None),
    "alexnet-fmnist": ("alexnet-fmnist", None),
    "resnet-fmnist": ("resnet-fmnist", None),
    "lenet-300-100": ("lenet-300-100", None),
    "lenet-300-100-kim2020": ("lenet-300-100", "LeNet_300_100.original.300_100.bias.pth.tar"),
}


def keep_other_rows(outcome: dict[str, Any], previous: Path) -> dict[str, Any]:
    """``outcome`` plus the rows of ``previous`` for methods this run did not redo.

    Only when ``previous`` measured the same weights (same baseline test and validation accuracy and
    parameter count); otherwise its rows would describe another model and are dropped.
    """
    if not previous.is_file():
        return outcome
    old = json.loads(previous.read_text())
    same = ("baseline_accuracy", "baseline_val_accuracy", "params")
    if any(old.get(key) != outcome[key] for key in same):
        print(f"{previous}: other weights, its rows are replaced", flush=True)
        return outcome
    redone = {row["method"] for row in outcome["results"]} | {s["method"] for s in outcome["skipped"]}
    rows = [row for row in old["results"] if row["method"] not in redone] + outcome["results"]
    skipped = [s for s in old.get("skipped", []) if s["method"] not in redone] + outcome["skipped"]
    names = [*available_methods(), *(r["method"] for r in rows)]  # registry order first
    order = {name: i for i, name in enumerate(dict.fromkeys(names))}
    rows.sort(key=lambda row: (row["ratio"], order[row["method"]]))
    return {**outcome, "results": rows, "skipped": skipped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["all"])
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--out", type=Path, default=OUT, help="parent folder of the sweep folders")
    parser.add_argument(
        "--replace", action="store_true", help="drop earlier rows of methods not rerun now"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        help="a training-cache entry (.safetensors beside its .json sidecar) to sweep instead of "
        "the current recipe's model; with one --only model trained here",
    )
    args = parser.parse_args()
    if args.weights is not None and (len(args.only) != 1 or MODELS[args.only[0]][1] is not None):
        parser.error("--weights needs exactly one --only model trained here")
    torch.set_num_threads(1)
    data = fashion_mnist_eval_data()
    for name in args.only:
        arch, checkpoint = MODELS[name]
        if checkpoint is None:
            if args.weights is None:
                model, info = trained_model(arch, progress=False)
            else:
                model = model_from_state_dict(arch, load_file(args.weights))
                info = json.loads(args.weights.with_suffix(".json").read_text())
            source = f"trained here: seed {info['seed']}, {info['epochs']} epochs"
            recipe = asdict(recipe_for(arch)) | info.get("recipe", {})
            training = {
                "seed": info["seed"],
                "epochs": info["epochs"],
                **{key: recipe[key] for key in ("lr", "batch_size", "schedule", "decay")},
                "train_seconds": info["train_seconds"],
            }
            if "recipe" not in info:  # an entry from before recipes were recorded: cosine
                training.update(schedule="cosine", decay=1.0)
        else:
            model = load_checkpoint(KIM2020 / checkpoint, arch)
            source, training = f"authors' checkpoint {checkpoint}", None
        started = time.perf_counter()
        outcome = sweep(model, arch, data, args.ratios, args.methods)
        outcome["source"] = source
        if training is not None:
            outcome["training"] = training
        if not args.replace:
            outcome = keep_other_rows(outcome, args.out / name / "sweep.json")
        write_sweep(outcome, args.out / name, force=True)
        seconds = time.perf_counter() - started
        print(f"{name}: {len(outcome['results'])} rows in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
