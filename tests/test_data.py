"""The IDX reader, the Fashion-MNIST loader and the validation split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronmerge.errors import DatasetCorruptError, DatasetNotFoundError, InvalidArgumentError
from neuronmerge.lab.data import ENV_VAR, load_fashion_mnist, read_idx, train_val_split
from tests.idx_files import idx_bytes, write_fashion_mnist, write_idx


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trips_every_type(tmp_path: Path, compress: bool, dtype: type) -> None:
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    result = read_idx(write_idx(tmp_path / "a.idx", array, compress))
    assert result.dtype == np.dtype(dtype) and result.dtype.isnative
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable


def test_gzip_is_recognised_by_content_not_name(tmp_path: Path) -> None:
    array = np.array([1, 2, 255], dtype=np.uint8)
    path = tmp_path / "labels-without-gz-suffix"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(path), array)


def test_bad_magic_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x00\x08\x01" + bytes(8))
    with pytest.raises(DatasetCorruptError, match=r"not an IDX file \(magic 01 00 08 01"):
        read_idx(path)


def test_unknown_type_code_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DatasetCorruptError, match="unknown IDX type code 0x07"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_payload_is_reported(tmp_path: Path, compress: bool) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))[:-10]
    path = tmp_path / "short"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DatasetCorruptError, match=r"payload is 3126 bytes .* need 3136 bytes"):
        read_idx(path)


def test_truncated_header_and_empty_file_are_reported(tmp_path: Path) -> None:
    (tmp_path / "header").write_bytes(b"\x00\x00\x08\x03" + bytes(5))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DatasetCorruptError, match="header with 3 dimensions is truncated"):
        read_idx(tmp_path / "header")
    with pytest.raises(DatasetCorruptError, match="not an IDX file"):
        read_idx(tmp_path / "empty")


def test_damaged_gzip_stream_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(1000, dtype=np.uint8)))[:20])
    with pytest.raises(DatasetCorruptError, match="damaged gzip stream"):
        read_idx(path)


def test_missing_idx_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="IDX file not found"):
        read_idx(tmp_path / "nope")


def test_real_fashion_mnist(fashion_mnist_dir: Path) -> None:
    for split, n, first in (
        ("train", 60000, [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]),
        ("test", 10000, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
    ):
        images, labels = load_fashion_mnist(split, fashion_mnist_dir)
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert labels[:10].tolist() == first
        assert labels.bincount().tolist() == [n // 10] * 10
        assert images.min().item() == -1.0 and images.max().item() == 1.0


def test_normalisation_is_torchvision_arithmetic(tmp_path: Path) -> None:
    raw = np.resize(np.arange(256, dtype=np.uint8), (1, 28, 28))  # every pixel value
    write_idx(tmp_path / "t10k-images-idx3-ubyte", raw, compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3], dtype=np.uint8), compress=False)
    images, labels = load_fashion_mnist("test", tmp_path)
    # ToTensor() divides the float32 image by 255; Normalize((0.5,), (0.5,)) then subtracts
    # and divides by float32 0.5, each step rounded to float32.
    expected = (raw.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(images.numpy()[:, 0], expected)
    assert labels.tolist() == [3]


def test_loader_returns_tensors_the_caller_owns(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=3, n_test=2)
    images, labels = load_fashion_mnist("test", tmp_path)
    pristine, pristine_labels = images.clone(), labels.clone()
    images.add_(1)  # the caller's own copy: writes and autograd are allowed ...
    labels[0] = labels[0] + 1
    images.requires_grad_(True).sum().backward()
    again, labels_again = load_fashion_mnist("test", tmp_path)
    assert torch.equal(again, pristine)  # ... and never reach the shared cache
    assert torch.equal(labels_again, pristine_labels)


def test_missing_dataset_message_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("train", tmp_path / "empty")
    message = str(info.value)
    assert "dataset-fashion-mnist" in message and str(tmp_path / "empty") in message
    assert "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]" in message
    assert "--data-dir" in message and ENV_VAR in message


def test_only_the_missing_file_is_named(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=3, n_test=2)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\] in"):
        load_fashion_mnist("test", tmp_path)


def test_env_var_overrides_default_and_argument_overrides_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = write_fashion_mnist(tmp_path / "env", n_train=4, n_test=3, seed=1)
    from_arg = write_fashion_mnist(tmp_path / "arg", n_train=5, n_test=3, seed=2)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    _, labels = load_fashion_mnist("train")
    assert labels.tolist() == from_env["train-labels"].tolist()
    _, labels = load_fashion_mnist("train", tmp_path / "arg")
    assert labels.tolist() == from_arg["train-labels"].tolist()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=f"from \\${ENV_VAR}"):
        load_fashion_mnist("test")


def test_inconsistent_files_are_corrupt(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=3, n_test=2)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1], dtype=np.uint8), compress=False)
    with pytest.raises(DatasetCorruptError, match="holds 2 images but .* holds 1 labels"):
        load_fashion_mnist("test", tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 10], dtype=np.uint8), False)
    with pytest.raises(DatasetCorruptError, match="label 10 is not in 0..9"):
        load_fashion_mnist("test", tmp_path)


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="split must be"):
        load_fashion_mnist("val", tmp_path)  # type: ignore[arg-type]


def test_train_val_split_is_a_deterministic_partition() -> None:
    train, val = train_val_split(60000)
    assert len(train) == 55000 and len(val) == 5000
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60000))
    again_train, again_val = train_val_split(60000)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, train_val_split(60000, seed=1)[1])
    assert torch.equal(val, val.sort().values)
    assert val.float().mean().item() == pytest.approx(30000, rel=0.05)  # not a prefix


@pytest.mark.parametrize("val_size", [0, 10, -1])
def test_train_val_split_rejects_bad_sizes(val_size: int) -> None:
    with pytest.raises(InvalidArgumentError, match="val_size"):
        train_val_split(10, val_size=val_size)
