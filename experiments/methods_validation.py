"""Choose the methods beyond the paper, and their defaults, on a validation split (never the test set).

For each model, every candidate compresses at ratios 0.5-0.8 and is scored by its accuracy on the 5000
validation images held out of Fashion-MNIST's training split (``train_val_split``). Candidates:

* the paper's merge and exact merge (references), plain pruning;
* single-target variants of the paper's merge: projection scale ``<f_i, f_j> / ||f_j||^2`` instead of
  the norm ratio, and a kept set ranked by ``||f_i|| * ||consumer columns of i||`` (outgoing weights);
* ``merge-ls`` with its choices varied one at a time (the variants skip the BatchNorm repair, which
  only matters for models with BatchNorm, where it has rows of its own): eigenvalue floor, probe
  count / optimisation steps, the L2 prior of the probes, isotropic Gaussian noise instead of
  inverted probes, the norm kept set instead of the covering one, no constants (no bias
  compensation), the probe seed;
* data-aware (labelled so): ``merge-ls`` on 8 batches of 256 real unlabeled training images.

Writes ``experiments/methods_validation.json``. ``python experiments/methods_validation.py [MODEL...]``
where MODEL is ``lenet-kim2020`` (the authors' checkpoint) or a registered architecture trained here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

import neuronmerge as nm
from neuronmerge import criteria, decompose, engine, lsq
from neuronmerge.activations import tensor_moments
from neuronmerge.evaluate import accuracy
from neuronmerge.graph.groups import find_groups
from neuronmerge.lab.data import load_fashion_mnist, train_val_split
from neuronmerge.lab.training import VAL_SEED, VAL_SIZE, trained_model
from neuronmerge.methods.base import GroupDecomposition
from neuronmerge.methods.norm_ratio import producer_rows
from neuronmerge.types import Group as Site

RATIOS = (0.5, 0.6, 0.7, 0.8)
KIM2020 = (
    Path(
        os.environ.get(
            "NEURONMERGE_KIM2020_DIR", Path(__file__).resolve().parents[2] / "shared/checkpoints/kim2020"
        )
    )
    / "LeNet_300_100.original.300_100.bias.pth.tar"
)
OUT = Path(__file__).with_suffix(".json")

Decide = Callable[[fx.GraphModule, list[Site], float], dict[str, Any]]


def build(model: nn.Module, example: torch.Tensor, ratio: float, decide: Decide) -> nn.Module:
    """The library's stages with a custom decomposition step (for variants not in the library), on
    the paper's pattern (one producer per group), where these variants were chosen."""
    gm = engine.capture(model, example)
    sites = [g for g in find_groups(gm)[0] if g.pattern == "chain" and len(g.producers) == 1]
    decompositions = {
        name: dec
        if isinstance(dec, GroupDecomposition)
        else GroupDecomposition(dec.kept, dict.fromkeys(_tensors(sites, name), dec), 0)
        for name, dec in decide(gm, sites, ratio).items()
    }
    return engine.surgery(gm, sites, decompositions)


def _tensors(sites: list[Site], name: str) -> list[str]:
    site = next(s for s in sites if s.name == name)
    return list(dict.fromkeys(c.tensor for c in site.consumers))


def _rows(gm: fx.GraphModule, site: Site) -> torch.Tensor:
    return producer_rows(gm, site.producer, site.folded[0]).dense()


def _energy(gm: fx.GraphModule, site: Site) -> torch.Tensor:
    return lsq.consumer_energy(gm, site, site.consumers[0].tensor)


def single_target(scale: str, ranking: str) -> Decide:
    """Exact merge (all removed neurons, no threshold) with a different scale or kept-set ranking."""

    def decide(gm: fx.GraphModule, sites: list[Site], ratio: float) -> dict[str, Any]:
        out = {}
        for site in sites:
            rows = _rows(gm, site)
            scores = criteria.channel_scores(rows, "l1-norm")
            if ranking == "outgoing":
                scores = torch.linalg.vector_norm(rows, dim=1) * _energy(gm, site).sqrt()
            kept = criteria.select_kept(scores, criteria.kept_count(site.channels, ratio))
            dec = decompose.norm_ratio(rows, kept, None)
            if scale == "projection":
                merged = dec.merged()
                target_rows = rows[kept][dec.target[merged]]
                cosine = F.cosine_similarity(rows[merged], target_rows, dim=1)
                new_scale = dec.scale.clone()
                new_scale[merged] = dec.scale[merged] * cosine.clamp_min(0)
                dec = decompose.Decomposition(dec.kept, dec.target, new_scale)
            out[site.producer] = dec
        return out

    return decide


def ls_variant(batches: list[tuple[torch.Tensor, ...]], selection: str, constants: bool) -> Decide:
    """merge-ls with the norm kept set and/or without the constants."""

    def decide(gm: fx.GraphModule, sites: list[Site], ratio: float) -> dict[str, Any]:
        moments = tensor_moments(gm, sites, batches)
        out = {}
        for site in sites:
            m = moments[(site.name, site.consumers[0].tensor)]
            keep = criteria.kept_count(site.channels, ratio)
            if selection == "norm":
                rows = _rows(gm, site)
                kept = criteria.select_kept(criteria.channel_scores(rows, "l1-norm"), keep)
            else:
                kept = criteria.covering_kept(m.cov, _energy(gm, site), keep)
            dec = decompose.least_squares(m, kept, lsq.FLOOR)
            if not constants:
                dec = decompose.Decomposition(dec.kept, dec.target, dec.scale, dec.mixing, None)
            out[site.producer] = dec
        return out

    return decide


def ls_with(batches: list[tuple[torch.Tensor, ...]], floor: float = lsq.FLOOR) -> Decide:
    return lambda gm, sites, ratio: lsq.decompositions(
        gm,
        sites,
        {s.name: criteria.kept_count(s.channels, ratio) for s in sites},
        lsq.MeasuredMoments(tuple(batches)),
        floor,
    )


def load_model(name: str) -> nn.Module:
    if name == "lenet-kim2020":
        return nm.load_checkpoint(KIM2020, "lenet-300-100")
    model, _ = trained_model(name)
    return model


def evaluate_model(name: str, only: list[str]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = load_model(name).eval()
    images, labels = load_fashion_mnist("train")
    train, val = train_val_split(len(labels), VAL_SIZE, VAL_SEED)
    x, y = images[val], labels[val]
    example = x[:2]
    gm = engine.capture(model, example)
    start = time.perf_counter()
    probes = nm.synthesize_probes(gm, example)
    probe_seconds = time.perf_counter() - start
    real = [(images[train[i : i + 256]],) for i in range(0, 8 * 256, 256)]
    gauss = [
        (torch.randn(512, *example.shape[1:], generator=torch.Generator().manual_seed(s)),)
        for s in range(4)
    ]

    def probes_with(**kwargs: Any) -> list[tuple[torch.Tensor, ...]]:
        return nm.synthesize_probes(gm, example, **kwargs)

    def library(**kwargs: Any) -> Callable[[], Callable[[float], nn.Module]]:
        return lambda: lambda r: nm.compress(model, example, r, **kwargs).model

    def custom(decide: Callable[[], Decide]) -> Callable[[], Callable[[float], nn.Module]]:
        def factory() -> Callable[[float], nn.Module]:
            chosen = decide()  # probes for a variant are made only when its row is due
            return lambda r: build(model, example, r, chosen)

        return factory

    candidates: list[tuple[str, bool, Callable[[], Callable[[float], nn.Module]]]] = [
        ("prune", True, library(method="prune")),
        ("merge (paper fidelity, t=0.45)", True, library(threshold=0.45, fidelity="paper")),
        ("merge (exact, default t=0.2)", True, library()),
        ("merge, projection scale", True, custom(lambda: single_target("projection", "l1"))),
        ("merge, outgoing-weight ranking", True, custom(lambda: single_target("norm", "outgoing"))),
        ("merge-ls (defaults)", True, library(method="merge-ls", calibration=probes)),
        ("merge-ls, no BatchNorm repair", True, custom(lambda: ls_with(probes))),
        ("merge-ls, floor 1e-8", True, custom(lambda: ls_with(probes, 1e-8))),
        ("merge-ls, floor 1e-4", True, custom(lambda: ls_with(probes, 1e-4))),
        ("merge-ls, floor 1e-3", True, custom(lambda: ls_with(probes, 1e-3))),
        ("merge-ls, floor 1e-2", True, custom(lambda: ls_with(probes, 1e-2))),
        ("merge-ls, floor 1e-1", True, custom(lambda: ls_with(probes, 1e-1))),
        ("merge-ls, norm kept set", True, custom(lambda: ls_variant(probes, "norm", True))),
        ("merge-ls, no constants", True, custom(lambda: ls_variant(probes, "covering", False))),
        ("merge-ls, Gaussian noise probes", True, custom(lambda: ls_with(gauss))),
        ("merge-ls, 1024 probes", True, custom(lambda: ls_with(probes_with(count=1024)))),
        ("merge-ls, 4096 probes", True, custom(lambda: ls_with(probes_with(count=4096)))),
        ("merge-ls, 200 steps", True, custom(lambda: ls_with(probes_with(steps=200)))),
        ("merge-ls, 50 steps", True, custom(lambda: ls_with(probes_with(steps=50)))),
        ("merge-ls, 512 probes", True, custom(lambda: ls_with(probes_with(count=512)))),
        ("merge-ls, prior 0.1", True, custom(lambda: ls_with(probes_with(prior=0.1)))),
        ("merge-ls, prior 10", True, custom(lambda: ls_with(probes_with(prior=10.0)))),
        ("merge-ls, probe seed 1", True, custom(lambda: ls_with(probes_with(seed=1)))),
        ("merge-ls, probe seed 2", True, custom(lambda: ls_with(probes_with(seed=2)))),
        ("merge-ls, probe seed 3", True, custom(lambda: ls_with(probes_with(seed=3)))),
        ("merge-ls on 2048 real images (data-aware)", False, custom(lambda: ls_with(real))),
    ]
    if only:
        candidates = [c for c in candidates if any(word in c[0] for word in only)]

    rows = []
    for label, data_free, factory in candidates:
        make = factory()
        accs = [round(accuracy(make(r), x, y), 2) for r in RATIOS]
        rows.append(
            {
                "method": label,
                "data_free": data_free,
                "val_accuracy": dict(zip(map(str, RATIOS), accs)),
                "mean": round(sum(accs) / len(accs), 2),
            }
        )
        print(
            f"{name:14s} {label:44s} "
            + " ".join(f"{a:6.2f}" for a in accs)
            + f"  mean {rows[-1]['mean']:.2f}",
            flush=True,
        )
    return {
        "model": name,
        "baseline_val_accuracy": round(accuracy(model, x, y), 2),
        "probe_seconds": round(probe_seconds, 1),
        "rows": rows,
    }


def main(names: list[str], only: list[str]) -> None:
    torch.set_num_threads(1)  # OpenMP workers spinning against other processes cost more than they gain
    results = json.loads(OUT.read_text()) if OUT.exists() else {"ratios": list(RATIOS), "models": {}}
    for name in names:
        outcome = evaluate_model(name, only)
        if only and name in results["models"]:  # update the rows that ran, keep the others
            fresh = {row["method"]: row for row in outcome["rows"]}
            kept = results["models"][name]["rows"]
            merged = [fresh.pop(row["method"], row) for row in kept] + list(fresh.values())
            outcome = {**results["models"][name], "rows": merged}
        results["models"][name] = outcome
        OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    # MODEL... [--only WORD...]: rerun the rows whose label contains a WORD, keep the other saved rows
    args = sys.argv[1:]
    cut = args.index("--only") if "--only" in args else len(args)
    main(args[:cut] or ["lenet-kim2020"], args[cut + 1 :])
