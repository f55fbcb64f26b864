"""Hugging Face ``transformers`` models in, the same class out, with narrower MLPs.

``compress_pretrained(model, ratio)`` finds every transformer block by its class (one table row per
block layout, every class name that shares the layout in that row), compresses each block's MLP with
the engine through ``neuronmerge.ffn`` and writes the new width into the config field the class reads
(``n_inner``, ``ffn_dim``, ``intermediate_size``). Every block keeps the same width, so
``save_pretrained`` then plain ``AutoModel.from_pretrained`` (no neuronmerge needed) rebuilds it.

GPT-2's MLP layers are ``Conv1D``: ``x @ W + b`` with ``W`` stored as (in, out), the transpose of
``nn.Linear``. They are turned into Linears for the engine and back afterwards (``_CONV1D``).

Needs the optional extra: ``pip install 'neuronmerge[hf]'``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from neuronmerge.errors import InvalidArgumentError, MissingDependencyError
from neuronmerge.ffn import (
    BlockReport,
    FFNOptions,
    FFNSpec,
    Spellings,
    add_zero_biases,
    compress_ffns,
    has_bias,
    lift,
    mlp_inputs,
    mlp_width,
    neuron_cost,
)
from neuronmerge.generated import sample_tokens
from neuronmerge.hf_heads import AttentionSpec, HeadReport, compress_heads, kept_groups


@dataclass(frozen=True)
class BlockKind:
    """One block layout: the class names that use it, its MLP and the config field of its width.

    ``bias_field``: the config switch that gives every MLP layer a bias, for layouts without biases
    by default (least-squares merging folds constants into ``down``'s bias).
    """

    classes: tuple[str, ...]
    spec: FFNSpec
    width_field: str
    bias_field: str | None = None
    #: Where its attention's q/k/v/o live, for configs that can state fewer heads (``hf_heads``).
    attention: AttentionSpec | None = None


#: Every supported block layout (paths relative to the block).
BLOCK_KINDS: tuple[BlockKind, ...] = (
    BlockKind(("GPT2Block",), FFNSpec("mlp.c_fc", "mlp.c_proj", "mlp.act", norm="ln_2"), "n_inner"),
    BlockKind(
        ("OPTDecoderLayer",),
        FFNSpec("fc1", "fc2", "activation_fn", norm="final_layer_norm"),
        "ffn_dim",
    ),
    BlockKind(
        ("BertLayer",),
        FFNSpec(
            "intermediate.dense",
            "output.dense",
            "intermediate.intermediate_act_fn",
            norm="attention.output.LayerNorm",
        ),
        "intermediate_size",
    ),
    BlockKind(
        ("ViTLayer",),
        FFNSpec("mlp.fc1", "mlp.fc2", "mlp.activation_fn", norm="layernorm_after"),
        "intermediate_size",
    ),
    BlockKind(
        ("LlamaDecoderLayer",),
        FFNSpec(
            "mlp.up_proj",
            "mlp.down_proj",
            "mlp.act_fn",
            gate="mlp.gate_proj",
            norm="post_attention_layernorm",
        ),
        "intermediate_size",
        bias_field="mlp_bias",
        attention=AttentionSpec(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
        ),
    ),
)


#: Length of each self-generated probe sequence (``generated.sample_tokens``), in tokens, at most
#: the model's context.
PROBE_LENGTH = 64


def _can_generate(model: nn.Module) -> bool:
    """Whether ``model`` predicts next tokens (a ``...ForCausalLM`` head), so it can write probes."""
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def _start_token(config: Any) -> int | None:
    """The config's beginning-of-sequence token when it has a valid one (else a random start)."""
    bos = getattr(config, "bos_token_id", None)
    return bos if isinstance(bos, int) and 0 <= bos < config.vocab_size else None


@dataclass(frozen=True)
class PretrainedResult:
    """The compressed model (same class as the input) and one report per block."""

    model: nn.Module
    blocks: tuple[BlockReport, ...]
    width_field: str
    width_before: int
    width_after: int
    #: Attention heads before and after, when ``heads=`` was given.
    heads: HeadReport | None = None


def _spellings() -> Spellings:
    """transformers' own layer and activation classes, as the engine's (see ``ffn.Spellings``).

    GPT-2's ``Conv1D`` is a transposed Linear. fx traces into ``NewGELUActivation`` as
    ``0.5 * x * (1 + tanh(...))``, a product the engine cannot see through, so the lifted MLP uses
    ``nn.GELU("tanh")``, the same function; likewise for the other activation classes.
    """
    from transformers import activations
    from transformers.pytorch_utils import Conv1D

    def to_linear(layer: nn.Module) -> nn.Linear:
        assert isinstance(layer, Conv1D)
        fan_in, fan_out = layer.weight.shape
        linear = nn.Linear(fan_in, fan_out, dtype=layer.weight.dtype)
        linear.weight = nn.Parameter(layer.weight.detach().T.clone())
        linear.bias = nn.Parameter(layer.bias.detach().clone())
        return linear

    def from_linear(linear: nn.Linear) -> nn.Module:
        layer = Conv1D(linear.out_features, linear.in_features)
        layer.weight = nn.Parameter(linear.weight.detach().T.contiguous())
        assert linear.bias is not None
        layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer

    return Spellings(
        linears={Conv1D: (to_linear, from_linear)},
        activations={
            activations.NewGELUActivation: nn.GELU(approximate="tanh"),
            activations.GELUTanh: nn.GELU(approximate="tanh"),
            activations.GELUActivation: nn.GELU(),
            activations.SiLUActivation: nn.SiLU(),
        },
    )


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "Hugging Face models need transformers: pip install 'neuronmerge[hf]'"
        ) from exc


def block_kind(model: nn.Module) -> tuple[BlockKind, list[tuple[str, nn.Module]]]:
    """The layout of ``model``'s blocks and the blocks in order; one clear error if none is known."""
    found: dict[str, tuple[BlockKind, list[tuple[str, nn.Module]]]] = {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        for kind in BLOCK_KINDS:
            if cls in kind.classes:
                found.setdefault(cls, (kind, []))[1].append((name, module))
    if len(found) != 1:
        known = ", ".join(c for k in BLOCK_KINDS for c in k.classes)
        what = "no transformer block" if not found else f"several block classes {sorted(found)}"
        raise InvalidArgumentError(f"{type(model).__name__} has {what} this adapter knows ({known})")
    return next(iter(found.values()))


def compress_pretrained(
    model: nn.Module,
    ratio: float | None = None,
    *,
    method: str = "merge",
    target_params: float | None = None,
    round_to: int | None = None,
    heads: float | None = None,
    **options: Any,
) -> PretrainedResult:
    """A copy of a ``transformers`` model with every block's MLP compressed by ``ratio`` (default
    0.5), or to the one MLP width whose parameter count is closest to ``target_params`` (a fraction
    of the model kept, or a count; ``ffn.mlp_width``); ``round_to=N`` keeps the width a multiple of N.
    ``heads`` removes that fraction of every block's key/value head groups as well (``hf_heads``:
    exact duplicates merged unless ``method="prune"``, the weakest pruned), for configs that state
    the head width (LLaMA); the MLPs are fitted first, on the model with all its heads.

    ``method`` and ``options`` are those of ``nm.compress`` (e.g. ``approximate=True`` to merge
    through GELU/SiLU); ``method="merge-ls"`` is data-free here: its probes are what each MLP reads
    when a model that can generate runs on text it sampled itself (``generated``), else each block's
    own normalisation applied to Gaussian noise. The caller's model is not modified.
    """
    _require_transformers()
    kind, originals = block_kind(model)
    if heads is not None and kind.attention is None:
        raise InvalidArgumentError(
            f"{'/'.join(kind.classes)}: the config derives each head's width from hidden_size and "
            "the head count, so a model with fewer heads would not reload; heads= needs a config "
            "with head_dim (LLaMA-style)"
        )
    if heads is not None and kind.attention is not None:
        kept_groups(model.config, kind.attention, heads)  # a bad value fails before any work
    first = lift(originals[0][1], kind.spec, _spellings())  # the caller's layers, only read
    width = first.up.out_features
    kept = mlp_width(
        width,
        ratio=0.5 if ratio is None and target_params is None else ratio,
        target_params=target_params,
        round_to=round_to,
        total=sum(p.numel() for p in model.parameters()),
        per_neuron=neuron_cost(first),
        blocks=len(originals),
    )
    small = copy.deepcopy(model).eval()
    _, blocks = block_kind(small)
    ffn_options = FFNOptions(1 - kept / width, method=method, extra=options)
    inputs = None
    if method == "merge-ls" and "calibration" not in options and _can_generate(small):
        config: Any = small.config
        length = min(PROBE_LENGTH, getattr(config, "max_position_embeddings", PROBE_LENGTH))
        tokens = sample_tokens(
            small,
            config.vocab_size,
            count=max(1, ffn_options.probes // length),
            length=length,
            seed=ffn_options.seed,
            first=_start_token(config),
        )
        inputs = mlp_inputs(small, blocks, kind.spec, tokens)
    reports = compress_ffns(blocks, kind.spec, ffn_options, _spellings(), inputs)
    width_before, width_after = reports[0].width_before, reports[0].width_after
    setattr(small.config, kind.width_field, width_after)
    if kind.bias_field and any(has_bias(block, kind.spec) for _, block in blocks):
        for _, block in blocks:
            add_zero_biases(block, kind.spec)
        setattr(small.config, kind.bias_field, True)
    head_report = None
    if heads is not None and kind.attention is not None:
        head_report = compress_heads(blocks, kind.attention, small.config, heads, method != "prune")
    return PretrainedResult(small, reports, kind.width_field, width_before, width_after, head_report)
