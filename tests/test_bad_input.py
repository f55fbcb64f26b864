"""Every kind of bad input the issue lists, through the command line and the library.

Each must give one clear message (no traceback), its own exit code or exception class, and change
nothing: the input files keep their bytes, the caller's model its weights, an existing output file
its bytes (after a refused or an interrupted write), and no temporary file is left behind.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge import io
from neuronmerge.cli import main
from neuronmerge.models import create_model

LENET = ["--arch", "lenet-300-100"]


class Untraceable(nn.Module):
    """Data-dependent control flow: neither torch.fx nor torch.export can trace it (module level
    so that it can be pickled)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(h)


def lenet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model("lenet-300-100").state_dict()


def write_inputs(folder: Path) -> dict[str, Path]:
    """One file for each way a model file can be wrong, and a good one."""
    files = {name: folder / name for name in ("good.pth", "garbage.pth", "truncated.pth")}
    torch.save({"acc": 1.0, "state_dict": lenet_state()}, files["good.pth"])
    files["garbage.pth"].write_bytes(b"\x00not a checkpoint" * 20)
    files["truncated.pth"].write_bytes(files["good.pth"].read_bytes()[:4000])
    files["other-arch.pth"] = folder / "other-arch.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, files["other-arch.pth"])
    files["module.pth"] = folder / "module.pth"
    torch.save(create_model("lenet-300-100"), files["module.pth"])
    files["untraceable.pth"] = folder / "untraceable.pth"
    torch.save(Untraceable(), files["untraceable.pth"])
    nan = lenet_state()
    nan["ip1.bias"][3] = float("inf")
    files["nonfinite.pth"] = folder / "nonfinite.pth"
    torch.save(nan, files["nonfinite.pth"])
    saved = folder / "small.safetensors"
    assert (
        main(["compress", str(files["good.pth"]), *LENET, "--ratio", "0.5", "--out", str(saved), "-q"])
        == 0
    )
    files["small.safetensors"] = saved
    files["program.pt2"] = folder / "program.pt2"
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    nm.save(mlp, files["program.pt2"], example_inputs=torch.randn(2, 4))
    files["truncated.safetensors"] = folder / "truncated.safetensors"
    files["truncated.safetensors"].write_bytes(saved.read_bytes()[:2000])
    return files


CASES = [
    # (argv, exit code, words the message must hold)
    (["compress", "{garbage}", *LENET, "--ratio", "0.5"], 4, "cannot read"),
    (["compress", "{truncated}", *LENET, "--ratio", "0.5"], 4, "corrupt or truncated"),
    (["compress", "{other_arch}", *LENET, "--ratio", "0.5"], 4, "not a lenet-300-100"),
    (["compress", "{module}", *LENET, "--ratio", "0.5"], 4, "pass --trust if you trust"),
    (["evaluate", "{truncated_st}"], 4, "corrupt or truncated"),
    (
        ["compress", "{program}", "--ratio", "0.5", "--out", "{folder}/p.safetensors"],
        2,
        "safetensors holds weights only, which cannot rebuild a model of no registered "
        "architecture; name the file .pt2",
    ),
    (["export", "{program}", "--onnx", "{folder}/p.pt2"], 2, "an ONNX model is written as .onnx"),
    (["compress", "{good}", *LENET, "--ratio", "-0.1"], 2, "ratio must be in [0, 1)"),
    (["compress", "{good}", *LENET, "--ratio", "1"], 2, "ratio must be in [0, 1)"),
    (["compress", "{good}", *LENET, "--ratio", "0.999"], 2, "keeps 0 of the 300 channels of ip1"),
    (["plan", "{good}", *LENET, "--ratio", "0.999"], 2, "keeps 0 of the 300 channels of ip1"),
    (["compress", "{nonfinite}", *LENET, "--ratio", "0.5"], 2, "ip1: bias holds NaN or infinite"),
    (
        [
            "compress",
            "{untraceable}",
            "--trust",
            "--input-shape",
            "4",
            "--ratio",
            "0.5",
            "--out",
            "{folder}/u.pt2",
        ],
        6,
        "could not trace Untraceable",
    ),
    (["plan", "{good}", "--trust", "--input-shape", "3,32,32"], 2, "say which architecture"),
    (
        ["plan", "{module}", "--trust", "--input-shape", "3,32,32"],
        6,
        "LeNet300100 on the example inputs (shape (2, 3, 32, 32)) failed: mat1 and mat2 shapes",
    ),
    (
        ["compress", "{good}", *LENET, "--ratio", "0.5", "--out", "{folder}/no/such/dir/x.safetensors"],
        10,
        "folder",
    ),
    (["export", "{good}", *LENET, "--onnx", "{folder}/no/such/dir/x.onnx"], 10, "does not exist"),
    (
        ["compress", "{good}", *LENET, "--ratio", "0.5", "--out", "{small}"],
        7,
        "exists; pass --force",
    ),
    (["export", "{good}", *LENET, "--onnx", "{small}"], 2, "is written as .onnx"),
    (["evaluate", "{good}", *LENET, "--data-dir", "{folder}/no-data"], 5, "dataset-fashion-mnist"),
]


@pytest.mark.parametrize(
    ("argv", "code", "message"), CASES, ids=[" ".join(c[0][:2]) + f" {c[1]}" for c in CASES]
)
def test_cli_bad_input_one_message_distinct_code_nothing_changed(
    argv: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_inputs(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    names = {path.stem.replace("-", "_"): str(path) for path in files.values()}
    names |= {"truncated_st": str(files["truncated.safetensors"]), "folder": str(tmp_path)}
    argv = [a.format(**names) for a in argv]
    if argv[0] == "compress" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.safetensors")]
    capsys.readouterr()
    assert main(argv) == code
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert message in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert captured.out == (
        ""
        if code != 5
        else "lenet-300-100: 266,610 parameters (accuracy not measured: no fashion-mnist test data)\n"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing new, nothing changed


def test_api_refusals_leave_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(3, 4)
    attempts: list[tuple[Callable[[nn.Module], object], type[Exception], str]] = [
        (lambda m: nm.merge(m, x, 1.0), nm.InvalidArgumentError, "ratio must be in"),
        (lambda m: nm.merge(m, x, -0.5), nm.InvalidArgumentError, "ratio must be in"),
        (lambda m: nm.merge(m, x, 0.95), nm.InvalidArgumentError, "keeps 0 of the 6 channels of 0"),
        (lambda m: nm.plan(m, x, 0.95), nm.InvalidArgumentError, "keeps 0 of the 6 channels"),
        (
            lambda m: nm.merge(m, torch.randn(3, 5)),
            nm.CaptureError,
            r"inputs \(shape \(3, 5\)\) failed: mat1 and mat2 shapes cannot be multiplied",
        ),
        (lambda m: nm.merge(m, "x"), nm.InvalidArgumentError, "example_inputs must be a tensor"),
    ]
    for attempt, error, message in attempts:
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(error, match=message):
            attempt(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    for where, value in [
        ("3.weight", float("nan")),
        ("0.bias", float("-inf")),
        ("1.weight", float("inf")),
    ]:
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.get_parameter(where).view(-1)[0] = value
        snapshot = copy.deepcopy(broken.state_dict())
        module, _, leaf = where.partition(".")
        with pytest.raises(nm.InvalidArgumentError, match=f"{module}: {leaf} holds NaN or infinite"):
            nm.merge(broken, x, 0.5)
        for key, tensor in broken.state_dict().items():
            torch.testing.assert_close(tensor, snapshot[key], rtol=0, atol=0, equal_nan=True)

    broken = copy.deepcopy(model)
    broken.get_buffer("1.running_var")[2] = float("inf")  # BatchNorm statistics folded into a site
    with pytest.raises(nm.InvalidArgumentError, match="1: running_var holds NaN or infinite"):
        nm.merge(broken, x, 0.5)


def test_api_untraceable_model_is_named_and_left_alone(tmp_path: Path) -> None:
    model = Untraceable()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(nm.CaptureError, match="could not trace Untraceable") as caught:
        nm.merge(model, torch.randn(2, 4), 0.5)
    assert "torch.fx.wrap" in str(caught.value)  # says how to fix it
    with pytest.raises(nm.CaptureError, match="torch.export could not save Untraceable"):
        nm.save(model, tmp_path / "u.pt2", example_inputs=torch.randn(2, 4))
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_compress_keeps_the_old_output_byte_for_byte(
    failure: BaseException,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--force`` replaces a file only once the new one is complete: a write that fails midway
    (disk full, Ctrl-C) leaves the old file and no temporary file."""
    files = write_inputs(tmp_path)
    target = files["small.safetensors"]
    old = target.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())

    def half_then_fail(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(io, "save_file", half_then_fail)
    argv = [
        "compress",
        str(files["good.pth"]),
        *LENET,
        "--ratio",
        "0.6",
        "--out",
        str(target),
        "--force",
    ]
    capsys.readouterr()
    code = main(argv)
    err = " ".join(capsys.readouterr().err.split())
    if isinstance(failure, OSError):
        assert code == 10
        assert "No space left on device; the existing file is unchanged" in err
    else:
        assert code == 130 and "interrupted" in err
    assert "Traceback" not in err
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
