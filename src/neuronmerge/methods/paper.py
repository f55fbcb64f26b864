"""``fidelity="paper"``: the authors' code, quirks included, on the paper's pattern only.

Every deviation of the authors' code from exactness lives here and nowhere else: similarity and
scale on the raw rows ``[w | b]`` rather than on what the channel computes after its BatchNorm,
their conv + BatchNorm score and scale (``decompose.paper_conv_bn``, with ``lam``), kept counts
truncated for conv layers and rounded for linear ones, and a threshold of 0 meaning none. The paper
merges one layer -> [BatchNorm] -> activation -> pooling and reshapes -> readers; every other group
(residual streams, gates, norms after the activation) is left to the other methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import fx, nn

from neuronmerge import criteria
from neuronmerge.decompose import (
    BatchNormParams,
    SiteTensors,
    identity_on_kept,
    norm_ratio,
    paper_conv_bn,
)
from neuronmerge.methods.base import GroupDecomposition, Inputs
from neuronmerge.types import Group

if TYPE_CHECKING:
    from neuronmerge.options import Options

#: The paper's lambda for conv + BatchNorm groups (their scripts use 0.85 for VGG-16 and ResNet-56).
PAPER_LAMBDA = 0.85
PATTERN = (
    "fidelity='paper' follows the paper's pattern only "
    "(one layer -> [BatchNorm] -> activation -> pooling and reshapes -> readers)"
)


def site_tensors(graph_module: fx.GraphModule, group: Group) -> SiteTensors:
    """The raw weight, bias and BatchNorm of a one-producer group."""
    layer = graph_module.get_submodule(group.producers[0])
    assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
    weight = layer.weight.detach().flatten(1)
    bias = layer.bias.detach() if layer.bias is not None else None
    bn = None
    if group.norm is not None:
        norm = graph_module.get_submodule(group.norm)
        assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
        bn = BatchNormParams.of(norm)
    return SiteTensors(weight, bias, bn)


class Paper:
    """The paper's merge (``merge=True``) or pruning baseline, as the authors' code computes them."""

    data_free = True
    fits_on_batches = False  # the weights alone

    def __init__(self, merge: bool) -> None:
        self.merge = merge
        self.name = "merge" if merge else "prune"

    def refusal(self, group: Group, options: Options) -> str | None:
        allowed = {"pass", "maxpool", "homogeneous"} | (
            {"nonhomogeneous"} if options.approximate else set()
        )
        steps = group.steps[1:]
        if (
            len(group.producers) != 1
            or group.blocks != 1
            or len(group.folded[0]) > 1
            or any(s.kind not in allowed or (s.kind == "homogeneous" and s.degree != 1) for s in steps)
        ):
            return PATTERN
        return None

    def kept_count(self, group: Group, ratio: float) -> int:
        # The authors truncate kept counts for their conv nets and round them for LeNet-300-100.
        return criteria.kept_count(group.channels, ratio, "floor" if group.kind == "conv" else "round")

    def decompose(
        self,
        graph_module: fx.GraphModule,
        groups: Sequence[Group],
        keep: Mapping[str, int],
        options: Options,
        inputs: Inputs,
    ) -> dict[str, GroupDecomposition]:
        threshold = None if options.threshold == 0 else options.threshold
        lam = PAPER_LAMBDA if options.lam is None else options.lam
        result = {}
        for group in groups:
            tensors = site_tensors(graph_module, group)
            rows = tensors.raw()
            scores = criteria.channel_scores(rows, options.criterion)
            kept = criteria.select_kept(scores, keep[group.name])
            if not self.merge:
                dec = identity_on_kept(group.channels, kept, rows.weight.dtype)
            elif tensors.bn is not None:
                dec = paper_conv_bn(tensors.weight, tensors.bn, kept, threshold, lam)
            else:
                norms = scores if options.criterion == "l2-norm" else None
                dec = norm_ratio(rows, kept, threshold, norms)
            at = {c.tensor: dec for c in group.consumers}
            result[group.name] = GroupDecomposition(kept, at, int(dec.merged().shape[0]))
        return result
