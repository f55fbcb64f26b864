"""The merge engine end to end: exactness on constructed duplicates, topology, reports, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neuronmerge as nm
from neuronmerge import engine
from neuronmerge.api import _compress
from neuronmerge.criteria import kept_count
from neuronmerge.ffn import FeedForward
from neuronmerge.methods.base import Inputs
from neuronmerge.options import Options
from tests.builders import duplicated_convnet, duplicated_mlp


def split(width: int, ratio: float) -> tuple[int, int]:
    """(base, dups) so that removing ``ratio`` of ``width`` neurons removes exactly the dups."""
    keep = kept_count(width, ratio)
    return keep, width - keep


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("criterion", ["l1-norm", "l2-norm"])
def test_merge_is_exact_on_duplicate_fc_neurons(criterion: str) -> None:
    ratio = 0.4
    (b1, d1), (b2, d2) = split(20, ratio), split(10, ratio)
    model = duplicated_mlp(12, [b1, b2], [d1, d2], criterion, seed=1)
    x = torch.randn(64, 12, dtype=torch.float64)
    small = nm.merge(model, x[:2], ratio, criterion=criterion, threshold=None)
    assert torch.allclose(small(x), model(x), rtol=1e-9, atol=1e-10)
    assert [small.get_submodule(f"layers.{i}").out_features for i in (0, 1)] == [b1, b2]
    pruned = nm.prune(model, x[:2], ratio, criterion=criterion)
    assert not torch.allclose(pruned(x), model(x), atol=1e-3)


@pytest.mark.parametrize("criterion", ["l1-norm", "l2-norm"])
def test_merge_is_exact_on_conv_batchnorm_and_flatten(criterion: str) -> None:
    ratio = 0.5
    bases, dups = zip(*(split(w, ratio) for w in (8, 6, 10)))
    model = duplicated_convnet(list(bases), list(dups), criterion, seed=2)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    result = nm.compress(model, x[:2], ratio, criterion=criterion, threshold=None)
    small = result.model
    assert torch.allclose(small(x), model(x), rtol=1e-9, atol=1e-10)
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == bases
    assert small.fc1.in_features == bases[1] * 16
    assert [(s.producer, s.kept, s.merged, s.dropped) for s in result.report.sites] == [
        ("conv1", bases[0], dups[0], 0),
        ("conv2", bases[1], dups[1], 0),
        ("fc1", bases[2], dups[2], 0),
    ]
    assert result.report.params_after == params(small) < params(model)


def test_paper_conv_bn_scale_is_not_exact_where_folded_rows_are() -> None:
    """The authors' algorithm 3 compares raw conv weights and scales with the BN variance: on
    duplicates defined by what channels compute (folded rows) it misses what exact mode gets."""
    ratio = 0.5
    bases, dups = zip(*(split(w, ratio) for w in (8, 6, 10)))
    model = duplicated_convnet(list(bases), list(dups), "l1-norm", seed=3)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    paper = nm.merge(model, x[:2], ratio, threshold=None, fidelity="paper", include=["conv*"])
    exact = nm.merge(model, x[:2], ratio, threshold=None, include=["conv*"])
    assert torch.allclose(exact(x), model(x), rtol=1e-9, atol=1e-10)
    assert (paper(x) - model(x)).abs().max() > 1e-5  # far beyond float64 rounding


def test_prune_and_merge_share_topology_and_kept_neurons() -> None:
    model = duplicated_mlp(12, [12, 6], [8, 4], "l1-norm", seed=4)
    x = torch.randn(4, 12, dtype=torch.float64)
    merged = nm.compress(model, x, 0.4, method="merge", threshold=None)
    pruned = nm.compress(model, x, 0.4, method="prune")
    shapes = {k: v.shape for k, v in merged.model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in pruned.model.state_dict().items()}
    assert merged.report.params_after == pruned.report.params_after
    for name in ("layers.0", "layers.1"):
        # Same kept neurons: identical kept biases (the weights' columns may differ by merging).
        bias_m = merged.model.get_submodule(name).bias
        assert torch.equal(bias_m, pruned.model.get_submodule(name).bias)
    assert all(s.merged == 0 for s in pruned.report.sites)


def test_threshold_drops_dissimilar_neurons() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2)).eval()
    x = torch.randn(3, 6)
    strict = nm.compress(model, x, 0.5, threshold=0.999).report.sites[0]
    loose = nm.compress(model, x, 0.5, threshold=None).report.sites[0]
    assert (strict.merged, strict.dropped) == (0, 5)
    assert (loose.merged, loose.dropped) == (5, 0)


def test_input_model_is_never_modified() -> None:
    model = duplicated_convnet([4, 3, 5], [4, 3, 5], "l1-norm", seed=5)
    before = copy.deepcopy(model.state_dict())
    model.train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for compress in (nm.merge, nm.prune):  # a training-mode model is announced, and left as it is
        with pytest.warns(nm.CompressionWarning, match="training mode"):
            compress(model, x, 0.5)
    nm.plan(model, x)
    with pytest.raises(nm.InvalidArgumentError):
        nm.merge(model, x, 1.0)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_result_shares_no_tensor_with_the_input_model() -> None:
    model = duplicated_convnet([4, 3, 5], [4, 3, 5], "l1-norm", seed=6)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = nm.merge(model, x, 0.5, include=["conv2"])  # conv1/bn1/fc layers stay untouched

    def pointers(m: nn.Module) -> set[int]:
        return {t.data_ptr() for t in [*m.parameters(), *m.buffers()]}

    assert not pointers(small) & pointers(model)
    assert torch.equal(small.conv1.weight, model.conv1.weight)
    with torch.no_grad():
        small.conv1.weight.zero_()
    assert model.conv1.weight.abs().sum() > 0


def test_result_shares_no_mutable_state_with_the_input_model() -> None:
    # Layers the merge leaves alone are copied tensor by tensor (not by deep-copying the whole graph
    # module); their hook tables and other mutable attributes must be copies too.
    model = duplicated_convnet([4, 3, 5], [4, 3, 5], "l1-norm", seed=6)
    model.conv1.note = {"tag": [1]}  # type: ignore[assignment]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = nm.merge(model, x, 0.5, include=["conv2"])
    small.conv1.register_forward_hook(lambda *_: None)
    small.conv1.note["tag"].append(2)
    assert not model.conv1._forward_hooks and model.conv1.note == {"tag": [1]}
    assert small.conv1 is not model.conv1 and small.conv1.weight is not model.conv1.weight
    assert small.conv1.weight.requires_grad and isinstance(small.conv1.weight, nn.Parameter)


def test_verify_detects_a_wrong_merge() -> None:
    model = duplicated_mlp(12, [6, 5], [2, 2], "l1-norm", seed=2)
    x = torch.randn(2, 12, dtype=torch.float64)
    options = nm.Options()
    gm = engine.capture(model, x)
    groups, _ = engine.groups(gm, options)
    keep = engine.kept_counts(groups, 0.5, options.method_object())
    decompositions = engine.decompose(gm, groups, keep, options, Inputs((x,)))
    expected = engine.output_shapes(gm, (x,))
    small = engine.surgery(gm, groups, decompositions)
    assert engine.verify(small, (x,), expected) is None  # the right merge passes
    reader = small.get_submodule("layers.1")  # a consumer left one column short: cannot run
    right = reader.weight
    reader.weight = nn.Parameter(right.detach()[:, 1:])
    with pytest.raises(nm.NeuronMergeError, match="failed to run"):
        engine.verify(small, (x,), expected)
    reader.weight = right
    head = small.get_submodule("head")  # a wrong output width: runs, but the shape changed
    head.weight = nn.Parameter(head.weight.detach()[1:])
    head.bias = nn.Parameter(head.bias.detach()[1:])
    with pytest.raises(nm.NeuronMergeError, match="output shape changed"):
        engine.verify(small, (x,), expected)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_ratio_is_refused(ratio: object) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(nm.InvalidArgumentError, match="ratio"):
        nm.merge(model, torch.randn(1, 4), ratio)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criterion": "l3"}, "unknown criterion 'l3'"),
        ({"fidelity": "approx"}, "fidelity must be"),
        ({"threshold": 2.0}, "threshold is a cosine similarity"),
        ({"lam": 0.5}, "lam applies to fidelity='paper' only"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, object], message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(nm.InvalidArgumentError, match=message):
        nm.merge(model, torch.randn(1, 4), 0.5, **kwargs)  # type: ignore[arg-type]


def test_zero_kept_neurons_is_refused_with_the_layer_name() -> None:
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(nm.InvalidArgumentError, match="keeps 0 of the 2 channels of 0"):
        nm.merge(model, torch.randn(1, 4), 0.9)


def test_groups_of_one_channel_per_block_are_skipped_not_fatal() -> None:
    """PiT's pooling conv reads one channel per group (groups = in_channels, twice as many outputs):
    the layer writing those channels can lose none, and the rest of the model is still compressed."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, groups=8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 3),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(nm.CompressionWarning, match=r"first 0: each of its 8 blocks .* one channel"):
        result = nm.compress(model, x, 0.5)
    assert {s.producer for s in result.report.sites} == {"2"}
    assert result.model.get_submodule("0").out_channels == 8
    assert result.model.get_submodule("2").out_channels == 8
    assert result.model(x).shape == (2, 3)


def test_non_finite_weights_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(nm.InvalidArgumentError, match="0: weight holds NaN"):
        nm.merge(model, torch.randn(1, 4), 0.5)


def test_untraceable_model_names_the_problem() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(nm.CaptureError) as error:
        nm.plan(Branchy(), torch.randn(1, 4))
    message = str(error.value)
    assert message.startswith("torch.fx could not trace Branchy: symbolically traced variables")
    line = Branchy.forward.__code__.co_firstlineno + 1
    assert (
        f"test_engine.py:{line} in forward: `if x.sum() > 0:  # data-dependent control flow`" in message
    )
    assert "torch.fx.wrap('its_name')" in message


def _double_if_positive(x: torch.Tensor) -> torch.Tensor:
    return 2 * x if x.sum() > 0 else x


torch.fx.wrap("_double_if_positive")


def test_wrapped_branch_traces_and_the_layers_beside_it_stay_unmerged() -> None:
    """The advice of the capture error works: the wrapped function is one opaque call."""

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(_double_if_positive(torch.relu(self.a(x))))))

    found = nm.plan(Wrapped(), torch.randn(2, 4))
    assert [s.producer for s in found.sites] == ["b"]
    assert {s.producer: s.reason for s in found.skipped}["a"] == (
        "channels reach _double_if_positive, which merging cannot pass through"
    )


class _Skips(nn.Module):
    """One site of each refusal kind next to one mergeable site."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)  # -> ReLU -> b: mergeable
        self.b = nn.Linear(6, 6)  # -> GELU: refused
        self.c = nn.Linear(6, 6)  # adds into b's stream: one group with b, refused with it
        self.d = nn.Linear(6, 3)  # model output: refused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        h = nn.functional.gelu(h)
        return self.d(self.c(h) + h)


def test_plan_lists_sites_and_reasons() -> None:
    found = nm.plan(_Skips(), torch.randn(2, 4))
    assert [(s.producer, s.channels, [c.module for c in s.consumers]) for s in found.sites] == [
        ("a", 6, ["b"])
    ]
    reasons = {s.producer: s.reason for s in found.skipped}
    assert reasons == {
        "b": "gelu is not positively homogeneous (f(s*x) != s*f(x)); "
        "approximate=True merges through it and measures the error",
        "c": "gelu is not positively homogeneous (f(s*x) != s*f(x)); "
        "approximate=True merges through it and measures the error",
        "d": "channels are part of the model's output",
    }
    assert "exact a (6 ch, chain) -> b" in str(found)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(2, 24), min_size=1, max_size=3),
    ratio=st.sampled_from([0.25, 0.5, 0.6]),
    criterion=st.sampled_from(["l1-norm", "l2-norm"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_mlps_merge_exactly(
    widths: list[int], ratio: float, criterion: str, seed: int
) -> None:
    bases, dups = zip(*(split(w, ratio) for w in widths))
    model = duplicated_mlp(5, list(bases), list(dups), criterion, seed)
    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    small = nm.merge(model, x[:2], ratio, criterion=criterion, threshold=None)
    assert torch.allclose(small(x), model(x), rtol=1e-9, atol=1e-10)
    expected = 5 * bases[0] + bases[0]
    expected += sum(a * b + b for a, b in zip(bases, bases[1:]))
    expected += bases[-1] * 3 + 3
    assert params(small) == expected


def _gated(seed: int) -> tuple[nn.Module, torch.Tensor, list[str]]:
    torch.manual_seed(seed)
    ffn = FeedForward(nn.Linear(12, 32), nn.SiLU(), nn.Linear(32, 12), nn.Linear(12, 32)).double().eval()
    return ffn, torch.randn(64, 12, dtype=torch.float64), ["up.weight", "gate.weight", "down.weight"]


def _convnet(seed: int) -> tuple[nn.Module, torch.Tensor, list[str]]:
    bases, dups = zip(*(split(width, 0.5) for width in (8, 6, 10)))
    model = duplicated_convnet(list(bases), list(dups), "l1-norm", seed=seed)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    return model, x, ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


@pytest.mark.parametrize(
    ("build", "method"), [(_convnet, "merge"), (_convnet, "prune"), (_gated, "merge-ls")]
)
def test_in_place_gives_the_same_model_in_the_models_own_memory(build, method: str) -> None:
    """The internal in-place path (streaming owns its layers) computes what the default computes."""
    model, x, weights = build(2)
    # merge-ls: a dense Z and constants into down's new bias (calibrated here: fast and the same
    # batches for both runs).
    extra = {"calibration": [x]} if method == "merge-ls" else {}
    expected = nm.compress(model, x[:2], 0.5, method=method, **extra).model
    owned = copy.deepcopy(model)
    memory = {name: p.untyped_storage().data_ptr() for name, p in owned.named_parameters()}
    options = Options.of(method=method)
    small = _compress(owned, x[:2], 0.5, options, extra.get("calibration"), in_place=True).model
    assert torch.allclose(small(x), expected(x), rtol=1e-9, atol=1e-10)
    # Every resized weight (rows, flattened conv columns, a dense mixing) reuses the old memory.
    for name in weights:
        assert small.get_parameter(name).untyped_storage().data_ptr() == memory[name]
        assert small.get_parameter(name).shape != owned.get_parameter(name).shape


class _SharedMemory(nn.Module):
    """``side`` reads ``down``'s weight memory through a Parameter of its own (not tied by identity,
    so grouping allows resizing ``down``)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.side = nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(8, 6)
        self.side.weight = nn.Parameter(self.down.weight.detach())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) + self.side(y)


def test_in_place_copies_a_weight_whose_memory_another_layer_reads() -> None:
    torch.manual_seed(0)
    model = _SharedMemory().eval()
    x, y = torch.randn(5, 6), torch.randn(5, 8)
    expected = nm.compress(model, (x, y), 0.5).model
    small = _compress(model, (x, y), 0.5, Options.of(), in_place=True).model
    assert small.down.in_features == 4
    assert torch.allclose(small(x, y), expected(x, y))
    assert torch.equal(model.side.weight, model.down.weight)  # nothing written over


class _BatchSizes(nn.Module):
    """A Linear layer that records the batch size of every input, and an output shaped by ``fold``."""

    def __init__(self, fold: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fold = fold
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(x.shape[0]))
        y = self.fc(x)
        if self.fold == "fixed-batch":  # a hard-coded batch size: (2, 4) -> (2, 4), (1, 4) -> (2, 2)
            return y.reshape(2, -1)
        if self.fold == "sum":  # no batch axis left: (2, 4) -> (4,)
            return y.sum(0)
        return y


def test_verify_runs_one_example_where_the_model_is_batch_wise() -> None:
    x = torch.randn(2, 4)
    model = _BatchSizes("plain")
    assert engine.verify(model, (x,), (2, 4)) is None
    assert model.seen == [1]  # the first example alone settled it
    for fold, shape in (("fixed-batch", (2, 4)), ("sum", (4,))):
        other = _BatchSizes(fold)
        assert engine.verify(other, (x,), shape) is None  # no false alarm: the full batch decides
        assert other.seen[-1] == 2
    wrong = _BatchSizes("plain")
    with pytest.raises(nm.NeuronMergeError, match="output shape changed"):
        engine.verify(wrong, (x,), (2, 5))
    assert wrong.seen == [1, 2]  # a mismatch on one example is confirmed on the full batch


class TwoOutputs(nn.Module):
    """Logits and a dict of the hidden activations: a structured output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = torch.relu(self.fc1(x))
        return self.fc2(hidden), {"hidden": hidden}


def test_capture_returns_the_outputs_of_its_shape_forward() -> None:
    """The outputs capture's shape-recording forward computed are the model's own (the reference
    of ``approximate=True`` is taken from them instead of a second forward)."""
    torch.manual_seed(0)
    model = TwoOutputs().eval()
    x = torch.randn(4, 5)
    gm, recorded = engine.capture_with_outputs(model, x)
    logits, extra = model(x)
    assert isinstance(recorded, tuple) and torch.equal(recorded[0], logits)
    assert torch.equal(recorded[1]["hidden"], extra["hidden"])
    assert engine.reference_outputs(gm, (x,), recorded) is recorded
    # The error compress reports is measured against those outputs: the model's own, exactly.
    result = nm.compress(model, x, 0.5, approximate=True)
    small_logits, small_extra = result.model(x)
    want = engine.relative_error((small_logits, small_extra), (logits, extra))
    assert result.report.output_error == pytest.approx(want, rel=1e-12, abs=0)


def test_reference_of_an_exported_module_is_what_calling_it_returns() -> None:
    """torch.export's modules regroup the graph's flat output values in generated code: their
    reference is the module's own return value, not the recorded flat tuple."""
    from tests.test_exported import shape_branch

    model, _ = shape_branch(0.5)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    gm, recorded = engine.capture_with_outputs(model, x)
    assert isinstance(recorded, tuple)  # the flat values of the exported graph
    reference = engine.reference_outputs(gm, (x,), recorded)
    assert isinstance(reference, torch.Tensor) and torch.equal(reference, model(x))
