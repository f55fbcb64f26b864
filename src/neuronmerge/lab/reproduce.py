"""Reproduce the paper's prune-versus-merge tables on a model and the test split of its dataset.

The settings of each table (criterion, threshold, lambda, fidelity) are the authors' own, recorded in
``PAPER_SETUPS`` beside the numbers they report, so a reproduction can be compared line by line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuronmerge.api import compress
from neuronmerge.errors import DatasetNotFoundError, InvalidArgumentError
from neuronmerge.evaluate import accuracy, count_parameters
from neuronmerge.lab.data import load_fashion_mnist
from neuronmerge.lab.training import reproducible_torch
from neuronmerge.models import get_spec


@dataclass(frozen=True)
class PaperSetup:
    """One of the paper's experiments: its settings and the accuracies it reports (percent)."""

    arch: str
    dataset: str
    ratios: tuple[float, ...]
    criterion: str
    threshold: float | None
    lam: float | None
    baseline: float
    reported: dict[tuple[float, str], float]


PAPER_SETUPS: dict[str, PaperSetup] = {
    "lenet-300-100": PaperSetup(
        arch="lenet-300-100",
        dataset="fashion-mnist",
        ratios=(0.5, 0.6, 0.7, 0.8),
        criterion="l1-norm",
        threshold=0.45,
        lam=None,
        baseline=89.80,
        reported={
            (0.5, "prune"): 88.40,
            (0.5, "merge"): 88.69,
            (0.6, "prune"): 85.17,
            (0.6, "merge"): 86.92,
            (0.7, "prune"): 71.26,
            (0.7, "merge"): 82.75,
            (0.8, "prune"): 66.76,
            (0.8, "merge"): 80.02,
        },
    ),
}


def paper_setup(arch: str) -> PaperSetup:
    """The paper's experiment for ``arch``; a clear error for architectures without one here."""
    name = get_spec(arch).name
    if name not in PAPER_SETUPS:
        raise InvalidArgumentError(
            f"no paper table to reproduce for {name} on this machine; "
            f"available: {', '.join(PAPER_SETUPS)}"
        )
    return PAPER_SETUPS[name]


def test_split(dataset: str, data_dir: str | os.PathLike[str] | None) -> tuple[torch.Tensor, ...]:
    """Images and labels of the test split of ``dataset``."""
    if dataset != "fashion-mnist":
        raise DatasetNotFoundError(
            f"neuronmerge reads no {dataset} test set (only fashion-mnist): measure this model's "
            "accuracy in your own evaluation code, where nm.load(path) returns it as an ordinary "
            "module"
        )
    return load_fashion_mnist("test", data_dir)


def reproduce(
    model: nn.Module,
    setup: PaperSetup,
    ratios: Sequence[float] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` unpruned, pruned and merged (paper fidelity) at each ratio.

    Returns ``{"model", "dataset", "baseline_accuracy", "params", "results": [{"ratio", "method",
    "accuracy", "params"}]}`` with accuracies in percent, rounded to 0.01.
    ``on_row`` is called with each result as soon as it is measured (for progress display).
    Runs like training (``reproducible_torch``), so the table does not depend on the core count.
    """
    with reproducible_torch():
        return _reproduce(model, setup, ratios, data_dir, on_row)


def _reproduce(
    model: nn.Module,
    setup: PaperSetup,
    ratios: Sequence[float] | None,
    data_dir: str | os.PathLike[str] | None,
    on_row: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    images, labels = test_split(setup.dataset, data_dir)
    example = images[:2]
    results: list[dict[str, Any]] = []
    for ratio in setup.ratios if ratios is None else ratios:
        for method in ("prune", "merge"):
            result = compress(
                model,
                example,
                ratio,
                method=method,
                criterion=setup.criterion,
                threshold=setup.threshold,
                lam=setup.lam,
                fidelity="paper",
            )
            row = {
                "ratio": ratio,
                "method": method,
                "accuracy": round(accuracy(result.model, images, labels), 2),
                "params": result.report.params_after,
            }
            results.append(row)
            if on_row is not None:
                on_row(row)
    return {
        "model": setup.arch,
        "dataset": setup.dataset,
        "baseline_accuracy": round(accuracy(model, images, labels), 2),
        "params": count_parameters(model),
        "results": results,
    }
