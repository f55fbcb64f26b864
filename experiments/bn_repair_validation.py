"""How should data-free merge-ls repair BatchNorm statistics on its synthetic probes? (validation split)

``lsq.BATCHNORM_REPAIR`` chooses between re-measuring the statistics on the probes (``remeasure``) and
keeping the stored ones moved by the change the merge made on the probes (``relative``,
``norm_repair``), which a BatchNorm that kept a fraction ``f`` of its channels trusts with weight
``f ** norm_repair.TRUST_EXPONENT`` (exponent 0: fully; 1, 2: less as more channels go). Every rule
runs ``nm.compress(model, example, r, method="merge-ls")`` (the default probes, made once per model)
at ratios 0.1-0.9 on the BatchNorm nets trained here, scored on the 5,000
training images ``trained_model`` holds out (never the test split). A row "nothing merged" scores the
repair alone: the dense model re-measured on the probes, and the relative repair of the dense model
(the identity). One rule for all models: the one with the higher mean over models and ratios.

    .venv/bin/python experiments/bn_repair_validation.py [MODEL...]

Writes ``experiments/bn_repair_validation.json`` (models rerun replace their entry).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

import neuronmerge as nm
from neuronmerge import norm_repair
from neuronmerge.capture import capture
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.data import load_fashion_mnist, train_val_split
from neuronmerge.lab.settings import overridden
from neuronmerge.lab.training import VAL_SEED, VAL_SIZE, trained_model
from neuronmerge.probes import cached_probes

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Rule label -> (``lsq.BATCHNORM_REPAIR``, ``norm_repair.TRUST_EXPONENT``).
RULES: dict[str, tuple[Literal["remeasure", "relative"], float]] = {
    "remeasure": ("remeasure", 0.0),
    "relative, trust 1": ("relative", 0.0),
    "relative, trust f": ("relative", 1.0),
    "relative, trust f^2": ("relative", 2.0),
}
MODELS = ("vgg-fmnist", "resnet-fmnist")
OUT = Path(__file__).with_suffix(".json")


def evaluate(name: str) -> dict[str, Any]:
    model, info = trained_model(name, progress=False)
    model.eval()
    images, labels = load_fashion_mnist("train")
    _, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    x, y = images[val], labels[val]
    example = x[:2]
    gm = capture(model, example)
    started = time.perf_counter()
    probes = cached_probes(gm, example, progress=False)
    probe_seconds = time.perf_counter() - started
    reference = norm_repair.normalised_moments(gm, probes)
    unmerged = {
        "remeasure": accuracy(nm.recalibrate_batchnorm(model, probes), x, y),
        "relative": accuracy(norm_repair.correct(model, probes, reference, {}), x, y),
    }
    rows: dict[str, Any] = {}
    for rule, (repair, exponent) in RULES.items():
        accs, seconds = [], []
        for r in RATIOS:
            started = time.perf_counter()
            with overridden(batchnorm_repair=repair, trust_exponent=exponent):
                small = nm.compress(model, example, r, method="merge-ls").model
            seconds.append(time.perf_counter() - started)
            accs.append(round(accuracy(small, x, y), 2))
            print(f"{name} {rule} {r}: {accs[-1]:.2f} ({seconds[-1]:.1f} s)", flush=True)
        rows[rule] = {
            "nothing_merged": round(unmerged[repair], 2),
            "val_accuracy": dict(zip(map(str, RATIOS), accs)),
            "mean": round(sum(accs) / len(accs), 2),
            "compress_seconds_median": round(sorted(seconds)[len(seconds) // 2], 2),
        }
    return {
        "model": name,
        "epochs": info["epochs"],
        "dense_val_accuracy": round(accuracy(model, x, y), 2),
        "probes": sum(b[0].shape[0] for b in probes),
        "probe_seconds": round(probe_seconds, 1),
        "rules": rows,
    }


def chosen(results: dict[str, Any]) -> dict[str, Any]:
    """Each rule's mean over every model and ratio, and the winner."""
    means = {
        rule: round(
            sum(m["rules"][rule]["mean"] for m in results["models"].values()) / len(results["models"]),
            3,
        )
        for rule in RULES
    }
    return {"mean_over_models": means, "chosen": max(means, key=lambda rule: means[rule])}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    results = json.loads(OUT.read_text()) if OUT.exists() else {"ratios": list(RATIOS), "models": {}}
    for name in names:
        results["models"][name] = evaluate(name)
        results.update(chosen(results))
        OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(chosen(results)))


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
