"""Tiny Hugging Face causal language models built from configs (random weights, nothing downloaded),
shared by the in-memory and the streaming tests so that both compress the same models."""

from __future__ import annotations

import torch
import transformers as tf


def opt(layers: int = 2, hidden: int = 32, ffn: int = 64) -> tf.OPTForCausalLM:
    """OPT: ReLU MLP ``fc1``/``fc2`` with biases, in eval mode."""
    config = tf.OPTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=4,
        vocab_size=50,
        max_position_embeddings=32,
        word_embed_proj_dim=hidden,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.OPTForCausalLM(config).eval()


def llama() -> tf.LlamaForCausalLM:
    """LLaMA: gated SiLU MLP, 4 query heads over 2 key/value heads of width 8, in eval mode."""
    config = tf.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=50,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.LlamaForCausalLM(config).eval()


#: Shared sizes of the architecture-zoo builders below (tests/test_hf_zoo.py).
_LM = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 50,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def qwen2() -> tf.Qwen2ForCausalLM:
    """Qwen2: LLaMA's gated SiLU MLP, but no config switch for MLP biases."""
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_LM, num_key_value_heads=2)).eval()


def gemma2() -> tf.Gemma2ForCausalLM:
    """Gemma-2: gated tanh-GELU MLP read through ``pre_feedforward_layernorm``."""
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(**_LM, num_key_value_heads=2, head_dim=8)).eval()


def gpt_neox() -> tf.GPTNeoXForCausalLM:
    """GPT-NeoX (Pythia): ``dense_h_to_4h``/``dense_4h_to_h`` with biases, GELU, parallel residual."""
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_LM)).eval()


def gptj() -> tf.GPTJForCausalLM:
    """GPT-J: ``fc_in``/``fc_out``, width ``n_inner`` left at its default ``None`` (4 x 32)."""
    config = tf.GPTJConfig(
        n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=50, bos_token_id=0, eos_token_id=0
    )
    return tf.GPTJForCausalLM(config).eval()


def distilbert() -> tf.DistilBertModel:
    """DistilBERT: ``TransformerBlock`` with ``ffn.lin1``/``ffn.lin2``, width ``hidden_dim``."""
    config = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=50)
    return tf.DistilBertModel(config).eval()


def t5_encoder(gated: bool = False) -> tf.T5EncoderModel:
    """T5's encoder: bias-free ReLU MLP ``wi``/``wo`` (``gated``: ``wi_0``, ``wi_1`` with GELU)."""
    config = tf.T5Config(
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        vocab_size=50,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return tf.T5EncoderModel(config).eval()


def t5(gated: bool = False) -> tf.T5ForConditionalGeneration:
    """T5 encoder-decoder: its decoder blocks hold the MLP at ``layer.2`` (after cross-attention);
    three decoder blocks over two encoder blocks, both stacks of width ``d_ff``."""
    config = tf.T5Config(
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        vocab_size=50,
        decoder_start_token_id=0,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return tf.T5ForConditionalGeneration(config).eval()


def siglip_vision() -> tf.SiglipVisionModel:
    """SigLIP's vision tower: its pooling head has an MLP of width ``intermediate_size`` too."""
    config = tf.SiglipVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
    )
    return tf.SiglipVisionModel(config).eval()


def whisper_encoder() -> tf.WhisperForAudioClassification:
    """Whisper's encoder (audio classifier): ``fc1``/``fc2``, width ``encoder_ffn_dim``."""
    config = tf.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=8,
        vocab_size=50,
    )
    return tf.WhisperForAudioClassification(config).eval()


def falcon() -> tf.FalconForCausalLM:
    """Falcon: ``FalconLinear`` layers (an ``nn.Linear`` subclass), width ``ffn_hidden_size``."""
    config = tf.FalconConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=50,
        bias=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.FalconForCausalLM(config).eval()


def bart(
    encoder_ffn: int = 64, decoder_ffn: int = 48, activation: str = "relu"
) -> tf.BartForConditionalGeneration:
    """BART: post-norm encoder and decoder layers with ``fc1``/``fc2``, one width field per stack
    (``encoder_ffn_dim``, ``decoder_ffn_dim``; different here), ReLU so that merging is exact."""
    config = tf.BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=encoder_ffn,
        decoder_ffn_dim=decoder_ffn,
        activation_function=activation,
        vocab_size=50,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return tf.BartForConditionalGeneration(config).eval()


def phi3() -> tf.Phi3ForCausalLM:
    """Phi-3: gate and up fused in ``gate_up_proj`` (gate rows first), width ``intermediate_size``."""
    return tf.Phi3ForCausalLM(tf.Phi3Config(**_LM, num_key_value_heads=2, pad_token_id=1)).eval()


def plant_duplicates(
    up: torch.Tensor, bias: torch.Tensor | None = None, gate: torch.Tensor | None = None
) -> None:
    """Make the second half of an MLP's hidden neurons positive multiples of the first half, in place
    (``up``: the up weight's rows, ``bias`` its bias, ``gate`` the gate rows; views are fine).

    Plain MLPs: up rows and biases scaled by ``s`` in (0.25, 0.75), exact to merge through ReLU (a
    positively homogeneous activation). Gated MLPs: equal gate rows and up rows scaled by ``s``,
    exact through any activation. The kept half is then doubled so that it has the larger norms
    (the l1-norm criterion keeps it), which also makes pruning the other half inexact.
    """
    half = up.shape[0] // 2
    scale = torch.rand(half, 1) * 0.5 + 0.25
    with torch.no_grad():
        up[half:] = scale * up[:half]
        up[:half] *= 2
        if bias is not None:
            bias[half:] = scale[:, 0] * bias[:half]
            bias[:half] *= 2
        if gate is not None:
            gate[half:] = gate[:half]
