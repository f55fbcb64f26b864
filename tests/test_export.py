"""ONNX export: the file onnxruntime runs computes what PyTorch computes, at any batch size; refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import neuronmerge as nm
from neuronmerge import export
from neuronmerge.cli import main
from neuronmerge.models import create_model

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is part of dev: make setup")


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    """A LeNet-300-100 merged at ratio 0.5 and saved by ``compress``."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "lenet.pth"
    torch.save(create_model("lenet-300-100").state_dict(), checkpoint)
    out = tmp_path / "small.safetensors"
    argv = ["compress", str(checkpoint), "--arch", "lenet-300-100", "--ratio", "0.5"]
    assert main([*argv, "--out", str(out), "--quiet", "--json"]) == 0
    return out


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [arg.name for arg in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def test_cli_export_matches_pytorch_at_other_batch_sizes(
    merged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    out = tmp_path / "small.onnx"
    assert main(["export", str(merged), "--onnx", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout holds exactly one JSON object, no exporter chatter
    assert report["out"] == str(out) and report["format"] == "onnx"
    assert report["onnxruntime_max_abs_diff"] < 1e-4
    model = nm.load(merged)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = model(x)
        got = run_onnx(out, x)
        assert got.shape == (batch, 10)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert out.stat().st_mode & 0o777 != 0o600  # not the temporary file's private mode


def test_cli_export_refuses_existing_output_and_keeps_it(
    merged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small.onnx"
    out.write_bytes(b"precious")
    assert main(["export", str(merged), "--onnx", str(out)]) == 7
    err = " ".join(capsys.readouterr().err.split())
    assert "exists; pass --force" in err and "Traceback" not in err
    assert out.read_bytes() == b"precious"


def test_wrong_export_does_not_replace_the_old_file(
    merged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The onnxruntime check runs on the temporary file: a failing check (or a write interrupted
    midway) leaves the previous file byte for byte, and no temporary file behind."""
    out = tmp_path / "small.onnx"
    out.write_bytes(b"precious")

    def disagree(*args: object) -> float:
        raise nm.NeuronMergeError("onnxruntime output differs from PyTorch")

    monkeypatch.setattr(export, "_max_diff_onnxruntime", disagree)
    with pytest.raises(nm.NeuronMergeError, match="differs"):
        export.export_onnx(nm.load(merged), out, torch.randn(2, 1, 28, 28), force=True)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.pth", "small.onnx", "small.safetensors"]


def test_missing_onnx_extra_is_named(
    merged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a)
    )
    out = tmp_path / "small.onnx"
    assert main(["export", str(merged), "--onnx", str(out)]) == 9
    err = " ".join(capsys.readouterr().err.split())
    assert "ONNX export needs onnxscript: pip install 'neuronmerge[onnx]'" in err
    assert not out.exists()
    with pytest.raises(nm.MissingDependencyError):
        export.export_onnx(nm.load(merged), out, torch.randn(2, 1, 28, 28))


class _Custom(torch.nn.Module):
    """A model of no registered architecture (module level so that it can be pickled)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


def test_cli_exports_a_trusted_pickled_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = _Custom().eval()
    pickled, out = tmp_path / "custom.pt", tmp_path / "custom.onnx"
    torch.save(model, pickled)
    argv = ["export", str(pickled), "--onnx", str(out), "--input-shape", "3,8,8", "--json"]
    assert main(argv) == 4  # a pickle is refused without --trust
    assert not out.exists()
    capsys.readouterr()
    assert main([*argv, "--trust"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(run_onnx(out, x), model(x), atol=1e-5, rtol=1e-5)
