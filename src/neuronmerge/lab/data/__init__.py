"""Datasets used to train and evaluate the reference models, read from local files only.

Nothing here downloads: the data come from a system package or a folder the user names, so that a
run is reproducible offline and never depends on a third-party mirror being up.
"""

from neuronmerge.lab.data.fashion_mnist import (
    DEFAULT_DIR,
    ENV_VAR,
    load_fashion_mnist,
    resolve_data_dir,
    train_val_split,
)
from neuronmerge.lab.data.idx import read_idx

__all__ = [
    "DEFAULT_DIR",
    "ENV_VAR",
    "load_fashion_mnist",
    "read_idx",
    "resolve_data_dir",
    "train_val_split",
]
