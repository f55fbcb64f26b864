"""Per-layer accounting of a compression: what each layer keeps, and its parameters and MACs.

``plan(model, x, ratio=...)`` answers "what would this do to my model?" before anyone saves anything:
for every Linear/Conv layer, the channels kept / merged / dropped (or why it was skipped) and the
layer's parameters and multiply-accumulates before and after, with whole-model totals. A skipped
layer can still shrink: it loses the input columns of the merged layers that feed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from neuronmerge.evaluate import count_parameters, flops_by_layer
from neuronmerge.graph.ops import CONVS
from neuronmerge.types import Skipped


@dataclass(frozen=True)
class LayerRow:
    """One Linear/Conv layer: what the compression does to it and what it costs before and after.

    ``action`` is the method (``"merge"``/``"prune"``) at a site, or ``"skip"`` with ``reason``.
    ``kept``/``merged``/``dropped`` count output channels (``None`` for a skipped layer). Parameters
    are the layer's own weight and bias; MACs are per example (a batch of one).
    """

    layer: str
    action: str
    channels: int
    kept: int | None
    merged: int | None
    dropped: int | None
    reason: str | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


@dataclass(frozen=True)
class Totals:
    """The whole model before and after: every parameter (BatchNorm included) and every MAC."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


class SiteCounts(Protocol):
    """What the compression did at one site (``api.SiteReport`` has these fields)."""

    @property
    def producer(self) -> str: ...
    @property
    def kept(self) -> int: ...
    @property
    def merged(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def producers(self) -> tuple[str, ...]: ...


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, CONVS):
        return layer.out_channels
    raise TypeError(f"not a Linear/Conv layer: {type(layer).__name__}")


def layer_rows(
    before: nn.Module,
    after: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    method: str,
    sites: Sequence[SiteCounts],
    skipped: Sequence[Skipped],
) -> tuple[tuple[LayerRow, ...], Totals]:
    """Rows for every site and skipped layer, in the model's module order, and the totals.

    ``after`` must keep ``before``'s module names (a merge result does). MACs are measured on the
    first example of ``example_inputs``.
    """
    one = tuple(t[:1] for t in example_inputs)
    macs_before, macs_after = flops_by_layer(before, one), flops_by_layer(after, one)
    at_site = {p: s for s in sites for p in (s.producers or (s.producer,))}
    why = {s.producer: s.reason for s in skipped}
    after_modules = dict(after.named_modules())
    rows = []
    for name, layer in before.named_modules():
        if name not in at_site and name not in why:
            continue
        new = after_modules[name]
        site = at_site.get(name)
        rows.append(
            LayerRow(
                layer=name,
                action=method if site is not None else "skip",
                channels=_out_channels(layer),
                kept=None if site is None else site.kept,
                merged=None if site is None else site.merged,
                dropped=None if site is None else site.dropped,
                reason=why.get(name),
                params_before=count_parameters(layer),
                params_after=count_parameters(new),
                macs_before=macs_before.get(name, 0),
                macs_after=macs_after.get(name, 0),
            )
        )
    totals = Totals(
        params_before=count_parameters(before),
        params_after=count_parameters(after),
        macs_before=sum(macs_before.values()),
        macs_after=sum(macs_after.values()),
    )
    return tuple(rows), totals
