"""No silent no-ops and no silent changes (issue 15, item 5): ``compress`` warns when it could apply
nothing or only part of the requested ratio, and when it was given a model in training mode."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge.cli import main
from neuronmerge.evaluate import count_parameters


def _mlp(activation: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), activation, nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


X = torch.randn(3, 4)


def test_nothing_applied_warns_and_names_plan() -> None:
    with pytest.warns(nm.CompressionWarning, match=r"no layer could be compressed.*plan") as caught:
        small = nm.merge(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).eval(), X, 0.5)
    assert len(caught) == 1
    assert count_parameters(small) == 4 * 8 + 8 + 8 * 2 + 2  # the same size, as the warning says


def test_part_applied_warns_with_the_skipped_layers() -> None:
    model = _mlp(nn.GELU())  # the first layer feeds a GELU: skipped; the second merges
    with pytest.warns(nm.CompressionWarning, match=r"1 of 2 layers.*\b0\b.*plan") as caught:
        result = nm.compress(model, X, 0.5)
    assert len(caught) == 1
    assert [site.producer for site in result.report.sites] == ["2"]


def test_full_application_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the output layer and include/exclude are no reason to warn
        nm.merge(_mlp(nn.ReLU()), X, 0.5)
        nm.merge(_mlp(nn.ReLU()), X, 0.5, include=["0"])


def test_training_mode_input_warns_and_is_left_in_its_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    with pytest.warns(nm.CompressionWarning, match=r"training mode.*eval\(\)") as caught:
        small = nm.merge(model, X, 0.5)
    assert len(caught) == 1
    assert model.training and all(m.training for m in model.modules())  # the caller's model is as it was
    assert not small.training  # the result computes the inference function
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nm.merge(model, X, 0.5)


def test_cli_prints_the_warning_once_unless_quiet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    pickled = tmp_path / "gelu.pt"
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).eval(), pickled)
    argv = ["compress", str(pickled), "--trust", "--input-shape", "4", "--ratio", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "a.pt2")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("no layer could be compressed") == 1 and "neuronmerge plan" in err
    assert "--approximate" in err
    assert main([*argv, "--out", str(tmp_path / "b.pt2"), "-q"]) == 0
    assert capsys.readouterr().err == ""
