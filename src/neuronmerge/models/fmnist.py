"""Small conv nets for Fashion-MNIST (1x28x28, 10 classes) that train in minutes on a CPU.

The paper's conv experiments use CIFAR, which this machine does not have; these three nets give the
same kinds of merge sites on data that is here, at widths small enough to train on two CPU cores:

* ``vgg-fmnist``: VGG-style ``conv3x3-BN-ReLU`` stages (16 | 32, 32 | 64, 64), a 2x2 max-pool after
  each (28 -> 14 -> 7 -> 3), then ``Linear(64*3*3, 128) - BN1d - ReLU - Linear(128, 10)``. Every conv
  and the hidden linear are conv+BN sites; the last conv feeds the linear through a flattened 3x3 map.
* ``alexnet-fmnist``: AlexNet-style, no BatchNorm: convs 5x5 (16), 5x5 (32), 3x3 (48, 48, 32) with
  ReLU and max-pools after the first, second and fifth (28 -> 14 -> 7 -> 3), then ``dropout, Linear
  (288, 256), ReLU, dropout, Linear(256, 128), ReLU, Linear(128, 10)``: conv and FC sites in one model.
* ``resnet-fmnist``: a CIFAR-style ResNet (He et al. 2016: post-activation basic blocks, 1x1 conv + BN
  shortcuts where the shape changes), three stages of two blocks (16, 32, 64 channels), global average
  pooling and one linear. Adapted to 28x28 and to a CPU budget: the first stage also downsamples
  (28 -> 14 -> 7 -> 4), which cuts training time about fourfold. Mergeable: each block's inner width
  (``conv1``/``bn1`` outputs) and the stem (its only readers are the first block's two convs); the
  rest is tied to the residual additions.

Every mergeable width is a constructor argument, and each ``*_config`` reads the widths back from a
state dict, so merged (narrower) models save and reload through ``neuronmerge.load``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.models._widths import indexed_weights, resolve_widths
from neuronmerge.models.alexnet import alexnet_config
from neuronmerge.models.registry import ModelSpec, StateDict, register
from neuronmerge.models.resnet import resnet_widths

IN_CHANNELS = 1
NUM_CLASSES = 10

# ----------------------------------------------------------------------------------------- VGG

VGG_CONV_WIDTHS: tuple[int, ...] = (16, 32, 32, 64, 64)
#: How many of the convs above form each stage; a 2x2 max-pool closes every stage.
VGG_STAGES: tuple[int, ...] = (1, 2, 2)


class VGGFmnist(nn.Module):
    """VGG-style stages of conv3x3-BN-ReLU with max-pools, and a BN hidden linear."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        conv_widths: Sequence[int] | None = None,
        classifier_width: int = 128,
    ) -> None:
        super().__init__()
        widths = resolve_widths(conv_widths, VGG_CONV_WIDTHS, "conv_widths (vgg-fmnist)")
        (hidden,) = resolve_widths((classifier_width,), (128,), "classifier_width")
        self.conv_widths = widths
        self.classifier_width = hidden
        layers: list[nn.Module] = []
        in_channels, remaining = IN_CHANNELS, iter(widths)
        for convs in VGG_STAGES:
            for _ in range(convs):
                out_channels = next(remaining)
                layers += [
                    nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(),
                ]
                in_channels = out_channels
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 3 * 3, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_fmnist_config(state_dict: StateDict) -> dict[str, Any]:
    """Conv widths, hidden width and classes, from tensor shapes."""
    convs = indexed_weights(state_dict, "features", 4)
    linears = indexed_weights(state_dict, "classifier", 2)
    if len(convs) != len(VGG_CONV_WIDTHS) or len(linears) != 2:
        raise InvalidArgumentError(
            f"expected {len(VGG_CONV_WIDTHS)} convs and 2 linears, found {len(convs)} and {len(linears)}"
        )
    return {
        "num_classes": linears[1][0],
        "conv_widths": tuple(shape[0] for shape in convs),
        "classifier_width": linears[0][0],
    }


# ------------------------------------------------------------------------------------- AlexNet

ALEXNET_CONV_WIDTHS: tuple[int, ...] = (16, 32, 48, 48, 32)
ALEXNET_FC_WIDTHS: tuple[int, ...] = (256, 128)
_ALEXNET_KERNELS: tuple[int, ...] = (5, 5, 3, 3, 3)
_ALEXNET_POOL_AFTER: tuple[bool, ...] = (True, True, False, False, True)


class AlexNetFmnist(nn.Module):
    """Five convs with ReLU and three max-pools, then two hidden linears with dropout, no BN."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        conv_widths: Sequence[int] | None = None,
        fc_widths: Sequence[int] | None = None,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        convs = resolve_widths(conv_widths, ALEXNET_CONV_WIDTHS, "conv_widths (alexnet-fmnist)")
        fcs = resolve_widths(fc_widths, ALEXNET_FC_WIDTHS, "fc_widths (alexnet-fmnist)")
        self.conv_widths = convs
        self.fc_widths = fcs
        layers: list[nn.Module] = []
        in_channels = IN_CHANNELS
        for width, kernel, pool in zip(convs, _ALEXNET_KERNELS, _ALEXNET_POOL_AFTER, strict=True):
            layers += [nn.Conv2d(in_channels, width, kernel, padding=kernel // 2), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_channels * 3 * 3, fcs[0]),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(fcs[0], fcs[1]),
            nn.ReLU(),
            nn.Linear(fcs[1], num_classes),
        )
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# -------------------------------------------------------------------------------------- ResNet

RESNET_STAGE_WIDTHS: tuple[int, ...] = (16, 32, 64)
RESNET_BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``: the usual post-activation block."""

    def __init__(self, in_planes: int, inner: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, out_planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetFmnist(nn.Module):
    """Stem conv-BN-ReLU, three stages of basic blocks (each stage halves the map), pool, linear."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        block_widths: Sequence[int] | None = None,
        stage_widths: Sequence[int] = RESNET_STAGE_WIDTHS,
        blocks_per_stage: int = RESNET_BLOCKS_PER_STAGE,
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise InvalidArgumentError(f"blocks_per_stage must be at least 1, got {blocks_per_stage}")
        stages = resolve_widths(stage_widths, RESNET_STAGE_WIDTHS, "stage_widths (resnet-fmnist)")
        n = blocks_per_stage
        inner = resolve_widths(
            block_widths, [w for w in stages for _ in range(n)], "block_widths (resnet-fmnist)"
        )
        # The first block always has a conv shortcut (it downsamples), so the stem feeds no residual
        # add directly and is itself a merge site: its width may differ from the first stage's.
        (stem,) = resolve_widths(None if stem_width is None else (stem_width,), stages[:1], "stem_width")
        self.stage_widths = stages
        self.block_widths = inner
        self.stem_width = stem
        self.conv1 = nn.Conv2d(IN_CHANNELS, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        in_planes = stem
        layers: list[nn.Sequential] = []
        for s, planes in enumerate(stages):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, inner[s * n + b], planes, 2 if b == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(stages[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_fmnist_config(state_dict: StateDict) -> dict[str, Any]:
    """Classes, per-block inner widths, stage widths and blocks per stage, from tensor shapes."""
    n, widths = resnet_widths(state_dict)
    return {**widths, "blocks_per_stage": n, "stem_width": state_dict["conv1.weight"].shape[0]}


register(
    ModelSpec(
        name="vgg-fmnist",
        build=VGGFmnist,
        config_from_state_dict=vgg_fmnist_config,
        input_shape=(1, 28, 28),
        dataset="fashion-mnist",
        description="VGG-style conv-BN-ReLU stages 16|32,32|64,64 + BN linear 128 (Fashion-MNIST)",
    )
)

register(
    ModelSpec(
        name="alexnet-fmnist",
        build=AlexNetFmnist,
        config_from_state_dict=alexnet_config,
        input_shape=(1, 28, 28),
        dataset="fashion-mnist",
        description="AlexNet-style convs 16-32-48-48-32, FC 256-128 with dropout, no BN (Fashion-MNIST)",
    )
)

register(
    ModelSpec(
        name="resnet-fmnist",
        build=ResNetFmnist,
        config_from_state_dict=resnet_fmnist_config,
        input_shape=(1, 28, 28),
        dataset="fashion-mnist",
        description="CIFAR-style ResNet-14 (3 stages x 2 basic blocks, 16-32-64), 28x28 (Fashion-MNIST)",
    )
)
