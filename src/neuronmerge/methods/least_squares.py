"""``merge-ls``: least-squares merging from activation moments (see ``lsq`` for the algorithm).

Works on every group whose ops are per channel, homogeneous or not (the fit measures what the
consumers actually read, so no op needs to commute with a scale); groups whose channels meet an op
that mixes them (LayerNorm, softmax across channels) are pruned, as the other methods do. Attention
heads go whole, each dim of a removed head fitted on every dim of the kept ones (``lsq``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import fx

from neuronmerge import lsq
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.methods.base import GroupDecomposition, Inputs, balanced_kept_count
from neuronmerge.types import Group

if TYPE_CHECKING:
    from neuronmerge.options import Options


class LeastSquares:
    """``merge-ls``: covering kept set, least-squares Z per consumed tensor, BatchNorm re-measured."""

    name = "merge-ls"
    data_free = True  # on synthetic probes; data-aware when the caller passes calibration batches
    fits_on_batches = True

    def refusal(self, group: Group, options: Options) -> str | None:
        if group.mode == "prune-only" and not options.approximate:
            return group.why
        if group.pattern == "heads" and len({c.block for c in group.consumers}) > 1:
            return "merge-ls fits a head's dims one by one: its consumers must read heads alike"
        return None

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
        if inputs.moments is None:
            raise InvalidArgumentError("merge-ls needs activation moments (calibration or probes)")
        return lsq.decompositions(
            graph_module, list(groups), dict(keep), inputs.moments, intercept=options.intercept
        )
