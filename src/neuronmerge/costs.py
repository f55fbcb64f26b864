"""A model's parameter and MAC counts as polynomials in the kept width of every channel group.

``budget`` allocates widths against a cost it can evaluate for any widths without running surgery.
Every Linear/Conv weight is ``rows x columns x kernel``: its rows are one group's channels or a
constant, its columns a constant plus ``block`` columns per channel of every group it reads; so its
parameter count expands into ``budget.Term``s of degree at most two, and its MACs are the same terms
times the output positions it computes per example (as ``evaluate.count_flops`` counts them). A
per-channel tensor (BatchNorm, a depthwise conv or LayerScale that follows a group, a positional
embedding along a stream) is cut along one axis into the slices that groups own, ``block`` entries
per channel each, and a constant rest: a BatchNorm after a concatenation costs ``2 * (k_a + k_b)``
when groups ``a`` and ``b`` own its two halves. ``tests/test_budget.py`` checks these counts against
the result of surgery.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neuronmerge.budget import Term
from neuronmerge.evaluate import flops_by_layer
from neuronmerge.graph.ops import LAYERS
from neuronmerge.types import ParamSlice


@dataclass(frozen=True)
class GroupShape:
    """Where one group's channels live, as module names.

    ``producers`` write the channels (their weight rows); ``params`` are the group's slices of
    per-channel tensors (``ParamSlice``: ``name == "*"`` for every parameter of a module that
    follows the channels, such as a BatchNorm or a depthwise conv); ``readers`` are
    ``(layer, block)``: a layer reading ``block`` input columns per channel.
    """

    name: str
    channels: int
    producers: tuple[str, ...]
    readers: tuple[tuple[str, int], ...]
    params: tuple[ParamSlice, ...] = ()


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


def _sliced(
    size: int, per_entry: int, slices: Sequence[tuple[GroupShape, ParamSlice]]
) -> tuple[list[Term], int]:
    """An axis of ``size`` entries, ``per_entry`` counts each, cut into the groups' slices: a term
    per slice and the constant rest."""
    terms = [Term(per_entry * piece.block, (shape.name,)) for shape, piece in slices]
    rest = size - sum(piece.block * shape.channels for shape, piece in slices)
    return terms, rest * per_entry


def model_costs(
    model: nn.Module, shapes: Sequence[GroupShape], example_inputs: tuple[torch.Tensor, ...]
) -> ModelCosts:
    """The cost polynomials of ``model`` (whose groups are ``shapes``) on one example."""
    one = tuple(t[:1] for t in example_inputs)
    macs_now = flops_by_layer(model, one)
    rows_of: dict[str, GroupShape] = {}
    reads: dict[str, list[tuple[GroupShape, int]]] = {}
    # Per module: the slices of its per-channel tensors, by parameter name ("*": all of them).
    slices: dict[str, dict[str, list[tuple[GroupShape, ParamSlice]]]] = {}
    for shape in shapes:
        rows_of.update((p, shape) for p in shape.producers)
        for layer, block in shape.readers:
            reads.setdefault(layer, []).append((shape, block))
        for piece in shape.params:
            slices.setdefault(piece.owner, {}).setdefault(piece.name, []).append((shape, piece))

    params: list[Term] = []
    macs: list[Term] = []
    fixed = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        named = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in named)
        mine = slices.get(name, {})
        own = []
        for leaf, p in named:
            cut = mine.get(leaf) or (mine.get("*") if p.dim() > 0 else None)
            if not cut:
                own.append(p)
                continue
            axis = cut[0][1].axis
            terms, rest = _sliced(int(p.shape[axis]), p.numel() // int(p.shape[axis]), cut)
            params.extend(terms)
            fixed += rest
        if "*" in mine:  # a follower (a depthwise conv): each channel's MACs are its share
            if isinstance(module, LAYERS) and name in macs_now:
                size = int(module.weight.shape[0])
                terms, rest = _sliced(size, macs_now[name] // size, mine["*"])
                macs.extend(terms)
            fixed += sum(p.numel() for p in own)
            continue
        if not isinstance(module, LAYERS) or not own:
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
