"""Peak memory of streaming compression (``neuronmerge.streaming``) against the largest layer group.

Run from the repository root::

    .venv/bin/python benchmarks/streaming.py [--layout llama] [--hidden 4096] [--ffn 11008]
        [--layers 2 6] [--method merge] [--json benchmarks/results/streaming.json] [--keep]
    .venv/bin/python benchmarks/streaming.py --markdown benchmarks/results/streaming.json

For each layer count it synthesises a sharded safetensors checkpoint in a scratch folder, one shard
per layer, from one random layer reused under every layer's names (only the names differ, so writing
costs disk time, not random-number time). ``llama`` (the default): LLaMA's layout and names (SwiGLU
MLP ``gate_proj``/``up_proj``/``down_proj`` without biases, RMSNorms, q/k/v/o projections, untied
``lm_head``) at LLaMA-7B's shapes (hidden 4096, MLP 11008, vocabulary 32000, float32); ``opt``: OPT's
(ReLU MLP ``fc1``/``fc2`` with biases, LayerNorms) at the same shapes. A fresh subprocess imports
torch and neuronmerge, warms the engine up on a tiny MLP, records its resident set size (the fixed
overhead), resets the kernel's peak mark (``/proc/self/clear_refs``; ``ru_maxrss`` would include the
parent's peak from before the fork), streams the checkpoint through ``compress_checkpoint`` and
reports its peak resident set size (``VmHWM``).

The yardstick, "the largest layer group plus its consumers": the bytes, as stored (float32 here), of
one layer's MLP, the rows of its neurons' producers (``gate_proj`` and ``up_proj``, or ``fc1``) and
the columns of their consumer (``down_proj``, or ``fc2``), with their biases: 541 MB at LLaMA-7B's
shapes (``StreamReport.largest_group_bytes``). The claim: ``peak - overhead`` stays near that
figure (the ratio in the table, ideally 1), not near a whole layer (attention included) or a layer
plus its compressed copy, and does not grow with the number of layers, so a checkpoint of any depth
streams in the same memory. Scratch files are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
import neuronmerge as nm
from neuronmerge.ffn import FeedForward
from neuronmerge.streaming import compress_checkpoint
nn = torch.nn
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) * 1024
nm.compress(FeedForward(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), None), torch.zeros(4, 8), 0.5)
overhead = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
report = compress_checkpoint(sys.argv[1], sys.argv[2], float(sys.argv[3]), method=sys.argv[4])
print(json.dumps({"overhead_bytes": overhead, "peak_bytes": status("VmHWM"),
                  "largest_group_bytes": report.largest_group_bytes,
                  "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
                  "width_after": report.width_after, "seconds": round(report.seconds, 1)}))
"""


def _opt(hidden: int, ffn: int, g: torch.Generator) -> tuple[str, dict, dict, dict]:
    layer = {
        **{f"self_attn.{p}_proj.weight": torch.randn(hidden, hidden, generator=g) * 0.02 for p in "qkv"},
        "self_attn.out_proj.weight": torch.randn(hidden, hidden, generator=g) * 0.02,
        "final_layer_norm.weight": torch.ones(hidden),
        "final_layer_norm.bias": torch.zeros(hidden),
        "fc1.weight": torch.randn(ffn, hidden, generator=g) * 0.02,
        "fc1.bias": torch.zeros(ffn),
        "fc2.weight": torch.randn(hidden, ffn, generator=g) * 0.02,
        "fc2.bias": torch.zeros(hidden),
    }
    rest = {"model.decoder.embed_tokens.weight": torch.randn(VOCAB, hidden, generator=g) * 0.02}
    config = {"model_type": "opt", "hidden_size": hidden, "ffn_dim": ffn, "activation_function": "relu"}
    return "model.decoder.layers", layer, rest, config


def _llama(hidden: int, ffn: int, g: torch.Generator) -> tuple[str, dict, dict, dict]:
    layer = {
        **{
            f"self_attn.{p}_proj.weight": torch.randn(hidden, hidden, generator=g) * 0.02 for p in "qkvo"
        },
        "input_layernorm.weight": torch.ones(hidden),
        "post_attention_layernorm.weight": torch.ones(hidden),
        "mlp.gate_proj.weight": torch.randn(ffn, hidden, generator=g) * 0.02,
        "mlp.up_proj.weight": torch.randn(ffn, hidden, generator=g) * 0.02,
        "mlp.down_proj.weight": torch.randn(hidden, ffn, generator=g) * 0.02,
    }
    rest = {
        "model.embed_tokens.weight": torch.randn(VOCAB, hidden, generator=g) * 0.02,
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.randn(VOCAB, hidden, generator=g) * 0.02,
    }
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
    }
    return "model.layers", layer, rest, config


VOCAB = 32000
#: ``--layout`` -> a function giving the layer prefix, one layer's tensors, the rest and the config.
LAYOUTS = {"llama": _llama, "opt": _opt}


def synthesise(folder: Path, layers: int, hidden: int, ffn: int, layout: str = "llama") -> int:
    """A sharded checkpoint of ``layout``; returns its tensor bytes."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    prefix, layer, rest, config = LAYOUTS[layout](hidden, ffn, g)
    weight_map: dict[str, str] = {}
    total = 0
    count = layers + 1
    for i in range(count):
        tensors = rest if i == layers else {f"{prefix}.{i}.{k}": v for k, v in layer.items()}
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return total


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"


def table(result: dict) -> str:
    """The README's table, from a results file."""
    lines = [
        "| layers | checkpoint | largest group + consumers (one MLP) | peak RSS above overhead "
        "| peak / (group + consumers) | overhead (torch, engine) | time |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['layers']} | {_size(run['checkpoint_bytes'])} "
            f"| {_size(run['largest_group_bytes'])} | {_size(run['peak_minus_overhead_bytes'])} "
            f"| {run['peak_over_largest_group']:.2f} "
            f"| {_size(run['overhead_bytes'])} | {run['seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="llama")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="merge")
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--markdown", type=Path, help="only print the README table of this results file")
    args = parser.parse_args()
    if args.markdown:
        print(table(json.loads(args.markdown.read_text())))
        return
    scratch = Path(tempfile.mkdtemp(prefix="nm-stream-", dir=args.scratch))
    runs = []
    try:
        for layers in args.layers:
            src, out = scratch / f"src-{layers}", scratch / f"out-{layers}"
            started = time.perf_counter()
            size = synthesise(src, layers, args.hidden, args.ffn, args.layout)
            written = time.perf_counter() - started
            child = [sys.executable, "-c", _CHILD, str(src), str(out), str(args.ratio), args.method]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            run = {"layers": layers, "checkpoint_bytes": size, "synthesis_seconds": round(written, 1)}
            run.update(json.loads(done.stdout.strip().splitlines()[-1]))
            run["peak_minus_overhead_bytes"] = run["peak_bytes"] - run["overhead_bytes"]
            run["peak_over_largest_group"] = round(
                run["peak_minus_overhead_bytes"] / run["largest_group_bytes"], 2
            )
            runs.append(run)
            print(json.dumps(run), flush=True)
            if not args.keep:
                shutil.rmtree(src)
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "layout": args.layout,
        "hidden": args.hidden,
        "ffn": args.ffn,
        "ratio": args.ratio,
        "method": args.method,
        "dtype": "float32",
        "runs": runs,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
