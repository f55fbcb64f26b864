"""The small GPT and its corpus: shapes, perplexity, training, exact merging of its ReLU MLP."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch

from neuronmerge.errors import DatasetNotFoundError
from neuronmerge.ffn import FFNOptions, FFNSpec, compress_ffns
from neuronmerge.lab.gpt import (
    CONFIGS,
    GPT,
    GPTConfig,
    TrainRecipe,
    config_from_state_dict,
    perplexity,
    random_windows,
    train_gpt,
)
from neuronmerge.lab.text import load_kjv
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, mlp_width=64)
SPEC = FFNSpec(up="mlp.fc", down="mlp.proj", act="mlp.act", norm="ln2")


def test_missing_corpus_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="bible-kjv-text"):
        load_kjv(tmp_path)


def test_kjv_splits_are_whole_held_out_chapters() -> None:
    corpus = load_kjv()
    sizes = [len(corpus.train), len(corpus.val), len(corpus.test)]
    assert sizes[0] > 3_500_000 and all(90_000 < n < 130_000 for n in sizes[1:])
    text = bytes(corpus.test[:2000].tolist()).decode()
    assert text not in bytes(corpus.train.tolist()).decode()  # no held-out verse run is trained on
    assert corpus.split("val") is corpus.val


def test_a_model_with_zero_logits_has_perplexity_of_the_vocabulary() -> None:
    model = GPT(TINY)
    with torch.no_grad():
        model.head.weight.zero_()
    tokens = torch.randint(0, 256, (200,), dtype=torch.uint8)
    assert math.isclose(perplexity(model, tokens, length=16), 256, rel_tol=1e-5)


def test_training_lowers_the_loss_and_is_seeded() -> None:
    torch.manual_seed(0)
    tokens = torch.tensor(list(b"abcdefgh" * 200), dtype=torch.uint8)
    before = perplexity(GPT(TINY), tokens, length=16)
    recipe = TrainRecipe(steps=60, batch_size=8, warmup=5)
    torch.manual_seed(0)
    first = train_gpt(GPT(TINY), tokens, recipe, progress=False)
    torch.manual_seed(0)
    second = train_gpt(GPT(TINY), tokens, recipe, progress=False)
    assert perplexity(first, tokens, length=16) < before / 10
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values())
    )
    window = random_windows(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert window.shape == (4, 17) and window.dtype == torch.int64


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_merging_keeps_the_model_runnable_and_reloadable(activation: str) -> None:
    torch.manual_seed(0)
    model = GPT(replace(TINY, activation=activation)).eval()
    small = copy.deepcopy(model)
    extra = {"approximate": True} if activation == "gelu" else {}
    compress_ffns(list(enumerate_blocks(small)), SPEC, FFNOptions(0.25, method="merge-ls", extra=extra))
    config = config_from_state_dict(small.state_dict(), model.config)
    assert config.mlp_width == 48 and config.n_head == 2
    rebuilt = GPT(config).eval()
    rebuilt.load_state_dict(small.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    assert torch.equal(rebuilt(tokens), small(tokens))


def test_relu_gpt_planted_duplicates_merge_exactly() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        for block in model.blocks:
            fc = block.mlp.fc
            scale = torch.rand(32, 1) * 0.5 + 0.25
            fc.weight[32:], fc.bias[32:] = scale * fc.weight[:32], scale[:, 0] * fc.bias[:32]
            fc.weight[:32] *= 2  # originals get the larger norms, so l1-norm keeps them
            fc.bias[:32] *= 2
    small = copy.deepcopy(model)
    compress_ffns(list(enumerate_blocks(small)), SPEC, FFNOptions(0.5))
    tokens = torch.randint(0, 256, (2, 16))
    assert small.blocks[0].mlp.fc.out_features == 32
    assert torch.allclose(small(tokens), model(tokens), atol=1e-5)


def enumerate_blocks(model: GPT) -> list[tuple[str, torch.nn.Module]]:
    return [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]


def test_the_swept_config_has_a_few_million_parameters() -> None:
    # the "a few million", sized to train in about half an hour on a shared 2-core machine
    count = sum(p.numel() for p in GPT(CONFIGS["gpt-kjv"]).parameters())
    assert 3_000_000 < count < 4_000_000


def _sweep_script() -> ModuleType:
    return load_script("experiments/gpt_sweep.py")


def test_readme_table_is_generated_from_the_committed_sweep() -> None:
    script = _sweep_script()
    outcome = json.loads((ROOT / "experiments" / "gpt_sweep.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert f"{script.START}\n{script.table(outcome)}\n{script.END}" in readme
    assert f"{script.HEADS_START}\n{script.heads_table(outcome)}\n{script.HEADS_END}" in readme
    assert {(r["heads_removed"], r["method"]) for r in outcome["heads"]} == {
        (n, m) for n in script.HEADS_REMOVED for m in script.HEAD_METHODS
    }
    methods = {r["method"] for r in outcome["results"]}
    assert methods == set(script.METHODS) and len(outcome["results"]) == 9 * len(methods)


def test_committed_sweep_meets_the_targets_it_claims() -> None:
    # README states that every issue-13 target of the MLP sweep holds
    outcome = json.loads((ROOT / "experiments" / "gpt_sweep.json").read_text())
    checks = _sweep_script().targets(outcome)
    assert checks["below_magnitude"] and checks["within_1_5x_at_0_2"] and checks["below_fold"]
    assert checks["tenfold"]
    assert outcome["params"] == sum(p.numel() for p in GPT(CONFIGS["gpt-kjv"]).parameters())
