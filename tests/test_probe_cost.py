"""What synthetic probes cost: sized by the model, stopped early, made once per model, never unneeded."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge import probes
from neuronmerge.capture import capture
from tests.builders import compress_announced


def test_schedule_gives_cheap_models_every_probe_and_heavy_ones_fewer() -> None:
    lenet = probes.schedule(266_200)  # LeNet-300-100's MACs per input
    assert (lenet.count, lenet.steps) == (probes.PROBES, probes.STEPS)
    conv = probes.schedule(5.6e6)  # a Fashion-MNIST conv net
    assert probes.MIN_PROBES <= conv.count < probes.PROBES and conv.steps == probes.STEPS
    plain = probes.schedule(5.6e6, batchnorm=False)  # no statistics to match: every probe
    assert (plain.count, plain.steps) == (probes.PROBES, probes.STEPS)
    huge = probes.schedule(4.1e9)  # ResNet-50 at 224 x 224
    assert huge.count == probes.MIN_PROBES and huge.steps == probes.MIN_STEPS
    for macs in (1e5, 1e6, 1e7, 5e7):  # within budget, unless at the floors
        plan = probes.schedule(macs)
        assert 3 * macs * plan.count * plan.steps <= probes.BUDGET_MACS


def test_a_batch_stops_once_its_loss_stops_falling() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    nm.synthesize_probes(model, torch.randn(2, 6), 32, steps=100, tolerance=1.0)
    assert len(calls) == probes.PATIENCE + 1  # no loss falls by 100% in PATIENCE steps: stop
    calls.clear()
    nm.synthesize_probes(model, torch.randn(2, 6), 32, steps=12, tolerance=0)
    assert len(calls) == 12


def test_merge_ls_makes_no_probes_when_nothing_is_mergeable(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("probes were made for a model with nothing to merge")

    monkeypatch.setattr(probes, "synthesize_probes", refuse)
    # The only layer's outputs are the model's: nothing to merge.
    model = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1)).eval()
    x = torch.randn(2, 4)
    result = compress_announced(model, x, 0.5, method="merge-ls")
    assert result.report.sites == () and torch.equal(result.model(x), model(x))


def test_probes_are_made_once_per_model_and_again_when_it_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probes, "PROBES", 64)
    monkeypatch.setattr(probes, "STEPS", 5)
    monkeypatch.setattr(probes, "_CACHE", OrderedDict())
    made: list[int] = []
    original = probes.synthesize_probes

    def counting(*args: object, **kwargs: object) -> list[tuple[torch.Tensor, ...]]:
        made.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(probes, "synthesize_probes", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 5)
    first = nm.compress(model, x, 0.5, method="merge-ls").model
    second = nm.compress(model, x, 0.75, method="merge-ls").model
    again = nm.compress(model, x, 0.5, method="merge-ls").model
    assert len(made) == 1  # one set of probes for three calls at two ratios
    assert torch.equal(first(x), again(x)) and second.get_submodule("0").out_features == 2
    with torch.no_grad():
        model[0].weight.mul_(2)  # changed in place: its old probes no longer describe it
    nm.compress(model, x, 0.5, method="merge-ls")
    assert len(made) == 2
    assert probes.cached_probes(capture(model, x), x)[0][0].shape == (64, 5)
    assert len(made) == 2
