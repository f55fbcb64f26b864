"""Capture through torch.export where torch.fx cannot trace: the same sites, the same exact merges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import neuronmerge as nm
from neuronmerge.capture import capture
from neuronmerge.criteria import kept_count
from neuronmerge.exported import export_graph, lift
from tests.builders import ConvNet, duplicated_convnet


class ShapeBranch(ConvNet):
    """A ConvNet that halves large inputs first: a Python decision on a shape, which fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = F.avg_pool2d(x, 2)
        return super().forward(x)


def shape_branch(ratio: float) -> tuple[ShapeBranch, tuple[int, ...]]:
    bases = tuple(kept_count(w, ratio) for w in (8, 6, 10))
    model = duplicated_convnet(list(bases), [w - b for w, b in zip((8, 6, 10), bases)], "l1-norm", 3)
    model.__class__ = ShapeBranch
    return model, bases


def test_fx_fails_and_export_captures_module_calls() -> None:
    model, _ = shape_branch(0.5)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    gm = capture(model, x)
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    assert calls == ["conv1", "bn1", "conv2", "bn2", "fc1", "fc2"]  # the pool is an ATen call
    assert isinstance(gm.get_submodule("bn1"), nn.BatchNorm2d)
    assert gm.get_submodule("conv1").weight is model.conv1.weight  # lifted, not copied
    assert torch.equal(gm(x), model(x))


def test_exported_model_merges_duplicates_exactly_at_any_batch_size(tmp_path: Path) -> None:
    ratio = 0.5
    model, bases = shape_branch(ratio)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    result = nm.compress(model, x, ratio, threshold=None)
    assert [(s.producer, s.kept) for s in result.report.sites] == [
        ("conv1", bases[0]),
        ("conv2", bases[1]),
        ("fc1", bases[2]),
    ]
    small = result.model
    batch = torch.randn(7, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(small(batch), model(batch), rtol=1e-9, atol=1e-10)
    assert small.get_submodule("fc1").in_features == bases[1] * 16
    assert result.report.params_after < result.report.params_before
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    saved = nm.save(small, tmp_path / "small.pt2", example_inputs=x)
    assert torch.allclose(nm.load(saved)(batch), small(batch))


def test_residual_stream_of_the_input_in_aten_form_is_refused() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 0:  # untraceable for fx
                x = torch.relu(self.a(x)) + x
            return self.head(F.relu(self.b(x)))

    found = nm.plan(Residual(), torch.randn(3, 4))
    assert [s.producer for s in found.sites] == ["b"]
    assert {s.producer: s.reason for s in found.skipped}[
        "a"
    ] == "the channels come from the model input x, which cannot lose any"


def test_lift_leaves_layers_with_computed_weights_as_aten_calls() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(F.linear(x, 2 * self.fc1.weight, self.fc1.bias)))

    x = torch.randn(3, 4)
    gm = lift(export_graph(Scaled().eval(), (x,)))
    linear = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linear) == 1  # fc1's weight is computed, so that call stays as it is
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"] == [
        "fc2"
    ]


def test_a_model_loaded_from_a_torch_export_archive_merges(tmp_path: Path) -> None:
    """Its layers are ATen calls and it refuses ``.train()``: capture lifts them all the same."""
    ratio = 0.5
    model, bases = shape_branch(ratio)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    archived = nm.load(nm.save(model, tmp_path / "model.pt2", example_inputs=x))
    assert archived.eval() is archived  # fixed in inference mode: eval() is a no-op...
    with pytest.raises(NotImplementedError, match="fixed in inference mode"):
        archived.train()  # ... and training mode impossible
    small = nm.merge(archived, x, ratio, threshold=None)
    assert [small.get_submodule(n).weight.shape[0] for n in ("conv1", "conv2", "fc1")] == list(bases)
    batch = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(small(batch), model(batch), rtol=1e-9, atol=1e-10)
