"""Choose merge-ls's data-free probes for language models on the validation split.

    python experiments/gpt_probe_validation.py    # -> experiments/gpt_probe_validation.json

On the byte-level GPT trained here (``lab.gpt``), every block's MLP is compressed with merge-ls at
ratios 0.1-0.9 with two kinds of probes, both without data: ``noise`` (each block's LayerNorm applied
to Gaussian noise, ``ffn.probes_for``) and ``generated`` (what each MLP reads when the model runs on
2,048 tokens it sampled itself, ``generated.sample_tokens``). Reported: perplexity on the first
32,768 predicted bytes of the validation chapters (the test chapters are never read here). The
winner becomes the default for models that can generate (``hf.compress_pretrained``) and the sweep's.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from neuronmerge.ffn import FFNOptions, FFNSpec, compress_ffns, mlp_inputs
from neuronmerge.generated import sample_tokens
from neuronmerge.lab.gpt import perplexity, trained_gpt
from neuronmerge.lab.text import load_kjv

OUT = Path(__file__).resolve().parent / "gpt_probe_validation.json"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SPEC = FFNSpec(up="mlp.fc", down="mlp.proj", act="mlp.act", norm="ln2")
VAL_TOKENS = 2**15 + 1
PROBE_TOKENS, LENGTH = 2048, 64


def run() -> dict[str, Any]:
    torch.set_num_threads(1)
    corpus = load_kjv()
    model, info = trained_gpt("gpt-kjv", corpus=corpus, progress=False)
    val = corpus.val[:VAL_TOKENS]
    started = time.perf_counter()
    tokens = sample_tokens(model, model.config.vocab_size, count=PROBE_TOKENS // LENGTH, length=LENGTH)
    generation_s = time.perf_counter() - started
    rows = []
    for ratio in RATIOS:
        row: dict[str, Any] = {"ratio": ratio}
        for kind in ("noise", "generated"):
            small = copy.deepcopy(model)
            blocks = [(f"blocks.{i}", b) for i, b in enumerate(small.blocks)]
            inputs = mlp_inputs(small, blocks, SPEC, tokens) if kind == "generated" else None
            compress_ffns(blocks, SPEC, FFNOptions(ratio, method="merge-ls"), inputs=inputs)
            row[kind] = round(perplexity(small, val), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    wins = sum(r["generated"] < r["noise"] for r in rows)
    return {
        "model": "gpt-kjv",
        "split": "validation",
        "val_tokens": VAL_TOKENS - 1,
        "dense_val_perplexity": round(perplexity(model, val), 4),
        "probe_tokens": PROBE_TOKENS,
        "probe_length": LENGTH,
        "generation_seconds": round(generation_s, 2),
        "rows": rows,
        "generated_wins": f"{wins}/{len(rows)}",
        "chosen": "generated" if wins > len(rows) / 2 else "noise",
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(run(), indent=1) + "\n")
