"""Every op the group finder knows, one row per op with all its spellings, and what it does to channels.

A row names an op once and lists how a graph can write it: the ``nn.Module`` class (a ``call_module``
node), the function (``torch.relu``, ``F.relu``; a ``call_function`` node), the tensor method
(``x.relu()``; a ``call_method`` node) and the ATen overloads that ``torch.export`` writes. Its
``effect`` says what the op does to a group's channels; ``graph.groups`` decides from the effect
alone, never from the spelling.

Effects:

* ``producer``: writes channels (Linear, Conv); a depthwise conv instead acts per channel.
* ``pass``: leaves every channel's values alone (identity, clone, eval-mode dropout).
* ``homogeneous``: elementwise with ``f(s x) = s**degree f(x)`` for ``s > 0`` (ReLU, LeakyReLU).
* ``nonhomogeneous``: any other elementwise activation (GELU, SiLU, tanh...).
* ``prelu``: homogeneous per channel, with a per-channel slope to slice.
* ``batchnorm``: a per-channel affine map with parameters (running statistics folded).
* ``maxpool`` / ``avgpool``: spatial pooling, per channel.
* ``resample``: interpolation of every axis after the channels (upsampling), linear per channel.
* ``layout``: a view, reshape, flatten, squeeze; ``permute`` / ``transpose``: axes move;
  ``expand``: broadcast along other axes; ``index``: ``x[:, 0]``, ``x[..., ::2]``.
* ``pad``: constant padding of trailing axes; ``reduce``: mean / sum / max over some axes.
* ``cat``: concatenation; ``add`` / ``sub`` / ``mul``: binary elementwise; ``pow``: a power.
* ``layernorm`` / ``groupnorm`` / ``softmax``: normalise across an axis (mixing when it is the
  channels').
* ``attention``: ``nn.MultiheadAttention`` (reads the stream through ``in_proj``, writes it through
  ``out_proj``) or ``F.scaled_dot_product_attention`` (per head: heads are its channels).
* ``metadata``: reads a tensor's shape, never its values.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

Effect = Literal[
    "producer",
    "pass",
    "dropout",
    "homogeneous",
    "nonhomogeneous",
    "prelu",
    "batchnorm",
    "maxpool",
    "avgpool",
    "resample",
    "layout",
    "permute",
    "transpose",
    "expand",
    "index",
    "pad",
    "reduce",
    "cat",
    "add",
    "sub",
    "mul",
    "pow",
    "layernorm",
    "groupnorm",
    "softmax",
    "attention",
    "metadata",
]

_aten = torch.ops.aten

#: The convolutions: weight ``(out, in / groups, *kernel)``, channels on axis 1 of a batched input.
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The layers whose rows are channels: what a group's producers and consumers are.
LAYERS = (nn.Linear, *CONVS)


@dataclass(frozen=True)
class Op:
    """One op: its spellings and its effect on channels (``degree`` for homogeneous ones)."""

    name: str
    effect: Effect
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[Any, ...] = ()
    degree: float = 1.0
    #: Functions of optional libraries, by ``module.qualname`` (no import of those libraries here).
    names: tuple[str, ...] = ()
    #: Where a dropout-like function takes its ``training`` flag (positional index).
    training_arg: int = 2


def _nonhomogeneous(
    name: str, module: type[nn.Module], function: Callable[..., Any], aten: Any, *extra: Any
) -> Op:
    methods = (name, f"{name}_") if name in ("tanh", "sigmoid") else ()
    return Op(name, "nonhomogeneous", (module,), (function, *extra), methods, (aten,))


OPS: tuple[Op, ...] = (
    Op("linear", "producer", (nn.Linear,)),
    Op("conv", "producer", CONVS),
    Op("batch_norm", "batchnorm", (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
    Op(
        "relu",
        "homogeneous",
        (nn.ReLU,),
        (F.relu, torch.relu, torch.relu_),  # F.relu_ is torch.relu_
        ("relu", "relu_"),
        (_aten.relu.default, _aten.relu_.default),
    ),
    Op(
        "leaky_relu",
        "homogeneous",
        (nn.LeakyReLU,),
        (F.leaky_relu,),
        (),
        (_aten.leaky_relu.default, _aten.leaky_relu_.default),
    ),
    Op("square", "homogeneous", (), (torch.square,), ("square",), (_aten.square.default,), degree=2),
    Op("prelu", "prelu", (nn.PReLU,)),
    Op("identity", "pass", (nn.Identity,)),
    Op(
        "clone",
        "pass",
        (),
        (),
        ("contiguous", "clone", "detach"),
        (_aten.clone.default, _aten.detach.default, _aten.alias.default),
    ),
    Op(
        "dropout",
        "dropout",
        (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout),
        (F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout),
        (),
        (_aten.dropout.default,),
    ),
    Op(
        "stochastic_depth",
        "dropout",
        names=("torchvision.ops.stochastic_depth.stochastic_depth",),
        training_arg=3,
    ),
    _nonhomogeneous("gelu", nn.GELU, F.gelu, _aten.gelu.default),
    _nonhomogeneous("silu", nn.SiLU, F.silu, _aten.silu.default),
    _nonhomogeneous("mish", nn.Mish, F.mish, _aten.mish.default),
    _nonhomogeneous("elu", nn.ELU, F.elu, _aten.elu.default),
    _nonhomogeneous("selu", nn.SELU, F.selu, _aten.selu.default),
    _nonhomogeneous("celu", nn.CELU, F.celu, _aten.celu.default),
    _nonhomogeneous("softplus", nn.Softplus, F.softplus, _aten.softplus.default),
    _nonhomogeneous("hardswish", nn.Hardswish, F.hardswish, _aten.hardswish.default),
    _nonhomogeneous("hardsigmoid", nn.Hardsigmoid, F.hardsigmoid, _aten.hardsigmoid.default),
    _nonhomogeneous("hardtanh", nn.Hardtanh, F.hardtanh, _aten.hardtanh.default),
    _nonhomogeneous("relu6", nn.ReLU6, F.relu6, _aten.hardtanh.default),
    _nonhomogeneous("tanh", nn.Tanh, torch.tanh, _aten.tanh.default, F.tanh),
    _nonhomogeneous("sigmoid", nn.Sigmoid, torch.sigmoid, _aten.sigmoid.default, F.sigmoid),
    Op(
        "max_pool",
        "maxpool",
        (
            nn.MaxPool1d,
            nn.MaxPool2d,
            nn.MaxPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
        ),
        (
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.adaptive_max_pool1d,
            F.adaptive_max_pool2d,
            F.adaptive_max_pool3d,
            torch.max_pool1d,
            torch.max_pool2d,
            torch.max_pool3d,
        ),
        (),
        (_aten.max_pool1d.default, _aten.max_pool2d.default, _aten.max_pool3d.default),
    ),
    Op(
        "avg_pool",
        "avgpool",
        (
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
        ),
        (
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
        ),
        (),
        (
            _aten.avg_pool1d.default,
            _aten.avg_pool2d.default,
            _aten.avg_pool3d.default,
            _aten.adaptive_avg_pool1d.default,
            _aten.adaptive_avg_pool2d.default,
            _aten.adaptive_avg_pool3d.default,
        ),
    ),
    Op(
        "interpolate",
        "resample",
        (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
        (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear),
        (),
        tuple(
            getattr(_aten, name).vec
            for name in (
                "upsample_nearest1d",
                "upsample_nearest2d",
                "upsample_nearest3d",
                "_upsample_nearest_exact1d",
                "_upsample_nearest_exact2d",
                "_upsample_nearest_exact3d",
                "upsample_linear1d",
                "upsample_bilinear2d",
                "upsample_trilinear3d",
                "upsample_bicubic2d",
                "_upsample_bilinear2d_aa",
                "_upsample_bicubic2d_aa",
            )
        ),
    ),
    Op(
        "reshape",
        "layout",
        (nn.Flatten,),
        (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze),
        ("view", "reshape", "flatten", "squeeze", "unsqueeze"),
        (
            _aten.flatten.using_ints,
            _aten.view.default,
            _aten.reshape.default,
            _aten.squeeze.dim,
            _aten.unsqueeze.default,
        ),
    ),
    Op("getitem", "index", (), (operator.getitem,)),
    Op("expand", "expand", (), (), ("expand", "expand_as"), (_aten.expand.default,)),
    Op("permute", "permute", (), (torch.permute,), ("permute",), (_aten.permute.default,)),
    Op(
        "transpose",
        "transpose",
        (),
        (torch.transpose,),
        ("transpose",),
        (_aten.transpose.int,),
    ),
    Op(
        "pad",
        "pad",
        (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d),
        (F.pad,),
        (),
        (_aten.constant_pad_nd.default, _aten.pad.default),
    ),
    Op(
        "reduce",
        "reduce",
        (),
        (torch.mean, torch.sum, torch.amax),
        ("mean", "sum", "amax"),
        (_aten.mean.dim, _aten.sum.dim_IntList, _aten.amax.default),
    ),
    Op(
        "cat",
        "cat",
        (),
        (torch.cat, torch.concat, torch.concatenate),
        (),
        (_aten.cat.default,),
    ),
    Op(
        "add",
        "add",
        (),
        (operator.add, operator.iadd, torch.add),
        ("add", "add_"),
        (_aten.add.Tensor, _aten.add_.Tensor),
    ),
    Op(
        "sub",
        "sub",
        (),
        (operator.sub, operator.isub, torch.sub),
        ("sub", "sub_"),
        (_aten.sub.Tensor, _aten.sub_.Tensor),
    ),
    Op(
        "mul",
        "mul",
        (),
        (operator.mul, operator.imul, torch.mul),
        ("mul", "mul_"),
        (_aten.mul.Tensor, _aten.mul_.Tensor),
    ),
    Op(
        "pow",
        "pow",
        (),
        (operator.pow, torch.pow),
        ("pow",),
        (_aten.pow.Tensor_Scalar,),
    ),
    Op("layer_norm", "layernorm", (nn.LayerNorm,), (F.layer_norm,), (), (_aten.layer_norm.default,)),
    Op("group_norm", "groupnorm", (nn.GroupNorm,), (F.group_norm,), (), (_aten.group_norm.default,)),
    Op(
        "softmax",
        "softmax",
        (nn.Softmax, nn.LogSoftmax),
        (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax),
        ("softmax", "log_softmax"),
        (_aten._softmax.default, _aten._log_softmax.default),
    ),
    Op(
        "attention",
        "attention",
        (nn.MultiheadAttention,),
        (F.scaled_dot_product_attention,),
        (),
        (_aten.scaled_dot_product_attention.default,),
    ),
    Op("size", "metadata", (), (), ("size", "dim"), (_aten.sym_size.int,)),
)

_BY_FUNCTION: dict[Any, Op] = {}
_BY_METHOD: dict[str, Op] = {}
_BY_NAME: dict[str, Op] = {}
for _op in OPS:
    for _spelling in (*_op.functions, *_op.aten):
        _BY_FUNCTION.setdefault(_spelling, _op)
    for _method in _op.methods:
        _BY_METHOD.setdefault(_method, _op)
    for _name in _op.names:
        _BY_NAME.setdefault(_name, _op)

#: ``x.shape`` and friends trace to ``getattr(x, "shape")``: metadata, like ``x.size()``.
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
_METADATA = next(op for op in OPS if op.effect == "metadata")


def lookup(node: fx.Node, module: nn.Module | None) -> Op | None:
    """The row of the op ``node`` calls (``module`` is its module for a ``call_module``), or None."""
    if node.op == "call_module":
        if module is None:
            return None
        return next((op for op in OPS if isinstance(module, op.modules)), None)
    if node.op == "call_function":
        if node.target is getattr:
            return _METADATA if len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES else None
        found = _BY_FUNCTION.get(node.target)
        if found is None:
            qualified = (
                f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', '')}"
            )
            found = _BY_NAME.get(qualified)
        return found
    if node.op == "call_method":
        return _BY_METHOD.get(str(node.target))
    return None


def label(node: fx.Node, module: nn.Module | None) -> str:
    """How a refusal names ``node``: ``name (Class)`` for a module, the function or method name."""
    if module is not None:
        return f"{node.target} ({type(module).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return str(node.target)


def spatial_dims(kind: object) -> int:
    """How many spatial axes a conv or pooling layer (or function) works on: 1 for ``*1d``, 3 for
    ``*3d``, else 2."""
    name = type(kind).__name__ if isinstance(kind, nn.Module) else getattr(kind, "__name__", "")
    stem = name.split(".")[0]  # ATen names end in ".default"
    return 1 if stem.endswith("1d") else 3 if stem.endswith("3d") else 2
