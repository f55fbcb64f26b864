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

import copy
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from neuronmerge.constant_fold import fold_computed_weights
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
    attributes = new.__dict__
    attributes.update(module.__dict__)
    # Straight into the instance dict: ``nn.Module.__setattr__`` would only check that these names
    # are not parameters or modules, for every module of the network.
    attributes["_parameters"] = dict(module._parameters)
    attributes["_buffers"] = dict(module._buffers)
    attributes["_modules"] = {
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


_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _tensor_metadata(tensor: torch.Tensor) -> TensorMetadata:
    """What ``ShapeProp`` records for ``tensor``, read from the tensor's C++ queries for a dense
    one (ShapeProp's own reader, built for symbolic shapes too, is the larger part of its cost)."""
    if tensor.is_quantized or tensor.layout != torch.strided:
        return _extract_tensor_metadata(tensor)
    memory_format = next((f for f in _MEMORY_FORMATS if tensor.is_contiguous(memory_format=f)), None)
    return TensorMetadata(
        tensor.shape, tensor.dtype, tensor.requires_grad, tensor.stride(), memory_format, False, {}
    )


def _metadata(value: Any) -> tuple[bool, Any]:
    """Whether ``value`` holds a tensor, and its ``tensor_meta`` (``TensorMetadata`` for each tensor
    in the structure)."""
    if type(value) is torch.Tensor or type(value) is nn.Parameter:
        return True, _tensor_metadata(value)
    found = False

    def read(item: Any) -> Any:
        nonlocal found
        if isinstance(item, torch.Tensor):
            found = True
            return _tensor_metadata(item)
        return item

    meta = map_aggregate(value, read)
    return found, meta


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values no later node reads (freed after it runs, as ``fx.Interpreter``
    does, so that the pass holds no more activations than a forward)."""
    done: set[fx.Node] = set()
    last: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for used in node._input_nodes:
            if used not in done:
                done.add(used)
                last.setdefault(node, []).append(used)
    return last


def _record_shapes(graph_module: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> object:
    """Run the graph node by node on ``inputs`` and record every node's ``tensor_meta`` (a
    ``TensorMetadata``, or a structure of them) and ``type``, as ``ShapeProp`` does; return the
    graph's output values.

    A lean loop rather than ``fx.Interpreter``, whose per-node bookkeeping (progress bar, node
    metadata contexts, attribute paths walked per call) cost as much as the layers of a small
    network. An error of the model is raised as the cause of a ``RuntimeError`` naming the node.
    """
    graph = graph_module.graph
    last = _last_uses(graph)
    env: dict[fx.Node, Any] = {}
    arguments = iter(graph.process_inputs(*inputs))
    modules: dict[str, Any] = {}
    fetch = env.__getitem__
    for node in graph.nodes:
        op = node.op
        try:
            if op == "placeholder":
                if str(node.target).startswith("*"):
                    result: Any = list(arguments)
                else:
                    result = next(arguments, node.args[0] if node.args else _MISSING)
                    if result is _MISSING:
                        raise RuntimeError(f"expected an input for {node.target}")
            elif op == "output":
                result = fx.node.map_arg(node.args[0], fetch)
            else:
                args = fx.node.map_arg(node.args, fetch)
                kwargs = fx.node.map_arg(node.kwargs, fetch)
                target = node.target
                if op == "call_module":
                    module = modules.get(target)  # type: ignore[call-overload]
                    if module is None:
                        module = modules[target] = graph_module.get_submodule(target)  # type: ignore[index,arg-type]
                    result = module(*args, **kwargs)
                elif op == "call_function":
                    result = target(*args, **kwargs)  # type: ignore[operator]
                elif op == "call_method":
                    result = getattr(args[0], target)(*args[1:], **kwargs)  # type: ignore[arg-type]
                else:  # get_attr
                    result = _attribute(graph_module, str(target))
        except Exception as exc:
            raise RuntimeError(f"running node {node.format_node()} failed") from exc
        found, meta = _metadata(result)
        if found:
            node.meta["tensor_meta"] = meta
        node.meta["type"] = type(result)
        if op == "output":
            return result
        env[node] = result
        for dead in last.get(node, ()):
            del env[dead]
    raise RuntimeError("the graph has no output node")


_MISSING = object()


def _attribute(root: nn.Module, path: str) -> object:
    value: object = root
    for atom in path.split("."):
        value = getattr(value, atom)
    return value


def capture(model: nn.Module, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Trace a structural copy of ``model`` in eval mode and record every node's output shape.

    The GraphModule shares ``model``'s tensors, never its module objects (see the module docstring).
    Where torch.fx cannot trace (a Python decision on a shape, say), ``torch.export`` captures the
    model instead (see ``exported``). A weight the forward computes from parameters alone is stored
    as the layer's own (``constant_fold``). Where neither can (data-dependent control flow), raises
    ``CaptureError`` naming the user's line that failed and how to wrap it with ``torch.fx.wrap``.
    """
    return capture_with_outputs(model, example_inputs)[0]


def capture_with_outputs(
    model: nn.Module, example_inputs: ExampleInputs
) -> tuple[fx.GraphModule, object]:
    """``capture``, and the values of the graph's output on the example inputs, which the
    shape-recording forward computed anyway (a caller that needs the model's outputs runs no second
    forward). A torch.export module regroups those values in its generated code (``exported``):
    there they are the flat values, not what calling the module returns."""
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
    # A weight computed from parameters alone (weight standardisation) is stored before anything
    # reads the layers' rows and columns, so that the layer is an ordinary one (``constant_fold``).
    fold_computed_weights(graph_module)
    try:
        with torch.no_grad():
            outputs = _record_shapes(graph_module, tuple(t.clone() for t in inputs))
    except Exception as exc:
        cause = exc.__cause__ or exc  # the recorder wraps the model's own error
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise CaptureError(
            f"running {type(model).__name__} on the example inputs (shape {shapes}) failed: "
            f"{str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__}"
        ) from exc
    # Layers given as ATen calls (a model loaded from a torch.export archive) become modules too.
    return lift(graph_module), outputs


def _in_eval_mode(module: nn.Module) -> nn.Module:
    """``module.eval()``, except for the modules of torch.export archives, which refuse mode
    switches: they compute what was exported, and a BatchNorm or dropout exported in training mode
    is left unmerged (``exported.lift``, ``sites``)."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


#: Attribute values that nothing can change in place: a module may keep sharing them.
_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


_ATOMIC = frozenset(_IMMUTABLE)
#: Entries of a module's ``__dict__`` that ``detach`` handles itself (or that are the result's own).
_OWN_TABLES = frozenset(("_parameters", "_buffers", "_modules", "_graph"))
_EMPTY_TABLES = (dict, OrderedDict, set)


def _immutable(value: object) -> bool:
    kind = type(value)  # the exact types first: a module has a few dozen attributes, most of them so
    if kind in _ATOMIC:
        return True
    if kind is tuple:
        return all(_immutable(item) for item in value)  # type: ignore[attr-defined]
    return isinstance(value, _IMMUTABLE)


def _copied(tensor: torch.Tensor, memo: dict[int, object]) -> torch.Tensor:
    """``copy.deepcopy(tensor, memo)``, by ``clone`` for parameters and plain tensors (the
    common case, several times faster)."""
    done = memo.get(id(tensor))
    if done is not None:
        return done  # type: ignore[return-value]
    if type(tensor) is nn.Parameter:
        new: torch.Tensor = nn.Parameter(tensor.detach().clone(), tensor.requires_grad)
    elif type(tensor) is torch.Tensor:
        new = tensor.detach().clone().requires_grad_(tensor.requires_grad)
    else:  # a tensor subclass: let it copy itself
        new = copy.deepcopy(tensor, memo)
    memo[id(tensor)] = new
    return new


def detach(graph_module: fx.GraphModule, owned: Iterable[torch.Tensor]) -> fx.GraphModule:
    """``graph_module`` made to share nothing with the traced model, in place, and returned.

    Its module objects and graph are already its own (``structural_copy``, the trace); what it may
    still share are tensors and mutable attributes (hook tables, say) of layers that surgery did not
    resize. Tensors in ``owned`` (the new weights that surgery created) stay as they are; every other
    parameter and buffer is copied once (a tensor used by two layers stays one tensor), and every
    mutable attribute value is deep-copied. That is what deep-copying the whole module did, without
    copying and recompiling its graph, which on a network of small layers cost more than the merge.
    """
    modules = list(graph_module.modules())
    memo: dict[int, object] = {id(tensor): tensor for tensor in owned}
    memo.update((id(module), module) for module in modules)  # references between them stay
    with warnings.catch_warnings():
        # Copying the input/output specs that torch.export leaves on its modules trips a deprecation
        # inside PyTorch's own pytree code; nothing the user can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        for module in modules:
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        table[name] = _copied(tensor, memo)  # type: ignore[assignment]
            attributes = module.__dict__
            copies: dict[str, object] = {}
            for key, value in attributes.items():
                if key in _OWN_TABLES or _immutable(value):
                    continue  # the tables handled above, the children and graph (ours), constants
                if type(value) in _EMPTY_TABLES and not value:
                    copies[key] = type(value)()  # an empty hook table: the common case, fast
                else:
                    copies[key] = copy.deepcopy(value, memo)
            attributes.update(copies)
    return graph_module
