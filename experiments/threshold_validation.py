"""Choose ``DEFAULT_THRESHOLD`` on a validation split (never the test set).

Trains (or loads from cache) every model trained here (LeNet-300-100 and the three Fashion-MNIST conv
nets) on Fashion-MNIST's training split minus 5000 images, merges each at ratios 0.5-0.8 with each
candidate cosine threshold, and measures accuracy on those 5000 held-out training images. Writes
``experiments/threshold_validation.json``; the threshold with the best mean validation accuracy over
all models and ratios becomes the library default (one default for every model).

    python experiments/threshold_validation.py
"""

from __future__ import annotations

import json
from pathlib import Path

import neuronmerge as nm
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.data import load_fashion_mnist, train_val_split
from neuronmerge.lab.training import VAL_SEED, VAL_SIZE, trained_model

RATIOS = (0.5, 0.6, 0.7, 0.8)
THRESHOLDS: tuple[float | None, ...] = (None, 0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7)


MODELS = ("lenet-300-100", "vgg-fmnist", "alexnet-fmnist", "resnet-fmnist")


def main() -> None:
    images, labels = load_fashion_mnist("train")
    _, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    x, y = images[val], labels[val]
    trained: dict[str, dict[str, object]] = {}
    scores: dict[str, dict[str, list[float]]] = {str(t): {} for t in THRESHOLDS}
    for arch in MODELS:
        model, info = trained_model(arch)
        trained[arch] = {k: info[k] for k in ("seed", "epochs", "val_accuracy")}
        for threshold in THRESHOLDS:
            accs = [accuracy(nm.merge(model, x[:2], r, threshold=threshold), x, y) for r in RATIOS]
            scores[str(threshold)][arch] = accs
            print(f"{arch:>15} threshold {threshold!s:>5}: " + " ".join(f"{a:6.2f}" for a in accs))
    rows = []
    for threshold in THRESHOLDS:
        per_model = scores[str(threshold)]
        means = {arch: sum(accs) / len(accs) for arch, accs in per_model.items()}
        rows.append(
            {
                "threshold": threshold,
                "val_accuracy": {
                    arch: dict(zip(map(str, RATIOS), accs)) for arch, accs in per_model.items()
                },
                "model_means": means,
                "mean": sum(means.values()) / len(means),
            }
        )
        print(f"threshold {threshold!s:>5}: mean over models {rows[-1]['mean']:.2f}")
    best = max(rows, key=lambda row: row["mean"])
    result = {
        "models": list(MODELS),
        "dataset": "fashion-mnist (validation split of train)",
        "val_size": VAL_SIZE,
        "trained": trained,
        "ratios": list(RATIOS),
        "rows": rows,
        "best_threshold": best["threshold"],
    }
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best threshold {best['threshold']} -> {out}")


if __name__ == "__main__":
    main()
