"""Residual streams whose branches change a pair's scale on the way to the add (RepVGG's identity
BatchNorm, a BatchNorm after the activation of one branch, a depthwise conv).

A channel ``i`` that is ``s`` times channel ``j`` where a stream is read must be so on every branch
adding into it: each branch's producers get their own ratio, and the add checks that the branches
agree. Where every branch carries the same duplicate the merge is exact (``torch.allclose`` in
float64) whatever the BatchNorm's ratio ``k = a_i / a_j``; where they disagree the pair is dropped
where the stream is read, never merged as if exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuronmerge as nm
from tests.builders import compress_announced, plant_duplicates

pytestmark = pytest.mark.usefixtures("single_thread")


class RepBlock(nn.Module):
    """RepVGG's training-time block: ``relu(bn(conv3x3 x) + bn(conv1x1 x) + bn(x))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.dense_bn = nn.BatchNorm2d(width)
        self.point = nn.Conv2d(width, width, 1, bias=False)
        self.point_bn = nn.BatchNorm2d(width)
        self.identity = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense_bn(self.dense(x)) + self.point_bn(self.point(x)) + self.identity(x))


class RepNet(nn.Module):
    """A stem and ``depth`` RepVGG blocks on one stream, pooled into a linear head."""

    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[RepBlock(width) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem_bn(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


class MixerNet(nn.Module):
    """ConvMixer: ``y = bn(relu(pw x))`` then ``depth`` times ``y = bn(relu(dw y)) + y`` and
    ``y = bn(relu(pw y))``, a BatchNorm after every activation, pooled into a linear head."""

    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 2, stride=2), nn.ReLU(), nn.BatchNorm2d(width))
        self.depthwise = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(), nn.BatchNorm2d(width)
            )
            for _ in range(depth)
        )
        self.pointwise = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(), nn.BatchNorm2d(width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for depthwise, pointwise in zip(self.depthwise, self.pointwise, strict=True):
            x = pointwise(depthwise(x) + x)
        return self.head(x.mean((2, 3)))


class IdentityBranch(nn.Module):
    """The smallest case: ``y = relu(bn(conv_a x))``, ``z = relu(bn(conv_b y) + bn_id(y))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.bn_id = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_a(self.conv_a(x)))
        return self.out(torch.relu(self.bn_b(self.conv_b(y)) + self.bn_id(y)))


class MixerBlock(nn.Module):
    """ConvMixer's block, BatchNorm after each activation: ``y = bn(relu(pw x))``,
    ``z = bn(relu(dw y)) + y`` with a depthwise ``dw``."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.bn_pw = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_dw = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_pw(torch.relu(self.pw(x)))
        return self.out(self.bn_dw(torch.relu(self.dw(y))) + y)


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.flatten(1).norm(dim=1).reshape(-1, *[1] * (rows.dim() - 1))


def _set_norm(bn: nn.BatchNorm2d, a: torch.Tensor, c: torch.Tensor) -> None:
    """``bn(x) = a x + c`` per channel, through non-trivial running statistics."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        std = torch.sqrt(bn.running_var + bn.eps)
        bn.weight.copy_(a * std)
        bn.bias.copy_(c + a * bn.running_mean)


def _kept_columns_only(result: nm.Result, model: nn.Module, name: str, kept: int) -> bool:
    """Whether ``name`` of the merged model reads the first ``kept`` input channels unchanged (the
    removed ones dropped, none folded in)."""
    before = model.get_submodule(name).weight
    after = result.model.get_submodule(name).weight
    assert isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
    return after.shape[1] == kept and torch.equal(after, before[:, :kept])


@pytest.mark.parametrize("criterion", ["l1-norm", "l2-norm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repvgg_stream_merges_planted_duplicates_exactly(seed: int, criterion: str) -> None:
    torch.manual_seed(seed)
    model = RepNet().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    found = nm.plan(model, x)
    [group] = found.sites
    # The stem and each block's two convs: three scales, as each identity BatchNorm changes it.
    assert group.roots == (0, 1, 1, 2, 2)
    _merges_planted_exactly(model, x, criterion, seed)


@pytest.mark.parametrize("criterion", ["l1-norm", "l2-norm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_convmixer_blocks_merge_planted_duplicates_exactly(seed: int, criterion: str) -> None:
    torch.manual_seed(seed)
    model = MixerNet().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    assert [len(g.producers) for g in nm.plan(model, x).sites] == [1, 1, 1]
    _merges_planted_exactly(model, x, criterion, seed)


def _merges_planted_exactly(model: nn.Module, x: torch.Tensor, criterion: str, seed: int) -> None:
    """Plant duplicates (each BatchNorm on the way with its own ratios ``a_i / a_j``), merge them:
    the function is unchanged, and pruning them instead is not."""
    found = nm.plan(model, x)
    counts = plant_duplicates(model, found.sites, 0.5, criterion, torch.Generator().manual_seed(seed))
    result = compress_announced(model, x, 0.5, criterion=criterion, threshold=None)
    assert {s.producer: (s.kept, s.merged, s.dropped) for s in result.report.sites} == {
        p: (k, d, 0) for p, (k, d) in counts.items()
    }
    with torch.no_grad():
        expected, got, pruned = (
            model(x),
            result.model(x),
            nm.prune(model, x, 0.5, criterion=criterion)(x),
        )
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10), (got - expected).abs().max()
    assert not torch.allclose(pruned, expected, rtol=1e-6, atol=1e-8)


def _identity_branch(k: float, consistent: bool) -> IdentityBranch:
    """Channels 4-7 are ``s`` times channels 0-3 at ``y``; ``bn_id``'s ratio ``a_i / a_j`` is ``k``,
    so at ``z`` they are ``k s`` times where ``conv_b``'s duplicates are ``k s`` times its rows
    (``consistent``), and no multiple where they are ``s`` times."""
    torch.manual_seed(0)
    model = IdentityBranch().double().eval()
    s = torch.tensor([0.5, 0.4, 0.45, 0.3], dtype=torch.float64)
    a = 0.5 + torch.rand(4, dtype=torch.float64)
    c = torch.randn(4, dtype=torch.float64)
    branch = k * s if consistent else s
    with torch.no_grad():
        for bn in (model.bn_a, model.bn_b):
            _set_norm(bn, torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
        model.conv_a.weight.copy_(torch.cat([_unit_rows(model.conv_a.weight[:4])] * 2))
        model.conv_a.weight[4:] *= s[:, None, None, None]
        model.conv_b.weight.copy_(torch.cat([_unit_rows(model.conv_b.weight[:4])] * 2))
        model.conv_b.weight[4:] *= branch[:, None, None, None]
        _set_norm(model.bn_id, torch.cat([a, k * a]), torch.cat([c, k * s * c]))
    return model


@pytest.mark.parametrize("k", [1.0, 1.5, 0.6])
def test_identity_batchnorm_branch_merges_exactly_whatever_its_ratio(k: float) -> None:
    model = _identity_branch(k, consistent=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    result = compress_announced(model, x, 0.5, criterion="l2-norm", threshold=None)
    [site] = result.report.sites
    assert (site.mode, site.kept, site.merged, site.dropped) == ("exact", 4, 4, 0)
    with torch.no_grad():
        expected, got = model(x), result.model(x)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10), (got - expected).abs().max()


def test_pairs_the_branches_disagree_on_are_dropped_where_the_stream_is_read() -> None:
    model = _identity_branch(1.5, consistent=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    result = compress_announced(model, x, 0.5, criterion="l2-norm", threshold=None)
    # At ``y`` the pairs are exact, so conv_b reads them merged; at ``z`` the branches disagree
    # (s * 1.5 against s), so ``out`` reads the kept channels alone.
    assert _kept_columns_only(result, model, "out", 4)
    assert not _kept_columns_only(result, model, "conv_b", 4)
    with torch.no_grad():
        y = torch.relu(model.bn_a(model.conv_a(x)))
        z = torch.relu(model.bn_b(model.conv_b(y)) + model.bn_id(y))
        merged_b = result.model.conv_b(y[:, :4])
    # conv_b (a producer of the group too: it keeps outputs 0-3) reads its input pairs merged,
    # and still computes exactly what it did, as they are exact at ``y``.
    assert torch.allclose(merged_b, model.conv_b(y)[:, :4], rtol=1e-9, atol=1e-10)
    assert not torch.allclose(z[:, 4:], 1.5 * z[:, :4])


def _mixer(k: torch.Tensor) -> MixerBlock:
    """Channels 4-7 ``s`` times channels 0-3 after ``pw``; ``bn_pw`` multiplies the ratio by 1.3,
    the depthwise kernels by ``R``, ``bn_dw`` by ``k``: the branches agree where ``k R = 1``."""
    torch.manual_seed(1)
    model = MixerBlock().double().eval()
    s = torch.tensor([0.5, 0.4, 0.45, 0.3], dtype=torch.float64)
    a, c = 0.5 + torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    a2, c2 = 0.5 + torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        rows = _unit_rows(torch.cat([model.pw.weight[:4].flatten(1), model.pw.bias[:4, None]], 1))
        rows = torch.cat([rows, s[:, None] * rows])
        model.pw.weight.copy_(rows[:, :-1].view_as(model.pw.weight))
        model.pw.bias.copy_(rows[:, -1])
        y_ratio = 1.3 * s
        _set_norm(model.bn_pw, torch.cat([a, 1.3 * a]), torch.cat([c, y_ratio * c]))
        model.dw.weight[4:] = R[:, None, None, None] * model.dw.weight[:4]
        model.dw.bias[4:] = R * y_ratio * model.dw.bias[:4]
        _set_norm(model.bn_dw, torch.cat([a2, k * a2]), torch.cat([c2, k * R * y_ratio * c2]))
    return model


R = torch.tensor([0.7, 1.4, 0.9, 1.2], dtype=torch.float64)


def test_batchnorm_after_the_activation_on_one_branch() -> None:
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # k = 1 / R per pair: both branches carry 1.3 s at the add, and the merge is exact.
    agreeing = _mixer(1 / R)
    result = compress_announced(agreeing, x, 0.5, criterion="l2-norm", threshold=None)
    [site] = result.report.sites
    assert (site.mode, site.merged, site.dropped) == ("exact", 4, 0)
    with torch.no_grad():
        expected, got = agreeing(x), result.model(x)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10), (got - expected).abs().max()
    # k = 1: the branches carry 1.3 s and 1.3 R s: no pair is merged where ``out`` reads them.
    disagreeing = _mixer(torch.ones(4, dtype=torch.float64))
    result = compress_announced(disagreeing, x, 0.5, criterion="l2-norm", threshold=None)
    [site] = result.report.sites
    assert (site.merged, site.dropped) == (0, 4)
    assert _kept_columns_only(result, disagreeing, "out", 4)
