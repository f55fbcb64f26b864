"""Compressing to a budget: targets met, costs predicted exactly, unreachable targets refused, and
the data-free allocation putting the cuts where the weights say they are free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronmerge as nm
from neuronmerge import allocation_check, budget, criteria
from neuronmerge.cli import main
from neuronmerge.costs import model_costs
from neuronmerge.engine import capture, groups
from neuronmerge.evaluate import count_flops, count_parameters
from neuronmerge.models import create_model
from neuronmerge.options import Options
from neuronmerge.widths import shape_of
from tests.builders import duplicated_convnet
from tests.scripts import ROOT, load_script

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widths, costs and targets here are those of the allocation itself: the whole-model check
    (``allocation_check``), which only chooses between such widths and costs seconds of synthetic
    probes per model, is tested in ``test_allocation_check`` and where a test here turns it on."""
    monkeypatch.setattr(allocation_check, "ENABLED", False)


@pytest.fixture(scope="module")
def vgg() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vgg-fmnist").eval()


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("lenet-300-100", {"target_params": 0.3}),
        ("vgg-fmnist", {"target_params": 0.5}),
        ("vgg-fmnist", {"target_macs": 0.4, "allocation": "uniform"}),
        ("resnet-fmnist", {"target_params": 0.6, "round_to": 8}),
        ("alexnet-fmnist", {"target_macs": 0.3}),
    ],
)
def test_target_is_met_and_costs_are_predicted_exactly(arch: str, options: dict) -> None:
    torch.manual_seed(0)
    model = create_model(arch).eval()
    result = nm.compress(model, X, **options)
    small = result.model
    if "target_params" in options:
        reached, whole = count_parameters(small), count_parameters(model)
        target = options["target_params"] * whole
    else:
        reached, whole = count_flops(small, X[:1]), count_flops(model, X[:1])
        target = options["target_macs"] * whole
    assert abs(reached - target) <= 0.01 * target
    assert small(X).shape == model(X).shape
    # The cost polynomials give exactly what surgery produced, at the widths it produced.
    gm = capture(model, X)
    chosen, _ = groups(gm, Options())
    costs = model_costs(gm, [shape_of(g) for g in chosen], (X,))
    kept = {s.producer: s.kept for s in result.report.sites}
    assert budget.total(costs.params, kept) == count_parameters(small)
    assert budget.total(costs.macs, kept) == count_flops(small, X[:1])
    if "round_to" in options:
        step = options["round_to"]
        assert all(s.kept % step == 0 or s.kept == s.channels for s in result.report.sites)


def test_absolute_count_and_report(vgg: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocation_check, "ENABLED", True)
    batches = [(torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)),)]
    result = nm.compress(vgg, X, target_params=50_000, method="prune", calibration=batches)
    assert abs(count_parameters(result.model) - 50_000) <= 500
    report = result.report
    assert report.ratio is None and report.target_params == 50_000
    # The report names the widths kept: the uniform ones exactly when the check kept those.
    uniform = nm.compress(vgg, X, target_params=50_000, method="prune", allocation="uniform")
    assert report.allocation in ("error", "uniform")
    same = [s.kept for s in report.sites] == [s.kept for s in uniform.report.sites]
    assert same == (report.allocation == "uniform")


def test_out_of_reach_and_bad_options_are_refused(vgg: torch.nn.Module) -> None:
    with pytest.raises(nm.InvalidArgumentError, match=r"out of reach.*87 to 145,082"):
        nm.compress(vgg, X, target_params=50)
    with pytest.raises(nm.InvalidArgumentError, match="fraction of the model must be in"):
        nm.compress(vgg, X, target_params=1.5)
    with pytest.raises(nm.InvalidArgumentError, match="not both"):
        nm.compress(vgg, X, 0.5, target_params=0.5)
    with pytest.raises(nm.InvalidArgumentError, match="not both"):
        nm.compress(vgg, X, target_params=0.5, target_macs=0.5)
    with pytest.raises(nm.InvalidArgumentError, match="round_to"):
        nm.compress(vgg, X, target_params=0.5, round_to=0)
    with pytest.raises(nm.InvalidArgumentError, match="allocation must be"):
        nm.compress(vgg, X, target_params=0.5, allocation="greedy")  # type: ignore[arg-type]
    with pytest.raises(nm.InvalidArgumentError, match=r"ratios\['features\.0'\]"):
        nm.compress(vgg, X, ratios={"features.0": 1.0})
    # Every group fixed by an explicit ratio leaves nothing to reach a target with.
    with pytest.raises(nm.InvalidArgumentError, match="out of reach"):
        nm.compress(vgg, X, target_params=0.2, ratios={"*": 0.1})


def test_explicit_ratios_fix_matching_groups(vgg: torch.nn.Module) -> None:
    fixed = nm.compress(vgg, X, ratios={"features.0": 0.25, "classifier.*": 0.5}, method="prune")
    kept = {s.producer: s.kept for s in fixed.report.sites}
    assert kept["features.0"] == 12 and kept["classifier.0"] == 64
    assert kept["features.4"] == 16  # the others: the default ratio 0.5
    # The report says what was asked: the globs, and the ratio the unmatched groups took.
    assert fixed.report.ratios == (("features.0", 0.25), ("classifier.*", 0.5))
    assert fixed.report.ratio == 0.5
    everywhere = nm.compress(vgg, X, ratios={"*": 0.25}, method="prune").report
    assert everywhere.ratio is None and everywhere.ratios == (("*", 0.25),)
    assert all(s.kept == s.channels - s.channels // 4 for s in everywhere.sites)
    budgeted = nm.compress(vgg, X, target_params=0.4, ratios={"features.0": 0.25}, method="prune")
    assert {s.producer: s.kept for s in budgeted.report.sites}["features.0"] == 12
    assert abs(count_parameters(budgeted.model) - 0.4 * 145_082) <= 0.01 * 0.4 * 145_082


def test_merge_and_prune_take_the_same_budget_options(vgg: torch.nn.Module) -> None:
    whole = count_parameters(vgg)
    merged = nm.merge(vgg, X, target_params=0.4, round_to=4)
    assert abs(count_parameters(merged) - 0.4 * whole) <= 0.01 * 0.4 * whole
    pruned = nm.prune(vgg, X, target_macs=0.5, allocation="uniform")
    assert abs(count_flops(pruned, X[:1]) - 0.5 * count_flops(vgg, X[:1])) <= 0.01 * count_flops(
        vgg, X[:1]
    )
    same = nm.compress(vgg, X, ratios={"features.0": 0.25}, method="prune").model
    assert torch.equal(nm.prune(vgg, X, ratios={"features.0": 0.25})(X), same(X))
    # One validation: the wrappers refuse what compress refuses, with the same message.
    for wrapper in (nm.merge, nm.prune):
        with pytest.raises(nm.InvalidArgumentError, match="fraction of the model must be in"):
            wrapper(vgg, X, target_params=1.5)
        with pytest.raises(nm.InvalidArgumentError, match="not both"):
            wrapper(vgg, X, 0.5, target_macs=0.5)


def test_plan_shows_the_chosen_widths(vgg: torch.nn.Module) -> None:
    shown = nm.plan(vgg, X, target_params=0.5)
    assert shown.totals is not None
    assert abs(shown.totals.params_after - 0.5 * 145_082) <= 0.01 * 0.5 * 145_082
    widths = {row.layer: row.kept for row in shown.layers if row.kept is not None}
    assert set(widths) == {s.producer for s in shown.sites} and len(widths) == 6


def test_merge_error_curve_sees_duplicates() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 9, generator=g, dtype=torch.float64)
    rows = torch.cat([base, 0.5 * base[:2], torch.randn(1, 9, generator=g, dtype=torch.float64)])
    energy = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    order = torch.tensor([0, 1, 2, 3, 6, 4, 5])  # the two duplicates last
    curve = budget.merge_error_curve(rows, energy, order)
    assert curve[0] == pytest.approx(1.0) and curve[7] == 0
    assert curve[5] == pytest.approx(0.0, abs=1e-12)  # the duplicates merge without residual
    assert curve[4] > 0 and all(curve[k] >= curve[k + 1] - 1e-12 for k in range(7))


def test_allocation_removes_what_merges_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """conv1 holds 8 exact duplicates, conv2 and fc1 two each: at the parameter count of removing
    exactly those, the data-free allocation (conv1 keeps a third, the others two thirds and more)
    finds them and merging reproduces the model, where the uniform allocation at the same count
    cannot; so the whole-model check keeps it (it reproduces the model on the batches checked)."""
    monkeypatch.setattr(allocation_check, "ENABLED", True)
    model = duplicated_convnet([4, 4, 8], [8, 2, 2], "l1-norm", seed=3)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = nm.compress(model, x[:2], ratios={"conv1": 8 / 12, "conv2": 2 / 6, "fc1": 2 / 10})
    target = count_parameters(exact.model)
    # Checked on x itself as calibration batches (the same check as on synthetic probes, without
    # the seconds of making them).
    allocated = nm.compress(model, x[:2], target_params=target, threshold=None, calibration=[(x,)])
    assert [s.kept for s in allocated.report.sites] == [4, 4, 8]
    assert allocated.report.allocation == "error"
    assert torch.allclose(allocated.model(x), model(x), rtol=1e-7, atol=1e-8)
    uniform = nm.compress(model, x[:2], target_params=target, allocation="uniform")
    assert abs(count_parameters(uniform.model) - target) <= 0.01 * target
    reference = model(x)
    change = torch.linalg.vector_norm(uniform.model(x) - reference) / torch.linalg.vector_norm(reference)
    assert change > 1e-4  # uniform widths cut distinct neurons: no longer the same function


def test_allocate_meets_the_target_on_plain_values() -> None:
    """Two groups feeding each other: cost a*k1 + k1*k2 + b*k2; the flat-error group goes first."""
    terms = (budget.Term(10, ("a",)), budget.Term(1, ("a", "b")), budget.Term(5, ("b",)), budget.Term(7))
    cheap = budget.GroupBudget("a", 200, tuple(0.001 * (200 - k) for k in range(201)), 1, 200)
    dear = budget.GroupBudget("b", 200, tuple(1 - k / 200 for k in range(201)), 1, 200)
    kept = budget.allocate([cheap, dear], terms, 15_000, band=1.0)
    assert abs(budget.total(terms, kept) - 15_000) <= 150 and kept == {"a": 66, "b": 200}
    with pytest.raises(nm.InvalidArgumentError, match="out of reach: the mergeable groups allow 23 to"):
        budget.allocate([cheap, dear], terms, 20)


def test_the_trust_band_bounds_every_group_around_the_uniform_widths() -> None:
    """The same two groups: unbounded, the flat-error group loses two thirds of its channels; with
    a band, no group's kept fraction leaves the uniform one's by more than it, and band 0 is the
    uniform allocation itself."""
    terms = (budget.Term(10, ("a",)), budget.Term(1, ("a", "b")), budget.Term(5, ("b",)), budget.Term(7))
    cheap = budget.GroupBudget("a", 200, tuple(0.001 * (200 - k) for k in range(201)), 1, 200)
    dear = budget.GroupBudget("b", 200, tuple(1 - k / 200 for k in range(201)), 1, 200)
    centre = budget.uniform([cheap, dear], terms, 15_000)
    assert budget.allocate([cheap, dear], terms, 15_000, band=0.0) == centre
    for band in (0.05, 0.2):
        kept = budget.allocate([cheap, dear], terms, 15_000, band=band)
        assert abs(budget.total(terms, kept) - 15_000) <= 150
        assert all(abs(kept[g] - centre[g]) / 200 <= band + 1 / 200 for g in kept)
        assert kept["a"] < centre["a"] and kept["b"] > centre["b"]  # the curves decide inside it
    # A held group (a residual stream) keeps the uniform width whatever its curve says.
    held = budget.GroupBudget("a", 200, cheap.error, 1, 200, held=True)
    assert budget.allocate([held, dear], terms, 15_000, band=1.0)["a"] == centre["a"]


def test_least_squares_curve_is_merge_ls_own_residual() -> None:
    """The covering curve starts at the consumer-weighted variance, falls to zero once the kept
    channels span the others (here 3 independent ones and 3 combinations of them), agrees with
    ``covering_kept`` at every count, and equals the residual of the least-squares fit there."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 3, generator=g, dtype=torch.float64)
    samples = torch.cat([base, base @ torch.randn(3, 3, generator=g, dtype=torch.float64)], 1)
    cov = torch.cov(samples.T)
    weights = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    curve = criteria.covering_curve(cov, weights)
    assert curve[0] == pytest.approx(float((weights * cov.diagonal()).sum()))
    assert curve[3] == pytest.approx(0.0, abs=1e-9) and all(curve[k] >= curve[k + 1] for k in range(3))
    for keep in (1, 2):
        kept = criteria.covering_kept(cov, weights, keep)
        x = samples - samples.mean(0)
        fit = torch.linalg.lstsq(x[:, kept], x).solution
        left = (x - x[:, kept] @ fit).square().sum(0) / (x.shape[0] - 1)
        assert curve[keep] == pytest.approx(float((weights * left).sum()), rel=1e-6)


def test_cli_plan_and_compress_take_a_budget(
    vgg: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "vgg.pth"
    torch.save(vgg.state_dict(), checkpoint)
    argv = ["plan", str(checkpoint), "--arch", "vgg-fmnist", "--target-params", "0.5"]
    assert main([*argv, "--round-to", "4", "--ratios", "features.0=0.25", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    kept = {row["layer"]: row["kept"] for row in payload["layers"] if row["kept"] is not None}
    assert kept["features.0"] == 12 and all(k % 4 == 0 for k in kept.values())
    assert abs(payload["totals"]["params_after"] - 72_541) <= 726
    assert payload["settings"]["target_params"] == 0.5
    assert main(argv) == 0
    assert "50% of the parameters (error allocation)" in capsys.readouterr().out
    out = tmp_path / "small.safetensors"
    command = ["compress", str(checkpoint), "--arch", "vgg-fmnist", "--out", str(out)]
    assert main([*command, "--target-macs", "0.3", "--allocation", "uniform", "--json"]) == 0
    assert abs(count_flops(nm.load(out), X[:1]) - 0.3 * count_flops(vgg, X[:1])) <= 0.003 * count_flops(
        vgg, X[:1]
    )
    assert main([*command, "--target-params", "10", "--force"]) == 2
    assert "out of reach" in capsys.readouterr().err
    assert main([*command, "--force"]) == 2  # neither a ratio nor a budget
    capsys.readouterr()
    assert main([*command, "--ratios", "features.0=0.25", "--force"]) == 0
    assert "ratios features.0 0.25, ratio 0.5 elsewhere" in capsys.readouterr().out
    assert main([*argv, "--ratios", "features0.3"]) == 2
    assert "expected GLOB=RATIO" in capsys.readouterr().err


def test_readme_budget_tables_are_generated_from_the_committed_json() -> None:
    module = load_script("experiments/budget_tables.py")
    readme = (ROOT / "README.md").read_text()
    assert f"{module.START}\n{module.tables()}\n{module.END}" in readme


class _LayerScale(nn.Module):
    """fc1 -> ReLU -> * gamma -> fc2, with an unrelated root parameter as long as the hidden width."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)
        self.gamma = nn.Parameter(torch.randn(10))
        self.other = nn.Parameter(torch.randn(10, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)) * self.gamma) + self.other.sum()


class _Concat(nn.Module):
    """Two convs concatenated into one BatchNorm: each group owns half of it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.c = nn.Conv2d(64, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(F.relu(self.c(y)).mean((2, 3)))


class _Grouped(nn.Module):
    """A grouped conv splits the channels it reads and writes into two blocks, which the cost
    model does not split; ``c``'s channels are plain."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.g(F.relu(self.a(x))))
        return self.head(F.relu(self.c(y)).mean((2, 3)))


def test_per_channel_tensors_are_costed_or_the_group_keeps_its_width() -> None:
    torch.manual_seed(0)
    scaled = _LayerScale().eval()
    # Each hidden channel costs 6 + 1 (fc1) + 1 (gamma) + 3 (fc2); ``other`` is a constant.
    result = nm.compress(scaled, torch.randn(4, 6), target_params=133 - 4 * 11)
    assert count_parameters(result.model) == 89 and result.model.gamma.shape == (6,)
    # Groups owning halves of one BatchNorm (after a concatenation) shrink under a target, each
    # costed with its half, and the prediction is exactly what surgery produces.
    concat = _Concat().eval()
    for module in concat.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    whole = count_parameters(concat)
    budgeted = nm.compress(concat, x, target_params=0.5)
    kept = {s.producer: s.kept for s in budgeted.report.sites}
    assert kept["a"] < 32 and kept["b"] < 32
    assert budgeted.model.bn.num_features == kept["a"] + kept["b"]
    assert abs(count_parameters(budgeted.model) - whole / 2) <= 0.01 * whole / 2
    gm = capture(concat, x)
    chosen, _ = groups(gm, Options())
    costs = model_costs(gm, [shape_of(g) for g in chosen], (x,))
    assert budget.total(costs.params, kept) == count_parameters(budgeted.model)
    assert budget.total(costs.macs, kept) == count_flops(budgeted.model, x[:1])
    assert budgeted.model(x).shape == (2, 4)
    # Channels in blocks keep their width under a target, and an explicit ratio there is refused.
    grouped = _Grouped().eval()
    target = count_parameters(nm.compress(grouped, x, ratios={"c": 0.5, "a": 0.0, "g": 0.0}).model)
    kept = {s.producer: s.kept for s in nm.compress(grouped, x, target_params=target).report.sites}
    assert kept["a"] == 16 and kept["g"] == 16 and kept["c"] < 16
    with pytest.raises(nm.InvalidArgumentError, match="cannot be combined with a target"):
        nm.compress(grouped, x, target_params=0.8, ratios={"a": 0.5})
