"""Data-aware, optional: recompute BatchNorm running statistics of a compressed model from samples.

Merging changes what every layer after a site computes, so the running mean and variance that a
downstream BatchNorm stored during training no longer describe its inputs. With a few unlabeled
batches at hand, re-measuring them is cheap and needs no labels or gradients. This step uses data:
it is *not* part of any data-free method, and it is never run unless called.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from neuronmerge.capture import ExampleInputs, as_input_tuple
from neuronmerge.errors import InvalidArgumentError


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[ExampleInputs]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the plain average over ``batches``.

    Every other layer runs in eval mode (dropout off); ``model`` itself is not modified. Batches are
    model inputs (a tensor or a tuple of tensors each), without labels.
    """
    result = copy.deepcopy(model).eval()
    norms = [
        m
        for m in result.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches, not an exponential one
        bn.train()
    seen = 0
    with torch.no_grad():
        for batch in batches:
            result(*as_input_tuple(batch))
            seen += 1
    if seen == 0:
        raise InvalidArgumentError("recalibrate_batchnorm needs at least one batch")
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    return result.eval()
