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

from neuronmerge import criteria, decompose, lsq, surgery
from neuronmerge.capture import ExampleInputs, as_input_tuple, capture, detach
from neuronmerge.errors import InvalidArgumentError, NeuronMergeError
from neuronmerge.evaluate import count_parameters
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
#: 0.5-0.8 (``experiments/threshold_validation.json``).
DEFAULT_THRESHOLD: float | None = 0.2
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


@dataclass(frozen=True)
class Plan:
    """Every producer of a model: mergeable sites and skipped layers with the reason."""

    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...]

    def __str__(self) -> str:
        lines = [f"{len(self.sites)} mergeable site(s), {len(self.skipped)} skipped"]
        for site in self.sites:
            norm = f" -> {site.norm}" if site.norm else ""
            readers = ", ".join(c.module for c in site.consumers)
            lines.append(f"  merge {site.producer}{norm} ({site.channels} ch) -> {readers}")
        for skip in self.skipped:
            lines.append(f"  skip  {skip.producer}: {skip.reason}")
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


@dataclass(frozen=True)
class Result:
    """A compressed model and the report of how it was made."""

    model: fx.GraphModule
    report: Report


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
    tensors = decompose.SiteTensors(weight, bias, bn)
    for label, tensor in [("weight", weight), ("bias", bias)] + (
        [] if bn is None else [("BatchNorm", torch.stack([bn.weight, bn.bias, bn.mean, bn.var]))]
    ):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise InvalidArgumentError(f"{site.producer}: {label} holds NaN or infinite values")
    return tensors


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
    rows = tensors.raw_rows() if paper else tensors.folded_rows()
    # The authors truncate kept counts for their conv nets and round them for LeNet-300-100.
    rounding = "floor" if paper and site.kind == "conv" else "round"
    keep = criteria.kept_count(site.channels, ratio, rounding)
    if keep < 1:
        raise InvalidArgumentError(
            f"ratio {ratio} keeps 0 of the {site.channels} channels of {site.producer}; "
            "use a smaller ratio or exclude this layer"
        )
    kept = criteria.select_kept(criteria.channel_scores(rows, criterion), keep)
    if method == "prune":
        return decompose.identity_on_kept(site.channels, kept, rows.dtype)
    if paper and tensors.bn is not None:
        return decompose.paper_conv_bn(tensors.weight, tensors.bn, kept, threshold, lam)
    return decompose.norm_ratio(rows, kept, threshold)


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
    ``include``/``exclude`` are glob patterns on producer layer names. The input model is not modified.
    """
    ratio = criteria.check_ratio(ratio)
    _check_options(method, criterion, fidelity, threshold, lam)
    if fidelity == "paper" and threshold == 0:
        threshold = None
    inputs = as_input_tuple(example_inputs)
    gm = capture(model, inputs)
    all_sites, skipped = find_sites(gm)
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
    with torch.no_grad():
        expected = gm(*inputs)
    owned = surgery.apply(gm, sites, decompositions)
    small = detach(gm, owned)
    if method == "merge-ls":
        small = lsq.remeasure_batchnorm(small, batches)
    try:
        with torch.no_grad():
            produced = small(*inputs)
    except Exception as exc:  # a bug of ours, not the user's: say so plainly
        raise NeuronMergeError(f"the compressed model failed to run ({exc}); please report") from exc
    if _shapes(produced) != _shapes(expected):
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
    )
    return Result(small, report)


def _shapes(output: object) -> object:
    if isinstance(output, torch.Tensor):
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
) -> fx.GraphModule:
    """Neuron merging: a smaller model whose removed neurons are folded into kept ones."""
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
) -> fx.GraphModule:
    """Structured pruning with the same topology as ``merge`` and no compensation."""
    return compress(
        model,
        example_inputs,
        ratio,
        method="prune",
        criterion=criterion,
        fidelity=fidelity,
        include=include,
        exclude=exclude,
    ).model


def plan(model: nn.Module, example_inputs: ExampleInputs) -> Plan:
    """Every candidate site of ``model``: mergeable or skipped, and why. Changes nothing."""
    sites, skipped = find_sites(capture(model, example_inputs))
    return Plan(tuple(sites), tuple(skipped))
