"""What people expect of a command line: --json and --quiet everywhere, progress on stderr only
when wanted, ``python -m neuronmerge``, and a typed package."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

import neuronmerge as nm
from neuronmerge.cli import build_parser, main
from neuronmerge.models import create_model


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_command_takes_json_and_quiet(name: str) -> None:
    options = {o for a in subcommands()[name]._actions for o in a.option_strings}
    assert {"--json", "--quiet", "-q"} <= options


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "lenet.pth"
    torch.save(create_model("lenet-300-100").state_dict(), path)
    return path


def test_evaluate_shows_progress_unless_quiet_or_json(
    checkpoint: Path, fashion_mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", str(checkpoint), "--arch", "lenet-300-100", "--data-dir", str(fashion_mnist_dir)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "evaluating" in captured.err and "10000/10000" in captured.err
    assert "accuracy" in captured.out and "evaluating" not in captured.out

    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["params"] == 266_610


def test_reproduce_shows_progress_over_the_ratio_loop(
    lenet_checkpoint: Path, fashion_mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["reproduce", "lenet-300-100", "--checkpoint", str(lenet_checkpoint), "--ratios", "0.7"]
    argv += ["--data-dir", str(fashion_mnist_dir)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "ratio 0.70 merge 82.75%" in err
    assert main([*argv, "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "neuronmerge", "models", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [row["name"] for row in json.loads(done.stdout)] == nm.available_models()


def test_package_is_typed() -> None:
    assert resources.files("neuronmerge").joinpath("py.typed").is_file()


def test_compress_is_bit_identical_across_runs_and_processes(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same inputs, same bytes: the saved weights, the description in the header, the report."""
    argv = ["compress", str(checkpoint), "--arch", "lenet-300-100", "--ratio", "0.6", "--json"]
    outs = [tmp_path / f"run{i}.safetensors" for i in range(3)]
    reports = []
    for out in outs[:2]:
        assert main([*argv, "--out", str(out)]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    done = subprocess.run(
        [sys.executable, "-m", "neuronmerge", *argv, "--out", str(outs[2])],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    reports.append(json.loads(done.stdout))
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    for report in reports:
        report.pop("out")
    assert reports[0] == reports[1] == reports[2]
