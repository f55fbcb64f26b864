"""Model folding (Wang et al., ICLR 2025, "Forget the Data and Fine-Tuning! Just Fold the Network to
Compress"), the strongest data-free peer, written from the paper's description for the sweeps.

Folding clusters channels instead of choosing which to keep. It folds exactly the channel groups
neuronmerge's engine shrinks (``engine.groups``), so both end at the same widths and parameter
count: a layer's own channels, and a residual stream as one group, whatever writes into it. Per
group, k-means runs once on what each channel computes at every layer writing it, side by side
(with BatchNorms after a layer, the rows they are folded into, ``[a*w | c]``: what the channel
computes before its activation), and on the input columns through which every consumer reads it
(the authors' release clusters on the next layer's input weights too; on validation this beat the
rows alone, ``experiments/folding_validation.py``), into as many clusters as the other methods keep
channels. A residual stream thereby gets one clustering, shared by all its producers (the paper
keeps one clustering per stream too). Every cluster becomes one channel: each producer's row is
the mean of its members' rows, every other per-channel tensor on the way (a BatchNorm after the
sum, a depthwise conv) the mean of its members' entries, and each consumer reads the channel
through the *sum* of the members' columns (each member is approximated by the mean, so its
contribution moves there). Grouped convs are clustered block by block; attention heads are left
alone (a head is not one row).

Averaging correlated but unequal channels shrinks the variance of what the merged channel computes
("variance collapse"), which the paper repairs without data in one of two ways:

* **Fold-AR** (approximate repair): if the members have equal variance and mean pairwise correlation
  ``E[c]``, their mean has ``(N + (N^2 - N) E[c]) / N^2`` times their variance, so the merged channel is
  rescaled about its mean by ``N / sqrt(N + (N^2 - N) E[c])``. ``E[c]`` is estimated from the weights
  alone, as the mean cosine similarity of the members' (folded) rows, for each producer on its own
  (a residual stream's producers each get their own repair). With BatchNorms after the layer the
  rescaling lives in the last one's running variance, and the mean is the mean of the members'
  BatchNorm shifts; without one (whose mean is not known) the weight part of the row is rescaled and
  the bias kept.
* **Fold-DIR** (DeepInversion repair): every BatchNorm's running statistics are re-measured on one
  batch of synthetic images made from the model alone (``neuronmerge.probes``: DeepInversion-style
  model inversion). A model without BatchNorm gets no repair.

``fold`` uses neuronmerge's capture, groups and surgery, and never modifies the caller's model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, fx, nn

from neuronmerge import engine
from neuronmerge.capture import ExampleInputs, as_input_tuple
from neuronmerge.decompose import Decomposition
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.methods.base import GroupDecomposition
from neuronmerge.options import Options
from neuronmerge.recalibrate import recalibrate_batchnorm
from neuronmerge.types import Group

Repair = Literal["none", "ar", "dir"]
REPAIRS: tuple[str, ...] = ("none", "ar", "dir")
#: Lloyd iterations of k-means at most (it stops earlier once no channel changes cluster).
KMEANS_ITERATIONS = 100


def kmeans(rows: Tensor, clusters: int, seed: int = 0) -> Tensor:
    """Cluster labels ``(N,)`` in ``[0, clusters)`` of ``rows`` ``(N, D)``: k-means++ then Lloyd.

    Every cluster is non-empty: a cluster that loses all its members is re-seeded with the row
    farthest from its centre. Deterministic for a given ``seed``.
    """
    n = rows.shape[0]
    if not 1 <= clusters <= n:
        raise InvalidArgumentError(f"cannot make {clusters} clusters of {n} rows")
    generator = torch.Generator().manual_seed(seed)
    data = rows.to(torch.float64)
    squared = data.square().sum(dim=1)

    def distances(centres: Tensor) -> Tensor:  # (N, K) squared Euclidean distances
        d = squared[:, None] - 2 * data @ centres.T + centres.square().sum(dim=1)[None, :]
        return d.clamp_min_(0)

    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    nearest = distances(data[first : first + 1])[:, 0]
    for _ in range(1, clusters):
        total = nearest.sum()
        if total > 0:
            pick = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:  # every row sits on a centre already: take any row not chosen yet
            pick = next(i for i in range(n) if i not in chosen)
        chosen.append(pick)
        nearest = torch.minimum(nearest, distances(data[pick : pick + 1])[:, 0])
    centres = data[chosen].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(KMEANS_ITERATIONS):
        d = distances(centres)
        new = d.argmin(dim=1)
        counts = torch.bincount(new, minlength=clusters)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = int(d[torch.arange(n), new].argmax())
            counts[new[far]] -= 1
            new[far] = empty
            counts[empty] = 1
            d[far] = 0
        if torch.equal(new, labels):
            break
        labels = new
        centres = torch.zeros_like(centres).index_add_(0, labels, data)
        centres /= torch.bincount(labels, minlength=clusters)[:, None].to(data.dtype)
    return labels


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm with running statistics: what Fold-DIR repairs."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()
    )


def cluster_scale(rows: Tensor) -> float:
    """Fold-AR's variance repair of a cluster of ``rows``: ``N / sqrt(N + (N^2 - N) E[c])``.

    ``E[c]`` is the mean cosine similarity over the pairs of distinct rows. The variance ratio is
    kept at least ``1 / N^2`` (a cluster of anti-correlated rows cannot cancel out entirely).
    """
    n = rows.shape[0]
    if n < 2:
        return 1.0
    unit = torch.nn.functional.normalize(rows.to(torch.float64), dim=1)
    cosine = unit @ unit.T
    mean_similarity = float((cosine.sum() - cosine.diagonal().sum()) / (n * n - n))
    variance = max(n + (n * n - n) * mean_similarity, 1.0)
    return n / variance**0.5


@dataclass(frozen=True)
class _Producer:
    """One layer writing a group's channels, as folding sees it: ``rows`` ``[a*w]`` and ``shift``
    ``c`` of what each channel computes after the BatchNorms folded into it (``norms``)."""

    layer: nn.Linear | nn.Conv1d | nn.Conv2d
    rows: Tensor
    shift: Tensor
    norms: tuple[nn.modules.batchnorm._BatchNorm, ...]

    def features(self) -> Tensor:
        """``[a*w | c]``: what k-means compares."""
        return torch.cat([self.rows, self.shift[:, None]], dim=1)


def _producer(gm: fx.GraphModule, name: str, norms: tuple[str, ...]) -> _Producer:
    """Layer ``name`` with the BatchNorms ``norms`` that the engine folds into its rows."""
    layer = gm.get_submodule(name)
    assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
    rows = layer.weight.detach().flatten(1).to(torch.float64, copy=True)
    n = rows.shape[0]
    shift = torch.zeros(n, dtype=torch.float64)
    if layer.bias is not None:
        shift = layer.bias.detach().to(torch.float64, copy=True)
    modules = []
    for norm_name in norms:
        norm = gm.get_submodule(norm_name)
        assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
        assert norm.running_mean is not None and norm.running_var is not None
        gamma = _entries(norm.weight, n, 1.0)
        a = gamma / torch.sqrt(norm.running_var.to(torch.float64) + norm.eps)
        rows = a[:, None] * rows
        shift = a * (shift - norm.running_mean.to(torch.float64)) + _entries(norm.bias, n, 0.0)
        modules.append(norm)
    return _Producer(layer, rows, shift, tuple(modules))


def _entries(tensor: Tensor | None, n: int, default: float) -> Tensor:
    """``tensor`` in float64, or ``n`` times ``default`` where a BatchNorm has no affine part."""
    if tensor is None:
        return torch.full((n,), default, dtype=torch.float64)
    return tensor.detach().to(torch.float64, copy=True)


def _clusters(group: Group, features: Tensor, keep: int, seed: int) -> list[Tensor]:
    """The channels of every cluster, ordered by their first channel (each block of a grouped conv
    clustered on its own into its share of ``keep``)."""
    members: list[Tensor] = []
    for span in group.block_spans():
        labels = kmeans(features[span], keep // group.blocks, seed)
        channels = torch.arange(span.start, span.stop)
        members += [channels[labels == k] for k in range(keep // group.blocks)]
    return sorted(members, key=lambda m: int(m[0]))


@torch.no_grad()
def _write_producer(producer: _Producer, members: list[Tensor], repair: Repair) -> None:
    """Put each cluster's folded row (and Fold-AR's repair) into its first member's row."""
    layer, rows, shift = producer.layer, producer.rows, producer.shift
    weight = layer.weight.view(rows.shape[0], -1)
    if not producer.norms:
        for m in members:
            scale = cluster_scale(rows[m]) if repair == "ar" else 1.0
            weight[m[0]] = (scale * rows[m].mean(dim=0)).to(weight.dtype)
            if layer.bias is not None:
                layer.bias[m[0]] = shift[m].mean().to(layer.bias.dtype)
        return
    *before, last = producer.norms
    beta = _entries(last.bias, rows.shape[0], 0.0)
    gamma = _entries(last.weight, rows.shape[0], 1.0)
    for m in members:
        first = int(m[0])
        scale = cluster_scale(rows[m]) if repair == "ar" else 1.0
        # The layer now computes ``u = mean(a_i w_i) . x``; earlier BatchNorms pass it on unchanged,
        # and the last maps it to ``scale * (u - mean(beta_i - c_i)) + mean(beta_i)``: the members'
        # mean output, rescaled about the mean they had (beta_i), with a spread of about mean(|gamma_i|).
        weight[first] = rows[m].mean(dim=0).to(weight.dtype)
        if layer.bias is not None:
            layer.bias[first] = 0
        for norm in before:
            _set_norm(norm, first, mean=0.0, var=1 - norm.eps, weight=1.0, bias=0.0)
        spread = float(gamma[m].abs().mean())
        var = (spread / scale) ** 2 - last.eps
        weight_entry = spread if var > 0 else scale * last.eps**0.5  # gamma / sqrt(var + eps) = scale
        mean = float((beta[m] - shift[m]).mean())
        _set_norm(
            last, first, mean=mean, var=max(var, 0.0), weight=weight_entry, bias=float(beta[m].mean())
        )


def _set_norm(
    norm: nn.modules.batchnorm._BatchNorm,
    index: int,
    *,
    mean: float,
    var: float,
    weight: float,
    bias: float,
) -> None:
    """Channel ``index`` of ``norm`` set to the given statistics and affine entries."""
    assert norm.running_mean is not None and norm.running_var is not None
    norm.running_mean[index], norm.running_var[index] = mean, var
    if norm.weight is not None:
        norm.weight[index] = weight
    if norm.bias is not None:
        norm.bias[index] = bias


@torch.no_grad()
def _average_params(gm: fx.GraphModule, group: Group, members: list[Tensor], skip: set[str]) -> None:
    """Every per-channel tensor of the group not folded into a producer (``skip``): a BatchNorm
    after a residual sum, a depthwise conv, LayerScale, a PReLU slope. Each cluster's first entry
    becomes the mean of its members' entries."""
    for piece in group.params:
        if piece.owner in skip:
            continue
        module = gm.get_submodule(piece.owner)
        if piece.name == "*":
            tensors = [
                t
                for name, t in [*module._parameters.items(), *module._buffers.items()]
                if t is not None and t.dim() > 0 and name != "num_batches_tracked"
            ]
        else:
            tensors = [getattr(module, piece.name)]
        for tensor in tensors:
            if not tensor.is_floating_point():
                continue
            axis = 0 if piece.name == "*" else piece.axis
            span = tensor.detach().narrow(axis, piece.offset, group.channels * piece.block)
            per_channel = span.movedim(axis, 0).unflatten(0, (group.channels, piece.block))
            for m in members:
                per_channel[m[0]] = per_channel[m].mean(dim=0)


def _consumer_columns(gm: fx.GraphModule, group: Group) -> list[Tensor]:
    """Each channel's input columns in every Linear/Conv consumer, one row per channel (a grouped
    conv consumer, whose columns hold only its own block, is left out)."""
    columns = []
    for piece in group.consumers:
        layer = gm.get_submodule(piece.module)
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) or getattr(layer, "groups", 1) != 1:
            continue
        read = layer.weight.detach().to(torch.float64).movedim(1, 0)
        read = read.narrow(0, piece.offset, group.channels * piece.block)
        columns.append(read.reshape(group.channels, -1))
    return columns


def _fold_group(
    gm: fx.GraphModule, group: Group, keep: int, repair: Repair, seed: int, columns: bool
) -> GroupDecomposition:
    """Cluster ``group``'s channels once on all its producers' rows (with ``columns``, and all its
    consumers' columns) side by side, write each cluster's folded rows and entries into its first
    member (in ``gm``'s own tensors), and return the Z that sums the members' consumer columns."""
    producers = [
        _producer(gm, name, folded) for name, folded in zip(group.producers, group.folded, strict=True)
    ]
    features = torch.cat([p.features() for p in producers], dim=1)
    if columns:
        features = torch.cat([features, *_consumer_columns(gm, group)], dim=1)
    members = _clusters(group, features, keep, seed)
    for producer in producers:
        _write_producer(producer, members, repair)
    _average_params(gm, group, members, {name for folded in group.folded for name in folded})
    kept = torch.stack([m[0] for m in members])
    target = torch.empty(group.channels, dtype=torch.long)
    for position, m in enumerate(members):
        target[m] = position
    folded = Decomposition(kept, target, torch.ones(group.channels, dtype=features.dtype))
    at = {consumer.tensor: folded for consumer in group.consumers}
    return GroupDecomposition(kept, at, group.channels - keep)


def fold(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float,
    *,
    repair: Repair = "ar",
    probes: list[tuple[Tensor, ...]] | None = None,
    approximate: bool = False,
    seed: int = 0,
    columns: bool = True,
) -> fx.GraphModule:
    """``model`` folded: each group's channels clustered into as many as ``ratio`` keeps.

    ``repair`` is ``"none"`` (plain folding), ``"ar"`` (Fold-AR) or ``"dir"`` (Fold-DIR, which needs
    ``probes``: synthetic input batches, of which the first is used; none where the model has no
    BatchNorm, which leaves nothing to repair). ``approximate`` folds through non-homogeneous
    activations too. ``columns`` clusters each channel on the consumers' input columns that read it
    as well as on its producer rows (``False``: the rows alone; ``experiments/folding_validation.py``
    chose ``True`` on validation). The groups and kept counts are ``merge``'s (the engine's), so the
    result has the parameter count of ``nm.merge(model, x, ratio)``. ``model`` is not modified.
    """
    if repair not in REPAIRS:
        raise InvalidArgumentError(f"repair must be one of {', '.join(REPAIRS)}, got {repair!r}")
    if repair == "dir" and not probes and has_batchnorm(model):
        raise InvalidArgumentError("Fold-DIR needs a batch of synthetic probes")
    inputs = as_input_tuple(example_inputs)
    # capture shares tensors with the model it traces: trace a private copy, whose rows we rewrite.
    gm = engine.capture(copy.deepcopy(model), inputs)
    options = Options.of(method="merge", approximate=approximate)
    method = options.method_object()
    found, _ = engine.groups(gm, options, method)
    # A head is several rows of several projections, and an attention's embedding is rebuilt by
    # surgery from per-head plans: folding clusters single channels, so both are left to merge.
    groups = [group for group in found if group.pattern != "heads" and not group.attention]
    keep = engine.kept_counts(groups, ratio, method)
    decompositions = {g.name: _fold_group(gm, g, keep[g.name], repair, seed, columns) for g in groups}
    small = engine.surgery(gm, groups, decompositions)
    if repair == "dir" and probes and has_batchnorm(model):
        repaired = recalibrate_batchnorm(small, probes[:1])
        assert isinstance(repaired, fx.GraphModule)
        small = repaired
    return small
