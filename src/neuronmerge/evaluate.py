"""Measurements of a model: top-1 accuracy, parameter count and multiply-accumulates.

All three leave the model exactly as they found it (weights, buffers, train/eval flags), because
they are called on models the user is about to save or compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.graph.ops import CONVS, LAYERS


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


def accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    batch_size: int = 1000,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)`` in percent (0-100).

    Runs in eval mode under ``torch.inference_mode()`` in batches of ``batch_size``, moving each
    batch to the model's device; the model's train/eval flags are restored afterwards.
    ``on_batch`` is called with the number of images of each finished batch (for a progress bar).
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
            if on_batch is not None:
                on_batch(len(target))
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
    return sum(flops_by_layer(model, example_inputs).values())


def flops_by_layer(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> dict[str, int]:
    """MACs of each Linear/Conv module of ``model`` (by qualified name) in one forward pass.

    The per-layer breakdown of ``count_flops`` (same rules), for tables that compare a model with its
    merged version layer by layer. Modules that the forward pass does not call are left out.
    """
    counts: dict[str, int] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if isinstance(module, nn.Linear):
                macs = output.numel() * module.in_features
            else:
                assert isinstance(module, CONVS)
                kernel = math.prod(module.kernel_size)
                macs = output.numel() * (module.in_channels // module.groups) * kernel
            counts[name] = counts.get(name, 0) + macs

        return hook

    handles = [
        module.register_forward_hook(hook_for(name))
        for name, module in model.named_modules()
        if isinstance(module, LAYERS)
    ]
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    device = _device(model)
    try:
        # Eval mode so that batch-norm running statistics are not updated by the measurement.
        with _eval_mode(model), torch.inference_mode():
            model(*(tensor.to(device) for tensor in inputs))
    finally:
        for handle in handles:
            handle.remove()
    return counts
