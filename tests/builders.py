"""Networks with exactly mergeable neurons, built on purpose for the tests.

A layer gets ``base`` distinct neurons and ``dups`` extra neurons, each a positive multiple (scale in
[0.05, 0.3]) of a base neuron, of what the channel computes before its activation. Base rows are
rescaled so that their norm under the test's criterion lies in [1, 1.2]: every duplicate then scores
below every base neuron, so removing exactly ``dups`` neurons keeps one representative of each, and
merging must reproduce the network's function exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import neuronmerge as nm
from neuronmerge.criteria import kept_count
from neuronmerge.graph.ops import CONVS, LAYERS
from neuronmerge.notices import EXPECTED_SKIPS
from neuronmerge.types import Group as Site


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
    assert isinstance(layer, LAYERS)
    with torch.no_grad():
        width = layer.weight[0].numel()
        layer.weight.copy_(rows[:, :width].reshape(layer.weight.shape))
        if layer.bias is not None:
            layer.bias.copy_(rows[:, width])


def _gate_roots(group: Site) -> set[int]:
    """Roots that pass a non-homogeneous activation before a product: their rows must be equal."""
    root_of = {s.node: r for s, r in zip(group.steps, group.roots, strict=False) if s.kind == "root"}
    gated = {i for s in group.steps if s.kind == "mul" for i in s.inputs}
    return {
        root_of[s.inputs[0]]
        for s in group.steps
        if s.kind == "nonhomogeneous" and s.node in gated and s.inputs[0] in root_of
    }


def _set_norm_slice(bn: nn.Module, span: slice, a: torch.Tensor, c: torch.Tensor) -> None:
    """BatchNorm entries ``span`` computing ``a x + c`` (random running statistics)."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    n = a.shape[0]
    mean = torch.randn(n, dtype=torch.float64)
    var = 0.5 + torch.rand(n, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean[span] = mean
        bn.running_var[span] = var
        bn.weight[span] = a * torch.sqrt(var + bn.eps)
        bn.bias[span] = c + a * mean


@dataclass
class _Planting:
    """A group's flows while planting: per tensor, each channel's factor against its partner, or
    the index of the root it comes from unchanged while that root's factor is still open."""

    keep: int
    perm: torch.Tensor
    scale: torch.Tensor
    factors: dict[int, torch.Tensor]
    flows: dict[str, torch.Tensor | int]

    def resolved(self, node: str) -> torch.Tensor:
        """The flow at ``node``, fixing a root still open to the drawn ``scale``."""
        value = self.flows[node]
        if isinstance(value, int):
            factor = self.factors.setdefault(value, self.scale)
            value = torch.cat([torch.ones(self.keep, dtype=torch.float64), factor])[self.perm]
        return value


def _joined_at_add(group: Site, node: str) -> list[str]:
    """The other inputs of the add that ``node`` reaches through steps keeping the scale."""
    keeping = ("pass", "maxpool", "nonhomogeneous")
    while True:
        readers = [s for s in group.steps if node in s.inputs]
        if len(readers) != 1:
            return []
        step = readers[0]
        if step.kind == "add":
            return [i for i in step.inputs if i != node]
        if step.kind not in keeping and not (step.kind == "homogeneous" and step.degree == 1):
            return []
        node = step.node


def _draw_pairs(
    group: Site, keep: int, dups: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the duplicates go: the shuffle ``perm`` of [kept rows | duplicates], each channel's
    ``partner`` (itself where kept), ``is_dup``, each duplicate's ``scale`` and ``source`` row. A
    grouped conv's blocks each hold their own duplicates (merges stay in a block)."""
    n, blocks = group.channels, group.blocks
    kb, db = keep // blocks, dups // blocks
    source = torch.cat(
        [torch.randint(b * kb, (b + 1) * kb, (db,), generator=generator) for b in range(blocks)]
    )
    scale = 0.05 + 0.25 * torch.rand(dups, generator=generator, dtype=torch.float64)
    if blocks == 1:
        perm = torch.randperm(n, generator=generator)
    else:
        perm = torch.cat(
            [
                torch.cat(
                    [torch.arange(b * kb, (b + 1) * kb), keep + torch.arange(b * db, (b + 1) * db)]
                )[torch.randperm(kb + db, generator=generator)]
                for b in range(blocks)
            ]
        )
    where = torch.empty(n, dtype=torch.long)
    where[perm] = torch.arange(n)
    partner = where[torch.cat([torch.arange(keep), source])[perm]]
    return perm, partner, partner != torch.arange(n), scale, source


def plant_duplicates(
    model: nn.Module,
    sites: Sequence[Site],
    ratio: float,
    criterion: str,
    generator: torch.Generator,
) -> dict[str, tuple[int, int]]:
    """Give every group of ``model`` exactly mergeable duplicates: removing ``ratio`` of its channels
    removes exactly the duplicates. Every producer of a group gets rows (what its channel computes
    before the activation: the folded rows where a BatchNorm follows) with the same duplicates in
    the same places; the roots of a gate get equal rows; per-channel parameters on the way
    (BatchNorm, depthwise kernels, LayerScale, PReLU slopes) are chosen so that each duplicate stays
    a positive multiple of its source at every tensor the consumers read.
    Returns ``{group name: (kept, duplicates)}``."""
    counts: dict[str, tuple[int, int]] = {}
    for group in sites:
        n = group.channels
        keep = kept_count(n // group.blocks, ratio) * group.blocks
        dups = n - keep
        gates = _gate_roots(group)
        roots = [s for s in group.steps if s.kind == "root"]
        root_of = {step.node: root for step, root in zip(roots, group.roots, strict=True)}
        drawn: list[torch.Tensor] = []  # every producer's kept rows (drawn before the pairs)
        for index, (producer, folded) in enumerate(zip(group.producers, group.folded, strict=True)):
            layer = model.get_submodule(producer)
            assert isinstance(layer, LAYERS)
            width = layer.weight[0].numel() + int(layer.bias is not None or bool(folded))
            rows = torch.randn(keep, width, generator=generator, dtype=torch.float64)
            target = 1 + 0.2 * torch.rand(keep, 1, generator=generator, dtype=torch.float64)
            drawn.append(rows / _norm(rows, criterion)[:, None] * target)
            if index == 0:
                perm, partner, is_dup, scale, source = _draw_pairs(group, keep, dups, generator)
        # A root's duplicates carry the factor of the stream they add into: the other branch's
        # flow at the add where the root first meets one (a BatchNorm on that branch changes it),
        # the drawn ``scale`` otherwise; the roots of a gate carry 1.
        planting = _Planting(
            keep,
            perm,
            scale,
            {r: torch.ones_like(scale) for r in gates},
            {s.node: root_of[s.node] for s in roots},
        )
        flows, factors, resolved = planting.flows, planting.factors, planting.resolved
        for step in group.steps[len(roots) :]:
            pending = {r for i in step.inputs if isinstance(r := flows.get(i), int)}
            known = [i for i in step.inputs if isinstance(flows.get(i), torch.Tensor)]
            keeps_scale = step.kind in ("pass", "maxpool", "nonhomogeneous", "add") or (
                step.kind == "homogeneous" and step.degree == 1
            )
            if step.kind == "add" and known:
                for root in pending:
                    factors.setdefault(root, resolved(known[0])[torch.argsort(perm)[keep:]])
            elif keeps_scale and len(pending) == 1:
                flows[step.node] = pending.pop()
                continue
            f = resolved(step.inputs[0])
            if step.kind == "homogeneous":
                f = f**step.degree
            elif step.kind == "mul":
                f = f * resolved(step.inputs[1])
            elif step.kind == "add":
                for other in step.inputs[1:]:
                    resolved(other)
            elif step.kind == "affine":
                assert step.params is not None
                kind, target_name = step.params
                span = slice(step.offset, step.offset + n)
                if kind == "batchnorm":
                    a = 0.5 + torch.rand(n, generator=generator, dtype=torch.float64)
                    c = torch.randn(n, generator=generator, dtype=torch.float64)
                    # A fresh duplicate scale after the step (their product over many steps
                    # would let the duplicates outscore their sources), or the one of the other
                    # branch of the add the step leads to (ConvMixer: ``bn(dw(y)) + y``).
                    fresh = 0.05 + 0.25 * torch.rand(n, generator=generator, dtype=torch.float64)
                    for other in _joined_at_add(group, step.node):
                        if isinstance(flows.get(other), torch.Tensor):
                            fresh = resolved(other)
                    a[is_dup] = fresh[is_dup] / f[is_dup] * a[partner[is_dup]]
                    f = f * a / a[partner]
                    c[is_dup] = f[is_dup] * c[partner[is_dup]]
                    _set_norm_slice(model.get_submodule(target_name), span, a, c)
                elif kind == "depthwise":
                    conv = model.get_submodule(target_name)
                    assert isinstance(conv, CONVS)
                    kernels = torch.randn(n, conv.weight[0].numel(), generator=generator).double()
                    r = 0.5 + torch.rand(n, generator=generator, dtype=torch.float64)
                    kernels[is_dup] = r[is_dup, None] * kernels[partner[is_dup]]
                    f = f * torch.where(is_dup, r, 1)
                    with torch.no_grad():
                        conv.weight[span] = kernels.view_as(conv.weight[span])
                        if conv.bias is not None:
                            b = torch.randn(n, generator=generator, dtype=torch.float64)
                            b[is_dup] = f[is_dup] * b[partner[is_dup]]
                            conv.bias[span] = b
                else:
                    value = model.get_parameter(target_name)
                    v = 0.5 + torch.rand(n, generator=generator, dtype=torch.float64)
                    if kind == "scale":
                        f = f * v / v[partner]
                    else:
                        v = torch.randn(n, generator=generator, dtype=torch.float64)
                        v[is_dup] = f[is_dup] * v[partner[is_dup]]
                    with torch.no_grad():
                        value.view(-1)[span] = v
            flows[step.node] = f
        for producer, step, folded, rows in zip(
            group.producers, roots, group.folded, drawn, strict=True
        ):
            layer = model.get_submodule(producer)
            factor = factors.setdefault(root_of[step.node], scale)
            full = torch.cat([rows, factor[:, None] * rows[source]])[perm]
            assert len(folded) <= 1, "planting folds one BatchNorm per producer"
            if folded:
                set_conv_bn(layer, model.get_submodule(folded[0]), full, generator)  # type: ignore[arg-type]
            else:
                set_rows(layer, full)
        for param in group.params:
            module = model.get_submodule(param.owner)
            if isinstance(module, nn.PReLU) and param.name == "weight":
                with torch.no_grad():
                    slopes = module.weight[param.offset : param.offset + n]
                    slopes[is_dup] = slopes[partner[is_dup]]
        counts[group.producer] = (keep, dups)
    return counts


class EncoderBlock(nn.Module):
    """A pre-LayerNorm transformer block on ``nn.MultiheadAttention`` (packed ``in_proj``)."""

    def __init__(self, width: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """torchvision's ViT in miniature: patches by a strided conv, a class token concatenated along
    the tokens, a positional embedding added, encoder blocks, a final LayerNorm, the class token's
    features (``x[:, 0]``, or ``x[0]`` with the sequence first) into the head."""

    def __init__(
        self, width: int = 24, heads: int = 4, depth: int = 2, classes: int = 5, batch_first: bool = True
    ) -> None:
        super().__init__()
        self.width, self.batch_first = width, batch_first
        self.conv_proj = nn.Conv2d(3, width, 4, 4)
        self.class_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, width))
        self.blocks = nn.Sequential(*[EncoderBlock(width, heads, batch_first) for _ in range(depth)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        x = self.conv_proj(images).reshape(n, self.width, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = x + self.pos_embedding
        if self.batch_first:
            return self.head(self.ln(self.blocks(x))[:, 0])
        return self.head(self.ln(self.blocks(x.transpose(0, 1)))[0])


def tiny_vit_params(width: int, heads: int, depth: int = 2, classes: int = 5) -> int:
    """TinyViT's parameter count at stream width ``width`` (MLPs twice as wide): what compressing
    the stream and the MLPs alike must give."""
    block = 4 * width + (3 * width * width + 3 * width) + (width * width + width)
    block += (width * 2 * width + 2 * width) + (2 * width * width + width)
    embed = width * 3 * 16 + width + width + 17 * width
    return embed + depth * block + 2 * width + classes * width + classes


class AttentionChain(nn.Module):
    """``Linear -> nn.MultiheadAttention (self) -> Linear``: one channel group from the first layer's
    rows through the attention's ``in_proj`` columns and ``out_proj`` rows to the last layer."""

    def __init__(self, inputs: int = 10, width: int = 16, heads: int = 4, outputs: int = 6) -> None:
        super().__init__()
        self.fc_in = nn.Linear(inputs, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc_out = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        return self.fc_out(self.attention(h, h, h, need_weights=False)[0])


def duplicated_attention_chain(seed: int) -> AttentionChain:
    """An ``AttentionChain`` (16 channels, 4 heads of 4) whose channels 12-15 are positive multiples
    of channels 0-3 in both producers (``fc_in`` rows, ``out_proj`` rows), and whose head 3 has head
    1's query and key rows and 0.5 times its value rows. Removing a quarter of the channels must
    remove exactly those, and head 3: merging keeps the function."""
    g = torch.Generator().manual_seed(seed)
    model = AttentionChain().double().eval()
    width, heads, size = 16, 4, 4

    def rows(columns: int, scale: float) -> torch.Tensor:
        base = torch.randn(12, columns, generator=g, dtype=torch.float64)
        base = base / base.abs().sum(1, keepdim=True) * (1 + 0.2 * torch.rand(12, 1, generator=g))
        return torch.cat([base, scale * base[:4]])

    set_linear(model.fc_in, rows(11, 0.2))
    set_linear(model.attention.out_proj, rows(width + 1, 0.3))
    with torch.no_grad():
        w, b = model.attention.in_proj_weight, model.attention.in_proj_bias
        full = torch.randn(3 * width, width + 1, generator=g, dtype=torch.float64)
        for part in range(3):  # each head's query, key and value block: l1 norm about 1 each
            for head in range(heads):
                span = slice(part * width + head * size, part * width + (head + 1) * size)
                full[span] /= full[span].abs().sum() / (1 + 0.05 * torch.rand(1, generator=g).item())
        for part, factor in ((0, 1.0), (1, 1.0), (2, 0.5)):
            start = part * width
            full[start + 3 * size : start + 4 * size] = factor * full[start + size : start + 2 * size]
        w.copy_(full[:, :-1])
        b.copy_(full[:, -1])
    return model


def compress_announced(model: nn.Module, x: Any, ratio: float, **options: Any) -> nm.Result:
    """``nm.compress``, checking what it announces: one ``CompressionWarning`` exactly when layers
    that could take ``ratio`` were left out, naming the first with its reason and pointing at plan,
    and one more exactly when the model came in training mode."""
    training = any(m.training for m in model.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = nm.compress(model, x, ratio, **options)
    notices = [str(w.message) for w in caught if issubclass(w.category, nm.CompressionWarning)]
    assert sum("training mode" in n for n in notices) == training, notices
    shortfalls = [n for n in notices if "training mode" not in n]
    missed = [s for s in result.report.skipped if s.reason not in EXPECTED_SKIPS]
    assert len(shortfalls) == (1 if missed and ratio > 0 else 0), notices
    if shortfalls:
        assert f"{missed[0].producer}: {missed[0].reason}" in shortfalls[0]
        assert "nm.plan(model, x)" in shortfalls[0]
    return result
