"""The paper's Table 1 (LeNet-300-100 on Fashion-MNIST), reproduced from the authors' checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuronmerge.cli import main
from neuronmerge.io import load_checkpoint
from neuronmerge.lab.reproduce import PAPER_SETUPS, reproduce

PAPER = {
    (0.5, "prune"): 88.40,
    (0.5, "merge"): 88.69,
    (0.6, "prune"): 85.17,
    (0.6, "merge"): 86.92,
    (0.7, "prune"): 71.26,
    (0.7, "merge"): 82.75,
    (0.8, "prune"): 66.76,
    (0.8, "merge"): 80.02,
}


def test_paper_table_is_reproduced_to_the_hundredth(
    lenet_checkpoint: Path, fashion_mnist_dir: Path
) -> None:
    model = load_checkpoint(lenet_checkpoint, "lenet-300-100")
    outcome = reproduce(model, PAPER_SETUPS["lenet-300-100"], data_dir=fashion_mnist_dir)
    assert outcome["baseline_accuracy"] == pytest.approx(89.80, abs=0.005)
    measured = {(row["ratio"], row["method"]): row["accuracy"] for row in outcome["results"]}
    assert measured.keys() == PAPER.keys()
    for key, expected in PAPER.items():
        assert measured[key] == pytest.approx(expected, abs=0.005), key
    params = {(row["ratio"], row["method"]): row["params"] for row in outcome["results"]}
    # 784-h1-h2-10 with biases, h = round(300 * (1 - r)), round(100 * (1 - r)); same for both methods
    assert params[(0.5, "prune")] == params[(0.5, "merge")] == 785 * 150 + 151 * 50 + 51 * 10


def test_reproduce_cli_prints_one_json_object(
    lenet_checkpoint: Path, fashion_mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "reproduce",
            "lenet-300-100",
            "--checkpoint",
            str(lenet_checkpoint),
            "--ratios",
            "0.7",
            "--json",
            "--data-dir",
            str(fashion_mnist_dir),
        ]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"] == "lenet-300-100" and payload["dataset"] == "fashion-mnist"
    assert payload["baseline_accuracy"] == 89.8
    assert [(r["ratio"], r["method"], r["accuracy"]) for r in payload["results"]] == [
        (0.7, "prune", 71.26),
        (0.7, "merge", 82.75),
    ]
    assert all(r["params"] == 785 * 90 + 91 * 30 + 31 * 10 for r in payload["results"])
