"""CIFAR VGG with BatchNorm, laid out as in the neuron-merging reference code (models/VGG.py).

``feature`` is a Sequential of ``conv3x3(bias=False) - BatchNorm2d - ReLU`` triples and 2x2
max-pools; the forward is ``feature -> AvgPool2d(2) -> flatten -> classifier`` with
``classifier = Sequential(Linear(last_width, 512), BatchNorm1d(512), ReLU, Linear(512, classes))``.
Keys (``feature.0.weight``, ``feature.1.weight``, ..., ``classifier.0.weight``, ...) follow the
authors' checkpoints. Every conv width is configurable (merging prunes each conv's output channels),
and so is the classifier's hidden width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.models._widths import indexed_weights, init_like_authors, resolve_widths
from neuronmerge.models.registry import ModelSpec, StateDict, register

# "M" marks a 2x2 max-pool; the integers are the unpruned conv widths.
LAYOUTS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512,
    ),
}  # fmt: skip


def default_conv_widths(depth: int) -> tuple[int, ...]:
    """The unpruned conv widths of VGG-``depth``, in order."""
    return tuple(v for v in LAYOUTS[depth] if isinstance(v, int))


class VGGCifar(nn.Module):
    """VGG-11/13/16/19 with BN for 3x32x32 inputs (four pools: 32 -> 2, then AvgPool2d(2))."""

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 10,
        conv_widths: Sequence[int] | None = None,
        classifier_width: int = 512,
    ) -> None:
        super().__init__()
        if depth not in LAYOUTS:
            raise InvalidArgumentError(f"VGG depth must be one of {sorted(LAYOUTS)}, got {depth}")
        if classifier_width < 1:
            raise InvalidArgumentError(f"classifier_width must be positive, got {classifier_width}")
        widths = resolve_widths(conv_widths, default_conv_widths(depth), f"conv_widths (VGG-{depth})")
        self.depth = depth
        self.num_classes = num_classes
        self.conv_widths = widths
        self.classifier_width = classifier_width

        layers: list[nn.Module] = []
        in_channels = 3
        remaining = iter(widths)
        for item in LAYOUTS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_channels = next(remaining)
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            in_channels = out_channels
        self.feature = nn.Sequential(*layers)
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, classifier_width),
            nn.BatchNorm1d(classifier_width),
            nn.ReLU(),
            nn.Linear(classifier_width, num_classes),
        )
        # The reference init: He-normal convs, BN gamma 0.5, linear N(0, 0.01) with zero bias.
        init_like_authors(self.feature, bn_weight=0.5)
        init_like_authors(self.classifier, bn_weight=0.5)
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.feature(x))
        return self.classifier(torch.flatten(x, 1))


def vgg_cifar(
    depth: int = 16,
    num_classes: int = 10,
    conv_widths: Sequence[int] | None = None,
    classifier_width: int = 512,
) -> VGGCifar:
    """Build CIFAR VGG-``depth`` (11, 13, 16, 19) with one width per conv layer, in order."""
    return VGGCifar(depth, num_classes, conv_widths, classifier_width)


def vgg_cifar_config(state_dict: StateDict) -> dict[str, Any]:
    """Depth (from the number of convs), conv widths, hidden width and classes, from shapes."""
    convs = indexed_weights(state_dict, "feature", 4)
    linears = indexed_weights(state_dict, "classifier", 2)
    by_count = {len(default_conv_widths(d)): d for d in LAYOUTS}
    if len(convs) not in by_count or len(linears) != 2:
        raise InvalidArgumentError(
            f"expected 8/10/13/16 convs and 2 linears, found {len(convs)} and {len(linears)}"
        )
    return {
        "depth": by_count[len(convs)],
        "num_classes": linears[1][0],
        "conv_widths": tuple(shape[0] for shape in convs),
        "classifier_width": linears[0][0],
    }


def _vgg16_config(state_dict: StateDict) -> dict[str, Any]:
    found = vgg_cifar_config(state_dict)
    found_depth = found.pop("depth")
    if found_depth != 16:
        raise InvalidArgumentError(f"these weights are a VGG-{found_depth}, not a VGG-16")
    return found


def vgg16_cifar(
    num_classes: int = 10,
    conv_widths: Sequence[int] | None = None,
    classifier_width: int = 512,
) -> VGGCifar:
    """VGG-16 for CIFAR-10, as in the paper; 13 conv widths in ``conv_widths``."""
    return VGGCifar(16, num_classes, conv_widths, classifier_width)


def vgg16_cifar100(
    num_classes: int = 100,
    conv_widths: Sequence[int] | None = None,
    classifier_width: int = 512,
) -> VGGCifar:
    """VGG-16 for CIFAR-100, as in the paper: the same network with 100 outputs by default."""
    return VGGCifar(16, num_classes, conv_widths, classifier_width)


register(
    ModelSpec(
        name="vgg16-cifar",
        build=vgg16_cifar,
        config_from_state_dict=_vgg16_config,
        input_shape=(3, 32, 32),
        dataset="cifar10",
        description="VGG-16 with BN of the neuron-merging reference code, CIFAR-10",
        aliases=("vgg16-cifar10", "vgg16_bn-cifar"),
    )
)

register(
    ModelSpec(
        name="vgg16-cifar100",
        build=vgg16_cifar100,
        config_from_state_dict=_vgg16_config,
        input_shape=(3, 32, 32),
        dataset="cifar100",
        description="VGG-16 with BN of the neuron-merging reference code, 100 classes (CIFAR-100)",
        aliases=("vgg16_bn-cifar100",),
    )
)

register(
    ModelSpec(
        name="vgg-cifar",
        build=vgg_cifar,
        config_from_state_dict=vgg_cifar_config,
        input_shape=(3, 32, 32),
        dataset="cifar10",
        description="CIFAR VGG-11/13/16/19 with BN (default 16); depth read from the weights",
        aliases=(),
    )
)
