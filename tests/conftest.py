"""Shared fixtures: the paper authors' checkpoints (read in place from ../shared, never copied)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

CHECKPOINTS = Path(
    os.environ.get(
        "NEURONMERGE_KIM2020_DIR",
        Path(__file__).resolve().parents[1].parent / "shared" / "checkpoints" / "kim2020",
    )
)
LENET = CHECKPOINTS / "LeNet_300_100.original.300_100.bias.pth.tar"
RESNET56 = CHECKPOINTS / "ResNet.cifar10.original.56.pth.tar"
FASHION_MNIST = Path(
    os.environ.get("NEURONMERGE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set NEURONMERGE_KIM2020_DIR or add ../shared)")
    return path


@pytest.fixture(scope="session")
def lenet_checkpoint() -> Path:
    return _require(LENET, "the authors' LeNet-300-100 checkpoint")


@pytest.fixture(scope="session")
def resnet56_checkpoint() -> Path:
    return _require(RESNET56, "the authors' ResNet-56 checkpoint")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if (
        not (FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").exists()
        and not (FASHION_MNIST / "t10k-labels-idx1-ubyte").exists()
    ):
        pytest.skip(
            f"Fashion-MNIST not found at {FASHION_MNIST} (apt-get install dataset-fashion-mnist)"
        )
    return FASHION_MNIST


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for modules of many tiny forwards (``pytestmark`` in those modules): they
    gain nothing from threads, and OpenMP workers spinning against another busy process can slow
    them a hundredfold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
