"""Choose each Fashion-MNIST conv net's epoch count on the validation split: train to the plateau.

Each net trains under its recipe's exponential schedule (the rate times ``DECAYS[arch]`` per epoch),
which does not depend on the epoch count, so the model after ``e`` epochs of one long run is the model a
run of ``e`` epochs gives. After every epoch the validation accuracy (5000 images held out of the
training split, as ``training.trained_model`` does; the test split is never read) is measured.

Rule: an epoch *improves* when its validation accuracy beats the last improving epoch's by more
than one binomial standard error of a 5000-image accuracy (about 0.4 points); smaller gains are
noise. Training stops at the first epoch that does not improve (or at ``CAP``), and the chosen
epoch count is the last improving epoch. Every improving epoch's weights are stored in the training
cache under the recipe with that epoch count as soon as they are measured (so ``trained_model``
serves them without training again, and an interrupted run keeps its progress), and the record in
the JSON file is rewritten after every epoch. The
learning rates were chosen earlier among 0.02, 0.05, 0.1 at 3 epochs (kept as ``lr_at_3_epochs``).

The decay is per architecture. At 0.5 the rates of all epochs sum to only twice the first epoch's,
which was enough for ``alexnet-fmnist`` (plateau at 4 epochs, above its 3 cosine epochs) but cut
``vgg-fmnist`` short: its plateau (2 epochs, 91.06%) fell below its 3 cosine epochs (92.06%), a sign
that the rate fell before the net had learnt what it could. Those two nets use 0.7 (a sum of about
3.3 first epochs, like a few cosine epochs, and a rate still above a tenth of the first after six
epochs). Only one slower decay was tried, for lack of CPU time; every run is kept in the JSON
file under ``plateau_by_decay`` and ``plateau`` is the run of the current ``DECAYS`` entry. Both
stopped at 3 epochs, below the same 3 epochs under the cosine schedule (which anneals the rate to
zero). ``--cosine EPOCHS`` trains a cosine candidate (cached, its validation accuracy recorded under
``cosine_by_epochs``): 6 cosine epochs beat 3 on both by about two standard errors, so that is
their recipe (longer runs untried).
Writes ``experiments/recipe_validation.json``; set ``RECIPES`` in ``lab/training.py`` from it.

    nice -n 10 python experiments/recipe_validation.py [--only vgg-fmnist ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from neuronmerge.evaluate import accuracy
from neuronmerge.io import atomic_write
from neuronmerge.lab.data import load_fashion_mnist, train_val_split
from neuronmerge.lab.training import (
    VAL_SEED,
    VAL_SIZE,
    cache_paths,
    default_cache_dir,
    recipe_for,
    store_trained,
    train_classifier,
)
from neuronmerge.models import create_model

ARCHS = ("vgg-fmnist", "alexnet-fmnist", "resnet-fmnist")
CAP = 10
#: Learning-rate factor per epoch of each net's plateau run (see above for why they differ).
DECAYS: dict[str, float] = {"vgg-fmnist": 0.7, "alexnet-fmnist": 0.5, "resnet-fmnist": 0.7}
OUT = Path(__file__).resolve().parent / "recipe_validation.json"


def standard_error(accuracy_percent: float, n: int = VAL_SIZE) -> float:
    """Binomial standard error, in points, of an accuracy measured on ``n`` validation images."""
    p = accuracy_percent / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def plateau(arch: str, seed: int = 0) -> dict[str, Any]:
    """Train ``arch`` epoch by epoch until the rule above stops it; cache each improving epoch."""
    recipe = replace(recipe_for(arch), epochs=CAP, schedule="exponential", decay=DECAYS[arch])
    images, labels = load_fashion_mnist("train")
    train, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    torch.manual_seed(seed)
    model = create_model(arch)
    started = time.perf_counter()
    outcome: dict[str, Any] = {"recipe": asdict(recipe), "cap": CAP, "val_accuracy_per_epoch": []}

    def on_epoch(epoch: int, loss: float) -> bool:
        curve = outcome["val_accuracy_per_epoch"]
        val_accuracy = accuracy(model, images[val], labels[val])
        curve.append(round(val_accuracy, 2))
        seconds = round(time.perf_counter() - started, 2)
        print(f"{arch} epoch {epoch}: loss {loss:.4f} val {curve[-1]:.2f} ({seconds:.0f} s)", flush=True)
        best = outcome.get("val_accuracy")
        improved = best is None or curve[-1] > best + standard_error(best)
        if improved:
            now = replace(recipe, epochs=epoch)
            info = {
                "arch": arch,
                "seed": seed,
                "epochs": epoch,
                "val_accuracy": val_accuracy,
                "train_seconds": seconds,
                "recipe": asdict(now),
            }
            store_trained(model, info, *cache_paths(arch, now, seed, default_cache_dir()))
            outcome.update(chosen_epochs=epoch, val_accuracy=curve[-1], seconds_to_chosen=seconds)
            outcome["standard_error"] = round(standard_error(curve[-1]), 3)
        stop = not improved or epoch == CAP
        outcome.update(seconds_total=seconds, plateau_reached=not improved)
        record(arch, outcome)
        return stop

    train_classifier(
        model, images[train], labels[train], recipe, seed=seed, progress=False, on_epoch=on_epoch
    )
    return outcome


def cosine(arch: str, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Train ``arch`` for ``epochs`` under the cosine schedule (a candidate the plateau runs are
    compared with on validation), cache it like ``trained_model`` would, and record its accuracy."""
    recipe = replace(recipe_for(arch), epochs=epochs, schedule="cosine", decay=1.0)
    images, labels = load_fashion_mnist("train")
    train, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    torch.manual_seed(seed)
    model = create_model(arch)
    started = time.perf_counter()
    train_classifier(model, images[train], labels[train], recipe, seed=seed, progress=False)
    seconds = round(time.perf_counter() - started, 2)
    val_accuracy = accuracy(model, images[val], labels[val])
    info = {
        "arch": arch,
        "seed": seed,
        "epochs": epochs,
        "val_accuracy": val_accuracy,
        "train_seconds": seconds,
        "recipe": asdict(recipe),
    }
    store_trained(model, info, *cache_paths(arch, recipe, seed, default_cache_dir()))
    outcome = {"recipe": asdict(recipe), "val_accuracy": round(val_accuracy, 2), "seconds": seconds}
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data.setdefault(arch, {}).setdefault("cosine_by_epochs", {})[str(epochs)] = outcome
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    atomic_write(OUT, lambda tmp: tmp.write_text(text))
    return outcome


def record(arch: str, outcome: dict[str, Any]) -> None:
    """Rewrite ``arch``'s entry of the JSON file (read late: runs for other nets may overlap).

    The run is filed under its decay in ``plateau_by_decay`` (runs at other decays are kept) and is
    ``plateau``, the run ``RECIPES`` is set from.
    """
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    entry = data.get(arch, {})
    runs = entry.get("plateau_by_decay", {})
    if "plateau" in entry:  # a run recorded before runs were filed by decay
        runs.setdefault(str(entry["plateau"]["recipe"]["decay"]), entry["plateau"])
    runs[str(outcome["recipe"]["decay"])] = outcome
    data[arch] = {**entry, "plateau": outcome, "plateau_by_decay": runs}
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    atomic_write(OUT, lambda tmp: tmp.write_text(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument(
        "--cosine", type=int, metavar="EPOCHS", help="train a cosine candidate of EPOCHS instead"
    )
    args = parser.parse_args()
    for arch in args.only:
        if args.cosine is not None:
            print(arch, "cosine", args.cosine, "epochs", cosine(arch, args.cosine), flush=True)
            continue
        outcome = plateau(arch)
        print(arch, "chosen", outcome["chosen_epochs"], "epochs", outcome["val_accuracy"], flush=True)


if __name__ == "__main__":
    main()
