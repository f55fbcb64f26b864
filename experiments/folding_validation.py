"""Choose what model folding clusters on, on a validation split (never the test set).

Model folding (``neuronmerge.lab.folding``, the Wang et al. 2025 peer) clusters each group's channels
by k-means. Two candidates: the producers' rows alone (what each channel computes), or those rows
and the consumers' input columns that read the channel side by side (``fold(..., columns=True)``;
the authors' release clusters on the next layer's input weights too). For every model trained here,
both repairs (Fold-AR, Fold-DIR) and ratios 0.1-0.9, this measures accuracy on the 5000 held-out
training images and writes ``experiments/folding_validation.json``; the candidate with the better
mean over models, ratios and both repairs is the default (one for every model). A peer is run at
its strongest: the choice is made for folding's sake, never for neuronmerge's.

    python experiments/folding_validation.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from neuronmerge.evaluate import accuracy
from neuronmerge.lab.folding import fold, has_batchnorm
from neuronmerge.lab.sweep import SweepContext, _probes, fashion_mnist_eval_data
from neuronmerge.lab.training import VAL_SIZE, trained_model

MODELS = ("lenet-300-100", "vgg-fmnist", "alexnet-fmnist", "resnet-fmnist")
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
REPAIRS = ("ar", "dir")
CANDIDATES = {"rows+columns": True, "rows": False}


def main() -> None:
    torch.set_num_threads(1)
    data = fashion_mnist_eval_data()
    example = data.test[0][:2]
    scores: dict[str, dict[str, dict[str, list[float]]]] = {c: {} for c in CANDIDATES}
    for arch in MODELS:
        model, _ = trained_model(arch, progress=False)
        # The sweep's Fold-DIR probes (one batch of the same synthetic images), none without BatchNorm.
        probes = _probes(model, example, SweepContext(arch=arch)) if has_batchnorm(model) else None
        for name, columns in CANDIDATES.items():
            scores[name][arch] = {}
            for repair in REPAIRS:
                accs = [
                    round(
                        accuracy(
                            fold(model, example, r, repair=repair, probes=probes, columns=columns),
                            *data.val,
                        ),
                        2,
                    )
                    for r in RATIOS
                ]
                scores[name][arch][repair] = accs
                print(f"{arch:>15} {name:>12} fold-{repair}: " + " ".join(f"{a:6.2f}" for a in accs))
    rows = []
    for name in CANDIDATES:
        every = [a for per_model in scores[name].values() for accs in per_model.values() for a in accs]
        per_repair = {
            repair: sum(sum(scores[name][arch][repair]) for arch in MODELS) / (len(MODELS) * len(RATIOS))
            for repair in REPAIRS
        }
        rows.append(
            {
                "candidate": name,
                "val_accuracy": scores[name],
                "repair_means": per_repair,
                "mean": sum(every) / len(every),
            }
        )
        print(f"{name:>12}: mean {rows[-1]['mean']:.2f} ({per_repair})")
    best = max(rows, key=lambda row: row["mean"])
    result = {
        "models": list(MODELS),
        "dataset": "fashion-mnist (validation split of train)",
        "val_size": VAL_SIZE,
        "ratios": list(RATIOS),
        "rows": rows,
        "best": best["candidate"],
    }
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"best {best['candidate']} -> {out}")


if __name__ == "__main__":
    main()
