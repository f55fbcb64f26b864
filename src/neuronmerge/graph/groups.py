"""The group finder: from every producer, grow the set of channels coupled to its own, or say why not.

A worklist over the tensors that carry the group's channels. Each tensor's readers are looked up in
the op table (``graph.ops``) and either end the walk (a consumer: Linear or Conv reading the
channels), continue it (per-channel ops: activations, BatchNorm anywhere, depthwise convs, pooling,
padding, views, permutes, concatenations), or *join* another tensor to the group: the other operand
of a residual add or of a gate product is walked backwards to the producers that write it, which
then belong to the group too (a residual stream: every layer adding into it). Where the channels
sit in each tensor is tracked with the pure rules of ``graph.layout``. Anything else (the model
output, an op mixing the channel axis with another, tied or computed weights)
refuses the whole group with its reason, for every producer reached.

The result is frozen ``types.Group`` values with a mode decided by the math (see ``types.Mode``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from neuronmerge.exported import computed_weights
from neuronmerge.graph import layout as lay
from neuronmerge.graph.layout import Layout
from neuronmerge.graph.ops import Op, label, lookup, spatial_dims
from neuronmerge.types import (
    ConsumerSlice,
    Group,
    LiteralFix,
    ParamSlice,
    Skipped,
    Step,
    StepKind,
)

OUTPUT = "channels are part of the model's output"
NON_HOMOGENEOUS = (
    "{} is not positively homogeneous (f(s*x) != s*f(x)); "
    "approximate=True merges through it and measures the error"
)


class _Refusal(Exception):
    """The walk met something no method can pass through."""


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise _Refusal(f"no tensor shape recorded for {node.name}")
    return tuple(meta.shape)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


@dataclass
class _Growing:
    """One group while it grows (mutable; frozen into a ``Group`` at the end)."""

    channels: int
    layouts: dict[fx.Node, Layout] = field(default_factory=dict)
    producers: list[fx.Node] = field(default_factory=list)
    roots: dict[fx.Node, fx.Node] = field(default_factory=dict)  # producer -> its root tensor
    folded: dict[fx.Node, list[str]] = field(default_factory=dict)
    steps: dict[fx.Node, Step] = field(default_factory=dict)
    consumers: list[ConsumerSlice] = field(default_factory=list)
    params: list[ParamSlice] = field(default_factory=list)
    literals: list[LiteralFix] = field(default_factory=list)
    queue: list[tuple[fx.Node, Layout]] = field(default_factory=list)
    #: Grouped convs split the channels into this many equal blocks (each keeps as many).
    blocks: int = 1
    seen: set[tuple[fx.Node, fx.Node, Layout]] = field(default_factory=set)
    #: Producers named otherwise than their node's target (an attention's ``out_proj``).
    names: dict[fx.Node, str] = field(default_factory=dict)
    #: Weight rows per channel of a producer (a head's rows), where not one.
    row_blocks: dict[fx.Node, int] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)
    multiple: int = 1


class GroupFinder:
    """Walks a shape-annotated GraphModule and returns every producer's group or why it has none."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
        self.calls: dict[str, int] = {}
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
        # Tensors held by more than one module (tied weights) or read by the graph itself (get_attr):
        # resizing a layer that holds one would silently untie it, or change what the other use reads.
        self.owners: dict[int, list[str]] = {}
        for module_name, module in self.modules.items():
            for tensor in dict.fromkeys([*module._parameters.values(), *module._buffers.values()]):
                if tensor is not None:
                    self.owners.setdefault(id(tensor), []).append(module_name)
        self.ops: dict[fx.Node, Op | None] = {}
        self.read_directly = {
            str(node.target) for node in graph_module.graph.nodes if node.op == "get_attr"
        }
        # Every view/reshape whose target shape is computed: per size element, the tensor axes
        # it is computed from (``reshape(B, N, 3, h, C // h)`` with ``B, N, C = x.shape``).
        self.sized: list[tuple[fx.Node, list[tuple[int, set[tuple[fx.Node, int | None]]]]]] = []
        for node in graph_module.graph.nodes:
            if not _is_view(node, self._op(node)):
                continue
            elements = [
                (index, _shape_reads(element))
                for index, element in enumerate(_target_sizes(node))
                if isinstance(element, fx.Node)
            ]
            if any(reads for _, reads in elements):
                self.sized.append((node, elements))

    def find(self) -> tuple[list[Group], list[Skipped]]:
        """Every producer in graph order, in exactly one Group or one Skipped."""
        groups: list[Group] = []
        skipped: list[Skipped] = []
        done: set[fx.Node] = set()
        # Heads first: the projections feeding a scaled dot-product attention are grouped by head.
        seeds = [n for n in self.gm.graph.nodes if self._is_heads(n)]
        seeds += [n for n in self.gm.graph.nodes if self._is_producer(n)]
        # An attention no layer's channels reach still gets its group, or the reason it has none.
        seeds += [
            n
            for n in self.gm.graph.nodes
            if isinstance(self._module(n), nn.MultiheadAttention) and not self._is_heads(n)
        ]
        for node in seeds:
            if node in done:
                continue
            state = _Growing(channels=0)
            try:
                if self._is_heads(node):
                    self._heads(node, state)
                elif isinstance(self._module(node), nn.MultiheadAttention):
                    self._add_attention(node, state)
                else:
                    self._add_producer(node, state, None)
                group = self._grow(state)
            except _Refusal as refusal:
                reached = state.producers or ([] if self._is_heads(node) else [node])
                if isinstance(self._module(node), nn.MultiheadAttention):
                    state.names.setdefault(node, f"{node.target}.out_proj")
                done.update(reached)
                skipped += [Skipped(state.names.get(p, str(p.target)), str(refusal)) for p in reached]
                continue
            done.update(state.producers)
            groups.append(group)
        skipped += self._unnamed(groups, skipped)
        order = {name: i for i, name in enumerate(self.modules)}
        skipped.sort(key=lambda s: order.get(s.producer, 0))
        return groups, skipped

    def _unnamed(self, groups: list[Group], skipped: list[Skipped]) -> list[Skipped]:
        """A reason for every Linear/Conv the walk did not name: depthwise convs left out with the
        layer that writes their channels, and layers whose weights are used without calling them
        (inside ``nn.MultiheadAttention``, or by ``F.linear`` on their weight)."""
        named = {s.producer for s in skipped} | {p for g in groups for p in g.producers}
        named |= {p.owner for g in groups for p in g.params}
        result = []
        for name, module in self.modules.items():
            if name in named or not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                continue
            if self.calls.get(name, 0) == 0:
                why = "never called as a layer (its weights are used by another module or function)"
            elif self._is_depthwise(module):
                why = "depthwise conv: its channels follow the layer writing them, left alone"
            else:
                continue
            result.append(Skipped(name, why))
        for name, (source, dynamic) in computed_weights(self.gm).items():
            if name not in named:
                why = (
                    f"its weight is computed in the forward from {source} and the input (a "
                    "new weight for every input): no parameter to resize"
                    if dynamic
                    else f"its weight is computed in the forward from {source}, and that cannot "
                    "be stored as the layer's own constant (tensors other computations read too, "
                    "or a random or in-place op): no parameter to resize"
                )
                result.append(Skipped(name, why))
        return result

    # -- what a node is ------------------------------------------------------------------------

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def _op(self, node: fx.Node) -> Op | None:
        # Looked up once per node: a walk asks about the same nodes from every group they touch.
        if node not in self.ops:
            self.ops[node] = lookup(node, self._module(node))
        return self.ops[node]

    def _is_depthwise(self, module: nn.Module | None) -> bool:
        return (
            isinstance(module, (nn.Conv1d, nn.Conv2d))
            and module.groups > 1
            and module.groups == module.in_channels == module.out_channels
        )

    def _is_heads(self, node: fx.Node) -> bool:
        """A scaled dot-product attention call (not a module): its heads are a group's channels."""
        op = self._op(node)
        return op is not None and op.effect == "attention" and node.op != "call_module"

    def _is_producer(self, node: fx.Node) -> bool:
        op = self._op(node)
        return op is not None and op.effect == "producer" and not self._is_depthwise(self._module(node))

    def _check_resizable(self, name: str, weight: str = "weight") -> None:
        """Refuse when layer ``name``'s tensors are not its own plain parameters and buffers: tied to
        another module, read directly by the graph, or computed (parametrizations, weight_norm hooks).
        """
        module = self.modules[name]
        if self.calls.get(name, 0) > 1:
            raise _Refusal(f"{name} is called {self.calls[name]} times (shared weights)")
        if parametrize.is_parametrized(module) or weight not in module._parameters:
            raise _Refusal(f"{name}.{weight} is computed (a parametrization or weight_norm hook)")
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            others = [owner for owner in self.owners.get(id(tensor), []) if owner != name]
            if others:
                raise _Refusal(f"{name}.{key} is shared with {others[0]} (tied weights)")
            if f"{name}.{key}" in self.read_directly:
                raise _Refusal(f"{name}.{key} is also read directly by the graph")

    # -- growing one group ---------------------------------------------------------------------

    def _grow(self, state: _Growing) -> Group:
        while state.queue:
            tensor, where = state.queue.pop()
            for user in list(tensor.users):
                if (tensor, user, where) in state.seen:
                    continue
                state.seen.add((tensor, user, where))
                self._forward(tensor, user, state, where)
        if not state.consumers:
            raise _Refusal("no layer consumes these channels")
        if state.channels % state.blocks:
            raise _Refusal(f"grouped convolutions split {state.channels} channels unevenly")
        self._check_computed_sizes(state)
        return self._freeze(state)

    def _check_computed_sizes(self, state: _Growing) -> None:
        """Refuse when a view/reshape would not follow the group's width: a tensor outside the
        group shaped with the group's channel count (CaiT's ``qkv(x).reshape(B, N, 3, h, C // h)``
        with ``C`` from ``x.shape``), or the group's channel axis shaped from another tensor's
        size. Surgery cannot rewrite a size computed at run time; resizing one side alone breaks
        the reshape."""
        for node, elements in self.sized:
            source = node.args[0]
            inside = source in state.layouts
            out = state.layouts.get(node)
            for index, reads in elements:
                ours = [
                    tensor
                    for tensor, axis in reads
                    if (where := state.layouts.get(tensor)) is not None
                    and (axis is None or axis == where.dim)
                ]
                if ours and not inside:
                    raise _Refusal(
                        f"{label(node, None)} shapes {getattr(source, 'name', source)} with the "
                        f"channel count of {ours[0].name}, which would not follow the merge"
                    )
                if inside and out is not None and index == out.dim and reads and not ours:
                    tensor = min((t for t, _ in reads), key=lambda t: t.name)
                    raise _Refusal(
                        f"{label(node, None)} shapes the channels of {node.name} with a size of "
                        f"{tensor.name}, which would not follow the merge"
                    )

    def _add_producer(self, node: fx.Node, state: _Growing, expected: Layout | None) -> None:
        name = str(node.target)
        module = self._module(node)
        assert isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
        state.producers.append(node)
        self._check_resizable(name)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            state.blocks = math.lcm(state.blocks, module.groups)
            if module.padding_mode != "zeros":
                raise _Refusal(f"padding_mode={module.padding_mode!r} is not supported")
        shape = _shape(node)
        if isinstance(module, nn.Linear):
            where = Layout(len(shape) - 1)
            if (
                expected is not None
                and expected.block > 1
                and expected == Layout(where.dim, 0, expected.block)
            ):
                # Heads: each channel is a block of rows (the head's dims) of the output.
                where = expected
                state.row_blocks[node] = expected.block
        else:
            if len(shape) != spatial_dims(module) + 2:
                raise _Refusal(f"unbatched input of shape {shape}: the channels are not on axis 1")
            where = Layout(1)
        if expected is not None and expected != where:
            raise _Refusal(f"{name} writes the channels in another layout than the stream it joins")
        written = shape[where.dim] // where.block
        if not state.channels:
            state.channels = written
        elif written != state.channels:
            raise _Refusal(f"{name} writes {written} channels into a group of {state.channels}")
        state.layouts[node] = where
        # Fold the BatchNorms that alone read the producer into its rows: what the channel computes.
        root, folded = node, []
        while True:
            users = [u for u in root.users if (op := self._op(u)) is None or op.effect != "metadata"]
            if len(users) != 1 or (op := self._op(users[0])) is None or op.effect != "batchnorm":
                break
            bn_node = users[0]
            self._usable_norm(bn_node, where)
            state.seen.add((root, bn_node, where))
            bn_name = str(bn_node.target)
            folded.append(bn_name)
            state.params.append(ParamSlice(bn_name, "*", 0, 0))
            state.layouts[bn_node] = where
            root = bn_node
        state.roots[node] = root
        state.folded[node] = folded
        state.queue += [(node, where)] if root is node else [(node, where), (root, where)]

    def _usable_norm(self, node: fx.Node, where: Layout) -> bool:
        bn = self._module(node)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        if where.dim != 1 or where.block != 1:
            raise _Refusal("BatchNorm normalises an axis other than the producer's channels")
        if not bn.track_running_stats or bn.running_mean is None:
            raise _Refusal(f"{node.target} has no running statistics to fold")
        self._check_resizable(str(node.target))
        return True

    def _claim(self, node: fx.Node, where: Layout, state: _Growing, step: Step) -> None:
        """``node`` carries the channels at ``where``, computed as ``step``: record, walk on.

        A tensor may carry the same channels twice (``cat([max(h), avg(h)])``): each layout is
        walked, and each consumer reads its own slice."""
        state.layouts.setdefault(node, where)
        state.steps.setdefault(node, step)
        state.queue.append((node, where))

    def _join(self, node: fx.Node, where: Layout, state: _Growing) -> None:
        """Add ``node``, whose channels must be the group's at ``where``, walking back to producers."""
        if node in state.layouts:
            if state.layouts[node] != where:
                raise _Refusal(f"{node.name} carries the channels in two layouts")
            return
        if self._is_producer(node):
            self._add_producer(node, state, where)
            return
        op = self._op(node)
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        module = self._module(node)
        name = label(node, module)
        if node.op == "placeholder":
            raise _Refusal(f"the channels come from the model input {node.name}, which cannot lose any")
        if op is not None and op.effect == "index" and self._attention_output(node):
            assert isinstance(source, fx.Node)
            self._add_attention(source, state)
            if state.layouts.get(node) != where:
                raise _Refusal(f"{name} carries the channels in another layout than the stream")
            return
        if op is not None and op.effect == "cat":
            self._cat(node, where, state)
            return
        if op is None or source is None or op.effect in ("producer", "metadata"):
            raise _Refusal(f"the channels come from {name}, which cannot lose channels")
        if op.effect in ("add", "sub", "mul"):
            state.layouts[node] = where
            ndim = len(_shape(node))
            for operand in node.args[:2]:
                # Parameters (LayerScale, a positional embedding) and tensors constant across the
                # channels are not walked: ``_forward_binary`` takes them as per-channel factors or
                # terms.
                if not isinstance(operand, fx.Node) or self._parameter_chain(operand):
                    continue
                extent = _shape(operand)
                at = where.dim - (ndim - len(extent))
                if at >= 0 and extent[at] != 1:
                    self._join(operand, where, state)
            state.seen.update((o, node, where) for o in node.args[:2] if isinstance(o, fx.Node))
            self._forward_binary(node, op, state)
            return
        before: Layout | None = where
        if op.effect == "layout":
            before = lay.reshaped(_shape(node), _shape(source), where)
        elif op.effect == "permute":  # the inverse permutation
            order = _permutation(node)
            before = Layout(int(order[where.dim]) % len(order), where.offset, where.block)
            before = before if where.block == 1 else None
        elif op.effect == "transpose":  # an involution
            first, second = int(node.args[1]), int(node.args[2])  # type: ignore[arg-type]
            before = lay.transposed(where, first, second, len(_shape(node)))
        elif op.effect == "index":
            before = lay.unindexed(where, len(_shape(source)), node.args[1])
        elif op.effect == "layernorm":  # ``_normalised`` checks it normalises the channels alone
            before = where
        elif op.effect not in (
            "pass",
            "dropout",
            "homogeneous",
            "nonhomogeneous",
            "batchnorm",
            "maxpool",
            "avgpool",
            "pad",
            "prelu",
        ):
            before = None
        if before is None:
            raise _Refusal(f"the channels come from {name}, which cannot lose channels")
        self._join(source, before, state)
        state.seen.add((source, node, before))
        if node not in state.layouts:  # else a BatchNorm folded into the producer just joined
            self._forward(source, node, state, before)

    # -- one reader of a group tensor ---------------------------------------------------------

    def _forward(self, tensor: fx.Node, user: fx.Node, state: _Growing, where: Layout) -> None:
        if user.op == "output":
            raise _Refusal(OUTPUT)
        module = self._module(user)
        op = lookup(user, module)
        name = label(user, module)
        if op is None:
            raise _Refusal(f"channels reach {name}, which merging cannot pass through")
        effect = op.effect
        if module is not None and effect not in ("producer", "batchnorm", "prelu", "layernorm"):
            if any(True for _ in module.parameters(recurse=False)) and self.calls[str(user.target)] > 1:
                raise _Refusal(f"{name} is called more than once (shared weights)")
        ndim = len(_shape(tensor))
        if effect == "metadata":
            return
        if effect == "producer" and not self._is_depthwise(module):
            self._consumer(tensor, user, module, where, state)
            return
        if effect == "producer" or effect == "batchnorm":  # depthwise conv or BatchNorm: per channel
            self._per_channel_module(tensor, user, module, where, state)
            return
        if effect in ("pass", "homogeneous", "nonhomogeneous", "dropout", "prelu"):
            self._elementwise(tensor, user, op, module, where, state)
            return
        if effect in ("maxpool", "avgpool"):
            if getattr(module, "return_indices", False) or user.kwargs.get("return_indices", False):
                raise _Refusal(f"{name} returns indices")
            spatial = spatial_dims(module if module is not None else user.target)
            if not lay.pooled(where, len(_shape(user)), spatial):
                raise _Refusal(f"{name} would pool across the channel axis")
            pooling: StepKind = "maxpool" if effect == "maxpool" else "pass"
            self._claim(user, where, state, Step(user.name, pooling, (tensor.name,), label=name))
            return
        if effect in ("layout", "permute", "transpose", "expand", "index", "reduce", "pad", "cat"):
            self._relayout(tensor, user, op, module, where, ndim, state)
            return
        if effect in ("add", "sub", "mul"):
            self._forward_binary(user, op, state)
            return
        if effect == "pow":
            exponent = user.args[1] if len(user.args) > 1 else None
            if user.args[0] is not tensor or not isinstance(exponent, (int, float)):
                raise _Refusal(f"{name} raises to a power that is not a constant")
            step = Step(user.name, "homogeneous", (tensor.name,), float(exponent), name)
            self._claim(user, where, state, step)
            return
        if effect in ("layernorm", "groupnorm", "softmax"):
            self._normalised(tensor, user, op, module, where, ndim, state)
            return
        if effect == "attention" and module is not None:
            queries = [_arg(user, i, key) for i, key in enumerate(("query", "key", "value"))]
            assert isinstance(module, nn.MultiheadAttention)
            read = queries if module._qkv_same_embed_dim else queries[:1]
            if tensor not in read:
                raise _Refusal(
                    f"channels reach {name} other than as its query"
                    + ("" if module._qkv_same_embed_dim else " (its key/value width is kdim/vdim)")
                )
            if where != Layout(ndim - 1):
                raise _Refusal(f"{name} reads the channels with a different layout")
            self._add_attention(user, state)
            return
        if effect == "attention":
            if where != Layout(ndim - 3) or tensor not in user.args[:3]:
                raise _Refusal(f"channels reach {name} other than as the heads of its query/key/value")
            self._heads(user, state)
            return
        raise _Refusal(f"channels reach {name}, which merging cannot pass through")

    # -- attention -------------------------------------------------------------------------------

    def _attention_output(self, node: fx.Node) -> bool:
        """Whether ``node`` is ``attention(...)[0]`` of an ``nn.MultiheadAttention`` call."""
        source = node.args[0] if node.args else None
        return (
            isinstance(source, fx.Node)
            and isinstance(self._module(source), nn.MultiheadAttention)
            and node.args[1:2] == (0,)
        )

    def _add_attention(self, node: fx.Node, state: _Growing) -> None:
        """An ``nn.MultiheadAttention`` call joins the group: its query (with key and value when
        they share the packed ``in_proj``) reads the channels, its ``out_proj`` writes them (torch
        ties the inner width and both to ``embed_dim``), and ``[0]`` of its output carries them."""
        if node in state.producers:
            return
        name = str(node.target)
        module = self._module(node)
        assert isinstance(module, nn.MultiheadAttention)
        out = f"{name}.out_proj"
        state.producers.append(node)
        state.names[node] = out
        if self.calls.get(name, 0) > 1:
            raise _Refusal(f"{name} is called {self.calls[name]} times (shared weights)")
        packed = module._qkv_same_embed_dim
        self._check_resizable(name, "in_proj_weight" if packed else "q_proj_weight")
        self._check_resizable(out)
        readers = [_arg(node, i, key) for i, key in enumerate(("query", "key", "value"))]
        reads = readers if packed else readers[:1]
        if not all(isinstance(t, fx.Node) for t in reads):
            raise _Refusal(f"{name} takes a query that is not a tensor of the graph")
        outputs = [u for u in node.users if u.args[1:2] == (0,)]
        others = [u for u in node.users if u not in outputs and u.args[1:2] != (1,)]
        if len(outputs) != 1 or others:
            raise _Refusal(f"{name}'s output is read other than as attention(...)[0] and [1]")
        where = Layout(len(_shape(outputs[0])) - 1)
        if not state.channels:
            state.channels = module.embed_dim
        elif module.embed_dim != state.channels:
            raise _Refusal(f"{name} writes {module.embed_dim} channels into a group of {state.channels}")
        state.multiple = math.lcm(state.multiple, module.num_heads)
        state.attention.append(name)
        state.layouts[outputs[0]] = where
        state.roots[node] = outputs[0]
        state.folded[node] = []
        state.queue.append((outputs[0], where))
        for tensor in dict.fromkeys(reads):
            assert isinstance(tensor, fx.Node)
            self._join(tensor, where, state)
            state.seen.add((tensor, node, where))
            state.consumers.append(ConsumerSlice(name, 0, 1, tensor.name))

    def _heads(self, node: fx.Node, state: _Growing) -> None:
        """``F.scaled_dot_product_attention(q, k, v)`` on ``(..., heads, length, head_dim)``: head h
        of q, k and v is one channel (its rows of the three projections; ``h`` of the output)."""
        name = label(node, None)
        q, k, v = (_arg(node, i, key) for i, key in enumerate(("query", "key", "value")))
        if not all(isinstance(t, fx.Node) for t in (q, k, v)):
            raise _Refusal(f"{name} takes a query, key or value that is not a tensor of the graph")
        assert isinstance(q, fx.Node) and isinstance(k, fx.Node) and isinstance(v, fx.Node)
        shapes = [_shape(t) for t in (q, k, v)]
        ndim = len(shapes[0])
        if ndim < 3 or any(len(shape) != ndim or shape[-3] != shapes[0][-3] for shape in shapes):
            raise _Refusal(f"{name} reads key/value heads of another count (grouped-query attention)")
        mask = _arg(node, 3, "attn_mask")
        if isinstance(mask, fx.Node) and mask in state.layouts:
            raise _Refusal(f"channels reach {name} as its mask")
        where = Layout(ndim - 3)
        if not state.channels:
            state.channels = shapes[0][-3]
        elif state.channels != shapes[0][-3]:
            raise _Refusal(f"{name} has {shapes[0][-3]} heads, not {state.channels}")
        for tensor in (q, k, v):
            self._join(tensor, where, state)
            state.seen.add((tensor, node, where))
        step = Step(node.name, "attention", (q.name, k.name, v.name), label=name)
        self._claim(node, where, state, step)

    # -- concatenation along another axis, parameters on the way -----------------------------------

    def _cat(self, node: fx.Node, where: Layout, state: _Growing) -> None:
        """``torch.cat`` along an axis other than the channels' (a class token before the patch
        tokens): every operand carries the same channels; group tensors join, parameters (the
        token itself) lose the same entries."""
        name = label(node, None)
        tensors = _arg(node, 0, "tensors")
        ndim = len(_shape(node))
        dim = _arg(node, 1, "dim", 0)
        assert isinstance(tensors, (list, tuple)) and isinstance(dim, int)
        if dim % ndim == where.dim:
            raise _Refusal(f"the channels come from {name}, which cannot lose channels")
        inside = []
        for item in tensors:
            assert isinstance(item, fx.Node)
            if not self._slice_parameter(item, where, ndim, _shape(node)[where.dim], state, name):
                self._join(item, where, state)
                state.seen.add((item, node, where))
                inside.append(item.name)
        if not inside:
            raise _Refusal(f"the channels come from {name} of parameters alone")
        # Exact only if every part moves alike: a learned token does not scale with the others.
        kind: StepKind = "pass" if len(inside) == len(tensors) else "nonhomogeneous"
        self._claim(node, where, state, Step(node.name, kind, tuple(inside), label=name))

    def _parameter_chain(self, node: fx.Node) -> list[fx.Node] | None:
        """``node`` back to the parameter or buffer it reads (``param``, ``param.expand(...)``,
        ``param[:n]``), or None when it is computed from anything else."""
        chain = [node]
        while node.op != "get_attr":
            op = self._op(node)
            source = node.args[0] if node.args else None
            if (
                op is None
                or op.effect not in ("expand", "index", "pass")
                or not isinstance(source, fx.Node)
            ):
                return None
            node = source
            chain.append(node)
        return chain if isinstance(self._attribute(str(node.target)), torch.Tensor) else None

    def _attribute(self, target: str) -> object:
        owner, _, leaf = target.rpartition(".")
        try:
            return getattr(self.gm.get_submodule(owner), leaf, None)
        except AttributeError:
            return None

    def _slice_parameter(
        self, node: fx.Node, where: Layout, ndim: int, size: int, state: _Growing, name: str
    ) -> bool:
        """If ``node`` reads a parameter or buffer spanning the channel axis (of ``size`` entries,
        at ``where`` in a tensor of rank ``ndim``), record its entries as the group's and say so."""
        chain = self._parameter_chain(node)
        if chain is None:
            return False
        axis = where.dim - (ndim - len(_shape(node)))
        for step, source in zip(chain, chain[1:], strict=False):
            op = self._op(step)
            assert op is not None
            if op.effect == "expand":
                axis -= len(_shape(step)) - len(_shape(source))
            elif op.effect == "index":
                found = lay.unindexed(Layout(axis), len(_shape(source)), step.args[1])
                axis = -1 if found is None else found.dim
            if axis < 0:
                raise _Refusal(f"{name} reads {chain[-1].target} across the channel axis")
        target = str(chain[-1].target)
        value = self._attribute(target)
        assert isinstance(value, torch.Tensor)
        if value.shape[axis] != size or where.block != 1:
            raise _Refusal(f"{name} combines the channels with {target}, not one entry per channel")
        self._cut_with_group(target, value, axis, where, state)
        return True

    def _cut_with_group(
        self, target: str, value: torch.Tensor, axis: int, where: Layout, state: _Growing
    ) -> None:
        """Record that the tensor ``target`` loses entries along ``axis`` with the group's channels;
        refused when another module shares it or the graph reads it twice, since cutting it would
        change what the other reader computes."""
        owners = self.owners.get(id(value), [])
        if len(owners) > 1:
            raise _Refusal(f"{target} is shared with {owners[1]} (tied weights)")
        if sum(1 for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target) > 1:
            raise _Refusal(f"{target} is read more than once by the graph")
        owner, _, leaf = target.rpartition(".")
        state.params.append(ParamSlice(owner, leaf, axis, where.offset))

    def _consumer(
        self,
        tensor: fx.Node,
        user: fx.Node,
        module: nn.Module | None,
        where: Layout,
        state: _Growing,
    ) -> None:
        name = label(user, module)
        if not user.args or user.args[0] is not tensor:
            raise _Refusal(f"channels reach {name} other than as its input")
        self._check_resizable(str(user.target))
        ndim = len(_shape(tensor))
        if isinstance(module, nn.Linear):
            if where.dim != ndim - 1:
                raise _Refusal(f"{name} reads a different axis than the channels")
        else:
            assert isinstance(module, (nn.Conv1d, nn.Conv2d))
            if module.groups != 1:
                if where != Layout(1) or _shape(tensor)[1] != state.channels:
                    raise _Refusal(f"{name} (groups={module.groups}) reads more than these channels")
                state.blocks = math.lcm(state.blocks, module.groups)
            if where.dim != 1 or where.block != 1 or ndim != spatial_dims(module) + 2:
                raise _Refusal(f"{name} reads the channels with a different layout")
        state.consumers.append(ConsumerSlice(str(user.target), where.offset, where.block, tensor.name))

    def _per_channel_module(
        self,
        tensor: fx.Node,
        user: fx.Node,
        module: nn.Module | None,
        where: Layout,
        state: _Growing,
    ) -> None:
        name = label(user, module)
        ndim = len(_shape(tensor))
        if where.dim != 1 or where.block != 1:
            raise _Refusal(f"{name} normalises an axis other than the channels")
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            self._usable_norm(user, where)
            kind = "batchnorm"
        else:
            assert isinstance(module, (nn.Conv1d, nn.Conv2d))
            self._check_resizable(str(user.target))
            if ndim != spatial_dims(module) + 2:
                raise _Refusal(f"{name} reads the channels with a different layout")
            if module.padding_mode != "zeros":
                raise _Refusal(f"padding_mode={module.padding_mode!r} is not supported")
            kind = "depthwise"
        state.params.append(ParamSlice(str(user.target), "*", 0, where.offset))
        params = (kind, str(user.target))
        step = Step(user.name, "affine", (tensor.name,), label=name, params=params, offset=where.offset)
        self._claim(user, where, state, step)

    def _elementwise(
        self,
        tensor: fx.Node,
        user: fx.Node,
        op: Op,
        module: nn.Module | None,
        where: Layout,
        state: _Growing,
    ) -> None:
        name = label(user, module)
        if op.effect == "dropout":
            training = (
                module.training
                if module is not None
                else _arg(user, op.training_arg, "training", True) is not False
            )
            if training and module is None:
                raise _Refusal(f"{name} is active (training=True) in the traced graph")
        if op.effect == "prelu":
            assert isinstance(module, nn.PReLU)
            if module.num_parameters > 1:
                axis = lay.param_axis(where, len(_shape(tensor)), (module.num_parameters,))
                if where.dim != 1 or axis is None:
                    raise _Refusal(f"{name} has slopes along another axis than the channels")
                self._check_resizable(str(user.target))
                state.params.append(ParamSlice(str(user.target), "weight", 0, where.offset))
            step = Step(user.name, "homogeneous", (tensor.name,), label=name)
        elif op.effect == "nonhomogeneous":
            step = Step(user.name, "nonhomogeneous", (tensor.name,), label=name)
        elif op.effect == "homogeneous":
            step = Step(user.name, "homogeneous", (tensor.name,), op.degree, name)
        else:
            step = Step(user.name, "pass", (tensor.name,), label=name)
        self._claim(user, where, state, step)

    def _relayout(
        self,
        tensor: fx.Node,
        user: fx.Node,
        op: Op,
        module: nn.Module | None,
        where: Layout,
        ndim: int,
        state: _Growing,
    ) -> None:
        name = label(user, module)
        effect = op.effect
        new: Layout | None
        if effect == "layout":
            new = lay.reshaped(_shape(tensor), _shape(user), where)
            if new is None:
                raise _Refusal(
                    f"{name} reshapes {_shape(tensor)} -> {_shape(user)}, mixing the channel axis"
                )
            spelled = str(getattr(user.target, "__name__", user.target)).split(".")[0]
            if module is None and spelled in ("view", "reshape"):
                state.literals.append(LiteralFix(user.name, "shape", new.dim, new.block))
        elif effect == "permute":
            new = lay.permuted(where, _permutation(user))
        elif effect == "expand":
            source, target = _shape(tensor), _shape(user)
            moved = len(target) - len(source)
            if target[where.dim + moved] != source[where.dim]:
                raise _Refusal(f"{name} repeats the channels")
            new = Layout(where.dim + moved, where.offset, where.block)
        elif effect == "index":
            new = lay.indexed(where, ndim, user.args[1])
            if new is None:
                raise _Refusal(f"{name} selects some of the channels")
        elif effect == "transpose":
            new = lay.transposed(where, int(user.args[1]), int(user.args[2]), ndim)  # type: ignore[arg-type]
        elif effect == "reduce":
            dims = _arg(user, 1, "dim")
            keepdim = _arg(user, 2, "keepdim", False)
            if isinstance(dims, int):
                dims = [dims]
            if not isinstance(dims, (tuple, list)) or not dims or not isinstance(keepdim, bool):
                raise _Refusal(f"{name} reduces over every axis, the channels' included")
            new = lay.reduced(where, ndim, dims, keepdim)
            if new is None:
                raise _Refusal(f"{name} reduces over the channel axis")
        elif effect == "pad":
            if module is not None:
                pad, value = list(module.padding), float(getattr(module, "value", 0.0))  # type: ignore[arg-type]
            else:
                pad = list(_arg(user, 1, "pad"))
                if _arg(user, 2, "mode", "constant") != "constant":
                    raise _Refusal(f"{name} pads by reflection or replication")
                value = float(_arg(user, 3, "value", 0.0) or 0.0)
            if not lay.padded(where, ndim, pad):
                raise _Refusal(f"{name} pads the channel axis")
            kind: StepKind = "pass" if value == 0 else "nonhomogeneous"
            self._claim(user, where, state, Step(user.name, kind, (tensor.name,), label=name))
            return
        else:  # cat
            tensors = _arg(user, 0, "tensors")
            dim = _arg(user, 1, "dim", 0)
            assert isinstance(tensors, (list, tuple)) and isinstance(dim, int)
            if sum(1 for t in tensors if t is tensor) > 1:
                raise _Refusal(f"{name} concatenates the same channels more than once")
            ahead = 0
            for item in tensors:
                if item is tensor:
                    break
                assert isinstance(item, fx.Node)
                ahead += _shape(item)[dim % ndim]
            if dim % ndim != where.dim:
                self._cat(user, where, state)
                return
            new = lay.concatenated(where, dim, ndim, ahead)
        if new is None:
            raise _Refusal(f"{name} moves the channel axis in a way merging cannot follow")
        self._claim(user, new, state, Step(user.name, "pass", (tensor.name,), label=name))

    def _forward_binary(self, user: fx.Node, op: Op, state: _Growing) -> None:
        """An add, sub or mul reading a group tensor: a residual join, a gate, or a scale."""
        name = label(user, None)
        operands = [a for a in user.args[:2]]
        if len(operands) < 2:
            raise _Refusal(f"{name} has one operand")
        inside = [a for a in operands if isinstance(a, fx.Node) and a in state.layouts]
        where = state.layouts[inside[0]]
        ndim = len(_shape(user))
        others = [a for a in operands if not (isinstance(a, fx.Node) and a in state.layouts)]
        if op.effect == "mul" and operands[0] is operands[1]:
            step = Step(user.name, "homogeneous", (inside[0].name,), 2.0, name)
            self._claim(user, where, state, step)
            return
        if len(_shape(user)) != len(_shape(inside[0])) or _shape(user) != _shape(inside[0]):
            if _shape(user)[where.dim] != _shape(inside[0])[where.dim]:
                raise _Refusal(f"{name} broadcasts the channels against another tensor")
        # A constant, or a tensor constant across the channels (a mask, a per-sample weight, a
        # scalar parameter such as NFNet's ``skipinit_gain``): as a factor it commutes with a
        # per-channel scale; as a term it is a per-channel op like any other elementwise function
        # (exact for scale 1 only).
        same: StepKind = "pass" if op.effect == "mul" else "nonhomogeneous"
        for other in others:
            if isinstance(other, (int, float)):
                self._claim(user, where, state, Step(user.name, same, (inside[0].name,), label=name))
                return
            assert isinstance(other, fx.Node)
            extent = _shape(other)
            offset = ndim - len(extent)
            at = where.dim - offset
            if at < 0 or extent[at] == 1:
                self._claim(user, where, state, Step(user.name, same, (inside[0].name,), label=name))
                return
            if self._parameter_chain(other) is not None:
                self._parameter(user, op, other, inside[0], where, ndim, state)
                return
            other_where = Layout(at, where.offset, where.block) if at >= 0 else None
            if other_where is None or extent[at] != _shape(inside[0])[where.dim]:
                raise _Refusal(f"{name} combines the channels with a tensor of another shape")
            state.layouts[user] = where
            self._join(other, other_where, state)
        inputs = tuple(a.name for a in operands if isinstance(a, fx.Node))
        kind: StepKind = "mul" if op.effect == "mul" else "add"
        degree = -1.0 if op.effect == "sub" else 1.0
        state.layouts.pop(user, None)
        self._claim(user, where, state, Step(user.name, kind, inputs, degree, name))

    def _parameter(
        self,
        user: fx.Node,
        op: Op,
        param: fx.Node,
        tensor: fx.Node,
        where: Layout,
        ndim: int,
        state: _Growing,
    ) -> None:
        """``x * gamma`` (LayerScale) or ``x + beta`` with a per-channel parameter read by get_attr."""
        name = label(user, None)
        target = str(param.target)
        axis = lay.param_axis(where, ndim, tuple(_shape(param)))
        if param.op != "get_attr" or axis is None:
            # A parameter varying along other axes too (a positional embedding): its channel
            # entries are sliced, and the step is per channel but not a positive scale.
            size = _shape(user)[where.dim]
            self._slice_parameter(param, where, ndim, size, state, name)
            step = Step(user.name, "nonhomogeneous", (tensor.name,), label=name)
            self._claim(user, where, state, step)
            return
        value = self.gm.get_parameter(target) if _is_param(self.gm, target) else None
        if value is None:
            raise _Refusal(f"{name} reads {target}, which is not a parameter")
        axis = lay.param_axis(where, ndim, tuple(value.shape))
        if axis is None or value.shape[axis] != _shape(tensor)[where.dim]:
            raise _Refusal(f"{name} combines the channels with {target}, not one value per channel")
        self._cut_with_group(target, value, axis, where, state)
        kind = "scale" if op.effect == "mul" else "shift"
        params = (kind, target)
        step = Step(user.name, "affine", (tensor.name,), label=name, params=params, offset=where.offset)
        self._claim(user, where, state, step)

    def _normalised(
        self,
        tensor: fx.Node,
        user: fx.Node,
        op: Op,
        module: nn.Module | None,
        where: Layout,
        ndim: int,
        state: _Growing,
    ) -> None:
        name = label(user, module)
        if op.effect == "softmax":
            dim = getattr(module, "dim", None) if module is not None else _arg(user, 1, "dim")
            if dim is None or int(dim) % ndim == where.dim:
                raise _Refusal(
                    f"{name} mixes the channels"
                    if module is not None
                    else f"channels reach {name}, which merging cannot pass through"
                )
            self._claim(
                user, where, state, Step(user.name, "nonhomogeneous", (tensor.name,), label=name)
            )
            return
        if op.effect == "groupnorm":
            raise _Refusal(f"{name} ties channels to its groups")
        shape = (
            tuple(module.normalized_shape)
            if isinstance(module, nn.LayerNorm)
            else tuple(_arg(user, 1, "normalized_shape"))
        )
        if len(shape) != 1 or where.dim != ndim - 1 or where.block != 1:
            raise _Refusal(f"{name} normalises the channels together with other axes")
        if isinstance(module, nn.LayerNorm):
            self._check_resizable(str(user.target))
            state.params.append(ParamSlice(str(user.target), "*", 0, where.offset))
        else:
            state.literals.append(LiteralFix(user.name, 1, 0, 1))
            for index, key in ((2, "weight"), (3, "bias")):
                param = _arg(user, index, key)
                if isinstance(param, fx.Node):
                    if param.op != "get_attr":
                        raise _Refusal(f"{name} takes a computed {key}")
                    owner, _, leaf = str(param.target).rpartition(".")
                    state.params.append(ParamSlice(owner, leaf, 0, where.offset))
        self._claim(user, where, state, Step(user.name, "mixing", (tensor.name,), label=name))

    # -- the frozen value ----------------------------------------------------------------------

    def _freeze(self, state: _Growing) -> Group:
        producers = sorted(state.producers, key=self.order.__getitem__)
        steps = sorted(state.steps.values(), key=lambda s: self.order[self._node(s.node)])
        root_of = {state.roots[p].name: i for i, p in enumerate(producers)}
        parent = list(range(len(producers)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        # Producers share a root (one scale per pair, rows side by side) where their outputs meet
        # at an add *unchanged*: a step that changes a pair's scale on the way (a BatchNorm on one
        # branch, a square) would make one shared scale wrong for one of them. Such producers keep
        # their own roots, and merging checks at the add that the branches agree on each pair.
        sets: dict[str, set[int]] = {name: {i} for name, i in root_of.items()}
        for step in steps:
            if step.node in root_of:
                continue
            members = [sets.get(i, set()) for i in step.inputs]
            if step.kind == "add":
                joined = [m for m in members if m]
                for other in joined[1:]:
                    parent[find(min(other))] = find(min(joined[0]))
            sets[step.node] = set() if _rescales(step) else set().union(*members)
        root_ids = {find(i) for i in range(len(producers))}
        renumber = {r: k for k, r in enumerate(sorted(root_ids))}
        roots = tuple(renumber[find(i)] for i in range(len(producers)))

        mixing = [s.label for s in steps if s.kind == "mixing"]
        feeds_mul = {i for s in steps if s.kind == "mul" for i in s.inputs}
        root_names = set(root_of)
        through = [
            s.label
            for s in steps
            if s.kind == "nonhomogeneous" and not (s.node in feeds_mul and set(s.inputs) <= root_names)
        ]
        if mixing:
            mode, why = (
                "prune-only",
                f"channels enter {mixing[0]}, which normalises across them: prune only "
                "(its weight and bias keep the kept channels' entries)",
            )
        elif through:
            mode, why = "least-squares", NON_HOMOGENEOUS.format(through[0])
        else:
            mode, why = "exact", ""
        pattern = (
            "heads"
            if any(s.kind == "attention" for s in steps)
            else "gated"
            if any(s.kind == "mul" for s in steps)
            else ("residual" if any(s.kind == "add" for s in steps) else "chain")
        )
        names = [state.names.get(p, str(p.target)) for p in producers]
        first = self.modules[str(producers[0].target)]
        root_steps = tuple(
            Step(state.roots[p].name, "root", (), label=n) for p, n in zip(producers, names)
        )
        folds = [state.folded[p] for p in producers]
        blocks = tuple(state.row_blocks.get(p, 1) for p in producers)
        return Group(
            producer=names[0],
            norm=folds[0][0] if len(producers) == 1 and len(folds[0]) == 1 else None,
            kind="linear" if isinstance(first, (nn.Linear, nn.MultiheadAttention)) else "conv",
            pattern=pattern,  # type: ignore[arg-type]
            channels=state.channels,
            producers=tuple(names),
            roots=roots,
            folded=tuple(tuple(state.folded[p]) for p in producers),
            steps=root_steps + tuple(s for s in steps if s.node not in root_of),
            consumers=tuple(state.consumers),
            params=tuple(dict.fromkeys(state.params)),
            literals=tuple(dict.fromkeys(state.literals)),
            mode=mode,  # type: ignore[arg-type]
            why=why,
            blocks=state.blocks,
            approximate_through=tuple(dict.fromkeys(through)),
            attention=tuple(state.attention),
            multiple=state.multiple,
            row_blocks=blocks if any(b != 1 for b in blocks) else (),
        )

    def _node(self, name: str) -> fx.Node:
        if not hasattr(self, "_by_name"):
            self._by_name = {n.name: n for n in self.gm.graph.nodes}
        return self._by_name[name]


def _rescales(step: Step) -> bool:
    """Whether ``step`` can change the ratio of two channels' scales (``x_i = s x_j`` in, another
    ``s`` out): per-channel factors, powers other than one, products, attention."""
    if step.kind == "affine":
        return step.params is None or step.params[0] != "shift"
    if step.kind == "homogeneous":
        return step.degree != 1
    return step.kind in ("mul", "attention")


def _is_view(node: fx.Node, op: Op | None) -> bool:
    """Whether ``node`` is a view/reshape taking a target shape (not a flatten or squeeze)."""
    if op is None or op.effect != "layout" or node.op == "call_module":
        return False
    return str(getattr(node.target, "__name__", node.target)).split(".")[0] in ("view", "reshape")


def _target_sizes(node: fx.Node) -> list[Any]:
    """The target shape of a view/reshape, element by element (one node: a whole computed shape)."""
    for key in ("shape", "size"):
        if key in node.kwargs:
            value = node.kwargs[key]
            return list(value) if isinstance(value, (tuple, list)) else [value]
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return rest


def _shape_reads(node: fx.Node) -> set[tuple[fx.Node, int | None]]:
    """The tensor axes a size computed at run time is read from, as ``(tensor, axis)`` (axis
    ``None``: the whole shape). Follows the arithmetic back to ``x.shape``, ``x.size(d)``,
    ``x.shape[d]``, ``x.shape[:-1]``, never into a tensor's values."""
    reads: set[tuple[fx.Node, int | None]] = set()
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        meta = current.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            continue  # a tensor: its values, not a size
        whole = _whole_shape(current)
        if whole is not None:
            reads.add((whole, None))
            continue
        source = current.args[0] if current.args else None
        if current.target is operator.getitem and isinstance(source, fx.Node):
            tensor = _whole_shape(source)
            if tensor is not None:
                reads.update((tensor, axis) for axis in _axes(tensor, current.args[1]))
                continue
        op = lookup(current, None) if current.op != "call_module" else None
        if op is not None and op.effect == "metadata":
            dim = _arg(current, 1, "dim")
            if isinstance(source, fx.Node) and current.target in ("size", torch.ops.aten.sym_size.int):
                reads.update((source, axis) for axis in _axes(source, dim))
            continue  # a dtype, a device, a rank: no size
        stack.extend(current.all_input_nodes)
    return reads


def _whole_shape(node: fx.Node) -> fx.Node | None:
    """The tensor whose whole shape ``node`` is (``x.shape``, ``x.size()``), or None."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return source
    if node.op == "call_method" and node.target == "size" and _arg(node, 1, "dim") is None:
        return source
    return None


def _axes(tensor: fx.Node, index: Any) -> list[int | None]:
    """The axes of ``tensor`` that ``shape[index]`` reads (``[None]``: unknown, all of them)."""
    meta = tensor.meta.get("tensor_meta")
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    if isinstance(index, int):
        return [index % rank if rank else (index if index >= 0 else None)]
    if isinstance(index, slice) and rank is not None:
        return list(range(rank)[index])
    return [None]


def _permutation(node: fx.Node) -> list[int]:
    """The axis order of ``x.permute(0, 2, 1)``, ``x.permute((0, 2, 1))`` or
    ``torch.permute(x, (0, 2, 1))``."""
    order: Any = node.args[1:] if node.op == "call_method" else node.args[1]
    if node.op == "call_method" and len(order) == 1 and isinstance(order[0], (tuple, list)):
        order = order[0]
    return [int(axis) for axis in order]


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


def find_groups(graph_module: fx.GraphModule) -> tuple[list[Group], list[Skipped]]:
    """Every producer of ``graph_module`` (which must carry ShapeProp metadata) in a group or skipped."""
    return GroupFinder(graph_module).find()
