"""A model's parameter and MAC counts as polynomials in the kept width of every channel group.

``budget`` allocates widths against a cost it can evaluate for any widths without running surgery.
Every Linear/Conv weight is ``rows x columns x kernel``: its rows are one group's channels or a
constant, its columns a constant plus ``block`` columns per channel of every group it reads; so its
parameter count expands into ``budget.Term``s of degree at most two, and its MACs are the same terms
times the output positions it computes per example (as ``evaluate.count_flops`` counts them). The
per-channel tensors of a group (BatchNorm, a depthwise conv that follows it) scale with its width;
everything else is a constant. ``tests/test_budget.py`` checks these counts against the result of
surgery.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neuronmerge.budget import Term
from neuronmerge.evaluate import flops_by_layer

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class GroupShape:
    """Where one group's channels live, as module names.

    ``producers`` write the channels (their weight rows); ``followers`` hold per-channel tensors of
    them along their first axis (BatchNorm, a depthwise conv); ``tensors`` are single parameters
    (qualified names) along the channels on their first axis, owned by a module that is no follower
    (a LayerScale vector); ``readers`` are ``(layer, block)``: a layer reading ``block`` input
    columns per channel.
    """

    name: str
    channels: int
    producers: tuple[str, ...]
    followers: tuple[str, ...]
    readers: tuple[tuple[str, int], ...]
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelCosts:
    """Parameters and MACs per example as polynomials in the groups' kept counts."""

    params: tuple[Term, ...]
    macs: tuple[Term, ...]


def _width(module: nn.Module) -> tuple[int, int, int]:
    """Rows, input columns per group of the weight, and kernel area of a Linear/Conv layer."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    rows, columns = int(weight.shape[0]), int(weight.shape[1])
    return rows, columns, int(weight[0, 0].numel())


def model_costs(
    model: nn.Module, shapes: Sequence[GroupShape], example_inputs: tuple[torch.Tensor, ...]
) -> ModelCosts:
    """The cost polynomials of ``model`` (whose groups are ``shapes``) on one example."""
    one = tuple(t[:1] for t in example_inputs)
    macs_now = flops_by_layer(model, one)
    rows_of: dict[str, GroupShape] = {}
    follows: dict[str, GroupShape] = {}
    reads: dict[str, list[tuple[GroupShape, int]]] = {}
    scaled: dict[str, GroupShape] = {}
    for shape in shapes:
        rows_of.update((p, shape) for p in shape.producers)
        follows.update((f, shape) for f in shape.followers)
        scaled.update((t, shape) for t in shape.tensors)
        for layer, block in shape.readers:
            reads.setdefault(layer, []).append((shape, block))

    params: list[Term] = []
    macs: list[Term] = []
    fixed = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        named = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in named)
        for leaf, p in named:
            group = scaled.get(f"{name}.{leaf}" if name else leaf)
            if group is not None:
                params.append(Term(p.numel() // group.channels, (group.name,)))
        own = [p for n, p in named if (f"{name}.{n}" if name else n) not in scaled]
        if name in follows:
            group = follows[name]
            for p in own:
                if p.dim() > 0 and p.shape[0] == group.channels:
                    params.append(Term(p.numel() // group.channels, (group.name,)))
                else:
                    fixed += p.numel()
            if isinstance(module, _LAYERS) and name in macs_now:
                # A depthwise conv: each channel's MACs are its kernel times its output positions.
                macs.append(Term(macs_now[name] // group.channels, (group.name,)))
            continue
        if not isinstance(module, _LAYERS) or not own:
            fixed += sum(p.numel() for p in own)
            continue
        rows, columns, kernel = _width(module)
        row_factor = _factor(rows, rows_of.get(name))
        column_factor = _columns(columns, reads.get(name, []))
        weight_terms = [Term(kernel * a * b, ga + gb) for a, ga in row_factor for b, gb in column_factor]
        counted = {id(module.weight)}
        params.extend(weight_terms)
        if isinstance(module.bias, torch.Tensor) and id(module.bias) in {id(p) for p in own}:
            params.extend(Term(a, ga) for a, ga in row_factor)
            counted.add(id(module.bias))
        fixed += sum(p.numel() for p in own if id(p) not in counted)
        if name in macs_now:
            positions = macs_now[name] // (rows * columns * kernel)
            macs.extend(Term(t.coefficient * positions, t.groups) for t in weight_terms)
    macs_fixed = sum(m for n, m in macs_now.items()) - _evaluate(macs, shapes)
    return ModelCosts(
        params=(*params, Term(fixed)),
        macs=(*macs, Term(macs_fixed)),
    )


def _evaluate(terms: Sequence[Term], shapes: Sequence[GroupShape]) -> int:
    full = {s.name: s.channels for s in shapes}
    return sum(t.coefficient * math.prod(full[g] for g in t.groups) for t in terms)


def _factor(size: int, group: GroupShape | None) -> list[tuple[int, tuple[str, ...]]]:
    """An axis of ``size`` entries: one group's channels, or a constant."""
    return [(size, ())] if group is None else [(1, (group.name,))]


def _columns(size: int, readers: Sequence[tuple[GroupShape, int]]) -> list[tuple[int, tuple[str, ...]]]:
    """An input axis of ``size`` columns: ``block`` per channel of each group read, the rest fixed."""
    rest = size - sum(shape.channels * block for shape, block in readers)
    parts: list[tuple[int, tuple[str, ...]]] = [(block, (shape.name,)) for shape, block in readers]
    return [*parts, (rest, ())] if rest else parts
