"""A registry of reference architectures, addressed by name (in the spirit of timm's registry).

Each entry knows how to build its network at any layer widths and how to read those widths back from
a state dict. The second half is what lets a merged (narrower) model be saved as plain tensors and
rebuilt later without pickling any code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuronmerge.errors import UnknownArchitectureError

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture and how to recover its configuration from weights."""

    name: str
    build: Callable[..., nn.Module]
    config_from_state_dict: Callable[[StateDict], dict[str, Any]]
    input_shape: tuple[int, ...]
    dataset: str
    description: str
    aliases: tuple[str, ...] = field(default=())

    def example_inputs(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """A deterministic random batch of this architecture's input shape (for tracing)."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape), generator=generator)


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` under its name and aliases (compared ignoring case and ``_`` vs ``-``)."""
    for alias in (spec.name, *spec.aliases):
        key = _key(alias)
        if key in _ALIASES and _ALIASES[key] != spec.name:
            raise ValueError(f"architecture name {alias!r} is already registered")
        _ALIASES[key] = spec.name
    _REGISTRY[spec.name] = spec
    return spec


def available_models() -> list[str]:
    """The canonical names of every registered architecture, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name`` (or one of its aliases)."""
    canonical = _ALIASES.get(_key(name))
    if canonical is None:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; known: {', '.join(available_models())}"
        )
    return _REGISTRY[canonical]


def create_model(name: str, **config: Any) -> nn.Module:
    """Build architecture ``name`` with ``config`` (default widths when empty)."""
    return get_spec(name).build(**config)


def model_from_state_dict(name: str, state_dict: StateDict) -> nn.Module:
    """Build ``name`` at the widths found in ``state_dict`` and load it strictly.

    Raises ``CheckpointError`` when the tensors do not belong to this architecture.
    """
    from neuronmerge.errors import CheckpointError

    spec = get_spec(name)
    try:
        model = spec.build(**spec.config_from_state_dict(state_dict))
        model.load_state_dict(state_dict, strict=True)
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        keys = list(state_dict)
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        raise CheckpointError(
            f"these weights are not a {spec.name} ({len(keys)} tensors: {shown}): {exc}"
        ) from exc
    return model.eval()
