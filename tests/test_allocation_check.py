"""merge-ls under a target keeps an allocation only when the probes say it beats the uniform widths."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import neuronmerge as nm
from neuronmerge import allocation_check, budget
from neuronmerge.models import create_model

G = torch.Generator().manual_seed(0)
X = torch.randn(2, 1, 28, 28, generator=G)
BATCHES = [(torch.randn(64, 1, 28, 28, generator=G),) for _ in range(4)]


def test_an_allocation_must_beat_uniform_by_more_than_noise() -> None:
    uniform = torch.rand(400, generator=G, dtype=torch.float64) + 1
    clearly = uniform - 0.1  # lower on every probe
    noise = torch.randn(400, generator=G, dtype=torch.float64)
    noisy = uniform + 5 * (noise - noise.mean()) - 0.01  # lower on average, by 0.04 standard errors
    assert float(noisy.mean()) < float(uniform.mean())
    assert allocation_check.significance(uniform, clearly) > 1e6
    assert allocation_check.replaces(uniform, uniform, clearly)
    assert abs(allocation_check.significance(uniform, noisy)) < 1
    assert not allocation_check.replaces(uniform, uniform, noisy)
    # Significantly better than uniform, but not better than the best so far.
    assert not allocation_check.replaces(uniform, uniform - 0.2, clearly)


def test_probe_errors_are_scale_free_per_probe() -> None:
    reference = torch.randn(50, 10, generator=G, dtype=torch.float64)
    produced = reference + 0.1 * torch.randn(50, 10, generator=G, dtype=torch.float64)
    errors = allocation_check.probe_errors(produced, reference)
    assert errors.shape == (50,)
    assert torch.allclose(allocation_check.probe_errors(3 * produced, 3 * reference), errors)
    assert float(allocation_check.probe_errors(reference, reference).abs().max()) == 0


def _errors(model: torch.nn.Module, small: torch.nn.Module) -> torch.Tensor:
    dense = allocation_check.outputs(model, BATCHES)
    return allocation_check.probe_errors(allocation_check.outputs(small, BATCHES), dense)


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lenet-300-100").eval()


def _compress(model: torch.nn.Module, allocation: str) -> nm.Result:
    return nm.compress(
        model,
        X,
        target_params=0.3,
        method="merge-ls",
        calibration=BATCHES,
        allocation=allocation,  # type: ignore[arg-type]
    )


def test_merge_ls_keeps_the_widths_closest_on_the_probes(
    lenet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    uniform = _compress(lenet, "uniform")
    assert uniform.report.allocation == "uniform"
    uniform_widths = [s.kept for s in uniform.report.sites]
    # Never trusted: the uniform widths, built exactly as allocation="uniform" builds them.
    monkeypatch.setattr(allocation_check, "SIGNIFICANCE", math.inf)
    fallback = _compress(lenet, "error")
    assert fallback.report.allocation == "uniform"
    assert [s.kept for s in fallback.report.sites] == uniform_widths
    assert torch.allclose(fallback.model(X), uniform.model(X))
    # Always trusted when closer: the allocation with the lowest error on the probes, here not
    # the uniform widths, and closer to the dense model than them.
    monkeypatch.setattr(allocation_check, "SIGNIFICANCE", -math.inf)
    trusted = _compress(lenet, "error")
    assert trusted.report.allocation == "error"
    assert [s.kept for s in trusted.report.sites] != uniform_widths
    closer = _errors(lenet, trusted.model)
    assert float(closer.mean()) < float(_errors(lenet, uniform.model).mean())
    # Each band alone: the chosen one is the closest of them.
    monkeypatch.setattr(allocation_check, "ENABLED", False)
    for band in allocation_check.BANDS:
        monkeypatch.setattr(budget, "BAND", band)
        alone = _compress(lenet, "error")
        assert float(_errors(lenet, alone.model).mean()) >= float(closer.mean()) - 1e-12


def test_folds_score_every_probe_once_with_a_model_fitted_on_the_others() -> None:
    batches = [(torch.arange(6.0)[:, None],), (torch.arange(6.0, 11.0)[:, None],)]
    splits = allocation_check.folds(batches)
    scored = sorted(float(v) for _, part in splits for batch in part for v in batch[0].flatten())
    assert scored == [float(v) for v in range(11)]
    for fit, part in splits:
        fitted = {float(v) for batch in fit for v in batch[0].flatten()}
        assert fitted.isdisjoint(float(v) for batch in part for v in batch[0].flatten())


def test_held_out_errors_are_fitted_without_the_probes_they_score(lenet: torch.nn.Module) -> None:
    from neuronmerge import api, engine, lsq
    from neuronmerge.options import Options

    options = Options.of(method="merge-ls", target_params=0.3)
    chosen = options.method_object()
    gm = engine.capture(lenet, X)
    groups, _ = engine.groups(gm, options, chosen)
    source = lsq.MeasuredMoments(tuple(BATCHES))
    keep = api._uniform_widths(gm, groups, (X,), options, chosen)
    dense = allocation_check.outputs(gm, BATCHES)
    args = (gm, groups, keep, options, (X,), chosen, source, tuple(BATCHES), dense)
    in_sample, built = api._probe_errors(*args, False)
    held_out, none = api._probe_errors(*args, True)
    assert built is not None and none is None
    assert in_sample.shape == held_out.shape == (sum(b[0].shape[0] for b in BATCHES),)
    # 128 probes of 784 pixels: a fit on them matches them better than probes it never saw.
    assert float(held_out.mean()) > 1.5 * float(in_sample.mean())
    # The odd probes of every batch are scored by the model fitted on the even ones alone.
    (fit, scored), _ = allocation_check.folds(BATCHES)
    small, _ = api._build(
        copy.deepcopy(gm), groups, keep, options, (X,), lsq.MeasuredMoments(fit), chosen
    )
    dense = torch.cat([allocation_check.outputs(gm, scored), allocation_check.outputs(gm, fit)])
    own = allocation_check.outputs(small, scored)
    scale = (dense - dense.mean(0)).square().sum(1).mean()
    half = len(own)
    assert torch.allclose(held_out[:half], (own - dense[:half]).square().sum(1) / scale)


def test_uniform_widths_already_close_on_the_probes_are_kept_untried(
    lenet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    uniform = _compress(lenet, "uniform")
    error = float(_errors(lenet, uniform.model).mean())
    assert error > 0
    monkeypatch.setattr(allocation_check, "SIGNIFICANCE", -math.inf)  # any closer allocation wins
    # Just above the uniform widths' own error: they are kept, built as allocation="uniform" does.
    monkeypatch.setattr(allocation_check, "NEGLIGIBLE", 1.01 * error)
    kept = _compress(lenet, "error")
    assert kept.report.allocation == "uniform"
    assert torch.allclose(kept.model(X), uniform.model(X))
    # Just below it: the allocation is tried, and wins.
    monkeypatch.setattr(allocation_check, "NEGLIGIBLE", 0.99 * error)
    tried = _compress(lenet, "error")
    assert tried.report.allocation == "error"
    assert float(_errors(lenet, tried.model).mean()) < error


def _widths(result: nm.Result) -> list[int]:
    return [s.kept for s in result.report.sites]


@pytest.mark.parametrize("method", ["merge", "prune"])
def test_weight_only_methods_keep_uniform_widths_unless_the_probes_vouch_for_the_allocation(
    lenet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    before = copy.deepcopy(lenet.state_dict())

    def compress(allocation: str) -> nm.Result:
        return nm.compress(
            lenet, X, target_params=0.3, method=method, calibration=BATCHES, allocation=allocation
        )  # type: ignore[arg-type]

    uniform = compress("uniform")
    monkeypatch.setattr(allocation_check, "ENABLED", False)
    unchecked = compress("error")  # the allocation alone, at the default band
    assert unchecked.report.allocation == "error" and _widths(unchecked) != _widths(uniform)
    monkeypatch.setattr(allocation_check, "ENABLED", True)
    # Never trusted: the uniform widths, the same model allocation="uniform" builds.
    monkeypatch.setattr(allocation_check, "SIGNIFICANCE", math.inf)
    fallback = compress("error")
    assert fallback.report.allocation == "uniform"
    assert _widths(fallback) == _widths(uniform)
    assert torch.equal(fallback.model(X), uniform.model(X))
    # Trusted whenever closer on the probes: an allocation, closer than uniform and every band.
    monkeypatch.setattr(allocation_check, "SIGNIFICANCE", -math.inf)
    monkeypatch.setattr(allocation_check, "NEGLIGIBLE", 0.0)
    trusted = compress("error")
    assert trusted.report.allocation == "error" and _widths(trusted) != _widths(uniform)
    closer = float(_errors(lenet, trusted.model).mean())
    assert closer < float(_errors(lenet, uniform.model).mean())
    assert closer <= float(_errors(lenet, unchecked.model).mean())
    # The caller's model is untouched.
    assert all(torch.equal(v, lenet.state_dict()[k]) for k, v in before.items())


def test_the_data_free_check_of_merge_scores_the_models_own_probes(
    lenet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuronmerge import probes

    made: list[torch.Size] = []

    def probes_of(model: torch.nn.Module, example: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        made.append(example.shape)
        return list(BATCHES)

    monkeypatch.setattr(probes, "cached_probes", probes_of)
    monkeypatch.setattr(allocation_check, "SIGNIFICANCE", -math.inf)
    monkeypatch.setattr(allocation_check, "NEGLIGIBLE", 0.0)
    own = nm.compress(lenet, X, target_params=0.3)
    assert made == [X.shape]
    # The same widths and model as checking on the same batches passed as calibration.
    given = nm.compress(lenet, X, target_params=0.3, calibration=BATCHES)
    assert _widths(own) == _widths(given) and own.report.allocation == "error"
    assert torch.equal(own.model(X), given.model(X))
    # No target, or allocation="uniform": nothing to check, no probes.
    nm.compress(lenet, X, 0.3)
    nm.compress(lenet, X, target_params=0.3, allocation="uniform")
    assert len(made) == 1


class _Tokens(torch.nn.Module):
    """Token ids in, class logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.fc1 = torch.nn.Linear(8 * 6, 64)
        self.fc2 = torch.nn.Linear(64, 48)
        self.out = torch.nn.Linear(48, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.embed(ids).flatten(1)))
        return self.out(torch.relu(self.fc2(h)))


class _TwoInputs(_Tokens):
    """Two real-valued inputs."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = torch.relu(self.fc1(x + y))
        return self.out(torch.relu(self.fc2(h)))


class _Grid(_Tokens):
    """One real-valued input, an output that is no (batch, classes) logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = torch.relu(self.fc1(x))
        return self.out(torch.relu(self.fc2(h)))[:, None, :]


UNPROBED = [
    (_Tokens, (torch.randint(0, 32, (2, 6), generator=G),), "real-valued inputs only"),
    (_TwoInputs, (torch.randn(2, 48, generator=G), torch.randn(2, 48, generator=G)), "single-input"),
    (_Grid, (torch.randn(2, 48, generator=G),), "class logits"),
]


@pytest.mark.parametrize(("make", "inputs", "why"), UNPROBED)
def test_without_probes_the_allocation_is_kept_unchecked_and_says_so(
    monkeypatch: pytest.MonkeyPatch, make: type, inputs: tuple[torch.Tensor, ...], why: str
) -> None:
    from neuronmerge import probes

    torch.manual_seed(0)
    model = make().eval()
    before = copy.deepcopy(model.state_dict())

    def refuse(*_: object) -> None:
        raise AssertionError("probes were made for a model they cannot be made for")

    monkeypatch.setattr(probes, "cached_probes", refuse)
    result = nm.compress(model, inputs, target_params=0.5, method="merge")
    assert result.report.allocation == nm.api.UNCHECKED == "error-unchecked"
    monkeypatch.setattr(allocation_check, "ENABLED", False)
    alone = nm.compress(model, inputs, target_params=0.5, method="merge")
    assert _widths(result) == _widths(alone) and alone.report.allocation == "error"
    assert torch.equal(result.model(*inputs), alone.model(*inputs))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # merge-ls cannot fit without batches: one clear error naming the reason, nothing changed.
    with pytest.raises(nm.InvalidArgumentError, match=f"merge-ls fits on batches.*{why}.*calibration="):
        nm.compress(model, inputs, target_params=0.5, method="merge-ls")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_calibration_batches_check_the_allocation_of_a_token_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = _Tokens().eval()
    ids = torch.randint(0, 32, (2, 6), generator=G)
    calibration = [(torch.randint(0, 32, (64, 6), generator=G),) for _ in range(2)]
    monkeypatch.setattr(allocation_check, "SIGNIFICANCE", math.inf)
    result = nm.compress(model, ids, target_params=0.5, calibration=calibration)
    uniform = nm.compress(model, ids, target_params=0.5, allocation="uniform")
    assert result.report.allocation == "uniform" and _widths(result) == _widths(uniform)


def test_merge_ls_data_free_check_scores_probes_its_fit_never_saw(
    lenet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuronmerge import engine, probes

    made = probes.cached_probes
    seeds: list[int] = []

    def spied(model: torch.nn.Module, example: torch.Tensor, **options: object) -> object:
        seeds.append(int(options.get("seed", 0)))  # type: ignore[call-overload]
        return made(model, example, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(probes, "cached_probes", spied)
    # Few, quickly made probes (both seeds): what is tested is which ones the check scores on.
    monkeypatch.setattr(probes, "FULL", probes.Regime(128, 20, 0.05, 170e9, derived=False))
    monkeypatch.setattr(allocation_check, "NEGLIGIBLE", 0.0)  # always try the allocation
    monkeypatch.setattr(allocation_check, "FITTED_SIGNIFICANCE", -math.inf)  # closer on average wins
    monkeypatch.setattr(allocation_check, "FITTED_BANDS", (0.2,))
    checked = nm.compress(lenet, X, target_params=0.3, method="merge-ls")
    assert seeds[-1] == allocation_check.CHECK_SEED != 0
    # The pick is the one closer on those fresh probes, not on the fit's own.
    fresh = made(engine.capture(lenet, X), X, seed=allocation_check.CHECK_SEED)
    dense = allocation_check.outputs(lenet, fresh)
    uniform = nm.compress(lenet, X, target_params=0.3, method="merge-ls", allocation="uniform")
    monkeypatch.setattr(allocation_check, "ENABLED", False)
    monkeypatch.setattr(budget, "BAND", 0.2)
    alone = nm.compress(lenet, X, target_params=0.3, method="merge-ls")
    errors = {
        name: float(
            allocation_check.probe_errors(allocation_check.outputs(r.model, fresh), dense).mean()
        )
        for name, r in (("uniform", uniform), ("error", alone))
    }
    expected = min(errors, key=lambda name: (errors[name], name == "error"))
    assert checked.report.allocation == expected
    kept = uniform if expected == "uniform" else alone
    assert [s.kept for s in checked.report.sites] == [s.kept for s in kept.report.sites]
    # Without a seed for the check, no other probes are made.
    monkeypatch.setattr(allocation_check, "ENABLED", True)
    monkeypatch.setattr(allocation_check, "CHECK_SEED", None)
    seeds.clear()
    nm.compress(lenet, X, target_params=0.3, method="merge-ls")
    assert allocation_check.CHECK_SEED not in seeds and set(seeds) <= {0}
