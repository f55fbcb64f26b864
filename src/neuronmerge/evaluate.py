"""Measurements of a model: top-1 accuracy, parameter count and multiply-accumulates.

All three leave the model exactly as they found it (weights, buffers, train/eval flags), because
they are called on models the user is about to save or compare.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from neuronmerge.errors import InvalidArgumentError


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag (they may differ)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)`` in percent (0-100).

    Runs in eval mode under ``torch.inference_mode()`` in batches of ``batch_size``, moving each
    batch to the model's device; the model's train/eval flags are restored afterwards.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise InvalidArgumentError(
            f"need as many labels as images and at least one, got {len(images)} images and "
            f"{len(labels)} labels"
        )
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    device = _device(model)
    correct = 0
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size].to(device))
            target = labels[start : start + batch_size].to(device)
            correct += int((logits.argmax(dim=1) == target).sum())
    return 100.0 * correct / len(images)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters; a tensor shared between modules is counted once."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> int:
    """Multiply-accumulates (MACs) of one forward pass of ``model`` on ``example_inputs``.

    Counts only ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules (bias additions excluded), measured
    with forward hooks, so a module called twice counts twice and calls to ``torch.nn.functional``
    are not seen. The count covers the whole batch: pass a batch of one for per-example MACs.
    A grouped convolution costs ``out.numel() * in_channels / groups * kernel area``.
    """
    total = 0

    def linear_hook(module: nn.Linear, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    def conv_hook(
        module: nn.Conv1d | nn.Conv2d | nn.Conv3d, _inputs: tuple[Tensor, ...], output: Tensor
    ) -> None:
        nonlocal total
        total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(module.register_forward_hook(conv_hook))
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    device = _device(model)
    try:
        # Eval mode so that batch-norm running statistics are not updated by the measurement.
        with _eval_mode(model), torch.inference_mode():
            model(*(tensor.to(device) for tensor in inputs))
    finally:
        for handle in handles:
            handle.remove()
    return total
