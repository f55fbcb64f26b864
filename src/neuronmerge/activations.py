"""Activation moments of every group, measured at each tensor its consumers read.

``merge-ls`` fits each removed channel as a combination of kept ones (``decompose.least_squares``),
which needs the mean and covariance of the channels *as the consumers see them* (after BatchNorm,
activation, pooling and flattening), at every tensor that consumers read (a residual stream has
several). We run the captured graph on calibration batches and read the input of the first
consumer of each such tensor: for a Linear reading a flattened map, every channel owns
``block`` columns, and for a conv every spatial position is one more sample of each channel. Sums are
accumulated in float64, so any number of batches costs one N x N matrix per site.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn

from neuronmerge.decompose import Moments
from neuronmerge.types import ConsumerSlice, Group

#: Spatial positions per image kept when a conv consumer reads a map (a deterministic stride):
#: neighbouring positions add little information and a lot of arithmetic.
_MAX_POSITIONS = 64


def fit_width(group: Group) -> int:
    """How many columns of each channel are measured (and fitted by ``merge-ls``) one by one: every
    dim of a head (a head's output is a vector, and its dims are different signals, read by
    different consumer weights), else 1 (a channel's columns are positions of one signal)."""
    return group.consumers[0].block if group.pattern == "heads" else 1


def _channel_samples(
    inputs: torch.Tensor, piece: ConsumerSlice, channels: int, width: int = 1
) -> torch.Tensor:
    """(samples, channels * width): the site's channels in one consumer input batch, each as
    ``width`` columns (``fit_width``)."""
    if inputs.dim() == 2:  # Linear: columns offset + c * block + position
        block = inputs[:, piece.offset : piece.offset + channels * piece.block]
        block = block.reshape(inputs.shape[0], channels * width, piece.block // width)
        return block.transpose(1, 2).reshape(-1, channels * width)
    assert width == 1, "a conv reads its channels as maps"
    maps = inputs[:, piece.offset : piece.offset + channels].flatten(2)  # conv: (n, C, positions)
    stride = max(1, maps.shape[2] // _MAX_POSITIONS)
    return maps[:, :, ::stride].transpose(1, 2).reshape(-1, channels)


def tensor_moments(
    graph_module: fx.GraphModule, groups: list[Group], batches: Iterable[tuple[torch.Tensor, ...]]
) -> dict[tuple[str, str], Moments]:
    """Mean and covariance of each group's channels at each tensor its consumers read, keyed by
    (group name, tensor name), over ``batches`` (each a tuple of model inputs); of every dim of
    every head for a head group (``fit_width``)."""
    sums: dict[tuple[str, str], torch.Tensor] = {}
    products: dict[tuple[str, str], torch.Tensor] = {}
    counts: dict[tuple[str, str], int] = {}
    by_consumer: dict[str, list[tuple[tuple[str, str], ConsumerSlice, tuple[int, int]]]] = {}
    for group in groups:
        for piece in group.consumers:
            key = (group.name, piece.tensor)
            if key in counts:
                continue
            counts[key] = 0
            columns = (group.channels, fit_width(group))
            by_consumer.setdefault(piece.module, []).append((key, piece, columns))

    def record(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        if isinstance(graph_module.get_submodule(name), (nn.Linear, nn.MultiheadAttention)):
            # (..., features): rows of tokens
            x = x.reshape(-1, x.shape[-1])
        for key, piece, (channels, width) in by_consumer[name]:
            samples = _channel_samples(x, piece, channels, width).to(torch.float64)
            if key not in sums:
                size = channels * width
                sums[key] = torch.zeros(size, dtype=torch.float64)
                products[key] = torch.zeros(size, size, dtype=torch.float64)
            sums[key] += samples.sum(dim=0)
            products[key] += samples.T @ samples
            counts[key] += samples.shape[0]

    handles = []
    for name in by_consumer:
        module: nn.Module = graph_module.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: record(name, args)))
    try:  # the captured graph is in eval mode and owns its module objects (``capture``)
        with torch.no_grad():
            for batch in batches:
                graph_module(*batch)
    finally:
        for handle in handles:
            handle.remove()
    moments: dict[tuple[str, str], Moments] = {}
    for key, n in counts.items():
        if n == 0:
            raise ValueError("no calibration samples reached the consumers")
        mean = sums[key] / n
        cov = products[key] / n - mean[:, None] * mean[None, :]
        moments[key] = Moments(mean, cov, n)
    return moments
