"""Moments propagated from BatchNorm statistics (``lab.propagate``): the closed forms against Monte
Carlo samples, the whole propagation against measured moments where its assumptions hold exactly,
the BatchNorm correction, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge import engine
from neuronmerge.activations import tensor_moments
from neuronmerge.capture import capture
from neuronmerge.lab.propagate import (
    Gaussian,
    NoiseMoments,
    PropagatedMoments,
    Unsupported,
    _max_of_normals,
    propagate,
    rectified,
)
from neuronmerge.methods.base import Inputs


def _samples(g: Gaussian, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(g.cov)
    z = torch.randn(n, g.channels, dtype=torch.float64, generator=generator)
    return g.mean + z @ chol.T


def test_rectified_matches_monte_carlo_for_correlated_shifted_gaussians() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, dtype=torch.float64, generator=generator)
    g = Gaussian(
        torch.tensor([-1.5, -0.3, 0.0, 0.4, 2.0], dtype=torch.float64), a @ a.T + 0.1 * torch.eye(5)
    )
    x = _samples(g, 400_000, 1).clamp_min(0)
    out = rectified(g)
    assert torch.allclose(out.mean, x.mean(0), atol=0.01)
    assert torch.allclose(out.cov, torch.cov(x.T), atol=0.02 * float(out.cov.diagonal().max()))


def test_max_of_normals_matches_the_known_two_point_values() -> None:
    mean, var = _max_of_normals(2)
    assert mean == pytest.approx(1 / math.sqrt(math.pi), abs=1e-6)
    assert var == pytest.approx(1 - 1 / math.pi, abs=1e-6)


class _Mlp(nn.Module):
    """linear -> BN -> ReLU -> linear -> BN -> ReLU -> linear, BN statistics set to the exact
    moments of their inputs under a standard normal input (so the propagation's anchor is exact)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn1 = nn.Linear(48, 64), nn.BatchNorm1d(64)
        self.fc2, self.bn2 = nn.Linear(64, 4), nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        return self.head(torch.relu(self.bn2(self.fc2(x))))


def _calibrate_exactly(model: _Mlp) -> None:
    """Set bn1's statistics in closed form (fc1 of a standard normal) and bn2's from 400k samples."""
    with torch.no_grad():
        w, b = model.fc1.weight, model.fc1.bias
        model.bn1.running_mean.copy_(b)
        model.bn1.running_var.copy_((w @ w.T).diagonal())
        x = torch.randn(400_000, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        h = model.fc2(torch.relu(model.bn1(model.fc1(x))))
        model.bn2.running_mean.copy_(h.mean(0))
        model.bn2.running_var.copy_(h.var(0, unbiased=False))


def test_propagated_moments_match_measured_ones_where_the_assumptions_hold() -> None:
    """Vectors (no positions) of a Gaussian input through exactly calibrated BatchNorms: bn2's input
    sums 64 rectified channels, so it is Gaussian only approximately (a looser tolerance)."""
    model = _Mlp()
    _calibrate_exactly(model)
    example = torch.zeros(2, 48, dtype=torch.float64)
    gm = capture(model, example)
    options = nm.Options(method="merge-ls")
    groups, _ = engine.groups(gm, options)
    x = torch.randn(200_000, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    measured = tensor_moments(gm, groups, [(x,)])
    propagated = PropagatedMoments.of(gm, example).moments(gm, groups)
    assert set(propagated) == set(measured)
    first = next(k for k in measured if k[0] == "fc1")
    assert torch.allclose(propagated[first].mean, measured[first].mean, atol=0.01)
    assert torch.allclose(propagated[first].cov, measured[first].cov, atol=0.01)
    second = next(k for k in measured if k[0] == "fc2")
    assert torch.allclose(propagated[second].mean, measured[second].mean, atol=0.03)
    assert torch.allclose(propagated[second].cov, measured[second].cov, atol=0.03)


def test_noise_moments_match_measured_ones_when_the_input_is_that_noise() -> None:
    """Standard normal inputs with exactly calibrated BatchNorms: normalising by the batch's
    statistics computes nearly what the stored ones do, so the moments agree with eval mode's."""
    model = _Mlp()
    _calibrate_exactly(model)
    example = torch.zeros(2, 48, dtype=torch.float64)
    gm = capture(model, example)
    groups, _ = engine.groups(gm, nm.Options(method="merge-ls"))
    source = NoiseMoments.of(gm, example, count=20_000)
    noise = [(torch.cat([b[0] for b in source.batches]),)]
    measured = tensor_moments(gm, groups, noise)
    for key, moments in source.moments(gm, groups).items():
        assert torch.allclose(moments.mean, measured[key].mean, atol=0.02)
        assert torch.allclose(moments.cov, measured[key].cov, atol=0.02)
    assert torch.allclose(gm.bn2.running_var, model.bn2.running_var)  # the model is left alone


@pytest.mark.parametrize("source_type", [PropagatedMoments, NoiseMoments])
def test_batchnorm_correction_changes_nothing_when_nothing_is_removed(source_type: type) -> None:
    model = _Mlp()
    _calibrate_exactly(model)
    example = torch.zeros(2, 48, dtype=torch.float64)
    gm = capture(model, example)
    options = nm.Options(method="merge-ls")
    groups, _ = engine.groups(gm, options)
    source = source_type.of(gm, example)
    keep = {g.name: g.channels for g in groups}
    decompositions = engine.decompose(gm, groups, keep, options, Inputs((example,), source))
    small = engine.surgery(gm, groups, decompositions)
    repaired = source.repair(small, groups, decompositions)
    for name in ("bn1", "bn2"):
        before, after = getattr(model, name), getattr(repaired, name)
        assert torch.allclose(after.running_mean, before.running_mean, atol=1e-9)
        assert torch.allclose(after.running_var, before.running_var, rtol=1e-9)
    assert repaired is not small


def test_batchnorm_correction_follows_the_variance_a_merge_removes() -> None:
    """Half of fc1's channels merged: bn2's input loses the variance the fit cannot explain, and the
    corrected statistics shrink by what the propagation predicts (between the original and zero)."""
    model = _Mlp()
    _calibrate_exactly(model)
    example = torch.zeros(2, 48, dtype=torch.float64)
    gm = capture(model, example)
    options = nm.Options(method="merge-ls", include=["fc1"])
    groups, _ = engine.groups(gm, options)
    source = PropagatedMoments.of(gm, example)
    decompositions = engine.decompose(gm, groups, {"fc1": 32}, options, Inputs((example,), source))
    small = engine.surgery(gm, groups, decompositions)
    repaired = source.repair(small, groups, decompositions)
    ratio = repaired.bn2.running_var / model.bn2.running_var
    assert bool((ratio < 1).all()) and bool((ratio > 0).all())
    assert torch.allclose(repaired.bn1.running_var, model.bn1.running_var[decompositions["fc1"].kept])


def test_propagation_refuses_models_without_batchnorm_and_unknown_ops() -> None:
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with pytest.raises(Unsupported, match="no BatchNorm"):
        propagate(capture(plain, torch.zeros(2, 4)), torch.zeros(2, 4))
    gelu = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.GELU(), nn.Linear(3, 2)).eval()
    with pytest.raises(Unsupported, match="GELU"):
        propagate(capture(gelu, torch.zeros(2, 4)), torch.zeros(2, 4))


def test_flatten_module_and_function_propagate_alike() -> None:
    """``nn.Flatten`` and ``torch.flatten`` give the Linear after them the same moments."""
    torch.manual_seed(0)
    body = [nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()]
    as_module = nn.Sequential(*body, nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()

    class AsFunction(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Sequential(*body), as_module[-1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.flatten(self.body(x), 1))

    example = torch.zeros(2, 2, 6, 6)
    heads = []
    for model in (as_module, AsFunction().eval()):
        values = propagate(capture(model, example), example).values
        heads.append(values[list(values)[-1]])
    assert torch.allclose(heads[0].mean, heads[1].mean) and torch.allclose(heads[0].cov, heads[1].cov)
