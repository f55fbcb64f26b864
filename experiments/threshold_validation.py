"""Choose ``DEFAULT_THRESHOLD`` on a validation split (never the test set).

Trains (or loads from cache) LeNet-300-100 on Fashion-MNIST's training split minus 5000 images, merges
it at ratios 0.5-0.8 with each candidate cosine threshold, and measures accuracy on those 5000 held-out
training images. Writes ``experiments/threshold_validation.json``; the threshold with the best mean
validation accuracy becomes the library default.

    python experiments/threshold_validation.py
"""

from __future__ import annotations

import json
from pathlib import Path

import neuronmerge as nm
from neuronmerge.data import load_fashion_mnist, train_val_split
from neuronmerge.evaluate import accuracy
from neuronmerge.training import VAL_SEED, VAL_SIZE, trained_model

RATIOS = (0.5, 0.6, 0.7, 0.8)
THRESHOLDS: tuple[float | None, ...] = (None, 0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7)


def main() -> None:
    model, info = trained_model("lenet-300-100")
    images, labels = load_fashion_mnist("train")
    _, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    x, y = images[val], labels[val]
    rows = []
    for threshold in THRESHOLDS:
        accs = [accuracy(nm.merge(model, x[:2], r, threshold=threshold), x, y) for r in RATIOS]
        rows.append(
            {
                "threshold": threshold,
                "val_accuracy": dict(zip(map(str, RATIOS), accs)),
                "mean": sum(accs) / len(accs),
            }
        )
        print(
            f"threshold {threshold!s:>5}: "
            + " ".join(f"{a:6.2f}" for a in accs)
            + f"  mean {rows[-1]['mean']:.2f}"
        )
    best = max(rows, key=lambda row: row["mean"])
    result = {
        "model": "lenet-300-100",
        "dataset": "fashion-mnist (validation split of train)",
        "val_size": VAL_SIZE,
        "trained": {k: info[k] for k in ("seed", "epochs", "val_accuracy")},
        "ratios": list(RATIOS),
        "rows": rows,
        "best_threshold": best["threshold"],
    }
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best threshold {best['threshold']} -> {out}")


if __name__ == "__main__":
    main()
