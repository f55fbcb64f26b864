"""The committed reach results (``benchmarks/results/reach.json``) and the README table made from them.

The README's "Reach" table must be exactly what ``benchmarks/reach.py --markdown`` prints for the
committed JSON, and every row of that JSON must have passed the benchmark's own checks: each
neuronmerge variant kept the output shape and left the caller's model bit-identical.
"""

from __future__ import annotations

import json
from typing import Any

from conftest import ROOT, reach

RESULTS = ROOT / "benchmarks" / "results" / "reach.json"


def results() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(RESULTS.read_text())
    return data


def test_readme_table_is_generated_from_the_results() -> None:
    table = reach().markdown(results())
    assert table in (ROOT / "README.md").read_text(), "run benchmarks/reach.py --markdown"


def test_every_architecture_measured_and_checked() -> None:
    rows = results()["rows"]
    assert [row["model"] for row in rows] == list(reach().MODELS)
    for row in rows:
        for label, variant in row["neuronmerge"]["variants"].items():
            assert "error" not in variant, (row["model"], label, variant["error"])
            assert variant["output_shape_kept"] and variant["input_untouched"], (row["model"], label)
        assert row["torch_pruning"]["input_untouched"], row["model"]
        # Torch-Pruning either gives a number or the row says how it failed.
        assert {"fraction", "error"} & row["torch_pruning"].keys(), row["model"]
