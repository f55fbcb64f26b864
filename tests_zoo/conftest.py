"""The zoo tier: neuronmerge on real torchvision architectures (random weights).

torchvision imports only beside torch 2.14.1, so this directory runs in its own venv
(``make test-zoo`` builds ``.venv-zoo``); the main suite in ``tests/`` stays on torch 2.13.0.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One torch thread: the machines these run on share their two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
