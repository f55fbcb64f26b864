"""Run the full sweeps of issue 5 and write them under experiments/sweeps/<name>/.

    python experiments/run_sweeps.py                       # every model, every registered method
    python experiments/run_sweeps.py --only vgg-fmnist --methods prune merge
    python experiments/run_sweeps.py --add --methods merge-ls      # add rows to the existing sweeps

Models: the three Fashion-MNIST conv nets and LeNet-300-100 trained here (seed 0, their recipes,
from the training cache, trained first if missing) and the authors' LeNet-300-100 checkpoint
(read in place from ../shared/checkpoints/kim2020 or $NEURONMERGE_KIM2020_DIR). Each sweep writes
sweep.json, sweep.csv and sweep.png, replacing older ones; then run experiments/sweep_tables.py to
refresh the README tables. Torch runs on one thread: on a small shared machine OpenMP workers spinning
against other processes cost far more than a second thread gains.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from neuronmerge.experiments.sweep import (
    DEFAULT_RATIOS,
    fashion_mnist_eval_data,
    sweep,
    write_sweep,
)
from neuronmerge.io import load_checkpoint
from neuronmerge.training import recipe_for, trained_model

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


def add_rows(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the result and skip rows of ``new``'s methods replaced by ``new``'s."""
    methods = {row["method"] for row in new["results"] + new["skipped"]}
    merged = dict(old)
    for key in ("results", "skipped"):
        merged[key] = [row for row in old[key] if row["method"] not in methods] + new[key]
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["all"])
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--out", type=Path, default=OUT, help="parent folder of the sweep folders")
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the rows of other methods already in each sweep.json (replace only --methods)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = fashion_mnist_eval_data()
    for name in args.only:
        arch, checkpoint = MODELS[name]
        if checkpoint is None:
            model, info = trained_model(arch, progress=False)
            source = f"trained here: seed {info['seed']}, {info['epochs']} epochs"
            recipe = recipe_for(arch)
            training = {
                "seed": info["seed"],
                "epochs": info["epochs"],
                "lr": recipe.lr,
                "batch_size": recipe.batch_size,
                "train_seconds": info["train_seconds"],
            }
        else:
            model = load_checkpoint(KIM2020 / checkpoint, arch)
            source, training = f"authors' checkpoint {checkpoint}", None
        started = time.perf_counter()
        outcome = sweep(model, arch, data, args.ratios, args.methods)
        outcome["source"] = source
        if training is not None:
            outcome["training"] = training
        existing = args.out / name / "sweep.json"
        if args.add and existing.exists():
            outcome = add_rows(json.loads(existing.read_text()), outcome)
        write_sweep(outcome, args.out / name, force=True)
        seconds = time.perf_counter() - started
        print(f"{name}: {len(outcome['results'])} rows in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
