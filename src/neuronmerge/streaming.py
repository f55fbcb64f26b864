"""Compress a sharded safetensors checkpoint layer by layer, never holding the whole model.

A Hugging Face checkpoint folder (``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``) is read one tensor at a time with ``safe_open``. The tensors of one
transformer layer (``...layers.<i>.``) form a group: its MLP weights go into a tiny ``FeedForward``
compressed by the engine (``neuronmerge.ffn``), the rest of the layer is copied, and the group is
written as its own output shard before the next group is read. Tensors outside the layers
(embeddings, final norm, output head) are copied into shards no larger than the largest layer group
(one tensor per shard when it alone is larger). So peak memory is about the largest group, its
compressed copy and a fixed overhead (the interpreter, torch, the engine's work on one MLP), whatever
the number of layers. The output folder gets shards, an index and the config with the new MLP width,
loadable with ``from_pretrained``; it is written to a temporary folder and renamed at the end.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from neuronmerge.errors import CheckpointError, InvalidArgumentError, OutputExistsError
from neuronmerge.ffn import (
    BlockReport,
    FFNOptions,
    FFNSpec,
    add_zero_biases,
    compress_block,
    has_bias,
    mlp_width,
)


@dataclass(frozen=True)
class Layout:
    """How one ``model_type`` names its MLP (relative to the layer prefix) and its width field."""

    spec: FFNSpec
    width_field: str
    activation_field: str
    #: The config switch giving every MLP layer a bias (see ``hf.BlockKind.bias_field``).
    bias_field: str | None = None


#: Checkpoint layouts by ``config.json``'s ``model_type`` (the names transformers writes).
LAYOUTS: dict[str, Layout] = {
    "opt": Layout(
        FFNSpec("fc1", "fc2", "act", norm="final_layer_norm"), "ffn_dim", "activation_function"
    ),
    "llama": Layout(
        FFNSpec(
            "mlp.up_proj", "mlp.down_proj", "act", gate="mlp.gate_proj", norm="post_attention_layernorm"
        ),
        "intermediate_size",
        "hidden_act",
        bias_field="mlp_bias",
    ),
}
_ACTIVATIONS: dict[str, nn.Module] = {
    "relu": nn.ReLU(),
    "gelu": nn.GELU(),
    "gelu_new": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
}
_LAYER = re.compile(r"^(.*?layers\.(\d+)\.)")


@dataclass(frozen=True)
class StreamReport:
    """What ``compress_checkpoint`` did: per-layer reports, sizes and the output folder."""

    out_dir: Path
    layers: tuple[BlockReport, ...]
    width_before: int
    width_after: int
    largest_group_bytes: int
    bytes_before: int
    bytes_after: int
    seconds: float


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return weight_map
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single.name for name in f.keys()}


def _read(folder: Path, weight_map: dict[str, str], names: list[str]) -> dict[str, Tensor]:
    """The tensors ``names``, each shard opened once. safetensors may hand out views of the file's
    memory map, which would keep every shard mapped while a tensor lives: each is cloned instead."""
    by_shard: dict[str, list[str]] = {}
    for name in names:
        by_shard.setdefault(weight_map[name], []).append(name)
    tensors: dict[str, Tensor] = {}
    for shard, members in by_shard.items():
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in members:
                tensors[name] = f.get_tensor(name).clone()
    return {name: tensors[name] for name in names}


def _headers(folder: Path, weight_map: dict[str, str]) -> dict[str, tuple[list[int], int]]:
    """Every tensor's shape and element size, read from the shards' headers (no data is read; each
    shard is opened once)."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
    headers: dict[str, tuple[list[int], int]] = {}
    for shard, names in by_shard.items():
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in names:
                piece = f.get_slice(name)
                headers[name] = piece.get_shape(), sizes[piece.get_dtype()]
    return headers


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _kept_width(
    shapes: dict[str, list[int]],
    groups: list[tuple[str, list[str]]],
    layout: Layout,
    ratio: float | None,
    target_params: float | None,
    round_to: int | None,
) -> tuple[int, int]:
    """The MLP width before and after (``ffn.mlp_width``), from the tensors' shapes alone."""
    layers = [prefix for prefix, _ in groups if prefix]
    spec, first = layout.spec, layers[0]
    width = shapes[f"{first}{spec.up}.weight"][0]
    reads = [spec.up] + ([spec.gate] if spec.gate else [])
    per_neuron = sum(
        shapes[f"{first}{path}.weight"][1] + (f"{first}{path}.bias" in shapes) for path in reads
    )
    per_neuron += shapes[f"{first}{spec.down}.weight"][0]
    kept = mlp_width(
        width,
        ratio=0.5 if ratio is None and target_params is None else ratio,
        target_params=target_params,
        round_to=round_to,
        total=sum(_count(shape) for shape in shapes.values()),
        per_neuron=per_neuron,
        blocks=len(layers),
    )
    return width, kept


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def _linear(tensors: dict[str, Tensor], path: str) -> nn.Linear:
    weight = tensors[f"{path}.weight"]
    bias = tensors.get(f"{path}.bias")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _norm(tensors: dict[str, Tensor], path: str, eps: float) -> nn.Module:
    weight = tensors[f"{path}.weight"]
    bias = tensors.get(f"{path}.bias")
    if bias is None:
        norm: nn.Module = nn.RMSNorm(weight.shape[0], eps=eps)
        norm.weight = nn.Parameter(weight, requires_grad=False)
        return norm
    norm = nn.LayerNorm(weight.shape[0], eps=eps)
    norm.weight, norm.bias = (
        nn.Parameter(weight, requires_grad=False),
        nn.Parameter(bias, requires_grad=False),
    )
    return norm


def _mlp_block(tensors: dict[str, Tensor], layout: Layout, act: nn.Module, eps: float) -> nn.Module:
    """A module holding the layer's MLP at the paths of ``layout.spec`` (tensors shared, not copied)."""
    spec, block = layout.spec, nn.Module()
    for path in (spec.up, spec.down) + ((spec.gate,) if spec.gate else ()):
        _set_path(block, path, _linear(tensors, path))
    _set_path(block, spec.act, act)
    if spec.norm and f"{spec.norm}.weight" in tensors:
        _set_path(block, spec.norm, _norm(tensors, spec.norm, eps))
    return block


def _groups(weight_map: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """(layer prefix, names) for every layer in order, then ("", names) of everything else."""
    layers: dict[int, tuple[str, list[str]]] = {}
    rest: list[str] = []
    for name in weight_map:
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(2)), (match.group(1), []))[1].append(name)
        else:
            rest.append(name)
    for index in sorted(layers):
        yield layers[index]
    yield "", rest


def compress_checkpoint(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    ratio: float | None = None,
    *,
    method: str = "merge",
    target_params: float | None = None,
    round_to: int | None = None,
    **options: Any,
) -> StreamReport:
    """Compress every layer's MLP of the checkpoint folder ``src`` into the new folder ``out``.

    By ``ratio`` (default 0.5) or to the one MLP width whose parameter count is closest to
    ``target_params`` (a fraction kept or a count, counted from the shards' headers before anything
    is read; ``round_to=N`` keeps the width a multiple of N), as ``hf.compress_pretrained``.
    ``method`` and ``options`` are those of ``nm.compress``; ``merge-ls`` is data-free here (probes
    from each layer's own norm). ``out`` must not exist. ``src`` is only read.
    """
    started = time.perf_counter()
    folder, target = Path(src), Path(out)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    if target.exists():
        raise OutputExistsError(f"{target} exists; choose a new output folder")
    config = json.loads(config_file.read_text())
    layout = LAYOUTS.get(config.get("model_type", ""))
    if layout is None:
        raise InvalidArgumentError(
            f"model_type {config.get('model_type')!r} is not one of {', '.join(LAYOUTS)}"
        )
    act_name = config.get(layout.activation_field, "relu")
    if act_name not in _ACTIVATIONS:
        raise InvalidArgumentError(f"activation {act_name!r} is not one of {', '.join(_ACTIVATIONS)}")
    eps = float(config.get("rms_norm_eps", config.get("layer_norm_eps", 1e-5)))
    weight_map = _weight_map(folder)
    groups = list(_groups(weight_map))
    headers = _headers(folder, weight_map)
    sizes = {name: _count(shape) * size for name, (shape, size) in headers.items()}
    shapes = {name: shape for name, (shape, _) in headers.items()}
    width, kept = _kept_width(shapes, groups, layout, ratio, target_params, round_to)
    limit = max(sum(sizes[n] for n in names) for prefix, names in groups if prefix)
    rest = list(_batches(groups[-1][1], sizes, limit))
    # A tensor outside the layers (an embedding) may alone outweigh a layer: then it is the largest.
    largest = max([limit] + [sum(sizes[n] for n in batch) for batch in rest])
    shard_count = len(groups) - 1 + len(rest)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        new_map: dict[str, str] = {}
        reports: list[BlockReport] = []
        shard = 0

        def write(tensors: dict[str, Tensor]) -> None:
            nonlocal shard
            shard += 1
            name = f"model-{shard:05d}-of-{shard_count:05d}.safetensors"
            contiguous = {k: v.contiguous() for k, v in tensors.items()}
            save_file(contiguous, str(staging / name), metadata={"format": "pt"})
            new_map.update(dict.fromkeys(tensors, name))

        for prefix, names in groups:
            if not prefix:
                for batch in rest:
                    write(_read(folder, weight_map, batch))
                continue
            tensors = {n[len(prefix) :]: t for n, t in _read(folder, weight_map, names).items()}
            block = _mlp_block(tensors, layout, _ACTIVATIONS[act_name], eps)
            ffn_options = FFNOptions(1 - kept / width, method=method, extra=options)
            reports.append(compress_block(block, layout.spec, ffn_options, name=prefix[:-1]))
            biased = layout.bias_field is not None and has_bias(block, layout.spec)
            if biased and not config.get(layout.bias_field):
                if len(reports) > 1:  # earlier layers were written without MLP biases
                    raise InvalidArgumentError(f"{prefix[:-1]} needs MLP biases the layers before lack")
                config[layout.bias_field] = True
            if biased:
                add_zero_biases(block, layout.spec)
            mlp = {getattr(layout.spec, a) for a in ("up", "down", "gate") if getattr(layout.spec, a)}
            for key, value in block.state_dict().items():
                if key in tensors or key.rpartition(".")[0] in mlp:
                    tensors[key] = value.detach()
            write({prefix + k: v for k, v in tensors.items()})
            del tensors, block
            gc.collect()  # traced GraphModules hold reference cycles: free each layer's now
        config[layout.width_field] = reports[0].width_after
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        total = sum((staging / f).stat().st_size for f in set(new_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for extra_file in folder.iterdir():  # tokenizer, generation config...
            if extra_file.is_file() and not extra_file.name.startswith(("model", "config.json")):
                shutil.copy2(extra_file, staging / extra_file.name)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StreamReport(
        target,
        tuple(reports),
        reports[0].width_before,
        reports[0].width_after,
        largest,
        sum(sizes.values()),
        total,
        time.perf_counter() - started,
    )


def _batches(names: list[str], sizes: dict[str, int], limit: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for name in names:
        if batch and sum(sizes[n] for n in batch) + sizes[name] > limit:
            yield batch
            batch = []
        batch.append(name)
    if batch:
        yield batch
