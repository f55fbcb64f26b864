"""Sizes computed at run time: views and reshapes whose target shape is computed from another
tensor's shape.

Surgery rewrites literal sizes (``x.view(-1, 120)``) but cannot rewrite ``C // heads`` computed from
``B, N, C = x.shape``: where such a size shapes a tensor of another width (CaiT's
``qkv(x).reshape(B, N, 3, heads, C // heads)``), shrinking either side alone breaks the reshape.
Both groups are held with the reason, and the rest of the model still compresses.
(Weights computed at run time: ``test_constant_fold``.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuronmerge as nm
from tests.builders import compress_announced, plant_duplicates

pytestmark = pytest.mark.usefixtures("single_thread")

HELD = "which would not follow the merge"


class TalkingHeads(nn.Module):
    """CaiT's talking-heads attention on a residual stream, then an MLP block."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(10, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.talk = nn.Linear(heads, heads)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 32)
        self.fc2 = nn.Linear(32, dim)
        self.out = nn.Linear(dim, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        B, N, C = x.shape  # noqa: N806 (the names of the original)
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = self.talk((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.out(x)


class Borrowed(nn.Module):
    """``b`` is reshaped with ``a``'s width: neither ``fa`` nor ``fb`` may shrink alone; ``fc``'s
    group, which no computed size reads, may."""

    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(10, 8)
        self.fb = nn.Linear(10, 8)
        self.fc = nn.Linear(10, 8)
        self.out_a = nn.Linear(8, 3)
        self.out_b = nn.Linear(8, 3)
        self.out_c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.fa(x))
        b = torch.relu(self.fb(x)).reshape(x.shape[0], a.shape[-1])
        return self.out_a(a) + self.out_b(b) + self.out_c(torch.relu(self.fc(x)))


class OwnShape(nn.Module):
    """A conv map reshaped with its own channel count: the size follows the merge."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        B, C, H, W = y.shape  # noqa: N806
        return self.fc(y.reshape(B, C, H * W).mean(2))


class LeadingAxes(nn.Module):
    """``h.shape[:-1]`` sizes a view of another tensor: the leading axes only, not the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(10, 8)
        self.side = nn.Linear(10, 6)
        self.fc = nn.Linear(8, 4)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        s = self.side(x).flatten(0, 1).reshape(h.shape[:-1] + (-1,))
        return self.fc(h) + self.out(torch.relu(s))


def test_a_reshape_sized_by_the_stream_holds_the_stream_and_the_rest_compresses() -> None:
    model = TalkingHeads().eval()
    x = torch.randn(2, 5, 10)
    found = nm.plan(model, x)
    reasons = {s.producer: s.reason for s in found.skipped}
    for producer in ("embed", "proj", "fc2"):  # the stream
        assert reasons[producer] == f".reshape() shapes qkv with the channel count of embed, {HELD}"
    assert [s.producer for s in found.sites] == ["fc1"]
    result = compress_announced(model, x, 0.5)
    assert [s.producer for s in result.report.sites] == ["fc1"]
    assert result.model.embed.weight.shape == model.embed.weight.shape
    assert result.model.fc1.weight.shape == (16, 16)
    check = torch.randn(3, 7, 10)
    with torch.no_grad():
        assert result.model(check).shape == model(check).shape == (3, 7, 6)


def test_both_sides_of_a_borrowed_size_are_held() -> None:
    model = Borrowed().eval()
    x = torch.randn(4, 10)
    found = nm.plan(model, x)
    reasons = {s.producer: s.reason for s in found.skipped}
    assert reasons["fa"] == f".reshape() shapes relu_1 with the channel count of relu, {HELD}"
    assert reasons["fb"] == f".reshape() shapes the channels of reshape with a size of relu, {HELD}"
    assert [s.producer for s in found.sites] == ["fc"]
    result = compress_announced(model, x, 0.5)
    with torch.no_grad():
        assert result.model(torch.randn(5, 10)).shape == (5, 3)


def test_sizes_read_from_other_axes_hold_nothing() -> None:
    model = LeadingAxes().double().eval()
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    found = nm.plan(model, x)
    assert [s.producer for s in found.sites] == ["embed", "side"]
    plant_duplicates(model, found.sites, 0.5, "l2-norm", torch.Generator().manual_seed(0))
    result = compress_announced(model, x, 0.5, criterion="l2-norm", threshold=None)
    check = torch.randn(3, 4, 10, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(result.model(check), model(check), rtol=1e-9, atol=1e-10)


def test_a_reshape_sized_by_its_own_channels_still_merges_exactly() -> None:
    torch.manual_seed(0)
    model = OwnShape().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    found = nm.plan(model, x)
    assert [s.producer for s in found.sites] == ["conv"]
    plant_duplicates(model, found.sites, 0.5, "l2-norm", torch.Generator().manual_seed(0))
    result = compress_announced(model, x, 0.5, criterion="l2-norm", threshold=None)
    assert result.model.conv.weight.shape[0] == 4
    check = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(result.model(check), model(check), rtol=1e-9, atol=1e-10)
