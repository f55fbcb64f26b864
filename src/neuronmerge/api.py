"""The public entry points: ``merge``, ``prune``, ``plan`` (and ``compress``, which returns a report).

All of them build one validated ``Options`` and run the stages of ``engine`` (capture -> groups ->
decompose -> surgery -> verify) on a structural copy of the caller's model; the method (``prune``,
``merge``, the paper's, ``merge-ls``) is an object chosen by the options, and ``plan`` stops after
finding the groups.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from neuronmerge import allocation_check, engine, group_impact, lsq, norm_repair, probes, widths
from neuronmerge.budget import Allocation
from neuronmerge.capture import ExampleInputs, as_input_tuple
from neuronmerge.criteria import check_ratio
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.evaluate import count_parameters
from neuronmerge.methods.base import GroupDecomposition, Inputs
from neuronmerge.methods.base import Method as MethodObject
from neuronmerge.methods.paper import PAPER_LAMBDA
from neuronmerge.notices import warn_about_outcome
from neuronmerge.options import DEFAULT_THRESHOLD, METHODS, Fidelity, Options
from neuronmerge.options import MethodName as Method
from neuronmerge.planning import LayerRow, Totals, layer_rows
from neuronmerge.types import Group, Skipped

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHODS",
    "PAPER_LAMBDA",
    "Plan",
    "Report",
    "Result",
    "SiteReport",
    "compress",
    "merge",
    "plan",
    "prune",
]


@dataclass(frozen=True)
class SiteReport:
    """What happened at one site."""

    producer: str
    kind: str
    channels: int
    kept: int
    merged: int
    dropped: int
    consumers: tuple[str, ...]
    approximate_through: tuple[str, ...] = ()
    #: Every layer writing the group's channels (several for a residual stream or a gated pair).
    producers: tuple[str, ...] = ()
    mode: str = "exact"


@dataclass(frozen=True)
class Plan:
    """Every producer of a model: its group (``sites``) or the reason it is skipped."""

    sites: tuple[Group, ...]
    skipped: tuple[Skipped, ...]
    #: With ``plan(..., ratio=...)``: every Linear/Conv layer before and after, and the model totals.
    layers: tuple[LayerRow, ...] = ()
    totals: Totals | None = None
    #: With ``ratio`` and ``approximate=True``: the measured output change (see ``Report``).
    output_error: float | None = None

    def __str__(self) -> str:
        lines = [f"{len(self.sites)} group(s), {len(self.skipped)} producer(s) skipped"]
        for site in self.sites:
            norm = f" -> {site.norm}" if site.norm else ""
            writers = " + ".join(site.producers)
            readers = ", ".join(dict.fromkeys(c.module for c in site.consumers))
            approx = (
                f" [approximate through {', '.join(site.approximate_through)}]"
                if site.approximate_through
                else ""
            )
            width = (
                f"{site.channels} heads"
                if site.pattern == "heads"
                else f"{site.channels} ch, {site.pattern}"
            )
            why = f" [{site.why}]" if site.mode == "prune-only" else ""
            lines.append(f"  {site.mode} {writers}{norm} ({width}) -> {readers}{approx}{why}")
        for skip in self.skipped:
            lines.append(f"  skip  {skip.producer}: {skip.reason}")
        if self.totals is not None:
            t = self.totals
            lines.append(
                f"parameters {t.params_before:,} -> {t.params_after:,}, "
                f"MACs per example {t.macs_before:,} -> {t.macs_after:,}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """The settings of one compression and what it did at every site."""

    method: Method
    #: The fraction removed from every group that no ``ratios`` glob matched; ``None`` when a
    #: target chose the widths, or when ``ratios`` matched every group.
    ratio: float | None
    criterion: str
    threshold: float | None
    fidelity: Fidelity
    params_before: int
    params_after: int
    sites: tuple[SiteReport, ...] = field(default=())
    skipped: tuple[Skipped, ...] = field(default=())
    approximate: bool = False
    #: With ``approximate=True``: the relative L2 change of the model's output on the example inputs,
    #: ``||small(x) - model(x)|| / ||model(x)||``. It measures everything the compression changed
    #: (non-duplicate neurons merged or dropped, and activations treated as homogeneous).
    output_error: float | None = None
    #: The budget asked for (as passed: a fraction kept or a count), and how widths were chosen:
    #: ``"uniform"`` (asked for, or the allocation found no closer to the model on the probes:
    #: ``allocation_check``), ``"error"`` (the allocation, checked on them) or ``"error-unchecked"``
    #: (``UNCHECKED``: the allocation as the error curves give it, no probes to check it on).
    target_params: float | None = None
    target_macs: float | None = None
    allocation: str | None = None
    #: The ``ratios`` asked for, as (glob, fraction removed) pairs, first match wins; each site's
    #: ``kept`` of ``channels`` says what it took.
    ratios: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Result:
    """A compressed model, the report of how it was made, and the groups it compressed."""

    model: fx.GraphModule
    report: Report
    sites: tuple[Group, ...] = ()


def compress(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float | None = None,
    *,
    target_params: float | None = None,
    target_macs: float | None = None,
    ratios: Mapping[str, float] | None = None,
    round_to: int | None = None,
    allocation: Allocation = "error",
    method: Method = "merge",
    criterion: str = "l1-norm",
    threshold: float | None = DEFAULT_THRESHOLD,
    lam: float | None = None,
    fidelity: Fidelity = "exact",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    calibration: Iterable[ExampleInputs] | None = None,
    approximate: bool = False,
) -> Result:
    """Remove the fraction ``ratio`` of the channels of every group; return model and report.

    A group is a set of coupled channels (one layer's outputs, a residual stream written by several
    layers, the two factors of a gated MLP; see ``types.Group``); all its layers lose the same ones.

    ``method="merge"`` folds each removed neuron into its most similar kept one (when their cosine
    similarity reaches ``threshold``; ``None`` merges all); ``"prune"`` drops them. ``"merge-ls"``
    (beyond the paper) keeps the neurons that best explain the others and writes each removed one as
    a least-squares combination of all kept ones plus a constant, from activation moments measured on
    ``calibration`` batches (model inputs, no labels): by default synthetic probes made from the model
    itself (``probes.cached_probes``: data-free, made once per model and reused at other ratios), or
    real samples if you pass them (then it is data-aware); none at all when no site is found;
    it ignores ``criterion`` and ``threshold``, and then repairs the BatchNorm statistics of the
    result on the same batches: on its own probes it moves the stored statistics by the change the
    merge made there (``norm_repair``; ``lsq.BATCHNORM_REPAIR``), on calibration batches it
    re-measures them. ``fidelity="paper"``
    reproduces the authors' code, including where it deviates from exactness (conv + BatchNorm, with
    ``lam`` weighing cosine against BN-bias distance, and a threshold of 0 meaning "none").
    ``include``/``exclude`` are glob patterns on producer layer names (a group is chosen when one of
    its producers is included and none excluded). ``approximate=True`` also merges through
    elementwise activations that are not positively homogeneous (GELU, SiLU, tanh...), which is no
    longer exact, and prunes groups whose channels meet a LayerNorm or a softmax across them: the
    report then carries the measured ``output_error``. The input model is not modified. Merging is
    defined on inference statistics: the result computes what ``model.eval()`` computes, in eval
    mode. A ``CompressionWarning`` says when ``model`` was in training mode, and when no layer or only
    some layers could take ``ratio`` (``plan`` says why).

    Budgets: ``ratio`` (default 0.5) removes the same fraction from every group. ``target_params`` or
    ``target_macs`` (a fraction of the model's count kept, or an int count; MACs per example as
    ``count_flops`` counts them) instead chooses every group's width so that the result lands within
    1% of the target: ``allocation="error"`` (default) removes channels where their merge residual
    (from the weights alone; for ``merge-ls`` its least-squares residual on the probes' moments) is
    smallest per parameter (or MAC) saved, each group within a trust band around the uniform widths
    (see ``budget``); every method then builds the uniform widths too, and keeps an allocation only
    when its outputs on the model's synthetic probes (or the ``calibration`` batches: ``merge`` and
    ``prune`` read them for this check alone; ``merge-ls``, which fits on its probes, is scored on
    fresh ones of another seed) are significantly closer to the model's, and only
    tries one when the uniform widths' are not already as close as the probes can vouch for
    (``allocation_check``; the report's ``allocation`` says which widths were kept). Making the
    probes costs seconds on a small net, once per model; where none can be made (several inputs,
    integer inputs, outputs other than class logits) and no ``calibration`` is given, the
    allocation is kept unchecked (``allocation == "error-unchecked"``). ``"uniform"`` removes one
    fraction from every group. ``ratios={"glob": r}``
    fixes the fraction removed from groups with a matching producer (first match wins); the target
    then sets the others, and without one the others lose ``ratio`` (the report lists both).
    ``round_to=N`` keeps widths multiples of N (or whole). An unreachable target raises
    ``InvalidArgumentError`` with the reachable range.
    """
    options = Options.of(
        method=method,
        criterion=criterion,
        threshold=threshold,
        lam=lam,
        fidelity=fidelity,
        include=include,
        exclude=exclude,
        approximate=approximate,
        target_params=target_params,
        target_macs=target_macs,
        ratios=ratios,
        round_to=round_to,
        allocation=allocation,
    )
    return _compress(model, example_inputs, ratio, options, calibration)


def _compress(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float | None,
    options: Options,
    calibration: Iterable[ExampleInputs] | None = None,
    *,
    in_place: bool = False,
    announce: bool = True,
) -> Result:
    """``compress`` with its options validated once, as ``Options``; ``announce=False`` leaves the
    shortfall warning to a caller that shows every layer and why itself (``plan``).

    ``in_place=True`` is for internal callers that own ``model`` and drop it (``streaming``, one
    checkpoint layer at a time): the resized weights are written over the model's own weight memory
    instead of beside it, so a layer never exists twice; ``model``'s tensors are garbage afterwards.
    It is not offered by ``compress``, whose callers' models are never touched.
    """
    targeted = options.budget.metric is not None
    if ratio is not None:
        ratio = check_ratio(ratio)
        if targeted:
            raise InvalidArgumentError("give a ratio or a target (target_params/target_macs), not both")
    chosen = options.method_object()
    inputs = as_input_tuple(example_inputs)
    gm, recorded = engine.capture_with_outputs(model, inputs)
    # The approximate error needs the original outputs: capture's forward computed them already.
    reference = engine.reference_outputs(gm, inputs, recorded) if options.approximate else None
    del recorded
    groups, skipped = engine.groups(gm, options, chosen)
    params_before = count_parameters(gm)
    expected = engine.output_shapes(gm, inputs)
    source = None
    if chosen.fits_on_batches:
        why = None if calibration is not None or not groups else probes.unavailable(inputs, expected)
        if why:
            raise InvalidArgumentError(f"{chosen.name} fits on batches, and {why}; pass calibration=")
        source = lsq.moment_source(gm, inputs[0], calibration, groups)
    allocation: str | None = options.budget.allocation if targeted else None
    batches: tuple[tuple[torch.Tensor, ...], ...] = ()
    if allocation == "error" and allocation_check.ENABLED and groups:
        batches = _check_batches(gm, inputs, expected, calibration, source)
        allocation = "error" if batches else UNCHECKED
    if batches:
        fresh = None
        fitted = isinstance(source, lsq.MeasuredMoments) and calibration is None
        if fitted and allocation_check.CHECK_SEED is not None:
            fresh = functools.partial(_check_probes, gm, inputs[0], allocation_check.CHECK_SEED)
        small, decompositions, allocation = _checked_allocation(
            gm, groups, inputs, options, chosen, source, batches, fresh
        )
    else:
        keep = widths.kept_counts(
            gm,
            groups,
            inputs,
            ratio,
            options.budget,
            chosen,
            criterion=options.criterion,
            moments=source,
        )
        small, decompositions = _build(
            gm, groups, keep, options, inputs, source, chosen, in_place=in_place
        )
    error = engine.verify(small, inputs, expected, reference)

    reports = []
    for group in groups:
        dec = decompositions[group.name]
        kept = int(dec.kept.shape[0])
        reports.append(
            SiteReport(
                producer=group.name,
                kind=group.kind,
                channels=group.channels,
                kept=kept,
                merged=dec.merged,
                dropped=group.channels - kept - dec.merged,
                consumers=tuple(dict.fromkeys(c.module for c in group.consumers)),
                approximate_through=group.approximate_through,
                producers=group.producers,
                mode=group.mode,
            )
        )
    defaulted = any(widths.explicit_ratio(g, options.budget) is None for g in groups)
    report = Report(
        method=options.method,
        ratio=None if targeted or not defaulted else widths.DEFAULT_RATIO if ratio is None else ratio,
        criterion=options.criterion,
        threshold=None if options.fidelity == "paper" and options.threshold == 0 else options.threshold,
        fidelity=options.fidelity,
        params_before=params_before,
        params_after=count_parameters(small),
        sites=tuple(reports),
        skipped=tuple(skipped),
        approximate=options.approximate,
        output_error=error,
        target_params=options.budget.amount if options.budget.metric == "params" else None,
        target_macs=options.budget.amount if options.budget.metric == "macs" else None,
        allocation=allocation,
        ratios=options.budget.ratios,
    )
    # Under a target every group may take some width: the same outcome check as a nonzero ratio.
    warn_about_outcome(
        model,
        1.0 if report.ratio is None else report.ratio,
        len(report.sites),
        report.skipped if announce else (),
    )
    return Result(small, report, tuple(groups))


def _build(
    gm: fx.GraphModule,
    groups: list[Group],
    keep: Mapping[str, int],
    options: Options,
    inputs: tuple[torch.Tensor, ...],
    source: lsq.MomentSource | None,
    chosen: MethodObject,
    *,
    in_place: bool = False,
) -> tuple[fx.GraphModule, dict[str, GroupDecomposition]]:
    """Decompose, cut (``gm`` is changed; ``in_place``: see ``_compress``) and, for ``merge-ls``,
    repair: the compressed graph."""
    decompositions = engine.decompose(gm, groups, keep, options, Inputs(inputs, source), chosen)
    small = engine.surgery(gm, groups, decompositions, in_place)
    if source is not None:
        small = source.repair(small, groups, decompositions)
    return small, decompositions


#: ``Report.allocation`` when the allocation was kept without the whole-model check: no batches to
#: check it on (a model with several inputs, integer inputs such as token ids, or outputs other
#: than class logits, and no ``calibration`` batches).
UNCHECKED = "error-unchecked"


def _check_batches(
    gm: fx.GraphModule,
    inputs: tuple[torch.Tensor, ...],
    output_shape: object,
    calibration: Iterable[ExampleInputs] | None,
    source: lsq.MomentSource | None,
) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The batches ``_checked_allocation`` scores the candidate widths on: those the method fits on
    (``merge-ls``'s probes or calibration batches), else the caller's ``calibration`` batches, else
    the model's synthetic probes (``probes.cached_probes``: the inputs alone, made once per model
    and shared with ``merge-ls``); none where probes cannot be made (``probes.unavailable``)."""
    if isinstance(source, lsq.MeasuredMoments):
        return source.batches
    if calibration is not None:
        return tuple(as_input_tuple(batch) for batch in calibration)
    if probes.unavailable(inputs, output_shape) is not None:
        return ()
    return tuple(probes.cached_probes(gm, inputs[0]))


def _checked_allocation(
    gm: fx.GraphModule,
    groups: list[Group],
    inputs: tuple[torch.Tensor, ...],
    options: Options,
    chosen: MethodObject,
    source: lsq.MomentSource | None,
    batches: tuple[tuple[torch.Tensor, ...], ...],
    fresh: Callable[[], tuple[tuple[torch.Tensor, ...], ...]] | None = None,
) -> tuple[fx.GraphModule, dict[str, GroupDecomposition], str]:
    """Under a target: the uniform widths and the allocation at every band of
    ``allocation_check.BANDS``, and the one whose outputs on ``batches`` stay closest to the dense
    model's kept (an allocation only when significantly closer than uniform, and not at all when
    uniform's error is already negligible; see ``allocation_check``). ``fresh``, for a method that
    fits on ``batches``: makes the probes the candidates are scored on instead (called only when a
    candidate is scored), with ``allocation_check.FITTED_BANDS`` and ``FITTED_SIGNIFICANCE``.
    Returns the graph, its decompositions, and ``"error"`` or ``"uniform"`` for the widths kept."""
    dense = allocation_check.outputs(gm, batches)
    uniform = _uniform_widths(gm, groups, inputs, options, chosen)
    uniform_errors, built = _probe_errors(
        gm, groups, uniform, options, inputs, chosen, source, batches, dense
    )
    best = ("uniform", uniform, uniform_errors, built)
    if not allocation_check.negligible(uniform_errors):
        bands: tuple[float, ...] = allocation_check.BANDS
        threshold = allocation_check.SIGNIFICANCE
        if fresh is not None and built is not None:  # not with HELD_OUT: its folds are batches'
            batches = fresh()
            dense = allocation_check.outputs(gm, batches)
            uniform_errors = allocation_check.probe_errors(
                allocation_check.outputs(built[0], batches), dense
            )
            best = ("uniform", uniform, uniform_errors, built)
            bands, threshold = allocation_check.FITTED_BANDS, allocation_check.FITTED_SIGNIFICANCE
        impact = None
        if group_impact.ENABLED and isinstance(source, lsq.MeasuredMoments):
            impact = _impact(gm, groups, uniform, options, inputs, chosen, source)
        allocations = _band_widths(gm, groups, inputs, options, chosen, source, uniform, bands, impact)
        for label, keep in allocations:
            errors, built = _probe_errors(
                gm, groups, keep, options, inputs, chosen, source, batches, dense
            )
            if allocation_check.replaces(uniform_errors, best[2], errors, threshold):
                best = (label, keep, errors, built)
    label, keep, _, built = best
    if built is None:
        built = _build(copy.deepcopy(gm), groups, keep, options, inputs, source, chosen)
    return built[0], built[1], "uniform" if label == "uniform" else "error"


def _uniform_widths(
    gm: fx.GraphModule,
    groups: list[Group],
    inputs: tuple[torch.Tensor, ...],
    options: Options,
    chosen: MethodObject,
) -> dict[str, int]:
    """The widths of ``options``' target with the same fraction removed from every group: the
    baseline ``_checked_allocation`` holds each allocation against."""
    uniform_request = dataclasses.replace(options.budget, allocation="uniform")
    return widths.kept_counts(gm, groups, inputs, None, uniform_request, chosen)


def _band_widths(
    gm: fx.GraphModule,
    groups: list[Group],
    inputs: tuple[torch.Tensor, ...],
    options: Options,
    chosen: MethodObject,
    source: lsq.MomentSource | None,
    uniform: dict[str, int],
    bands: Sequence[float] | None = None,
    impact: Mapping[str, tuple[int, float]] | None = None,
) -> Iterator[tuple[str, dict[str, int]]]:
    """The allocations ``_checked_allocation`` holds against the ``uniform`` widths, by label,
    made as they are asked for: the allocation at each of ``bands`` (default
    ``allocation_check.BANDS``) that differs from uniform's and those before it (its curves
    rescaled by ``impact``, see ``widths.kept_counts``)."""
    seen = [uniform]
    for band in allocation_check.BANDS if bands is None else bands:
        keep = widths.kept_counts(
            gm,
            groups,
            inputs,
            None,
            options.budget,
            chosen,
            criterion=options.criterion,
            moments=source,
            band=band,
            impact=impact,
        )
        if keep not in seen:
            seen.append(keep)
            yield f"band {band}", keep


def _impact(
    gm: fx.GraphModule,
    groups: list[Group],
    uniform_keep: Mapping[str, int],
    options: Options,
    inputs: tuple[torch.Tensor, ...],
    chosen: MethodObject,
    source: lsq.MeasuredMoments,
) -> dict[str, tuple[int, float]]:
    """Per group the allocation moves and the uniform widths cut: its uniform width and the output
    error on the probes of cutting it alone there (``group_impact``)."""
    cut = [
        g
        for g in groups
        if uniform_keep[g.name] < g.channels and widths.allocated(gm, g, options.budget)
    ]
    if not cut:
        return {}
    decompositions = engine.decompose(gm, cut, uniform_keep, options, Inputs(inputs, source), chosen)
    errors = group_impact.output_errors(gm, cut, decompositions, source)
    return {name: (uniform_keep[name], error) for name, error in errors.items()}


def _check_probes(
    gm: fx.GraphModule, example: torch.Tensor, seed: int
) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The probes the check scores ``merge-ls``'s candidates on, on its data-free path: made as its
    own are, with another seed (``allocation_check.CHECK_SEED``), so that no candidate's fit saw
    them; made once per model and reused at other targets."""
    return tuple(probes.cached_probes(gm, example, seed=seed))


def _probe_errors(
    gm: fx.GraphModule,
    groups: list[Group],
    keep: Mapping[str, int],
    options: Options,
    inputs: tuple[torch.Tensor, ...],
    chosen: MethodObject,
    source: lsq.MomentSource | None,
    batches: tuple[tuple[torch.Tensor, ...], ...],
    dense: torch.Tensor,
    held_out: bool | None = None,
) -> tuple[torch.Tensor, tuple[fx.GraphModule, dict[str, GroupDecomposition]] | None]:
    """Per batch row, how far the model compressed to ``keep`` is from ``gm``'s outputs ``dense``
    on ``batches`` (``allocation_check``), and that model. ``held_out`` (default
    ``allocation_check.HELD_OUT``; only for a method that fits on the batches, ``source``): each
    probe scored by a model fitted on the other fold only (``allocation_check.folds``), and no
    model returned (the chosen widths are built once more, on every probe)."""
    held_out = allocation_check.HELD_OUT if held_out is None else held_out
    if not (held_out and isinstance(source, lsq.MeasuredMoments)):
        built = _build(copy.deepcopy(gm), groups, keep, options, inputs, source, chosen)
        produced = allocation_check.outputs(built[0], batches)
        return allocation_check.probe_errors(produced, dense), built
    pieces: list[torch.Tensor] = []
    references: list[torch.Tensor] = []
    for fit, scored in allocation_check.folds(batches):
        # The same repair as ``source``'s, on the fold: stored statistics moved by the change
        # measured on it, or re-measured on it.
        reference = None if source.reference is None else norm_repair.normalised_moments(gm, fit)
        fitted = lsq.MeasuredMoments(fit, reference or None)
        small, _ = _build(copy.deepcopy(gm), groups, keep, options, inputs, fitted, chosen)
        pieces.append(allocation_check.outputs(small, scored))
        references.append(allocation_check.outputs(gm, scored))
    return allocation_check.probe_errors(torch.cat(pieces), torch.cat(references)), None


def merge(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float | None = None,
    *,
    target_params: float | None = None,
    target_macs: float | None = None,
    ratios: Mapping[str, float] | None = None,
    round_to: int | None = None,
    allocation: Allocation = "error",
    criterion: str = "l1-norm",
    threshold: float | None = DEFAULT_THRESHOLD,
    lam: float | None = None,
    fidelity: Fidelity = "exact",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    approximate: bool = False,
) -> fx.GraphModule:
    """Neuron merging: a smaller model whose removed neurons are folded into kept ones.

    ``ratio`` (default 0.5) or a budget (``target_params``, ``target_macs``, ``ratios``,
    ``round_to``, ``allocation``) as in ``compress``. ``approximate=True`` merges through
    non-homogeneous activations too; use ``compress`` to read the measured output error from its
    report.
    """
    return compress(
        model,
        example_inputs,
        ratio,
        target_params=target_params,
        target_macs=target_macs,
        ratios=ratios,
        round_to=round_to,
        allocation=allocation,
        method="merge",
        criterion=criterion,
        threshold=threshold,
        lam=lam,
        fidelity=fidelity,
        include=include,
        exclude=exclude,
        approximate=approximate,
    ).model


def prune(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float | None = None,
    *,
    target_params: float | None = None,
    target_macs: float | None = None,
    ratios: Mapping[str, float] | None = None,
    round_to: int | None = None,
    allocation: Allocation = "error",
    criterion: str = "l1-norm",
    fidelity: Fidelity = "exact",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    approximate: bool = False,
) -> fx.GraphModule:
    """Structured pruning with the same topology as ``merge`` and no compensation.

    ``ratio`` (default 0.5) or a budget as in ``compress``. ``approximate=True`` also prunes layers
    followed by non-homogeneous activations (the same sites that approximate merging uses).
    """
    return compress(
        model,
        example_inputs,
        ratio,
        target_params=target_params,
        target_macs=target_macs,
        ratios=ratios,
        round_to=round_to,
        allocation=allocation,
        method="prune",
        criterion=criterion,
        fidelity=fidelity,
        include=include,
        exclude=exclude,
        approximate=approximate,
    ).model


def plan(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float | None = None,
    *,
    method: Method = "merge",
    criterion: str = "l1-norm",
    threshold: float | None = DEFAULT_THRESHOLD,
    lam: float | None = None,
    fidelity: Fidelity = "exact",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    approximate: bool = False,
    target_params: float | None = None,
    target_macs: float | None = None,
    ratios: Mapping[str, float] | None = None,
    round_to: int | None = None,
    allocation: Allocation = "error",
) -> Plan:
    """Every group of ``model`` the method would shrink, and every other layer with why. Changes
    nothing.

    With ``ratio`` (and the options of ``compress``) the plan also runs the compression, without
    returning the model, and fills ``layers``: each Linear/Conv layer's channels kept / merged /
    dropped, or the reason it is skipped, with its parameters and MACs before and after, and
    ``totals`` for the whole model. ``sites`` are then the groups the compression used.
    ``approximate=True`` plans as ``compress(..., approximate=True)`` would merge. A budget
    (``target_params``, ``target_macs``, ``ratios``, ``round_to``, ``allocation``: see
    ``compress``) fills them too, with the width chosen for every group.
    """
    options = Options.of(
        method=method,
        criterion=criterion,
        threshold=threshold,
        lam=lam,
        fidelity=fidelity,
        include=include,
        exclude=exclude,
        approximate=approximate,
        target_params=target_params,
        target_macs=target_macs,
        ratios=ratios,
        round_to=round_to,
        allocation=allocation,
    )
    return _plan(model, example_inputs, ratio, options)


def _plan(
    model: nn.Module, example_inputs: ExampleInputs, ratio: float | None, options: Options
) -> Plan:
    """``plan`` with its options validated once, as ``Options``."""
    if ratio is None and options.budget.metric is None and not options.budget.ratios:
        found, skipped = engine.groups(engine.capture(model, example_inputs), options)
        return Plan(tuple(found), tuple(skipped))
    result = _compress(model, example_inputs, ratio, options, announce=False)
    report = result.report
    rows, totals = layer_rows(
        model,
        result.model,
        as_input_tuple(example_inputs),
        options.method,
        report.sites,
        report.skipped,
    )
    return Plan(
        result.sites,
        report.skipped,
        layers=rows,
        totals=totals,
        output_error=report.output_error,
    )
