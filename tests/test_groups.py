"""Every group kind merges planted exact duplicates exactly, and ends at the expected size.

Each model below holds one kind of coupled channels (a residual stream, a depthwise block, a
BatchNorm after the activation, a concatenation read by a BatchNorm, a gated MLP, a squared-ReLU
transformer MLP, LayerScale, a squeeze-excitation gate). Duplicates are planted by hand: removed
channel ``i`` computes ``s_i`` times its source channel at the producers, and every per-channel
parameter on the way is chosen so that the duplicate survives to the consumers (or is random where
the math says any value works: a BatchNorm right before the readers, LayerScale). Merging must then
reproduce the model (relative error <= 1e-5 in float64; pruning the same channels must not), and the
result must have exactly the parameters of the same architecture built at the kept widths.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronmerge as nm
from neuronmerge.criteria import kept_count
from tests.builders import set_conv_bn, set_rows

pytestmark = pytest.mark.usefixtures("single_thread")

RATIO = 0.5
CRITERION = "l2-norm"


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Planted:
    """Duplicates for ``n`` channels: ``base`` distinct ones, the rest ``scale`` times a ``source``;
    ``perm`` shuffles them (position ``p`` holds planted row ``perm[p]``)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.base = kept_count(n, RATIO)
        self.perm = torch.randperm(n, generator=generator)
        self.source = torch.randint(0, self.base, (n - self.base,), generator=generator)
        self.scale = 0.05 + 0.25 * torch.rand(n - self.base, generator=generator, dtype=torch.float64)
        # Position of each channel's partner and the channel's scale, in shuffled order.
        where = torch.empty(n, dtype=torch.long)
        where[self.perm] = torch.arange(n)
        unshuffled = torch.cat([torch.arange(self.base), self.source])
        factor = torch.cat([torch.ones(self.base, dtype=torch.float64), self.scale])
        self.partner = where[unshuffled[self.perm]]
        self.factor = factor[self.perm]

    def rows(self, width: int, scale_one: bool = False) -> torch.Tensor:
        """Shuffled rows of ``width``: base rows of norm in [1, 1.2], duplicates scaled copies."""
        rows = torch.randn(self.base, width, generator=self.generator, dtype=torch.float64)
        rows = (
            rows
            / rows.norm(dim=1, keepdim=True)
            * (1 + 0.2 * torch.rand(self.base, 1, generator=self.generator, dtype=torch.float64))
        )
        scale = torch.ones_like(self.scale) if scale_one else self.scale
        return torch.cat([rows, scale[:, None] * rows[self.source]])[self.perm]

    def consistent(self, values: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``values`` with each duplicate's entry ``factor * (its partner's entry)``."""
        out = values.clone()
        dup = self.partner != torch.arange(self.n)
        scale = factor[dup].view(-1, *([1] * (values.dim() - 1)))
        out[dup] = scale * values[self.partner[dup]]
        return out


def plant_layer(layer: nn.Module, planted: Planted, bn: nn.Module | None = None, **kw: bool) -> None:
    """Rows ``[w | b]`` of ``layer`` (folded with ``bn``) from ``planted``."""
    assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
    width = layer.weight[0].numel() + int(layer.bias is not None or bn is not None)
    rows = planted.rows(width, **kw)
    if bn is None:
        set_rows(layer, rows)
    else:
        set_conv_bn(layer, bn, rows, planted.generator)  # type: ignore[arg-type]


def set_affine(bn: nn.modules.batchnorm._BatchNorm, a: torch.Tensor, c: torch.Tensor) -> None:
    """BatchNorm parameters computing ``a x + c`` per channel (random running statistics)."""
    n = a.shape[0]
    mean = torch.randn(n, dtype=torch.float64)
    var = 0.5 + torch.rand(n, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(a * torch.sqrt(var + bn.eps))
        bn.bias.copy_(c + a * mean)


def check_exact(
    model: nn.Module, x: torch.Tensor, small_model: Callable[[], nn.Module], groups: list[set[str]]
) -> nm.Result:
    """Merge ``model`` (duplicates planted): exact, and the size of ``small_model()``."""
    found = nm.plan(model, x)
    assert [set(g.producers) for g in found.sites] == groups, found
    result = nm.compress(model, x, RATIO, criterion=CRITERION, threshold=None)
    with torch.no_grad():
        expected, got = model(x), result.model(x)
        pruned = nm.prune(model, x, RATIO, criterion=CRITERION)(x)
    error = float((got - expected).norm() / expected.norm())
    assert error <= 1e-5, error
    assert float((pruned - expected).norm() / expected.norm()) > 1e-3, "vacuous: pruning is exact"
    assert params(result.model) == result.report.params_after == params(small_model())
    assert all(s.dropped == 0 for s in result.report.sites)
    return result


# ---------------------------------------------------------------------------------------------


class ResidualNet(nn.Module):
    """A post-activation residual block: the stem and conv2 write one stream."""

    def __init__(self, c: int = 6, inner: int = 5) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(s)))
        s = F.relu(self.bn2(self.conv2(h)) + s)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(s, 1), 1))


def test_residual_stream_merges_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    model = ResidualNet().double().eval()
    stream, inner = Planted(6, g), Planted(5, g)
    plant_layer(model.stem, stream, model.bn0)
    plant_layer(model.conv2, stream, model.bn2)
    plant_layer(model.conv1, inner, model.bn1)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=g)
    small = lambda: ResidualNet(3, kept_count(5, RATIO))  # noqa: E731
    result = check_exact(model, x, small, [{"stem", "conv2"}, {"conv1"}])
    stream_report = result.report.sites[0]
    assert stream_report.producers == ("stem", "conv2") and stream_report.merged == 3


class DepthwiseNet(nn.Module):
    """pointwise -> BN -> ReLU -> depthwise -> BN -> ReLU -> pointwise (a MobileNet block)."""

    def __init__(self, c: int = 8, out: int = 6) -> None:
        super().__init__()
        self.pw1, self.bn1 = nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c)
        self.dw, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.pw2 = nn.Conv2d(c, out, 1)
        self.head = nn.Linear(out, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.pw1(x)))
        h = F.relu(self.bn2(self.dw(h)))
        h = F.relu(self.pw2(h))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_depthwise_block_merges_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    model = DepthwiseNet().double().eval()
    first, second = Planted(8, g), Planted(6, g)
    plant_layer(model.pw1, first, model.bn1)
    plant_layer(model.pw2, second)
    # Depthwise kernels: a duplicate's kernel is r times its partner's; then the BatchNorm after it
    # must keep the constant proportional: c_i = (s_i r_i a_i / a_j) c_j.
    r = 0.5 + torch.rand(8, generator=g, dtype=torch.float64)
    kernels = torch.randn(8, 9, generator=g, dtype=torch.float64)
    kernels = first.consistent(kernels, r)
    with torch.no_grad():
        model.dw.weight.copy_(kernels.view(8, 1, 3, 3))
    a = 0.5 + torch.rand(8, generator=g, dtype=torch.float64)
    c = torch.randn(8, generator=g, dtype=torch.float64)
    dup = first.partner != torch.arange(8)
    c[dup] = (first.factor * r * a / a[first.partner])[dup] * c[first.partner[dup]]
    set_affine(model.bn2, a, c)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g)
    check_exact(model, x, lambda: DepthwiseNet(4, 3), [{"pw1"}, {"pw2"}])


class PostActivationNorm(nn.Module):
    """Linear -> ReLU -> BatchNorm -> Linear: the norm after the activation."""

    def __init__(self, hidden: int = 10) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(7, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bn(F.relu(self.fc1(x))))


def test_batchnorm_after_the_activation_merges_exactly_whatever_its_parameters() -> None:
    g = torch.Generator().manual_seed(2)
    model = PostActivationNorm().double().eval()
    plant_layer(model.fc1, Planted(10, g))
    set_affine(
        model.bn,
        torch.randn(10, generator=g, dtype=torch.float64),
        torch.randn(10, generator=g, dtype=torch.float64),
    )
    x = torch.randn(16, 7, dtype=torch.float64, generator=g)
    check_exact(model, x, lambda: PostActivationNorm(5), [{"fc1"}])


class ConcatNorm(nn.Module):
    """A DenseNet layer: cat([x0, conv_a(x0)]) -> BatchNorm -> ReLU -> conv_c."""

    def __init__(self, c0: int = 6, ca: int = 4, out: int = 5) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0)
        self.conv_a = nn.Conv2d(c0, ca, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c0 + ca)
        self.conv_c = nn.Conv2d(c0 + ca, out, 1)
        self.head = nn.Linear(out, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn(torch.cat([x0, self.conv_a(x0)], 1)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.conv_c(y), 1), 1))


def test_concatenation_read_by_a_batchnorm_merges_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    model = ConcatNorm().double().eval()
    stem, branch = Planted(6, g), Planted(4, g)
    plant_layer(model.stem, stem, model.bn0)
    plant_layer(model.conv_a, branch)
    a = 0.5 + torch.rand(10, generator=g, dtype=torch.float64)
    c = torch.randn(10, generator=g, dtype=torch.float64)
    for planted, span in ((stem, slice(0, 6)), (branch, slice(6, 10))):
        part_a, part_c = a[span], c[span].clone()
        dup = planted.partner != torch.arange(planted.n)
        ratio = planted.factor * part_a / part_a[planted.partner]
        part_c[dup] = ratio[dup] * part_c[planted.partner[dup]]
        c[span] = part_c
    set_affine(model.bn, a, c)
    plant_layer(model.conv_c, Planted(5, g))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g)
    small = lambda: ConcatNorm(3, 2, kept_count(5, RATIO))  # noqa: E731
    result = check_exact(model, x, small, [{"stem"}, {"conv_a"}, {"conv_c"}])
    assert result.model.bn.num_features == 5


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` on (batch, tokens, channels)."""

    def __init__(self, hidden: int = 10) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(8, hidden, bias=False), nn.Linear(8, hidden, bias=False)
        self.down = nn.Linear(hidden, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_gated_mlp_merges_exactly() -> None:
    g = torch.Generator().manual_seed(4)
    model = GatedMLP().double().eval()
    planted = Planted(10, g)
    plant_layer(model.gate, planted, scale_one=True)  # equal gate rows ...
    plant_layer(model.up, planted)  # ... and up rows in ratio s
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)
    result = check_exact(model, x, lambda: GatedMLP(5), [{"gate", "up"}])
    assert result.sites[0].pattern == "gated" and result.sites[0].mode == "exact"


class SquaredReLU(nn.Module):
    """A transformer MLP with squared ReLU, written with ``**`` or ``torch.square``."""

    def __init__(self, hidden: int = 12, square: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.square = nn.Linear(8, hidden), nn.Linear(hidden, 8), square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(torch.square(h) if self.square else h**2)


@pytest.mark.parametrize("square", [False, True])
def test_squared_relu_transformer_mlp_merges_exactly(square: bool) -> None:
    g = torch.Generator().manual_seed(5)
    model = SquaredReLU(square=square).double().eval()
    plant_layer(model.fc1, Planted(12, g))
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)
    check_exact(model, x, lambda: SquaredReLU(6), [{"fc1"}])


class LayerScale(nn.Module):
    """Linear -> ReLU -> times a learned per-channel scale -> Linear."""

    def __init__(self, hidden: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, hidden), nn.Linear(hidden, 3)
        self.gamma = nn.Parameter(torch.randn(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)) * self.gamma)


def test_layer_scale_merges_exactly_whatever_its_values() -> None:
    g = torch.Generator().manual_seed(6)
    model = LayerScale().double().eval()
    plant_layer(model.fc1, Planted(10, g))
    x = torch.randn(8, 6, dtype=torch.float64, generator=g)
    result = check_exact(model, x, lambda: LayerScale(5), [{"fc1"}])
    assert result.model.gamma.shape == (5,)


class SqueezeExcite(nn.Module):
    """conv -> ReLU -> x * sigmoid(fc2(relu(fc1(pool(x))))) -> conv: fc2 writes the gate."""

    def __init__(self, c: int = 8, r: int = 4, out: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        self.out = nn.Conv2d(c, out, 1)
        self.head = nn.Linear(out, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        h = F.relu(self.out(h * gate))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_squeeze_excitation_gate_merges_exactly() -> None:
    g = torch.Generator().manual_seed(7)
    model = SqueezeExcite().double().eval()
    channels = Planted(8, g)
    plant_layer(model.conv, channels)
    plant_layer(model.fc2, channels, scale_one=True)  # equal gate rows
    plant_layer(model.fc1, Planted(4, g))
    plant_layer(model.out, Planted(5, g))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g)
    check_exact(
        model, x, lambda: SqueezeExcite(4, 2, kept_count(5, RATIO)), [{"conv", "fc2"}, {"fc1"}, {"out"}]
    )


# ---------------------------------------------------------------------------------------------


class GroupedBlock(nn.Module):
    """1x1 conv -> BN -> ReLU -> grouped 3x3 conv -> BN -> ReLU -> 1x1 conv (a ResNeXt block)."""

    def __init__(self, c: int = 8, groups: int = 2, out: int = 6) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, out, 1)
        self.head = nn.Linear(out, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = F.relu(self.conv3(h))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def plant_blocks(layer: nn.Module, bn: nn.Module | None, blocks: int, g: torch.Generator) -> None:
    """Duplicates inside each block of a grouped conv's channels (merges cannot cross blocks)."""
    assert isinstance(layer, nn.Conv2d)
    n = layer.out_channels // blocks
    width = layer.weight[0].numel() + int(layer.bias is not None or bn is not None)
    rows = torch.cat([Planted(n, g).rows(width) for _ in range(blocks)])
    if bn is None:
        set_rows(layer, rows)
    else:
        set_conv_bn(layer, bn, rows, g)  # type: ignore[arg-type]


def test_grouped_conv_block_merges_exactly_within_its_groups() -> None:
    g = torch.Generator().manual_seed(10)
    model = GroupedBlock().double().eval()
    plant_blocks(model.conv1, model.bn1, 2, g)
    plant_blocks(model.conv2, model.bn2, 2, g)
    plant_layer(model.conv3, Planted(6, g))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g)
    result = check_exact(model, x, lambda: GroupedBlock(4, 2, 3), [{"conv1"}, {"conv2"}, {"conv3"}])
    assert [s.blocks for s in result.sites] == [2, 2, 1]
    assert result.model.conv2.groups == 2 and result.model.conv2.weight.shape == (4, 2, 3, 3)


# ---------------------------------------------------------------------------------------------

#: Every group kind above, at its default widths with random weights, and an input shape.
KINDS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "residual stream": (ResidualNet, (3, 6, 6)),
    "depthwise block": (DepthwiseNet, (3, 5, 5)),
    "post-activation BatchNorm": (PostActivationNorm, (7,)),
    "concatenation + BatchNorm": (ConcatNorm, (3, 5, 5)),
    "gated MLP": (GatedMLP, (5, 8)),
    "squared ReLU": (SquaredReLU, (5, 8)),
    "LayerScale": (LayerScale, (6,)),
    "squeeze-excitation": (SqueezeExcite, (3, 5, 5)),
    "grouped conv": (GroupedBlock, (3, 5, 5)),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_ls_runs_on_every_group_kind_and_beats_pruning(kind: str) -> None:
    """Random weights (no duplicates): least squares on the activations the consumers read leaves
    a smaller output change than dropping the same number of channels."""
    build, shape = KINDS[kind]
    torch.manual_seed(8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(256, *shape, dtype=torch.float64, generator=g)
    batches = [x[:128], x[128:]]
    # BatchNorm statistics of the data, as after training (merge-ls re-measures them).
    model = nm.recalibrate_batchnorm(build().double().eval(), batches)
    merged = nm.compress(model, x[:2], RATIO, method="merge-ls", calibration=batches)
    pruned = nm.compress(model, x[:2], RATIO, method="prune")
    assert [(s.producer, s.kept) for s in merged.report.sites] == [
        (s.producer, s.kept) for s in pruned.report.sites
    ]
    assert params(pruned.model) < params(model)
    with torch.no_grad():
        expected = model(x)
        merge_error = float((merged.model(x) - expected).norm() / expected.norm())
        prune_error = float((pruned.model(x) - expected).norm() / expected.norm())
    assert merge_error < prune_error, (merge_error, prune_error)
