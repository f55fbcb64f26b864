"""Whole attention heads of Hugging Face blocks: merge exact duplicates, prune the weakest.

A block's attention is ``o(concat_h softmax(q_h k_g^T) v_g)``; with grouped-query attention every key/
value head ``g`` serves ``rep`` query heads. A key/value group (its key and value rows, the query rows of
its ``rep`` heads and those heads' output columns) is the unit removed, so the grouping stays regular.
Group ``i`` equals ``s`` times group ``j`` (``s > 0``) exactly when their query and key rows are equal
(the same attention patterns) and ``v_i = s v_j``: then its output is ``s`` times ``j``'s, and adding
``s`` times its output columns to ``j``'s removes it with no change (the paper's merge, one level up).
Otherwise groups are ranked by the l1 norm of all their rows and columns (as the engine ranks heads)
and the lowest are pruned.

Only configs that state the head width (``head_dim``, as LLaMA's) can describe fewer heads: others
derive it as ``hidden_size // num_attention_heads``, so a model with fewer heads would not reload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neuronmerge.criteria import check_ratio, kept_count
from neuronmerge.errors import InvalidArgumentError

#: Relative tolerance of "equal" rows and of "``v_i`` is a multiple of ``v_j``" (float32 weights).
TOLERANCE = 1e-5


@dataclass(frozen=True)
class AttentionSpec:
    """Where a block's attention lives (paths relative to the block) and the config's head fields."""

    q: str
    k: str
    v: str
    o: str
    heads_field: str = "num_attention_heads"
    kv_heads_field: str = "num_key_value_heads"
    head_dim_field: str = "head_dim"


@dataclass(frozen=True)
class HeadReport:
    """Key/value groups before and after (the same in every block) and how many were merged."""

    groups_before: int
    groups_after: int
    heads_before: int
    heads_after: int
    merged: int


def _shapes(config: Any, spec: AttentionSpec) -> tuple[int, int, int]:
    heads = getattr(config, spec.heads_field)
    groups = getattr(config, spec.kv_heads_field, None) or heads
    width = getattr(config, spec.head_dim_field, None) or config.hidden_size // heads
    return heads, groups, width


def _group_rows(layer: nn.Linear, groups: int) -> Tensor:
    """``layer``'s rows and bias as one row block per group: ``(groups, rows per group * (in + 1))``."""
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
    rows = torch.cat([layer.weight.detach(), bias.detach()[:, None]], dim=1)
    return rows.reshape(groups, -1)


def _same(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * float(b.abs().max())))


def _scale(v_i: Tensor, v_j: Tensor) -> float | None:
    """``s > 0`` with ``v_i == s v_j``, or ``None``."""
    norm = float(v_j.norm())
    if norm == 0:
        return None
    s = float(v_i @ v_j) / norm**2
    return s if s > 0 and _same(v_i, s * v_j) else None


def plan_block(
    q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, groups: int, keep: int, merge: bool
) -> tuple[list[int], dict[int, tuple[int, float]]]:
    """Kept groups (ascending) and, per removed group merged away, (kept group, scale)."""
    qs, ks, vs = _group_rows(q, groups), _group_rows(k, groups), _group_rows(v, groups)
    columns = o.weight.detach().T.reshape(groups, -1)
    score = qs.abs().sum(1) + ks.abs().sum(1) + vs.abs().sum(1) + columns.abs().sum(1)
    order = sorted(range(groups), key=lambda g: -float(score[g]))
    duplicate: dict[int, tuple[int, float]] = {}
    roots: list[int] = []
    for g in order:
        match = None
        if merge:
            for r in roots:
                s = _scale(vs[g], vs[r]) if _same(qs[g], qs[r]) and _same(ks[g], ks[r]) else None
                if s is not None:
                    match = (r, s)
                    break
        if match is None:
            roots.append(g)
        else:
            duplicate[g] = match
    # duplicates go first (merging them changes nothing), then the weakest of the rest
    removal = sorted(duplicate, key=lambda g: float(score[g])) + roots[::-1]
    removed = set(removal[: groups - keep])
    kept = sorted(set(range(groups)) - removed)
    merges = {g: duplicate[g] for g in removed if g in duplicate and duplicate[g][0] in kept}
    return kept, merges


def _linears(block: nn.Module, spec: AttentionSpec) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """The block's q, k, v and o layers, which must be plain Linears."""
    layers = [block.get_submodule(getattr(spec, name)) for name in ("q", "k", "v", "o")]
    found = [layer for layer in layers if isinstance(layer, nn.Linear)]
    if len(found) != 4:
        kinds = ", ".join(type(layer).__name__ for layer in layers)
        raise InvalidArgumentError(f"attention layers must be nn.Linear, got {kinds}")
    return found[0], found[1], found[2], found[3]


def _rows(layer: nn.Linear, index: Tensor) -> nn.Linear:
    small = nn.Linear(layer.in_features, len(index), bias=layer.bias is not None)
    small.weight = nn.Parameter(layer.weight.detach()[index].clone(), requires_grad=False)
    if layer.bias is not None:
        small.bias = nn.Parameter(layer.bias.detach()[index].clone(), requires_grad=False)
    return small.to(layer.weight.dtype)


def apply_block(
    block: nn.Module,
    spec: AttentionSpec,
    shapes: tuple[int, int, int],
    kept: Sequence[int],
    merges: dict[int, tuple[int, float]],
) -> None:
    """Replace ``block``'s q/k/v/o by the layers of the kept groups, merged columns folded in."""
    heads, groups, width = shapes
    rep = heads // groups
    q, k, v, o = _linears(block, spec)
    columns = o.weight.detach().clone().reshape(o.out_features, groups, rep * width)
    for gone, (into, s) in merges.items():
        columns[:, into] += s * columns[:, gone]
    index = torch.tensor(list(kept))
    per_group = lambda size: (index[:, None] * size + torch.arange(size)).reshape(-1)  # noqa: E731
    new_o = nn.Linear(len(kept) * rep * width, o.out_features, bias=o.bias is not None)
    new_o.weight = nn.Parameter(columns[:, index].reshape(o.out_features, -1), requires_grad=False)
    if o.bias is not None:
        new_o.bias = nn.Parameter(o.bias.detach().clone(), requires_grad=False)
    replacements = {
        spec.q: _rows(q, per_group(rep * width)),
        spec.k: _rows(k, per_group(width)),
        spec.v: _rows(v, per_group(width)),
        spec.o: new_o.to(o.weight.dtype),
    }
    for path, layer in replacements.items():
        parent, _, name = path.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, name, layer)
    attention = block.get_submodule(spec.q.rpartition(".")[0])
    for attribute, value in (("num_heads", len(kept) * rep), ("num_key_value_heads", len(kept))):
        if isinstance(getattr(attention, attribute, None), int):  # older layouts keep counts here
            setattr(attention, attribute, value)


def kept_groups(config: Any, spec: AttentionSpec, ratio: float) -> int:
    """Key/value groups each block keeps after removing ``ratio`` of them (validated here)."""
    groups = _shapes(config, spec)[1]
    keep = kept_count(groups, check_ratio(ratio))
    if keep < 1:
        raise InvalidArgumentError(f"heads={ratio} leaves no key/value head of {groups}")
    return keep


def compress_heads(
    blocks: Sequence[tuple[str, nn.Module]], spec: AttentionSpec, config: Any, ratio: float, merge: bool
) -> HeadReport:
    """Remove ``ratio`` of the key/value groups of every block in place (the same count in each) and
    write the new counts and the head width into ``config``."""
    heads, groups, width = shapes = _shapes(config, spec)
    keep = kept_groups(config, spec, ratio)
    merged = 0
    for _, block in blocks:
        kept, merges = plan_block(*_linears(block, spec), groups, keep, merge)
        apply_block(block, spec, shapes, kept, merges)
        merged += len(merges)
    rep = heads // groups
    setattr(config, spec.heads_field, keep * rep)
    setattr(config, spec.kv_heads_field, keep)
    setattr(config, spec.head_dim_field, width)
    return HeadReport(groups, keep, heads, keep * rep, merged)
