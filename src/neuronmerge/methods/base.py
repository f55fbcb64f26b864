"""The method protocol: what every way of shrinking a group provides, and the value it returns.

A method sees the groups of a captured graph and, per group, the number of channels to keep; it
returns a ``GroupDecomposition`` per group: the kept channels, shared by every tensor of the group,
and a scaling matrix Z for each tensor that consumers read (identity on the kept channels for
pruning; the paper's one-entry rows for merging; dense least-squares rows for ``merge-ls``). Methods
never touch the graph's layers; ``surgery`` applies what they return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import fx

from neuronmerge import criteria
from neuronmerge.attention import HeadPlan
from neuronmerge.decompose import Decomposition
from neuronmerge.types import Group

if TYPE_CHECKING:
    from neuronmerge.lsq import MomentSource
    from neuronmerge.options import Options


@dataclass(frozen=True)
class GroupDecomposition:
    """A group's kept channels and the Z of every tensor its consumers read (by fx node name).

    ``merged`` counts the removed channels that were folded into kept ones (where several tensors
    are read, at the group's producers); the rest of the removed ones are dropped.
    """

    kept: torch.Tensor
    at: Mapping[str, Decomposition]
    merged: int
    #: The inner dims every attention of the group keeps (``Group.attention``), by module name.
    heads: Mapping[str, HeadPlan] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return next(iter(self.at.values())).channels if self.at else 0


@dataclass(frozen=True)
class Inputs:
    """What a method may read besides the graph: the example inputs and, for methods that fit on
    activations, where their moments come from (an ``lsq.MomentSource``: measured on synthetic
    probes or on the caller's samples by default)."""

    example: tuple[torch.Tensor, ...]
    moments: MomentSource | None = None


class Method(Protocol):
    """One way of shrinking groups (``prune``, ``merge``, ``paper``, ``merge-ls``)."""

    #: The name shown in reports and accepted by ``compress(method=...)``.
    name: str
    #: Whether the method needs no data (calibration batches) at all.
    data_free: bool
    #: Whether the method fits on activation moments measured on batches (its synthetic probes or
    #: the caller's calibration batches: ``Inputs.moments``), which must then be made before it runs.
    fits_on_batches: bool

    def refusal(self, group: Group, options: Options) -> str | None:
        """Why this method leaves ``group`` alone, or None when it can shrink it."""
        ...

    def kept_count(self, group: Group, ratio: float) -> int:
        """How many of the group's channels survive removing the fraction ``ratio``."""
        ...

    def decompose(
        self,
        graph_module: fx.GraphModule,
        groups: Sequence[Group],
        keep: Mapping[str, int],
        options: Options,
        inputs: Inputs,
    ) -> dict[str, GroupDecomposition]:
        """A decomposition of every group in ``groups``, keeping ``keep[group.name]`` channels."""
        ...


def balanced_kept_count(group: Group, ratio: float) -> int:
    """Channels kept by removing ``ratio`` from every block of ``group`` alike: a grouped conv's
    channels come in ``group.blocks`` equal blocks, and each must keep as many (one block otherwise).
    A group read by attention keeps the nearest multiple of ``group.multiple`` (its head count)."""
    kept = criteria.kept_count(group.channels // group.blocks, ratio) * group.blocks
    if group.multiple > 1 and kept:
        kept = max(group.multiple, round(kept / group.multiple) * group.multiple)
    return kept
