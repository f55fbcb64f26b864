"""Choosing between allocations by the compressed model's fidelity on the probes, on the validation
split; writes experiments/budget_choice.json (``allocation_check``'s settings).

    python experiments/budget_choice.py [--models vgg-fmnist resnet-fmnist ...]

The error curves rank groups by one layer's error only, so an allocation can lose to the uniform
widths (on the converged BatchNorm nets at 10-20% of the parameters kept). A data-free check of the
whole model is available to ``merge-ls``: its synthetic probes. For every model trained here and
every fraction of parameters kept (0.1 ... 0.9), ``merge-ls`` on its own data-free path (its
probes, its BatchNorm repair: ``lsq.BATCHNORM_REPAIR``) compresses with uniform widths and with the
allocation alone at every trust band of ``BANDS`` (``allocation_check.ENABLED`` off), and with the
library's own choice (``CHECKED``: the check on, as settled when run); each result is scored on
the 5,000 validation images held out of the training split, and by how far its outputs on the
probes are from the dense model's, per probe (``FIDELITY``: squared logit error over the dense
logits' spread, KL divergence of the softmax, top-1 disagreement), with the paired t statistic
of each against uniform (``t_*``).
``summary`` scores every rule "among these candidates, the one with the lowest mean error, an
allocation only when its t against uniform exceeds z" (uniform where uniform's error is below
``allocation_check.NEGLIGIBLE``): the validation accuracy of its pick minus uniform's, in every cell
and on average per model; ``chosen`` is one rule for every model, the largest mean gain among the
rules no model loses by against the library's current one. The test split is never read here.
Torch runs on one thread (a shared machine).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from budget_validation import cli, gain_summary
from torch import nn

import neuronmerge as nm
from neuronmerge import allocation_check
from neuronmerge.capture import capture
from neuronmerge.evaluate import accuracy
from neuronmerge.lab.settings import overridden
from neuronmerge.lab.training import trained_model
from neuronmerge.probes import cached_probes

HERE = Path(__file__).resolve().parent
OUT = HERE / "budget_choice.json"
MODELS = ("vgg-fmnist", "resnet-fmnist", "lenet-300-100", "alexnet-fmnist")
KEPT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BANDS = (0.1, 0.2, 0.3, 0.5)
FIDELITY = ("mse", "kl", "disagreement")
SIGNIFICANCE = (0.0, 0.5, 1.0, 1.5, 2.0)
#: The row of the library's own choice (``allocation_check`` on, its settings).
CHECKED = "checked"
#: Candidate sets the rules choose among (``uniform`` and bands).
CANDIDATES = (
    ("uniform", "0.2"),
    ("uniform", "0.1", "0.2"),
    ("uniform", "0.2", "0.3"),
    ("uniform", "0.1", "0.2", "0.3"),
    ("uniform", "0.1", "0.2", "0.3", "0.5"),
)


@torch.no_grad()
def per_probe(
    small: nn.Module, dense_logits: torch.Tensor, probes: list[Any]
) -> dict[str, torch.Tensor]:
    """Per probe: squared logit error (over the dense logits' variance) and KL divergence."""
    out = torch.cat([small(*batch) for batch in probes]).double()
    ref = dense_logits
    scale = (ref - ref.mean(0)).square().sum(1).mean()
    kl = (ref.softmax(1) * (ref.log_softmax(1) - out.log_softmax(1))).sum(1)
    return {
        "mse": (out - ref).square().sum(1) / scale,
        "kl": kl,
        "disagreement": (out.argmax(1) != ref.argmax(1)).double(),
    }


def paired_t(baseline: torch.Tensor, candidate: torch.Tensor) -> float:
    """How many standard errors ``candidate``'s mean per-probe error is below ``baseline``'s."""
    d = baseline - candidate
    se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0
    return 0.0 if se == 0 else float(d.mean()) / se


def run_model(name: str, data: Any, save: Any) -> dict[str, Any]:
    model, info = trained_model(name, progress=False)
    example = data.test[0][:2]
    rows: list[dict[str, Any]] = []
    outcome = {"model": name, "epochs": info["epochs"], "rows": rows}
    # merge-ls's own data-free path (its probes, its BatchNorm repair, ``lsq.BATCHNORM_REPAIR``),
    # not ``calibration=`` (which re-measures BatchNorm statistics): made once here, ``compress``
    # finds them in ``cached_probes``.
    probes = cached_probes(capture(model, example), example)
    with torch.no_grad():
        dense = torch.cat([model(*batch) for batch in probes]).double()
    for kept in KEPT:
        errors: dict[str, dict[str, torch.Tensor]] = {}
        for label in ("uniform", *map(str, BANDS), CHECKED):
            started = time.perf_counter()
            if label == CHECKED:  # the library's default: allocation_check on
                result = nm.compress(model, example, target_params=kept, method="merge-ls")
            else:  # each candidate alone (the check off)
                with overridden(band=1.0 if label == "uniform" else float(label), check=False):
                    result = nm.compress(
                        model,
                        example,
                        target_params=kept,
                        method="merge-ls",
                        allocation="uniform" if label == "uniform" else "error",
                    )
            errors[label] = per_probe(result.model, dense, probes)
            row = {
                "kept": kept,
                "candidate": label,
                "val_accuracy": round(accuracy(result.model, *data.val), 2),
                **{k: round(float(v.mean()), 6) for k, v in errors[label].items()},
                **{
                    f"t_{k}": round(paired_t(errors["uniform"][k], v), 3)
                    for k, v in errors[label].items()
                },
                "widths": [s.kept for s in result.report.sites],
                "allocation": result.report.allocation,
                "seconds": round(time.perf_counter() - started, 2),
            }
            rows.append(row)
            save(outcome)
            print(name, kept, {k: v for k, v in row.items() if k != "widths"}, flush=True)
    return outcome


def choose(cell: dict[str, Any], candidates: tuple[str, ...], measure: str, z: float) -> str:
    """The candidate with the lowest mean ``measure`` among uniform and those whose per-probe
    error is below uniform's by more than ``z`` standard errors (paired); uniform where its squared
    logit error is below ``allocation_check.NEGLIGIBLE`` (the library tries no allocation there)."""
    if cell["uniform"]["mse"] < allocation_check.NEGLIGIBLE:
        return "uniform"
    allowed = [c for c in candidates if c == "uniform" or cell[c][f"t_{measure}"] > z]
    return min(allowed, key=lambda c: (cell[c][measure], c != "uniform"))


def library_rule() -> str:
    """The name ``summary`` gives the rule ``allocation_check`` applies now."""
    bands = "/".join(map(str, allocation_check.BANDS))
    return f"mse z {allocation_check.SIGNIFICANCE} among uniform/{bands}"


def summary(models: dict[str, Any]) -> dict[str, Any]:
    """Per (fidelity measure, candidate set): validation accuracy of the candidate with the best
    fidelity, minus uniform's, in every cell, and its mean per model. ``chosen``: one rule for
    every model, the largest mean gain among the rules no model loses by against the library's
    (``library_rule``); ``best_mean``: the largest mean gain, whichever models pay for it."""
    rules: dict[str, Any] = {}
    for measure in FIDELITY:
        for z in SIGNIFICANCE:
            for candidates in CANDIDATES:
                gains = []
                for name, result in models.items():
                    for kept in KEPT:
                        cell = {r["candidate"]: r for r in result["rows"] if r["kept"] == kept}
                        if not all(c in cell for c in candidates):
                            continue
                        pick = choose(cell, candidates, measure, z)
                        gain = cell[pick]["val_accuracy"] - cell["uniform"]["val_accuracy"]
                        gains.append((name, kept, round(gain, 2)))
                if not gains:
                    continue
                per_model = {
                    name: round(sum(g for n, _, g in gains if n == name) / len(KEPT), 3)
                    for name in dict.fromkeys(n for n, _, _ in gains)
                }
                rules[f"{measure} z {z} among {'/'.join(candidates)}"] = {
                    "measure": measure,
                    "z": z,
                    "candidates": list(candidates),
                    **gain_summary(gains),
                    "per_model": per_model,
                }
    for band in (*BANDS, CHECKED):  # the allocation alone, and the library's check, for reference
        gains = []
        for name, result in models.items():
            for kept in KEPT:
                cell = {r["candidate"]: r for r in result["rows"] if r["kept"] == kept}
                if "uniform" in cell and str(band) in cell:
                    gains.append(
                        (
                            name,
                            kept,
                            round(cell[str(band)]["val_accuracy"] - cell["uniform"]["val_accuracy"], 2),
                        )
                    )
        if gains:
            rules[f"band {band} alone" if band != CHECKED else CHECKED] = {
                **gain_summary(gains),
            }
    scored = [name for name, rule in rules.items() if "measure" in rule]
    best_mean = max(scored, key=lambda name: rules[name]["mean_gain"], default=None)
    library = rules.get(library_rule(), {}).get("per_model", {})
    no_loser = [
        name
        for name in scored
        if all(rules[name]["per_model"].get(n, gain) >= gain for n, gain in library.items())
    ]
    chosen = max(no_loser, key=lambda name: rules[name]["mean_gain"], default=None)
    return {"rules": rules, "library": library_rule(), "chosen": chosen, "best_mean": best_mean}


def main() -> None:
    cli(__doc__ or "", OUT, MODELS, run_model, summary)


if __name__ == "__main__":
    main()
