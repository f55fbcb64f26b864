"""The public entry points: ``merge``, ``prune``, ``plan`` (and ``compress``, which returns a report).

All of them run the same pipeline, capture -> sites -> criteria -> decompose -> surgery, on a deep copy
of the caller's model; ``prune`` differs from ``merge`` only in the decomposition (Z = identity on the
kept channels) and ``plan`` stops after finding the sites.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from neuronmerge import criteria, decompose, lsq, surgery
from neuronmerge.capture import ExampleInputs, as_input_tuple, capture, detach
from neuronmerge.errors import InvalidArgumentError, NeuronMergeError
from neuronmerge.evaluate import count_parameters
from neuronmerge.notices import warn_about_outcome
from neuronmerge.planning import LayerRow, Totals, layer_rows
from neuronmerge.probes import synthesize_probes
from neuronmerge.sites import Site, Skipped, find_sites

Method = Literal["merge", "prune", "merge-ls"]
#: Every ``method`` of ``compress``: whether it is data-free, and its idea in one line.
METHODS: dict[str, tuple[bool, str]] = {
    "prune": (True, "drop the removed neurons (same kept set as merge)"),
    "merge": (True, "the paper: fold each removed neuron into its most similar kept one"),
    "merge-ls": (
        True,
        "least-squares merge of each removed neuron into all kept ones, kept set chosen to cover "
        "the others; moments measured on synthetic probes (data-free) or on calibration batches",
    ),
}
Fidelity = Literal["exact", "paper"]

#: Cosine-similarity threshold below which a removed neuron is dropped rather than merged
#: (``fidelity="exact"``); ``None`` merges every removed neuron into its most similar kept one. Chosen
#: on a validation split carved from Fashion-MNIST's training data: the best mean accuracy over ratios
#: 0.5-0.8 and the four models trained here (``experiments/threshold_validation.json``).
DEFAULT_THRESHOLD: float | None = 0.1
#: The paper's lambda for conv + BatchNorm sites (their scripts use 0.85 for VGG-16 and ResNet-56).
PAPER_LAMBDA = 0.85


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


@dataclass(frozen=True)
class Plan:
    """Every producer of a model: mergeable sites and skipped layers with the reason."""

    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...]
    #: With ``plan(..., ratio=...)``: every Linear/Conv layer before and after, and the model totals.
    layers: tuple[LayerRow, ...] = ()
    totals: Totals | None = None
    #: With ``ratio`` and ``approximate=True``: the measured output change (see ``Report``).
    output_error: float | None = None

    def __str__(self) -> str:
        lines = [f"{len(self.sites)} mergeable site(s), {len(self.skipped)} skipped"]
        for site in self.sites:
            norm = f" -> {site.norm}" if site.norm else ""
            readers = ", ".join(c.module for c in site.consumers)
            approx = (
                f" [approximate through {', '.join(site.approximate_through)}]"
                if site.approximate_through
                else ""
            )
            lines.append(f"  merge {site.producer}{norm} ({site.channels} ch) -> {readers}{approx}")
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
    ratio: float
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


@dataclass(frozen=True)
class Result:
    """A compressed model, the report of how it was made, and the sites it compressed."""

    model: fx.GraphModule
    report: Report
    sites: tuple[Site, ...] = ()


def _select(
    sites: list[Site], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[Site], list[Skipped]]:
    chosen: list[Site] = []
    left_out: list[Skipped] = []
    for site in sites:
        wanted = include is None or any(fnmatch.fnmatchcase(site.producer, p) for p in include)
        unwanted = exclude is not None and any(fnmatch.fnmatchcase(site.producer, p) for p in exclude)
        if wanted and not unwanted:
            chosen.append(site)
        else:
            left_out.append(Skipped(site.producer, "left out by include/exclude"))
    return chosen, left_out


def _site_tensors(gm: fx.GraphModule, site: Site) -> decompose.SiteTensors:
    layer = gm.get_submodule(site.producer)
    assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
    weight = layer.weight.detach().flatten(1)
    bias = layer.bias.detach() if layer.bias is not None else None
    bn = None
    if site.norm is not None:
        norm = gm.get_submodule(site.norm)
        assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
        bn = decompose.BatchNormParams.of(norm)
    return decompose.SiteTensors(weight, bias, bn)


def _decompose_site(
    site: Site,
    tensors: decompose.SiteTensors,
    *,
    ratio: float,
    method: Method,
    criterion: str,
    threshold: float | None,
    lam: float,
    fidelity: Fidelity,
) -> decompose.Decomposition:
    paper = fidelity == "paper"
    rows = tensors.raw() if paper else tensors.folded()
    # The authors truncate kept counts for their conv nets and round them for LeNet-300-100.
    rounding = "floor" if paper and site.kind == "conv" else "round"
    keep = criteria.kept_count(site.channels, ratio, rounding)
    if keep < 1:
        raise InvalidArgumentError(
            f"ratio {ratio} keeps 0 of the {site.channels} channels of {site.producer}; "
            "use a smaller ratio or exclude this layer"
        )
    # NaN and infinities were refused for the whole model up front (``_check_finite``).
    scores = criteria.channel_scores(rows, criterion)
    kept = criteria.select_kept(scores, keep)
    if method == "prune":
        return decompose.identity_on_kept(site.channels, kept, rows.weight.dtype)
    if paper and tensors.bn is not None:
        return decompose.paper_conv_bn(tensors.weight, tensors.bn, kept, threshold, lam)
    return decompose.norm_ratio(rows, kept, threshold, scores if criterion == "l2-norm" else None)


def _check_options(
    method: str, criterion: str, fidelity: str, threshold: float | None, lam: float | None
) -> None:
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "merge-ls" and fidelity != "exact":
        raise InvalidArgumentError("method='merge-ls' has no paper fidelity")
    if criterion not in criteria.CRITERIA:
        raise InvalidArgumentError(
            f"unknown criterion {criterion!r}; choose one of {', '.join(criteria.CRITERIA)}"
        )
    if fidelity not in ("exact", "paper"):
        raise InvalidArgumentError(f"fidelity must be 'exact' or 'paper', got {fidelity!r}")
    if threshold is not None and not -1 <= threshold <= 1:
        raise InvalidArgumentError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if lam is not None:
        if fidelity != "paper":
            raise InvalidArgumentError("lam applies to fidelity='paper' only (conv + BatchNorm)")
        if not 0 <= lam <= 1:
            raise InvalidArgumentError(f"lam must be in [0, 1], got {lam}")


def _check_finite(gm: fx.GraphModule) -> None:
    """Refuse NaN or infinite parameters or buffers (BatchNorm statistics) anywhere: merging would
    spread them through Z into the kept neurons and the readers, and the similarity scores would be
    meaningless."""
    tensors = [*gm.named_parameters(), *gm.named_buffers()]
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        # One summing pass screens a tensor without allocating a mask; only a non-finite sum (NaN,
        # inf, or an overflow of finite values) pays for the exact elementwise test.
        data = tensor.detach()
        if not torch.isfinite(data.sum()) and not torch.isfinite(data).all():
            module, _, leaf = name.rpartition(".")
            raise InvalidArgumentError(f"{module or '<model>'}: {leaf} holds NaN or infinite values")


def compress(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float = 0.5,
    *,
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
    """Remove the fraction ``ratio`` of neurons at every mergeable site; return model and report.

    ``method="merge"`` folds each removed neuron into its most similar kept one (when their cosine
    similarity reaches ``threshold``; ``None`` merges all); ``"prune"`` drops them. ``"merge-ls"``
    (beyond the paper) keeps the neurons that best explain the others and writes each removed one as
    a least-squares combination of all kept ones plus a constant, from activation moments measured on
    ``calibration`` batches (model inputs, no labels): by default synthetic probes made from the model
    itself (``synthesize_probes``; data-free), or real samples if you pass them (then it is data-aware);
    it ignores ``criterion`` and ``threshold``, and then re-measures the BatchNorm statistics of the
    result on the same batches. ``fidelity="paper"``
    reproduces the authors' code, including where it deviates from exactness (conv + BatchNorm, with
    ``lam`` weighing cosine against BN-bias distance, and a threshold of 0 meaning "none").
    ``include``/``exclude`` are glob patterns on producer layer names. ``approximate=True`` also
    merges through elementwise activations that are not positively homogeneous (GELU, SiLU, tanh...),
    which is no longer exact: the report then carries the measured ``output_error``. The input model
    is not modified. Merging is defined on inference statistics: the result computes what
    ``model.eval()`` computes, in eval mode. A ``CompressionWarning`` says when ``model`` was in
    training mode, and when no layer or only some layers could take ``ratio`` (``plan`` says why).
    """
    ratio = criteria.check_ratio(ratio)
    _check_options(method, criterion, fidelity, threshold, lam)
    if fidelity == "paper" and threshold == 0:
        threshold = None
    inputs = as_input_tuple(example_inputs)
    gm = capture(model, inputs)
    _check_finite(gm)
    all_sites, skipped = find_sites(gm, approximate)
    sites, left_out = _select(all_sites, include, exclude)
    params_before = count_parameters(gm)
    if method == "merge-ls":
        if calibration is None and len(inputs) != 1:
            raise InvalidArgumentError(
                "merge-ls makes synthetic probes for single-input models only; pass calibration="
            )
        batches = (
            synthesize_probes(gm, inputs[0])
            if calibration is None
            else [as_input_tuple(batch) for batch in calibration]
        )
        decompositions = lsq.decompositions(gm, sites, ratio, batches)
    else:
        decompositions = {
            site.producer: _decompose_site(
                site,
                _site_tensors(gm, site),
                ratio=ratio,
                method=method,
                criterion=criterion,
                threshold=threshold,
                lam=PAPER_LAMBDA if lam is None else lam,
                fidelity=fidelity,
            )
            for site in sites
        }
    expected = _traced_output_shapes(gm, inputs)
    # The approximate error needs the original outputs; surgery changes ``gm``, so run it first.
    reference = _run(gm, inputs) if approximate else None
    owned = surgery.apply(gm, sites, decompositions)
    small = detach(gm, owned)
    if method == "merge-ls":
        small = lsq.remeasure_batchnorm(small, batches)
    try:
        with torch.no_grad():
            produced = small(*inputs)
    except Exception as exc:  # a bug of ours, not the user's: say so plainly
        raise NeuronMergeError(f"the compressed model failed to run ({exc}); please report") from exc
    if _shapes(produced) != expected:
        raise NeuronMergeError("the compressed model's output shape changed; please report")

    reports = []
    for site in sites:
        dec = decompositions[site.producer]
        kept = int(dec.kept.shape[0])
        merged = int(dec.merged().shape[0])
        reports.append(
            SiteReport(
                producer=site.producer,
                kind=site.kind,
                channels=site.channels,
                kept=kept,
                merged=merged,
                dropped=site.channels - kept - merged,
                consumers=tuple(dict.fromkeys(c.module for c in site.consumers)),
                approximate_through=site.approximate_through,
            )
        )
    report = Report(
        method=method,
        ratio=ratio,
        criterion=criterion,
        threshold=threshold,
        fidelity=fidelity,
        params_before=params_before,
        params_after=count_parameters(small),
        sites=tuple(reports),
        skipped=tuple(skipped + left_out),
        approximate=approximate,
        output_error=None if reference is None else _relative_error(produced, reference),
    )
    warn_about_outcome(model, ratio, len(report.sites), report.skipped)
    return Result(small, report, tuple(sites))


def _run(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> object:
    with torch.no_grad():
        return gm(*inputs)


def _flat(output: object) -> torch.Tensor:
    """Every floating-point tensor of a (nested) model output, as one float64 vector."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.detach().flatten().double()
    if isinstance(output, dict):
        output = list(output.values())
    parts = [_flat(item) for item in output] if isinstance(output, (tuple, list)) else []
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _relative_error(produced: object, expected: object) -> float:
    """``||produced - expected|| / ||expected||`` over all floating outputs (0 when both are 0)."""
    got, want = _flat(produced), _flat(expected)
    scale = torch.linalg.vector_norm(want)
    change = torch.linalg.vector_norm(got - want)
    return float(change / scale) if scale > 0 else float(change)


def _traced_output_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> object:
    """The original model's output shapes, as ``_shapes`` writes them, from capture's shape record.

    Reading them saves a forward pass of the full model (a fifth of a second for VGG-16 at 224 x 224);
    an output holding no tensor has no record, and is run instead, as are torch.export modules.
    """
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    # torch.export's modules rebuild their output structure in generated code (a pytree codegen):
    # the graph's own output is then not what the caller gets, so run those too.
    if "tensor_meta" not in output.meta or isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
        with torch.no_grad():
            return _shapes(gm(*inputs))
    return _shapes(output.meta["tensor_meta"])


def _shapes(output: object) -> object:
    if isinstance(output, (torch.Tensor, TensorMetadata)):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return [_shapes(item) for item in output]
    if isinstance(output, dict):
        return {key: _shapes(value) for key, value in output.items()}
    return type(output).__name__


def merge(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float = 0.5,
    *,
    criterion: str = "l1-norm",
    threshold: float | None = DEFAULT_THRESHOLD,
    lam: float | None = None,
    fidelity: Fidelity = "exact",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    approximate: bool = False,
) -> fx.GraphModule:
    """Neuron merging: a smaller model whose removed neurons are folded into kept ones.

    ``approximate=True`` merges through non-homogeneous activations too; use ``compress`` to read
    the measured output error from its report.
    """
    return compress(
        model,
        example_inputs,
        ratio,
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
    ratio: float = 0.5,
    *,
    criterion: str = "l1-norm",
    fidelity: Fidelity = "exact",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    approximate: bool = False,
) -> fx.GraphModule:
    """Structured pruning with the same topology as ``merge`` and no compensation.

    ``approximate=True`` also prunes layers followed by non-homogeneous activations (the same sites
    that approximate merging uses).
    """
    return compress(
        model,
        example_inputs,
        ratio,
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
) -> Plan:
    """Every candidate site of ``model``: mergeable or skipped, and why. Changes nothing.

    With ``ratio`` (and the options of ``compress``) the plan also runs the compression, without
    returning the model, and fills ``layers``: each Linear/Conv layer's channels kept / merged /
    dropped, or the reason it is skipped, with its parameters and MACs before and after, and
    ``totals`` for the whole model. ``sites`` are then the sites the compression used.
    ``approximate=True`` plans as ``compress(..., approximate=True)`` would merge.
    """
    if ratio is None:
        found, skipped = find_sites(capture(model, example_inputs), approximate)
        return Plan(tuple(found), tuple(skipped))
    result = compress(
        model,
        example_inputs,
        ratio,
        method=method,
        criterion=criterion,
        threshold=threshold,
        lam=lam,
        fidelity=fidelity,
        include=include,
        exclude=exclude,
        approximate=approximate,
    )
    report = result.report
    rows, totals = layer_rows(
        model,
        result.model,
        as_input_tuple(example_inputs),
        method,
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
