"""Capture through ``torch.export`` where ``torch.fx`` cannot trace, lifted back to module calls.

fx traces symbolically, so any Python decision on a tensor's shape (``if x.shape[-1] > 32:``)
stops it. ``torch.export`` (non-strict) runs the model on the example inputs instead and keeps the
branch that was taken, guarded by a check. Its graph is written in ATen operators, with every
parameter read by a ``get_attr`` node: ``aten.linear(x, fc.weight, fc.bias)``. The rest of the
pipeline thinks in layers (a site is a producer *module*, its BatchNorm, its consumer modules), so
``lift`` turns each ``aten.linear`` / ``aten.conv1d`` / ``aten.conv2d`` / ``aten.batch_norm`` whose
tensors all belong to one submodule back into a call of a real ``nn.Linear`` / ``nn.Conv*d`` /
``nn.BatchNorm*d`` that holds those same tensors (nothing is copied). Calls it cannot lift (a weight
computed in the graph, a BatchNorm in training mode) stay as they are; the layers around them are
then simply not merged. A ``torch.fx`` trace has the same calls in their functional spelling where a
module calls ``F.batch_norm`` (or ``F.linear``, ``F.conv2d``) on its own tensors instead of being a
``nn.BatchNorm2d`` leaf: timm's ``BatchNormAct2d`` does, and ``lift`` turns those into layers
too. ``sites`` recognises the ATen forms of the other ops (relu, pooling, views, cat, add...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

Builder = Callable[[Sequence[Any], int], nn.Module | None]


def _linear(args: Sequence[Any], _rank: int) -> nn.Module:
    weight = args[1]
    with torch.device("meta"):
        return nn.Linear(weight.shape[1], weight.shape[0], bias=len(args) > 2 and args[2] is not None)


def _conv(spatial: int) -> Builder:
    kind = nn.Conv1d if spatial == 1 else nn.Conv2d

    def build(args: Sequence[Any], _rank: int) -> nn.Module:
        # aten.convNd(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
        defaults: list[Any] = [None, None, None, 1, 0, 1, 1]
        _, weight, bias, stride, padding, dilation, groups = [*args, *defaults[len(args) :]]
        with torch.device("meta"):
            return kind(
                weight.shape[1] * groups,
                weight.shape[0],
                tuple(weight.shape[2:]),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=bias is not None,
            )

    return build


def _batch_norm(args: Sequence[Any], rank: int) -> nn.Module | None:
    _, weight, _, mean, _, training, momentum, eps = args[:8]
    if training or mean is None:
        return None  # batch statistics: a different computation from a folded BatchNorm
    kind = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d
    with torch.device("meta"):
        return kind(mean.shape[0], eps=eps, momentum=momentum, affine=weight is not None)


_BUILDERS: dict[Any, tuple[Builder, tuple[str, ...]]] = {
    aten.linear.default: (_linear, ("weight", "bias")),
    aten.conv1d.default: (_conv(1), ("weight", "bias")),
    aten.conv2d.default: (_conv(2), ("weight", "bias")),
    aten.batch_norm.default: (_batch_norm, ("weight", "bias", "running_mean", "running_var")),
}

_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

#: The functional spellings of the same layers, which ``torch.fx`` records when a module calls them on
#: its own tensors (timm's ``BatchNormAct2d`` calls ``F.batch_norm``): the ATen op each stands for,
#: its parameter names in the functional signature's order, their defaults, and the order of the
#: ATen form's arguments. (``F.linear`` and ``F.conv2d`` are builtins without a signature to bind.)
_FUNCTIONAL: dict[Any, tuple[Any, tuple[str, ...], dict[str, Any], tuple[str, ...]]] = {
    F.linear: (aten.linear.default, ("input", "weight", "bias"), {"bias": None}, ()),
    F.conv1d: (aten.conv1d.default, ("input", "weight", *_CONV_DEFAULTS), _CONV_DEFAULTS, ()),
    F.conv2d: (aten.conv2d.default, ("input", "weight", *_CONV_DEFAULTS), _CONV_DEFAULTS, ()),
    F.batch_norm: (
        aten.batch_norm.default,
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
    ),
}


def _aten_form(node: fx.Node) -> tuple[Any, list[Any]] | None:
    """``node``'s layer op and its arguments in ATen order (defaults filled), or None when it is not
    a layer call or its arguments do not bind."""
    if not node.kwargs and node.target in _BUILDERS:
        return node.target, list(node.args)
    if node.target not in _FUNCTIONAL:
        return None
    target, names, defaults, order = _FUNCTIONAL[node.target]
    bound = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
    if len(node.args) > len(names) or set(bound) != set(names):
        return None  # an argument the function does not take: not the call we know
    return target, [bound[name] for name in order or names]


def _owner(graph_module: fx.GraphModule, args: Sequence[Any], names: Sequence[str]) -> str | None:
    """The one leaf submodule whose tensors ``args`` are, each in the role ``names`` gives it (the
    weight as ``weight``...), or None: then the call is not a layer's own computation."""
    nodes = [(arg, name) for arg, name in zip(args, names) if arg is not None]
    if not all(isinstance(arg, fx.Node) and arg.op == "get_attr" for arg, _ in nodes):
        return None  # a tensor computed in the graph
    owners = {str(arg.target).rpartition(".")[0] for arg, _ in nodes}
    if len(owners) != 1:
        return None
    owner = owners.pop()
    if not owner or any(str(arg.target) != f"{owner}.{name}" for arg, name in nodes):
        return None
    held = graph_module.get_submodule(owner)._parameters
    return owner if set(held) <= {"weight", "bias"} else None  # _install moves only these


#: The layer calls whose weight and bias a merge resizes (the ATen form each spelling binds to).
_PRODUCERS = frozenset((aten.linear.default, aten.conv1d.default, aten.conv2d.default))


def layer_arguments(node: fx.Node) -> dict[str, Any] | None:
    """The ``weight`` and ``bias`` arguments (nodes, or None for no bias) of a linear or conv call,
    in any spelling the table above knows, or None when ``node`` is no such call."""
    form = _aten_form(node) if node.op == "call_function" else None
    if form is None or form[0] not in _PRODUCERS:
        return None
    args = form[1]
    return {"weight": args[1], "bias": args[2] if len(args) > 2 else None}


def computed_weights(graph_module: fx.GraphModule) -> dict[str, tuple[str, bool]]:
    """Layers whose calls still compute their weight in the forward instead of reading it, by module
    name, with the parameter it is computed from and whether it depends on the model's input too.
    ``constant_fold`` has already stored every weight computed from parameters alone (timm's
    ``StdConv2d``); what is left is a weight that changes with the input, or one whose parameters
    other computations read too: merging resizes parameters and reads them as the layer's rows,
    which such a layer's effective weight is not."""
    found: dict[str, tuple[str, bool]] = {}
    for node in graph_module.graph.nodes:
        slots = layer_arguments(node)
        weight = None if slots is None else slots["weight"]
        if not isinstance(weight, fx.Node) or weight.op == "get_attr":
            continue
        stack, seen, source, dynamic = [weight], set(), None, False
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            dynamic |= current.op == "placeholder"
            owner, _, leaf = str(current.target).rpartition(".")
            if current.op == "get_attr" and leaf == "weight" and source is None:
                source = (owner, str(current.target))
            stack.extend(current.all_input_nodes)
        if source is not None:
            found.setdefault(source[0], (source[1], dynamic))
    return found


def _rank(node: Any) -> int | None:
    """The number of dimensions of ``node``'s value, from export's or ShapeProp's metadata."""
    if not isinstance(node, fx.Node):
        return None
    if "val" in node.meta and hasattr(node.meta["val"], "dim"):
        return int(node.meta["val"].dim())
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _tensor(graph_module: fx.GraphModule, arg: Any) -> Any:
    """The tensor a ``get_attr`` node reads; any other argument as it is."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        owner, _, key = str(arg.target).rpartition(".")
        return getattr(graph_module.get_submodule(owner), key)
    return arg


def _install(graph_module: fx.GraphModule, name: str, layer: nn.Module) -> None:
    """Put ``layer`` at ``name``, moving the old container's tensors (same objects) onto it, and its
    children, which the graph may still call (timm's ``BatchNormAct2d`` holds its activation)."""
    old = graph_module.get_submodule(name)
    for key in ("weight", "bias"):
        if key in old._parameters:
            layer._parameters[key] = old._parameters[key]
    for key, buffer in old._buffers.items():
        layer._buffers[key] = buffer
    layer._modules.update(old._modules)
    parent, _, attr = name.rpartition(".")
    setattr(graph_module.get_submodule(parent), attr, layer.eval())  # the exported graph was eval


def lift(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Turn liftable layer calls (ATen or functional) of ``graph_module`` into module calls, in place."""
    graph = graph_module.graph
    lifted: set[str] = set()
    unused = [node for node in graph.nodes if node.op == "get_attr" and not node.users]
    for node in list(graph.nodes):
        form = _aten_form(node) if node.op == "call_function" else None
        if form is None:
            continue
        build, names = _BUILDERS[form[0]]
        args = form[1]
        owner = _owner(graph_module, args[1 : 1 + len(names)], names)
        rank = _rank(args[0])
        if owner is None or owner in lifted or rank is None:
            continue
        concrete = [_tensor(graph_module, arg) for arg in args]
        layer = build(concrete, rank)
        if layer is None:
            continue
        _install(graph_module, owner, layer)
        lifted.add(owner)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    if not lifted and not unused:
        return graph_module  # nothing changed: keep the code generated by the trace
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return graph_module


def export_graph(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """``torch.export`` ``model`` (non-strict, batch dimension dynamic where it can be); its layers
    are still ATen calls until ``lift``."""
    dynamic = tuple({0: torch.export.Dim.AUTO} if t.dim() > 0 else None for t in inputs)
    program = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
    graph_module = program.module()
    assert isinstance(graph_module, fx.GraphModule)
    return graph_module
