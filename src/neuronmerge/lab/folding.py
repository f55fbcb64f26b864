"""Model folding (Wang et al., ICLR 2025, "Forget the Data and Fine-Tuning! Just Fold the Network to
Compress"), the strongest data-free peer, written from the paper's description for the sweeps.

Folding clusters the channels of each layer instead of choosing which to keep: k-means on the producer
rows (with a BatchNorm after the layer, on the rows it is folded into, ``[a*w | c]``, what each channel
computes before its activation) into as many clusters as the other methods keep channels. Every
cluster becomes one channel whose producer row is the cluster mean, and each consumer reads it through
the *sum* of the cluster's columns (each member is approximated by the mean, so its contribution moves
there). Where a layer's channels go (which layers read them, through which pooling and flattening)
is neuronmerge's own group finder, so any group of one producer works: conv and Linear producers,
and with ``approximate=True`` a transformer MLP through its GELU.

Averaging correlated but unequal channels shrinks the variance of what the merged channel computes
("variance collapse"), which the paper repairs without data in one of two ways:

* **Fold-AR** (approximate repair): if the members have equal variance and mean pairwise correlation
  ``E[c]``, their mean has ``(N + (N^2 - N) E[c]) / N^2`` times their variance, so the merged channel is
  rescaled about its mean by ``N / sqrt(N + (N^2 - N) E[c])``. ``E[c]`` is estimated from the weights
  alone, as the mean cosine similarity of the members' (folded) rows. With a BatchNorm after the
  layer the rescaling lives in its running variance, and the mean is the mean of the members' BatchNorm
  shifts; without one (whose mean is not known) the weight part of the row is rescaled and the bias kept.
* **Fold-DIR** (DeepInversion repair): every BatchNorm's running statistics are re-measured on one
  batch of synthetic images made from the model alone (``neuronmerge.probes``: DeepInversion-style
  model inversion). A model without BatchNorm gets no repair.

``fold`` uses neuronmerge's capture, groups and surgery, and never modifies the caller's model.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, fx, nn

from neuronmerge import engine
from neuronmerge.capture import ExampleInputs, as_input_tuple
from neuronmerge.criteria import kept_count
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


def _fold_group(gm: fx.GraphModule, site: Group, keep: int, repair: Repair, seed: int) -> Decomposition:
    """Cluster ``site``'s channels, write each cluster's folded row into its first member (in
    ``gm``'s own tensors), and return the Z that sums the members' consumer columns into it."""
    layer = gm.get_submodule(site.producer)
    assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
    weight = layer.weight.detach().flatten(1).to(torch.float64, copy=True)
    n = weight.shape[0]
    bias = (
        layer.bias.detach().to(torch.float64, copy=True)
        if layer.bias is not None
        else torch.zeros(n, dtype=torch.float64)
    )
    norm = gm.get_submodule(site.norm) if site.norm is not None else None
    if norm is not None:
        assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
        assert norm.running_mean is not None and norm.running_var is not None
        mean = norm.running_mean.to(torch.float64, copy=True)
        var = norm.running_var.to(torch.float64, copy=True)
        ones, zeros = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        gamma = ones if norm.weight is None else norm.weight.detach().to(torch.float64, copy=True)
        beta = zeros if norm.bias is None else norm.bias.detach().to(torch.float64, copy=True)
        a = gamma / torch.sqrt(var + norm.eps)
        rows, shift = a[:, None] * weight, beta + a * (bias - mean)
    else:
        rows, shift = weight, bias
    labels = kmeans(torch.cat([rows, shift[:, None]], dim=1), keep, seed)
    members = [torch.nonzero(labels == k).flatten() for k in range(keep)]
    members.sort(key=lambda m: int(m[0]))
    kept = torch.stack([m[0] for m in members])
    target = torch.empty(n, dtype=torch.long)
    for position, m in enumerate(members):
        target[m] = position
    running_mean, running_var = (None, None) if norm is None else (norm.running_mean, norm.running_var)
    with torch.no_grad():
        out_weight = layer.weight.view(n, -1)
        for m in members:
            first = int(m[0])
            row = rows[m].mean(dim=0)
            scale = cluster_scale(rows[m]) if repair == "ar" else 1.0
            if norm is None:
                out_weight[first] = (scale * row).to(out_weight.dtype)
                if layer.bias is not None:
                    layer.bias[first] = shift[m].mean().to(layer.bias.dtype)
                continue
            # Row ``u = mean(a_i w_i) . x`` has mean ``mean(beta_i - c_i)``; the BatchNorm maps it to
            # ``scale * (u - that mean) + mean(beta_i)``, with a spread of about mean(|gamma_i|).
            spread = float(gamma[m].abs().mean()) if norm.weight is not None else 1.0
            out_weight[first] = row.to(out_weight.dtype)
            if layer.bias is not None:
                layer.bias[first] = 0
            assert running_mean is not None and running_var is not None
            running_mean[first] = float((beta[m] - shift[m]).mean())
            running_var[first] = max((spread / scale) ** 2 - norm.eps, 0.0)
            if norm.weight is not None:
                norm.weight[first] = spread
            if norm.bias is not None:
                norm.bias[first] = float(beta[m].mean())
    return Decomposition(kept, target, torch.ones(n, dtype=layer.weight.dtype))


def fold(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratio: float,
    *,
    repair: Repair = "ar",
    probes: list[tuple[Tensor, ...]] | None = None,
    approximate: bool = False,
    seed: int = 0,
) -> fx.GraphModule:
    """``model`` folded: each site's channels clustered into as many as ``ratio`` keeps.

    ``repair`` is ``"none"`` (plain folding), ``"ar"`` (Fold-AR) or ``"dir"`` (Fold-DIR, which needs
    ``probes``: synthetic input batches, of which the first is used). ``approximate`` folds through
    non-homogeneous activations too. ``model`` is not modified.
    """
    if repair not in REPAIRS:
        raise InvalidArgumentError(f"repair must be one of {', '.join(REPAIRS)}, got {repair!r}")
    if repair == "dir" and not probes:
        raise InvalidArgumentError("Fold-DIR needs a batch of synthetic probes")
    inputs = as_input_tuple(example_inputs)
    # capture shares tensors with the model it traces: trace a private copy, whose rows we rewrite.
    gm = engine.capture(copy.deepcopy(model), inputs)
    # The groups merging shrinks, of one producer each: a cluster mean is one layer's row.
    found, _ = engine.groups(gm, Options.of(method="merge", approximate=approximate))
    groups = [group for group in found if len(group.producers) == 1]
    decompositions: dict[str, GroupDecomposition] = {}
    for group in groups:
        keep = kept_count(group.channels, ratio)
        if keep < 1:
            raise InvalidArgumentError(
                f"ratio {ratio} keeps 0 of the {group.channels} channels of {group.producer}"
            )
        folded = _fold_group(gm, group, keep, repair, seed)
        at = {consumer.tensor: folded for consumer in group.consumers}
        decompositions[group.name] = GroupDecomposition(folded.kept, at, group.channels - keep)
    small = engine.surgery(gm, groups, decompositions)
    if repair == "dir" and probes:
        repaired = recalibrate_batchnorm(small, probes[:1])
        assert isinstance(repaired, fx.GraphModule)
        small = repaired
    return small
