"""Attention in the channel groups: a ViT-like stream through nn.MultiheadAttention, heads as groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge.attention import head_layout
from neuronmerge.lab.gpt import GPT, GPTConfig
from tests.builders import (
    AttentionChain,
    TinyViT,
    compress_announced,
    duplicated_attention_chain,
    tiny_vit_params,
)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("batch_first", [True, False])
def test_vit_stream_and_mlps_shrink_with_the_output_shape_kept(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = TinyViT(batch_first=batch_first).eval()
    images = torch.randn(2, 3, 16, 16)
    before = _state(model)
    result = nm.compress(model, images, 0.5, method="prune", approximate=True, exclude=["head"])
    assert result.model(images).shape == (2, 5)
    assert result.report.params_before == tiny_vit_params(24, 4)
    assert result.report.params_after == tiny_vit_params(12, 4)
    assert _same(model, before)
    attention = result.model.get_submodule("blocks.0.attention")
    assert isinstance(attention, nn.MultiheadAttention)
    # 12 of 24 dims in heads of 6: two whole heads survive.
    assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (12, 2, 6)


def test_vit_plan_names_the_stream_prune_only_because_of_layernorm() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    plan = nm.plan(model, torch.randn(2, 3, 16, 16), approximate=True)
    stream = next(g for g in plan.sites if "conv_proj" in g.producers)
    assert stream.mode == "prune-only"
    assert "blocks.0.ln_1 (LayerNorm), which normalises across them" in stream.why
    assert stream.attention == ("blocks.0.attention", "blocks.1.attention")
    assert "blocks.0.attention.out_proj" in stream.producers
    assert {p.name for p in stream.params} >= {"class_token", "pos_embedding", "*"}
    text = str(plan)
    assert "prune-only conv_proj + blocks.0.attention.out_proj" in text
    assert "which normalises across them: prune only" in text
    assert "never called as a layer" not in text
    # Without approximate=True merging refuses the stream, with the same reason.
    strict = nm.plan(model, torch.randn(2, 3, 16, 16))
    assert any("LayerNorm" in s.reason for s in strict.skipped if s.producer == "conv_proj")


def test_narrower_heads_when_the_kept_width_is_no_multiple_of_the_head_width() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    images = torch.randn(2, 3, 16, 16)
    result = nm.compress(model, images, 2 / 3, method="prune", approximate=True, exclude=["head"])
    attention = result.model.get_submodule("blocks.1.attention")
    assert isinstance(attention, nn.MultiheadAttention)
    assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (8, 4, 2)
    assert result.model(images).shape == (2, 5)
    assert result.report.params_after == tiny_vit_params(8, 4)


def test_head_layout_couples_the_kept_width_to_whole_or_narrower_heads() -> None:
    assert head_layout(768, 12, 384) == (6, 64)  # whole heads where the width allows
    assert head_layout(24, 4, 8) == (4, 2)  # else every head narrower
    assert head_layout(16, 4, 6) == (3, 2)  # else fewer heads, the most that divide the width
    with pytest.raises(ValueError, match="7 dims cannot be split"):
        head_layout(16, 4, 7)
    # The kept count itself is a multiple of the head count, so a layout always exists.
    model = AttentionChain().eval()
    plan = nm.plan(model, torch.randn(2, 5, 10))
    (group,) = plan.sites
    assert group.multiple == 4
    result = nm.compress(model, torch.randn(2, 5, 10), 0.3, method="prune")
    assert result.report.sites[0].kept == 12  # round(16 * 0.7) = 11, snapped to a multiple of 4


def test_duplicate_heads_and_channels_merge_exactly_through_multihead_attention() -> None:
    model = duplicated_attention_chain(seed=3)
    x = torch.randn(4, 7, 10, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
    plan = nm.plan(model, x)
    (group,) = plan.sites
    assert group.mode == "exact" and group.producers == ("fc_in", "attention.out_proj")
    merged = nm.compress(model, x, 0.25, method="merge")
    pruned = nm.compress(model, x, 0.25, method="prune")
    with torch.no_grad():
        assert _relative(merged.model(x), reference) < 1e-10
        assert _relative(pruned.model(x), reference) > 1e-2
    attention = merged.model.get_submodule("attention")
    assert isinstance(attention, nn.MultiheadAttention)
    assert (attention.embed_dim, attention.num_heads) == (12, 3)
    # fc_in 12 x 10 + 12, in_proj 36 x 12 + 36, out_proj 12 x 12 + 12, fc_out 6 x 12 + 6.
    assert merged.report.params_after == 132 + 468 + 156 + 78


def test_cross_attention_with_separate_projections_keeps_its_key_and_value_width() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc_in = nn.Linear(10, 16)
            self.attention = nn.MultiheadAttention(16, 4, kdim=7, vdim=7)
            self.fc_out = nn.Linear(16, 6)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.fc_out(self.attention(self.fc_in(x), memory, memory)[0])

    torch.manual_seed(0)
    model = Cross().eval()
    inputs = (torch.randn(5, 2, 10), torch.randn(9, 2, 7))  # sequence first
    result = nm.compress(model, inputs, 0.5, method="merge")
    assert result.model(*inputs).shape == (5, 2, 6)
    attention = result.model.get_submodule("attention")
    assert isinstance(attention, nn.MultiheadAttention)
    assert attention.q_proj_weight.shape == (8, 8) and attention.k_proj_weight.shape == (8, 7)
    # fc_in 88, q 64 + k 56 + v 56 + bias 24, out_proj 72, fc_out 54.
    assert result.report.params_after == 88 + 200 + 72 + 54


def _gpt_with_duplicate_heads() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, mlp_width=64)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
        for block in model.blocks:
            attn = block.attn
            for layer, factor in ((attn.q, 1.0), (attn.k, 1.0), (attn.v, 0.6)):
                layer.weight[:16] = factor * layer.weight[16:]
                layer.bias[:16] = factor * layer.bias[16:]
    return model


def test_gpt_heads_are_groups_and_duplicate_heads_merge_exactly() -> None:
    model = _gpt_with_duplicate_heads()
    tokens = torch.randint(0, 256, (2, 16))
    plan = nm.plan(model, tokens)
    heads = [g for g in plan.sites if g.pattern == "heads"]
    assert [g.producers for g in heads] == [
        (f"blocks.{i}.attn.q", f"blocks.{i}.attn.k", f"blocks.{i}.attn.v") for i in range(2)
    ]
    assert all(g.mode == "exact" and g.channels == 2 and g.row_blocks == (16, 16, 16) for g in heads)
    assert (
        "exact blocks.0.attn.q + blocks.0.attn.k + blocks.0.attn.v (2 heads) -> blocks.0.attn.proj"
        in str(plan)
    )
    with torch.no_grad():
        reference = model(tokens)
    merged = compress_announced(model, tokens, 0.5, method="merge", include=["*attn*"])
    pruned = compress_announced(model, tokens, 0.5, method="prune", include=["*attn*"])
    with torch.no_grad():
        assert _relative(merged.model(tokens), reference) < 1e-5
        assert _relative(pruned.model(tokens), reference) > 1e-2
    assert [s.merged for s in merged.report.sites] == [1, 1]
    # One head of 16 dims left: q, k, v lose 16 rows each and proj 16 columns, in both blocks.
    assert merged.report.params_before - merged.report.params_after == 2 * (3 * 16 * 33 + 16 * 32)


def test_gpt_heads_with_different_attention_maps_are_dropped_not_merged() -> None:
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=4, n_embd=32, mlp_width=64)).eval()
    tokens = torch.randint(0, 256, (2, 16))
    merged = compress_announced(model, tokens, 0.5, method="merge", include=["*attn*"])
    pruned = compress_announced(model, tokens, 0.5, method="prune", include=["*attn*"])
    assert merged.report.sites[0].merged == 0
    with torch.no_grad():
        assert torch.equal(merged.model(tokens), pruned.model(tokens))


def _gpt_with_a_linearly_dependent_head(dtype: torch.dtype) -> GPT:
    """4 heads of 8 per block; head 0 has head 1's queries and keys (the same attention map) and
    values ``A v_1`` for a random 8 x 8 ``A`` (bias too): its output is ``A`` times head 1's, a
    linear function that no single scale reproduces."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=32, mlp_width=64))
    model = model.eval().to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
        for block in model.blocks:
            attn = block.attn
            for layer in (attn.q, attn.k):
                layer.weight[:8] = layer.weight[8:16]
                layer.bias[:8] = layer.bias[8:16]
            mix = torch.randn(8, 8, dtype=dtype)
            attn.v.weight[:8] = mix @ attn.v.weight[8:16]
            attn.v.bias[:8] = mix @ attn.v.bias[8:16]
    return model


def test_merge_ls_heads_fit_a_removed_head_on_the_kept_heads_exactly() -> None:
    model = _gpt_with_a_linearly_dependent_head(torch.float64)
    before = _state(model)
    tokens = torch.randint(0, 256, (2, 16))
    calibration = [torch.randint(0, 256, (4, 16)) for _ in range(3)]
    with torch.no_grad():
        reference = model(tokens)
    fitted = compress_announced(
        model, tokens, 0.25, method="merge-ls", include=["*attn*"], calibration=calibration
    )
    merged = compress_announced(model, tokens, 0.25, method="merge", include=["*attn*"])
    assert _same(model, before)
    with torch.no_grad():
        assert torch.allclose(fitted.model(tokens), reference, rtol=1e-9, atol=1e-9)
        assert _relative(merged.model(tokens), reference) > 1e-2  # one scale per head cannot
    assert [s.merged for s in fitted.report.sites] == [1, 1]
    # Three heads of 8 left in each block: q, k, v lose 8 rows each and proj 8 columns.
    assert fitted.report.params_before - fitted.report.params_after == 2 * (3 * 8 * 33 + 8 * 32)
    assert fitted.report.params_after == merged.report.params_after
    attn = fitted.model.get_submodule("blocks.0.attn")
    assert attn.q.weight.shape == (24, 32) and attn.proj.weight.shape == (32, 24)


def _output_error(small: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        pairs = [(small(b), model(b)) for b in batches]
    return math.sqrt(sum(float((a - b).square().sum()) for a, b in pairs)) / math.sqrt(
        sum(float(b.square().sum()) for _, b in pairs)
    )


def test_merge_ls_heads_beat_pruning_them_on_a_random_gpt() -> None:
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=32, mlp_width=64)).eval()
    calibration = [torch.randint(0, 256, (4, 16)) for _ in range(4)]
    tokens = calibration[0]
    fitted = compress_announced(
        model, tokens, 0.5, method="merge-ls", include=["*attn*"], calibration=calibration
    )
    pruned = compress_announced(model, tokens, 0.5, method="prune", include=["*attn*"])
    assert fitted.report.params_after == pruned.report.params_after
    assert _output_error(fitted.model, model, calibration) < 0.75 * _output_error(
        pruned.model, model, calibration
    )


def test_merge_ls_asks_token_models_for_calibration() -> None:
    model = _gpt_with_a_linearly_dependent_head(torch.float32)
    before = _state(model)
    with pytest.raises(nm.InvalidArgumentError, match="real-valued inputs only.*pass calibration="):
        nm.compress(model, torch.randint(0, 256, (2, 16)), 0.25, method="merge-ls")
    assert _same(model, before)


def test_an_attention_no_layer_reaches_still_gets_a_reason() -> None:
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attention(x, x, x)[0])

    plan = nm.plan(Direct(), torch.randn(2, 4, 8))
    reasons = {s.producer: s.reason for s in plan.skipped}
    assert reasons["attention.out_proj"] == (
        "the channels come from the model input x, which cannot lose any"
    )
