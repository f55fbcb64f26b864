"""Sweeps: the method registry, the Torch-Pruning peer row, the output files, and the two CLI
commands of issue 5 (``train`` on a small real subset, ``sweep`` on the authors' LeNet-300-100)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import neuronmerge as nm
from neuronmerge.cli import main
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.evaluate import accuracy, count_parameters
from neuronmerge.lab import sweep as sweeps
from neuronmerge.lab.data import read_idx
from neuronmerge.lab.peers import torch_pruning_magnitude
from neuronmerge.models import create_model, get_spec
from tests.idx_files import write_idx

ROW_KEYS = {"ratio", "method", "data_free", "accuracy", "val_accuracy", "params", "seconds"}


pytestmark = pytest.mark.usefixtures("single_thread")


def test_registry_holds_the_paper_methods_ours_and_the_peer() -> None:
    assert sweeps.available_methods()[:4] == ["prune", "merge", "merge-exact", "torch-pruning"]
    assert all(sweeps.METHODS[name].data_free for name in sweeps.available_methods()[:4])
    names = [m.name for m in sweeps.resolve_methods(["merge", "all", "prune"])]  # order kept, no repeats
    assert names == ["merge", *(n for n in sweeps.available_methods() if n != "merge")]
    with pytest.raises(InvalidArgumentError, match="unknown sweep method 'nope'.*prune"):
        sweeps.resolve_methods(["nope"])
    with pytest.raises(ValueError, match="already registered"):
        sweeps.register_method(
            sweeps.SweepMethod("merge", True, "again", sweeps.METHODS["merge"].compress)
        )
    assert sweeps.paper_settings("LeNet_300_100") == {
        "criterion": "l1-norm",
        "threshold": 0.45,
        "lam": None,
    }
    assert sweeps.paper_settings("vgg-fmnist") == sweeps.PAPER_CONV_SETTINGS


@pytest.mark.parametrize("name", ["vgg-fmnist", "alexnet-fmnist", "resnet-fmnist", "lenet-300-100"])
@pytest.mark.parametrize("ratio", [0.3, 0.8])
def test_torch_pruning_row_reaches_our_parameter_count(name: str, ratio: float) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = get_spec(name).example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = torch_pruning_magnitude(model, x, ratio)
    merged = nm.merge(model, x, ratio)
    assert count_parameters(pruned) == count_parameters(merged) < count_parameters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not modified
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (2, 10)


def test_torch_pruning_keeps_its_own_choice_of_channels() -> None:
    """Not a relabelled neuronmerge prune: on LeNet its group importance (which also weighs the
    next layer's columns) keeps other neurons than the l1 norm of the rows alone."""
    torch.manual_seed(0)
    model = create_model("lenet-300-100").eval()
    x = get_spec("lenet-300-100").example_inputs()
    ours, theirs = nm.prune(model, x, 0.5), torch_pruning_magnitude(model, x, 0.5)
    assert ours.ip1.weight.shape == theirs.ip1.weight.shape
    assert not torch.equal(ours.ip1.weight, theirs.ip1.weight)


def _small_data(fashion_mnist_dir: Path) -> sweeps.EvalData:
    full = sweeps.fashion_mnist_eval_data(fashion_mnist_dir)
    assert len(full.test[0]) == 10000 and len(full.val[0]) == sweeps.VAL_SIZE
    assert len(full.calibration) == sweeps.CALIBRATION_BATCHES
    assert full.calibration[0].shape == (sweeps.CALIBRATION_BATCH_SIZE, 1, 28, 28)
    return sweeps.EvalData(
        test=(full.test[0][:2000], full.test[1][:2000]),
        val=(full.val[0][:1000], full.val[1][:1000]),
        calibration=full.calibration[:1],
    )


def test_sweep_schema_baseline_at_ratio_zero_and_context(
    fashion_mnist_dir: Path, lenet_checkpoint: Path, tmp_path: Path
) -> None:
    model = nm.load_checkpoint(lenet_checkpoint, "lenet-300-100")
    data = _small_data(fashion_mnist_dir)
    seen: list[sweeps.SweepContext] = []

    def spy(model: torch.nn.Module, x: torch.Tensor, ratio: float, context: sweeps.SweepContext):
        seen.append(context)
        return nm.merge(model, x, ratio, threshold=None)

    sweeps.register_method(sweeps.SweepMethod("spy", False, "test only", spy))
    data_free = [method.data_free for method in sweeps.METHODS.values()]  # every method, spy last
    try:
        rows: list[dict] = []
        outcome = sweeps.sweep(model, "lenet-300-100", data, [0.0, 0.6], ["all"], on_row=rows.append)
    finally:
        del sweeps.METHODS["spy"]
    assert seen[0].arch == "lenet-300-100" and seen[0].calibration is data.calibration
    assert set(outcome) == {
        "model", "dataset", "baseline_accuracy", "baseline_val_accuracy", "params", "results", "skipped"
    }  # fmt: skip
    assert outcome["model"] == "lenet-300-100" and outcome["dataset"] == "fashion-mnist"
    assert outcome["params"] == 266610 and outcome["skipped"] == []
    assert rows == outcome["results"] and len(rows) == 2 * len(data_free)
    assert all(set(row) == ROW_KEYS for row in rows)
    assert [r["data_free"] for r in rows if r["ratio"] == 0] == data_free
    for row in rows:
        assert isinstance(row["accuracy"], float) and isinstance(row["params"], int)
        if row["ratio"] == 0:
            assert row["accuracy"] == outcome["baseline_accuracy"]
            assert row["val_accuracy"] == outcome["baseline_val_accuracy"]
            assert row["params"] == 266610
    at = {row["method"]: row for row in rows if row["ratio"] == 0.6}
    assert at["merge"]["accuracy"] > at["prune"]["accuracy"] + 1  # the paper's point, on 2000 images
    assert at["torch-pruning"]["params"] == at["merge-exact"]["params"] == at["prune"]["params"]

    written = sweeps.write_sweep(outcome, tmp_path / "out")
    assert [p.name for p in written] == ["sweep.json", "sweep.csv", "sweep.png"]
    assert json.loads(written[0].read_text()) == outcome
    table = list(csv.DictReader(written[1].open()))
    assert table[0]["method"] == "baseline" and len(table) == 1 + len(rows)
    assert float(table[1]["accuracy"]) == rows[0]["accuracy"]
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(nm.OutputExistsError, match="sweep.json"):
        sweeps.write_sweep(outcome, tmp_path / "out")


def test_paper_methods_refuse_ratios_that_leave_no_channel_and_are_listed(
    fashion_mnist_dir: Path,
) -> None:
    """vgg-fmnist's first conv has 16 channels: the paper floors 16 * 0.05 to 0 kept, ours rounds."""
    torch.manual_seed(0)
    model = create_model("vgg-fmnist").eval()
    data = _small_data(fashion_mnist_dir)
    data = sweeps.EvalData(
        (data.test[0][:200], data.test[1][:200]), (data.val[0][:100], data.val[1][:100]), ()
    )
    outcome = sweeps.sweep(model, "vgg-fmnist", data, [0.95], ["prune", "merge-exact"])
    assert [r["method"] for r in outcome["results"]] == ["merge-exact"]
    assert outcome["skipped"] == [
        {
            "ratio": 0.95,
            "method": "prune",
            "reason": "ratio 0.95 keeps 0 of the 16 channels of features.0; "
            "use a smaller ratio or exclude this layer",
        }
    ]


def test_cli_sweep_reproduces_the_paper_rows_and_writes_files(
    fashion_mnist_dir: Path, lenet_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "lenet-300-100", "--checkpoint", str(lenet_checkpoint), "--ratios", "0.7"]
    argv += ["--methods", "prune", "merge", "--out-dir", str(out), "--data-dir", str(fashion_mnist_dir)]
    assert main([*argv, "--json", "--quiet"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["baseline_accuracy"] == 89.80  # the paper's Table 1, all 10,000 test images
    assert [(r["method"], r["accuracy"]) for r in outcome["results"]] == [
        ("prune", 71.26),
        ("merge", 82.75),
    ]
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    assert main([*argv, "--quiet"]) == 7  # the files exist
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--quiet", "--force", "--methods", "bogus"]) == 2


def _subset(source: Path, target: Path, n_train: int, n_test: int) -> Path:
    """The first images of the real Fashion-MNIST, as a smaller IDX folder."""
    target.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte"
            found = next(p for p in (source / name, source / f"{name}.gz") if p.exists())
            write_idx(target / name, np.ascontiguousarray(read_idx(found)[:n]), compress=False)
    return target


def test_cli_train_on_a_small_real_subset_then_cache_hit(
    fashion_mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1,000 training images (the rest of 6,000 is the validation split), 3 epochs: far above the
    10% of chance. The saved file reloads to the same accuracy; a second run is a cache hit."""
    monkeypatch.setenv("NEURONMERGE_CACHE_DIR", str(tmp_path / "cache"))
    data = _subset(fashion_mnist_dir, tmp_path / "data", n_train=6000, n_test=1000)
    out = tmp_path / "vgg.safetensors"
    argv = ["train", "vgg-fmnist", "--epochs", "3", "--data-dir", str(data), "--json", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["model"] == "vgg-fmnist" and first["epochs"] == 3 and not first["cached"]
    assert first["val_accuracy"] > 50 and first["test_accuracy"] > 50
    assert first["params"] == 145082 and first["out"] == str(out)
    images = torch.tensor(read_idx(data / "t10k-images-idx3-ubyte")).unsqueeze(1).float() / 127.5 - 1
    labels = torch.tensor(read_idx(data / "t10k-labels-idx1-ubyte")).long()
    assert accuracy(nm.load(out), images, labels) == pytest.approx(first["test_accuracy"], abs=0.11)

    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second == {**first, "cached": True, "out": None}
    assert main([*argv, "--out", str(out)]) == 7  # refuses to replace it without --force
