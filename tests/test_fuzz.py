"""Fuzzing the engine with random supported architectures and random weights (hypothesis).

An architecture is a stack of blocks over vectors (Linear), signals (Conv1d) or images (Conv2d):

* plain:    producer -> [BatchNorm] -> ReLU | LeakyReLU | PReLU(1) | identity -> [dropout]
* cat:      two such units side by side on the same input, concatenated along the channels
* residual: unit -> producer back to the input width -> [BatchNorm] -> + input -> ReLU

each optionally followed by max or average pooling, then a head that flattens (``torch.flatten``,
``view(size(0), -1)`` or global pooling) into Linear -> ReLU -> Linear. Which producers form which
group follows from the spec alone: every layer adding into a residual stream joins the group of the
stream, except a stream of the model input or of a concatenation (refused), and the output layer.

For any such model, random weights and random options, ``compress`` must not raise, must return a
runnable model with the same output shape (at another batch size too), never more parameters, the
input model untouched, and the same bits on a second run. With duplicates planted at every site
(``tests/builders.py``), the merge must compute the same function.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import neuronmerge as nm
from tests.builders import compress_announced, plant_duplicates

SIZE, IN_CHANNELS, IN_FEATURES, CLASSES = 8, 3, 12, 3
ACTIVATIONS = ("relu", "leaky", "prelu", "identity")


pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass(frozen=True)
class Unit:
    width: int
    kernel: int
    bias: bool
    norm: bool
    act: str
    dropout: bool


@dataclass(frozen=True)
class Block:
    kind: str  # "plain", "cat" or "residual"
    first: Unit
    second: Unit  # the other branch of "cat"; the projection back of "residual" (width ignored)
    pool: str | None


@dataclass(frozen=True)
class Spec:
    dims: int  # 0: vectors and Linear layers, 1: Conv1d, 2: Conv2d
    blocks: tuple[Block, ...]
    hidden: int
    flatten: str  # "flatten", "view" or "global-pool"


units = st.builds(
    Unit,
    width=st.integers(4, 7),  # >= 4: even ratio 0.7 with the paper's floor keeps one channel
    kernel=st.sampled_from([1, 3]),
    bias=st.booleans(),
    norm=st.booleans(),
    act=st.sampled_from(ACTIVATIONS),
    dropout=st.booleans(),
)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    dims = draw(st.sampled_from([0, 1, 2]))
    blocks = []
    size = SIZE
    for _ in range(draw(st.integers(1, 4))):
        pool = draw(st.sampled_from([None, "max", "avg"])) if dims and size > 1 else None
        size //= 2 if pool else 1
        blocks.append(
            Block(draw(st.sampled_from(["plain", "cat", "residual"])), draw(units), draw(units), pool)
        )
    flatten = draw(st.sampled_from(["flatten", "view", "global-pool"])) if dims else "flatten"
    return Spec(dims, tuple(blocks), draw(st.integers(4, 7)), flatten)


def _producer(dims: int, unit: Unit, channels: int, width: int) -> nn.Module:
    if dims == 0:
        return nn.Linear(channels, width, bias=unit.bias)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return conv(channels, width, unit.kernel, padding=unit.kernel // 2, bias=unit.bias)


def _unit(dims: int, unit: Unit, channels: int, width: int, act: str) -> nn.Sequential:
    layers = [_producer(dims, unit, channels, width)]
    if unit.norm:
        layers.append(nn.BatchNorm2d(width) if dims == 2 else nn.BatchNorm1d(width))
    layers.append(
        {
            "relu": nn.ReLU(),
            "leaky": nn.LeakyReLU(0.1),
            "prelu": nn.PReLU(),
            "identity": nn.Identity(),
        }[act]
    )
    if unit.dropout:
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


class FuzzNet(nn.Module):
    """The model a ``Spec`` describes; ``sites`` and ``skipped`` are the producers that must (not)
    be mergeable."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.units = nn.ModuleDict()
        self.pools = nn.ModuleDict()
        self.sites: set[str] = set()
        self.skipped: set[str] = set()
        self.streams: set[str] = set()  # groups of several producers (the paper's method skips them)
        channels, size = IN_FEATURES if spec.dims == 0 else IN_CHANNELS, SIZE
        previous: list[str] = []  # producers whose channels reach the next block
        # What the next block reads: the model input, one group (a layer, or a residual stream of
        # several), a concatenation of two groups, or a stream that could not be a group.
        state = "input"
        for i, block in enumerate(spec.blocks):
            if block.kind == "residual":
                self.units[f"b{i}a"] = _unit(
                    spec.dims, block.first, channels, block.first.width, block.first.act
                )
                self.units[f"b{i}b"] = _unit(
                    spec.dims, block.second, block.first.width, channels, "identity"
                )
                self.sites.add(f"units.b{i}a.0")
                if state == "single":  # the add joins the stream: one more producer in the group
                    previous.append(f"units.b{i}b.0")
                else:  # a stream of the model input, or of a concatenation, cannot be a group
                    self.skipped.update(previous if state == "cat" else [])
                    self.skipped.add(f"units.b{i}b.0")
                    previous, state = [], "refused"
            else:
                self._close(previous, state)
                tags = "ab" if block.kind == "cat" else "a"
                for tag, unit in zip(tags, (block.first, block.second)):
                    self.units[f"b{i}{tag}"] = _unit(spec.dims, unit, channels, unit.width, unit.act)
                previous = [f"units.b{i}{tag}.0" for tag in tags]
                state = "cat" if block.kind == "cat" else "single"
                channels = sum(u.width for u in (block.first, block.second)[: len(tags)])
            if block.pool:
                pool: type[nn.Module] = {
                    ("max", 1): nn.MaxPool1d,
                    ("avg", 1): nn.AvgPool1d,
                    ("max", 2): nn.MaxPool2d,
                    ("avg", 2): nn.AvgPool2d,
                }[(block.pool, spec.dims)]
                self.pools[str(i)] = pool(2)
                size //= 2
        self._close(previous, state)
        self.sites.add("fc1")
        self.skipped.add("fc2")
        features = (
            channels if spec.dims == 0 or spec.flatten == "global-pool" else channels * size**spec.dims
        )
        self.fc1 = nn.Linear(features, spec.hidden)
        self.fc2 = nn.Linear(spec.hidden, CLASSES)

    def _close(self, previous: list[str], state: str) -> None:
        """The groups of what a plain or concatenating block (or the head) reads: named by their
        first producer."""
        if state == "single":
            self.sites.add(previous[0])
            if len(previous) > 1:
                self.streams.add(previous[0])
        elif state == "cat":
            self.sites.update(previous)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.spec.blocks):
            if block.kind == "residual":
                x = F.relu(self.units[f"b{i}b"](self.units[f"b{i}a"](x)) + x)
            elif block.kind == "cat":
                x = torch.cat([self.units[f"b{i}a"](x), self.units[f"b{i}b"](x)], 1)
            else:
                x = self.units[f"b{i}a"](x)
            if block.pool:
                x = self.pools[str(i)](x)
        if self.spec.flatten == "view":
            x = x.view(x.size(0), -1)
        elif self.spec.flatten == "global-pool":
            pooled = F.adaptive_avg_pool1d(x, 1) if self.spec.dims == 1 else F.adaptive_max_pool2d(x, 1)
            x = pooled.flatten(1)
        else:
            x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def build(spec: Spec, seed: int, dtype: torch.dtype = torch.float32) -> FuzzNet:
    """The model with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = FuzzNet(spec).to(dtype)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(module.running_mean)
            nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias)
        elif isinstance(module, nn.PReLU):
            nn.init.uniform_(module.weight, -0.5, 0.5)
    return model.eval()


def inputs(spec: Spec, batch: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = (batch, IN_FEATURES) if spec.dims == 0 else (batch, IN_CHANNELS) + (SIZE,) * spec.dims
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


#: Corners tried on every run whatever hypothesis draws: a residual block right after a concatenation
#: (both branches feed the add), global pooling of a signal, a flattened image map read by the head.
UNIT = Unit(width=4, kernel=3, bias=True, norm=True, act="prelu", dropout=True)
CORNERS = [
    Spec(
        1,
        (
            Block("cat", UNIT, replace(UNIT, width=5, norm=False), "max"),
            Block("residual", UNIT, UNIT, None),
        ),
        4,
        "global-pool",
    ),
    Spec(2, (Block("plain", replace(UNIT, act="identity", bias=False), UNIT, "avg"),), 5, "view"),
]


@FUZZ
@given(
    spec=specs(),
    ratio=st.sampled_from([0.0, 0.3, 0.5, 0.7]),
    method=st.sampled_from(["merge", "prune"]),
    criterion=st.sampled_from(["l1-norm", "l2-norm", "l2-GM"]),
    threshold=st.sampled_from([None, 0.0, 0.2, 0.9]),
    fidelity=st.sampled_from(["exact", "paper"]),
    seed=st.integers(0, 2**16),
)
@example(CORNERS[0], 0.7, "merge", "l2-GM", 0.2, "paper", 1)
@example(CORNERS[1], 0.5, "prune", "l1-norm", None, "exact", 2)
def test_fuzz_merge_runs_keeps_shape_never_grows_and_is_deterministic(
    spec: Spec,
    ratio: float,
    method: str,
    criterion: str,
    threshold: float | None,
    fidelity: str,
    seed: int,
) -> None:
    model = build(spec, seed)
    x = inputs(spec, 2, seed)
    before = copy.deepcopy(model.state_dict())
    found = nm.plan(model, x)
    assert {s.producer for s in found.sites} == model.sites
    assert {s.producer for s in found.skipped} == model.skipped

    options: dict[str, Any] = dict(
        method=method, criterion=criterion, threshold=threshold, fidelity=fidelity
    )
    result = compress_announced(model, x, ratio, **options)
    paper_skips = model.streams if fidelity == "paper" else set()
    other_batch = inputs(spec, 5, seed + 1)
    with torch.no_grad():
        assert result.model(other_batch).shape == model(other_batch).shape == (5, CLASSES)
    assert result.report.params_after == params(result.model) <= params(model)
    if ratio > 0 and model.sites - paper_skips:
        assert params(result.model) < params(model)
    assert {s.producer for s in result.report.sites} == model.sites - paper_skips
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    again = compress_announced(model, x, ratio, **options)
    assert again.report == result.report
    state, state_again = result.model.state_dict(), again.model.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)


@FUZZ
@given(
    spec=specs(),
    ratio=st.sampled_from([0.25, 0.5]),
    criterion=st.sampled_from(["l1-norm", "l2-norm"]),
    seed=st.integers(0, 2**16),
)
@example(CORNERS[0], 0.5, "l2-norm", 3)
@example(CORNERS[1], 0.25, "l1-norm", 4)
def test_fuzz_merge_is_exact_on_planted_duplicates(
    spec: Spec, ratio: float, criterion: str, seed: int
) -> None:
    model = build(spec, seed, torch.float64)
    x = inputs(spec, 4, seed, torch.float64)
    found = nm.plan(model, x)
    counts = plant_duplicates(model, found.sites, ratio, criterion, torch.Generator().manual_seed(seed))
    result = compress_announced(model, x, ratio, criterion=criterion, threshold=None)
    assert {s.producer: (s.kept, s.merged, s.dropped) for s in result.report.sites} == {
        p: (kept, dups, 0) for p, (kept, dups) in counts.items()
    }
    check = inputs(spec, 6, seed + 1, torch.float64)
    with torch.no_grad():
        expected, got = model(check), result.model(check)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10), (got - expected).abs().max()
