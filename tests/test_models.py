"""Tests of the reference architectures and their registry.

Every registered model must build, run, trace with ``torch.fx`` to the same function, and rebuild
itself from its own weights at arbitrary per-layer widths. The ResNet-56 checks against the paper
authors' released checkpoint compare our forward with an independent functional re-implementation
of their ``models/ResNet.py`` forward, written here on the raw state-dict tensors.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from neuronmerge.errors import CheckpointError, InvalidArgumentError, UnknownArchitectureError
from neuronmerge.models import (
    available_models,
    create_model,
    get_spec,
    model_from_state_dict,
)

CLASSES_BY_DATASET = {"cifar10": 10, "cifar100": 100, "fashion-mnist": 10}


pytestmark = pytest.mark.usefixtures("single_thread")


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random parameters *and* BN statistics, so that eval-mode outputs exercise every tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                shape = (module.num_features,)
                assert module.running_mean is not None and module.running_var is not None
                assert module.weight is not None and module.bias is not None
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model.eval()


def _as_tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- every registered model


@pytest.mark.parametrize("name", available_models())
def test_builds_runs_and_traces(name: str) -> None:
    spec = get_spec(name)
    model = create_model(name).eval()
    x = spec.example_inputs()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (x.shape[0], CLASSES_BY_DATASET[spec.dataset])
        assert torch.isfinite(out).all()
        traced = fx.symbolic_trace(model)
        assert torch.allclose(traced(x), out, atol=1e-6)


def test_expected_architectures_are_registered() -> None:
    names = set(available_models())
    wanted = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wrn-40-4"}
    fmnist = {"vgg-fmnist", "alexnet-fmnist", "resnet-fmnist"}
    assert wanted | fmnist | {"vgg16-cifar", "alexnet-cifar", "lenet-300-100"} <= names
    for name in names:
        spec = get_spec(name)
        assert spec.dataset in CLASSES_BY_DATASET
        assert spec.example_inputs().shape[1:] == spec.input_shape


# ---------------------------------------------------------------- per-layer widths round trip


def _rand(rng: random.Random, n: int, low: int, high: int) -> tuple[int, ...]:
    return tuple(rng.randint(low, high) for _ in range(n))


def _resnet_case(depth: int) -> Callable[[random.Random], dict[str, Any]]:
    def make(rng: random.Random) -> dict[str, Any]:
        n = (depth - 2) // 6
        return {
            "num_classes": 7,
            "stage_widths": _rand(rng, 3, 3, 12),
            "block_widths": _rand(rng, 3 * n, 1, 12),
        }

    return make


def _generic(depth_key: str, depth: int, inner: Callable[[random.Random], dict[str, Any]]):
    def make(rng: random.Random) -> dict[str, Any]:
        return {depth_key: depth, **inner(rng)}

    return make


def _wrn_case(blocks: int) -> Callable[[random.Random], dict[str, Any]]:
    def make(rng: random.Random) -> dict[str, Any]:
        return {
            "num_classes": 5,
            "stem_width": rng.randint(2, 10),
            "stage_widths": _rand(rng, 3, 2, 10),
            "block_widths": _rand(rng, 3 * blocks, 1, 10),
        }

    return make


def _vgg_case(convs: int) -> Callable[[random.Random], dict[str, Any]]:
    def make(rng: random.Random) -> dict[str, Any]:
        return {
            "num_classes": 100,
            "conv_widths": _rand(rng, convs, 1, 24),
            "classifier_width": rng.randint(1, 40),
        }

    return make


ROUND_TRIP_CASES: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "lenet-300-100": lambda rng: {"hidden": _rand(rng, 2, 1, 50), "num_classes": 10},
    "resnet20": _resnet_case(20),
    "resnet32": _resnet_case(32),
    "resnet44": _resnet_case(44),
    "resnet56": _resnet_case(56),
    "resnet110": _resnet_case(110),
    "cifar-resnet": _generic("depth", 26, _resnet_case(26)),
    "wrn-40-4": _wrn_case(6),
    "wide-resnet": _generic("depth", 16, _wrn_case(2)),
    "vgg16-cifar": _vgg_case(13),
    "vgg16-cifar100": _vgg_case(13),
    "vgg-cifar": _generic("depth", 11, _vgg_case(8)),
    "vgg-fmnist": lambda rng: {
        "num_classes": 4,
        "conv_widths": _rand(rng, 5, 1, 20),
        "classifier_width": rng.randint(1, 40),
    },
    "alexnet-fmnist": lambda rng: {
        "num_classes": 3,
        "conv_widths": _rand(rng, 5, 1, 20),
        "fc_widths": _rand(rng, 2, 1, 30),
    },
    "resnet-fmnist": lambda rng: {
        "num_classes": 6,
        "stem_width": rng.randint(1, 9),
        "stage_widths": _rand(rng, 3, 3, 12),
        "block_widths": _rand(rng, 9, 1, 12),
        "blocks_per_stage": 3,
    },
    "alexnet-cifar": lambda rng: {
        "num_classes": 3,
        "conv_widths": _rand(rng, 5, 1, 20),
        "fc_widths": _rand(rng, 2, 1, 30),
    },
}


def test_every_registered_model_has_a_round_trip_case() -> None:
    assert set(ROUND_TRIP_CASES) == set(available_models())


def _check_round_trip(name: str, config: Mapping[str, Any], seed: int) -> None:
    spec = get_spec(name)
    model = _randomize(spec.build(**config), seed)
    state_dict = model.state_dict()

    found = spec.config_from_state_dict(state_dict)
    for key, value in config.items():
        assert _as_tuples(found[key]) == _as_tuples(value), key

    rebuilt = model_from_state_dict(name, state_dict)
    assert list(rebuilt.state_dict()) == list(state_dict)
    x = spec.example_inputs(batch=3, seed=seed)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(rebuilt(x), expected)
        assert torch.allclose(fx.symbolic_trace(rebuilt)(x), expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_config_round_trip_at_random_widths(name: str, seed: int) -> None:
    config = ROUND_TRIP_CASES[name](random.Random(f"{name}-{seed}"))
    _check_round_trip(name, config, seed)


def test_wide_resnet_equal_widths_have_identity_shortcuts_only_where_legal() -> None:
    # Stem as wide as stage 1: no shortcut conv there; stride-2 stages always get one.
    config = {"depth": 10, "stem_width": 8, "stage_widths": (8, 8, 8), "block_widths": (3, 4, 5)}
    _check_round_trip("wide-resnet", config, seed=3)
    keys = create_model("wide-resnet", **config).state_dict()
    assert "block1.layer.0.convShortcut.weight" not in keys
    assert "block2.layer.0.convShortcut.weight" in keys


def test_default_widths_are_the_unpruned_ones() -> None:
    resnet = create_model("resnet56")
    assert get_spec("resnet56").config_from_state_dict(resnet.state_dict())["block_widths"] == (
        (16,) * 9 + (32,) * 9 + (64,) * 9
    )
    vgg = create_model("vgg16-cifar")
    widths = get_spec("vgg16-cifar").config_from_state_dict(vgg.state_dict())["conv_widths"]
    assert widths == (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    wrn = get_spec("wrn-40-4").config_from_state_dict(create_model("wrn-40-4").state_dict())
    assert wrn["stage_widths"] == (64, 128, 256) and wrn["stem_width"] == 16
    assert wrn["block_widths"] == (64,) * 6 + (128,) * 6 + (256,) * 6


# ---------------------------------------------------------------- errors


def test_unknown_names_raise() -> None:
    for call in (
        lambda: get_spec("resnet57"),
        lambda: create_model("no-such-net"),
        lambda: model_from_state_dict("vgg17", {}),
    ):
        with pytest.raises(UnknownArchitectureError, match="unknown architecture"):
            call()


def test_aliases_resolve() -> None:
    assert get_spec("ResNet-56").name == "resnet56"
    assert get_spec("WRN_40_4").name == "wrn-40-4"
    assert get_spec("VGG16-CIFAR10").name == "vgg16-cifar"


def test_weights_of_another_depth_are_refused() -> None:
    state_dict = create_model("resnet20").state_dict()
    with pytest.raises(CheckpointError, match="ResNet-20, not a ResNet-56"):
        model_from_state_dict("resnet56", state_dict)
    with pytest.raises(CheckpointError):
        model_from_state_dict("wrn-40-4", state_dict)
    # The depth-generic entry accepts it.
    assert model_from_state_dict("cifar-resnet", state_dict).depth == 20


def test_bad_widths_raise_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="27 entries"):
        create_model("resnet56", block_widths=[8] * 26)
    with pytest.raises(InvalidArgumentError, match="positive"):
        create_model("vgg16-cifar", conv_widths=[0] + [8] * 12)
    with pytest.raises(InvalidArgumentError, match="6n\\+2"):
        create_model("cifar-resnet", depth=57)


# ---------------------------------------------------------------- independent references


def _bn(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _reference_resnet56(sd: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The authors' ResNet forward (models/ResNet.py), on raw tensors."""
    x = _bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1")  # no ReLU after the stem
    for stage in (1, 2, 3):
        for block in range(9):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            x = F.relu(x)  # the block opens with a ReLU ...
            out = F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            out = F.relu(_bn(out, sd, f"{p}.bn1"))
            out = _bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                residual = F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride)
                residual = _bn(residual, sd, f"{p}.downsample.1")
            else:
                residual = x
            x = out + residual  # ... and closes without one
    x = F.avg_pool2d(F.relu(x), 8)
    return F.linear(x.reshape(x.shape[0], -1), sd["fc.weight"], sd["fc.bias"])


@pytest.fixture(scope="module")
def resnet56_state_dict(resnet56_checkpoint: Path) -> dict[str, torch.Tensor]:
    """The authors' released weights (``conftest`` skips, saying where it looked, if absent)."""
    checkpoint = torch.load(resnet56_checkpoint, weights_only=True, map_location="cpu")
    assert set(checkpoint) == {"acc", "state_dict"}
    return checkpoint["state_dict"]


def test_resnet56_loads_the_authors_checkpoint_strictly(
    resnet56_state_dict: dict[str, torch.Tensor],
) -> None:
    sd = resnet56_state_dict
    model = model_from_state_dict("resnet56", sd)
    ours = model.state_dict()
    assert list(ours) == list(sd)
    assert len(ours) == len(sd) == 344
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    assert n_params + n_buffers == sum(t.numel() for t in sd.values())
    assert len(list(model.parameters())) + len(list(model.buffers())) == len(sd)
    assert all(torch.equal(ours[k], sd[k]) for k in sd)


def test_resnet56_matches_an_independent_functional_forward(
    resnet56_state_dict: dict[str, torch.Tensor],
) -> None:
    sd = resnet56_state_dict
    model = model_from_state_dict("resnet56", sd)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
        reference = _reference_resnet56(sd, x)
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
        assert torch.allclose(fx.symbolic_trace(model)(x), reference, atol=1e-5, rtol=1e-5)
    assert ours.argmax(1).unique().numel() > 1  # not a degenerate constant output


def _reference_wide_resnet(sd: Mapping[str, torch.Tensor], x: torch.Tensor, blocks: int) -> torch.Tensor:
    """The authors' WideResNet forward (models/WideResNet.py), on raw tensors."""
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for stage in (1, 2, 3):
        for block in range(blocks):
            p = f"block{stage}.layer.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            activated = F.relu(_bn(out, sd, f"{p}.bn1"))
            h = F.conv2d(activated, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            h = F.relu(_bn(h, sd, f"{p}.bn2"))
            h = F.conv2d(h, sd[f"{p}.conv2.weight"], padding=1)
            if f"{p}.convShortcut.weight" in sd:  # not equalInOut: shortcut of the activation
                out = F.conv2d(activated, sd[f"{p}.convShortcut.weight"], stride=stride) + h
            else:
                out = out + h
    out = F.avg_pool2d(F.relu(_bn(out, sd, "bn1")), 8)
    return F.linear(out.reshape(out.shape[0], -1), sd["fc.weight"], sd["fc.bias"])


def test_wide_resnet_matches_the_authors_forward() -> None:
    model = _randomize(create_model("wide-resnet", depth=16, widen_factor=2), seed=5)
    sd = model.state_dict()
    keys = [k for k in sd if k.startswith("block1.layer.0.")]
    assert [k.rsplit(".", 1)[0] for k in keys if k.endswith("weight")] == [
        "block1.layer.0.bn1",
        "block1.layer.0.conv1",
        "block1.layer.0.bn2",
        "block1.layer.0.conv2",
        "block1.layer.0.convShortcut",
    ]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), _reference_wide_resnet(sd, x, blocks=2), atol=1e-5)


def _reference_vgg16(sd: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The authors' VGG forward (models/VGG.py) with ``cfg`` 16, on raw tensors."""
    index = 0
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if item == "M":
            x = F.max_pool2d(x, 2, 2)
            index += 1
            continue
        x = F.conv2d(x, sd[f"feature.{index}.weight"], padding=1)
        x = F.relu(_bn(x, sd, f"feature.{index + 1}"))
        index += 3
    x = F.avg_pool2d(x, 2).reshape(x.shape[0], -1)
    x = F.relu(_bn(F.linear(x, sd["classifier.0.weight"], sd["classifier.0.bias"]), sd, "classifier.1"))
    return F.linear(x, sd["classifier.3.weight"], sd["classifier.3.bias"])


def test_vgg16_matches_the_authors_forward() -> None:
    model = _randomize(create_model("vgg16-cifar"), seed=7)
    sd = model.state_dict()
    assert list(sd)[:6] == [
        "feature.0.weight",
        "feature.1.weight",
        "feature.1.bias",
        "feature.1.running_mean",
        "feature.1.running_var",
        "feature.1.num_batches_tracked",
    ]
    assert list(sd)[-2:] == ["classifier.3.weight", "classifier.3.bias"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(x), _reference_vgg16(sd, x), atol=1e-5)
