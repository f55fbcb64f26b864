"""``merge`` and ``prune``: kept channels by a norm criterion on what each channel computes, removed
ones folded into their most similar kept one (merge) or dropped (prune).

Rows. A producer's channel computes ``a (w . x + b) + c`` where ``a, c`` fold the BatchNorms that
alone read it; its row is ``[a w | a b + c]``. The producers of one *root* (every layer adding into
one residual stream) are one channel each, their rows side by side; the factors of a product (the
gate and the up projection of a gated pair) are separate roots.

Merge. Removed channel ``i`` goes to the kept channel ``j`` of highest cosine similarity (the mean
over roots), with the norm ratio ``s_r = |f_i| / |f_j|`` per root, unless the similarity is below the
threshold. Where rows are exact positive multiples, channel ``i`` *is* ``s_r`` times channel ``j`` at
the roots; ``propagate`` follows that through the group's steps to every tensor the consumers read:

* a positively homogeneous activation of degree k turns ``s`` into ``s**k`` (``s > 0`` needed);
* a per-channel affine map ``y = K x + b`` (BatchNorm after the activation, LayerScale, depthwise
  conv) turns ``x_i = s x_j + d`` into ``y_i = s' y_j + d'`` with ``s' = s <K_i, K_j> / |K_j|^2``
  and ``d' = d sum(K_i) + b_i - s' b_j``; the constant ``d'`` goes into the consumers' biases;
* a product of two roots multiplies their scales (a gate with equal rows has ``s = 1``);
* an add needs the same ``s`` from each branch: producers whose outputs meet there unchanged share
  a root, while a branch that changed the pair's scale on the way (RepVGG's identity BatchNorm)
  comes from another root with its own ratio; a pair the branches disagree on (beyond the square
  root of the dtype's epsilon) is no multiple of its partner from there on, and is dropped there;
* pooling, padding, views and sums pass ``s`` and ``d`` on.

Exact on duplicates, whatever the group's shape; elsewhere the same approximation as the paper.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from neuronmerge import attention, criteria
from neuronmerge.attention import HeadPlan
from neuronmerge.decompose import (
    Decomposition,
    Rows,
    best_partners,
    identity_on_kept,
    norm_ratio,
    norm_ratio_stacked,
)
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.methods.base import GroupDecomposition, Inputs, balanced_kept_count
from neuronmerge.types import Group, Step

if TYPE_CHECKING:
    from neuronmerge.options import Options


def _norm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``a, c`` with ``bn(x) = a x + c`` per channel (inference)."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    n = bn.running_mean.shape[0]
    weight = bn.weight.detach() if bn.weight is not None else torch.ones(n)
    bias = bn.bias.detach() if bn.bias is not None else torch.zeros(n)
    a = weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bias - a * bn.running_mean


def producer_rows(
    graph_module: fx.GraphModule, producer: str, folded: Sequence[str], block: int = 1
) -> Rows:
    """``[a w | a b + c]`` of one producer, factored (see ``decompose.Rows``); with ``block`` rows
    per channel (a head's), each channel's rows side by side."""
    layer = graph_module.get_submodule(producer)
    assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
    weight = layer.weight.detach().flatten(1)
    if block > 1:
        assert not folded
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(weight.shape[0])
        rows = torch.cat([weight, bias[:, None].to(weight.dtype)], dim=1)
        return Rows(rows.reshape(weight.shape[0] // block, -1))
    scale: torch.Tensor | None = None
    shift = layer.bias.detach() if layer.bias is not None else None
    for name in folded:
        a, c = _norm_affine(graph_module.get_submodule(name))
        a, c = a.to(weight.dtype), c.to(weight.dtype)
        scale = a if scale is None else a * scale
        shift = c if shift is None else a * shift + c
    return Rows(weight, scale, shift)


def root_rows(graph_module: fx.GraphModule, group: Group) -> list[Rows]:
    """One ``Rows`` per root: a single producer's factored rows, or several side by side."""
    per_root: list[list[Rows]] = [[] for _ in range(max(group.roots) + 1)]
    for producer, root, folded in zip(group.producers, group.roots, group.folded, strict=True):
        block = group.rows_per_channel(producer)
        per_root[root].append(producer_rows(graph_module, producer, folded, block))
    return [rows[0] if len(rows) == 1 else Rows.side_by_side(rows) for rows in per_root]


def kept_channels(rows: list[Rows], criterion: str, keep: int, group: Group) -> torch.Tensor:
    """The ``keep`` channels of highest score on all of the group's rows."""
    if len(rows) == 1:
        return criteria.select_kept(criteria.channel_scores(rows[0], criterion), keep)
    # A norm of rows side by side is the norm of the roots' norms: no concatenated copy.
    if criterion == "l1-norm":
        scores = torch.stack([r.l1_norms() for r in rows]).sum(0)
    elif criterion == "l2-norm":
        scores = torch.linalg.vector_norm(torch.stack([r.l2_norms() for r in rows]), dim=0)
    else:
        scores = criteria.channel_scores(Rows.side_by_side(rows), criterion)
    return criteria.select_kept(scores, keep)


def pair(
    rows: list[Rows], kept: torch.Tensor, threshold: float | None, criterion: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each channel's kept partner position (-1: dropped) and its scale per root."""
    if len(rows) == 1:
        norms = rows[0].l2_norms() if criterion == "l2-norm" else None
        dec = norm_ratio(rows[0], kept, threshold, norms)
        return dec.target, [dec.scale]
    n = rows[0].weight.shape[0]
    is_kept = torch.zeros(n, dtype=torch.bool)
    is_kept[kept] = True
    removed = torch.nonzero(~is_kept).flatten()
    target = torch.full((n,), -1, dtype=torch.long)
    target[kept] = torch.arange(kept.shape[0])
    dtype = rows[0].weight.dtype
    root_norms = [r.l2_norms() for r in rows]
    inverses = [torch.where(norm > 0, norm, 1).reciprocal() for norm in root_norms]
    dead = torch.zeros(kept.shape[0], dtype=torch.bool)
    for norm in root_norms:
        dead |= norm[kept] == 0
    # The mean cosine over the roots (``decompose.best_partners``: no normalised or concatenated
    # copy of the rows, whose size is the MLP's for a gated one).
    best, choice = best_partners(rows, removed, kept, inverses, dead)
    accept = torch.isfinite(best) if threshold is None else best >= threshold
    target[removed] = torch.where(accept, choice, -1)
    scales = []
    for norm in root_norms:
        scale = torch.ones(n, dtype=dtype)
        ratio = norm[removed] / torch.where(norm[kept] > 0, norm[kept], 1)[choice]
        scale[removed] = torch.where(accept, ratio, 0)
        scales.append(scale)
    return target, scales


@dataclass
class _Flow:
    """How each channel relates to its partner at one tensor: ``x_i = s x_j + d``, valid or not
    (``d`` is ``None`` where it is zero: most steps reset it, and a consumer then needs no shift)."""

    s: torch.Tensor
    d: torch.Tensor | None
    valid: torch.Tensor


def _affine_params(
    graph_module: fx.GraphModule, step: Step, channels: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, b)`` of an affine step: per channel a kernel row and a constant."""
    assert step.params is not None
    kind, target = step.params
    span = slice(step.offset, step.offset + channels)
    if kind == "batchnorm":
        a, c = _norm_affine(graph_module.get_submodule(target))
        return a[span, None].to(dtype), c[span].to(dtype)
    if kind == "depthwise":
        conv = graph_module.get_submodule(target)
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
        bias = conv.bias.detach()[span] if conv.bias is not None else torch.zeros(channels)
        return conv.weight.detach()[span].flatten(1).to(dtype), bias.to(dtype)
    value = graph_module.get_parameter(target).detach().flatten()[span].to(dtype)
    if kind == "scale":
        return value[:, None], torch.zeros(channels, dtype=dtype)
    return torch.ones(channels, 1, dtype=dtype), value


def _sum(first: torch.Tensor | None, second: torch.Tensor | None, sign: float) -> torch.Tensor | None:
    """``first + sign * second`` where ``None`` is zero."""
    if second is None:
        return first
    return sign * second if first is None else first + sign * second


def propagate(
    graph_module: fx.GraphModule,
    group: Group,
    kept: torch.Tensor,
    target: torch.Tensor,
    scales: list[torch.Tensor],
) -> dict[str, Decomposition]:
    """The Z of every consumed tensor, from partners and root scales (see the module docstring)."""
    n = group.channels
    dtype = scales[0].dtype
    tolerance = torch.finfo(dtype).eps ** 0.5
    merged = target >= 0
    partner: torch.Tensor | None = None  # each channel's kept partner (itself where unmerged)
    flows: dict[str, _Flow] = {}
    root_steps = [s for s in group.steps if s.kind == "root"]
    for step, root in zip(root_steps, group.roots, strict=True):
        flows[step.node] = _Flow(scales[root], None, merged)
    for step in group.steps[len(root_steps) :]:
        inputs = [flows[name] for name in step.inputs if name in flows]
        first = inputs[0]
        if step.kind in ("pass", "mixing"):
            flow = first
        elif step.kind == "maxpool":
            flow = _Flow(first.s, first.d, first.valid & (first.s > 0))
        elif step.kind == "homogeneous":
            positive = first.s > 0
            s = first.s.clamp_min(0)
            flow = _Flow(s if step.degree == 1 else s**step.degree, None, first.valid & positive)
        elif step.kind == "nonhomogeneous":
            flow = _Flow(first.s, None, first.valid)
        elif step.kind == "affine":
            if partner is None:
                partner = torch.arange(n)
                partner[merged] = kept[target[merged]]
            kernel, bias = _affine_params(graph_module, step, n, dtype)
            own, other = kernel, kernel[partner]
            energy = other.square().sum(1)
            ratio = torch.where(energy > 0, (own * other).sum(1) / torch.where(energy > 0, energy, 1), 0)
            s = first.s * ratio
            carried = bias if first.d is None else first.d * own.sum(1) + bias
            flow = _Flow(s, carried - s * bias[partner], first.valid)
        elif step.kind == "add":
            # Both branches must carry the pair at the same scale (a BatchNorm on one branch
            # changes it): where they disagree the channel is no multiple of its partner here.
            second = inputs[1] if len(inputs) > 1 else first
            agree = torch.isclose(first.s, second.s, rtol=tolerance, atol=0)
            valid = first.valid & second.valid & agree
            flow = _Flow(first.s, _sum(first.d, second.d, step.degree), valid)
        elif step.kind == "attention":
            # softmax(q k^T) v per head: a head is s times another where its queries and keys
            # equal the other's (scale 1) and its values are s times the other's.
            query, key, value = inputs
            flow = _Flow(value.s, None, query.valid & key.valid & value.valid)
        else:  # mul: a gate
            second = inputs[1] if len(inputs) > 1 else first
            flow = _Flow(first.s * second.s, None, first.valid & second.valid)
        flows[step.node] = flow
    result: dict[str, Decomposition] = {}
    positions = torch.arange(kept.shape[0])
    for consumer in group.consumers:
        if consumer.tensor in result:
            continue
        flow = flows[consumer.tensor]
        ok = flow.valid & merged
        at_target = torch.where(ok, target, -1)
        at_target[kept] = positions
        scale = torch.where(ok, flow.s, 0).to(dtype)
        scale[kept] = 1
        shift = None
        if flow.d is not None:
            shift = torch.where(ok, flow.d, 0)
            shift[kept] = 0
            if not bool((shift != 0).any()):
                shift = None
        result[consumer.tensor] = Decomposition(kept, at_target, scale, None, shift)
    return result


def _rows_in(rows: Rows, span: slice) -> Rows:
    return Rows(
        rows.weight[span],
        None if rows.scale is None else rows.scale[span],
        None if rows.shift is None else rows.shift[span],
    )


def select_and_pair(
    rows: list[Rows], group: Group, keep: int, options: Options, merge: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Kept channels, each channel's partner position and its scale per root, block by block (a
    grouped conv's blocks each keep ``keep / blocks`` channels and merge only among themselves)."""
    per_block = keep // group.blocks
    kept_parts, target_parts = [], []
    scale_parts: list[list[torch.Tensor]] = [[] for _ in rows]
    for index, span in enumerate(group.block_spans()):
        sub = rows if group.blocks == 1 else [_rows_in(r, span) for r in rows]
        kept = kept_channels(sub, options.criterion, per_block, group)
        if merge:
            target, scales = pair(sub, kept, options.threshold, options.criterion)
        else:
            identity = identity_on_kept(sub[0].weight.shape[0], kept, sub[0].weight.dtype)
            target, scales = identity.target, [identity.scale for _ in rows]
        if index:  # a later block's channels and partners, as positions in the whole group
            kept = kept + span.start
            target = torch.where(target >= 0, target + index * per_block, -1)
        kept_parts.append(kept)
        target_parts.append(target)
        for part, scale in zip(scale_parts, scales, strict=True):
            part.append(scale)
    if group.blocks == 1:
        return kept_parts[0], target_parts[0], [part[0] for part in scale_parts]
    return (
        torch.cat(kept_parts),
        torch.cat(target_parts),
        [torch.cat(part) for part in scale_parts],
    )


#: Bytes of weight rows stacked at once by ``stacked_pairs``: sites up to a few hundred kilobytes
#: each (where per-site operations, not arithmetic, are the cost), never a copy of a large layer.
#: A stack is a copy, so it is bounded small: on ResNet-56 (a 3.4 MB model) at ratio 0.5, 256 KiB
#: stacks took the same 66 CPU ms as 4 MiB ones (70 ms unstacked) and a peak of about 1.4 MB above
#: the model instead of 2.5 MB (fresh processes, one thread).
_STACK_BYTES = 2**18
_STACK_SITE_BYTES = 2**18


def stacked_pairs(
    groups: Sequence[Group],
    rows_of: Mapping[str, list[Rows]],
    keep: Mapping[str, int],
    options: Options,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """``select_and_pair`` (merging) of the small single-row-set groups that share a shape, a
    stack at a time (``decompose.norm_ratio_stacked``); the kept channels, partners and scales by
    group name. Groups alone of their shape, large, grouped, read as heads or left to pruning are
    not here (``select_and_pair`` takes them one by one)."""
    if options.criterion not in ("l1-norm", "l2-norm"):
        return {}
    alike: dict[tuple[object, ...], list[tuple[str, Rows]]] = defaultdict(list)
    for group in groups:
        rows = rows_of[group.name]
        weight = rows[0].weight
        if (
            len(rows) > 1
            or group.blocks > 1
            or group.pattern == "heads"
            or group.mode == "prune-only"
            or weight.numel() * weight.element_size() > _STACK_SITE_BYTES
        ):
            continue
        shape = (weight.shape, weight.dtype, rows[0].scale is None, rows[0].shift is None)
        alike[(*shape, keep[group.name])].append((group.name, rows[0]))
    result = {}
    for members in alike.values():
        if len(members) < 2:
            continue  # alone of its shape: nothing to share
        count = keep[members[0][0]]
        size = members[0][1].weight.numel() * members[0][1].weight.element_size()
        per_stack = max(2, _STACK_BYTES // size)
        for start in range(0, len(members), per_stack):
            chunk = members[start : start + per_stack]
            names, parts = zip(*chunk, strict=True)
            scales = [r.scale for r in parts]
            shifts = [r.shift for r in parts]
            stack = Rows(
                torch.stack([r.weight for r in parts]),
                None if scales[0] is None else torch.stack(scales),  # type: ignore[arg-type]
                None if shifts[0] is None else torch.stack(shifts),  # type: ignore[arg-type]
            )
            kept = criteria.select_kept(criteria.channel_scores(stack, options.criterion), count)
            norms = stack.l2_norms() if options.criterion == "l2-norm" else None
            target, scale = norm_ratio_stacked(stack, kept, options.threshold, norms)
            for index, name in enumerate(names):
                result[name] = (kept[index], target[index], [scale[index]])
    return result


class NormRatio:
    """``merge`` (``merge=True``) and ``prune``: see the module docstring."""

    data_free = True
    fits_on_batches = False  # the weights alone

    def __init__(self, merge: bool) -> None:
        self.merge = merge
        self.name = "merge" if merge else "prune"

    def refusal(self, group: Group, options: Options) -> str | None:
        # Pruning could shrink any group; it shrinks the ones merging does, so that the two compare
        # at the same size (``approximate=True`` opens every group to both).
        if group.mode == "exact" or options.approximate:
            return None
        return group.why

    def kept_count(self, group: Group, ratio: float) -> int:
        return balanced_kept_count(group, ratio)

    def decompose(
        self,
        graph_module: fx.GraphModule,
        groups: Sequence[Group],
        keep: Mapping[str, int],
        options: Options,
        inputs: Inputs,
    ) -> dict[str, GroupDecomposition]:
        result = {}
        rows_of = {group.name: root_rows(graph_module, group) for group in groups}
        stacked = stacked_pairs(groups, rows_of, keep, options) if self.merge else {}
        for group in groups:
            rows = rows_of[group.name]
            merge = self.merge and group.mode != "prune-only"
            if keep[group.name] % group.blocks:
                raise InvalidArgumentError(
                    f"{group.name}: keeping {keep[group.name]} channels splits its "
                    f"{group.blocks} conv groups unevenly"
                )
            heads_group = group.pattern == "heads"
            if group.name in stacked:
                kept, target, scales = stacked[group.name]
            else:
                kept, target, scales = select_and_pair(
                    rows, group, keep[group.name], options, merge and not heads_group
                )
            if merge and heads_group:
                q, k, v = _roles(group)
                target, value_scale = attention.head_pairs(
                    [rows[q], rows[k], rows[v]], kept, options.threshold
                )
                scales = [torch.ones_like(value_scale) for _ in rows]
                scales[v] = value_scale
            heads = {
                name: self._heads(graph_module.get_submodule(name), int(kept.shape[0]), merge, options)
                for name in group.attention
            }
            if not merge:
                prune = identity_on_kept(group.channels, kept, rows[0].weight.dtype)
                at = {c.tensor: prune for c in group.consumers}
                result[group.name] = GroupDecomposition(kept, at, 0, heads)
                continue
            at = propagate(graph_module, group, kept, target, scales)
            # Merged: folded into a kept channel at some consumer (a pair the branches of an add
            # disagree on is dropped there).
            folded = torch.zeros(group.channels, dtype=torch.bool)
            for dec in at.values():
                folded |= dec.target >= 0
            merged = int(folded.sum()) - int(kept.shape[0])
            result[group.name] = GroupDecomposition(kept, at, merged, heads)
        return result

    def _heads(self, module: nn.Module, kept: int, merge: bool, options: Options) -> HeadPlan:
        """The inner dims of an attention narrowed to ``kept``: whole heads merged like channels
        (on their query, key and value rows) when ``merge``, else pruned (see ``attention``)."""
        assert isinstance(module, nn.MultiheadAttention)
        count, width = attention.head_layout(module.embed_dim, module.num_heads, kept)
        if not merge or width != module.embed_dim // module.num_heads:
            return attention.pruned(module, kept, options.criterion)
        rows = attention.head_rows(module)
        whole = Rows.side_by_side(rows)
        chosen = criteria.select_kept(criteria.channel_scores(whole, options.criterion), count)
        target, scale = attention.head_pairs(rows, chosen, options.threshold)
        return attention.whole_heads(module, chosen, target, scale)


def _roles(group: Group) -> tuple[int, int, int]:
    """The roots of a head group that the attention reads as query, key and value."""
    origin: dict[str, int] = {}
    root_steps = [s for s in group.steps if s.kind == "root"]
    for step, root in zip(root_steps, group.roots, strict=True):
        origin[step.node] = root
    for step in group.steps[len(root_steps) :]:
        if step.kind == "attention":
            q, k, v = (origin[name] for name in step.inputs)
            return q, k, v
        known = [origin[name] for name in step.inputs if name in origin]
        if known:
            origin[step.node] = known[0]
    raise ValueError(f"{group.name} has no attention step")
