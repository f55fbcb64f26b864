"""Hugging Face ``transformers`` models in, the same class out, with narrower MLPs.

``compress_pretrained(model, ratio)`` finds every transformer block by its class (one table row per
block layout, every class name that shares the layout in that row), compresses each block's MLP with
the engine through ``neuronmerge.ffn`` and writes the new width into the config field the class reads
(``n_inner``, ``ffn_dim``, ``intermediate_size``, ``d_ff``...). Every block keeps the same width, so
``save_pretrained`` then plain ``AutoModel.from_pretrained`` (no neuronmerge needed) rebuilds it.

GPT-2's MLP layers are ``Conv1D``: ``x @ W + b`` with ``W`` stored as (in, out), the transpose of
``nn.Linear``. They are turned into Linears for the engine and back afterwards (``_CONV1D``).

Needs the optional extra: ``pip install 'neuronmerge[hf]'``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuronmerge.errors import InvalidArgumentError, MissingDependencyError
from neuronmerge.ffn import (
    BlockReport,
    FFNOptions,
    FFNSpec,
    LinearKind,
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


_GATED = FFNSpec(
    "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", gate="mlp.gate_proj", norm="post_attention_layernorm"
)
_LLAMA_ATTENTION = AttentionSpec(
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
)

#: Every supported block layout (paths relative to the block). A block matches a row when its class
#: is listed there and every MLP path resolves in it (a class with two MLP layouts, as T5's plain and
#: gated feed-forwards, has one row per layout). ``norm`` is what the MLP reads: parallel blocks
#: (GPT-J, Phi, Cohere) feed attention and MLP the same ``input_layernorm``; post-norm blocks (OLMo-2)
#: feed the MLP the raw residual stream (``None``).
BLOCK_KINDS: tuple[BlockKind, ...] = (
    BlockKind(
        ("GPT2Block", "GPTBigCodeBlock"),
        FFNSpec("mlp.c_fc", "mlp.c_proj", "mlp.act", norm="ln_2"),
        "n_inner",
    ),
    BlockKind(
        ("GPTJBlock", "CodeGenBlock"),
        FFNSpec("mlp.fc_in", "mlp.fc_out", "mlp.act", norm="ln_1"),
        "n_inner",
    ),
    BlockKind(
        ("Starcoder2DecoderLayer",),
        FFNSpec("mlp.c_fc", "mlp.c_proj", "mlp.act", norm="post_attention_layernorm"),
        "intermediate_size",
    ),
    BlockKind(
        ("GPTNeoXLayer", "PersimmonDecoderLayer"),
        FFNSpec("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "mlp.act", norm="post_attention_layernorm"),
        "intermediate_size",
    ),
    BlockKind(  # Falcon with parallel_attn=False: attention, then the MLP
        ("FalconDecoderLayer",),
        FFNSpec("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "mlp.act", norm="post_attention_layernorm"),
        "ffn_hidden_size",
    ),
    BlockKind(  # Falcon-40B style (new_decoder_architecture): the MLP has its own ln_mlp
        ("FalconDecoderLayer",),
        FFNSpec("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "mlp.act", norm="ln_mlp"),
        "ffn_hidden_size",
    ),
    BlockKind(  # Falcon-7B style: one input_layernorm feeds attention and MLP in parallel
        ("FalconDecoderLayer",),
        FFNSpec("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "mlp.act", norm="input_layernorm"),
        "ffn_hidden_size",
    ),
    BlockKind(
        ("PhiDecoderLayer",),
        FFNSpec("mlp.fc1", "mlp.fc2", "mlp.activation_fn", norm="input_layernorm"),
        "intermediate_size",
    ),
    BlockKind(
        ("OPTDecoderLayer",),
        FFNSpec("fc1", "fc2", "activation_fn", norm="final_layer_norm"),
        "ffn_dim",
    ),
    BlockKind(
        ("WhisperEncoderLayer",),
        FFNSpec("fc1", "fc2", "activation_fn", norm="final_layer_norm"),
        "encoder_ffn_dim",
    ),
    BlockKind(
        ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "DebertaV2Layer"),
        FFNSpec(
            "intermediate.dense",
            "output.dense",
            "intermediate.intermediate_act_fn",
            norm="attention.output.LayerNorm",
        ),
        "intermediate_size",
    ),
    BlockKind(
        ("MPNetLayer",),
        FFNSpec(
            "intermediate.dense",
            "output.dense",
            "intermediate.intermediate_act_fn",
            norm="attention.LayerNorm",
        ),
        "intermediate_size",
    ),
    BlockKind(
        ("TransformerBlock",),  # DistilBERT
        FFNSpec("ffn.lin1", "ffn.lin2", "ffn.activation", norm="sa_layer_norm"),
        "hidden_dim",
    ),
    BlockKind(
        ("ViTLayer", "DeiTLayer", "BeitLayer"),
        FFNSpec("mlp.fc1", "mlp.fc2", "mlp.activation_fn", norm="layernorm_after"),
        "intermediate_size",
    ),
    BlockKind(
        ("CLIPEncoderLayer", "SiglipEncoderLayer"),
        FFNSpec("mlp.fc1", "mlp.fc2", "mlp.activation_fn", norm="layer_norm2"),
        "intermediate_size",
    ),
    BlockKind(
        ("T5Block",),
        FFNSpec(
            "layer.1.DenseReluDense.wi",
            "layer.1.DenseReluDense.wo",
            "layer.1.DenseReluDense.act",
            norm="layer.1.layer_norm",
        ),
        "d_ff",
    ),
    BlockKind(
        ("T5Block",),
        FFNSpec(
            "layer.1.DenseReluDense.wi_1",
            "layer.1.DenseReluDense.wo",
            "layer.1.DenseReluDense.act",
            gate="layer.1.DenseReluDense.wi_0",
            norm="layer.1.layer_norm",
        ),
        "d_ff",
    ),
    BlockKind(
        ("LlamaDecoderLayer", "GraniteDecoderLayer"),
        _GATED,
        "intermediate_size",
        bias_field="mlp_bias",
        attention=_LLAMA_ATTENTION,
    ),
    BlockKind(
        (
            "Qwen2DecoderLayer",
            "Qwen3DecoderLayer",
            "MistralDecoderLayer",
            "GemmaDecoderLayer",
            "StableLmDecoderLayer",
            "OlmoDecoderLayer",
        ),
        _GATED,
        "intermediate_size",
    ),
    BlockKind(
        ("Gemma2DecoderLayer",),
        FFNSpec(
            "mlp.up_proj",
            "mlp.down_proj",
            "mlp.act_fn",
            gate="mlp.gate_proj",
            norm="pre_feedforward_layernorm",
        ),
        "intermediate_size",
    ),
    BlockKind(
        ("CohereDecoderLayer",),
        FFNSpec(
            "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", gate="mlp.gate_proj", norm="input_layernorm"
        ),
        "intermediate_size",
    ),
    BlockKind(
        ("Olmo2DecoderLayer",),
        FFNSpec("mlp.up_proj", "mlp.down_proj", "mlp.act_fn", gate="mlp.gate_proj"),
        "intermediate_size",
    ),
)


#: Block layouts known and refused, by class, with the reason (a model with one of these and no
#: supported block gets this reason instead of "no known block"). Mixture-of-experts blocks in
#: general are recognised by their ``experts`` submodule (``_refusal``).
UNSUPPORTED: dict[str, str] = {
    "AlbertLayer": "ALBERT shares one layer's weights across all layers, so the MLP width is not "
    "a per-layer choice and merging one shared MLP for every depth is not supported",
    "Phi3DecoderLayer": "Phi-3 fuses gate and up into one gate_up_proj layer, which this adapter "
    "does not split",
    "BloomBlock": "BLOOM's MLP width is fixed at 4 x hidden_size by its config (no width field), "
    "so a narrower MLP would not reload",
}


def _refusal(model: nn.Module) -> str | None:
    """Why ``model``'s blocks are known to be unsupported, if they are."""
    for _, module in model.named_modules():
        cls = type(module).__name__
        if cls in UNSUPPORTED:
            return f"{cls}: {UNSUPPORTED[cls]}"
        if isinstance(getattr(module, "experts", None), nn.Module):
            return (
                f"{cls}: a mixture-of-experts MLP (tokens routed to experts) is not supported; "
                "only dense MLPs are"
            )
    return None


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
        linears={Conv1D: (to_linear, from_linear), **_plain_linears()},
        activations={
            activations.NewGELUActivation: nn.GELU(approximate="tanh"),
            activations.GELUTanh: nn.GELU(approximate="tanh"),
            activations.GELUActivation: nn.GELU(),
            activations.SiLUActivation: nn.SiLU(),
        },
    )


def _plain_linears() -> dict[type, LinearKind]:
    """transformers' subclasses of ``nn.Linear`` whose function is the plain ``x W^T + b`` (Falcon's
    adds the bias outside ``F.linear``): the engine gets an ``nn.Linear`` with their parameters and
    the block gets its own class back."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    def to_linear(layer: nn.Module) -> nn.Linear:
        assert isinstance(layer, nn.Linear)
        linear = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, "meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        return linear

    def back(cls: type[nn.Linear]) -> Callable[[nn.Linear], nn.Module]:
        def from_linear(linear: nn.Linear) -> nn.Module:
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta")
            layer.weight, layer.bias = linear.weight, linear.bias
            return layer

        return from_linear

    return {cls: (to_linear, back(cls)) for cls in (FalconLinear,)}


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "Hugging Face models need transformers: pip install 'neuronmerge[hf]'"
        ) from exc


def _paths(spec: FFNSpec) -> tuple[str, ...]:
    optional = tuple(p for p in (spec.gate, spec.norm) if p)
    return (spec.up, spec.down, spec.act) + optional


def _fits(block: nn.Module, kind: BlockKind) -> bool:
    """Whether every MLP path of ``kind`` names a submodule of ``block``."""
    names = {name for name, _ in block.named_modules()}
    return all(path in names for path in _paths(kind.spec))


def _kind_of(block: nn.Module) -> BlockKind | None:
    """The row whose class list names ``block``'s class and whose paths all resolve in it, if any;
    a known class whose MLP is elsewhere (a variant this table lacks) is refused with the paths."""
    cls = type(block).__name__
    rows = [kind for kind in BLOCK_KINDS if cls in kind.classes]
    for kind in rows:
        if _fits(block, kind):
            return kind
    if rows:
        expected = " or ".join(f"({', '.join(_paths(k.spec))})" for k in rows)
        raise InvalidArgumentError(
            f"{cls}: its MLP is not where this adapter expects it: no submodules {expected}"
        )
    return None


def block_kind(model: nn.Module) -> tuple[BlockKind, list[tuple[str, nn.Module]]]:
    """The layout of ``model``'s blocks and the blocks in order; one clear error if none is known."""
    found: dict[BlockKind, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        kind = _kind_of(module)
        if kind is not None:
            found.setdefault(kind, []).append((name, module))
    if not found and (reason := _refusal(model)) is not None:
        raise InvalidArgumentError(f"{type(model).__name__}: {reason}")
    if len(found) != 1:
        known = ", ".join(dict.fromkeys(c for k in BLOCK_KINDS for c in k.classes))
        classes = sorted({type(m).__name__ for blocks in found.values() for _, m in blocks})
        what = "no transformer block" if not found else f"several block layouts {classes}"
        raise InvalidArgumentError(f"{type(model).__name__} has {what} this adapter knows ({known})")
    return next(iter(found.items()))


def _gained_bias(original: nn.Module, block: nn.Module, spec: FFNSpec) -> bool:
    """Whether a compressed MLP layer of ``block`` has a bias where ``original``'s has none."""
    paths = (spec.up, spec.down) + ((spec.gate,) if spec.gate else ())
    bias = lambda b, p: getattr(b.get_submodule(p), "bias", None) is not None  # noqa: E731
    return any(bias(block, p) and not bias(original, p) for p in paths)


def _check_rebuilds(small: nn.Module, kind: BlockKind) -> None:
    """Refuse a result that ``from_pretrained`` would not load: its class built from its new config
    (on the meta device: shapes only, no memory) must have exactly its parameters and shapes. This
    catches a width field also read outside the blocks (SigLIP's pooling head reads
    ``intermediate_size`` too), which would otherwise reload with mismatched or dropped weights."""
    with torch.device("meta"):
        fresh = type(small)(copy.deepcopy(small.config))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    wrong = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if wrong:
        raise InvalidArgumentError(
            f"{type(small).__name__}: its config ({kind.width_field}) would rebuild "
            f"{', '.join(f'{k} as {want.get(k)}' for k in wrong[:3])} where the compressed model "
            f"has {', '.join(str(have.get(k)) for k in wrong[:3])} (a module outside the "
            f"{'/'.join(kind.classes)} blocks reads the same field, or a layer changed in a way "
            "the config cannot state), so from_pretrained would not load it"
        )


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
    own normalisation applied to Gaussian noise; where ``down`` has no bias and the config no switch
    to give it one, the fit goes through the origin (``intercept=False``). The caller's model is not
    modified.
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
    down = originals[0][1].get_submodule(kind.spec.down)
    if method == "merge-ls" and kind.bias_field is None and getattr(down, "bias", None) is None:
        # the fit's constants would need a bias in down that the config cannot state (Qwen2, T5)
        options = {"intercept": False, **options}
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
    gained = [name for name, block in blocks if _gained_bias(originals[0][1], block, kind.spec)]
    if gained and kind.bias_field is None:
        raise InvalidArgumentError(
            f"{'/'.join(kind.classes)}: method {method!r} gave the MLP of {gained[0]} a bias that "
            "its config cannot state (no MLP bias switch), so from_pretrained would drop it; use "
            "method='merge' or 'prune'"
        )
    if kind.bias_field and any(has_bias(block, kind.spec) for _, block in blocks):
        for _, block in blocks:
            add_zero_biases(block, kind.spec)
        setattr(small.config, kind.bias_field, True)
    head_report = None
    if heads is not None and kind.attention is not None:
        head_report = compress_heads(blocks, kind.attention, small.config, heads, method != "prune")
    _check_rebuilds(small, kind)
    return PretrainedResult(small, reports, kind.width_field, width_before, width_after, head_report)
