"""The ``merge-ls`` method: covering kept sets and least-squares merges from activation moments.

Per group: measure the channels' mean and covariance at every tensor the consumers read
(``activations``), keep the channels that best explain the others, weighted by how much the consumers
read each one (``criteria.covering_kept``, on the tensors' covariances each scaled to unit trace and
summed), and at each tensor write every removed channel as the least-squares combination of the kept
ones plus a constant (``decompose.least_squares``): a residual stream gets one Z per tensor read,
the adds carry the kept channels unchanged. Then the BatchNorm statistics of the result
are repaired on the same batches: merging shifts and shrinks what downstream BatchNorms receive
("variance collapse"; Jordan et al. 2023, REPAIR; Wang et al. 2025, model folding), so the
statistics stored during training normalise the wrong distribution. Calibration batches re-measure
them (``remeasure_batchnorm``); synthetic probes, by ``BATCHNORM_REPAIR``, either re-measure them too
or move the stored ones by the change the merge made on the probes (``norm_repair``). On synthetic
probes this is data-free. The batches are synthetic probes made from the model alone
(``probes``; data-free, the default) or real unlabeled samples when the user has some (data-aware).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import fx, nn

from neuronmerge import attention, criteria, decompose, norm_repair, surgery
from neuronmerge.activations import fit_width, tensor_moments
from neuronmerge.capture import ExampleInputs, as_input_tuple
from neuronmerge.graph.ops import CONVS, LAYERS
from neuronmerge.methods.base import GroupDecomposition
from neuronmerge.probes import cached_probes
from neuronmerge.recalibrate import recalibrate_batchnorm
from neuronmerge.types import Group

#: Eigenvalue floor of the least-squares solve, relative to the kept channels' mean variance. Chosen
#: on the validation split (``experiments/methods_validation.json``).
FLOOR = 1e-6

#: How ``merge-ls`` repairs BatchNorm statistics on its synthetic probes: ``"remeasure"`` replaces
#: them with the probes' statistics (``remeasure_batchnorm``); ``"relative"`` keeps the stored ones
#: and applies the change the merge made on the probes (``norm_repair``: the identity when nothing
#: is merged, blended with re-measuring as channels go). Calibration batches (real samples) always
#: re-measure. Chosen on the validation split of vgg-fmnist and resnet-fmnist at ratios 0.1-0.9
#: (``experiments/bn_repair_validation.json``): mean 61.39 against 61.16 re-measuring; on vgg-fmnist
#: 91.20 against 89.48 at ratio 0.1 (re-measuring alone costs the dense model 92.74 -> 91.16).
BATCHNORM_REPAIR: Literal["remeasure", "relative"] = "relative"


def consumer_energy(graph_module: fx.GraphModule, group: Group, tensor: str) -> torch.Tensor:
    """Per channel (per column of it for a head group: ``fit_width``), the summed squared weights
    of every consumer column that reads ``tensor``."""
    width = fit_width(group)
    energy = torch.zeros(group.channels * width, dtype=torch.float64)
    for piece in group.consumers:
        if piece.tensor != tensor:
            continue
        layer = graph_module.get_submodule(piece.module)
        if isinstance(layer, nn.MultiheadAttention):  # the query/key/value rows reading the stream
            rows = torch.cat(
                [w for w, _ in attention.projections(layer)][: 3 if layer._qkv_same_embed_dim else 1]
            )
            energy += rows.to(torch.float64).square().sum(dim=0)
            continue
        assert isinstance(layer, LAYERS)
        weight = layer.weight.detach().to(torch.float64)
        if isinstance(layer, CONVS) and layer.groups > 1:  # local columns
            blocks = weight.reshape(layer.groups, weight.shape[0] // layer.groups, weight.shape[1], -1)
            energy += blocks.square().sum(dim=(1, 3)).reshape(-1)
            continue
        columns = weight[:, piece.offset : piece.offset + group.channels * piece.block]
        columns = columns.reshape(weight.shape[0], group.channels * width, piece.block // width, -1)
        energy += columns.square().sum(dim=(0, 2, 3))
    return energy


class MomentSource(Protocol):
    """Where ``merge-ls`` gets activation moments, and how it repairs BatchNorm statistics after."""

    def moments(
        self, graph_module: fx.GraphModule, groups: list[Group]
    ) -> dict[tuple[str, str], decompose.Moments]:
        """Mean and covariance of each group's channels at each tensor its consumers read."""
        ...

    def repair(
        self, small: fx.GraphModule, groups: list[Group], decompositions: dict[str, GroupDecomposition]
    ) -> fx.GraphModule:
        """``small`` (the merged graph) with BatchNorm statistics that describe its own inputs."""
        ...


@dataclass(frozen=True)
class MeasuredMoments:
    """Moments measured on batches (synthetic probes or the caller's samples); the BatchNorm
    statistics of the result re-measured on the same batches, or, given ``reference`` (the dense
    model's ``norm_repair.normalised_moments`` on them), moved by the change the merge made."""

    batches: tuple[tuple[torch.Tensor, ...], ...]
    reference: norm_repair.Moments | None = None

    def moments(
        self, graph_module: fx.GraphModule, groups: list[Group]
    ) -> dict[tuple[str, str], decompose.Moments]:
        return tensor_moments(graph_module, groups, self.batches)

    def repair(
        self, small: fx.GraphModule, groups: list[Group], decompositions: dict[str, GroupDecomposition]
    ) -> fx.GraphModule:
        if self.reference is None:
            return remeasure_batchnorm(small, list(self.batches))
        lengths = {name: int(stats[0].shape[0]) for name, stats in self.reference.items()}
        kept = surgery.kept_channels(groups, decompositions, lengths)
        repaired = norm_repair.correct(small, self.batches, self.reference, kept)
        assert isinstance(repaired, fx.GraphModule)
        return repaired


def covering_inputs(
    graph_module: fx.GraphModule, group: Group, moments: Mapping[tuple[str, str], decompose.Moments]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The covariance and consumer energy ``criteria.covering_kept`` chooses ``group``'s kept set
    on: the covariance at the one tensor its consumers read, or the sum of those at several tensors
    each scaled to unit trace, and the energy of every consumer column (over every dim of every
    head for a head group)."""
    tensors = list(dict.fromkeys(c.tensor for c in group.consumers))
    size = group.channels * fit_width(group)
    cov = torch.zeros(size, size, dtype=torch.float64)
    energy = torch.zeros(size, dtype=torch.float64)
    for tensor in tensors:
        c = moments[(group.name, tensor)].cov
        cov += c / c.diagonal().sum().clamp_min(1e-300) if len(tensors) > 1 else c
        energy += consumer_energy(graph_module, group, tensor)
    return cov, energy


def moment_source(
    graph_module: fx.GraphModule,
    example: torch.Tensor,
    calibration: Iterable[ExampleInputs] | None,
    groups: list[Group],
) -> MomentSource:
    """Where ``merge-ls`` gets its moments: ``calibration`` when given, else the model's synthetic
    probes (``cached_probes``: made once per model); no batches at all when no group needs them.
    With ``BATCHNORM_REPAIR == "relative"`` the probes' BatchNorm moments in the dense model are
    measured here, before surgery changes ``graph_module``.

    Probe-free moments anchored on the BatchNorm statistics (``lab.propagate``: closed forms, or
    noise run with batch-normalised BatchNorms) take about a second instead, but lost 4-45
    validation points to the probes on vgg-fmnist and resnet-fmnist at ratios 0.5-0.8
    (``experiments/moments_validation.json``), so the probes stay.
    """
    if not groups:
        return MeasuredMoments(())
    if calibration is not None:
        return MeasuredMoments(tuple(as_input_tuple(batch) for batch in calibration))
    probes = tuple(cached_probes(graph_module, example))
    if BATCHNORM_REPAIR == "relative":
        reference = norm_repair.normalised_moments(graph_module, probes)
        return MeasuredMoments(probes, reference or None)
    return MeasuredMoments(probes)


def decompositions(
    graph_module: fx.GraphModule,
    groups: list[Group],
    keep: dict[str, int],
    source: MomentSource,
    floor: float = FLOOR,
    *,
    intercept: bool = True,
) -> dict[str, GroupDecomposition]:
    """The ``merge-ls`` decomposition of every group, from the moments ``source`` gives
    (``intercept``: see ``decompose.least_squares``)."""
    moments = source.moments(graph_module, groups)
    result: dict[str, GroupDecomposition] = {}
    for group in groups:
        tensors = list(dict.fromkeys(c.tensor for c in group.consumers))
        cov, energy = covering_inputs(graph_module, group, moments)
        if group.pattern == "heads":
            result[group.name] = _heads(group, cov, energy, keep[group.name], moments, floor, intercept)
            continue
        spans = group.block_spans()  # grouped convs: each block keeps as many, merges inside
        per_block = keep[group.name] // group.blocks
        kept = torch.cat(
            [
                criteria.covering_kept(cov[span, span], energy[span], per_block) + span.start
                for span in spans
            ]
        )
        heads = {
            name: attention.pruned(graph_module.get_submodule(name), int(kept.shape[0]), "l1-norm")
            for name in group.attention
        }
        if group.mode == "prune-only":
            prune = decompose.identity_on_kept(group.channels, kept, torch.float32)
            result[group.name] = GroupDecomposition(kept, {t: prune for t in tensors}, 0, heads)
            continue
        at = {t: _blockwise(moments[(group.name, t)], kept, spans, floor, intercept) for t in tensors}
        merged = max(int(d.merged().shape[0]) for d in at.values())
        result[group.name] = GroupDecomposition(kept, at, merged, heads)
    return result


def _heads(
    group: Group,
    cov: torch.Tensor,
    energy: torch.Tensor,
    keep: int,
    moments: Mapping[tuple[str, str], decompose.Moments],
    floor: float,
    intercept: bool,
) -> GroupDecomposition:
    """A head group's decomposition: whole heads kept (``criteria.covering_blocks`` on the
    covariance of every dim of every head), and at each tensor read every dim of the removed heads
    fitted on all dims of the kept ones (``decompose.least_squares``): a Z per column
    (``Decomposition.width``), exact where a removed head's output is a linear function of the
    kept heads' outputs (same attention map, value rows combinations of kept ones)."""
    width = fit_width(group)
    kept = criteria.covering_blocks(cov, energy, keep, width)
    dims = (kept[:, None] * width + torch.arange(width)).flatten()
    base = decompose.identity_on_kept(group.channels, kept, torch.float32)
    if group.mode == "prune-only":
        return GroupDecomposition(kept, {c.tensor: base for c in group.consumers}, 0)
    at = {}
    for tensor in dict.fromkeys(c.tensor for c in group.consumers):
        fit = decompose.least_squares(moments[(group.name, tensor)], dims, floor, intercept)
        at[tensor] = decompose.Decomposition(
            base.kept, base.target, base.scale, fit.matrix(), fit.shift, width
        )
    merged = max(int(d.merged().shape[0]) for d in at.values())
    return GroupDecomposition(kept, at, merged)


def _blockwise(
    moments: decompose.Moments,
    kept: torch.Tensor,
    spans: list[slice],
    floor: float,
    intercept: bool = True,
) -> decompose.Decomposition:
    """``decompose.least_squares`` with every removed channel fitted on the kept ones of its own
    block only (one block: the plain fit)."""
    if len(spans) == 1:
        return decompose.least_squares(moments, kept, floor, intercept)
    n, k = moments.mean.shape[0], kept.shape[0]
    mixing = torch.zeros(n, k, dtype=moments.cov.dtype)
    shift = torch.zeros(n, dtype=moments.cov.dtype)
    per_block = k // len(spans)
    for index, span in enumerate(spans):
        local = kept[index * per_block : (index + 1) * per_block] - span.start
        sub = decompose.Moments(moments.mean[span], moments.cov[span, span], moments.count)
        dec = decompose.least_squares(sub, local, floor, intercept)
        columns = slice(index * per_block, (index + 1) * per_block)
        mixing[span, columns] = dec.matrix().to(mixing.dtype)
        if dec.shift is not None:
            shift[span] = dec.shift
    base = decompose.identity_on_kept(n, kept, torch.float32)
    return decompose.Decomposition(
        base.kept, base.target, base.scale, mixing, shift if intercept else None
    )


def remeasure_batchnorm(
    model: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]]
) -> fx.GraphModule:
    """``model`` with its BatchNorm statistics re-measured on ``batches`` (itself if it has no
    BatchNorm, or there are no batches: nothing was merged).

    What calibration batches (real samples) always get. On synthetic probes ``BATCHNORM_REPAIR``
    decides: re-measuring beat a one-shot correction of the stored statistics by the change the
    merge made (``experiments/methods_validation.json``, vgg-fmnist), and lost to the corrections
    made in call order (``norm_repair``; ``experiments/bn_repair_validation.json``).
    """
    if not batches or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    repaired = recalibrate_batchnorm(model, batches)
    assert isinstance(repaired, fx.GraphModule)
    return repaired
