"""Training loop, cache location and the trained-model cache."""

from __future__ import annotations

import json
from pathlib import Path

import platformdirs
import pytest
import torch
from torch import nn

from neuronmerge.errors import InvalidArgumentError, UnknownArchitectureError
from neuronmerge.evaluate import accuracy
from neuronmerge.lab import training
from neuronmerge.lab.data import load_fashion_mnist
from neuronmerge.lab.training import (
    CACHE_ENV_VAR,
    DEFAULT_RECIPE,
    RECIPES,
    default_cache_dir,
    recipe_for,
    train_classifier,
    trained_model,
)
from tests.idx_files import write_fashion_mnist


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated Gaussian clusters in 8 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    centres = 3.0 * torch.eye(3, 8)
    return centres[labels] + 0.5 * torch.randn(n, 8, generator=generator), labels


def _mlp() -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("neuronmerge"))


def test_train_classifier_learns_and_is_deterministic() -> None:
    images, labels = _blobs(600, seed=0)
    test_images, test_labels = _blobs(300, seed=1)
    model = _mlp()
    assert accuracy(model, test_images, test_labels) < 60.0
    trained = train_classifier(model, images, labels, epochs=3, lr=0.05, seed=7, progress=False)
    assert trained is model and not model.training
    assert accuracy(model, test_images, test_labels) > 95.0
    twin = train_classifier(_mlp(), images, labels, epochs=3, lr=0.05, seed=7, progress=False)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    other = train_classifier(_mlp(), images, labels, epochs=3, lr=0.05, seed=8, progress=False)
    assert not torch.equal(model[0].weight, other[0].weight)


def test_train_classifier_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = _blobs(64, seed=0)
    train_classifier(_mlp(), images, labels, epochs=2, lr=0.05, batch_size=16, progress=True)
    assert "epoch 2/2" in capsys.readouterr().err


def test_train_classifier_rejects_bad_arguments() -> None:
    images, labels = _blobs(10, seed=0)
    with pytest.raises(InvalidArgumentError, match="epochs >= 1"):
        train_classifier(_mlp(), images, labels, epochs=0, lr=0.1, progress=False)
    with pytest.raises(InvalidArgumentError, match="as many labels"):
        train_classifier(_mlp(), images, labels[:5], epochs=1, lr=0.1, progress=False)


def test_recipes() -> None:
    assert recipe_for("LeNet_300_100") is RECIPES["lenet-300-100"]
    with pytest.raises(UnknownArchitectureError):
        recipe_for("no-such-net")


def test_recipe_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(RECIPES, "lenet-300-100")
    assert recipe_for("lenet-300-100") is DEFAULT_RECIPE


def test_trained_model_on_fashion_mnist_then_cache_hit(
    fashion_mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    model, info = trained_model("lenet-300-100", epochs=1, data_dir=fashion_mnist_dir, progress=False)
    assert not info["cached"] and not model.training
    assert info["val_accuracy"] > 80.0  # chance is 10%
    test_images, test_labels = load_fashion_mnist("test", fashion_mnist_dir)
    assert accuracy(model, test_images, test_labels) > 80.0

    weights = tmp_path / "lenet-300-100-fashion-mnist-seed0-e1.safetensors"
    sidecar = json.loads((tmp_path / "lenet-300-100-fashion-mnist-seed0-e1.json").read_text())
    assert info["weights"] == str(weights) and weights.is_file()
    assert sidecar == {k: info[k] for k in ("arch", "seed", "epochs", "val_accuracy", "train_seconds")}
    assert sidecar["arch"] == "lenet-300-100" and sidecar["epochs"] == 1 and sidecar["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        weights.name.replace(".safetensors", ".json"),
        weights.name,
    ]

    again, again_info = trained_model("LeNet_300_100", epochs=1, progress=False)
    assert again_info == {**info, "cached": True} and not again.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_trained_model_cache_dir_seed_and_corrupt_entry(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_fashion_mnist(data, n_train=5100, n_test=10)  # 100 training images after validation
    cache = tmp_path / "cache"
    first, info = trained_model(
        "lenet-300-100", seed=3, epochs=1, data_dir=data, cache_dir=cache, progress=False
    )
    weights = cache / "lenet-300-100-fashion-mnist-seed3-e1.safetensors"
    assert Path(info["weights"]) == weights and info["seed"] == 3
    weights.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="ignoring unreadable cached model"):
        retrained, info = trained_model(
            "lenet-300-100", seed=3, epochs=1, data_dir=data, cache_dir=cache, progress=False
        )
    assert not info["cached"]
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, retrained.state_dict()[name]), name
    _, info = trained_model("lenet-300-100", seed=3, epochs=1, cache_dir=cache, progress=False)
    assert info["cached"]


def test_a_recipe_with_another_learning_rate_is_cached_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    write_fashion_mnist(data, n_train=5100, n_test=10)
    cache = tmp_path / "cache"
    options = {"epochs": 1, "data_dir": data, "cache_dir": cache, "progress": False}
    default, info = trained_model("lenet-300-100", **options)
    assert Path(info["weights"]).name == "lenet-300-100-fashion-mnist-seed0-e1.safetensors"
    monkeypatch.setitem(RECIPES, "lenet-300-100", training.Recipe(epochs=30, lr=0.1))
    faster, info = trained_model("lenet-300-100", **options)
    assert not info["cached"]  # not the weights trained at the default rate
    assert Path(info["weights"]).name == "lenet-300-100-fashion-mnist-seed0-e1-lr0.1.safetensors"
    assert not torch.equal(default.ip1.weight, faster.ip1.weight)


def test_trained_model_rejects_bad_epochs(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="epochs must be at least 1"):
        trained_model("lenet-300-100", epochs=0, cache_dir=tmp_path, progress=False)


def test_trained_model_writes_no_temporary_files_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    write_fashion_mnist(data, n_train=5010, n_test=10)

    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(training, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        trained_model("lenet-300-100", epochs=1, data_dir=data, cache_dir=tmp_path / "c", progress=False)
    assert list((tmp_path / "c").iterdir()) == []
