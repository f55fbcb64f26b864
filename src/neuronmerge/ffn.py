"""Compress the feed-forward network (MLP) of every transformer block, one block at a time.

A transformer's MLP reads the residual stream and writes back into it, so its hidden neurons are
coupled to nothing outside the block: ``W_down act(W_up x)`` (or the gated ``W_down (act(W_gate x) *
W_up x)``). Tracing a whole pretrained model (caches, masks, ``**kwargs``) is fragile, while that
function alone is trivial to trace. So each block's MLP layers are lifted into a small standalone
``FeedForward`` module, compressed by the ordinary engine (``nm.compress``: all merge math lives
there), and the compressed layers are put back into a copy of the block. Uniform ratios keep every
block at the same width, which is what configs with one ``intermediate_size`` need.

Data-free probes for least-squares methods: the caller may pass what each MLP reads when the model
runs on text it wrote itself (``generated``: the better probes, for causal language models). Without
them they come from the block's own normalisation layer: the MLP reads ``norm(h)``, so ``norm(z)`` for
Gaussian ``z`` has the right per-channel scale and offset (LayerNorm's ``gamma``, ``beta``; RMSNorm's
weight) without any data. Either way every block is fitted on inputs of the original model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neuronmerge.api import Report, _compress
from neuronmerge.budget import request as budget_request
from neuronmerge.criteria import check_ratio, kept_count
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.generated import layer_inputs
from neuronmerge.notices import CompressionWarning
from neuronmerge.options import Options

#: Turns a block's layer into an ``nn.Linear`` (same function) and a compressed Linear back into the
#: block's kind. ``nn.Linear`` needs nothing; adapters add kinds (GPT-2's transposed ``Conv1D``).
LinearKind = tuple[Callable[[nn.Module], nn.Linear], Callable[[nn.Linear], nn.Module]]


@dataclass(frozen=True)
class Spellings:
    """A library's own layer and activation classes, as what the engine knows.

    ``linears``: per class, how to turn it into an ``nn.Linear`` and back. ``activations``: per class,
    a torch module computing the same function, used in the lifted MLP (the block keeps its own).
    """

    linears: dict[type, LinearKind] = field(default_factory=dict)
    activations: dict[type, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class FFNSpec:
    """Where a block's MLP lives: attribute paths relative to the block module.

    ``up`` produces the hidden neurons (with ``gate``, the multiplied branch), ``down`` reads them,
    ``act`` is the activation module, ``norm`` the normalisation whose output the MLP reads (used to
    make data-free probes; ``None`` uses standard Gaussian inputs). ``fused``: ``up`` computes the
    gate rows and then the up rows in one layer (Phi-3's ``gate_up_proj``: rows ``[0, I)`` gate,
    ``[I, 2I)`` up), so hidden neuron ``i`` is rows ``i`` and ``I + i``; it is split into two Linears
    for the engine (which groups gate and up rows as it does for a separate ``gate``) and fused back.
    """

    up: str
    down: str
    act: str
    gate: str | None = None
    norm: str | None = None
    fused: bool = False

    def __post_init__(self) -> None:
        if self.fused and self.gate is not None:
            raise InvalidArgumentError(f"a fused {self.up} holds the gate rows itself: no gate path")


class FeedForward(nn.Module):
    """``down(act(up(x)))``, or ``down(act(gate(x)) * up(x))`` when ``gate`` is given."""

    def __init__(self, up: nn.Linear, act: nn.Module, down: nn.Linear, gate: nn.Linear | None) -> None:
        super().__init__()
        self.up, self.act, self.down = up, act, down
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            out: Tensor = self.down(self.act(self.up(x)))
        else:
            out = self.down(self.act(self.gate(x)) * self.up(x))
        return out


@dataclass(frozen=True)
class BlockReport:
    """What compressing one block's MLP did: its path, widths and the engine's report."""

    block: str
    width_before: int
    width_after: int
    report: Report


@dataclass(frozen=True)
class FFNOptions:
    """Options of ``compress_ffns`` passed through to ``nm.compress`` (validated there)."""

    ratio: float
    method: str = "merge"
    probes: int = 2048
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def mlp_widths(
    stacks: Sequence[tuple[int, int]],
    *,
    ratio: float | None = None,
    target_params: float | None = None,
    round_to: int | None = None,
    total: int,
) -> tuple[int, ...]:
    """The MLP width each stack of blocks keeps, from a ``ratio`` or a parameter target.

    A stack is every block whose width one config field states (``intermediate_size``; an
    encoder-decoder's ``encoder_ffn_dim`` and ``decoder_ffn_dim`` are two stacks), so every block of a
    stack keeps the same width. ``stacks``: per stack, its width and the parameters one hidden neuron
    costs summed over its blocks (per block: one up row and bias, one gate row and bias, one down
    column): the model's ``total`` falls by that much per neuron removed. A target keeps the same
    fraction of every stack, each width the multiple of ``round_to`` (or the full width) nearest it,
    with the total closest to the target; ``target_params`` is a fraction of ``total`` kept or an
    absolute count, validated as ``nm.compress`` validates it. A target out of reach raises with the
    reachable range.
    """
    if (ratio is None) == (target_params is None):
        raise InvalidArgumentError("give a ratio or target_params, exactly one of them")
    request = budget_request(target_params=target_params, round_to=round_to)
    step = request.round_to
    widths = [width for width, _ in stacks]
    if ratio is not None:
        kept = [kept_count(width, check_ratio(ratio)) for width in widths]
        return tuple(
            k if step == 1 or k == w else min(w, max(step, round(k / step) * step))
            for k, w in zip(kept, widths, strict=True)
        )
    full = sum(width * cost for width, cost in stacks)
    fixed = total - full
    smallest = [min(step, width) for width in widths]
    low = fixed + sum(s * cost for s, (_, cost) in zip(smallest, stacks, strict=True))
    target = request.absolute(total)
    if not low <= target <= total:
        raise InvalidArgumentError(
            f"target_params {target:,} is out of reach: narrowing every MLP (width "
            f"{_listed(widths)}) reaches {low:,} (width {_listed(smallest)}) to {total:,} "
            "(unchanged) parameters"
        )
    share = (target - fixed) / full
    return tuple(
        min(w, max(s, round(share * w / step) * step)) for w, s in zip(widths, smallest, strict=True)
    )


def _listed(widths: Sequence[int]) -> str:
    return ", ".join(str(w) for w in widths)


def neuron_cost(ffn: FeedForward) -> int:
    """Parameters one hidden neuron of ``ffn`` costs: its up (and gate) row and bias, its down column."""
    layers = [ffn.up] + ([ffn.gate] if ffn.gate is not None else [])
    return sum(layer.in_features + (layer.bias is not None) for layer in layers) + ffn.down.out_features


def _linear_of(module: nn.Module, spellings: Spellings) -> nn.Linear:
    """``module`` as a plain ``nn.Linear``. A subclass of ``nn.Linear`` counts only when its
    library's ``Spellings`` name it: fx traces into subclasses (their ``forward`` may differ, as a
    LoRA or quantised layer's does), so an unnamed one is refused, not guessed."""
    if type(module) is nn.Linear:
        return module
    kind = spellings.linears.get(type(module))
    if kind is None:
        raise InvalidArgumentError(f"an MLP layer of unsupported kind {type(module).__name__}")
    return kind[0](module)


def _back(original: nn.Module, linear: nn.Linear, spellings: Spellings) -> nn.Module:
    if type(original) is nn.Linear:
        return linear
    kind = spellings.linears.get(type(original))
    if kind is None:
        raise InvalidArgumentError(f"an MLP layer of unsupported kind {type(original).__name__}")
    return kind[1](linear)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def lift(block: nn.Module, spec: FFNSpec, spellings: Spellings | None = None) -> FeedForward:
    """The block's MLP as a standalone ``FeedForward`` (its Linears are the block's own or copies)."""
    spellings = spellings or Spellings()
    layer = lambda path: _linear_of(block.get_submodule(path), spellings)  # noqa: E731
    gate: nn.Linear | None
    if spec.fused:
        gate, up = _split(layer(spec.up))
    else:
        gate, up = (layer(spec.gate) if spec.gate else None), layer(spec.up)
    act = block.get_submodule(spec.act)
    act = spellings.activations.get(type(act), act)
    return FeedForward(up, act, layer(spec.down), gate)


def _split(fused: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
    """A fused gate-and-up layer as its gate (first half of the rows) and up (second half), copied:
    the engine may write over its layers in place, which must not reach the fused original."""
    halves = lambda t: [half.clone() for half in t.detach().chunk(2)]  # noqa: E731
    gate_w, up_w = halves(fused.weight)
    gate_b, up_b = halves(fused.bias) if fused.bias is not None else (None, None)
    return _linear(gate_w, gate_b), _linear(up_w, up_b)


def _fuse(gate: nn.Linear, up: nn.Linear) -> nn.Linear:
    """Gate rows then up rows in one Linear (``_split`` undone); a bias on either gives both one."""
    bias = None
    if gate.bias is not None or up.bias is not None:
        bias = torch.cat([_bias(layer) for layer in (gate, up)])
    return _linear(torch.cat([gate.weight.detach(), up.weight.detach()]), bias)


def _bias(layer: nn.Linear) -> Tensor:
    if layer.bias is None:
        return layer.weight.new_zeros(layer.out_features)
    return layer.bias.detach()


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias`` themselves, allocating nothing else."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device="meta")
    linear.weight = nn.Parameter(weight)
    if bias is not None:
        linear.bias = nn.Parameter(bias)
    return linear


def probes_for(block: nn.Module, spec: FFNSpec, hidden: int, options: FFNOptions) -> list[Tensor]:
    """Synthetic MLP inputs, one token per row: the block's norm of Gaussian noise (data-free)."""
    generator = torch.Generator().manual_seed(options.seed)
    dtype = next(block.parameters()).dtype
    noise = torch.randn(options.probes, hidden, generator=generator, dtype=dtype)
    with torch.no_grad():
        x = block.get_submodule(spec.norm)(noise) if spec.norm else noise
    return _batches(x)


def _batches(rows: Tensor, size: int = 256) -> list[Tensor]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def mlp_inputs(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], spec: FFNSpec, tokens: Tensor
) -> dict[str, Tensor]:
    """Per block name, what its MLP reads when ``model`` runs on ``tokens`` (one token per row)."""
    return layer_inputs(model, {name: block.get_submodule(spec.up) for name, block in blocks}, tokens)


def compress_block(
    block: nn.Module,
    spec: FFNSpec,
    options: FFNOptions,
    spellings: Spellings | None = None,
    name: str = "block",
    inputs: Tensor | None = None,
    in_place: bool = False,
) -> BlockReport:
    """Compress ``block``'s MLP in place (call it on a copy) and report what was done.

    ``inputs``: what the MLP reads, one token per row (``generated.layer_inputs``), used as the
    probes of least-squares methods instead of normalised noise. ``in_place``: the compressed
    weights overwrite the block's old ones in memory (``api._compress(in_place=True)``), for a caller
    whose block shares its tensors with nothing else (``streaming``); peak memory is then the MLP's
    size, not twice it.
    """
    spellings = spellings or Spellings()
    ffn = lift(block, spec, spellings).eval()  # a fresh module: its mode is ours, not the caller's
    hidden, width = ffn.up.in_features, ffn.up.out_features
    # The MLP acts on every token alike, so it is traced on (tokens, hidden): what the engine and
    # its moment estimates handle best, and the same compressed layers serve (batch, length, hidden).
    example = torch.zeros(8, hidden, dtype=ffn.up.weight.dtype)
    extra = dict(options.extra)
    if options.method == "merge-ls" and "calibration" not in extra:
        extra["calibration"] = (
            _batches(inputs) if inputs is not None else probes_for(block, spec, hidden, options)
        )
    with warnings.catch_warnings():
        # An MLP either compresses or is refused by the error below, which names the reasons: its
        # shortfall warning would be the same message said twice.
        warnings.simplefilter("ignore", CompressionWarning)
        calibration = extra.pop("calibration", None)
        result = _compress(
            ffn,
            example,
            options.ratio,
            Options.of(method=options.method, **extra),
            calibration,
            in_place=in_place,
        )
    if _width(result.model) == width and options.ratio > 0:
        reasons = "; ".join(f"{s.producer}: {s.reason}" for s in result.report.skipped)
        raise InvalidArgumentError(f"{name}: the MLP could not be compressed ({reasons})")
    return BlockReport(name, width, put_back(block, spec, result.model, spellings), result.report)


def put_back(
    block: nn.Module, spec: FFNSpec, small: nn.Module, spellings: Spellings | None = None
) -> int:
    """Put the Linears ``up``, ``down`` (and ``gate``) of a compressed ``FeedForward`` (or any module
    with those submodules) into ``block`` in place of its own; returns the new hidden width."""
    spellings = spellings or Spellings()
    if spec.fused:
        paths = {spec.up: _fuse(_compressed(small, "gate"), _compressed(small, "up"))}
    else:
        paths = {spec.up: _compressed(small, "up")}
        if spec.gate:
            paths[spec.gate] = _compressed(small, "gate")
    paths[spec.down] = _compressed(small, "down")
    for path, new in paths.items():
        _set(block, path, _back(block.get_submodule(path), new, spellings))
    return _width(small)


def _compressed(small: nn.Module, attr: str) -> nn.Linear:
    layer = small.get_submodule(attr)
    assert isinstance(layer, nn.Linear)
    return layer


def _width(ffn: nn.Module) -> int:
    up = ffn.get_submodule("up")
    assert isinstance(up, nn.Linear)
    return up.out_features


def compress_ffns(
    blocks: Sequence[tuple[str, nn.Module]],
    spec: FFNSpec,
    options: FFNOptions,
    spellings: Spellings | None = None,
    inputs: Mapping[str, Tensor] | None = None,
) -> tuple[BlockReport, ...]:
    """Compress every block's MLP in place; every block must end at the same width.

    ``inputs``: per block name, what its MLP reads (see ``compress_block``).
    """
    inputs = inputs or {}
    reports = tuple(
        compress_block(b, spec, options, spellings, name, inputs.get(name)) for name, b in blocks
    )
    widths = {r.width_after for r in reports}
    if len(widths) > 1:
        raise InvalidArgumentError(f"blocks ended at different MLP widths {sorted(widths)}")
    return reports


def has_bias(block: nn.Module, spec: FFNSpec) -> bool:
    """Whether any of the block's MLP layers has a bias (least-squares merging adds one to ``down``)."""
    paths = (spec.up, spec.down) + ((spec.gate,) if spec.gate else ())
    return any(getattr(block.get_submodule(p), "bias", None) is not None for p in paths)


def add_zero_biases(block: nn.Module, spec: FFNSpec) -> None:
    """Give every MLP layer of ``block`` a bias, zero where it had none (same function).

    Configs such as LLaMA's have one switch (``mlp_bias``) for all MLP layers of all blocks, so once
    one layer needs a bias every MLP layer must have one for ``from_pretrained`` to load them.
    """
    for path in (spec.up, spec.down) + ((spec.gate,) if spec.gate else ()):
        layer = block.get_submodule(path)
        if isinstance(layer, nn.Linear) and layer.bias is None:
            weight = layer.weight
            layer.bias = nn.Parameter(
                torch.zeros(weight.shape[0], dtype=weight.dtype), requires_grad=False
            )
