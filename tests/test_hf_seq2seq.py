"""Encoder-decoders and Phi-3 through ``hf.compress_pretrained`` (tiny configs, random weights, nothing
downloaded): T5's decoder blocks (the MLP after cross-attention, both stacks in one ``d_ff``), BART's
family (one width field per stack) and Phi-3's fused ``gate_up_proj``. Planted duplicate neurons
merge with no output change, plain transformers reloads the saved result, the config's width fields
say the new widths, and a layout the table lacks is refused with its reason."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

from neuronmerge import hf
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.ffn import FFNSpec
from neuronmerge.hf import block_kinds, compress_pretrained
from tests import hf_models as zoo

IDS = torch.randint(3, 50, (2, 8), generator=torch.Generator().manual_seed(0))
AUDIO = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))


def _out(model: nn.Module) -> torch.Tensor:
    """Logits (or last hidden states) of an encoder-decoder on fixed inputs, or of a decoder."""
    with torch.no_grad():
        if not model.config.is_encoder_decoder:
            return model(IDS)[0]
        source = {"input_ids": IDS, "input_features": AUDIO}[model.main_input_name]
        return model(source, decoder_input_ids=IDS[:, :5])[0]


def _same_after_reload(small: nn.Module, tmp_path: Path) -> None:
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()  # plain transformers, no neuronmerge
    assert torch.allclose(_out(reloaded), _out(small), atol=1e-6)


def _untouched(model: nn.Module) -> Callable[[], bool]:
    before = copy.deepcopy(model.state_dict())
    return lambda: all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_t5_decoder_blocks_merge_planted_duplicates_exactly_and_reload(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.t5()
    for block in model.encoder.block:  # encoder: feed-forward at layer.1
        zoo.plant_duplicates(block.layer[1].DenseReluDense.wi.weight)
    for block in model.decoder.block:  # decoder: layer.1 is cross-attention, feed-forward at layer.2
        zoo.plant_duplicates(block.layer[2].DenseReluDense.wi.weight)
    untouched = _untouched(model)
    result = compress_pretrained(model, 0.5)
    small = result.model
    assert result.widths == {"d_ff": (64, 32)} and small.config.d_ff == 32
    assert [b.block for b in result.blocks] == [
        *(f"encoder.block.{i}" for i in range(2)),
        *(f"decoder.block.{i}" for i in range(3)),
    ]
    assert all(b.width_after == 32 and b.report.sites[0].merged == 32 for b in result.blocks)
    assert small.decoder.block[2].layer[2].DenseReluDense.wi.out_features == 32
    assert torch.allclose(_out(small), _out(model), atol=1e-5)
    pruned = compress_pretrained(model, 0.5, method="prune").model
    assert not torch.allclose(_out(pruned), _out(model), atol=1e-3)
    _same_after_reload(small, tmp_path)
    assert untouched()


def test_gated_t5_merge_ls_fits_both_stacks_on_noise_and_reloads(monkeypatch, tmp_path: Path) -> None:
    # an encoder-decoder cannot write probes from tokens alone: each block's norm of noise instead
    monkeypatch.setattr(hf, "sample_tokens", lambda *a, **k: pytest.fail("needs encoder input"))
    torch.manual_seed(0)
    model = zoo.t5(gated=True)
    result = compress_pretrained(model, 0.25, method="merge-ls")
    small = result.model
    assert small.config.d_ff == 48 and len(result.blocks) == 5
    assert small.decoder.block[0].layer[2].DenseReluDense.wi_0.out_features == 48
    assert all(b.layer[-1].DenseReluDense.wo.bias is None for b in small.decoder.block)
    error = (_out(small) - _out(model)).norm() / _out(model).norm()
    assert error < 0.5
    _same_after_reload(small, tmp_path)


def test_bart_stacks_keep_their_own_widths_and_merge_planted_duplicates_exactly(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = zoo.bart(encoder_ffn=64, decoder_ffn=48)
    for layer in (*model.model.encoder.layers, *model.model.decoder.layers):
        zoo.plant_duplicates(layer.fc1.weight, layer.fc1.bias)
    untouched = _untouched(model)
    result = compress_pretrained(model, 0.5)
    small = result.model
    assert result.widths == {"encoder_ffn_dim": (64, 32), "decoder_ffn_dim": (48, 24)}
    assert (small.config.encoder_ffn_dim, small.config.decoder_ffn_dim) == (32, 24)
    assert [b.width_after for b in result.blocks] == [32, 32, 24, 24]
    assert all(2 * b.report.sites[0].merged == b.width_before for b in result.blocks)
    assert torch.allclose(_out(small), _out(model), atol=1e-5)
    pruned = compress_pretrained(model, 0.5, method="prune").model
    assert not torch.allclose(_out(pruned), _out(model), atol=1e-3)
    _same_after_reload(small, tmp_path)
    assert untouched()


def test_a_parameter_target_narrows_both_stacks_by_the_same_fraction() -> None:
    torch.manual_seed(0)
    model = zoo.bart(encoder_ffn=64, decoder_ffn=128)
    total = sum(p.numel() for p in model.parameters())
    result = compress_pretrained(model, target_params=0.8, method="prune")
    kept = sum(p.numel() for p in result.model.parameters())
    assert abs(kept - 0.8 * total) <= 0.01 * total
    (enc_before, enc_after), (dec_before, dec_after) = result.widths.values()
    assert abs(enc_after / enc_before - dec_after / dec_before) <= 1 / 64
    rounded = compress_pretrained(model, target_params=0.8, round_to=16, method="prune")
    assert all(after % 16 == 0 for _, after in rounded.widths.values())
    with pytest.raises(InvalidArgumentError, match=r"width 64, 128\) reaches [\d,]+ \(width 1, 1\)"):
        compress_pretrained(model, target_params=0.01)


def _seq2seq(model_cls: str, config_cls: str, **extra: object) -> Callable[[], nn.Module]:
    sizes = {
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 48,
        "vocab_size": 50,
        "pad_token_id": 1,
        "decoder_start_token_id": 2,
    }
    return lambda: getattr(tf, model_cls)(getattr(tf, config_cls)(**sizes, **extra)).eval()


@pytest.mark.parametrize(
    "build",
    [
        _seq2seq("MBartForConditionalGeneration", "MBartConfig"),  # pre-norm
        _seq2seq("MarianMTModel", "MarianConfig"),  # post-norm, SiLU
        _seq2seq("PegasusForConditionalGeneration", "PegasusConfig"),
        _seq2seq("PLBartForConditionalGeneration", "PLBartConfig"),
        _seq2seq("BlenderbotForConditionalGeneration", "BlenderbotConfig"),
        _seq2seq("BlenderbotSmallForConditionalGeneration", "BlenderbotSmallConfig"),
        _seq2seq("M2M100ForConditionalGeneration", "M2M100Config"),
        _seq2seq(
            "WhisperForConditionalGeneration",
            "WhisperConfig",
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
        ),
    ],
    ids=["mbart", "marian", "pegasus", "plbart", "blenderbot", "blenderbot-small", "m2m100", "whisper"],
)
def test_bart_family_layouts_come_back_as_the_same_class_and_reload(
    build: Callable[[], nn.Module], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build()
    untouched = _untouched(model)
    result = compress_pretrained(model, 0.5, method="merge-ls")
    small = result.model
    assert type(small) is type(model) and len(result.blocks) == 4
    assert result.widths == {"encoder_ffn_dim": (64, 32), "decoder_ffn_dim": (48, 24)}
    assert (small.config.encoder_ffn_dim, small.config.decoder_ffn_dim) == (32, 24)
    error = (_out(small) - _out(model)).norm() / _out(model).norm()
    assert error < 0.5
    _same_after_reload(small, tmp_path)
    assert untouched()


def test_phi3_fused_gate_up_merges_planted_duplicates_exactly_and_reloads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.phi3()
    for layer in model.model.layers:
        fused = layer.mlp.gate_up_proj.weight  # rows [0, 64) gate, [64, 128) up
        zoo.plant_duplicates(fused[64:], gate=fused[:64])
    untouched = _untouched(model)
    result = compress_pretrained(model, 0.5)
    small = result.model
    assert result.widths == {"intermediate_size": (64, 32)} and small.config.intermediate_size == 32
    mlp = small.model.layers[0].mlp
    assert (mlp.gate_up_proj.out_features, mlp.down_proj.in_features) == (64, 32)
    assert all(b.report.sites[0].merged == 32 for b in result.blocks)
    assert torch.allclose(_out(small), _out(model), atol=1e-5)
    # neuron i is rows i and 64 + i: the kept gate rows are the first 32, the kept up rows the
    # (doubled) first 32 of the up half
    original = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(mlp.gate_up_proj.weight[:32], original[:32])
    assert torch.equal(mlp.gate_up_proj.weight[32:], original[64:96])
    pruned = compress_pretrained(model, 0.5, method="prune").model
    assert not torch.allclose(_out(pruned), _out(model), atol=1e-3)
    _same_after_reload(small, tmp_path)
    assert untouched()


def test_phi3_merge_ls_fits_on_its_own_samples_through_the_origin(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.phi3()
    result = compress_pretrained(model, 0.5, method="merge-ls")
    small = result.model
    assert small.config.intermediate_size == 32
    assert all(layer.mlp.gate_up_proj.bias is None for layer in small.model.layers)
    error = (_out(small) - _out(model)).norm() / _out(model).norm()
    assert error < 0.5
    _same_after_reload(small, tmp_path)


def test_a_t5_block_whose_mlp_is_elsewhere_is_refused_with_the_paths() -> None:
    model = zoo.t5()
    for block in model.decoder.block:  # a variant the table lacks: the feed-forward renamed
        ffn = block.layer[2]
        ffn.mlp = ffn.DenseReluDense
        del ffn.DenseReluDense
    untouched = _untouched(model)
    with pytest.raises(
        InvalidArgumentError,
        match=r"T5Block: its MLP is not where this adapter expects it: no submodules "
        r"\(layer.1.DenseReluDense.wi, .*layer.2.DenseReluDense.wi",
    ):
        compress_pretrained(model, 0.5)
    assert untouched()


def test_each_stack_is_one_layout_in_model_order() -> None:
    layouts = block_kinds(zoo.bart())
    assert [kind.width_field for kind, _ in layouts] == ["encoder_ffn_dim", "decoder_ffn_dim"]
    assert [name for _, blocks in layouts for name, _ in blocks] == [
        "model.encoder.layers.0",
        "model.encoder.layers.1",
        "model.decoder.layers.0",
        "model.decoder.layers.1",
    ]


def test_a_fused_layout_names_no_separate_gate() -> None:
    with pytest.raises(InvalidArgumentError, match="holds the gate rows itself"):
        FFNSpec("mlp.gate_up_proj", "mlp.down_proj", "mlp.act", gate="mlp.gate_proj", fused=True)
