"""Capture: trace a model once into a ``torch.fx.GraphModule`` annotated with tensor shapes.

Everything downstream reads the graph, never the user's Python code, which is what makes the engine
architecture-agnostic. The trace runs on a deep copy in eval mode (merging is an inference-time
transformation: BatchNorm uses its running statistics, dropout is the identity), so the caller's model
is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from neuronmerge.errors import CaptureError, InvalidArgumentError

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def as_input_tuple(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    """Normalise ``example_inputs`` (a tensor or a sequence of tensors) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise InvalidArgumentError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def capture(model: nn.Module, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Trace a deep copy of ``model`` and record every node's output shape in ``node.meta``.

    Raises ``CaptureError`` naming the failing call when the model cannot be traced symbolically
    (data-dependent control flow, for instance); the usual fix is to wrap that call with
    ``torch.fx.wrap`` or to move it into a leaf module.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    copied = copy.deepcopy(model).eval()
    try:
        graph_module = fx.symbolic_trace(copied)
    except Exception as exc:  # fx raises many kinds; all mean "cannot trace"
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Data-dependent Python "
            "control flow cannot be traced; wrap the offending function with torch.fx.wrap or "
            "move it into a submodule."
        ) from exc
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*(t.clone() for t in inputs))
    except Exception as exc:
        raise CaptureError(
            f"running {type(model).__name__} on the example inputs failed: {exc}"
        ) from exc
    return graph_module
