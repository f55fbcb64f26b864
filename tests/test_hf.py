"""Hugging Face models (tiny configs, random weights, nothing downloaded): same class out, reloadable."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers as tf

from neuronmerge import hf
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.ffn import FFNOptions, compress_ffns, mlp_inputs
from neuronmerge.hf import block_kinds, compress_pretrained
from tests.hf_models import llama, opt, plant_duplicates

IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32}


def _gpt2() -> torch.nn.Module:
    config = tf.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return tf.GPT2LMHeadModel(config)


def _bert() -> torch.nn.Module:
    return tf.BertModel(tf.BertConfig(**SMALL, intermediate_size=64, vocab_size=50))


def _vit() -> torch.nn.Module:
    return tf.ViTModel(tf.ViTConfig(**SMALL, intermediate_size=64, image_size=16, patch_size=8))


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, tf.ViTModel):
            return model(pixel_values=PIXELS)[0]
        return model(IDS)[0]


@pytest.mark.parametrize(
    ("build", "field", "before", "options"),
    [
        (_gpt2, "n_inner", 128, {"approximate": True}),  # GELU (tanh), Conv1D layers
        (opt, "ffn_dim", 64, {}),  # ReLU: exact merging applies
        (_bert, "intermediate_size", 64, {"approximate": True}),
        (_vit, "intermediate_size", 64, {"approximate": True}),
        (llama, "intermediate_size", 64, {}),  # gated SiLU MLP: gate and up rows as one group
    ],
)
@pytest.mark.parametrize("method", ["merge", "merge-ls"])
def test_same_class_out_and_plain_transformers_reloads_it(
    build, field, before, options, method, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build().eval()
    original = copy.deepcopy(model.state_dict())
    result = compress_pretrained(model, 0.5, method=method, **options)
    small = result.model
    assert type(small) is type(model)
    assert (result.width_before, result.width_after) == (before, before // 2)
    assert getattr(small.config, field) == before // 2
    assert all(b.width_after == before // 2 for b in result.blocks) and len(result.blocks) == 2
    small.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()  # plain transformers, no neuronmerge
    assert torch.allclose(_out(reloaded), _out(small), atol=1e-6)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # the caller's model is untouched
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    # a compressed model still computes something close to the original on random weights
    error = (_out(small) - _out(model)).norm() / _out(model).norm()
    assert error < 0.5


def test_opt_relu_planted_duplicates_merge_exactly() -> None:
    torch.manual_seed(0)
    model = opt().eval()
    for layer in model.model.decoder.layers:
        # neurons 32..63 are positive multiples of neurons 0..31 (weights and biases)
        plant_duplicates(layer.fc1.weight, layer.fc1.bias)
    result = compress_pretrained(model, 0.5, method="merge")
    assert result.width_after == 32
    assert all(b.report.sites[0].merged == 32 for b in result.blocks)
    assert torch.allclose(_out(result.model), _out(model), atol=1e-5)
    pruned = compress_pretrained(model, 0.5, method="prune").model
    assert not torch.allclose(_out(pruned), _out(model), atol=1e-2)


def test_gelu_without_approximate_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidArgumentError, match="not positively homogeneous"):
        compress_pretrained(_bert().eval(), 0.5)


def test_llama_gated_planted_duplicates_merge_exactly() -> None:
    # neuron i equals s * neuron j when gate rows are equal and up row i = s * up row j (any act)
    torch.manual_seed(0)
    model = llama().eval()
    for layer in model.model.layers:
        plant_duplicates(layer.mlp.up_proj.weight, gate=layer.mlp.gate_proj.weight)
    result = compress_pretrained(model, 0.5, method="merge")
    assert result.model.config.intermediate_size == 32
    assert torch.allclose(_out(result.model), _out(model), atol=1e-5)
    pruned = compress_pretrained(model, 0.5, method="prune").model
    assert not torch.allclose(_out(pruned), _out(model), atol=1e-3)


def test_a_model_without_known_blocks_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="no transformer block"):
        compress_pretrained(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.5)


def _compressed_blocks(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None) -> dict:
    """``model``'s parameters after compress_ffns at 0.5 with merge-ls on ``inputs`` (None: noise)."""
    twin = copy.deepcopy(model)
    ((kind, blocks),) = block_kinds(twin)
    compress_ffns(blocks, kind.spec, FFNOptions(0.5, "merge-ls"), hf._spellings(), inputs)
    return dict(twin.named_parameters())


def test_merge_ls_on_a_causal_lm_fits_on_text_the_model_wrote(monkeypatch) -> None:
    """merge-ls on a model that can generate fits each MLP on what it reads on self-sampled text:
    the same fit as compress_ffns given those inputs, and not the fit on normalised noise."""
    torch.manual_seed(0)
    model = opt().eval()
    seen: list[torch.Tensor] = []
    sample = hf.sample_tokens

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(sample(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(hf, "sample_tokens", spy)
    result = dict(compress_pretrained(model, 0.5, method="merge-ls").model.named_parameters())
    (tokens,) = seen
    assert tokens.shape == (2048 // 32, 32)  # probe tokens in sequences of the context length
    assert tokens[:, 0].eq(0).all() and tokens.max() < 50  # the config's start token, in vocab
    ((kind, blocks),) = block_kinds(model)
    inputs = mlp_inputs(model, blocks, kind.spec, tokens)
    assert all(x.shape == (tokens.numel(), 32) for x in inputs.values())
    fitted, noise = _compressed_blocks(model, inputs), _compressed_blocks(model, None)
    assert all(torch.allclose(result[name], value) for name, value in fitted.items())
    down = "model.decoder.layers.0.fc2.weight"
    assert not torch.allclose(result[down], noise[down], atol=1e-4)


def test_models_that_cannot_generate_keep_noise_probes(monkeypatch) -> None:
    monkeypatch.setattr(hf, "sample_tokens", lambda *a, **k: pytest.fail("BERT cannot generate"))
    torch.manual_seed(0)
    model = _bert().eval()
    result = dict(
        compress_pretrained(model, 0.5, method="merge-ls", approximate=True).model.named_parameters()
    )
    assert result.keys() == _compressed_blocks(model, None).keys()


@pytest.mark.parametrize(("build", "field"), [(llama, "intermediate_size"), (_gpt2, "n_inner")])
def test_a_parameter_target_lands_within_one_percent_and_round_to_holds(build, field) -> None:
    torch.manual_seed(0)
    model = build().eval()
    total = sum(p.numel() for p in model.parameters())
    result = compress_pretrained(model, target_params=0.8, approximate=True)
    kept = sum(p.numel() for p in result.model.parameters())
    assert abs(kept - 0.8 * total) <= 0.01 * total
    assert getattr(result.model.config, field) == result.width_after < result.width_before
    count = compress_pretrained(model, target_params=kept, approximate=True)  # an absolute count
    assert count.width_after == result.width_after
    rounded = compress_pretrained(model, target_params=0.8, round_to=8, approximate=True)
    assert rounded.width_after % 8 == 0 and abs(rounded.width_after - result.width_after) <= 4


def test_an_unreachable_parameter_target_names_the_range_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = llama().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match=r"out of reach: .* reaches [\d,]+ \(width 1\)"):
        compress_pretrained(model, target_params=0.01)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        compress_pretrained(model, 0.5, target_params=0.8)
    with pytest.raises(InvalidArgumentError, match="round_to must be a positive integer"):
        compress_pretrained(model, 0.5, round_to=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _llama_with_duplicate_heads() -> torch.nn.Module:
    """LLaMA with 4 query heads over 2 key/value groups, group 1 planted as 0.5 x group 0."""
    torch.manual_seed(0)
    model = llama().eval()
    width = 32 // 4
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight[2 * width :] = attn.q_proj.weight[: 2 * width]  # same queries...
            attn.k_proj.weight[width:] = attn.k_proj.weight[:width]  # ...and keys
            attn.v_proj.weight[width:] = 0.5 * attn.v_proj.weight[:width]
    return model


def test_llama_planted_duplicate_heads_merge_exactly_and_reload(tmp_path: Path) -> None:
    model = _llama_with_duplicate_heads()
    result = compress_pretrained(model, 0.0, heads=0.5)
    small = result.model
    assert result.heads is not None and result.heads.merged == 2  # one per layer
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    assert small.model.layers[0].self_attn.q_proj.out_features == 2 * 8
    assert torch.allclose(_out(small), _out(model), atol=1e-5)  # merged: no change
    pruned = compress_pretrained(model, 0.0, method="prune", heads=0.5).model
    assert not torch.allclose(_out(pruned), _out(model), atol=1e-3)  # pruning the duplicate is not free
    small.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()  # plain transformers
    assert torch.allclose(_out(reloaded), _out(small), atol=1e-6)


def test_heads_are_refused_where_the_config_cannot_state_them() -> None:
    with pytest.raises(InvalidArgumentError, match="head_dim"):
        compress_pretrained(_gpt2(), 0.5, heads=0.5, approximate=True)
    model = llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match="leaves no key/value head"):
        compress_pretrained(model, 0.5, heads=0.75)
    assert model.config.num_key_value_heads == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
