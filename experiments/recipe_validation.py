"""Choose the learning rate of each Fashion-MNIST conv net's recipe on the validation split.

The epoch count is fixed by the CPU budget (each net must train in minutes on two cores); the
learning rate is picked among ``LRS`` by validation accuracy (5000 images held out of the training
split, as ``training.trained_model`` does; the test split is never read). The current recipe's lr
(0.05, the project's LeNet-300-100 rate) is kept unless another beats it by more than one binomial
standard error of a 5,000-image accuracy (about 0.4 points): smaller gaps are noise, and keeping it
keeps the cached weights, whose cache key does not include the lr. The candidate equal to the current
recipe comes from the training cache. Writes ``experiments/recipe_validation.json``.

    python experiments/recipe_validation.py [--only vgg-fmnist ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from neuronmerge.evaluate import accuracy
from neuronmerge.lab.data import load_fashion_mnist, train_val_split
from neuronmerge.lab.training import VAL_SEED, VAL_SIZE, recipe_for, train_classifier, trained_model
from neuronmerge.models import create_model

ARCHS = ("vgg-fmnist", "alexnet-fmnist", "resnet-fmnist")
LRS = (0.02, 0.05, 0.1)
OUT = Path(__file__).resolve().parent / "recipe_validation.json"


def validate(arch: str, lr: float) -> dict[str, float]:
    """Validation accuracy and training seconds of ``arch`` trained with its recipe at ``lr``."""
    recipe = recipe_for(arch)
    if lr == recipe.lr:
        _, info = trained_model(arch, progress=False)
        return {"val_accuracy": info["val_accuracy"], "train_seconds": info["train_seconds"]}
    images, labels = load_fashion_mnist("train")
    train, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    torch.manual_seed(0)
    model = create_model(arch)
    started = time.perf_counter()
    train_classifier(
        model,
        images[train],
        labels[train],
        epochs=recipe.epochs,
        lr=lr,
        batch_size=recipe.batch_size,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        seed=0,
        progress=False,
    )
    seconds = round(time.perf_counter() - started, 2)
    return {"val_accuracy": accuracy(model, images[val], labels[val]), "train_seconds": seconds}


def standard_error(accuracy_percent: float, n: int = VAL_SIZE) -> float:
    """Binomial standard error, in points, of an accuracy measured on ``n`` validation images."""
    p = accuracy_percent / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def decide(arch: str, rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The record of ``arch``: every candidate, the best, and the lr chosen by the rule above."""
    best = max(rows, key=lambda lr: rows[lr]["val_accuracy"])
    current = str(recipe_for(arch).lr)
    error = standard_error(rows[current]["val_accuracy"])
    margin = rows[best]["val_accuracy"] - rows[current]["val_accuracy"]
    return {
        "epochs": recipe_for(arch).epochs,
        "lr": rows,
        "best_lr": float(best),
        "standard_error": round(error, 3),
        "chosen_lr": float(best if margin > error else current),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument(
        "--redecide", action="store_true", help="apply the rule to the recorded runs, train nothing"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # see experiments/run_sweeps.py
    for arch in args.only:
        if args.redecide:
            rows = json.loads(OUT.read_text())[arch]["lr"]
        else:
            rows = {str(lr): validate(arch, lr) for lr in LRS}
        record = json.loads(OUT.read_text()) if OUT.exists() else {}  # read late: runs may overlap
        record[arch] = decide(arch, rows)
        shown = {lr: round(r["val_accuracy"], 2) for lr, r in rows.items()}
        print(arch, shown, "chosen", record[arch]["chosen_lr"], flush=True)
        OUT.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
