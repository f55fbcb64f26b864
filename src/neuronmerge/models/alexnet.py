"""An AlexNet-style network for 3x32x32 inputs (CIFAR-100 by default).

There is no single canonical CIFAR AlexNet; this one keeps torchvision AlexNet's conv widths
(64-192-384-256-256), its module names (``features``, ``classifier``) and its classifier shape
(dropout, linear, ReLU, dropout, linear, ReLU, linear), scaled to 32x32 images:

====================  =========================================  ===========
layer                 op                                          output
====================  =========================================  ===========
features.0-2          conv 5x5 pad 2 (64), ReLU, maxpool 2        64 x 16 x 16
features.3-5          conv 5x5 pad 2 (192), ReLU, maxpool 2       192 x 8 x 8
features.6-7          conv 3x3 pad 1 (384), ReLU                  384 x 8 x 8
features.8-9          conv 3x3 pad 1 (256), ReLU                  256 x 8 x 8
features.10-12        conv 3x3 pad 1 (256), ReLU, maxpool 2       256 x 4 x 4
classifier.0-2        dropout, linear 4096 -> 2048, ReLU          2048
classifier.3-5        dropout, linear 2048 -> 2048, ReLU          2048
classifier.6          linear 2048 -> num_classes                  num_classes
====================  =========================================  ===========

The hidden FC layers are 2048 wide rather than ImageNet AlexNet's 4096: the flattened features
are 4096 values here (not 9216), and halving keeps the model at about 15 M parameters. No
BatchNorm, so every conv and hidden linear is a plain ``layer -> ReLU`` merge site. Every conv
width and both hidden FC widths are configurable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.models._widths import indexed_weights, resolve_widths
from neuronmerge.models.registry import ModelSpec, StateDict, register

DEFAULT_CONV_WIDTHS: tuple[int, ...] = (64, 192, 384, 256, 256)
DEFAULT_FC_WIDTHS: tuple[int, ...] = (2048, 2048)
_KERNELS: tuple[int, ...] = (5, 5, 3, 3, 3)
_POOL_AFTER: tuple[bool, ...] = (True, True, False, False, True)


class AlexNetCifar(nn.Module):
    """Five convs with ReLU and three max-pools, then three linears (two hidden, with dropout)."""

    def __init__(
        self,
        num_classes: int = 100,
        conv_widths: Sequence[int] | None = None,
        fc_widths: Sequence[int] | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        convs = resolve_widths(conv_widths, DEFAULT_CONV_WIDTHS, "conv_widths (AlexNet)")
        fcs = resolve_widths(fc_widths, DEFAULT_FC_WIDTHS, "fc_widths (AlexNet)")
        self.num_classes = num_classes
        self.conv_widths = convs
        self.fc_widths = fcs

        layers: list[nn.Module] = []
        in_channels = 3
        for width, kernel, pool in zip(convs, _KERNELS, _POOL_AFTER, strict=True):
            layers += [nn.Conv2d(in_channels, width, kernel, padding=kernel // 2), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_channels * 4 * 4, fcs[0]),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(fcs[0], fcs[1]),
            nn.ReLU(),
            nn.Linear(fcs[1], num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def alexnet_cifar(
    num_classes: int = 100,
    conv_widths: Sequence[int] | None = None,
    fc_widths: Sequence[int] | None = None,
    dropout: float = 0.5,
) -> AlexNetCifar:
    """Build the CIFAR AlexNet; ``conv_widths`` has 5 entries, ``fc_widths`` 2 (hidden linears)."""
    return AlexNetCifar(num_classes, conv_widths, fc_widths, dropout)


def alexnet_config(state_dict: StateDict) -> dict[str, Any]:
    """Conv widths, hidden FC widths and classes from shapes (dropout is not stored in weights).

    Serves both AlexNet-style nets (``alexnet-cifar`` and ``alexnet-fmnist``): they lay out five
    convs in ``features`` and three linears in ``classifier`` alike.
    """
    convs = indexed_weights(state_dict, "features", 4)
    linears = indexed_weights(state_dict, "classifier", 2)
    if len(convs) != 5 or len(linears) != 3:
        raise InvalidArgumentError(
            f"expected 5 convs and 3 linears, found {len(convs)} and {len(linears)}"
        )
    return {
        "num_classes": linears[2][0],
        "conv_widths": tuple(shape[0] for shape in convs),
        "fc_widths": (linears[0][0], linears[1][0]),
    }


register(
    ModelSpec(
        name="alexnet-cifar",
        build=alexnet_cifar,
        config_from_state_dict=alexnet_config,
        input_shape=(3, 32, 32),
        dataset="cifar100",
        description="AlexNet-style CIFAR net, convs 64-192-384-256-256, FC 2048-2048 (CIFAR-100)",
        aliases=("alexnet-cifar100",),
    )
)
