"""LeNet-300-100, the fully connected network of the paper's first experiment (Fashion-MNIST).

Module names (``ip1``, ``ip2``, ``ip3``) match the authors' released checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuronmerge.models.registry import ModelSpec, StateDict, register


class LeNet300100(nn.Module):
    """784 -> 300 -> ReLU -> 100 -> ReLU -> 10, hidden widths configurable (for merged models)."""

    def __init__(
        self,
        hidden: Sequence[int] = (300, 100),
        in_features: int = 28 * 28,
        num_classes: int = 10,
        bias: bool = True,
    ) -> None:
        super().__init__()
        h1, h2 = hidden
        self.ip1 = nn.Linear(in_features, h1, bias=bias)
        self.relu_ip1 = nn.ReLU(inplace=True)
        self.ip2 = nn.Linear(h1, h2, bias=bias)
        self.relu_ip2 = nn.ReLU(inplace=True)
        self.ip3 = nn.Linear(h2, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.relu_ip1(self.ip1(x))
        x = self.relu_ip2(self.ip2(x))
        return self.ip3(x)


def _config(state_dict: StateDict) -> dict[str, Any]:
    return {
        "hidden": (state_dict["ip1.weight"].shape[0], state_dict["ip2.weight"].shape[0]),
        "in_features": state_dict["ip1.weight"].shape[1],
        "num_classes": state_dict["ip3.weight"].shape[0],
        "bias": "ip1.bias" in state_dict,
    }


register(
    ModelSpec(
        name="lenet-300-100",
        build=LeNet300100,
        config_from_state_dict=_config,
        input_shape=(1, 28, 28),
        dataset="fashion-mnist",
        description="LeNet-300-100 MLP (paper Table 1, Fashion-MNIST)",
        aliases=("LeNet_300_100", "lenet300100"),
    )
)
