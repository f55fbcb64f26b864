"""Compress a sharded safetensors checkpoint layer by layer, never holding the whole model.

A Hugging Face checkpoint folder (``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``) is read through the shards' own headers (``_Entry``: where each
tensor's bytes lie). Each transformer layer (``...layers.<i>.``) becomes one output shard. Only its
MLP (up, gate and down weights and biases, plus the norm it reads, for probes) is read into memory:
the tensors, read straight into their own buffers (no memory map, no copy), go into a tiny
``FeedForward`` compressed by the engine (``neuronmerge.ffn``) with ``in_place=True``, so the
compressed weights are written over the read ones instead of beside them. Every other tensor
(attention, norms, embeddings, output head) is copied from the source shard to the output shard a
block of bytes at a time, never as a tensor. So peak memory is one layer's MLP (the largest channel
group, gate and up rows, and its consumer, down's columns) plus the engine's working blocks and a
fixed overhead (the interpreter, torch), whatever the depth or the size of the embeddings.

The shards are written by ``_write`` (the safetensors format: an 8-byte header length, a JSON header
of dtypes, shapes and byte offsets, the raw bytes), since the safetensors library writes only whole
dictionaries of tensors. The output folder gets the shards, an index and the config with the new MLP
width, loadable with ``from_pretrained``; it is built in a temporary folder and renamed at the end.
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

import torch
from torch import Tensor, nn

from neuronmerge.errors import CheckpointError, InvalidArgumentError, OutputExistsError
from neuronmerge.ffn import (
    BlockReport,
    FFNOptions,
    FFNSpec,
    add_zero_biases,
    compress_block,
    has_bias,
    mlp_widths,
)


@dataclass(frozen=True)
class Layout:
    """How one ``model_type`` names its MLP (relative to the layer prefix) and its width field."""

    spec: FFNSpec
    width_field: str
    activation_field: str
    #: The config switch giving every MLP layer a bias (see ``hf.BlockKind.bias_field``).
    bias_field: str | None = None


_GATED = FFNSpec(
    "mlp.up_proj", "mlp.down_proj", "act", gate="mlp.gate_proj", norm="post_attention_layernorm"
)

#: Checkpoint layouts by ``config.json``'s ``model_type`` (the names transformers writes). Qwen2/3 and
#: Mistral store LLaMA's MLP and plain RMSNorm but have no MLP bias switch: ``merge-ls`` fits them
#: through the origin (``intercept=False``). Gemma's RMSNorm scales by ``1 + weight``: not here.
LAYOUTS: dict[str, Layout] = {
    "opt": Layout(
        FFNSpec("fc1", "fc2", "act", norm="final_layer_norm"), "ffn_dim", "activation_function"
    ),
    "llama": Layout(_GATED, "intermediate_size", "hidden_act", bias_field="mlp_bias"),
    **{
        name: Layout(_GATED, "intermediate_size", "hidden_act") for name in ("qwen2", "qwen3", "mistral")
    },
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
    #: Bytes of the largest layer's MLP as stored (up and gate rows, down columns, their biases):
    #: the channel group and its consumer, what compressing one layer must hold.
    largest_group_bytes: int
    bytes_before: int
    bytes_after: int
    seconds: float


#: safetensors' dtype names and the torch dtypes they hold.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
#: Bytes moved at once when a tensor is copied between shards or written from memory.
_COPY_BYTES = 8 * 2**20


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lies in a checkpoint: its shard, dtype name, shape and byte span in the file."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.begin


def _entries(shard: Path) -> dict[str, _Entry]:
    """Every tensor of one safetensors file, from its header alone (no data is read)."""
    try:
        with open(shard, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        return {
            name: _Entry(
                shard,
                info["dtype"],
                tuple(info["shape"]),
                8 + length + info["data_offsets"][0],
                8 + length + info["data_offsets"][1],
            )
            for name, info in header.items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{shard} is not a readable safetensors file ({exc})") from exc


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return weight_map
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    return dict.fromkeys(_entries(single), single.name)


def _index(folder: Path, weight_map: dict[str, str]) -> dict[str, _Entry]:
    """Every tensor's ``_Entry``, each shard's header read once."""
    entries: dict[str, _Entry] = {}
    for shard in dict.fromkeys(weight_map.values()):
        found = _entries(folder / shard)
        entries.update((name, found[name]) for name, where in weight_map.items() if where == shard)
    missing = [name for name in weight_map if name not in entries]
    if missing:
        raise CheckpointError(f"{missing[0]} is in the index but not in {weight_map[missing[0]]}")
    return entries


def _load(entry: _Entry) -> Tensor:
    """One tensor, read from its file straight into a buffer of its own."""
    if entry.dtype not in _DTYPES:
        raise CheckpointError(
            f"{entry.shard.name}: dtype {entry.dtype} is not one of {', '.join(_DTYPES)}"
        )
    data = torch.empty(entry.size, dtype=torch.uint8)
    with open(entry.shard, "rb") as f:
        f.seek(entry.begin)
        if f.readinto(data.numpy().data) != entry.size:
            raise CheckpointError(f"{entry.shard} ends inside a tensor")
    return data.view(_DTYPES[entry.dtype]).reshape(entry.shape)


def _read(folder: Path, weight_map: dict[str, str], names: list[str]) -> dict[str, Tensor]:
    """The tensors ``names``, read into memory (each in a buffer of its own)."""
    entries = _index(folder, {name: weight_map[name] for name in names})
    return {name: _load(entries[name]) for name in names}


def _write(path: Path, tensors: list[tuple[str, _Entry | Tensor]]) -> None:
    """A safetensors file of ``tensors``: an ``_Entry``'s bytes are copied from its shard, a block
    at a time; a tensor's are written from memory. Larger elements first, so every tensor starts at a
    multiple of its element size (the header is padded to 8 bytes, as safetensors does)."""

    def described(item: _Entry | Tensor) -> tuple[str, list[int], int]:
        if isinstance(item, Tensor):
            return _NAMES[item.dtype], list(item.shape), item.numel() * item.element_size()
        return item.dtype, list(item.shape), item.size

    def width(pair: tuple[str, _Entry | Tensor]) -> int:
        return -_DTYPES.get(described(pair[1])[0], torch.uint8).itemsize

    ordered = sorted(tensors, key=lambda pair: (width(pair), pair[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, item in ordered:
        dtype, shape, size = described(item)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    copies = [item.size for _, item in ordered if not isinstance(item, Tensor)]
    buffer = bytearray(min(_COPY_BYTES, max(copies, default=0)))  # one, reused: no heap churn
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for _, item in ordered:
            if isinstance(item, Tensor):
                data = item.detach().contiguous().reshape(-1).view(torch.uint8)
                for start in range(0, data.shape[0], _COPY_BYTES):
                    out.write(data[start : start + _COPY_BYTES].numpy().data)
                continue
            with open(item.shard, "rb") as source:
                source.seek(item.begin)
                left = item.size
                while left:
                    got = source.readinto(memoryview(buffer)[: min(left, len(buffer))])
                    if not got:
                        raise CheckpointError(f"{item.shard} ends inside a tensor")
                    out.write(memoryview(buffer)[:got])
                    left -= got


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
    """The MLP width before and after (``ffn.mlp_widths``), from the tensors' shapes alone."""
    layers = [prefix for prefix, _ in groups if prefix]
    spec, first = layout.spec, layers[0]
    width = shapes[f"{first}{spec.up}.weight"][0]
    reads = [spec.up] + ([spec.gate] if spec.gate else [])
    per_neuron = sum(
        shapes[f"{first}{path}.weight"][1] + (f"{first}{path}.bias" in shapes) for path in reads
    )
    per_neuron += shapes[f"{first}{spec.down}.weight"][0]
    (kept,) = mlp_widths(
        [(width, per_neuron * len(layers))],
        ratio=0.5 if ratio is None and target_params is None else ratio,
        target_params=target_params,
        round_to=round_to,
        total=sum(_count(shape) for shape in shapes.values()),
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


def _mlp_names(prefix: str, layout: Layout, weight_map: dict[str, str]) -> list[str]:
    """The layer's MLP tensors: its up and gate rows and its down columns (weights and biases)."""
    spec = layout.spec
    paths = [spec.up] + ([spec.gate] if spec.gate else []) + [spec.down]
    names = [f"{prefix}{path}.{leaf}" for path in paths for leaf in ("weight", "bias")]
    return [name for name in names if name in weight_map]


def _norm_names(prefix: str, layout: Layout, weight_map: dict[str, str]) -> list[str]:
    """The norm the layer's MLP reads (its probes for least squares), if the layout names one."""
    norm = layout.spec.norm
    names = [f"{prefix}{norm}.{leaf}" for leaf in ("weight", "bias")] if norm else []
    return [name for name in names if name in weight_map]


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
    entries = _index(folder, weight_map)
    sizes = {name: entry.size for name, entry in entries.items()}
    shapes = {name: list(entry.shape) for name, entry in entries.items()}
    width, kept = _kept_width(shapes, groups, layout, ratio, target_params, round_to)
    largest = max(
        sum(sizes[n] for n in _mlp_names(prefix, layout, weight_map)) for prefix, _ in groups[:-1]
    )
    limit = max(sum(sizes[n] for n in names) for prefix, names in groups if prefix)
    rest = list(_batches(groups[-1][1], sizes, limit))
    shard_count = len(groups) - 1 + len(rest)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        new_map: dict[str, str] = {}
        reports: list[BlockReport] = []
        shard = 0

        def write(tensors: list[tuple[str, _Entry | Tensor]]) -> None:
            nonlocal shard
            shard += 1
            name = f"model-{shard:05d}-of-{shard_count:05d}.safetensors"
            _write(staging / name, tensors)
            new_map.update((key, name) for key, _ in tensors)

        for prefix, names in groups:
            if not prefix:
                for batch in rest:
                    write([(name, entries[name]) for name in batch])
                continue
            read = _mlp_names(prefix, layout, weight_map) + _norm_names(prefix, layout, weight_map)
            block = _mlp_block(
                {n[len(prefix) :]: _load(entries[n]) for n in read}, layout, _ACTIVATIONS[act_name], eps
            )
            extra = options
            down_bias = getattr(block.get_submodule(layout.spec.down), "bias", None) is not None
            if method == "merge-ls" and layout.bias_field is None and not down_bias:
                extra = {"intercept": False, **options}  # no config switch for a new bias
            ffn_options = FFNOptions(1 - kept / width, method=method, extra=extra)
            # The block's tensors are ours alone: the compressed weights may overwrite them.
            reports.append(
                compress_block(block, layout.spec, ffn_options, name=prefix[:-1], in_place=True)
            )
            gained = getattr(block.get_submodule(layout.spec.down), "bias", None) is not None
            if layout.bias_field is None and gained and not down_bias:
                raise InvalidArgumentError(
                    f"{prefix[:-1]}: {method!r} gave the MLP a bias that "
                    f"{config.get('model_type')!r} configs cannot state; use method='merge'"
                )
            biased = layout.bias_field is not None and has_bias(block, layout.spec)
            if biased and not config.get(layout.bias_field):
                if len(reports) > 1:  # earlier layers were written without MLP biases
                    raise InvalidArgumentError(f"{prefix[:-1]} needs MLP biases the layers before lack")
                config[layout.bias_field] = True
            if biased:
                add_zero_biases(block, layout.spec)
            mlp = {getattr(layout.spec, a) for a in ("up", "down", "gate") if getattr(layout.spec, a)}
            compressed = {
                prefix + key: value.detach()
                for key, value in block.state_dict().items()
                if key.rpartition(".")[0] in mlp
            }
            copied = [(n, entries[n]) for n in names if n not in compressed]
            write(copied + list(compressed.items()))
            del block, compressed
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
