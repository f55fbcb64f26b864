"""Wide ResNets (Zagoruyko & Komodakis 2016), module names as in the neuron-merging reference code.

Blocks are pre-activation: ``bn1 -> relu1 -> conv1 -> bn2 -> relu2 -> (dropout) -> conv2``, plus a
1x1 ``convShortcut`` applied to the *activated* input where the width or resolution changes (the
identity shortcut takes the raw input). Keys: ``conv1``, ``block{1,2,3}.layer.<i>.{bn1,conv1,bn2,
conv2,convShortcut}``, ``bn1``, ``fc`` -- the same names and order as the authors' WRN-40-4.

What merging prunes is each block's inner width (``conv1``/``bn2`` outputs, ``conv2`` inputs):
``block_widths`` sets it per block. The reference forward flattens with ``view(-1, nChannels[3])``;
here ``torch.flatten(out, 1)`` so that a traced graph does not hard-code a width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.models._widths import init_like_authors, resolve_widths
from neuronmerge.models.registry import ModelSpec, StateDict, register
from neuronmerge.models.resnet import resnet_widths


class WideBasicBlock(nn.Module):
    """Pre-activation block; a shortcut conv sees ``relu(bn1(x))``, an identity shortcut ``x``."""

    def __init__(
        self, in_planes: int, inner: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        # Registration order fixes the key order: bn1, conv1, bn2, conv2, convShortcut.
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(inner, out_planes, 3, stride=1, padding=1, bias=False)
        # The reference only checks the widths; a stride-2 identity would fail on shapes, so a
        # stride also gets a shortcut conv (never the case at the paper's widths).
        self.convShortcut: nn.Conv2d | None = None  # reference checkpoint key
        if in_planes != out_planes or stride != 1:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        out = self.conv2(self.dropout(out))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``self.layer`` is the Sequential of blocks (kept for the reference key names)."""

    def __init__(self, layer: nn.Sequential) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 3x32x32 inputs; stem, stage and per-block inner widths all configurable."""

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 4,
        num_classes: int = 10,
        block_widths: Sequence[int] | None = None,
        stage_widths: Sequence[int] | None = None,
        stem_width: int = 16,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise InvalidArgumentError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        if stem_width < 1:
            raise InvalidArgumentError(f"stem_width must be positive, got {stem_width}")
        n = (depth - 4) // 6
        stages = resolve_widths(
            stage_widths, [16 * widen_factor, 32 * widen_factor, 64 * widen_factor], "stage_widths"
        )
        inner = resolve_widths(
            block_widths, [w for w in stages for _ in range(n)], f"block_widths (WRN-{depth})"
        )
        self.depth = depth
        self.num_classes = num_classes
        self.stem_width = stem_width
        self.stage_widths = stages
        self.block_widths = inner

        self.conv1 = nn.Conv2d(3, stem_width, 3, stride=1, padding=1, bias=False)
        in_planes = stem_width
        stage_modules: list[NetworkBlock] = []
        for s, planes in enumerate(stages):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(WideBasicBlock(in_planes, inner[s * n + b], planes, stride, drop_rate))
                in_planes = planes
            stage_modules.append(NetworkBlock(nn.Sequential(*blocks)))
        self.block1, self.block2, self.block3 = stage_modules
        self.bn1 = nn.BatchNorm2d(stages[2])
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(stages[2], num_classes)
        init_like_authors(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = self.avgpool(self.relu(self.bn1(out)))
        return self.fc(torch.flatten(out, 1))


def wide_resnet(
    depth: int = 40,
    widen_factor: int = 4,
    num_classes: int = 10,
    block_widths: Sequence[int] | None = None,
    stage_widths: Sequence[int] | None = None,
    stem_width: int = 16,
    drop_rate: float = 0.0,
) -> WideResNet:
    """Build WRN-``depth``-``widen_factor`` (depth = 6n+4).

    ``stage_widths`` overrides ``(16k, 32k, 64k)``; ``block_widths`` lists each of the 3n blocks'
    inner widths in order (``block1.layer.0`` ... ``block3.layer.{n-1}``), default = stage width.
    """
    return WideResNet(
        depth, widen_factor, num_classes, block_widths, stage_widths, stem_width, drop_rate
    )


def wide_resnet_config(state_dict: StateDict) -> dict[str, Any]:
    """Depth and every width, read from tensor shapes (``widen_factor`` is implied by them)."""
    n, widths = resnet_widths(state_dict, "block{}.layer")
    return {"depth": 6 * n + 4, **widths, "stem_width": state_dict["conv1.weight"].shape[0]}


def _wrn_40_4_config(state_dict: StateDict) -> dict[str, Any]:
    found = wide_resnet_config(state_dict)
    found_depth = found.pop("depth")
    if found_depth != 40:
        raise InvalidArgumentError(f"these weights are a WRN of depth {found_depth}, not 40")
    return found


def wrn_40_4(
    num_classes: int = 10,
    block_widths: Sequence[int] | None = None,
    stage_widths: Sequence[int] | None = None,
    stem_width: int = 16,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WRN-40-4, the paper's CIFAR-10 network; see :func:`wide_resnet` for the width arguments."""
    return WideResNet(40, 4, num_classes, block_widths, stage_widths, stem_width, drop_rate)


register(
    ModelSpec(
        name="wrn-40-4",
        build=wrn_40_4,
        config_from_state_dict=_wrn_40_4_config,
        input_shape=(3, 32, 32),
        dataset="cifar10",
        description="WideResNet-40-4 of the neuron-merging reference code, CIFAR-10",
        aliases=("wrn40-4", "wide-resnet-40-4", "WideResNet40_4"),
    )
)

register(
    ModelSpec(
        name="wide-resnet",
        build=wide_resnet,
        config_from_state_dict=wide_resnet_config,
        input_shape=(3, 32, 32),
        dataset="cifar10",
        description="WideResNet of any depth 6n+4 (default WRN-40-4); depth read from the weights",
        aliases=("wideresnet", "wrn"),
    )
)
