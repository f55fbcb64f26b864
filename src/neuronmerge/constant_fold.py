"""Computed weights folded into stored ones: a linear or conv weight that the forward computes from
parameters alone becomes a plain tensor on the layer, so the layer is an ordinary one to merge.

timm's ``StdConv2d`` (BiT ResNetV2) standardises every output row of its weight with
``F.batch_norm`` on each call, and ``ScaledStdConv2d`` (NF-ResNets, NFNets) also scales it by a
learned gain; weight-normalised or reparametrised layers written in the forward look the same:
``F.conv2d(x, f(self.weight, self.gain), self.bias)``. Merging resizes a layer's rows and folds the
compensation into its consumers' columns, and neither can be done on a raw parameter that the
forward standardises afterwards (a consumer standardises over its input channels too). In eval mode
``f`` depends on parameters only, so its value is a constant: computing it once on the traced graph
and storing it as the layer's ``weight``, before anything is edited, is exact, and ``lift`` then
turns the call into an ``nn.Conv2d`` like any other. Where the computed weight depends on the input,
or its tensors are read by anything else (another layer, another use of the same parameter), or its
computation is random or in place, nothing is folded and the group finder names the layer with its
reason (``exported.computed_weights``).

Not ``torch.fx.experimental.const_fold.split_const_subgraphs``: it folds *every* constant
subgraph (the per-channel parameter views the group finder reads, LayerScale's ``gamma`` reshaped,
would become anonymous tensors), renames module paths (``a.b`` becomes ``a_b``, and plans name layers
by path) and defers the evaluation to the first call. This pass uses the same notion of a constant
node (a ``get_attr``, or a pure call whose inputs are all constants) and fx's own node copying to
evaluate, but only where a layer reads the result.

The caller's model stays untouched: the graph module's modules are its own (``capture``), the
evaluation runs on clones of the parameters, and the folded weight is a new tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from neuronmerge.exported import layer_arguments

#: Node kinds that compute a value from their inputs (a constant when all of those are).
_CALLS = frozenset(("call_function", "call_method", "call_module"))


def _constants(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is the same on every call: parameters and buffers read by ``get_attr``, and
    pure (neither side-effecting nor random) calls on constants alone, as ``split_const_subgraphs``
    defines them."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
            node.op in _CALLS and set(node.all_input_nodes) <= found and not node.is_impure()
        ):
            found.add(node)
    return found


def _ancestors(roots: list[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    """``roots`` and every node they are computed from, in graph order."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return sorted(seen, key=order.__getitem__)


def _dying(call: fx.Node, computed: dict[str, fx.Node], nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes among ``nodes`` that nothing reads once ``call`` reads stored tensors instead of
    ``computed``: the layer's own computation, as opposed to values other nodes read too."""
    results = set(computed.values())
    dying: set[fx.Node] = set()
    for node in reversed(nodes):
        if all(user in dying or (user is call and node in results) for user in node.users):
            dying.add(node)
    return dying


def _owner(
    graph_module: fx.GraphModule,
    call: fx.Node,
    slots: dict[str, Any],
    computed: dict[str, fx.Node],
    nodes: list[fx.Node],
) -> str | None:
    """The module whose tensors alone the computed weight (and bias) are made of, when storing the
    result as its ``weight`` (``bias``) changes nothing else the graph computes; or None."""
    owners = {str(n.target).rpartition(".")[0] for n in nodes if n.op == "get_attr"}
    if len(owners) != 1 or not (owner := owners.pop()):
        return None  # tensors of several modules, or of the model itself: whose layer is it?
    called = [n for n in call.graph.nodes if n.op == "call_module"]
    if any(owner == str(n.target) or owner.startswith(f"{n.target}.") for n in called):
        return None  # a module's own forward reads these tensors too
    kept = {arg for slot, arg in slots.items() if slot not in computed and arg is not None}
    if any(
        not isinstance(arg, fx.Node) or str(arg.target) != f"{owner}.{slot}"
        for slot, arg in slots.items()
        if arg in kept
    ):
        return None  # the stored bias of another module: the layer would not be one module's
    dying = _dying(call, computed, nodes)
    for node in call.graph.nodes:
        if node.op == "get_attr" and node not in dying and node not in kept:
            if str(node.target).rpartition(".")[0] == owner:
                return None  # read elsewhere: storing the folded value in its place would change that
    return owner


def _evaluate(
    graph_module: fx.GraphModule, nodes: list[fx.Node], results: list[fx.Node]
) -> tuple[torch.Tensor, ...] | None:
    """The values of ``results``, computed by a graph of copies of ``nodes`` whose parameters are
    placeholders fed with clones (the caller's tensors are never handed to the computation); None
    when the computation writes to them (not a function of the parameters) or yields no tensor."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    inputs: list[torch.Tensor] = []
    for node in nodes:
        if node.op == "get_attr":
            tensor = _tensor(graph_module, node)
            if tensor is None:
                return None
            inputs.append(tensor.detach().clone())
            copies[node] = graph.placeholder(node.name)
        else:
            copies[node] = graph.node_copy(node, copies.__getitem__)
    graph.output(tuple(copies[r] for r in results))
    versions = [t._version for t in inputs]
    with torch.no_grad():
        values = fx.GraphModule(graph_module, graph)(*inputs)
    if [t._version for t in inputs] != versions:
        return None
    if not all(isinstance(v, torch.Tensor) for v in values):
        return None
    return tuple(values)


def fold_computed_weights(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Store every linear/conv weight (and bias) that ``graph_module`` computes from one layer's
    parameters alone as that layer's own parameter, in place, and return ``graph_module``."""
    graph = graph_module.graph
    constants = _constants(graph)
    order = {node: i for i, node in enumerate(graph.nodes)}
    folded = False
    for call in list(graph.nodes):
        slots = layer_arguments(call)
        if slots is None:
            continue
        computed = {
            slot: arg
            for slot, arg in slots.items()
            if isinstance(arg, fx.Node) and arg.op != "get_attr" and arg in constants
        }
        if not computed:
            continue
        nodes = _ancestors(list(computed.values()), order)
        owner = _owner(graph_module, call, slots, computed, nodes)
        values = None if owner is None else _evaluate(graph_module, nodes, list(computed.values()))
        if owner is None or values is None:
            continue
        _store(graph_module, owner, call, slots, dict(zip(computed, values)), computed, nodes)
        folded = True
    if folded:
        graph.lint()
        graph_module.recompile()
    return graph_module


def _store(
    graph_module: fx.GraphModule,
    owner: str,
    call: fx.Node,
    slots: dict[str, Any],
    values: dict[str, torch.Tensor],
    computed: dict[str, fx.Node],
    nodes: list[fx.Node],
) -> None:
    """Make ``owner`` hold exactly the layer's tensors (``values`` as new parameters, the bias it
    reads as it is) and ``call`` read them; erase the computation nothing reads any more."""
    graph = graph_module.graph
    module = graph_module.get_submodule(owner)
    trainable = any(
        tensor.requires_grad
        for n in nodes
        if n.op == "get_attr" and (tensor := _tensor(graph_module, n)) is not None
    )
    held = {slot: module._parameters.get(slot) for slot in slots if slot not in computed}
    held |= {slot: nn.Parameter(value, requires_grad=trainable) for slot, value in values.items()}
    # The traced module's own table (``capture`` traces a structural copy): the caller's stays.
    module._parameters.clear()
    module._parameters.update((slot, p) for slot, p in held.items() if p is not None)
    for slot, result in computed.items():
        with graph.inserting_before(call):
            read = graph.get_attr(f"{owner}.{slot}")
        call.replace_input_with(result, read)
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


def _tensor(graph_module: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or None when it reads something else."""
    owner, _, key = str(node.target).rpartition(".")
    value = getattr(graph_module.get_submodule(owner), key)
    return value if isinstance(value, torch.Tensor) else None
