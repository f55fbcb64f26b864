"""Synthetic probes of a trained model, kept on disk between experiment runs.

``probes.cached_probes`` keeps them in memory for one process; the budget experiments run in
several processes on a shared machine, where making them costs minutes per model. The file is keyed
by a digest of the model's weights and of the probe settings, so other weights never reuse it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from neuronmerge import probes
from neuronmerge.capture import capture
from neuronmerge.lab.training import default_cache_dir


def _digest(model: nn.Module, example: torch.Tensor) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    settings = (
        probes.PROBES,
        probes.MATCHED,
        probes.FULL,
        probes.DERIVED,
        probes.FORWARD_MACS,
        probes.NOISE,
    )
    h.update(repr((settings, tuple(example.shape[1:]))).encode())
    return h.hexdigest()[:16]


def probe_batches(name: str, model: nn.Module, example: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The model's synthetic probes (``probes.cached_probes``), read from or written to the cache."""
    path = Path(default_cache_dir()) / f"probes-{name}-{_digest(model, example)}.pt"
    if path.is_file():
        return [tuple(batch) for batch in torch.load(path, weights_only=True)]
    made = probes.cached_probes(capture(model, example), example)
    tmp = path.with_suffix(".tmp")
    torch.save([list(batch) for batch in made], tmp)
    tmp.replace(path)
    return made
