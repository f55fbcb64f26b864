"""CIFAR ResNets (He et al. 2016, 1x1-conv shortcuts) exactly as in the neuron-merging reference.

The paper's ResNet-56 places its ReLUs unusually. Because ReLU is idempotent it computes the same
function as the usual post-activation CIFAR ResNet, but its graph differs (the residual stream
carries pre-ReLU tensors), and graph-level tools see that graph, so it is reproduced exactly:

* stem: ``conv1`` (3 -> 16, 3x3, no bias) then ``bn1``, with no ReLU of its own;
* every block: ``x = relu(x); out = relu(bn1(conv1(x))); out = bn2(conv2(out));
  out = out + (downsample(x) if downsample else x)`` -- the ReLU opens the block instead of
  closing it, so the stem's ReLU is the one at the start of ``layer1.0``;
* ``downsample`` = ``Sequential(conv1x1 stride 2 no bias, BatchNorm2d)`` where the width or the
  resolution changes;
* head: ``relu``, ``AvgPool2d(8)``, flatten, ``fc``.

State-dict keys and their order equal the authors' released checkpoint. What merging prunes is
each block's inner width (``conv1``/``bn1`` outputs, ``conv2`` inputs): ``block_widths`` sets it
for every block independently. The residual-stream widths (``stage_widths``) are tied to the
additions and are configurable only so that other studies can build thinner variants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.models._widths import count_blocks, init_like_authors, resolve_widths
from neuronmerge.models.registry import ModelSpec, StateDict, register

DEFAULT_STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)
DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)


class BasicBlock(nn.Module):
    """Pre-ReLU basic block: ``relu, conv-bn-relu, conv-bn, + shortcut``; no ReLU at the end."""

    def __init__(self, in_planes: int, inner: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        # Registration order fixes the state-dict key order: conv1, bn1, conv2, bn2, downsample.
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, out_planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        # Not in-place: a hook (or a traced graph) that keeps a BN output must not see it rectified.
        self.relu_in = nn.ReLU()
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_in(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3x32x32 inputs, with every block's inner width set independently."""

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        block_widths: Sequence[int] | None = None,
        stage_widths: Sequence[int] = DEFAULT_STAGE_WIDTHS,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise InvalidArgumentError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        stages = resolve_widths(stage_widths, DEFAULT_STAGE_WIDTHS, "stage_widths")
        inner = resolve_widths(
            block_widths, [w for w in stages for _ in range(n)], f"block_widths (ResNet-{depth})"
        )
        self.depth = depth
        self.num_classes = num_classes
        self.stage_widths = stages
        self.block_widths = inner

        self.conv1 = nn.Conv2d(3, stages[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stages[0])
        self.relu = nn.ReLU()
        in_planes = stages[0]
        layers: list[nn.Sequential] = []
        for s, planes in enumerate(stages):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, inner[s * n + b], planes, stride))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        # AvgPool2d(8) rather than adaptive pooling: identical on 32x32 inputs, as in the reference.
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(stages[2], num_classes)
        init_like_authors(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(self.relu(x))
        return self.fc(torch.flatten(x, 1))


def cifar_resnet(
    depth: int = 56,
    num_classes: int = 10,
    block_widths: Sequence[int] | None = None,
    stage_widths: Sequence[int] = DEFAULT_STAGE_WIDTHS,
) -> CifarResNet:
    """Build a CIFAR ResNet of ``depth`` = 6n+2.

    ``block_widths`` lists the inner width of each of the 3n blocks in order (``layer1.0`` ...
    ``layer3.{n-1}``); None means unpruned (each block as wide as its stage).
    """
    return CifarResNet(depth, num_classes, block_widths, stage_widths)


def resnet_widths(state_dict: StateDict, stage: str = "layer{}") -> tuple[int, dict[str, Any]]:
    """Blocks per stage, and classes, per-block inner widths and stage widths, read from the tensor
    shapes of a three-stage ResNet whose stage ``s`` is keyed ``stage.format(s)`` with blocks
    ``.{b}.conv1/conv2``, and ``fc`` (the CIFAR ResNets, ``resnet-fmnist``, and with
    ``"block{}.layer"`` the wide ResNets)."""
    stages = [stage.format(s) for s in (1, 2, 3)]
    counts = [count_blocks(state_dict, name) for name in stages]
    if len(set(counts)) != 1 or counts[0] == 0:
        raise InvalidArgumentError(f"stages must hold the same number (>0) of blocks, got {counts}")
    n = counts[0]
    keys = [f"{name}.{b}" for name in stages for b in range(n)]
    return n, {
        "num_classes": state_dict["fc.weight"].shape[0],
        "block_widths": tuple(state_dict[f"{k}.conv1.weight"].shape[0] for k in keys),
        "stage_widths": tuple(state_dict[f"{name}.0.conv2.weight"].shape[0] for name in stages),
    }


def cifar_resnet_config(state_dict: StateDict) -> dict[str, Any]:
    """Depth, classes, per-block inner widths and stage widths, read from tensor shapes."""
    n, widths = resnet_widths(state_dict)
    return {"depth": 6 * n + 2, **widths}


def _fixed_depth(
    depth: int,
) -> tuple[Callable[..., CifarResNet], Callable[[StateDict], dict[str, Any]]]:
    """A builder and a config reader for one depth (the registry's ``resnet56`` and siblings)."""

    def build(
        num_classes: int = 10,
        block_widths: Sequence[int] | None = None,
        stage_widths: Sequence[int] = DEFAULT_STAGE_WIDTHS,
    ) -> CifarResNet:
        return CifarResNet(depth, num_classes, block_widths, stage_widths)

    def config(state_dict: StateDict) -> dict[str, Any]:
        found = cifar_resnet_config(state_dict)
        found_depth = found.pop("depth")
        if found_depth != depth:
            raise InvalidArgumentError(f"these weights are a ResNet-{found_depth}, not a ResNet-{depth}")
        return found

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth}; see :func:`cifar_resnet` for the width arguments."
    return build, config


_FIXED = {depth: _fixed_depth(depth) for depth in DEPTHS}
resnet20 = _FIXED[20][0]
resnet32 = _FIXED[32][0]
resnet44 = _FIXED[44][0]
resnet56 = _FIXED[56][0]
resnet110 = _FIXED[110][0]

for _depth, (_build, _config) in _FIXED.items():
    register(
        ModelSpec(
            name=f"resnet{_depth}",
            build=_build,
            config_from_state_dict=_config,
            input_shape=(3, 32, 32),
            dataset="cifar10",
            description=(
                f"CIFAR ResNet-{_depth} of the neuron-merging reference code "
                "(pre-ReLU blocks, 1x1 conv shortcuts)"
                + (" (the paper's CIFAR-10 net)" if _depth == 56 else "")
            ),
            aliases=(f"resnet-{_depth}", f"ResNet{_depth}-cifar", f"cifar-resnet{_depth}"),
        )
    )

register(
    ModelSpec(
        name="cifar-resnet",
        build=cifar_resnet,
        config_from_state_dict=cifar_resnet_config,
        input_shape=(3, 32, 32),
        dataset="cifar10",
        description="CIFAR ResNet of any depth 6n+2 (default 56); depth read from the weights",
        aliases=("resnet-cifar",),
    )
)
