"""Sites: find where neurons can be merged, and say why everywhere else they cannot.

A *site* is a producer layer (Linear, Conv1d, Conv2d) whose output channels can be removed, each removed
channel folded into a kept one, with the effect absorbed exactly by the layers that read them. Starting
at every producer we walk forward through the graph:

    producer -> [BatchNorm] -> any DAG of ops that commute with a positive per-channel scale
             -> consumers (Linear / Conv reading those channels)

The ops in the middle are positively homogeneous activations (ReLU, LeakyReLU, single-slope PReLU),
pooling, dropout (identity in eval mode), flatten/view/reshape and concatenation along the channel
axis. While walking we track where the producer's channels sit in each tensor: their axis, the column
offset of the first one (concatenation shifts it) and how many columns each channel owns (flattening a
conv map gives every channel a block of H*W columns). Any other use of the channels (a residual add, a
non-homogeneous activation, the model output, a grouped conv) refuses the site, with the reason. So
does a producer, BatchNorm or consumer whose tensors are not its own plain parameters (tied to another
module, read directly by the graph, or computed by a parametrization or weight_norm hook): resizing it
would untie them, change what the other use reads, or be undone at the next forward.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

PRODUCER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ConsumerSlice:
    """Where one consumer reads a site's channels: input columns ``offset + c*block ...``."""

    module: str
    offset: int
    block: int


@dataclass(frozen=True)
class ReshapeFix:
    """A view/reshape on a site's path whose literal size along ``dim`` changes with the site."""

    node: str
    dim: int
    block: int


@dataclass(frozen=True)
class Site:
    """A producer whose channels can be merged, and everything the merge must update."""

    producer: str
    kind: Literal["linear", "conv"]
    channels: int
    norm: str | None
    path: tuple[str, ...]
    consumers: tuple[ConsumerSlice, ...]
    reshapes: tuple[ReshapeFix, ...]
    #: Non-homogeneous activations the channels pass through (``approximate=True`` only): merging
    #: here treats them as if ``f(s*z) == s*f(z)``, so the result is an approximation.
    approximate_through: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A producer left untouched, and why."""

    producer: str
    reason: str


@dataclass(frozen=True)
class _Layout:
    """Where a site's channels live in a tensor: axis, first column, columns per channel."""

    dim: int
    offset: int
    block: int


class _Refusal(Exception):
    """Internal: the walk met something the merge cannot pass through."""


# ---------------------------------------------------------------------------------------------
# Op classification: what an fx node does to the channels flowing through it.
# ---------------------------------------------------------------------------------------------

_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity)
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
# Elementwise activations that are not positively homogeneous: refused, or with ``approximate=True``
# passed through as if ``f(s*z) == s*f(z)`` (the error is then measured, see ``api.compress``).
_NON_HOMOGENEOUS_MODULES = (
    nn.ReLU6,
    nn.Hardtanh,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
)
# Not elementwise: each output mixes every channel, so no scale can pass through, approximately or not.
_CHANNEL_MIXING_MODULES = (nn.Softmax, nn.LogSoftmax)

# Modules without weights: calling one in several places shares nothing that a merge would resize.
_STATELESS_MODULES = (
    *_HOMOGENEOUS_MODULES,
    *_IDENTITY_MODULES,
    *_POOL_MODULES,
    *_NON_HOMOGENEOUS_MODULES,
    *_CHANNEL_MIXING_MODULES,
    nn.Flatten,
)

_HOMOGENEOUS_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.leaky_relu,
}
_NON_HOMOGENEOUS_FUNCTIONS: set[Callable[..., Any]] = {
    F.gelu,
    F.silu,
    F.mish,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.relu6,
    F.tanh,
    F.sigmoid,
    torch.tanh,
    torch.sigmoid,
}
_IDENTITY_FUNCTIONS: set[Callable[..., Any]] = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}
_POOL_FUNCTIONS: set[Callable[..., Any]] = {
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    torch.max_pool1d,
    torch.max_pool2d,
    torch.avg_pool1d,
}
_RESHAPE_FUNCTIONS: set[Callable[..., Any]] = {torch.flatten, torch.reshape}
# Reshapes whose target sizes are literals in the graph, rewritten when the channel count changes.
_PATCHABLE_RESHAPES: set[Callable[..., Any]] = {torch.reshape}
_CAT_FUNCTIONS: set[Callable[..., Any]] = {torch.cat, torch.concat, torch.concatenate}
_ADD_FUNCTIONS: set[Callable[..., Any]] = {operator.add, operator.iadd, torch.add, operator.sub}
_METADATA_FUNCTIONS: set[Callable[..., Any]] = set()
# Reductions over axes other than the channels' (global pooling written as ``x.mean((2, 3))``):
# ``max``/``mean``/``sum`` of ``s * x`` is ``s`` times that of ``x`` for every ``s > 0``.
_REDUCE_FUNCTIONS: set[Callable[..., Any]] = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}

# The same ops as torch.export writes them (ATen overloads), for graphs captured by ``exported``.
_aten = torch.ops.aten
_HOMOGENEOUS_FUNCTIONS |= {
    _aten.relu.default,
    _aten.relu_.default,
    _aten.leaky_relu.default,
    _aten.leaky_relu_.default,
}
_NON_HOMOGENEOUS_FUNCTIONS |= {
    _aten.gelu.default,
    _aten.silu.default,
    _aten.mish.default,
    _aten.elu.default,
    _aten.selu.default,
    _aten.celu.default,
    _aten.softplus.default,
    _aten.hardswish.default,
    _aten.hardsigmoid.default,
    _aten.hardtanh.default,
    _aten.tanh.default,
    _aten.sigmoid.default,
}
_IDENTITY_FUNCTIONS |= {_aten.dropout.default}
_POOL_FUNCTIONS |= {
    _aten.max_pool1d.default,
    _aten.max_pool2d.default,
    _aten.avg_pool1d.default,
    _aten.avg_pool2d.default,
    _aten.adaptive_avg_pool1d.default,
    _aten.adaptive_avg_pool2d.default,
}
_RESHAPE_FUNCTIONS |= {_aten.flatten.using_ints, _aten.view.default, _aten.reshape.default}
_PATCHABLE_RESHAPES |= {_aten.view.default, _aten.reshape.default}
_CAT_FUNCTIONS |= {_aten.cat.default}
_ADD_FUNCTIONS |= {_aten.add.Tensor, _aten.add_.Tensor, _aten.sub.Tensor, _aten.sub_.Tensor}
_IDENTITY_FUNCTIONS |= {_aten.clone.default, _aten.detach.default, _aten.alias.default}
_METADATA_FUNCTIONS |= {_aten.sym_size.int}
_REDUCE_FUNCTIONS |= {_aten.mean.dim, _aten.sum.dim_IntList, _aten.amax.default}

_HOMOGENEOUS_METHODS = {"relu", "relu_"}
_NON_HOMOGENEOUS_METHODS = {"tanh", "tanh_", "sigmoid", "sigmoid_"}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_SHAPE_METHODS = {"size", "dim"}
# ``x.shape`` and friends trace to ``getattr(x, "shape")``: metadata, like ``x.size()``, not a use of
# the channels (``x.view(x.shape[0], -1)`` is computed at run time and follows any new width).
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}


def _spatial_dims(kind: object) -> int:
    """How many spatial axes a conv or pooling layer (or function) works on: 1 for ``*1d``, else 2."""
    name = type(kind).__name__ if isinstance(kind, nn.Module) else getattr(kind, "__name__", "")
    return 1 if name.split(".")[0].endswith("1d") else 2  # ATen names end in ".default"


def _name_of(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return f"{node.target} ({type(module).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise _Refusal(f"no tensor shape recorded for {node.name}")
    return tuple(meta.shape)


def _reads_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only a tensor's shape, dtype or device (``x.size(0)``, ``x.shape``),
    which follows any new width at run time rather than using the channels' values."""
    if node.op == "call_method":
        return str(node.target) in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
        return node.target in _METADATA_FUNCTIONS
    return False


def _dropout_is_identity(node: fx.Node) -> bool:
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return training is False


class SiteFinder:
    """Walks a shape-annotated GraphModule and classifies every producer as a Site or Skipped."""

    def __init__(self, graph_module: fx.GraphModule, approximate: bool = False) -> None:
        self.gm = graph_module
        self.approximate = approximate
        self._approximated: list[str] = []  # filled while walking one site
        self.modules = dict(graph_module.named_modules())
        self.calls: dict[str, int] = {}
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        # Tensors held by more than one module (tied weights) or read by the graph itself (get_attr):
        # resizing a layer that holds one would silently untie it, or change what the other use reads.
        self.owners: dict[int, list[str]] = {}
        for module_name, module in self.modules.items():
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                self.owners.setdefault(id(tensor), []).append(module_name)
        self.read_directly = {
            str(node.target) for node in graph_module.graph.nodes if node.op == "get_attr"
        }

    def find(self) -> tuple[list[Site], list[Skipped]]:
        """Every producer call in graph order, each either a Site or a Skipped with its reason."""
        sites: list[Site] = []
        skipped: list[Skipped] = []
        for node in self.gm.graph.nodes:
            module = self._module(node)
            if not isinstance(module, PRODUCER_TYPES):
                continue
            try:
                sites.append(self._site(node, module))
            except _Refusal as refusal:
                skipped.append(Skipped(str(node.target), str(refusal)))
        return sites, skipped

    # -- the walk ------------------------------------------------------------------------------

    def _module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return self.modules.get(str(node.target))

    def _check_resizable(self, name: str) -> None:
        """Refuse when layer ``name``'s tensors are not its own plain parameters and buffers: tied to
        another module, read directly by the graph, or computed (parametrizations, weight_norm hooks).
        """
        module = self.modules[name]
        if parametrize.is_parametrized(module) or "weight" not in module._parameters:
            raise _Refusal(f"{name}.weight is computed (a parametrization or weight_norm hook)")
        for key, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            others = [owner for owner in self.owners.get(id(tensor), []) if owner != name]
            if others:
                raise _Refusal(f"{name}.{key} is shared with {others[0]} (tied weights)")
            if f"{name}.{key}" in self.read_directly:
                raise _Refusal(f"{name}.{key} is also read directly by the graph")

    def _site(self, node: fx.Node, producer: nn.Module) -> Site:
        name = str(node.target)
        if self.calls[name] > 1:
            raise _Refusal(f"module is called {self.calls[name]} times (shared weights)")
        self._check_resizable(name)
        if isinstance(producer, (nn.Conv1d, nn.Conv2d)) and producer.groups != 1:
            raise _Refusal(f"grouped convolution (groups={producer.groups}) ties channels to groups")
        if isinstance(producer, (nn.Conv1d, nn.Conv2d)) and producer.padding_mode != "zeros":
            raise _Refusal(f"padding_mode={producer.padding_mode!r} is not supported")
        shape = _shape(node)
        kind: Literal["linear", "conv"] = "linear" if isinstance(producer, nn.Linear) else "conv"
        if kind == "conv" and len(shape) != _spatial_dims(producer) + 2:
            raise _Refusal(f"unbatched input of shape {shape}: the channels are not on axis 1")
        layout = _Layout(dim=len(shape) - 1 if kind == "linear" else 1, offset=0, block=1)
        channels = shape[layout.dim]

        start, norm = node, None
        users = [user for user in node.users if not _reads_metadata(user)]
        if len(users) == 1 and isinstance(self._module(users[0]), NORM_TYPES):
            bn_node = users[0]
            bn = self._module(bn_node)
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            if layout.dim != 1:
                raise _Refusal("BatchNorm normalises an axis other than the producer's channels")
            if not bn.track_running_stats or bn.running_mean is None:
                raise _Refusal(f"{bn_node.target} has no running statistics to fold")
            if self.calls[str(bn_node.target)] > 1:
                raise _Refusal(f"{bn_node.target} is called more than once")
            self._check_resizable(str(bn_node.target))
            start, norm = bn_node, str(bn_node.target)

        path: list[str] = []
        consumers: list[ConsumerSlice] = []
        reshapes: list[ReshapeFix] = []
        self._approximated = []
        frontier: list[tuple[fx.Node, _Layout]] = [(start, layout)]
        while frontier:
            current, current_layout = frontier.pop()
            for user in current.users:
                nxt = self._step(current, current_layout, user, channels, consumers, reshapes)
                if nxt is not None:
                    path.append(user.name)
                    frontier.append((user, nxt))
        if not consumers:
            raise _Refusal("no layer consumes these channels")
        return Site(
            producer=name,
            kind=kind,
            channels=channels,
            norm=norm,
            path=tuple(dict.fromkeys(path)),
            consumers=tuple(consumers),
            reshapes=tuple(reshapes),
            approximate_through=tuple(dict.fromkeys(self._approximated)),
        )

    def _not_homogeneous(self, label: str, layout: _Layout) -> _Layout:
        """Refuse a non-homogeneous activation, or pass through it when approximating."""
        if not self.approximate:
            raise _Refusal(
                f"{label} is not positively homogeneous (f(s*x) != s*f(x)); "
                "approximate=True merges through it and measures the error"
            )
        self._approximated.append(label)
        return layout

    def _step(
        self,
        source: fx.Node,
        layout: _Layout,
        user: fx.Node,
        channels: int,
        consumers: list[ConsumerSlice],
        reshapes: list[ReshapeFix],
    ) -> _Layout | None:
        """Pass the channels through ``user``: its output layout, or None where the walk ends."""
        module = self._module(user)
        label = _name_of(user, module)
        if user.op == "output":
            raise _Refusal("channels are part of the model's output")

        if module is not None:
            if self.calls[str(user.target)] > 1 and not isinstance(module, _STATELESS_MODULES):
                raise _Refusal(f"{label} is called more than once (shared weights)")
            if isinstance(module, PRODUCER_TYPES):
                consumers.append(self._consumer(user, module, layout, channels))
                return None
            if isinstance(module, _HOMOGENEOUS_MODULES) or (
                isinstance(module, nn.PReLU) and module.num_parameters == 1
            ):
                return layout
            if isinstance(module, nn.PReLU):
                raise _Refusal(f"{label} has per-channel slopes; merging needs one slope")
            if isinstance(module, _IDENTITY_MODULES):
                return layout
            if isinstance(module, _POOL_MODULES):
                if getattr(module, "return_indices", False):
                    raise _Refusal(f"{label} returns indices")
                return self._pooled(layout, user, label, _spatial_dims(module))
            if isinstance(module, nn.Flatten):
                return self._reshaped(source, user, layout, label, reshapes, patchable=False)
            if isinstance(module, _NON_HOMOGENEOUS_MODULES):
                return self._not_homogeneous(label, layout)
            if isinstance(module, _CHANNEL_MIXING_MODULES):
                raise _Refusal(f"{label} mixes the channels")
            if isinstance(module, NORM_TYPES):
                raise _Refusal(f"{label} normalises the channels after a nonlinearity or a join")
            raise _Refusal(f"channels reach {label}, which merging cannot pass through")

        if _reads_metadata(user):
            return None

        if user.op == "call_function":
            target = user.target
            if target in _HOMOGENEOUS_FUNCTIONS:
                return layout
            if target in _NON_HOMOGENEOUS_FUNCTIONS:
                return self._not_homogeneous(label, layout)
            if target in _IDENTITY_FUNCTIONS:
                if not _dropout_is_identity(user):
                    raise _Refusal(f"{label} is active (training=True) in the traced graph")
                return layout
            if target in _POOL_FUNCTIONS:
                if user.kwargs.get("return_indices", False):
                    raise _Refusal(f"{label} returns indices")
                return self._pooled(layout, user, label, _spatial_dims(target))
            if target in _RESHAPE_FUNCTIONS:
                return self._reshaped(
                    source, user, layout, label, reshapes, patchable=target in _PATCHABLE_RESHAPES
                )
            if target in _CAT_FUNCTIONS:
                return self._concatenated(source, user, layout, label)
            if target in _REDUCE_FUNCTIONS:
                return self._reduced(source, user, layout, label)
            if target in _ADD_FUNCTIONS:
                raise _Refusal(f"channels are tied to a residual {label}")
            raise _Refusal(f"channels reach {label}, which merging cannot pass through")

        if user.op == "call_method":
            method = str(user.target)
            if method in _HOMOGENEOUS_METHODS or method in _IDENTITY_METHODS:
                return layout
            if method in _REDUCE_METHODS:
                return self._reduced(source, user, layout, f".{method}()")
            if method in _NON_HOMOGENEOUS_METHODS:
                return self._not_homogeneous(f".{method}()", layout)
            if method in _RESHAPE_METHODS:
                return self._reshaped(
                    source, user, layout, label, reshapes, patchable=method != "flatten"
                )
            if method in {"add", "add_", "sub", "sub_"}:
                raise _Refusal(f"channels are tied to a residual {method}")
            raise _Refusal(f"channels reach method .{method}(), which merging cannot pass through")

        raise _Refusal(f"channels reach {user.op} {user.target}, which merging cannot pass through")

    # -- layout rules --------------------------------------------------------------------------

    @staticmethod
    def _pooled(layout: _Layout, user: fx.Node, label: str, spatial: int) -> _Layout:
        # A 2d pool on a 3-D (N, C, L) tensor takes it as an unbatched (C, H, W) one and pools
        # across the channels: only a batched input of the pool's own rank leaves axis 1 alone.
        shape = _shape(user)
        if layout.dim != 1 or layout.block != 1 or len(shape) != spatial + 2:
            raise _Refusal(f"{label} would pool across the channel axis")
        return layout

    @staticmethod
    def _reshaped(
        source: fx.Node,
        user: fx.Node,
        layout: _Layout,
        label: str,
        reshapes: list[ReshapeFix],
        *,
        patchable: bool,
    ) -> _Layout:
        before, after = _shape(source), _shape(user)
        d = layout.dim
        if before == after:
            # No-op in shape, but a literal size in it (``x.view(-1, 120)``) still goes stale.
            if patchable:
                reshapes.append(ReshapeFix(user.name, d, layout.block))
            return layout
        trailing = math.prod(before[d + 1 :])
        if len(after) == d + 1 and after[:d] == before[:d] and after[d] == before[d] * trailing:
            new = _Layout(dim=d, offset=layout.offset * trailing, block=layout.block * trailing)
            if patchable:
                reshapes.append(ReshapeFix(user.name, d, new.block))
            return new
        raise _Refusal(f"{label} reshapes {before} -> {after}, mixing the channel axis")

    @staticmethod
    def _reduced(source: fx.Node, user: fx.Node, layout: _Layout, label: str) -> _Layout:
        """A mean/sum/max over axes that are not the channels' keeps every channel apart."""
        dims = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        keepdim = user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False)
        ndim = len(_shape(source))
        if isinstance(dims, int):
            dims = [dims]
        if not isinstance(dims, (tuple, list)) or not dims or not isinstance(keepdim, bool):
            raise _Refusal(f"{label} reduces over every axis, the channels' included")
        axes = {int(d) % ndim for d in dims}
        if layout.dim in axes:
            raise _Refusal(f"{label} reduces over the channel axis")
        dim = layout.dim if keepdim else layout.dim - sum(1 for a in axes if a < layout.dim)
        return _Layout(dim=dim, offset=layout.offset, block=layout.block)

    @staticmethod
    def _concatenated(source: fx.Node, user: fx.Node, layout: _Layout, label: str) -> _Layout:
        tensors = user.args[0]
        dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else 0)
        assert isinstance(tensors, (list, tuple)) and isinstance(dim, int)
        ndim = len(_shape(user))
        if dim % ndim != layout.dim:
            raise _Refusal(f"{label} joins other tensors along a non-channel axis")
        before = 0
        for tensor in tensors:
            if tensor is source:
                break
            assert isinstance(tensor, fx.Node)
            before += _shape(tensor)[layout.dim]
        if sum(1 for t in tensors if t is source) > 1:
            raise _Refusal(f"{label} concatenates the same channels more than once")
        return _Layout(dim=layout.dim, offset=layout.offset + before, block=layout.block)

    def _consumer(
        self, user: fx.Node, module: nn.Module, layout: _Layout, channels: int
    ) -> ConsumerSlice:
        label = _name_of(user, module)
        self._check_resizable(str(user.target))
        ndim = len(_shape(user.args[0])) if isinstance(user.args[0], fx.Node) else 0
        if isinstance(module, nn.Linear):
            if layout.dim != ndim - 1:
                raise _Refusal(f"{label} reads a different axis than the channels")
        else:
            assert isinstance(module, (nn.Conv1d, nn.Conv2d))
            if module.groups != 1:
                raise _Refusal(f"{label} is a grouped convolution (groups={module.groups})")
            if layout.dim != 1 or layout.block != 1 or ndim != _spatial_dims(module) + 2:
                raise _Refusal(f"{label} reads the channels with a different layout")
        return ConsumerSlice(str(user.target), layout.offset, layout.block)


def find_sites(
    graph_module: fx.GraphModule, approximate: bool = False
) -> tuple[list[Site], list[Skipped]]:
    """Classify every producer in ``graph_module`` (which must carry ShapeProp metadata).

    With ``approximate``, elementwise activations that are not positively homogeneous (GELU, SiLU,
    tanh, ...) are passed through as if they were; each such site lists them in
    ``Site.approximate_through``.
    """
    return SiteFinder(graph_module, approximate).find()
