"""What synthetic probes cost: sized by the model, stopped early, made once per model, never unneeded."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge import probes
from neuronmerge.capture import capture
from tests.builders import compress_announced


def test_schedule_gives_cheap_models_every_probe_and_heavy_ones_fewer() -> None:
    matched, full, derived = probes.MATCHED, probes.FULL, probes.DERIVED
    conv = probes.schedule(5.6e6)  # a Fashion-MNIST BatchNorm conv net: every probe optimised
    assert probes.MIN_PROBES <= conv.optimised == conv.count < probes.PROBES
    assert (conv.steps, conv.rate) == (matched.steps, matched.rate)
    # Without BatchNorm: every probe where the budget affords it, else a few optimised fast and the
    # rest derived from them.
    lenet = probes.schedule(266_200, batchnorm=False)  # LeNet-300-100: affords every probe
    assert (lenet.optimised, lenet.count, lenet.steps) == (probes.PROBES,) * 2 + (full.steps,)
    assert lenet.rate == full.rate
    plain = probes.schedule(5.6e6, batchnorm=False)  # a conv net without BatchNorm: a few, derived
    assert 16 < plain.optimised < 128 and plain.count == probes.PROBES
    assert (plain.steps, plain.rate) == (derived.steps, derived.rate)
    huge = probes.schedule(4.1e9)  # ResNet-50 at 224 x 224
    assert (huge.optimised, huge.count, huge.steps) == (probes.MIN_PROBES,) * 2 + (probes.MIN_STEPS,)
    huge_plain = probes.schedule(4.1e9, batchnorm=False)  # no more forwards than the budget's
    assert huge_plain.count == huge_plain.optimised == probes.MIN_PROBES
    for macs in (1e5, 1e6, 1e7, 5e7):  # within budget, unless at the floors
        for batchnorm in (True, False):
            plan = probes.schedule(macs, batchnorm=batchnorm)
            regime = matched if batchnorm else derived if plan.rate == derived.rate else full
            assert 3 * macs * plan.optimised * plan.steps <= regime.budget


def test_derived_probes_mix_the_optimised_ones_and_fill_every_direction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    optimised = torch.randn(4, 10)  # fewer probes than input dimensions
    made = probes.derive(optimised, 64, torch.Generator().manual_seed(0))
    assert made.shape == (64, 10) and torch.equal(made[:4], optimised)
    assert torch.linalg.matrix_rank(made[4:]) == 10  # the noise reaches every direction
    monkeypatch.setattr(probes, "NOISE", 0.0)
    mixed = probes.derive(optimised, 64, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(mixed) == 4  # mixtures alone stay in the optimised span
    coefficients = torch.linalg.lstsq(optimised.T, mixed[4:].T).solution  # (4, 60)
    assert torch.allclose(coefficients.sum(dim=0), torch.ones(60), atol=1e-4)  # convex pairs
    assert bool((coefficients > -1e-4).all())


def test_only_the_optimised_probes_cost_optimisation_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    seen: list[int] = []
    model.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    made = nm.synthesize_probes(
        model, torch.randn(2, 6), 100, optimised=16, steps=12, rate=0.2, tolerance=0, batch_size=64
    )
    assert seen == [16] * 12  # 12 steps of the 16 optimised probes, none of the 84 derived
    assert [batch[0].shape for batch in made] == [(64, 6), (36, 6)]
    with pytest.raises(nm.InvalidArgumentError, match="optimised between 1 and count"):
        nm.synthesize_probes(model, torch.randn(2, 6), 8, optimised=9)
    with pytest.raises(nm.InvalidArgumentError, match="at least two optimised"):
        nm.synthesize_probes(model, torch.randn(2, 6), 8, optimised=1, steps=1, rate=0.2)


def test_a_batch_stops_once_its_loss_stops_falling() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    nm.synthesize_probes(model, torch.randn(2, 6), 32, steps=100, rate=0.05, tolerance=1.0)
    assert len(calls) == probes.PATIENCE + 1  # no loss falls by 100% in PATIENCE steps: stop
    calls.clear()
    nm.synthesize_probes(model, torch.randn(2, 6), 32, steps=12, rate=0.05, tolerance=0)
    assert len(calls) == 12


def test_merge_ls_makes_no_probes_when_nothing_is_mergeable(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("probes were made for a model with nothing to merge")

    monkeypatch.setattr(probes, "synthesize_probes", refuse)
    # The only layer's outputs are the model's: nothing to merge.
    model = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1)).eval()
    x = torch.randn(2, 4)
    result = compress_announced(model, x, 0.5, method="merge-ls")
    assert result.report.sites == () and torch.equal(result.model(x), model(x))


def test_probes_are_made_once_per_model_and_again_when_it_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probes, "MATCHED", replace(probes.MATCHED, optimised=64, steps=5))
    monkeypatch.setattr(probes, "_CACHE", OrderedDict())
    made: list[int] = []
    original = probes.synthesize_probes

    def counting(*args: object, **kwargs: object) -> list[tuple[torch.Tensor, ...]]:
        made.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(probes, "synthesize_probes", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 5)
    first = nm.compress(model, x, 0.5, method="merge-ls").model
    second = nm.compress(model, x, 0.75, method="merge-ls").model
    again = nm.compress(model, x, 0.5, method="merge-ls").model
    assert len(made) == 1  # one set of probes for three calls at two ratios
    assert torch.equal(first(x), again(x)) and second.get_submodule("0").out_features == 2
    with torch.no_grad():
        model[0].weight.mul_(2)  # changed in place: its old probes no longer describe it
    nm.compress(model, x, 0.5, method="merge-ls")
    assert len(made) == 2
    assert probes.cached_probes(capture(model, x), x)[0][0].shape == (64, 5)
    assert len(made) == 2


def test_probe_steps_are_torch_adam_steps_without_importing_its_machinery() -> None:
    torch.manual_seed(0)
    ours, theirs = torch.randn(16, 9), torch.randn(16, 9)
    theirs.copy_(ours).requires_grad_(True)
    adam, reference = probes._Adam(ours, 0.05), torch.optim.Adam([theirs], lr=0.05)
    for _ in range(30):
        grad = torch.randn(16, 9)
        theirs.grad = grad.clone()
        reference.step()
        adam.step(grad)
    assert torch.equal(ours, theirs.detach())


def test_batchnorm_matching_drives_probe_statistics_to_the_stored_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    model.append(nn.Linear(4 * 4 * 4, 3))
    norm = model[1]
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
        norm.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    model.eval()
    seen: list[torch.Tensor] = []
    norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    # Without the input prior (which pulls the means towards zero) the statistics term is all that
    # shapes the probes' spread: it must reach the stored statistics.
    example = torch.randn(2, 2, 6, 6)
    (made,) = nm.synthesize_probes(model, example, 64, steps=150, rate=0.1, tolerance=0, prior=0)
    seen.clear()
    model(made[0])
    inputs = seen[0].transpose(0, 1).flatten(1)  # (channels, samples)
    assert (inputs.mean(dim=1) - norm.running_mean).abs().max() < 0.05
    assert (inputs.var(dim=1, unbiased=False) / norm.running_var - 1).abs().max() < 0.05
