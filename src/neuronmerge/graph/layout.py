"""Where a group's channels sit in a tensor, and how layout ops move them. Pure functions of shapes.

A group's channel ``c`` occupies, along axis ``dim``, the indices ``offset + c*block ...
offset + (c+1)*block - 1``: a concatenation shifts ``offset``, flattening a conv map gives each
channel a ``block`` of H*W columns. Every rule returns the new layout, or None when the op mixes the
channel axis with others (then no channel owns a clean slice any more).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Axis, first index and indices per channel of a group's channels in one tensor."""

    dim: int
    offset: int = 0
    block: int = 1


def reshaped(before: Sequence[int], after: Sequence[int], layout: Layout) -> Layout | None:
    """The layout after a view/reshape/flatten/squeeze from shape ``before`` to ``after``.

    The channels keep a clean slice when the axes before theirs multiply to the same count in both
    shapes, and the new channel axis with everything after it holds exactly the old channel axis and
    everything after it, cut into whole channel blocks (flattening ``(N, C, H, W)`` to
    ``(N, C*H*W)`` gives each channel a block of H*W; ``(B, T, C)`` to ``(B*T, C)`` moves nothing).
    """
    d = layout.dim
    leading = math.prod(before[:d])
    span = before[d] * math.prod(before[d + 1 :])  # the channel axis and everything after it
    unit = layout.block * math.prod(before[d + 1 :])  # elements per channel, contiguous
    start = layout.offset * math.prod(before[d + 1 :])
    for new_dim in range(len(after)):
        if math.prod(after[:new_dim]) != leading:
            continue
        trailing = math.prod(after[new_dim + 1 :])
        if after[new_dim] * trailing != span or trailing == 0:
            continue
        if unit % trailing or start % trailing:
            continue
        return Layout(dim=new_dim, offset=start // trailing, block=unit // trailing)
    return None


def permuted(layout: Layout, order: Sequence[int]) -> Layout | None:
    """The layout after ``x.permute(order)``: the channel axis moves to where ``order`` puts it."""
    if layout.block != 1:
        return None
    ndim = len(order)
    positions = [int(axis) % ndim for axis in order]
    return Layout(positions.index(layout.dim), layout.offset, layout.block)


def transposed(layout: Layout, first: int, second: int, ndim: int) -> Layout | None:
    """The layout after ``x.transpose(first, second)``."""
    first, second = first % ndim, second % ndim
    if layout.dim not in (first, second):
        return layout
    if layout.block != 1:
        return None
    return Layout(second if layout.dim == first else first, layout.offset, layout.block)


def reduced(layout: Layout, ndim: int, dims: Sequence[int], keepdim: bool) -> Layout | None:
    """The layout after a mean/sum/max over ``dims``; None when they include the channel axis."""
    axes = {int(d) % ndim for d in dims}
    if layout.dim in axes:
        return None
    if keepdim:
        return layout
    return Layout(layout.dim - sum(1 for a in axes if a < layout.dim), layout.offset, layout.block)


def padded(layout: Layout, ndim: int, pad: Sequence[int]) -> bool:
    """Whether ``F.pad(x, pad)`` leaves the channel axis alone (it pads the last len(pad)/2 axes)."""
    return layout.dim < ndim - len(pad) // 2


def pooled(layout: Layout, ndim: int, spatial: int) -> bool:
    """Whether a pool over ``spatial`` trailing axes keeps channels apart: a batched input of the
    pool's own rank with the channels whole on axis 1 (a 2d pool on a 3-D tensor takes it as an
    unbatched image and pools across the channels)."""
    return layout.dim == 1 and layout.block == 1 and ndim == spatial + 2


def concatenated(layout: Layout, dim: int, ndim: int, before: int) -> Layout | None:
    """The layout after a concatenation along ``dim`` that puts ``before`` indices ahead of ours."""
    if dim % ndim != layout.dim:
        return None
    return Layout(layout.dim, layout.offset + before, layout.block)


def param_axis(layout: Layout, ndim: int, shape: Sequence[int]) -> int | None:
    """The axis of a per-channel parameter of ``shape`` broadcast against a tensor of rank ``ndim``
    whose channels are at ``layout``; None unless the parameter varies along that axis alone."""
    axis = layout.dim - (ndim - len(shape))
    if axis < 0 or layout.block != 1:
        return None
    if any(size != 1 for i, size in enumerate(shape) if i != axis):
        return None
    return axis


def _entries(ndim: int, index: object) -> list[object]:
    """``index`` as one entry per axis of a tensor of rank ``ndim`` (``...`` and missing trailing
    axes spelled out as full slices; ``None`` entries kept: they add an axis)."""
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(e is Ellipsis for e in entries):
        at = entries.index(Ellipsis)
        fill = ndim - sum(1 for e in entries if e is not None and e is not Ellipsis)
        entries = entries[:at] + [slice(None)] * fill + entries[at + 1 :]
    return entries + [slice(None)] * (ndim - sum(1 for e in entries if e is not None))


def indexed(layout: Layout, ndim: int, index: object) -> Layout | None:
    """The layout after ``x[index]`` with ints, slices, ``None`` and ``...``: None unless the
    channel axis is taken whole (``slice(None)``) and nothing indexes by tensors."""
    axis = new_dim = 0
    for entry in _entries(ndim, index):
        if entry is None:
            new_dim += 1
            continue
        if not isinstance(entry, (int, slice)):
            return None
        if axis == layout.dim:
            if entry != slice(None):
                return None
            return Layout(new_dim, layout.offset, layout.block)
        axis += 1
        new_dim += 0 if isinstance(entry, int) else 1
    return None


def unindexed(layout: Layout, ndim: int, index: object) -> Layout | None:
    """The inverse of ``indexed``: where the channels sit in the indexed tensor (of rank ``ndim``)
    when ``x[index]`` holds them at ``layout``; None unless that axis is a whole slice of one."""
    axis = new_dim = 0
    for entry in _entries(ndim, index):
        if entry is None:
            if new_dim == layout.dim:
                return None
            new_dim += 1
            continue
        if not isinstance(entry, (int, slice)):
            return None
        if isinstance(entry, slice):
            if new_dim == layout.dim:
                return Layout(axis, layout.offset, layout.block) if entry == slice(None) else None
            new_dim += 1
        axis += 1
    return None


def broadcast_axis(layout: Layout, ndim: int, shape: Sequence[int], size: int) -> int | None:
    """The channel axis of a tensor of ``shape`` broadcast against one of rank ``ndim`` whose
    channel axis (``layout``) has ``size`` entries, when it spans that whole axis (it may vary
    along other axes too: a positional embedding); None otherwise."""
    axis = layout.dim - (ndim - len(shape))
    if axis < 0 or layout.block != 1 or shape[axis] != size:
        return None
    return axis
