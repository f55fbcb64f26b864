"""Hugging Face architectures beyond the first five (tiny configs, random weights, nothing downloaded):
each block layout row of ``hf.BLOCK_KINDS`` gives the same class back, reloadable by plain
transformers, and a model the adapter cannot express is refused with its reason, untouched."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.hf import compress_pretrained
from tests import hf_models as zoo
from tests.scripts import ROOT, load_script

IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
AUDIO = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, tf.WhisperForAudioClassification):
            return model(AUDIO)[0]
        if isinstance(model, tf.SiglipVisionModel):
            return model(pixel_values=PIXELS)[0]
        return model(IDS)[0]


@pytest.mark.parametrize(
    ("build", "field", "before", "method", "options"),
    [
        (zoo.qwen2, "intermediate_size", 64, "merge", {}),  # gated SiLU, like LLaMA
        (zoo.qwen2, "intermediate_size", 64, "merge-ls", {}),  # no bias switch: through the origin
        (zoo.gemma2, "intermediate_size", 64, "merge", {"approximate": True}),
        (zoo.gpt_neox, "intermediate_size", 64, "merge-ls", {}),
        (zoo.gptj, "n_inner", 128, "merge", {"approximate": True}),  # n_inner was None
        (zoo.distilbert, "hidden_dim", 64, "merge-ls", {}),
        (zoo.t5_encoder, "d_ff", 64, "merge", {}),  # bias-free ReLU
        (lambda: zoo.t5_encoder(gated=True), "d_ff", 64, "merge", {"approximate": True}),
        (zoo.whisper_encoder, "encoder_ffn_dim", 64, "merge-ls", {}),
        (zoo.falcon, "ffn_hidden_size", 128, "merge-ls", {}),  # FalconLinear back in place
    ],
    ids=[
        "qwen2",
        "qwen2-ls",
        "gemma2",
        "gpt-neox",
        "gpt-j",
        "distilbert",
        "t5",
        "t5-gated",
        "whisper",
        "falcon",
    ],
)
def test_more_layouts_come_back_as_the_same_class_and_reload(
    build: Callable[[], torch.nn.Module],
    field: str,
    before: int,
    method: str,
    options: dict,
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = build()
    original = copy.deepcopy(model.state_dict())
    result = compress_pretrained(model, 0.5, method=method, **options)
    small = result.model
    assert type(small) is type(model) and len(result.blocks) == 2
    assert (result.width_before, result.width_after) == (before, before // 2)
    assert getattr(small.config, field) == before // 2
    small.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.allclose(_out(reloaded), _out(small), atol=1e-6)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    error = (_out(small) - _out(model)).norm() / _out(model).norm()
    assert error < 0.8  # random weights: compressed, not broken (Gemma-2 renormalises the MLP)


def test_t5_relu_planted_duplicates_merge_exactly_without_biases() -> None:
    torch.manual_seed(0)
    model = zoo.t5_encoder()
    with torch.no_grad():
        for block in model.encoder.block:
            ffn = block.layer[1].DenseReluDense
            scale = torch.rand(32, 1) * 0.5 + 0.25
            ffn.wi.weight[32:] = scale * ffn.wi.weight[:32]
            ffn.wi.weight[:32] *= 2  # the originals have the larger norms (kept by l1-norm)
    result = compress_pretrained(model, 0.5, method="merge")
    assert result.model.config.d_ff == 32
    assert all(b.report.sites[0].merged == 32 for b in result.blocks)
    assert torch.allclose(_out(result.model), _out(model), atol=1e-5)
    pruned = compress_pretrained(model, 0.5, method="prune").model
    assert not torch.allclose(_out(pruned), _out(model), atol=1e-3)


def test_t5_planted_duplicates_merge_exactly_by_least_squares_through_the_origin(
    tmp_path: Path,
) -> None:
    # T5's wo has no bias and its config no switch for one: merge-ls fits without constants
    torch.manual_seed(0)
    model = zoo.t5_encoder()
    with torch.no_grad():
        for block in model.encoder.block:
            ffn = block.layer[1].DenseReluDense
            ffn.wi.weight[32:] = (torch.rand(32, 1) * 0.5 + 0.25) * ffn.wi.weight[:32]
    result = compress_pretrained(model, 0.5, method="merge-ls")
    small = result.model
    assert small.config.d_ff == 32
    assert all(b.layer[1].DenseReluDense.wo.bias is None for b in small.encoder.block)
    assert torch.allclose(_out(small), _out(model), atol=1e-5)
    small.save_pretrained(tmp_path)
    assert torch.equal(_out(type(small).from_pretrained(tmp_path).eval()), _out(small))


@pytest.mark.parametrize(
    ("build", "options", "reason"),
    [
        # asked to fit constants, least squares adds a bias Qwen2's config cannot keep
        (zoo.qwen2, {"method": "merge-ls", "intercept": True}, "a bias that its config cannot"),
        (zoo.qwen2, {"intercept": False}, "intercept=False applies to method='merge-ls' only"),
        # the pooling head's MLP reads intermediate_size as well
        (zoo.siglip_vision, {"method": "merge-ls"}, r"fc1.bias as \(32,\).*would not load"),
    ],
    ids=["qwen2-intercept", "intercept-merge", "siglip-head"],
)
def test_what_the_config_cannot_express_is_refused_untouched(
    build: Callable[[], torch.nn.Module], options: dict, reason: str
) -> None:
    torch.manual_seed(0)
    model = build()
    original = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match=reason):
        compress_pretrained(model, 0.5, **options)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


class _Doubled(torch.nn.Linear):
    """A Linear subclass computing something else (as LoRA or quantised layers do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_an_unknown_linear_subclass_is_refused_not_traced_through() -> None:
    model = zoo.gpt_neox()
    for layer in model.gpt_neox.layers:
        old = layer.mlp.dense_h_to_4h
        new = _Doubled(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        layer.mlp.dense_h_to_4h = new
    with pytest.raises(InvalidArgumentError, match="unsupported kind _Doubled"):
        compress_pretrained(model, 0.5, approximate=True)


_SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 50,
}


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (
            lambda: tf.MixtralForCausalLM(
                tf.MixtralConfig(**_SIZES, num_local_experts=4, num_experts_per_tok=2)
            ),
            "MixtralSparseMoeBlock: a mixture-of-experts MLP",
        ),
        (lambda: tf.AlbertModel(tf.AlbertConfig(**_SIZES)), "AlbertLayer: ALBERT shares"),
        (
            lambda: tf.BloomForCausalLM(
                tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=50)
            ),
            "BLOOM's MLP width is fixed",
        ),
    ],
    ids=["mixtral", "albert", "bloom"],
)
def test_known_unsupported_blocks_are_refused_with_their_reason(
    build: Callable[[], torch.nn.Module], reason: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=reason):
        compress_pretrained(build().eval(), 0.5)


def test_readme_smoke_table_is_generated_from_the_committed_run() -> None:
    script = load_script("experiments/hf_smoke.py")
    outcome = json.loads((ROOT / "experiments" / "hf_smoke.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert f"{script.START}\n{script.table(outcome)}\n{script.END}" in readme
    # every case ran both methods, and none crashed or came back wrong
    assert len(outcome["rows"]) == 2 * len(script._cases()) == sum(outcome["counts"].values())
    assert set(outcome["counts"]) <= {"ok", "refused"}
