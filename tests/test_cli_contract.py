"""What a script can rely on from the command line (issue 15): output names that say the format, every
format ``compress`` writes read back by every command, one JSON object on failure too, outputs
checked before any work, one set of options shared by the commands, and tables readable in a pipe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neuronmerge as nm
from neuronmerge import cli
from neuronmerge.cli import build_parser, main
from neuronmerge.evaluate import count_parameters
from neuronmerge.io import read_metadata
from neuronmerge.models import create_model


class _Custom(torch.nn.Module):
    """A model of no registered architecture (module-level so that it can be pickled)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def pickled(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "custom.pt"
    torch.save(_Custom(), path)
    return path


@pytest.fixture
def lenet(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "lenet.pth"
    torch.save(create_model("lenet-300-100").state_dict(), path)
    return path


class _Long(torch.nn.Module):
    """Long layer names (module-level so that it can be pickled)."""

    def __init__(self) -> None:
        super().__init__()
        self.a_rather_long_layer_name_for_the_first_linear_layer = torch.nn.Linear(4, 8)
        self.head_with_a_long_name_that_feeds_the_output = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.a_rather_long_layer_name_for_the_first_linear_layer(x))
        return self.head_with_a_long_name_that_feeds_the_output(hidden)


def _no_work(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the command started its work before checking its output")


CUSTOM = ["--trust", "--input-shape", "3,8,8", "-q"]


def test_compress_refuses_an_extension_that_is_not_what_it_would_write(
    pickled: Path,
    lenet: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cli, "_compress", _no_work)
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "small.safetensors"
    assert main(["compress", str(pickled), *CUSTOM, "--ratio", "0.5", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "small.safetensors" in err and ".pt2" in err
    for name in ("small.onnx", "small", "small.pt"):
        assert (
            main(
                [
                    "compress",
                    str(lenet),
                    "--arch",
                    "lenet-300-100",
                    "--ratio",
                    "0.5",
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 2
        )
        assert ".safetensors or .pt2" in " ".join(capsys.readouterr().err.split())
    assert (
        main(["export", str(lenet), "--arch", "lenet-300-100", "--onnx", str(tmp_path / "m.pt2")]) == 2
    )
    assert ".onnx" in capsys.readouterr().err
    assert main(["train", "lenet-300-100", "--out", str(tmp_path / "w.pt"), "-q"]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before


def test_library_save_writes_what_the_extension_says(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(nm.InvalidArgumentError, match=r"\.pt2"):
        nm.save(model, tmp_path / "m.safetensors", example_inputs=x)
    lenet = create_model("lenet-300-100").eval()
    # A registered architecture may also be written as a torch.export program, which remembers it.
    saved = nm.save(lenet, tmp_path / "lenet.pt2", arch="lenet-300-100")
    assert read_metadata(saved)["arch"] == "lenet-300-100"
    images = torch.randn(3, 1, 28, 28)
    assert torch.allclose(torch.export.load(saved).module()(images), lenet(images), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.pt2"]


def test_every_command_that_reads_a_model_reads_what_compress_wrote(
    pickled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "small.pt2"
    assert main(["compress", str(pickled), *CUSTOM, "--ratio", "0.5", "--out", str(small)]) == 0
    capsys.readouterr()
    # The program remembers its input shape: no --input-shape needed any more.
    assert main(["plan", str(small), "--json"]) == 0
    assert [s["producer"] for s in json.loads(capsys.readouterr().out)["sites"]] == ["conv"]
    assert main(["plan", str(small), "--ratio", "0.5", "--json"]) == 0  # per-layer rows name real layers
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [(row["layer"], row["channels"], row["kept"]) for row in rows] == [
        ("conv", 4, 2),
        ("fc", 4, None),
    ]
    smaller = tmp_path / "smaller.pt2"
    assert main(["compress", str(small), "--ratio", "0.5", "--out", str(smaller), "--json"]) == 0
    assert [(s["producer"], s["kept"]) for s in json.loads(capsys.readouterr().out)["sites"]] == [
        ("conv", 2)
    ]
    x = torch.randn(5, 3, 8, 8)
    assert torch.export.load(smaller).module()(x).shape == (5, 4)
    assert main(["export", str(smaller), "--onnx", str(tmp_path / "smaller.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["onnxruntime_max_abs_diff"] < 1e-4
    assert main(["evaluate", str(small), "--json"]) == 2  # read, but no dataset to measure it on
    assert "--dataset" in capsys.readouterr().err


def test_evaluate_reads_a_registered_model_saved_as_pt2(
    lenet: Path, tmp_path: Path, fashion_mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small.pt2"
    argv = ["compress", str(lenet), "--arch", "lenet-300-100", "--ratio", "0.5", "--out", str(out), "-q"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data-dir", str(fashion_mnist_dir), "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["model"] == "lenet-300-100"
    reference = tmp_path / "small.safetensors"
    assert main([*argv[:-3], "--out", str(reference), "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(reference), "--data-dir", str(fashion_mnist_dir), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert (expected["accuracy"], expected["params"]) == (outcome["accuracy"], outcome["params"])
    assert load_file(str(reference)).keys() == nm.load(reference).state_dict().keys()


def test_json_failure_is_one_object_on_stdout_and_the_message_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.pth")
    assert main(["evaluate", missing, "--arch", "lenet-300-100", "--json"]) == 4
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": f"no such file: {missing}", "exit_code": 4}
    assert "no such file" in captured.err
    # A usage error too: argparse's message, as one JSON object.
    assert main(["compress", missing, "--ratio", "half", "--out", "x.safetensors", "--json"]) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["exit_code"] == 2 and "--ratio" in error["error"] and "--ratio" in captured.err
    assert main(["compress", missing, "--ratio", "0.5", "--out", "x.safetensors"]) == 4
    assert capsys.readouterr().out == ""  # without --json, stdout stays empty


def test_sweep_refuses_existing_outputs_before_any_work(
    lenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuronmerge.lab import sweep as sweeps

    monkeypatch.setattr(sweeps, "sweep", _no_work)
    monkeypatch.setattr(sweeps, "fashion_mnist_eval_data", _no_work)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "sweep.csv").write_text("mine\n")
    argv = ["sweep", "lenet-300-100", "--checkpoint", str(lenet), "--out-dir", str(out_dir), "-q"]
    assert main(argv) == 7
    assert "sweep.csv" in capsys.readouterr().err
    assert (out_dir / "sweep.csv").read_text() == "mine\n"


def test_evaluate_without_a_test_set_reader_is_missing_data_and_still_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "resnet20.pth"
    torch.save(create_model("resnet20").state_dict(), path)
    assert main(["evaluate", str(path), "--arch", "resnet20", "-q"]) == 5
    captured = capsys.readouterr()
    assert "cifar10" in captured.err and "nm.load" in captured.err
    params = count_parameters(create_model("resnet20"))
    assert f"{params:,} parameters" in captured.out
    assert main(["evaluate", str(path), "--arch", "resnet20", "--json"]) == 5
    error = json.loads(capsys.readouterr().out)
    assert error["exit_code"] == 5 and error["params"] == params


# -- one set of options ---------------------------------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


def test_commands_share_one_definition_of_each_option() -> None:
    commands = _commands()
    groups = {
        ("--json", "--quiet", "-q"): set(commands),
        ("--arch", "--trust"): {"compress", "evaluate", "plan", "export"},
        ("--input-shape",): {"compress", "plan", "export"},
        ("--force",): {"compress", "export", "train", "sweep"},
        ("--data-dir",): {"evaluate", "reproduce", "train", "sweep"},
    }
    for names, users in groups.items():
        for command, parser in commands.items():
            assert (set(names) <= _options(parser).keys()) == (command in users), (command, names)
    compress, plan = _options(commands["compress"]), _options(commands["plan"])
    shared = {
        "--ratio",
        "--method",
        "--criterion",
        "--threshold",
        "--lam",
        "--fidelity",
        "--approximate",
    }
    assert shared <= compress.keys() and shared <= plan.keys()
    assert set(compress) - {"--out", "--force"} == set(plan)
    for name in shared - {"--ratio"}:
        a, b = compress[name], plan[name]
        assert (a.choices, a.default, a.type, a.help) == (b.choices, b.default, b.type, b.help), name
    assert "merge-ls" in compress["--method"].choices


def test_plan_takes_merge_ls_like_compress(
    pickled: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # merge-ls's synthetic probes take minutes on 2 cores; what matters here is the CLI's wiring.
    asked: dict[str, object] = {}

    def plan(model: torch.nn.Module, inputs: torch.Tensor, ratio: float, options: nm.Options) -> nm.Plan:
        asked.update(options=options, ratio=ratio)
        return nm.plan(model, inputs)

    monkeypatch.setattr(cli, "_plan", plan)
    argv = [str(pickled), *CUSTOM, "--ratio", "0.5", "--method", "merge-ls", "--threshold", "none"]
    assert main(["plan", *argv]) == 0
    # One validated Options, built by the command line, the same the API builds from these values.
    assert asked == {"ratio": 0.5, "options": nm.Options.of(method="merge-ls", threshold=None)}
    assert asked["options"] == nm.Options(method="merge-ls", threshold=None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lam", "0.5"], "lam applies to fidelity='paper' only"),
        (["--threshold", "2"], "threshold is a cosine similarity in [-1, 1], got 2.0"),
        (["--method", "merge-ls", "--fidelity", "paper"], "method='merge-ls' has no paper fidelity"),
    ],
)
def test_compress_and_plan_refuse_bad_options_with_the_libraries_message(
    lenet: Path, tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command line builds one Options (validated there, as the API does), so the message is the
    # library's own, the exit code that of InvalidArgumentError, and nothing is written.
    out = tmp_path / "small.safetensors"
    model = [str(lenet), "--arch", "lenet-300-100", "--ratio", "0.5", *flags]
    assert main(["compress", *model, "--out", str(out)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()
    assert main(["plan", *model]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_quiet_leaves_only_the_result(
    lenet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quiet silences stderr (progress, notes, warnings) but never the result on stdout."""
    out = tmp_path / "small.safetensors"
    argv = ["compress", str(lenet), "--arch", "lenet-300-100", "--ratio", "0.5", "--out", str(out)]
    assert main([*argv, "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "saved to" in captured.out
    assert main(["export", str(out), "--onnx", str(tmp_path / "s.onnx"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "s.onnx" in captured.out


def _rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in text.splitlines()
        if line.startswith("│")
    ]


def test_piped_tables_are_full_width_with_reasons_in_their_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A layer with a long name whose skip reason is long: at 80 columns both would wrap.
    model = tmp_path / "long.pt"
    torch.save(_Long(), model)
    base = [str(model), "--trust", "--input-shape", "4", "--ratio", "0.5", "-q"]
    assert main(["compress", *base, "--out", str(tmp_path / "l.pt2")]) == 0
    out = capsys.readouterr().out
    header = _rows(out.replace("┃", "│"))[0]
    assert "note" in header
    rows = {row[0]: dict(zip(header, row)) for row in _rows(out)}
    skipped = rows["head_with_a_long_name_that_feeds_the_output"]
    assert skipped["note"] == "skipped: channels are part of the model's output"
    assert skipped["dropped"] == "-"
    assert main(["plan", *base]) == 0
    out = capsys.readouterr().out
    assert "skipped: channels are part of the model's output" in out
    assert "a_rather_long_layer_name_for_the_first_linear_layer" in out
