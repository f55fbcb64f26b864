"""Streaming compression of a sharded checkpoint: same result as in memory, bounded memory."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from neuronmerge import hf
from neuronmerge.errors import CheckpointError, InvalidArgumentError, OutputExistsError
from neuronmerge.ffn import FFNOptions, compress_ffns
from neuronmerge.hf import block_kinds, compress_pretrained
from neuronmerge.streaming import compress_checkpoint
from tests.hf_models import llama, opt, qwen2
from tests.scripts import ROOT, load_script

IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["merge", "merge-ls"])
@pytest.mark.parametrize(
    ("build", "field"),
    [(opt, "ffn_dim"), (llama, "intermediate_size"), (qwen2, "intermediate_size")],
)
def test_streamed_result_equals_the_in_memory_one_and_reloads(
    build, field: str, method: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build()
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 2  # really sharded
    report = compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.5, method=method)
    assert (report.width_before, report.width_after) == (64, 32)
    assert report.bytes_after < report.bytes_before
    streamed = type(model).from_pretrained(tmp_path / "out").eval()
    assert getattr(streamed.config, field) == 32
    if method == "merge":
        in_memory = compress_pretrained(model, 0.5, method=method).model
    else:  # a streamed model cannot generate probes: both fit on each block's norm of noise
        in_memory = copy.deepcopy(model)
        ((kind, blocks),) = block_kinds(in_memory)
        # Qwen2 has no MLP bias switch: both fit through the origin
        extra = {"intercept": False} if build is qwen2 else {}
        options = FFNOptions(0.5, method="merge-ls", extra=extra)
        compress_ffns(blocks, kind.spec, options, hf._spellings())
    with torch.no_grad():
        # merge-ls probes pass through torch's RMSNorm here and LLaMA's own in memory: same function
        assert torch.allclose(streamed(IDS).logits, in_memory(IDS).logits, atol=1e-5)


def test_a_bias_the_config_cannot_state_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    qwen2().save_pretrained(tmp_path / "src")
    with pytest.raises(InvalidArgumentError, match="'qwen2' configs cannot state"):
        compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.5, method="merge-ls", intercept=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_folders_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        compress_checkpoint(tmp_path, tmp_path / "out", 0.5)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InvalidArgumentError, match="model_type 'bert'"):
        compress_checkpoint(tmp_path, tmp_path / "out", 0.5)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        compress_checkpoint(tmp_path, tmp_path / "out", 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "out"]


LAYERS, HIDDEN, FFN = 2, 2048, 4096
#: One layer's MLP as stored: fc1's rows and fc2's columns with their biases (float32), the largest
#: channel group plus its consumer, what compressing one layer must hold.
GROUP = (2 * FFN * HIDDEN + FFN + HIDDEN) * 4
#: What streaming may hold beyond the group: the engine's working blocks (``decompose``'s and
#: ``surgery``'s, 8 MB each), the shard copy buffer and the heap's slack around them.
WORKING = 48 * 2**20

_CAPPED = """
import json, pathlib, resource, sys, torch
torch.set_num_threads(1)
from neuronmerge.ffn import FeedForward
from neuronmerge.streaming import compress_checkpoint, _read, _weight_map
import neuronmerge as nm
nn = torch.nn
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
nm.compress(FeedForward(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), None), torch.zeros(4, 8), 0.5)
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + int(sys.argv[3]), resource.RLIM_INFINITY))
overhead = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) from here on
    f.write("5")
src, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
if mode == "whole":  # the control: holding every tensor at once must not fit under the cap
    weights = _weight_map(src)
    try:
        held = _read(src, weights, list(weights))
        print(json.dumps({"held": len(held)}))
    except (MemoryError, RuntimeError) as exc:
        print(json.dumps({"failed": type(exc).__name__}))
else:
    report = compress_checkpoint(src, sys.argv[4], 0.5)
    print(json.dumps({"largest": report.largest_group_bytes, "total": report.bytes_before,
                      "width": report.width_after, "peak": status("VmHWM") - overhead}))
"""


def _synthesise(folder: Path) -> int:
    """An OPT-shaped sharded checkpoint, one shard per layer, written without building the model."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    shards = [
        {"model.decoder.embed_tokens.weight": torch.randn(50, HIDDEN, generator=generator)},
        *(
            {
                f"model.decoder.layers.{i}.{name}": torch.randn(shape, generator=generator) * 0.05
                for name, shape in [
                    ("self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
                    ("self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
                    ("self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
                    ("self_attn.out_proj.weight", (HIDDEN, HIDDEN)),
                    ("final_layer_norm.weight", (HIDDEN,)),
                    ("final_layer_norm.bias", (HIDDEN,)),
                    ("fc1.weight", (FFN, HIDDEN)),
                    ("fc1.bias", (FFN,)),
                    ("fc2.weight", (HIDDEN, FFN)),
                    ("fc2.bias", (HIDDEN,)),
                ]
            }
            for i in range(LAYERS)
        ),
    ]
    for number, tensors in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 4 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"model_type": "opt", "ffn_dim": FFN, "hidden_size": HIDDEN, "activation_function": "relu"}
    (folder / "config.json").write_text(json.dumps(config))
    return total


def _capped(*args: str) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _CAPPED, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_checkpoint_larger_than_the_memory_cap_streams_through_it_in_one_mlps_memory(
    tmp_path: Path,
) -> None:
    total = _synthesise(tmp_path / "src")
    cap = GROUP + WORKING  # address space above the warmed-up interpreter, torch and engine
    assert total > 2 * cap  # the whole model cannot be held under the cap...
    assert "failed" in _capped(str(tmp_path / "src"), "whole", str(cap))  # ...and is not
    result = _capped(str(tmp_path / "src"), "stream", str(cap), str(tmp_path / "out"))
    assert result["width"] == FFN // 2 and result["total"] == total
    assert result["largest"] == GROUP
    # Resident memory: one MLP and the working blocks; not a whole layer (attention included), and
    # not an MLP beside its compressed copy (1.5 MLPs at ratio 0.5).
    assert isinstance(result["peak"], int) and result["peak"] <= GROUP + WORKING, result["peak"]
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) == LAYERS + 1


def test_the_command_line_streams_a_checkpoint_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    opt().save_pretrained(tmp_path / "src", max_shard_size="20KB")
    command = [sys.executable, "-m", "neuronmerge", "compress", str(tmp_path / "src"), "--ratio", "0.25"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["width_before"], summary["width_after"], summary["layers"]) == (64, 48, 2)
    assert tf.OPTForCausalLM.from_pretrained(tmp_path / "out").config.ffn_dim == 48
    target = [sys.executable, "-m", "neuronmerge", "compress", str(tmp_path / "src")]
    done = subprocess.run(
        [*target, "--target-params", "0.9", "--round-to", "8", "--out", str(tmp_path / "t"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["width_after"] % 8 == 0
    done = subprocess.run(
        [*target, "--target-macs", "0.5", "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "--target-macs and --ratios need a model file" in done.stderr
    assert not (tmp_path / "m").exists()


def test_a_parameter_target_streams_to_the_width_compress_pretrained_picks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = llama()
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    report = compress_checkpoint(tmp_path / "src", tmp_path / "out", target_params=0.8, round_to=4)
    in_memory = compress_pretrained(model, target_params=0.8, round_to=4)
    assert report.width_after == in_memory.width_after < 64 and report.width_after % 4 == 0
    streamed = type(model).from_pretrained(tmp_path / "out").eval()
    total = sum(p.numel() for p in model.parameters())
    step = 4 * 2 * 3 * 32  # round_to neurons x layers x (gate row, up row, down column)
    assert abs(sum(p.numel() for p in streamed.parameters()) - 0.8 * total) <= step / 2
    with pytest.raises(InvalidArgumentError, match="out of reach"):
        compress_checkpoint(tmp_path / "src", tmp_path / "out2", target_params=0.05)
    assert not (tmp_path / "out2").exists()


def test_readme_streaming_table_is_generated_from_the_committed_benchmark() -> None:
    bench = load_script("benchmarks/streaming.py")
    result = json.loads((ROOT / "benchmarks" / "results" / "streaming.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert (
        f"<!-- streaming-bench:start -->\n{bench.table(result)}\n<!-- streaming-bench:end -->" in readme
    )
    deepest = max(result["runs"], key=lambda run: run["layers"])
    assert result["layout"] == "llama" and result["method"] == "merge"
    assert deepest["checkpoint_bytes"] > 24 * 2**30  # larger than the machine's memory
    assert deepest["peak_over_largest_group"] < 1.2  # one MLP, not a layer beside its copy
