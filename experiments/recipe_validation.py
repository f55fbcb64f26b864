"""Choose the learning rate of each Fashion-MNIST conv net's recipe on the validation split.

The epoch count is fixed by the CPU budget (each net must train in minutes on two cores); the
learning rate is picked among ``LRS`` by validation accuracy (5000 images held out of the training
split, as ``training.trained_model`` does; the test split is never read). The candidate equal to the
current recipe comes from the training cache. Writes ``experiments/recipe_validation.json``.

    python experiments/recipe_validation.py [--only vgg-fmnist ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from neuronmerge.data import load_fashion_mnist, train_val_split
from neuronmerge.evaluate import accuracy
from neuronmerge.models import create_model
from neuronmerge.training import VAL_SEED, VAL_SIZE, recipe_for, train_classifier, trained_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=ARCHS, default=list(ARCHS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # see experiments/run_sweeps.py
    for arch in args.only:
        rows = {str(lr): validate(arch, lr) for lr in LRS}
        best = max(rows, key=lambda lr: rows[lr]["val_accuracy"])
        record = json.loads(OUT.read_text()) if OUT.exists() else {}  # read late: runs may overlap
        record[arch] = {"epochs": recipe_for(arch).epochs, "lr": rows, "best_lr": float(best)}
        shown = {lr: round(r["val_accuracy"], 2) for lr, r in rows.items()}
        print(arch, shown, "best", best, flush=True)
        OUT.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
