"""The engine across architectures: every registered model, hand-built graphs, random conv stacks.

Exactness is checked on networks that hold exactly mergeable neurons (``plant_duplicates`` in
``tests/builders.py``): every removed neuron is a positive multiple, on what its channel computes
before the activation (folded rows under a BatchNorm), of a kept one, so ``fidelity="exact"`` must
reproduce the function to float64 rounding. Every merge is also compared with plain pruning of the same
neurons, which must *not* reproduce it: the duplicates matter, so exactness is not vacuous. Where a
layer must be refused, ``plan`` must give the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import neuronmerge as nm
from neuronmerge.criteria import kept_count
from neuronmerge.models import (
    AlexNetCifar,
    AlexNetFmnist,
    CifarResNet,
    LeNet300100,
    ResNetFmnist,
    VGGCifar,
    VGGFmnist,
    WideResNet,
    available_models,
    create_model,
    get_spec,
    model_from_state_dict,
)
from tests.builders import compress_announced, plant_duplicates

RTOL, ATOL = 1e-9, 1e-10
OUTPUT = "channels are part of the model's output"
NON_HOMOGENEOUS = (
    "{} is not positively homogeneous (f(s*x) != s*f(x)); "
    "approximate=True merges through it and measures the error"
)
RESIDUAL = "channels are tied to a residual add"
PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d)

#: producer -> (its BatchNorm, {(consumer, first input column, columns per channel)})
SiteMap = dict[str, tuple[str | None, set[tuple[str, int, int]]]]


pytestmark = pytest.mark.usefixtures("single_thread")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def site_map(found: nm.Plan) -> SiteMap:
    return {
        s.producer: (s.norm, {(c.module, c.offset, c.block) for c in s.consumers}) for s in found.sites
    }


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert [t.shape for t in got] == [t.shape for t in expected]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=RTOL, atol=ATOL), (a - b).abs().max()


def merge_planted(
    model: nn.Module,
    x: torch.Tensor,
    ratio: float = 0.5,
    criterion: str = "l2-norm",
    seed: int = 0,
    **options: Any,
) -> nm.Result:
    """Plant exact duplicates at every site of ``model``, merge, and check the merge is exact (and
    that pruning the same neurons is not); return the merge."""
    found = nm.plan(model, x)
    counts = plant_duplicates(model, found.sites, ratio, criterion, torch.Generator().manual_seed(seed))
    result = compress_announced(model, x, ratio, criterion=criterion, threshold=None, **options)
    expected = outputs(model, x)
    assert_same(outputs(result.model, x), expected)
    merged = {s.producer: (s.kept, s.merged, s.dropped) for s in result.report.sites}
    assert merged == {p: (k, d, 0) for p, (k, d) in counts.items() if p in merged}
    if "include" not in options and "exclude" not in options:
        assert merged.keys() == counts.keys()
    assert result.report.params_before == params(model)
    assert result.report.params_after == params(result.model)
    if any(d for p, (_, d) in counts.items() if p in merged):
        assert params(result.model) < params(model)
        with warnings.catch_warnings():  # the same shortfall compress announced above
            warnings.simplefilter("ignore", nm.CompressionWarning)
            pruned = nm.prune(model, x, ratio, criterion=criterion, **options)
        assert params(pruned) == params(result.model)
        assert any(
            not torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(outputs(pruned, x), expected)
        ), "pruning the duplicates changes nothing: the exactness check would be vacuous"
    else:
        assert params(result.model) == params(model)
    return result


# =============================================================================================
# 1. Every registered architecture
# =============================================================================================


def streams(
    stages: list[list[str]], conv1: str, shortcut: Callable[[str], str | None], stem: str | None
) -> SiteMap:
    """The residual streams of a three-stage ResNet: one group per stage, named by its first
    producer (the stem, or the first block's conv2), read by every later block's conv1 and by the
    next stage's first block (its conv1 and its shortcut conv), or by ``fc`` after the last."""
    found: SiteMap = {}
    for s, blocks in enumerate(stages):
        name = stem if s == 0 and stem is not None else f"{blocks[0]}.conv2"
        # A stream opened by the stem is read by every block of its stage, the first one too.
        readers = {(f"{b}.{conv1}", 0, 1) for b in blocks[(0 if name == stem else 1) :]}
        if s + 1 < len(stages):
            first = stages[s + 1][0]
            cut = shortcut(first)
            readers |= {(f"{first}.{conv1}", 0, 1)} | ({(cut, 0, 1)} if cut else set())
        else:
            readers.add(("fc", 0, 1))
        found[name] = (None, readers)
    return found


def expected_sites(model: nn.Module) -> SiteMap:
    """The groups each reference architecture must have, derived from its structure."""
    if isinstance(model, CifarResNet):
        n = len(model.layer1)
        stages = [[f"layer{s}.{b}" for b in range(n)] for s in (1, 2, 3)]
        found: SiteMap = {
            f"{b}.conv1": (f"{b}.bn1", {(f"{b}.conv2", 0, 1)}) for blocks in stages for b in blocks
        }
        # The stem opens stage 1's stream; later stages open with a 1x1 conv shortcut.
        return found | streams(stages, "conv1", lambda b: f"{b}.downsample.0", "conv1")
    if isinstance(model, WideResNet):
        n = len(model.block1.layer)
        stages = [[f"block{s}.layer.{b}" for b in range(n)] for s in (1, 2, 3)]
        found = {f"{b}.conv1": (f"{b}.bn2", {(f"{b}.conv2", 0, 1)}) for blocks in stages for b in blocks}
        # The stem feeds nothing but the first block's bn1 (that block's shortcut is a conv on the
        # activated input, not the raw one), so bn1 folds into the stem and the stem merges too.
        first = stages[0][0]
        assert model.block1.layer[0].convShortcut is not None
        found["conv1"] = (
            f"{first}.bn1",
            {(f"{first}.conv1", 0, 1), (f"{first}.convShortcut", 0, 1)},
        )
        return found | streams(stages, "conv1", lambda b: f"{b}.convShortcut", None)
    if isinstance(model, VGGCifar):
        convs = [i for i, m in enumerate(model.feature) if isinstance(m, nn.Conv2d)]
        readers = [f"feature.{i}" for i in convs[1:]] + ["classifier.0"]  # avgpool leaves 1x1
        found = {f"feature.{i}": (f"feature.{i + 1}", {(r, 0, 1)}) for i, r in zip(convs, readers)}
        found["classifier.0"] = ("classifier.1", {("classifier.3", 0, 1)})
        return found
    if isinstance(model, AlexNetCifar):
        convs = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
        found = {c: (None, {(r, 0, 1)}) for c, r in zip(convs, convs[1:])}
        found[convs[-1]] = (None, {("classifier.1", 0, 16)})  # a 4x4 map, flattened
        found["classifier.1"] = (None, {("classifier.4", 0, 1)})
        found["classifier.4"] = (None, {("classifier.6", 0, 1)})
        return found
    if isinstance(model, LeNet300100):
        return {"ip1": (None, {("ip2", 0, 1)}), "ip2": (None, {("ip3", 0, 1)})}
    if isinstance(model, VGGFmnist):
        convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
        readers = [(f"features.{i}", 1) for i in convs[1:]] + [("classifier.0", 9)]  # a 3x3 map
        found = {
            f"features.{i}": (f"features.{i + 1}", {(r, 0, block)})
            for i, (r, block) in zip(convs, readers)
        }
        found["classifier.0"] = ("classifier.1", {("classifier.3", 0, 1)})
        return found
    if isinstance(model, AlexNetFmnist):
        convs = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
        found = {c: (None, {(r, 0, 1)}) for c, r in zip(convs, convs[1:])}
        found[convs[-1]] = (None, {("classifier.1", 0, 9)})  # a 3x3 map, flattened
        found["classifier.1"] = (None, {("classifier.4", 0, 1)})
        found["classifier.4"] = (None, {("classifier.6", 0, 1)})
        return found
    if isinstance(model, ResNetFmnist):
        n = len(model.layer1)
        stages = [[f"layer{s}.{b}" for b in range(n)] for s in (1, 2, 3)]
        found = {f"{b}.conv1": (f"{b}.bn1", {(f"{b}.conv2", 0, 1)}) for bs in stages for b in bs}
        # Every stage downsamples, so the first block has a conv shortcut and the stem merges too.
        found["conv1"] = ("bn1", {("layer1.0.conv1", 0, 1), ("layer1.0.shortcut.0", 0, 1)})
        return found | streams(stages, "conv1", lambda b: f"{b}.shortcut.0", None)
    raise AssertionError(f"no expected sites for {type(model).__name__}: add them here")


def small_config(name: str) -> dict[str, Any]:
    """Tiny widths for each registered architecture (the float64 exactness checks)."""
    if name == "vgg-fmnist":
        return {"conv_widths": (4, 6, 5, 8, 7), "classifier_width": 10}
    if name == "resnet-fmnist":
        return {"stage_widths": (4, 6, 8), "stem_width": 5}
    if name.startswith(("wrn", "wide")):
        return {"stage_widths": (6, 8, 10), "stem_width": 4}
    if "resnet" in name:
        return {"stage_widths": (4, 6, 8)}
    if name.startswith("vgg"):
        return {"conv_widths": tuple(4 + i % 4 for i in range(13)), "classifier_width": 10}
    if name.startswith("alexnet"):
        return {"conv_widths": (6, 8, 10, 8, 8), "fc_widths": (12, 10)}
    if name.startswith("lenet"):
        return {"hidden": (24, 12)}
    raise AssertionError(f"no small configuration for {name}: add one")


def check_plan(model: nn.Module, found: nm.Plan) -> None:
    assert site_map(found) == expected_sites(model)
    producers = {n for n, m in model.named_modules() if isinstance(m, PRODUCERS)}
    reasons = {s.producer: s.reason for s in found.skipped}
    grouped = {p for g in found.sites for p in g.producers}
    assert set(reasons) == producers - grouped
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert reasons.pop(head) == OUTPUT
    assert not reasons  # residual streams are groups too


@pytest.mark.parametrize("name", available_models())
def test_zoo_plan_merge_and_reload(name: str) -> None:
    """Default widths: the expected plan; a 0.5 merge shrinks the model; its weights reload into
    the registered architecture and compute the same."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = spec.example_inputs(batch=2)
    found = nm.plan(model, x)
    check_plan(model, found)

    result = nm.compress(model, x, 0.5)
    report = result.report
    assert [s.producer for s in report.sites] == [s.producer for s in found.sites]
    assert all(s.kept == kept_count(s.channels, 0.5) for s in report.sites)
    assert report.params_before == params(model)
    assert report.params_after == params(result.model) < report.params_before
    reloaded = model_from_state_dict(name, result.model.state_dict())
    assert params(reloaded) == report.params_after
    for a, b in zip(outputs(reloaded, x), outputs(result.model, x)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", available_models())
def test_zoo_merges_planted_duplicates_exactly(name: str) -> None:
    """Tiny widths, float64: duplicates planted at every site merge with no error, and the merged
    weights reload into the registered architecture."""
    spec = get_spec(name)
    torch.manual_seed(1)
    model = create_model(name, **small_config(name)).double().eval()
    x = spec.example_inputs(batch=4).double()
    check_plan(model, nm.plan(model, x))
    result = merge_planted(model, x, 0.5, criterion="l2-norm", seed=2)
    paper = compress_announced(model, x, 0.5, fidelity="paper")  # runs; floors conv kept counts
    assert [t.shape for t in outputs(paper.model, x)] == [t.shape for t in outputs(model, x)]
    assert paper.report.params_after < paper.report.params_before
    # The paper's method keeps to its own pattern: no residual stream.
    assert all(len(s.producers) == 1 for s in paper.report.sites)
    state = result.model.state_dict()
    reloaded = model_from_state_dict(name, state).double()
    reloaded.load_state_dict(state)  # again, now without the float32 round trip
    assert_same(outputs(reloaded, x), outputs(model, x))


# =============================================================================================
# 2. Hand-built graphs
# =============================================================================================


class Inception(nn.Module):
    """stem -> {1x1 conv-BN, 3x3 conv without bias} -> cat -> conv -> global pool -> flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.Conv2d(6, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.b2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.mix = nn.Conv2d(10, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        a = F.relu(self.bn1(self.b1(x)))
        b = torch.relu(self.b2(x))
        x = F.relu(self.mix(torch.cat([a, b], dim=1)))
        return self.fc(torch.flatten(self.pool(x), 1))


#: Ways to flatten the (N, 13, 4, 4) map of ``CatFlatten``; the literal ones must be rewritten.
FLATTENS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "torch.flatten": lambda h: torch.flatten(h, 1),
    "view(size(0), -1)": lambda h: h.view(h.size(0), -1),
    "view(shape[0], -1)": lambda h: h.view(h.shape[0], -1),
    "view(-1, literal)": lambda h: h.view(-1, 13 * 16),
    "reshape(tuple literal)": lambda h: torch.reshape(h, (-1, 13 * 16)),
    "flatten then no-op literal view": lambda h: h.flatten(1).view(-1, 13 * 16),
    # A literal passed by keyword: see test_literal_size_passed_by_keyword_is_rewritten.
    "torch.reshape(shape=literal)": lambda h: torch.reshape(h, shape=(-1, 13 * 16)),
    "view(size=literal)": lambda h: h.view(size=(-1, 13 * 16)),
}
KEYWORD_FLATTENS = ("torch.reshape(shape=literal)", "view(size=literal)")


class CatFlatten(nn.Module):
    """The pooled input and two conv branches, concatenated (3 + 4 + 6 channels), flattened."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.flatten = flatten
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn_b = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(13 * 16, 10)
        self.fc2 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.max_pool2d(F.relu(self.a(x)), 2)
        b = F.avg_pool2d(F.leaky_relu(self.bn_b(self.b(x)), 0.1), 2)
        h = FLATTENS[self.flatten](torch.cat([F.avg_pool2d(x, 2), a, b], 1))
        return self.fc2(F.relu(self.fc1(h)))


CAT_FLATTEN_SITES: SiteMap = {
    "a": (None, {("fc1", 3 * 16, 16)}),
    "b": ("bn_b", {("fc1", 7 * 16, 16)}),
    "fc1": (None, {("fc2", 0, 1)}),
}


class Dense(nn.Module):
    """DenseNet-style: every conv reads the concatenation of all earlier feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv0(x))
        x = torch.cat([x, F.relu(self.conv1(x))], 1)
        x = torch.cat((x, F.relu(self.conv2(x))), dim=-3)
        x = F.adaptive_max_pool2d(F.relu(self.conv3(x)), 1)
        return self.fc(x.flatten(1))


class Functional(nn.Module):
    """Only functional ops between the layers, dropout following ``self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(4 * 4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.leaky_relu(self.conv2(x), 0.2), 2)
        x = x.view(x.size(0), -1)
        x = F.dropout(self.fc1(x), 0.5, training=self.training)
        return self.fc2(x.relu())


class Diamond(nn.Module):
    """One conv's channels reach the next conv twice, max- and average-pooled, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.max = nn.MaxPool2d(3, stride=1, padding=1)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.b = nn.Conv2d(12, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = F.relu(self.b(torch.cat([self.max(h), self.avg(h)], 1)))
        return self.fc(h.mean((2, 3)))


class Reductions(nn.Module):
    """Global pooling written as reductions; a BatchNorm whose producer's size is read too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.across = nn.Conv2d(3, 4, 1)
        self.fc_spatial = nn.Linear(6, 5)
        self.tok, self.head = nn.Linear(5, 7), nn.Linear(7, 2)
        self.everything = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        batch = h.size(0)
        h = torch.relu(self.bn(h)).amax(dim=3).mean(-1, keepdim=True).view(batch, -1)
        tokens = self.fc_spatial(h).unsqueeze(1).expand(-1, 3, -1)  # (B, 3, 5)
        pooled = F.relu(self.tok(tokens)).mean(1)  # mean over tokens: the channels stay apart
        side = self.across(x).mean(1).flatten(1).sum(1, keepdim=True)
        total = torch.sum(self.everything(tokens))
        return self.head(pooled) + side + total


class Nested(nn.Module):
    """A ModuleList of nested Sequentials run in a loop: LeakyReLU, PReLU(1), dropout, pools."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)),
                    nn.LeakyReLU(0.1),
                    nn.MaxPool2d(2),
                ),
                nn.Sequential(
                    nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
                    nn.PReLU(),
                    nn.Dropout2d(0.3),
                ),
                nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AvgPool2d(2)),
            ]
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Sequential(nn.Linear(24, 10), nn.ReLU(), nn.Dropout(0.5)),
            nn.Linear(10, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def conv1d_stack() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 8, 3, padding=1),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(8, 6, 3, bias=False),
        nn.LeakyReLU(0.05),
        nn.AdaptiveAvgPool1d(2),
        nn.Flatten(),
        nn.Linear(12, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    )


def tokens_mlp() -> nn.Module:
    """Linear layers on (N, L, C) inputs."""
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.PReLU(), nn.Linear(6, 2))


def bias_free() -> nn.Module:
    """Conv and Linear without bias, BatchNorm1d after a Linear, one BatchNorm without affine."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.BatchNorm2d(4, affine=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16, 10, bias=False),
        nn.BatchNorm1d(10),
        nn.ReLU(),
        nn.Linear(10, 8, bias=False),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


class NoOpLiteralView(nn.Module):
    """``x.view(-1, 8)`` does not change the shape, but its literal 8 goes stale after a merge."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).view(-1, 8))


class Shared(nn.Module):
    """One Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.shared(F.relu(self.fc1(x))))
        return self.out(F.relu(self.shared(x)))


class Grouped(nn.Module):
    """A depthwise conv and a 2-group conv between plain ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.g = nn.Conv2d(6, 6, 1, groups=2)
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pw(F.relu(self.dw(F.relu(self.a(x))))))
        x = F.adaptive_avg_pool2d(self.g(x), 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class Smooth(nn.Module):
    """Non-homogeneous activations, as modules and as functions, then one ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))
        self.gelu, self.silu, self.tanh, self.relu6 = nn.GELU(), nn.SiLU(), nn.Tanh(), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fc
        x = self.silu(f[1](self.gelu(f[0](x))))
        x = torch.tanh(f[2](x))
        x = self.tanh(f[3](x))
        x = F.silu(f[4](x))
        x = self.relu6(f[5](x))
        return f[7](F.relu(f[6](x)))


class TwoOutputs(nn.Module):
    """Returns the hidden features beside the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.fc3(h), h


class Misc(nn.Module):
    """Assorted cases: per-channel PReLU, active dropout, BN without running statistics, a residual
    stream read by a conv through an unsqueeze, and a 2d pool on a (N, C, L) map (it pools across
    the channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.prelu = nn.PReLU(6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6, track_running_stats=False)
        self.fc4 = nn.Linear(6, 6)
        self.fc5 = nn.Linear(6, 6)
        self.c1 = nn.Conv1d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.c2 = nn.Conv1d(4, 2, 1)
        self.fc6 = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.prelu(self.fc1(x)))
        # training=True: active even in eval mode (p=0 keeps this test deterministic)
        x = self.fc3(F.dropout(F.relu(x), 0.0))
        x = self.fc4(F.relu(self.bn(x)))
        x = self.fc5(F.relu(x)) + x
        x = self.c2(self.pool(F.relu(self.c1(x.unsqueeze(1))))).flatten(1)
        return self.fc6(x)


class Tied(nn.Module):
    """A tiny language model whose output layer shares the embedding matrix."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.emb(tokens))))


class ReadsWeights(nn.Module):
    """Uses a layer's weight outside the layer, and a layer whose weight another module holds."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 6)
        self.twin = nn.Linear(6, 6)
        self.twin.weight = self.fc3.weight
        self.fc4 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x)) * self.fc1.weight.abs().mean()
        h = F.relu(self.fc3(F.relu(self.fc2(h))))
        return self.fc4(h) + self.twin(h).sum(1, keepdim=True)


def weight_normed() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0] = parametrizations.weight_norm(model[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based one is deprecated
        model[2] = torch.nn.utils.weight_norm(model[2])
    return model


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    sites: SiteMap
    skipped: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "inception": Case(
        Inception,
        (4, 3, 8, 8),
        {
            "stem": (None, {("b1", 0, 1), ("b2", 0, 1)}),
            "b1": ("bn1", {("mix", 0, 1)}),
            "b2": (None, {("mix", 4, 1)}),
            "mix": (None, {("fc", 0, 1)}),
        },
        {"fc": OUTPUT},
    ),
    **{
        f"cat-flatten {style}": Case(
            lambda style=style: CatFlatten(style),
            (4, 3, 8, 8),
            CAT_FLATTEN_SITES,
            {"fc2": OUTPUT},
        )
        for style in FLATTENS
        if style not in KEYWORD_FLATTENS
    },
    "dense block": Case(
        Dense,
        (4, 3, 6, 6),
        {
            "conv0": (None, {("conv1", 0, 1), ("conv2", 0, 1), ("conv3", 0, 1)}),
            "conv1": (None, {("conv2", 4, 1), ("conv3", 4, 1)}),
            "conv2": (None, {("conv3", 8, 1)}),
            "conv3": (None, {("fc", 0, 1)}),
        },
        {"fc": OUTPUT},
    ),
    "functional": Case(
        Functional,
        (4, 3, 8, 8),
        {
            "conv1": (None, {("conv2", 0, 1)}),
            "conv2": (None, {("fc1", 0, 4)}),
            "fc1": (None, {("fc2", 0, 1)}),
        },
        {"fc2": OUTPUT},
    ),
    "diamond": Case(
        Diamond,
        (4, 3, 6, 6),
        {"a": (None, {("b", 0, 1), ("b", 6, 1)}), "b": (None, {("fc", 0, 1)})},
        {"fc": OUTPUT},
    ),
    "reductions": Case(
        Reductions,
        (4, 3, 6, 6),
        {
            "conv": ("bn", {("fc_spatial", 0, 1)}),
            "fc_spatial": (None, {("tok", 0, 1), ("everything", 0, 1)}),
            "tok": (None, {("head", 0, 1)}),
        },
        {
            "across": ".mean() reduces over the channel axis",
            "everything": "sum reduces over every axis, the channels' included",
            "head": OUTPUT,
        },
    ),
    "nested": Case(
        Nested,
        (4, 3, 8, 8),
        {
            "stages.0.0.0": ("stages.0.0.1", {("stages.1.0.0", 0, 1)}),
            "stages.1.0.0": ("stages.1.0.1", {("stages.2.0", 0, 1)}),
            "stages.2.0": (None, {("head.2.0", 0, 4)}),
            "head.2.0": (None, {("head.3", 0, 1)}),
        },
        {"head.3": OUTPUT},
    ),
    "conv1d": Case(
        conv1d_stack,
        (4, 2, 16),
        {
            "0": ("1", {("4", 0, 1)}),
            "4": (None, {("8", 0, 2)}),
            "8": (None, {("10", 0, 1)}),
        },
        {"10": OUTPUT},
    ),
    "linear on (N, L, C)": Case(
        tokens_mlp,
        (4, 5, 4),
        {"0": (None, {("2", 0, 1)}), "2": (None, {("4", 0, 1)})},
        {"4": OUTPUT},
    ),
    "bias-free, BatchNorm1d, affine=False": Case(
        bias_free,
        (4, 3, 8, 8),
        {
            "0": (None, {("3", 0, 1)}),
            "3": ("4", {("7", 0, 16)}),
            "7": ("8", {("10", 0, 1)}),
            "10": (None, {("12", 0, 1)}),
        },
        {"12": OUTPUT},
    ),
    "no-op literal view": Case(
        NoOpLiteralView, (4, 5), {"fc1": (None, {("fc2", 0, 1)})}, {"fc2": OUTPUT}
    ),
    "shared module": Case(
        Shared,
        (4, 4),
        {},
        {
            "fc1": "shared is called 2 times (shared weights)",
            "shared": "shared is called 2 times (shared weights)",
            "out": OUTPUT,
        },
    ),
    "grouped convs": Case(
        Grouped,
        (4, 3, 6, 6),
        # The depthwise conv acts per channel: a's group, its weights sliced with a's rows. The
        # 2-group conv splits pw's channels and its own into 2 blocks each.
        {
            "a": (None, {("pw", 0, 1)}),
            "pw": (None, {("g", 0, 1)}),
            "g": (None, {("fc1", 0, 1)}),
            "fc1": (None, {("fc2", 0, 1)}),
        },
        {"fc2": OUTPUT},
    ),
    "non-homogeneous activations": Case(
        Smooth,
        (4, 4),
        {"fc.6": (None, {("fc.7", 0, 1)})},
        {
            "fc.0": NON_HOMOGENEOUS.format("gelu (GELU)"),
            "fc.1": NON_HOMOGENEOUS.format("silu (SiLU)"),
            "fc.2": NON_HOMOGENEOUS.format("tanh"),
            "fc.3": NON_HOMOGENEOUS.format("tanh (Tanh)"),
            "fc.4": NON_HOMOGENEOUS.format("silu"),
            "fc.5": NON_HOMOGENEOUS.format("relu6 (ReLU6)"),
            "fc.7": OUTPUT,
        },
    ),
    "features in the output": Case(
        TwoOutputs, (4, 4), {"fc1": (None, {("fc2", 0, 1)})}, {"fc2": OUTPUT, "fc3": OUTPUT}
    ),
    "misc refusals": Case(
        Misc,
        (4, 4),
        # Per-channel PReLU slopes are sliced with fc1's rows; c2's map is flattened into fc6.
        {"fc1": (None, {("fc2", 0, 1)}), "c2": (None, {("fc6", 0, 6)})},
        {
            "fc2": "dropout is active (training=True) in the traced graph",
            "fc3": "bn has no running statistics to fold",
            "fc4": "c1 (Conv1d) reads the channels with a different layout",
            "fc5": "c1 (Conv1d) reads the channels with a different layout",
            "c1": "pool (MaxPool2d) would pool across the channel axis",
            "fc6": OUTPUT,
        },
    ),
    "unbatched conv input": Case(
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)),
        (3, 8, 8),
        {},
        {
            "0": "unbatched input of shape (8, 8, 8): the channels are not on axis 1",
            "2": "unbatched input of shape (4, 8, 8): the channels are not on axis 1",
        },
    ),
    "weights read outside their layer": Case(
        ReadsWeights,
        (4, 4),
        {},
        {
            "fc1": "fc1.weight is also read directly by the graph",
            "fc2": "fc3.weight is shared with twin (tied weights)",
            "fc3": "fc3.weight is shared with twin (tied weights)",
            "twin": "twin.weight is shared with fc3 (tied weights)",
            "fc4": OUTPUT,
        },
    ),
    "weight norm": Case(
        weight_normed,
        (4, 4),
        {},
        {
            "0": "0.weight is computed (a parametrization or weight_norm hook)",
            "2": "2.weight is computed (a parametrization or weight_norm hook)",
            "4": OUTPUT,
        },
    ),
}


def case_input(case: Case, seed: int = 0) -> torch.Tensor:
    return torch.randn(case.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_hand_built_plan(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().double().eval()
    found = nm.plan(model, case_input(case))
    assert site_map(found) == case.sites
    assert {s.producer: s.reason for s in found.skipped} == case.skipped


@pytest.mark.parametrize("name", list(CASES))
def test_hand_built_merges_planted_duplicates_exactly(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().double().eval()
    merge_planted(model, case_input(case), 0.5, criterion="l1-norm", seed=3)


def test_tied_embedding_and_head_are_left_alone() -> None:
    """Merging ``fc`` would rewrite the head's columns, untying them from the embedding: the result
    would compute the same but carry a second vocab-sized matrix (more parameters than before)."""
    torch.manual_seed(0)
    model = Tied().eval()
    tokens = torch.randint(0, 50, (2, 5))
    found = nm.plan(model, tokens)
    assert {s.producer: s.reason for s in found.skipped} == {
        "fc": "head.weight is shared with emb (tied weights)",
        "head": "head.weight is shared with emb (tied weights)",
    }
    result = compress_announced(model, tokens, 0.5)
    assert result.report.params_after <= result.report.params_before == params(model)
    small = result.model
    assert small.get_submodule("head").weight is small.get_submodule("emb").weight


def test_literal_view_rewritten_for_the_merged_sites_only() -> None:
    """Both branches of the literal-view CatFlatten hold duplicates; merging only ``b`` must rewrite the
    view by ``b``'s removed columns alone."""
    model = CatFlatten("view(-1, literal)").double().eval()
    x = case_input(CASES["cat-flatten view(-1, literal)"])
    result = merge_planted(model, x, 0.5, seed=4, include=["b"])
    assert [s.producer for s in result.report.sites] == ["b"]
    assert result.model.get_submodule("fc1").in_features == (3 + 4 + 3) * 16


def test_merging_a_merged_model_again() -> None:
    """The result is a GraphModule; it traces, plans the same sites and merges again."""
    torch.manual_seed(0)
    model = Inception().double().eval()
    x = case_input(CASES["inception"])
    once = merge_planted(model, x, 0.5, seed=5).model
    assert site_map(nm.plan(once, x)).keys() == CASES["inception"].sites.keys()
    twice = nm.compress(once, x, 0.5)
    assert twice.report.params_after < params(once)
    assert [t.shape for t in outputs(twice.model, x)] == [(4, 3)]


@pytest.mark.parametrize("style", KEYWORD_FLATTENS)
def test_literal_size_passed_by_keyword_is_rewritten(style: str) -> None:
    model = CatFlatten(style).double().eval()
    merge_planted(model, case_input(CASES["cat-flatten view(-1, literal)"]), 0.5, seed=6)


# =============================================================================================
# 3. Random conv stacks with exact duplicates (property)
# =============================================================================================


@dataclass(frozen=True)
class Block:
    width: int
    kernel: int
    bias: bool
    norm: bool
    leaky: bool
    pool: str | None


blocks = st.builds(
    Block,
    width=st.integers(2, 8),
    kernel=st.sampled_from([1, 3]),
    bias=st.booleans(),
    norm=st.booleans(),
    leaky=st.booleans(),
    pool=st.sampled_from([None, "max", "avg"]),
)

SIZE, CLASSES = 8, 3


def conv_stack(layers: list[Block], hidden: int) -> tuple[nn.Sequential, list[str]]:
    """conv-[BN]-act-[pool] blocks, then flatten -> Linear -> ReLU -> Linear; and the site names."""
    modules: list[nn.Module] = []
    sites: list[str] = []
    channels, size = 3, SIZE
    for block in layers:
        sites.append(str(len(modules)))
        modules.append(
            nn.Conv2d(channels, block.width, block.kernel, padding=block.kernel // 2, bias=block.bias)
        )
        if block.norm:
            modules.append(nn.BatchNorm2d(block.width))
        modules.append(nn.LeakyReLU(0.1) if block.leaky else nn.ReLU())
        if block.pool:
            modules.append(nn.MaxPool2d(2) if block.pool == "max" else nn.AvgPool2d(2))
            size //= 2
        channels = block.width
    modules.append(nn.Flatten())
    sites.append(str(len(modules)))
    modules += [nn.Linear(channels * size * size, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)]
    return nn.Sequential(*modules), sites


def merged_parameters(layers: list[Block], hidden: int, ratio: float) -> int:
    """Parameters of the stack once ``ratio`` of every site's neurons are gone."""
    total, channels, size = 0, 3, SIZE
    for block in layers:
        kept = kept_count(block.width, ratio)
        total += kept * channels * block.kernel**2 + kept * block.bias + 2 * kept * block.norm
        channels = kept
        size //= 2 if block.pool else 1
    kept = kept_count(hidden, ratio)
    return total + kept * (channels * size * size + 1) + CLASSES * (kept + 1)


@settings(max_examples=25, deadline=None)
@given(
    layers=st.lists(blocks, min_size=1, max_size=3),
    hidden=st.integers(2, 8),
    ratio=st.sampled_from([0.25, 0.5]),
    criterion=st.sampled_from(["l1-norm", "l2-norm"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_conv_stacks_merge_exactly(
    layers: list[Block], hidden: int, ratio: float, criterion: str, seed: int
) -> None:
    torch.manual_seed(seed)
    model, names = conv_stack(layers, hidden)
    model = model.double().eval()
    x = torch.randn(6, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    found = nm.plan(model, x)
    assert [s.producer for s in found.sites] == names
    counts = plant_duplicates(model, found.sites, ratio, criterion, torch.Generator().manual_seed(seed))
    assert [kept for kept, _ in counts.values()] == [
        kept_count(w, ratio) for w in [b.width for b in layers] + [hidden]
    ]
    small = nm.merge(model, x, ratio, criterion=criterion, threshold=None)
    assert_same(outputs(small, x), outputs(model, x))
    assert params(small) == merged_parameters(layers, hidden, ratio)


# =============================================================================================
# 4. Random weights: merging never grows a model and never touches the input
# =============================================================================================


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, bool]]:
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    ids = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    flags = {name: m.training for name, m in model.named_modules()}
    return state, ids, flags


def assert_untouched(model: nn.Module, before: tuple[Any, ...]) -> None:
    state, ids, flags = snapshot(model)
    old_state, old_ids, old_flags = before
    assert ids == old_ids  # the very same tensors, not replacements
    assert state.keys() == old_state.keys()
    assert all(torch.equal(state[k], old_state[k]) for k in state)
    assert flags == old_flags


@settings(max_examples=10, deadline=None)
@given(
    layers=st.lists(blocks, min_size=1, max_size=3),
    hidden=st.integers(2, 8),
    ratio=st.sampled_from([0.0, 0.3, 0.5]),
    threshold=st.sampled_from([None, 0.2, 0.9]),
    criterion=st.sampled_from(["l1-norm", "l2-norm", "l2-GM"]),
    fidelity=st.sampled_from(["exact", "paper"]),
    seed=st.integers(0, 2**16),
)
def test_property_merge_never_grows_nor_touches_the_input(
    layers: list[Block],
    hidden: int,
    ratio: float,
    threshold: float | None,
    criterion: str,
    fidelity: str,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    model, _ = conv_stack(layers, hidden)
    for module in model.modules():  # random statistics, and a mix of train/eval flags
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.running_mean)
            nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
    model.train()
    model[0].eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    before = snapshot(model)
    result = compress_announced(
        model, x, ratio, criterion=criterion, threshold=threshold, fidelity=fidelity
    )
    with warnings.catch_warnings():  # the same notices compress announced above
        warnings.simplefilter("ignore", nm.CompressionWarning)
        pruned = nm.prune(model, x, ratio, criterion=criterion, fidelity=fidelity)  # type: ignore[arg-type]
    nm.plan(model, x)
    assert_untouched(model, before)
    assert result.report.params_before == params(model)
    assert result.report.params_after == params(result.model) == params(pruned) <= params(model)
    if ratio == 0:
        assert params(result.model) == params(model)
    # The result shares nothing with the input: writing to it leaves the input as it was.
    with torch.no_grad():
        for tensor in [*result.model.parameters(), *result.model.buffers()]:
            tensor.add_(1)
    assert_untouched(model, before)


def test_tied_model_is_not_touched_and_does_not_grow() -> None:
    torch.manual_seed(0)
    model = Tied()
    before = snapshot(model)
    tokens = torch.randint(0, 50, (2, 5))
    result = compress_announced(model, tokens, 0.25)
    assert_untouched(model, before)
    assert params(result.model) <= params(model)


class Caching(nn.Module):
    """Keeps its hidden features on itself, a common pattern for inspection (Grad-CAM and the like)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)
        self.features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        self.features = h.detach()
        return self.fc2(h)


def test_tracing_side_effects_stay_off_the_input_model() -> None:
    model = Caching().eval()
    x = torch.randn(2, 4)
    model(x)
    nm.plan(model, x)
    assert isinstance(model.features, torch.Tensor)


def test_lazy_layers_are_refused_and_stay_lazy() -> None:
    model = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(nm.InvalidArgumentError, match="0.weight is an uninitialised lazy parameter"):
        nm.plan(model, torch.randn(2, 4))
    assert isinstance(model[0], nn.LazyLinear)


class NormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm subclass that calls ``F.batch_norm`` on its own tensors
    and then its activation child, so fx traces into it and records the functional spelling."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(x)


class FunctionalLinear(nn.Linear):
    """A Linear subclass that calls ``F.linear`` with keywords and holds its activation child."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x, weight=self.weight, bias=self.bias))


class FunctionalLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = NormAct(8)
        self.conv2 = nn.Conv2d(8, 6, 3, bias=False)
        self.bn2 = NormAct(6)
        self.fc1 = FunctionalLinear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc2(self.fc1(x.mean((2, 3))))


def test_functional_layer_calls_in_a_trace_merge_exactly() -> None:
    torch.manual_seed(0)
    model = FunctionalLayers().double().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    result = merge_planted(model, x)
    assert {s.producer for s in result.report.sites} == {"conv1", "conv2", "fc1"}
    assert isinstance(result.model.get_submodule("bn1"), nn.BatchNorm2d)
    assert result.model.get_submodule("bn1").num_features == kept_count(8, 0.5)
    assert isinstance(result.model.get_submodule("bn1.act"), nn.ReLU)
    assert result.model.get_submodule("fc1").weight.shape == (kept_count(10, 0.5), kept_count(6, 0.5))
