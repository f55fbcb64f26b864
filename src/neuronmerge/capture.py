"""Capture: trace a model once into a ``torch.fx.GraphModule`` annotated with tensor shapes.

Everything downstream reads the graph, never the user's Python code, which is what makes the engine
architecture-agnostic. Merging is an inference-time transformation (BatchNorm uses its running
statistics, dropout is the identity), so tracing happens in eval mode.

The trace runs on a *structural* copy: every module object is copied (so whatever the forward or the
tracer sets on modules, and the eval-mode flags, stay off the caller's model) but parameters and
buffers are shared, not copied. That keeps peak memory near the size of the *result* rather than twice
the model; the rest of the pipeline never writes to a shared tensor (``surgery`` builds new layers) and
``detach`` copies whatever is still shared before the result is returned.
"""

from __future__ import annotations

import contextlib
import copy
import io
import traceback
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from neuronmerge.errors import CaptureError, InvalidArgumentError
from neuronmerge.exported import export_graph, lift

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


def structural_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of ``module`` with new module objects (and attribute, parameter, buffer and child tables)
    that share its parameters and buffers. Built field by field rather than with ``copy.deepcopy``,
    which parametrized modules refuse; a submodule used in two places stays one module."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = object.__new__(type(module))
    memo[id(module)] = new
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {
        name: None if child is None else structural_copy(child, memo)
        for name, child in module._modules.items()
    }
    return new


_LIBRARY_DIRS = (Path(torch.__file__).parent, Path(__file__).parent)


def _failing_line(exc: BaseException) -> str:
    """``file:line in function: `code``` of the innermost frame of the user's own code that was
    running when tracing failed, or "" when the failure happened inside PyTorch alone."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [i for i, f in enumerate(frames) if Path(f.filename).is_relative_to(_LIBRARY_DIRS[0])]
    if not inside:
        return ""
    user = [
        f
        for f in frames[inside[0] :]
        if not any(Path(f.filename).is_relative_to(d) for d in _LIBRARY_DIRS)
    ]
    if not user:
        return ""
    frame = user[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}: `{(frame.line or '').strip()}`"


def _untraceable(model: nn.Module, fx_error: Exception, export_error: Exception) -> CaptureError:
    where = _failing_line(fx_error)
    export_reason = str(export_error).strip().splitlines()[0] if str(export_error).strip() else ""
    return CaptureError(
        f"torch.fx could not trace {type(model).__name__}: {fx_error}"
        + (f", at {where}" if where else "")
        + f"; torch.export failed too ({type(export_error).__name__}: {export_reason}). "
        "Python control flow on tensor values cannot be captured: move that code into a "
        "module-level function and register it with torch.fx.wrap('its_name') (it then runs as "
        "one opaque call and the layers next to it stay unmerged), or remove the branch."
    )


def capture(model: nn.Module, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Trace a structural copy of ``model`` in eval mode and record every node's output shape.

    The GraphModule shares ``model``'s tensors, never its module objects (see the module docstring).
    Where torch.fx cannot trace (a Python decision on a shape, say), ``torch.export`` captures the
    model instead (see ``exported``). Where neither can (data-dependent control flow), raises
    ``CaptureError`` naming the user's line that failed and how to wrap it with ``torch.fx.wrap``.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise InvalidArgumentError(
            f"{lazy[0]} is an uninitialised lazy parameter: run the model once on real inputs first"
        )
    copied = _in_eval_mode(structural_copy(model))
    try:
        graph_module = fx.symbolic_trace(copied)
    except Exception as fx_error:  # fx raises many kinds; all mean "cannot trace symbolically"
        try:
            graph_module = export_graph(copied, tuple(t.clone() for t in inputs))
        except Exception as export_error:
            raise _untraceable(model, fx_error, export_error) from fx_error
    try:
        # ShapeProp prints the traceback of a failing node itself; the error below says it all.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(graph_module).propagate(*(t.clone() for t in inputs))
    except Exception as exc:
        cause = exc.__cause__ or exc  # ShapeProp wraps the model's own error in a long one
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise CaptureError(
            f"running {type(model).__name__} on the example inputs (shape {shapes}) failed: "
            f"{str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__}"
        ) from exc
    # Layers given as ATen calls (a model loaded from a torch.export archive) become modules too.
    return lift(graph_module)


def _in_eval_mode(module: nn.Module) -> nn.Module:
    """``module.eval()``, except for the modules of torch.export archives, which refuse mode
    switches: they compute what was exported, and a BatchNorm or dropout exported in training mode
    is left unmerged (``exported.lift``, ``sites``)."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


def detach(graph_module: fx.GraphModule, owned: Iterable[torch.Tensor]) -> fx.GraphModule:
    """A copy of ``graph_module`` that shares nothing with the traced model.

    Tensors in ``owned`` (the new weights that surgery created) are moved over as they are; everything
    else (layers that were not resized) is copied once, layer by layer.
    """
    memo: dict[int, object] = {id(tensor): tensor for tensor in owned}
    with warnings.catch_warnings():
        # Copying the input/output specs that torch.export leaves on its modules trips a deprecation
        # inside PyTorch's own pytree code; nothing the user can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(graph_module, memo)
