"""Hugging Face ``transformers`` models in, the same class out, with narrower MLPs.

``compress_pretrained(model, ratio)`` finds every transformer block by its class (one table row per
block layout, every class name that shares the layout in that row), compresses each block's MLP with
the engine through ``neuronmerge.ffn`` and writes the new width into the config field the row names
(``n_inner``, ``ffn_dim``, ``intermediate_size``, ``d_ff``...). A model may hold several layouts (an
encoder-decoder's two stacks); every block whose row names the same field keeps the same width (T5's
encoder and decoder share ``d_ff``; BART's have ``encoder_ffn_dim`` and ``decoder_ffn_dim``), so
``save_pretrained`` then plain ``AutoModel.from_pretrained`` (no neuronmerge needed) rebuilds it.

GPT-2's MLP layers are ``Conv1D``: ``x @ W + b`` with ``W`` stored as (in, out), the transpose of
``nn.Linear``. They are turned into Linears for the engine and back afterwards (``_spellings``).
Phi-3 computes gate and up in one ``gate_up_proj``; it is split in two and fused back
(``FFNSpec.fused``).

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
    mlp_widths,
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
#: fc1, fc2 and the activation, as BART's family names them.
_FC = ("fc1", "fc2", "activation_fn")
_T5 = ("T5Block", "MT5Block", "UMT5Block", "LongT5Block")


def _t5_mlp(layer: int, gated: bool) -> FFNSpec:
    """T5's feed-forward at ``layer.<layer>``: ``wi``, or ``wi_1`` gated by ``wi_0``."""
    ffn = f"layer.{layer}.DenseReluDense"
    return FFNSpec(
        f"{ffn}.wi_1" if gated else f"{ffn}.wi",
        f"{ffn}.wo",
        f"{ffn}.act",
        gate=f"{ffn}.wi_0" if gated else None,
        norm=f"layer.{layer}.layer_norm",
    )


#: Every supported block layout (paths relative to the block). A block matches a row when its class
#: is listed there and every MLP path resolves in it (a class with two MLP layouts, as T5's plain and
#: gated feed-forwards or its encoder and decoder blocks, has one row per layout). ``norm`` is what
#: the MLP reads: parallel blocks (GPT-J, Phi, Cohere) feed attention and MLP the same
#: ``input_layernorm``; post-norm blocks (OLMo-2) feed the MLP the raw residual stream (``None``).
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
    # Encoder-decoders of BART's family: fc1/fc2 in both stacks, each stack's width its own field.
    # Post-norm layers (BART, Marian...) feed the MLP the attention's normalised output; pre-norm
    # ones (mBART, Pegasus, Whisper...) normalise it with final_layer_norm first.
    BlockKind(
        (
            "BartEncoderLayer",
            "MarianEncoderLayer",
            "PLBartEncoderLayer",
            "BlenderbotSmallEncoderLayer",
            "LEDEncoderLayer",
            "MvpEncoderLayer",
        ),
        FFNSpec(*_FC, norm="self_attn_layer_norm"),
        "encoder_ffn_dim",
    ),
    BlockKind(
        (
            "BartDecoderLayer",
            "MarianDecoderLayer",
            "PLBartDecoderLayer",
            "BlenderbotSmallDecoderLayer",
            "LEDDecoderLayer",
            "MvpDecoderLayer",
        ),
        FFNSpec(*_FC, norm="encoder_attn_layer_norm"),
        "decoder_ffn_dim",
    ),
    BlockKind(
        (
            "MBartEncoderLayer",
            "PegasusEncoderLayer",
            "PegasusXEncoderLayer",
            "BigBirdPegasusEncoderLayer",
            "BlenderbotEncoderLayer",
            "M2M100EncoderLayer",
            "WhisperEncoderLayer",
            "Speech2TextEncoderLayer",
        ),
        FFNSpec(*_FC, norm="final_layer_norm"),
        "encoder_ffn_dim",
    ),
    BlockKind(
        (
            "MBartDecoderLayer",
            "PegasusDecoderLayer",
            "PegasusXDecoderLayer",
            "BigBirdPegasusDecoderLayer",
            "BlenderbotDecoderLayer",
            "M2M100DecoderLayer",
            "WhisperDecoderLayer",
            "Speech2TextDecoderLayer",
        ),
        FFNSpec(*_FC, norm="final_layer_norm"),
        "decoder_ffn_dim",
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
    # T5's feed-forward is the block's last sub-layer: layer.1 in the encoder, layer.2 in the decoder
    # (after cross-attention); both stacks' widths are the one d_ff.
    *(BlockKind(_T5, _t5_mlp(i, gated), "d_ff") for i in (1, 2) for gated in (False, True)),
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
    BlockKind(  # Phi-3, Phi-4-mini: gate and up fused in gate_up_proj (gate rows first)
        ("Phi3DecoderLayer",),
        FFNSpec(
            "mlp.gate_up_proj",
            "mlp.down_proj",
            "mlp.activation_fn",
            norm="post_attention_layernorm",
            fused=True,
        ),
        "intermediate_size",
    ),
)


#: Block layouts known and refused, by class, with the reason (a model with one of these and no
#: supported block gets this reason instead of "no known block"). Mixture-of-experts blocks in
#: general are recognised by their ``experts`` submodule (``_refusal``).
UNSUPPORTED: dict[str, str] = {
    "AlbertLayer": "ALBERT shares one layer's weights across all layers, so the MLP width is not "
    "a per-layer choice and merging one shared MLP for every depth is not supported",
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
    """Whether ``model`` predicts next tokens from tokens alone (a ``...ForCausalLM`` head), so it
    can write probes; an encoder-decoder's decoder also needs the encoder's input, which a data-free
    run does not have."""
    can = getattr(model, "can_generate", None)
    if not callable(can) or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return bool(can())


def _start_token(config: Any) -> int | None:
    """The config's beginning-of-sequence token when it has a valid one (else a random start)."""
    bos = getattr(config, "bos_token_id", None)
    return bos if isinstance(bos, int) and 0 <= bos < config.vocab_size else None


@dataclass(frozen=True)
class PretrainedResult:
    """The compressed model (same class as the input) and one report per block."""

    model: nn.Module
    blocks: tuple[BlockReport, ...]
    #: Per config width field (one per stack: an encoder-decoder may have two), the MLP width
    #: before and after, in the order the model holds the stacks.
    widths: dict[str, tuple[int, int]]
    #: Attention heads before and after, when ``heads=`` was given.
    heads: HeadReport | None = None

    @property
    def width_field(self) -> str:
        """The first stack's width field (the only one of a decoder-only or encoder-only model)."""
        return next(iter(self.widths))

    @property
    def width_before(self) -> int:
        return self.widths[self.width_field][0]

    @property
    def width_after(self) -> int:
        return self.widths[self.width_field][1]


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


#: One layout's blocks in a model: its row and its blocks (path, module) in order.
KindBlocks = tuple[BlockKind, list[tuple[str, nn.Module]]]


def block_kinds(model: nn.Module) -> list[KindBlocks]:
    """Every layout among ``model``'s blocks with its blocks in order (an encoder-decoder has one per
    stack, a decoder-only model one); one clear error if none is known."""
    found: dict[BlockKind, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        kind = _kind_of(module)
        if kind is not None:
            found.setdefault(kind, []).append((name, module))
    if not found and (reason := _refusal(model)) is not None:
        raise InvalidArgumentError(f"{type(model).__name__}: {reason}")
    if not found:
        known = ", ".join(dict.fromkeys(c for k in BLOCK_KINDS for c in k.classes))
        raise InvalidArgumentError(
            f"{type(model).__name__} has no transformer block this adapter knows ({known})"
        )
    return list(found.items())


def _stack_widths(layouts: list[KindBlocks]) -> dict[str, tuple[int, int]]:
    """Per config width field (a stack: every block whose row writes it), the MLP width and the
    parameters one hidden neuron costs over all its blocks (``ffn.mlp_widths``); one field states
    one width, so its blocks must agree (T5's encoder and decoder share ``d_ff``)."""
    stacks: dict[str, tuple[int, int]] = {}
    for kind, blocks in layouts:
        first = lift(blocks[0][1], kind.spec, _spellings())  # the caller's layers, only read
        width, cost = first.up.out_features, neuron_cost(first) * len(blocks)
        seen, total = stacks.get(kind.width_field, (width, 0))
        if seen != width:
            raise InvalidArgumentError(
                f"{kind.width_field} is one width, but {blocks[0][0]}'s MLP has {width} neurons "
                f"where other blocks have {seen}"
            )
        stacks[kind.width_field] = (width, total + cost)
    return stacks


def _gained_bias(original: nn.Module, block: nn.Module, spec: FFNSpec) -> bool:
    """Whether a compressed MLP layer of ``block`` has a bias where ``original``'s has none."""
    paths = (spec.up, spec.down) + ((spec.gate,) if spec.gate else ())
    bias = lambda b, p: getattr(b.get_submodule(p), "bias", None) is not None  # noqa: E731
    return any(bias(block, p) and not bias(original, p) for p in paths)


def _classes(kinds: list[BlockKind]) -> str:
    return "/".join(dict.fromkeys(c for kind in kinds for c in kind.classes))


def _check_rebuilds(small: nn.Module, kinds: list[BlockKind]) -> None:
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
        fields = ", ".join(dict.fromkeys(kind.width_field for kind in kinds))
        raise InvalidArgumentError(
            f"{type(small).__name__}: its config ({fields}) would rebuild "
            f"{', '.join(f'{k} as {want.get(k)}' for k in wrong[:3])} where the compressed model "
            f"has {', '.join(str(have.get(k)) for k in wrong[:3])} (a module outside the "
            f"{_classes(kinds)} blocks reads the same field, or a layer changed in a way "
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
    0.5), or to the MLP widths whose parameter count is closest to ``target_params`` (a fraction
    of the model kept, or a count; ``ffn.mlp_widths``); ``round_to=N`` keeps widths multiples of N.
    Each config width field is one stack whose blocks keep one width: an encoder-decoder with
    ``encoder_ffn_dim`` and ``decoder_ffn_dim`` has two, narrowed by the same fraction; T5's two
    stacks share ``d_ff``, so they are one.
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
    layouts = block_kinds(model)
    kinds = [kind for kind, _ in layouts]
    head_spec = None if heads is None else _attention(kinds)
    if heads is not None and head_spec is not None:
        kept_groups(model.config, head_spec, heads)  # a bad value fails before any work
    stacks = _stack_widths(layouts)
    kept = dict(
        zip(
            stacks,
            mlp_widths(
                list(stacks.values()),
                ratio=0.5 if ratio is None and target_params is None else ratio,
                target_params=target_params,
                round_to=round_to,
                total=sum(p.numel() for p in model.parameters()),
            ),
            strict=True,
        )
    )
    small = copy.deepcopy(model).eval()
    small_layouts = block_kinds(small)
    ffn_options = {
        kind: FFNOptions(
            1 - kept[kind.width_field] / stacks[kind.width_field][0],
            method=method,
            extra=_least_squares_options(kind, blocks[0][1], method, options),
        )
        for kind, blocks in layouts
    }
    inputs: dict[str, torch.Tensor] = {}
    if method == "merge-ls" and "calibration" not in options and _can_generate(small):
        config: Any = small.config
        length = min(PROBE_LENGTH, getattr(config, "max_position_embeddings", PROBE_LENGTH))
        first = ffn_options[kinds[0]]
        tokens = sample_tokens(
            small,
            config.vocab_size,
            count=max(1, first.probes // length),
            length=length,
            seed=first.seed,
            first=_start_token(config),
        )
        for kind, blocks in small_layouts:
            inputs.update(mlp_inputs(small, blocks, kind.spec, tokens))
    reports: list[BlockReport] = []
    after: dict[str, set[int]] = {}
    for kind, blocks in small_layouts:
        done = compress_ffns(blocks, kind.spec, ffn_options[kind], _spellings(), inputs)
        reports += done
        after.setdefault(kind.width_field, set()).update(r.width_after for r in done)
    for field, ended in after.items():
        if len(ended) > 1:  # every block of a stack was asked for the same width
            raise InvalidArgumentError(
                f"blocks of {field} ended at different MLP widths {sorted(ended)}"
            )
        setattr(small.config, field, ended.pop())
    _settle_biases(layouts, small_layouts, small.config, method)
    head_report = None
    if heads is not None and head_spec is not None:
        blocks = [block for _, stack in small_layouts for block in stack]
        head_report = compress_heads(blocks, head_spec, small.config, heads, method != "prune")
    _check_rebuilds(small, kinds)
    widths = {field: (width, getattr(small.config, field)) for field, (width, _) in stacks.items()}
    return PretrainedResult(small, tuple(reports), widths, head_report)


def _attention(kinds: list[BlockKind]) -> AttentionSpec:
    """The one attention layout of every block, for ``heads=``; refused where a config cannot state
    fewer heads (no row gives one) or where stacks differ (their head counts are separate fields)."""
    specs = {kind.attention for kind in kinds}
    spec = specs.pop()
    if spec is None or specs:
        raise InvalidArgumentError(
            f"{_classes(kinds)}: the config derives each head's width from hidden_size and the "
            "head count, so a model with fewer heads would not reload; heads= needs a config with "
            "head_dim (LLaMA-style)"
        )
    return spec


def _least_squares_options(
    kind: BlockKind, block: nn.Module, method: str, options: dict[str, Any]
) -> dict[str, Any]:
    """``options`` for ``kind``'s blocks: ``merge-ls`` fits through the origin where the fit's
    constants would need a bias in ``down`` that the config cannot state (Qwen2, T5)."""
    down = block.get_submodule(kind.spec.down)
    if method == "merge-ls" and kind.bias_field is None and getattr(down, "bias", None) is None:
        return {"intercept": False, **options}
    return dict(options)


def _settle_biases(
    originals: list[KindBlocks], compressed: list[KindBlocks], config: Any, method: str
) -> None:
    """Refuse an MLP bias the config cannot state; where a config switch states them for all MLP
    layers (LLaMA's ``mlp_bias``) and one layer gained one, give every layer under it a zero bias."""
    switched: set[str] = set()
    for (kind, before), (_, blocks) in zip(originals, compressed, strict=True):
        gained = [name for name, block in blocks if _gained_bias(before[0][1], block, kind.spec)]
        if gained and kind.bias_field is None:
            raise InvalidArgumentError(
                f"{'/'.join(kind.classes)}: method {method!r} gave the MLP of {gained[0]} a bias "
                "that its config cannot state (no MLP bias switch), so from_pretrained would drop "
                "it; use method='merge' or 'prune'"
            )
        if kind.bias_field and any(has_bias(block, kind.spec) for _, block in blocks):
            switched.add(kind.bias_field)
    for kind, blocks in compressed:
        if kind.bias_field in switched:
            for _, block in blocks:
                add_zero_biases(block, kind.spec)
    for field in switched:
        setattr(config, field, True)
