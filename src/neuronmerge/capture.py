"""Capture: trace a model once into a ``torch.fx.GraphModule`` annotated with tensor shapes.

Everything downstream reads the graph, never the user's Python code, which is what makes the engine
architecture-agnostic. Merging is an inference-time transformation (BatchNorm uses its running
statistics, dropout is the identity), so tracing happens in eval mode.

The trace does not copy the model: like every fx trace, the GraphModule shares the caller's leaf layers
and tensors. That keeps peak memory near the size of the *result* rather than twice the model; the
rest of the pipeline never writes to a shared layer (``surgery`` builds new ones) and ``detach`` copies
whatever is still shared before the result is returned. ``eval_mode`` restores the caller's train/eval
flags on the way out, so the caller's model ends exactly as it started.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule of ``model`` in eval mode for the block, then restore each one's flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def capture(model: nn.Module, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Trace ``model`` (which the caller has put in eval mode) and record every node's output shape.

    The GraphModule shares ``model``'s layers; see the module docstring. Raises ``CaptureError`` naming
    the failing call when the model cannot be traced symbolically (data-dependent control flow, for
    instance); the usual fix is to wrap that call with ``torch.fx.wrap`` or to move it into a leaf
    module.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    try:
        graph_module = fx.symbolic_trace(model)
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


def detach(graph_module: fx.GraphModule, owned: Iterable[torch.Tensor]) -> fx.GraphModule:
    """A copy of ``graph_module`` that shares nothing with the traced model.

    Tensors in ``owned`` (the new weights that surgery created) are moved over as they are; everything
    else (layers that were not resized) is copied once, layer by layer.
    """
    memo: dict[int, object] = {id(tensor): tensor for tensor in owned}
    return copy.deepcopy(graph_module, memo)
