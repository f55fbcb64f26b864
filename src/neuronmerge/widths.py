"""The kept width of every group: from one ratio, explicit per-layer ratios, or a parameter/MAC target.

The bridge between the channel groups and ``budget`` (which sees plain values only): it describes
each group by a ``costs.GroupShape`` and an error curve from its weights
(``budget.merge_error_curve``), asks ``budget`` for the widths, and hands the method a kept count per
group. Without a target the counts come from ``engine.kept_counts`` (the method's own rounding).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence

import torch
from torch import fx

from neuronmerge import budget, criteria, engine
from neuronmerge.costs import GroupShape, model_costs
from neuronmerge.decompose import Rows
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.lsq import MomentSource, consumer_energy, covering_inputs
from neuronmerge.methods.base import Method
from neuronmerge.methods.norm_ratio import root_rows
from neuronmerge.types import Group

#: The fraction removed per group when neither a ratio nor a target is given.
DEFAULT_RATIO = 0.5
#: Compare groups by the fraction of their signal lost (``True``) rather than its raw size: chosen
#: on the validation split by the first budget sweep, before the trust band (its ``error-absolute``
#: rows in ``experiments/budget_sweep.json`` as of commit e6e6d0e); not re-measured since.
RELATIVE_CURVES = True
#: Under a target, ``merge-ls`` (given its moments) ranks groups by its own least-squares
#: residual on the probes' moments rather than by the weights' merge residual: chosen on the
#: validation split (``experiments/budget_validation.py``, ``experiments/budget_validation.json``).
LEAST_SQUARES_CURVES = True
#: Under a target, residual streams keep the uniform allocation's width (``budget.GroupBudget.held``):
#: chosen on resnet-fmnist's validation split (``experiments/budget_streams.py``, ``.json``).
HOLD_STREAMS = True


def costed(graph_module: fx.GraphModule, group: Group) -> bool:
    """Whether ``costs`` models the group's width exactly: one channel per block, and every slice
    of a per-channel tensor it owns (a whole BatchNorm, or its part after a concatenation; a
    LayerScale vector; a positional embedding along a stream) inside its tensor. Groups whose
    channels come in blocks (grouped convolutions) keep their width under a target rather than be
    costed wrongly; so do groups holding attention or heads, whose inner widths follow."""
    if group.blocks != 1 or group.attention or group.row_blocks:
        return False
    for piece in group.params:
        owner = graph_module.get_submodule(piece.owner)
        tensors = (
            [p for p in owner.parameters(recurse=False) if p.dim() > 0]
            if piece.name == "*"
            else [getattr(owner, piece.name)]
        )
        for tensor in tensors:
            if tensor.dim() <= piece.axis:
                return False
            if piece.offset + piece.block * group.channels > tensor.shape[piece.axis]:
                return False
    return True


def shape_of(group: Group) -> GroupShape:
    """Where ``group``'s channels live, as ``costs`` needs it."""
    return GroupShape(
        name=group.name,
        channels=group.channels,
        producers=group.producers,
        readers=tuple((c.module, c.block) for c in group.consumers),
        params=group.params,
    )


def group_rows(graph_module: fx.GraphModule, group: Group) -> Rows:
    """The rows ``[a*w | c]`` each channel of ``group`` computes (norms folded in), all producers
    side by side."""
    rows = root_rows(graph_module, group)
    return rows[0] if len(rows) == 1 else Rows.side_by_side(rows)


def error_curve(graph_module: fx.GraphModule, group: Group, criterion: str) -> tuple[float, ...]:
    """``budget.merge_error_curve`` of ``group``, channels kept in ``criterion``'s order."""
    rows = group_rows(graph_module, group)
    tensors = dict.fromkeys(c.tensor for c in group.consumers)
    energy = torch.zeros(group.channels, dtype=torch.float64)
    for tensor in tensors:
        energy += consumer_energy(graph_module, group, tensor)
    order = torch.argsort(criteria.channel_scores(rows, criterion), descending=True, stable=True)
    curve = budget.merge_error_curve(rows.dense(), energy, order, RELATIVE_CURVES)
    return tuple(curve.tolist())


def least_squares_curves(
    graph_module: fx.GraphModule, groups: Sequence[Group], source: MomentSource
) -> dict[str, tuple[float, ...]]:
    """Every group's ``merge-ls`` error as a function of its kept count: the consumer-weighted
    variance its least-squares merge leaves unexplained on the moments ``source`` gives
    (``criteria.covering_curve``, the loss ``merge-ls`` itself minimises), over its whole variance."""
    moments = source.moments(graph_module, list(groups))
    curves = {}
    for group in groups:
        curve = criteria.covering_curve(*covering_inputs(graph_module, group, moments))
        if RELATIVE_CURVES and curve[0] > 0:
            curve = curve / curve[0]
        curves[group.name] = tuple(curve.tolist())
    return curves


def holds(group: Group) -> bool:
    """Whether a target keeps ``group`` at the uniform allocation's width (``HOLD_STREAMS``)."""
    return HOLD_STREAMS and group.pattern == "residual"


def allocated(graph_module: fx.GraphModule, group: Group, request: budget.Request) -> bool:
    """Whether ``group``'s width under ``request``'s target is the allocation's to choose: costed
    (``costed``), with no explicit ratio, and not held (``holds``)."""
    return costed(graph_module, group) and explicit_ratio(group, request) is None and not holds(group)


def explicit_ratio(group: Group, request: budget.Request) -> float | None:
    """The ratio of the first ``request.ratios`` glob matching one of the group's producers."""
    return next(
        (r for glob, r in request.ratios if any(fnmatch.fnmatchcase(p, glob) for p in group.producers)),
        None,
    )


def kept_counts(
    graph_module: fx.GraphModule,
    groups: Sequence[Group],
    inputs: tuple[torch.Tensor, ...],
    ratio: float | None,
    request: budget.Request,
    method: Method,
    *,
    criterion: str = "l1-norm",
    moments: MomentSource | None = None,
    band: float | None = None,
    impact: Mapping[str, tuple[int, float]] | None = None,
) -> dict[str, int]:
    """How many channels every group keeps.

    Without a target: ``ratio`` (or the group's entry of ``request.ratios``) removed from each, as
    ``engine.kept_counts`` rounds it, then snapped to ``request.round_to``. With a target: groups
    with an explicit ratio keep that width, groups ``costs`` cannot model (``costed``) keep all
    their channels, and the others get the widths ``budget`` allocates, from their merge
    residual on the weights, or, given ``merge-ls``'s ``moments`` source, from its least-squares
    residual on them (``least_squares_curves``), each within ``band`` of the uniform widths
    (default ``budget.BAND``). ``impact`` (group name -> (width, output error), from
    ``group_impact``) rescales those groups' curves to equal the measured error at that width
    (``budget.rescaled``). Raises
    ``InvalidArgumentError`` when a group would keep no channel or the target is out of reach.
    """
    shares: dict[str, float] = {}
    for group in groups:
        r = explicit_ratio(group, request)
        if r is None and request.metric is None:
            r = DEFAULT_RATIO if ratio is None else ratio
        if r is not None:
            shares[group.name] = r
    fixed = engine.kept_counts([g for g in groups if g.name in shares], shares, method)
    if request.round_to > 1:
        for group in groups:
            if group.name in fixed:
                step = math.lcm(request.round_to, group.blocks, group.multiple)
                whole = budget.GroupBudget("", group.channels, (), 1, group.channels)
                fixed[group.name] = budget.snap(whole, fixed[group.name], step)
    if request.metric is None:
        return fixed
    for group in groups:
        if group.name in fixed and not costed(graph_module, group):
            raise InvalidArgumentError(
                f"{group.name}: a per-layer ratio cannot be combined with a target here (its "
                "channels come in blocks, or share a per-channel tensor with other channels, which "
                "the cost model does not split); exclude it or drop the target"
            )
    # Groups ``costs`` cannot model keep their width, and count as constants.
    modelled = [g for g in groups if costed(graph_module, g)]
    costs = model_costs(graph_module, [shape_of(g) for g in modelled], inputs)
    terms = costs.params if request.metric == "params" else costs.macs
    whole_model = budget.total(terms, {g.name: g.channels for g in modelled})
    free = [g for g in modelled if g.name not in fixed]
    curves: dict[str, tuple[float, ...]] = {}
    if request.allocation == "error" and moments is not None and LEAST_SQUARES_CURVES:
        curves = least_squares_curves(graph_module, free, moments)
    elif request.allocation == "error":
        curves = {g.name: error_curve(graph_module, g, criterion) for g in free}
    budgets = []
    for group in modelled:
        if group.name in fixed:
            keep = fixed[group.name]
            budgets.append(budget.GroupBudget(group.name, group.channels, (), keep, keep))
            continue
        curve = curves.get(group.name, (0.0,) * (group.channels + 1))
        if impact and group.name in impact and group.name in curves:
            curve = budget.rescaled(curve, *impact[group.name])
        held = holds(group)
        budgets.append(budget.GroupBudget(group.name, group.channels, curve, 1, group.channels, held))
    what = "parameters" if request.metric == "params" else "MACs per example"
    target = request.absolute(whole_model)
    if request.allocation == "error":
        kept = budget.allocate(budgets, terms, target, round_to=request.round_to, what=what, band=band)
    else:
        kept = budget.uniform(budgets, terms, target, round_to=request.round_to, what=what)
    return {g.name: kept.get(g.name, g.channels) for g in groups}
