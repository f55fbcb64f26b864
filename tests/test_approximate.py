"""``approximate=True``: merging through activations that are not positively homogeneous."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge.cli import main
from tests.builders import duplicate_rows, set_linear


class ActMLP(nn.Module):
    """Linear -> act -> Linear -> act -> Linear, the activation chosen by the test."""

    def __init__(self, act: nn.Module, widths: tuple[int, int, int] = (6, 10, 8)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(widths[0], widths[1])
        self.fc2 = nn.Linear(widths[1], widths[2])
        self.head = nn.Linear(widths[2], 3)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def with_duplicates(act: nn.Module, seed: int = 0) -> ActMLP:
    """Hidden layers of 5 + 5 and 4 + 4 neurons: each duplicate a positive multiple of a base one."""
    torch.manual_seed(seed)  # the head's default initialisation
    generator = torch.Generator().manual_seed(seed)
    model = ActMLP(act).double()
    for layer, base in ((model.fc1, 5), (model.fc2, 4)):
        rows, _, _ = duplicate_rows(base, base, layer.in_features + 1, "l1-norm", generator)
        set_linear(layer, rows)
    return model.eval()


def test_non_homogeneous_activations_are_refused_unless_approximate() -> None:
    model = with_duplicates(nn.GELU())
    x = torch.randn(4, 6, dtype=torch.float64)
    assert nm.plan(model, x).sites == ()
    reasons = {skip.producer: skip.reason for skip in nm.plan(model, x).skipped}
    assert reasons["fc1"].startswith("act (GELU) is not positively homogeneous")
    assert "approximate=True" in reasons["fc1"]
    planned = nm.plan(model, x, approximate=True)
    assert [(s.producer, s.approximate_through) for s in planned.sites] == [
        ("fc1", ("act (GELU)",)),
        ("fc2", ("act (GELU)",)),
    ]
    assert "approximate through act (GELU)" in str(planned)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Tanh(), nn.ELU()], ids=type)
def test_approximate_merge_is_the_relu_merge_with_a_measured_error(act: nn.Module) -> None:
    """The decomposition depends on the weights only: the approximate merge of a GELU (SiLU, ...)
    network has exactly the weights of the exact merge of the same network with ReLU, and its report
    gives the true relative output change."""
    relu_model, model = with_duplicates(nn.ReLU()), with_duplicates(act)
    x = torch.randn(64, 6, dtype=torch.float64)
    exact = nm.compress(relu_model, x, 0.5, threshold=None)
    assert torch.allclose(exact.model(x), relu_model(x), rtol=1e-9, atol=1e-10)
    assert exact.report.output_error is None

    result = nm.compress(model, x, 0.5, threshold=None, approximate=True)
    small_state, exact_state = result.model.state_dict(), exact.model.state_dict()
    assert small_state.keys() == exact_state.keys()
    assert all(torch.equal(small_state[k], exact_state[k]) for k in small_state)
    assert [(s.producer, s.kept, s.merged) for s in result.report.sites] == [
        ("fc1", 5, 5),
        ("fc2", 4, 4),
    ]
    assert result.report.approximate
    with torch.no_grad():
        want, got = model(x), result.model(x)
    measured = float((got - want).norm() / want.norm())
    assert result.report.output_error == pytest.approx(measured, rel=1e-9)
    # The duplicates are scaled by 0.05-0.3, far from where these activations are homogeneous.
    assert measured > 1e-3
    assert result.report.params_after < result.report.params_before


def test_channel_mixing_ops_stay_refused_when_approximating() -> None:
    class SoftmaxMid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(nn.functional.softmax(self.fc1(x), dim=1))

    class SoftmaxModule(SoftmaxMid):
        def __init__(self) -> None:
            super().__init__()
            self.soft = nn.Softmax(dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.soft(self.fc1(x)))

    x = torch.randn(2, 4)
    functional = nm.plan(SoftmaxMid(), x, approximate=True)
    assert functional.sites == ()
    assert functional.skipped[0].reason == "channels reach softmax, which merging cannot pass through"
    module = nm.plan(SoftmaxModule(), x, approximate=True)
    assert module.skipped[0].reason == "soft (Softmax) mixes the channels"


class _GeluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.gelu(self.conv(x)).flatten(1))


def test_cli_approximate_reports_the_output_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    pickled, out = tmp_path / "gelu.pt", tmp_path / "small.pt2"
    torch.save(_GeluNet(), pickled)
    common = ["--trust", "--input-shape", "3,8,8", "-q"]
    argv = ["compress", str(pickled), "--ratio", "0.5", "--out", str(out), *common]
    assert main([*argv[:-1], "--json"]) == 0
    warning = capsys.readouterr().err
    assert "no layer could be compressed" in warning
    assert "followed by non-homogeneous activations" in warning and "--approximate" in warning
    assert main([*argv, "--approximate", "--json", "--force"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["approximate"] is True
    assert 0 < report["output_error"] < 10
    assert [(s["producer"], s["kept"], s["approximate_through"]) for s in report["sites"]] == [
        ("conv", 4, ["gelu"])
    ]
    assert main(["plan", str(pickled), *common, "--approximate", "--json"]) == 0
    assert [s["producer"] for s in json.loads(capsys.readouterr().out)["sites"]] == ["conv"]
    assert main([*argv[:-1], "--approximate", "--force"]) == 0
    assert "output changed by" in capsys.readouterr().out


def test_every_smooth_activation_form_is_approximated() -> None:
    """Module, function and method forms of GELU, SiLU, tanh and ReLU6 all pass when approximating."""
    from tests.test_zoo import Smooth

    found = nm.plan(Smooth(), torch.randn(2, 4), approximate=True)
    assert {s.producer: s.approximate_through for s in found.sites} == {
        "fc.0": ("gelu (GELU)",),
        "fc.1": ("silu (SiLU)",),
        "fc.2": ("tanh",),
        "fc.3": ("tanh (Tanh)",),
        "fc.4": ("silu",),
        "fc.5": ("relu6 (ReLU6)",),
        "fc.6": (),
    }
    small = nm.merge(Smooth().eval(), torch.randn(2, 4), 0.5, approximate=True)
    assert [small.get_submodule(f"fc.{i}").out_features for i in range(8)] == [2] * 7 + [4]
