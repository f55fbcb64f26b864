"""``plan`` with a ratio: the per-layer table of channels, parameters and MACs before and after."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

import neuronmerge as nm
from neuronmerge.cli import main
from neuronmerge.evaluate import count_flops
from neuronmerge.models import create_model
from tests.builders import compress_announced

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lenet-300-100").eval()


def test_plan_without_ratio_is_unchanged(lenet: torch.nn.Module) -> None:
    found = nm.plan(lenet, X)
    assert [s.producer for s in found.sites] == ["ip1", "ip2"]
    assert found.layers == () and found.totals is None


def test_plan_rows_count_channels_parameters_and_macs(lenet: torch.nn.Module) -> None:
    found = nm.plan(lenet, X, 0.6, threshold=None)
    rows = {row.layer: row for row in found.layers}
    assert list(rows) == ["ip1", "ip2", "ip3"]
    ip1, ip2, ip3 = rows.values()
    # threshold None merges every removed neuron: 300 -> 120 kept, 180 merged
    assert (ip1.action, ip1.channels, ip1.kept, ip1.merged, ip1.dropped) == ("merge", 300, 120, 180, 0)
    assert (ip2.channels, ip2.kept, ip2.merged, ip2.dropped) == (100, 40, 60, 0)
    assert (ip1.params_before, ip1.params_after) == (784 * 300 + 300, 784 * 120 + 120)
    assert (ip2.params_before, ip2.params_after) == (300 * 100 + 100, 120 * 40 + 40)
    assert (ip1.macs_before, ip1.macs_after) == (784 * 300, 784 * 120)  # per example
    # ip3 is skipped but still shrinks: it loses the input columns of ip2's removed neurons
    assert (ip3.action, ip3.kept, ip3.reason) == (
        "skip",
        None,
        "channels are part of the model's output",
    )
    assert (ip3.params_before, ip3.params_after, ip3.macs_after) == (1010, 410, 400)

    small = nm.merge(lenet, X, 0.6, threshold=None)
    assert found.totals == nm.planning.Totals(
        params_before=266_610,
        params_after=sum(p.numel() for p in small.parameters()),
        macs_before=count_flops(lenet, X[:1]),
        macs_after=count_flops(small, X[:1]),
    )
    assert found.totals.params_after == sum(r.params_after for r in found.layers)  # LeNet: no BN


def test_plan_rows_follow_method_and_include(lenet: torch.nn.Module) -> None:
    found = nm.plan(lenet, X, 0.5, method="prune", include=["ip2"])
    rows = {row.layer: row for row in found.layers}
    assert [s.producer for s in found.sites] == ["ip2"]
    assert rows["ip1"].action == "skip" and rows["ip1"].reason == "left out by include/exclude"
    assert rows["ip1"].params_after == rows["ip1"].params_before
    assert (rows["ip2"].action, rows["ip2"].kept, rows["ip2"].merged, rows["ip2"].dropped) == (
        "prune",
        50,
        0,
        50,
    )
    assert "MACs per example" in str(found)


def test_cli_plan_table_and_json_agree(
    lenet: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "lenet.pth"
    torch.save(lenet.state_dict(), checkpoint)
    argv = ["plan", str(checkpoint), "--arch", "lenet-300-100", "--ratio", "0.6", "--threshold", "none"]
    assert main([*argv, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    expected = nm.plan(lenet, X, 0.6, threshold=None)  # the table does not depend on inputs
    assert payload["layers"] == [dataclasses.asdict(row) for row in expected.layers]
    assert payload["totals"] == dataclasses.asdict(expected.totals)  # type: ignore[arg-type]
    assert payload["settings"]["ratio"] == 0.6 and payload["settings"]["threshold"] is None

    assert main(argv) == 0
    table = capsys.readouterr().out
    for text in ("ip1", "300 -> 120", "skipped: channels are part of the model's output", "whole model"):
        assert text in table
    assert "267k -> 99.5k" in table  # 266,610 -> 99,450 parameters, rounded for people

    assert main([*argv[:4], "--ratio", "1.0"]) == 2
    assert "ratio must be in [0, 1)" in capsys.readouterr().err
    assert main([*argv[:4], "--criterion", "l2-norm", "--fidelity", "paper"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--criterion, --fidelity take effect only with --ratio" in err


class _Gelu(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_approximate_plan_carries_the_output_error() -> None:
    torch.manual_seed(0)
    model, x = _Gelu().eval(), torch.randn(16, 6)
    exact = nm.plan(model, x, 0.5)
    assert exact.output_error is None and [r.action for r in exact.layers] == ["skip", "skip"]
    approx = nm.plan(model, x, 0.5, approximate=True)
    assert [(r.layer, r.action, r.kept) for r in approx.layers] == [
        ("fc1", "merge", 4),
        ("fc2", "skip", None),
    ]
    report = compress_announced(model, x, 0.5, approximate=True).report
    assert approx.output_error == report.output_error and 0 < report.output_error < 10


def test_plan_shows_skips_in_its_rows_and_does_not_also_warn() -> None:
    """compress warns about a shortfall and points at plan; plan itself lists every layer and why."""
    torch.manual_seed(0)
    model, x = _Gelu().eval(), torch.randn(16, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = nm.plan(model, x, 0.5)
    assert not [w for w in caught if issubclass(w.category, nm.CompressionWarning)]
    assert [(r.layer, r.action) for r in found.layers] == [("fc1", "skip"), ("fc2", "skip")]
    assert "not positively homogeneous" in {s.producer: s.reason for s in found.skipped}["fc1"]
    with pytest.warns(nm.CompressionWarning, match="no layer could be compressed .* see nm.plan"):
        nm.compress(model, x, 0.5)
