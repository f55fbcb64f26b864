"""Fashion-MNIST from local IDX files, normalised exactly as the paper's torchvision pipeline.

The paper's LeNet-300-100 numbers were produced with ``ToTensor()`` then
``Normalize((0.5,), (0.5,))``; we repeat that arithmetic op for op in float32 so that accuracies
computed here match the published table to the last digit, without depending on torchvision.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from neuronmerge.errors import DatasetCorruptError, DatasetNotFoundError, InvalidArgumentError
from neuronmerge.lab.data.idx import read_idx

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable naming another folder that holds the four IDX files.
ENV_VAR = "NEURONMERGE_FASHION_MNIST_DIR"

Split = Literal["train", "test"]

_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_NUM_CLASSES = 10
_IMAGE_SHAPE = (28, 28)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """The folder to read and where that choice came from (for error messages).

    Precedence: the explicit argument, then ``$NEURONMERGE_FASHION_MNIST_DIR``, then
    ``DEFAULT_DIR``.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve(), "the data_dir argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve(), f"${ENV_VAR}"
    return DEFAULT_DIR, "the default location"


def _find(directory: Path, stem: str) -> Path | None:
    """``stem`` raw or gzipped in ``directory``; raw wins because it is faster to read."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=4)
def _load_cached(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode and validate once per process; the arrays are made read-only since calls share them."""
    raw_images = read_idx(images_path)
    raw_labels = read_idx(labels_path)
    if raw_images.dtype != np.uint8 or raw_images.ndim != 3 or raw_images.shape[1:] != _IMAGE_SHAPE:
        raise DatasetCorruptError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {raw_images.dtype} {raw_images.shape}"
        )
    if raw_labels.dtype != np.uint8 or raw_labels.ndim != 1:
        raise DatasetCorruptError(
            f"{labels_path}: expected a uint8 label vector, got {raw_labels.dtype} {raw_labels.shape}"
        )
    if len(raw_labels) != len(raw_images):
        raise DatasetCorruptError(
            f"{images_path} holds {len(raw_images)} images but {labels_path} holds "
            f"{len(raw_labels)} labels"
        )
    if raw_labels.size and int(raw_labels.max()) >= _NUM_CLASSES:
        raise DatasetCorruptError(f"{labels_path}: label {int(raw_labels.max())} is not in 0..9")
    raw_images.setflags(write=False)
    raw_labels.setflags(write=False)
    return raw_images, raw_labels


def load_fashion_mnist(
    split: Split, data_dir: str | os.PathLike[str] | None = None
) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 in [-1, 1] and labels ``(N,)`` int64 of ``split``.

    The decoded files are cached per process; every call returns new, ordinary tensors that the
    caller owns (normalised like torchvision's ``ToTensor()`` then ``Normalize((0.5,), (0.5,))``).

    Raises ``DatasetNotFoundError`` (with the fix in its message) when the files are missing.
    """
    if split not in _PREFIX:
        raise InvalidArgumentError(f"split must be 'train' or 'test', not {split!r}")
    directory, origin = resolve_data_dir(data_dir)
    stems = (
        f"{_PREFIX[split]}-images-idx3-ubyte",
        f"{_PREFIX[split]}-labels-idx1-ubyte",
    )
    images_path, labels_path = (_find(directory, stem) for stem in stems)
    missing = [stem for stem, path in zip(stems, (images_path, labels_path), strict=True) if not path]
    if missing:
        names = ", ".join(f"{stem}[.gz]" for stem in missing)
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} split not found: missing {names} in {directory} "
            f"(from {origin}). Install it with `apt-get install dataset-fashion-mnist`, or pass "
            f"--data-dir DIR / set {ENV_VAR}=DIR to a folder holding the four Fashion-MNIST IDX "
            "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte, raw or .gz)."
        )
    assert images_path is not None and labels_path is not None  # for type checkers
    raw_images, raw_labels = _load_cached(images_path, labels_path)
    # ToTensor: uint8 -> float32, div(255); Normalize: sub(0.5), div(0.5), all in float32. This exact
    # arithmetic is what reproduces the paper's accuracies to the hundredth.
    images = torch.tensor(raw_images).unsqueeze(1).to(torch.float32).div_(255).sub_(0.5).div_(0.5)
    return images, torch.tensor(raw_labels, dtype=torch.int64)


def train_val_split(n: int, val_size: int = 5000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint sorted index sets ``(train, val)`` of ``range(n)``, the same for the same seed.

    Every default of the project is tuned on the validation part of the training data, never on
    the test set; a seeded generator keeps that split identical across runs and machines.
    """
    if not 0 < val_size < n:
        raise InvalidArgumentError(f"val_size must be in 1..{n - 1} for n={n}, got {val_size}")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator)
    return permutation[val_size:].sort().values, permutation[:val_size].sort().values
