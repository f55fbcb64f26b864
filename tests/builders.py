"""Networks with exactly mergeable neurons, built on purpose for the tests.

A layer gets ``base`` distinct neurons and ``dups`` extra neurons, each a positive multiple (scale in
[0.05, 0.3]) of a base neuron, of what the channel computes before its activation. Base rows are
rescaled so that their norm under the test's criterion lies in [1, 1.2]: every duplicate then scores
below every base neuron, so removing exactly ``dups`` neurons keeps one representative of each, and
merging must reproduce the network's function exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neuronmerge.criteria import kept_count
from neuronmerge.sites import Site


def _norm(rows: torch.Tensor, criterion: str) -> torch.Tensor:
    return rows.abs().sum(1) if criterion == "l1-norm" else rows.norm(dim=1)


def duplicate_rows(
    base: int, dups: int, width: int, criterion: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, source, scale): ``base + dups`` rows of ``width``; row ``base + k`` equals
    ``scale[k] * rows[source[k]]``; rows are shuffled so duplicates are not all at the end."""
    rows = torch.randn(base, width, generator=generator, dtype=torch.float64)
    target = 1 + 0.2 * torch.rand(base, 1, generator=generator, dtype=torch.float64)
    rows = rows / _norm(rows, criterion)[:, None] * target
    source = torch.randint(0, base, (dups,), generator=generator)
    scale = 0.05 + 0.25 * torch.rand(dups, generator=generator, dtype=torch.float64)
    full = torch.cat([rows, scale[:, None] * rows[source]])
    return full, source, scale


def set_linear(layer: nn.Linear, rows: torch.Tensor) -> None:
    """Load ``[w | b]`` rows into ``layer``."""
    with torch.no_grad():
        layer.weight.copy_(rows[:, :-1])
        assert layer.bias is not None
        layer.bias.copy_(rows[:, -1])


def set_conv_bn(
    conv: nn.Conv2d, bn: nn.BatchNorm2d, folded: torch.Tensor, generator: torch.Generator
) -> None:
    """Choose conv weights and BatchNorm parameters whose *folded* rows are ``folded``.

    Raw weights get random positive per-channel factors and BN random statistics, so the raw conv rows
    are not in the same ratio as the folded ones: only a merge on the folded rows is exact.
    """
    n = folded.shape[0]
    var = 0.5 + torch.rand(n, generator=generator, dtype=torch.float64)
    mean = torch.randn(n, generator=generator, dtype=torch.float64)
    raw_factor = 0.5 + 2 * torch.rand(n, generator=generator, dtype=torch.float64)
    a = raw_factor  # a * w = folded weight  =>  w = folded / a
    gamma = a * torch.sqrt(var + bn.eps)
    conv_bias = (
        torch.zeros(n, dtype=torch.float64)
        if conv.bias is None
        else torch.randn(n, generator=generator, dtype=torch.float64)
    )
    if bn.weight is None:  # affine=False: gamma = 1 and beta = 0, so the statistics carry a and c
        var = 1 / a**2 - bn.eps
        mean = conv_bias - folded[:, -1] / a
    beta = folded[:, -1] - a * (conv_bias - mean)
    with torch.no_grad():
        conv.weight.copy_((folded[:, :-1] / a[:, None]).view_as(conv.weight))
        if conv.bias is not None:
            conv.bias.copy_(conv_bias)
        if bn.weight is not None:
            bn.weight.copy_(gamma)
            bn.bias.copy_(beta)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


class MLP(nn.Module):
    """in -> [Linear -> ReLU]* -> Linear, with a flatten first (image-like inputs work too)."""

    def __init__(self, widths: list[int], classes: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def duplicated_mlp(
    in_features: int, bases: list[int], dups: list[int], criterion: str, seed: int
) -> MLP:
    """An MLP whose hidden layer k has ``bases[k]`` distinct and ``dups[k]`` duplicate neurons."""
    generator = torch.Generator().manual_seed(seed)
    widths = [in_features] + [b + d for b, d in zip(bases, dups)]
    model = MLP(widths).double()
    for layer, base, dup in zip(model.layers, bases, dups):
        rows, _, _ = duplicate_rows(base, dup, layer.in_features + 1, criterion, generator)
        perm = torch.randperm(base + dup, generator=generator)
        set_linear(layer, rows[perm])
    return model.eval()


class ConvNet(nn.Module):
    """conv-BN-ReLU -> conv-BN-ReLU -> maxpool -> flatten -> Linear -> ReLU -> Linear."""

    def __init__(self, c1: int, c2: int, hidden: int, classes: int = 4, size: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * (size // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = self.pool(nn.functional.relu(self.bn2(self.conv2(x))))
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


def duplicated_convnet(bases: list[int], dups: list[int], criterion: str, seed: int) -> ConvNet:
    """A ConvNet whose three hidden sites (conv1, conv2, fc1) carry exact duplicates."""
    generator = torch.Generator().manual_seed(seed)
    c1, c2, h = (b + d for b, d in zip(bases, dups))
    model = ConvNet(c1, c2, h).double()
    for (conv, bn), base, dup in zip([(model.conv1, model.bn1), (model.conv2, model.bn2)], bases, dups):
        width = conv.weight[0].numel() + 1
        rows, _, _ = duplicate_rows(base, dup, width, criterion, generator)
        perm = torch.randperm(base + dup, generator=generator)
        set_conv_bn(conv, bn, rows[perm], generator)
    rows, _, _ = duplicate_rows(bases[2], dups[2], model.fc1.in_features + 1, criterion, generator)
    set_linear(model.fc1, rows[torch.randperm(h, generator=generator)])
    return model.eval()


def set_rows(layer: nn.Module, rows: torch.Tensor) -> None:
    """Load rows ``[w | b]`` (or ``w`` alone for a bias-free layer) into a Linear or Conv layer."""
    assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
    with torch.no_grad():
        width = layer.weight[0].numel()
        layer.weight.copy_(rows[:, :width].reshape(layer.weight.shape))
        if layer.bias is not None:
            layer.bias.copy_(rows[:, width])


def plant_duplicates(
    model: nn.Module,
    sites: Sequence[Site],
    ratio: float,
    criterion: str,
    generator: torch.Generator,
) -> dict[str, tuple[int, int]]:
    """Give every site of ``model`` exactly mergeable duplicates: removing ``ratio`` of its channels
    removes exactly the duplicates. Rows are what each channel computes before its activation (the
    folded rows where a BatchNorm follows). Returns ``{producer: (kept, duplicates)}``."""
    counts: dict[str, tuple[int, int]] = {}
    for site in sites:
        layer = model.get_submodule(site.producer)
        assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
        keep = kept_count(site.channels, ratio)
        dups = site.channels - keep
        has_column = layer.bias is not None or site.norm is not None
        width = layer.weight[0].numel() + int(has_column)
        rows, _, _ = duplicate_rows(keep, dups, width, criterion, generator)
        rows = rows[torch.randperm(site.channels, generator=generator)]
        if site.norm is None:
            set_rows(layer, rows)
        else:
            norm = model.get_submodule(site.norm)
            set_conv_bn(layer, norm, rows, generator)  # type: ignore[arg-type]
        counts[site.producer] = (keep, dups)
    return counts
