"""Checkpoints, saved models and the command line: round trips, and each bad input's message and code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import neuronmerge as nm
from neuronmerge import io
from neuronmerge.cli import main
from neuronmerge.models import create_model


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A random LeNet-300-100 in the authors' format {'acc', 'state_dict'}."""
    torch.manual_seed(0)
    path = tmp_path / "lenet.pth.tar"
    torch.save({"acc": 12.5, "state_dict": create_model("lenet-300-100").state_dict()}, path)
    return path


def test_saved_merged_model_loads_back_as_a_plain_module(checkpoint: Path, tmp_path: Path) -> None:
    model = nm.load_checkpoint(checkpoint, "lenet-300-100")
    x = torch.randn(5, 1, 28, 28)
    small = nm.merge(model, x, 0.6)
    out = nm.save(small, tmp_path / "small.safetensors", arch="lenet-300-100")
    loaded = nm.load(out)
    assert type(loaded).__name__ == "LeNet300100"
    assert (loaded.ip1.out_features, loaded.ip2.out_features) == (120, 40)
    assert torch.equal(loaded(x), small(x))
    assert io.read_metadata(out)["arch"] == "lenet-300-100"


def test_save_refuses_to_overwrite_and_writes_atomically(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = nm.load_checkpoint(checkpoint, "lenet-300-100")
    target = tmp_path / "model.safetensors"
    nm.save(model, target, arch="lenet-300-100")
    original = target.read_bytes()
    with pytest.raises(nm.OutputExistsError, match="exists; pass force=True"):
        nm.save(model, target, arch="lenet-300-100")

    def interrupted(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nm.save(model, target, arch="lenet-300-100", force=True)
    assert target.read_bytes() == original
    assert {p.name for p in tmp_path.iterdir()} == {"lenet.pth.tar", "model.safetensors"}


def test_load_checkpoint_errors(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(nm.CheckpointError, match="no such file"):
        nm.load_checkpoint(tmp_path / "absent.pth", "lenet-300-100")
    with pytest.raises(nm.UnknownArchitectureError, match="unknown architecture 'lenet-5'"):
        nm.load_checkpoint(checkpoint, "lenet-5")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(nm.CheckpointError, match="cannot read"):
        nm.load_checkpoint(garbage, "lenet-300-100")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(nm.CheckpointError, match="corrupt or truncated"):
        nm.load_checkpoint(truncated, "lenet-300-100")

    pickled = tmp_path / "module.pth"
    torch.save(create_model("lenet-300-100"), pickled)
    with pytest.raises(nm.CheckpointError, match="--trust"):
        nm.load_checkpoint(pickled, "lenet-300-100")

    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 3)}}, other)
    with pytest.raises(nm.CheckpointError, match="not a lenet-300-100"):
        nm.load_checkpoint(other, "lenet-300-100")

    with pytest.raises(nm.CheckpointError, match="not a model saved by neuronmerge"):
        nm.load(checkpoint)


def test_checkpoint_file_is_not_modified(checkpoint: Path, tmp_path: Path) -> None:
    before = checkpoint.read_bytes()
    assert (
        main(
            [
                "compress",
                str(checkpoint),
                "--arch",
                "lenet-300-100",
                "--ratio",
                "0.5",
                "--out",
                str(tmp_path / "o.safetensors"),
                "--quiet",
            ]
        )
        == 0
    )
    assert checkpoint.read_bytes() == before


def test_cli_compress_then_evaluate(
    checkpoint: Path, tmp_path: Path, fashion_mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged.safetensors"
    assert (
        main(
            [
                "compress",
                str(checkpoint),
                "--arch",
                "lenet-300-100",
                "--ratio",
                "0.5",
                "--method",
                "prune",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and report["method"] == "prune"
    assert [(s["producer"], s["kept"]) for s in report["sites"]] == [("ip1", 150), ("ip2", 50)]
    assert report["params_after"] == 785 * 150 + 151 * 50 + 51 * 10

    assert main(["evaluate", str(out), "--json", "--data-dir", str(fashion_mnist_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["model"] == "lenet-300-100"
    assert evaluated["params"] == report["params_after"]
    assert 0 <= evaluated["accuracy"] <= 100

    assert main(["plan", str(out), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [s["producer"] for s in planned["sites"]] == ["ip1", "ip2"]
    assert planned["skipped"] == [
        {"producer": "ip3", "reason": "channels are part of the model's output"}
    ]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ["compress", "{ckpt}", "--arch", "resnet-9000", "--ratio", "0.5", "--out", "{out}"],
            3,
            "unknown architecture",
        ),
        (
            ["compress", "{missing}", "--arch", "lenet-300-100", "--ratio", "0.5", "--out", "{out}"],
            4,
            "no such file",
        ),
        (
            ["compress", "{ckpt}", "--arch", "lenet-300-100", "--ratio", "1.5", "--out", "{out}"],
            2,
            "ratio must be in [0, 1)",
        ),
        (
            ["compress", "{ckpt}", "--arch", "lenet-300-100", "--ratio", "0.5", "--out", "{ckpt}"],
            2,
            "a saved model is named .safetensors or .pt2",
        ),
        (["evaluate", "{ckpt}"], 2, "holds a state dict; say which architecture it is"),
        (
            ["evaluate", "{ckpt}", "--arch", "lenet-300-100", "--data-dir", "{missing}"],
            5,
            "dataset-fashion-mnist",
        ),
    ],
)
def test_cli_errors_are_one_line_with_distinct_codes(
    argv: list[str],
    code: int,
    message: str,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = checkpoint.read_bytes()
    names = {
        "ckpt": str(checkpoint),
        "out": str(tmp_path / "o.safetensors"),
        "missing": str(tmp_path / "missing"),
    }
    assert main([a.format(**names) for a in argv]) == code
    captured = capsys.readouterr()
    # evaluate still reports the parameter count when the test data is missing
    assert captured.out == (
        ""
        if code != 5
        else "lenet-300-100: 266,610 parameters (accuracy not measured: no fashion-mnist test data)\n"
    )
    assert message in " ".join(captured.err.split())
    assert "Traceback" not in captured.err
    assert checkpoint.read_bytes() == before
    assert not (tmp_path / "o.safetensors").exists()


class _Custom(torch.nn.Module):
    """A model of no registered architecture (module-level so that it can be pickled)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_trusted_pickled_module_compresses_to_a_torch_export_program(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    pickled, out = tmp_path / "custom.pt", tmp_path / "small.pt2"
    torch.save(_Custom(), pickled)
    argv = ["compress", str(pickled), "--ratio", "0.5", "--out", str(out), "--input-shape", "3,8,8"]
    assert main(argv) == 4  # refused without --trust
    assert "--trust" in capsys.readouterr().err
    assert main([*argv, "--trust", "--json"]) == 0
    captured = capsys.readouterr()
    assert "can run arbitrary code" in captured.err
    assert [(s["producer"], s["kept"]) for s in json.loads(captured.out)["sites"]] == [("conv", 4)]
    exported = torch.export.load(out).module()  # plain PyTorch, no neuronmerge needed
    x = torch.randn(3, 3, 8, 8)
    assert exported(x).shape == (3, 4)
    assert torch.allclose(nm.load(out)(x), exported(x))
    assert main(["plan", str(pickled), "--trust", "--input-shape", "3,8,8", "--json", "-q"]) == 0
    assert [s["producer"] for s in json.loads(capsys.readouterr().out)["sites"]] == ["conv"]
    assert main(["plan", str(pickled), "--trust", "-q"]) == 2
    assert "give --input-shape" in capsys.readouterr().err
