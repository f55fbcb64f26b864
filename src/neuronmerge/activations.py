"""Activation moments of every site, measured where its consumers read the channels.

``merge-ls`` fits each removed channel as a combination of kept ones (``decompose.least_squares``),
which needs the mean and covariance of the channels *as the consumer sees them* (after BatchNorm,
activation, pooling and flattening). We run the captured graph on calibration batches and read the
input of each site's first consumer: for a Linear reading a flattened map, every channel owns
``block`` columns, and for a conv every spatial position is one more sample of each channel. Sums are
accumulated in float64, so any number of batches costs one N x N matrix per site.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn

from neuronmerge.decompose import Moments
from neuronmerge.sites import ConsumerSlice, Site

#: Spatial positions per image kept when a conv consumer reads a map (a deterministic stride):
#: neighbouring positions add little information and a lot of arithmetic.
_MAX_POSITIONS = 64


def _channel_samples(inputs: torch.Tensor, piece: ConsumerSlice, channels: int) -> torch.Tensor:
    """(samples, channels): the site's channels in one consumer input batch."""
    if inputs.dim() == 2:  # Linear: columns offset + c * block + position
        block = inputs[:, piece.offset : piece.offset + channels * piece.block]
        block = block.reshape(inputs.shape[0], channels, piece.block)
        return block.transpose(1, 2).reshape(-1, channels)
    maps = inputs[:, piece.offset : piece.offset + channels].flatten(2)  # conv: (n, C, positions)
    stride = max(1, maps.shape[2] // _MAX_POSITIONS)
    return maps[:, :, ::stride].transpose(1, 2).reshape(-1, channels)


def site_moments(
    graph_module: fx.GraphModule, sites: list[Site], batches: Iterable[tuple[torch.Tensor, ...]]
) -> dict[str, Moments]:
    """Mean and covariance of each site's channels over ``batches`` (each a tuple of model inputs)."""
    sums: dict[str, torch.Tensor] = {}
    products: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {site.producer: 0 for site in sites}
    by_consumer: dict[str, list[Site]] = {}
    for site in sites:
        by_consumer.setdefault(site.consumers[0].module, []).append(site)

    def record(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        for site in by_consumer[name]:
            piece = next(p for p in site.consumers if p.module == name)
            samples = _channel_samples(inputs[0].detach(), piece, site.channels).to(torch.float64)
            if site.producer not in sums:
                sums[site.producer] = torch.zeros(site.channels, dtype=torch.float64)
                products[site.producer] = torch.zeros(site.channels, site.channels, dtype=torch.float64)
            sums[site.producer] += samples.sum(dim=0)
            products[site.producer] += samples.T @ samples
            counts[site.producer] += samples.shape[0]

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
    moments: dict[str, Moments] = {}
    for site in sites:
        n = counts[site.producer]
        if n == 0:
            raise ValueError("no calibration samples reached the consumers")
        mean = sums[site.producer] / n
        cov = products[site.producer] / n - mean[:, None] * mean[None, :]
        moments[site.producer] = Moments(mean, cov, n)
    return moments
