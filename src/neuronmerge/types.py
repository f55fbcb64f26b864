"""Frozen values passed between the stages: groups of coupled channels and what was skipped.

A *group* is a set of channels that must lose the same indices everywhere they live: the output rows
of every layer that writes them (one layer, every layer adding into a residual stream, the two
halves of a gated pair), the entries of every per-channel parameter on the way (BatchNorm, depthwise
conv, LayerScale, PReLU, LayerNorm), and the input columns of every layer that reads them. The group
records, as ``steps``, what happens to the channels between the writers and the readers, so that a
method can tell how a removed channel looks at each tensor the readers consume (see ``methods``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: How a group may be shrunk, decided by the math of the ops between producers and consumers:
#: ``exact`` (every op commutes with a positive per-channel scale, or is a per-channel affine map, so
#: duplicates merge exactly), ``least-squares`` (every op is per-channel but some are not positively
#: homogeneous: GELU, SiLU, gates), ``prune-only`` (the channels meet an op that mixes them: LayerNorm
#: or softmax across channels).
Mode = Literal["exact", "least-squares", "prune-only"]

#: What one step of a group does to each channel's values (see ``graph.ops``).
StepKind = Literal[
    "root",  # a producer's output (after its folded per-channel affine maps)
    "pass",  # values unchanged per channel: layout, dropout, padding with zeros, avg pooling, sums
    "maxpool",  # commutes with a positive scale only
    "homogeneous",  # f(s x) = s**degree f(x) for s > 0 (ReLU, LeakyReLU, squares)
    "nonhomogeneous",  # any other elementwise activation
    "affine",  # a per-channel linear map with a constant: BatchNorm, LayerScale, depthwise conv
    "add",  # the sum of two tensors of the group (a residual stream)
    "mul",  # the product of two tensors of the group (a gate)
    "mixing",  # LayerNorm / softmax across the channels
    "attention",  # scaled dot-product attention of the heads (query, key, value): channels are heads
]


@dataclass(frozen=True)
class ConsumerSlice:
    """Where one consumer reads a group's channels: input columns ``offset + c*block ...`` of the
    tensor ``tensor`` (an fx node name)."""

    module: str
    offset: int
    block: int
    tensor: str = ""


@dataclass(frozen=True)
class ParamSlice:
    """A per-channel tensor of the group: entries ``offset + c*block ...`` along ``axis``.

    ``owner`` is a module path; ``name`` one of its parameters or buffers, or ``"*"`` for every
    per-channel tensor of a module that ``surgery`` knows (BatchNorm, depthwise conv, PReLU,
    LayerNorm), whose size attributes it updates too.
    """

    owner: str
    name: str
    axis: int
    offset: int
    block: int = 1


@dataclass(frozen=True)
class LiteralFix:
    """A literal size in a node's arguments that counts the group's channels (``x.view(-1, 120)``,
    ``F.layer_norm(x, (C,))``): ``position`` is ("arg", index, element) or ("kwarg", name, element).
    """

    node: str
    key: str | int
    element: int
    block: int


@dataclass(frozen=True)
class Step:
    """One op between producers and consumers: ``node`` (an fx node name) computed from the group
    tensors ``inputs``. ``params`` says where per-channel tensors of an ``affine`` step live:
    ``("batchnorm", module)``, ``("depthwise", module)``, ``("scale", attr)``, ``("shift", attr)``."""

    node: str
    kind: StepKind
    inputs: tuple[str, ...] = ()
    degree: float = 1.0
    label: str = ""
    params: tuple[str, str] | None = None
    offset: int = 0


@dataclass(frozen=True)
class Group:
    """Channels that lose the same indices everywhere, and everything a change must update.

    ``producers`` write the channels; ``roots`` gives, per producer, the index of the product factor
    it belongs to (producers adding into one stream share a root where their outputs meet unchanged;
    the gate and the up projection of a gated pair do not, nor a producer whose output passes a
    per-channel scale such as RepVGG's identity BatchNorm before the add) and ``folded`` the
    per-channel maps folded into its rows (a BatchNorm right after it). ``steps`` are in graph
    order; ``consumers`` read the tensors named in their slices.
    """

    #: The group's name: its first producer in graph order.
    producer: str
    #: The BatchNorm folded into a single producer's rows, if any (the paper's conv + BN).
    norm: str | None
    #: The first producer's layer type (the paper rounds kept counts differently for each).
    kind: Literal["linear", "conv"]
    pattern: Literal["chain", "residual", "gated", "heads"]
    channels: int
    producers: tuple[str, ...]
    roots: tuple[int, ...]
    folded: tuple[tuple[str, ...], ...]
    steps: tuple[Step, ...]
    consumers: tuple[ConsumerSlice, ...]
    params: tuple[ParamSlice, ...]
    literals: tuple[LiteralFix, ...]
    mode: Mode
    #: Why the mode is not ``exact`` ("" when it is).
    why: str = ""
    #: Non-homogeneous ops the channels pass through: merging treats them as if ``f(s*z) == s*f(z)``.
    approximate_through: tuple[str, ...] = ()
    #: Grouped convs among the producers or consumers split the channels into this many equal
    #: contiguous blocks: each block keeps as many channels, and merges stay inside a block.
    blocks: int = 1
    #: ``nn.MultiheadAttention`` modules whose embedding is these channels: ``in_proj`` reads them,
    #: ``out_proj`` (a producer) writes them, and torch ties the inner query/key/value width to the
    #: embedding, so surgery rebuilds each with the kept width (inner dims chosen per head).
    attention: tuple[str, ...] = ()
    #: The kept count must be a multiple of this (the head count of every attention in ``attention``:
    #: the kept width is always split evenly into heads).
    multiple: int = 1
    #: Rows of each producer's weight per channel (empty: one each). A head group's channels are
    #: heads: ``head_dim`` rows of each of the query, key and value projections.
    row_blocks: tuple[int, ...] = ()

    def rows_per_channel(self, producer: str) -> int:
        """How many weight rows of ``producer`` one channel owns."""
        if not self.row_blocks:
            return 1
        return self.row_blocks[self.producers.index(producer)]

    def block_spans(self) -> list[slice]:
        """The channel range of every block."""
        size = self.channels // self.blocks
        return [slice(b * size, (b + 1) * size) for b in range(self.blocks)]

    @property
    def name(self) -> str:
        """The group's name: its first producer in graph order."""
        return self.producer


@dataclass(frozen=True)
class Skipped:
    """A producer left untouched, and why."""

    producer: str
    reason: str
