"""The zoo tier: neuronmerge on real torchvision architectures (random weights).

torchvision imports only beside torch 2.14.1, so this directory runs in its own venv
(``make test-zoo`` builds ``.venv-zoo``); the main suite in ``tests/`` stays on torch 2.13.0.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def reach() -> ModuleType:
    """``benchmarks/reach.py`` as a module: its model list and table are what this tier tests."""
    spec = importlib.util.spec_from_file_location("reach", ROOT / "benchmarks" / "reach.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One torch thread: the machines these run on share their two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
