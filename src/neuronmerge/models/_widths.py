"""Helpers shared by the CIFAR architectures: validating per-layer widths, reading them back.

Every builder accepts explicit widths for each mergeable layer, because a merged network may keep a
different number of channels at every layer. These helpers keep the checks (and their messages) the
same everywhere, and let ``config_from_state_dict`` functions read layer widths from tensor shapes
without depending on the exact index layout of an ``nn.Sequential``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from torch import nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.models.registry import StateDict


def resolve_widths(widths: Sequence[int] | None, default: Sequence[int], what: str) -> tuple[int, ...]:
    """``widths`` (or ``default`` when None) as a tuple, checked for length and positivity.

    Raises ``InvalidArgumentError`` (a ``ValueError``) so that ``model_from_state_dict`` reports a
    mismatch as a ``CheckpointError`` rather than crashing inside a layer constructor.
    """
    if widths is None:
        return tuple(int(w) for w in default)
    resolved = tuple(int(w) for w in widths)
    if len(resolved) != len(default):
        raise InvalidArgumentError(
            f"{what} must have {len(default)} entries, got {len(resolved)}: {list(resolved)}"
        )
    bad = [w for w in resolved if w < 1]
    if bad:
        raise InvalidArgumentError(f"{what} must all be positive, got {list(resolved)}")
    return resolved


def indexed_weights(state_dict: StateDict, prefix: str, ndim: int) -> list[tuple[int, ...]]:
    """Shapes of ``{prefix}.<i>.weight`` tensors of rank ``ndim``, ordered by the integer ``i``.

    Used to list the convolutions (rank 4) or linear layers (rank 2) of a ``Sequential`` without
    hard-coding where the pooling and activation modules sit between them.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.weight$")
    found: list[tuple[int, tuple[int, ...]]] = []
    for key, tensor in state_dict.items():
        match = pattern.match(key)
        if match and tensor.dim() == ndim:
            found.append((int(match.group(1)), tuple(tensor.shape)))
    return [shape for _, shape in sorted(found)]


def count_blocks(state_dict: StateDict, prefix: str) -> int:
    """How many residual blocks ``{prefix}.<i>.`` the state dict holds (indices 0..n-1)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise InvalidArgumentError(f"blocks under {prefix!r} are not numbered 0..n-1: {indices}")
    return len(indices)


def init_like_authors(module: nn.Module, bn_weight: float = 1.0) -> None:
    """He-normal (fan-out) convolutions, BatchNorm ``(bn_weight, 0)``: the reference code's init.

    Kept so that training one of these networks from scratch starts where the paper's did.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.constant_(m.weight, bn_weight)
            nn.init.zeros_(m.bias)
