"""Weights computed in the forward from parameters alone (timm's ``StdConv2d`` and ``ScaledStdConv2d``
standardise each output row on every call) are stored at capture, so those layers merge like any
other: planted duplicates merge exactly, on the producer side and where such a layer reads the
merged channels. A weight that changes with the input, or whose parameters another computation
reads too, stays named with its reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronmerge as nm
from neuronmerge.capture import capture
from neuronmerge.criteria import kept_count
from tests.builders import compress_announced

pytestmark = pytest.mark.usefixtures("single_thread")

RATIO = 0.5
UNSTORABLE = (
    "its weight is computed in the forward from {}, and that cannot be stored as the layer's own "
    "constant (tensors other computations read too, or a random or in-place op): no parameter to "
    "resize"
)


class StdConv(nn.Conv2d):
    """timm's ``StdConv2d``: each output row of the weight standardised on every call, no bias."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(rows, None, None, training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding)


class ScaledStdConv(nn.Conv2d):
    """timm's ``ScaledStdConv2d``: standardised rows times a learned gain and the fan-in scale."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(0.5 + torch.rand(cout, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


def standardised(kind: str, cin: int, cout: int) -> nn.Module:
    """BiT's layer (``"std"``: a ``StdConv2d``, here followed by a BatchNorm, which gives each channel
    its scale) or NFNet's (``"scaled"``: a ``ScaledStdConv2d``, whose gain does)."""
    if kind == "std":
        return nn.Sequential(StdConv(cin, cout), nn.BatchNorm2d(cout))
    return ScaledStdConv(cin, cout)


class Chain(nn.Module):
    """conv -> ReLU -> standardised conv -> ReLU -> head: a plain producer whose consumer
    standardises over the merged channels, then a standardised producer."""

    def __init__(self, kind: str, widths: tuple[int, int] = (8, 6)) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, widths[0], 3, padding=1)
        self.b = standardised(kind, *widths)
        self.head = nn.Linear(widths[1], 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


class Residual(nn.Module):
    """A standardised stem writing a residual stream that a standardised block adds into."""

    def __init__(self, kind: str, widths: tuple[int, int] = (8, 6)) -> None:
        super().__init__()
        stream, inner = widths
        self.stem = standardised(kind, 3, stream)
        self.conv1, self.conv2 = standardised(kind, stream, inner), standardised(kind, inner, stream)
        self.head = nn.Linear(stream, 4)
        self.skip_gain = nn.Parameter(torch.tensor(0.7))  # NFNet's skipinit_gain: one scalar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        s = torch.relu(s + self.conv2(torch.relu(self.conv1(s))) * self.skip_gain)
        return self.head(s.mean((2, 3)))


def _plant(layer: nn.Module, scale: torch.Tensor, generator: torch.Generator) -> int:
    """Make the last channels of ``layer`` compute ``scale`` (at most 0.6) times its first ones, as
    its effective (computed) weight sees them, and give the first ones norm-criterion scores of
    at least 1, so that the duplicates are the channels to merge; return how many are kept."""
    conv, norm = (layer[0], layer[1]) if isinstance(layer, nn.Sequential) else (layer, None)
    assert isinstance(conv, nn.Conv2d)
    keep = kept_count(conv.out_channels, RATIO)
    source = torch.arange(conv.out_channels - keep) % keep
    factor = scale[: len(source)]
    size = 1 + 0.5 * torch.rand(keep, generator=generator, dtype=torch.float64)
    column = factor.view(-1, 1, 1, 1)
    with torch.no_grad():
        if isinstance(conv, StdConv):  # the standardisation divides any row scale out: copy rows
            assert isinstance(norm, nn.BatchNorm2d)
            norm.running_mean.normal_(0, 0.1, generator=generator)
            norm.running_var.fill_(1.0)
            norm.bias.normal_(0, 0.01, generator=generator)
            norm.weight[:keep] = size / conv.weight[0].numel() ** 0.5
            conv.weight[keep:] = conv.weight[source]
            for stat in (norm.running_mean, norm.running_var):
                stat[keep:] = stat[source]
            norm.weight[keep:] = factor * norm.weight[source]
            norm.bias[keep:] = factor * norm.bias[source]
        elif isinstance(conv, ScaledStdConv):
            conv.gain[:keep] = size.view(-1, 1, 1, 1)
            conv.weight[keep:] = conv.weight[source]
            conv.gain[keep:] = column * conv.gain[source]
        else:
            rows = conv.weight[:keep]
            rows *= size.view(-1, 1, 1, 1) / rows.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            conv.weight[keep:] = column * conv.weight[source]
        if conv.bias is not None:
            conv.bias[keep:] = factor * conv.bias[source]
    return keep


def _planted(structure: str, kind: str) -> tuple[nn.Module, dict[str, int], nn.Module]:
    """The model in float64 with duplicates planted in every group, the kept count per group (by
    producer name), and the same architecture built at the kept widths."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)

    def scales(n: int) -> torch.Tensor:
        return 0.3 + 0.3 * torch.rand(n, generator=generator, dtype=torch.float64)

    conv = ".0" if kind == "std" else ""
    if structure == "chain":
        chain = Chain(kind).double().eval()
        kept = {"a": _plant(chain.a, scales(8), generator)}
        kept[f"b{conv}"] = _plant(chain.b, scales(6), generator)
        return chain, kept, Chain(kind, (kept["a"], kept[f"b{conv}"]))
    residual = Residual(kind).double().eval()
    stream = scales(8)  # every layer writing the stream duplicates alike
    kept = {f"stem{conv}": _plant(residual.stem, stream, generator)}
    kept[f"conv1{conv}"] = _plant(residual.conv1, scales(6), generator)
    _plant(residual.conv2, stream, generator)
    return residual, kept, Residual(kind, tuple(kept.values()))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["std", "scaled"])
@pytest.mark.parametrize("structure", ["chain", "residual"])
def test_standardised_layers_merge_planted_duplicates_exactly(structure: str, kind: str) -> None:
    model, kept, narrow = _planted(structure, kind)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    found = nm.plan(model, x)
    assert {s.producer: s.mode for s in found.sites} == dict.fromkeys(kept, "exact")
    assert [s.producer for s in found.skipped] == ["head"]  # the output layer, nothing computed

    result = compress_announced(model, x, RATIO, criterion="l2-norm", threshold=None)
    assert {s.producer: s.kept for s in result.report.sites} == kept
    # As many parameters as the architecture built at the kept widths, less the gains (folded).
    expected = sum(p.numel() for n, p in narrow.named_parameters() if not n.endswith(".gain"))
    assert sum(p.numel() for p in result.model.parameters()) == expected
    check = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(result.model(check), model(check), rtol=1e-9, atol=1e-10)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [type(m) for m in model.modules()] == classes


def test_capture_stores_the_computed_weight_without_touching_the_model() -> None:
    model = Chain("scaled").double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    raw = model.b.weight.detach().clone()
    gm = capture(model, x)
    layer = gm.get_submodule("b")
    assert type(layer) is nn.Conv2d and set(dict(layer.named_parameters())) == {"weight", "bias"}
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-12, atol=1e-12)
        rows = layer.weight.reshape(6, -1)
        gain = (model.b.gain * model.b.scale).reshape(6, 1)
        assert torch.allclose(rows.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(rows.var(1, unbiased=False), gain.squeeze(1) ** 2, rtol=1e-3)  # eps
    assert layer.weight.requires_grad and layer.bias is model.b.bias
    assert torch.equal(model.b.weight, raw) and model.b.weight is not layer.weight
    assert isinstance(model.b, ScaledStdConv) and "b.gain" in model.state_dict()


def test_folding_applies_to_a_torch_export_capture_too() -> None:
    """A Python decision on a shape makes fx fail; torch.export's ATen graph is folded the same."""

    class Branching(Chain):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] > 8:
                x = F.avg_pool2d(x, 2)
            # Padded as NFNet's "same" convs pad: an ``aten.pad`` in export's graph.
            y = F.pad(torch.relu(self.a(x)), (1, 1, 1, 1))
            return self.head(torch.relu(self.b(y)).mean((2, 3)))

    model, kept, _ = _planted("chain", "scaled")
    model.__class__ = Branching
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    pads = [n for n in capture(model, x).graph.nodes if n.target is torch.ops.aten.pad.default]
    assert len(pads) == 1
    result = compress_announced(model, x, RATIO, criterion="l2-norm", threshold=None)
    assert {s.producer: s.kept for s in result.report.sites} == kept
    check = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(result.model(check), model(check), rtol=1e-9, atol=1e-10)


class WeightNormed(nn.Module):
    """A linear layer weight-normalised in its forward (no ``weight`` parameter at all): each row
    is ``g_i * v_i / |v_i|``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(cout, cin))
        self.g = nn.Parameter(1 + 0.5 * torch.rand(cout, 1))
        self.bias = nn.Parameter(0.1 * torch.randn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.g * self.v / self.v.norm(dim=1, keepdim=True), self.bias)


def test_a_linear_layer_weight_normalised_in_its_forward_merges_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(WeightNormed(5, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    layer = model[0]
    assert isinstance(layer, WeightNormed)
    with torch.no_grad():  # rows 5..7 are 0.4 times rows 0..2, whatever the norm of their v
        layer.v[5:] = 3.0 * layer.v[:3]
        layer.g[5:] = 0.4 * layer.g[:3]
        layer.bias[5:] = 0.4 * layer.bias[:3]
    x = torch.randn(4, 5, dtype=torch.float64)
    assert [(s.producer, s.mode) for s in nm.plan(model, x).sites] == [("0", "exact")]
    result = compress_announced(model, x, 3 / 8, criterion="l2-norm", threshold=None)
    small = result.model.get_submodule("0")
    assert type(small) is nn.Linear and small.weight.shape == (5, 5)
    check = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(result.model(check), model(check), rtol=1e-9, atol=1e-10)
    assert set(dict(model.named_parameters())) == {"0.v", "0.g", "0.bias", "2.weight", "2.bias"}


class Modulated(nn.Conv2d):
    """A weight that depends on the input (StyleGAN-like modulation): no constant to store."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * x.mean(), self.bias, self.stride, self.padding)


class Noisy(nn.Conv2d):
    """A weight with noise drawn on every call: folding would freeze one draw."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 0.01 * torch.randn_like(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class SharedStd(nn.Module):
    """One standardised layer applied twice: its raw weight feeds two computations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.std, self.head = nn.Conv2d(3, 4, 3, padding=1), StdConv(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.std(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.std(y)).mean((2, 3)))


def test_weights_that_cannot_be_stored_stay_named_with_their_reason() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dyn = Modulated(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(torch.relu(self.dyn(x)))).mean((2, 3)))

    x = torch.randn(2, 3, 8, 8)
    dynamic = Dynamic().eval()
    reasons = {s.producer: s.reason for s in nm.plan(dynamic, x).skipped}
    assert reasons["dyn"] == (
        "its weight is computed in the forward from dyn.weight and the input (a new weight for "
        "every input): no parameter to resize"
    )
    result = compress_announced(dynamic, x, RATIO)
    assert [s.producer for s in result.report.sites] == ["conv"]
    assert torch.equal(result.model.dyn.weight, dynamic.dyn.weight)

    shared = SharedStd().eval()
    found = nm.plan(shared, x)
    assert {s.producer: s.reason for s in found.skipped}["std"] == UNSTORABLE.format("std.weight")
    assert not found.sites  # the stem's channels reach the unmerged call, which nothing passes

    noisy = nn.Sequential(Noisy(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    assert {s.producer: s.reason for s in nm.plan(noisy, x).skipped}["0"] == UNSTORABLE.format(
        "0.weight"
    )
