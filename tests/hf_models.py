"""Tiny Hugging Face causal language models built from configs (random weights, nothing downloaded),
shared by the in-memory and the streaming tests so that both compress the same models."""

from __future__ import annotations

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
