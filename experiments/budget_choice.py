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
logits' spread, KL divergence of the softmax, top-1 disagreement; ``fresh_*``: the first two on
as many fresh probes, another seed's, that the fit never saw), with the paired t statistic of each
against uniform (``t_*``). Candidates: the allocation at each band of ``BANDS`` on the curves the
library uses, and at each band of ``PROPAGATED`` on propagation-aware curves (``p*``,
``group_impact``: each curve scaled to the measured output error of cutting that group alone to
its uniform width; the measurements per parameter count are under ``impact``). Each row also
gives the images the candidate gets right and uniform wrong (``val_gained``) and the reverse
(``val_lost``), and the paired standard error of its accuracy minus uniform's (``val_se``).
``summary`` scores every rule "among these candidates, the one with the lowest mean error, an
allocation only when its t against uniform exceeds z" (uniform where uniform's error is below
``allocation_check.NEGLIGIBLE``): the validation accuracy of its pick minus uniform's, in every cell
and on average per model; ``chosen`` is one rule for every model, the largest mean gain among the
rules no model loses by against the library's current one; ``never_below_uniform``: the largest
mean gain among the rules with no cell below uniform (the issue's target, cell by cell). The test
split is never read here.
Torch runs on one thread (a shared machine).
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from budget_validation import cli, gain_summary
from torch import nn

import neuronmerge as nm
from neuronmerge import allocation_check, api, engine, lsq, widths
from neuronmerge.capture import as_input_tuple
from neuronmerge.lab.training import trained_model
from neuronmerge.options import Options
from neuronmerge.probes import cached_probes

HERE = Path(__file__).resolve().parent
OUT = HERE / "budget_choice.json"
MODELS = ("vgg-fmnist", "resnet-fmnist", "lenet-300-100", "alexnet-fmnist")
KEPT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BANDS = (0.05, 0.1, 0.2, 0.3, 0.5)
#: Bands of the allocation on propagation-aware curves (``group_impact``: each group's curve scaled
#: to its measured whole-model output error on the probes when cut alone to its uniform width).
PROPAGATED = (0.05, 0.1, 0.2, 0.3)
FIDELITY = ("mse", "kl", "disagreement", "fresh_mse", "fresh_kl")
#: The seed of the fresh probes (``fresh_*`` measures): made like merge-ls's own (seed 0) but never
#: seen by its fit, so they score each candidate out of sample (the library's check uses the same
#: seed, ``allocation_check.CHECK_SEED``, so its probes are these).
FRESH_SEED = 1
SIGNIFICANCE = (0.0, 0.5, 1.0, 1.5, 2.0)
#: The library's rule before the fresh probes (its own probes, bands 0.1 and 0.2, 1.5 standard
#: errors), for comparison.
FORMER = "mse z 1.5 among uniform/0.1/0.2"
#: The row of the library's own choice (``allocation_check`` on, its settings).
CHECKED = "checked"
#: Candidate sets the rules choose among (``uniform`` and bands).
CANDIDATES = (
    ("uniform", "0.2"),
    ("uniform", "0.1", "0.2"),
    ("uniform", "0.2", "0.3"),
    ("uniform", "0.1", "0.2", "0.3"),
    ("uniform", "0.1", "0.2", "0.3", "0.5"),
    ("uniform", "0.05"),
    ("uniform", "0.05", "0.1"),
    ("uniform", "0.05", "0.1", "0.2"),
    ("uniform", "p0.1", "p0.2"),
    ("uniform", "p0.05", "p0.1", "p0.2"),
    ("uniform", "0.1", "0.2", "p0.1", "p0.2"),
)


@torch.no_grad()
def per_probe(
    small: nn.Module, dense: dict[str, torch.Tensor], probes: dict[str, list[Any]]
) -> dict[str, torch.Tensor]:
    """Per probe: squared logit error (over the dense logits' variance), KL divergence of the
    softmax and top-1 disagreement on merge-ls's own probes; the first two on the fresh ones."""
    measures = {}
    for prefix, batches in probes.items():
        out = torch.cat([small(*batch) for batch in batches]).double()
        ref = dense[prefix]
        scale = (ref - ref.mean(0)).square().sum(1).mean()
        measures[f"{prefix}mse"] = (out - ref).square().sum(1) / scale
        measures[f"{prefix}kl"] = (ref.softmax(1) * (ref.log_softmax(1) - out.log_softmax(1))).sum(1)
        if not prefix:
            measures["disagreement"] = (out.argmax(1) != ref.argmax(1)).double()
    return measures


@torch.no_grad()
def correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether ``model`` (put in eval mode) classifies each image right, in batches."""
    model.eval()
    predicted = torch.cat([model(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return predicted == labels


def paired_t(baseline: torch.Tensor, candidate: torch.Tensor) -> float:
    """How many standard errors ``candidate``'s mean per-probe error is below ``baseline``'s."""
    d = baseline - candidate
    se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0
    return 0.0 if se == 0 else float(d.mean()) / se


def run_model(name: str, data: Any, save: Any) -> dict[str, Any]:
    model, info = trained_model(name, progress=False)
    example = data.test[0][:2]
    rows: list[dict[str, Any]] = []
    impacts: list[dict[str, Any]] = []
    outcome = {"model": name, "epochs": info["epochs"], "rows": rows, "impact": impacts}
    # merge-ls's own data-free path (its probes, its BatchNorm repair, ``lsq.BATCHNORM_REPAIR``),
    # not ``calibration=`` (which re-measures BatchNorm statistics): made once here, ``compress``
    # finds them in ``cached_probes``.
    inputs = as_input_tuple(example)
    gm = engine.capture(model, inputs)
    probes = {
        "": cached_probes(gm, example),
        "fresh_": cached_probes(gm, example, seed=FRESH_SEED),
    }
    with torch.no_grad():
        dense = {k: torch.cat([model(*batch) for batch in v]).double() for k, v in probes.items()}
    for kept in KEPT:
        errors: dict[str, dict[str, torch.Tensor]] = {}
        right: dict[str, torch.Tensor] = {}
        options = Options.of(method="merge-ls", target_params=kept)
        chosen = options.method_object()
        groups, _ = engine.groups(gm, options, chosen)
        source = lsq.moment_source(gm, inputs[0], None, groups)
        assert isinstance(source, lsq.MeasuredMoments)
        uniform = widths.kept_counts(
            gm, groups, inputs, None, replace(options.budget, allocation="uniform"), chosen
        )
        started = time.perf_counter()
        impact = api._impact(gm, groups, uniform, options, inputs, chosen, source)
        impacts.append(
            {
                "kept": kept,
                "seconds": round(time.perf_counter() - started, 2),
                "groups": {g: [w, round(e, 6)] for g, (w, e) in impact.items()},
            }
        )
        for label in ("uniform", *map(str, BANDS), *(f"p{b}" for b in PROPAGATED), CHECKED):
            started = time.perf_counter()
            if label == CHECKED:  # the library's default: allocation_check on
                result = nm.compress(model, example, target_params=kept, method="merge-ls")
                small, allocation = result.model, result.report.allocation
                sizes = [s.kept for s in result.report.sites]
            else:  # each candidate alone (the check off)
                keep = uniform
                if label != "uniform":
                    band = float(label.lstrip("p"))
                    keep = widths.kept_counts(
                        gm,
                        groups,
                        inputs,
                        None,
                        options.budget,
                        chosen,
                        moments=source,
                        band=band,
                        impact=impact if label.startswith("p") else None,
                    )
                small, _ = api._build(copy.deepcopy(gm), groups, keep, options, inputs, source, chosen)
                allocation = "uniform" if label == "uniform" else "error"
                sizes = [keep[g.name] for g in groups]
            errors[label] = per_probe(small, dense, probes)
            right[label] = correct(small, *data.val)
            change = right[label].double() - right["uniform"].double()
            row = {
                "kept": kept,
                "candidate": label,
                "val_accuracy": round(100 * float(right[label].double().mean()), 2),
                # Images this candidate gets right and uniform wrong, and the reverse; the
                # standard error (points) of its accuracy minus uniform's, paired by image.
                "val_gained": int((change > 0).sum()),
                "val_lost": int((change < 0).sum()),
                "val_se": round(100 * float(change.std()) / change.numel() ** 0.5, 2),
                **{k: round(float(v.mean()), 6) for k, v in errors[label].items()},
                **{
                    f"t_{k}": round(paired_t(errors["uniform"][k], v), 3)
                    for k, v in errors[label].items()
                },
                "widths": sizes,
                "allocation": allocation,
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
    if allocation_check.CHECK_SEED is None:
        bands, z = allocation_check.BANDS, allocation_check.SIGNIFICANCE
        measure = "mse"
    else:  # merge-ls, which fits on its probes, is scored on fresh ones, with its own rule
        bands, z = allocation_check.FITTED_BANDS, allocation_check.FITTED_SIGNIFICANCE
        measure = "fresh_mse"
    return f"{measure} z {z} among uniform/{'/'.join(map(str, bands))}"


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
    # The allocation alone, and the library's check, for reference.
    for band in (*BANDS, *(f"p{b}" for b in PROPAGATED), CHECKED):
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
    never_below = [name for name in scored if not rules[name]["cells_below_uniform"]]
    safest = max(never_below, key=lambda name: rules[name]["mean_gain"], default=None)
    return {
        "rules": rules,
        "former": FORMER,
        "library": library_rule(),
        "chosen": chosen,
        "best_mean": best_mean,
        "never_below_uniform": safest,
    }


def main() -> None:
    cli(__doc__ or "", OUT, MODELS, run_model, summary)


if __name__ == "__main__":
    main()
