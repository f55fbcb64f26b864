"""The committed budget sweep (experiments/budget_sweep.json) is whole, compares at equal parameter
counts, and meets issue 14's target: on every model trained here, the best data-free method with
allocated widths >= the best with uniform widths, and >= Torch-Pruning's global pruning, at every
parameter count from 10% to 90% (test accuracy). The sweep takes many minutes per model, so this
reads its committed results; the cells where the target is missed are listed below, and the test
fails when a listed cell is no longer missed or another one is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("lenet-300-100", "alexnet-fmnist", "vgg-fmnist", "resnet-fmnist")
KEPT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("merge", "prune", "merge-ls")
#: (model, fraction kept) where the best allocated row is below the best uniform row, as measured.
#: Every method keeps the uniform widths where the probes do not find its allocation closer, or find
#: uniform's error negligible (``allocation_check``; merge and prune too since
#: ``experiments/budget_weight_check.json``, which cleared their misses on LeNet-300-100 at 80% and
#: alexnet-fmnist at 90%). merge-ls missed on resnet-fmnist at 20-30% (-0.23, -0.19) while its
#: check scored the probes its fit used; scored on fresh probes (``allocation_check.CHECK_SEED``,
#: ``experiments/budget_choice.json``) it keeps the uniform widths there.
MISSED_UNIFORM: set[tuple[str, float]] = set()
#: (model, fraction kept) where the best allocated row is below Torch-Pruning's global pruning.
MISSED_PEER: set[tuple[str, float]] = set()


def _tables() -> Any:
    return load_script("experiments/budget_tables.py")


def _sweep() -> dict[str, Any]:
    return json.loads((ROOT / "experiments" / "budget_sweep.json").read_text())["models"]


def test_every_model_count_method_and_allocation_is_measured_at_equal_parameters() -> None:
    sweep = _sweep()
    for name in MODELS:
        result = sweep[name]
        for kept in KEPT:
            rows = [r for r in result["rows"] if r["kept"] == kept]
            target = kept * result["params"]
            for method in METHODS:
                for allocation in ("uniform", "error"):
                    (row,) = [r for r in rows if (r["method"], r["allocation"]) == (method, allocation)]
                    assert abs(row["params"] - target) <= 0.01 * target, (name, kept, method)
            (peer,) = [r for r in rows if r["method"] == "torch-pruning-global"]
            assert abs(peer["params"] - target) <= 0.02 * target, (name, kept)


def test_allocated_widths_meet_the_targets_except_the_listed_cells() -> None:
    tables = _tables()
    sweep = _sweep()
    below_uniform, below_peer = set(), set()
    for name in MODELS:
        for kept, versus_uniform, versus_peer in tables.comparisons(sweep[name]):
            assert versus_uniform is not None and versus_peer is not None, (name, kept)
            if versus_uniform < 0:
                below_uniform.add((name, kept))
            if versus_peer < 0:
                below_peer.add((name, kept))
    assert below_uniform == MISSED_UNIFORM
    assert below_peer == MISSED_PEER


def test_the_weight_only_check_was_adopted_on_validation_at_the_library_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``experiments/budget_weight_check.json`` (validation split) adopted checking merge's and
    prune's allocations at ``allocation_check``'s current settings, and the library's own pick
    matched the rule's in every cell: its summary, recomputed now, is the committed one."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    script = load_script("experiments/budget_weight_check.py")
    committed = json.loads((ROOT / "experiments" / "budget_weight_check.json").read_text())
    assert set(committed["models"]) == set(MODELS)
    assert script.summary(committed["models"]) == committed["summary"]
    assert committed["summary"]["adopted"] and committed["summary"]["library_matches"]
