"""Propagation-aware curves: each group's measured whole-model error when it alone is cut."""

from __future__ import annotations

import copy

import pytest
import torch

import neuronmerge as nm
from neuronmerge import allocation_check, api, budget, engine, group_impact, lsq, widths
from neuronmerge.models import create_model
from neuronmerge.options import Options

G = torch.Generator().manual_seed(0)
X = torch.randn(2, 1, 28, 28, generator=G)
BATCHES = [(torch.randn(24, 1, 28, 28, generator=G),) for _ in range(2)]


def test_a_rescaled_curve_keeps_its_shape_and_meets_the_measurement() -> None:
    curve = (1.0, 0.5, 0.2, 0.0)
    scaled = budget.rescaled(curve, 2, 0.05)
    assert scaled[2] == pytest.approx(0.05)
    assert scaled == pytest.approx((0.25, 0.125, 0.05, 0.0))
    assert budget.rescaled((1.0, 0.0, 0.0), 1, 0.3) == (1.0, 0.0, 0.0)  # nothing to scale


@pytest.fixture(scope="module")
def setting() -> tuple[object, ...]:
    torch.manual_seed(0)
    model = create_model("vgg-fmnist").eval()
    options = Options.of(method="merge-ls", target_params=0.3)
    chosen = options.method_object()
    gm = engine.capture(model, X)
    groups, _ = engine.groups(gm, options, chosen)
    source = lsq.MeasuredMoments(tuple(BATCHES))
    return model, options, chosen, gm, groups, source


def test_impact_is_the_output_error_of_cutting_the_group_alone(setting: tuple[object, ...]) -> None:
    _, options, chosen, gm, groups, source = setting
    assert isinstance(gm, torch.fx.GraphModule) and isinstance(options, Options)
    assert isinstance(groups, list) and isinstance(source, lsq.MeasuredMoments)
    uniform = api._uniform_widths(gm, groups, (X,), options, chosen)  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    impact = api._impact(gm, groups, uniform, options, (X,), chosen, source)  # type: ignore[arg-type]
    assert impact and set(impact) <= {g.name for g in groups}
    assert all(w == uniform[name] for name, (w, _) in impact.items())
    # Measured again by hand: that group at its uniform width, every other group whole.
    name, (width, error) = next(iter(impact.items()))
    full = {g.name: g.channels for g in groups}
    small, _ = api._build(
        copy.deepcopy(gm),
        groups,
        {**full, name: width},
        options,
        (X,),
        source,
        chosen,  # type: ignore[arg-type]
    )
    dense = allocation_check.outputs(gm, source.batches)
    alone = allocation_check.probe_errors(allocation_check.outputs(small, source.batches), dense)
    assert error > 0
    assert error == pytest.approx(float(alone.mean()), rel=1e-6)
    # Deterministic, and the captured graph is left as it was.
    assert api._impact(gm, groups, uniform, options, (X,), chosen, source) == impact  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_the_allocation_uses_the_rescaled_curves(setting: tuple[object, ...]) -> None:
    _, options, chosen, gm, groups, source = setting
    assert isinstance(gm, torch.fx.GraphModule) and isinstance(options, Options)
    assert isinstance(groups, list)
    free = [g for g in groups if widths.allocated(gm, g, options.budget)]
    assert len(free) >= 2
    # One group said to cost the model nothing at width 1 keeps the least it may within the band;
    # said to cost everything, it keeps the most.
    target, other = free[0], free[1]
    kept = {}
    for error in (1e-9, 1e3):
        impact = {target.name: (1, error), other.name: (1, 1.0)}
        kept[error] = widths.kept_counts(
            gm,
            groups,
            (X,),
            None,
            options.budget,
            chosen,
            moments=source,
            band=0.5,
            impact=impact,  # type: ignore[arg-type]
        )[target.name]
    assert kept[1e-9] < kept[1e3]


def test_merge_ls_with_propagated_curves_meets_the_target(
    setting: tuple[object, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = setting[0]
    assert isinstance(model, torch.nn.Module)
    monkeypatch.setattr(allocation_check, "SIGNIFICANCE", -float("inf"))
    monkeypatch.setattr(group_impact, "ENABLED", True)
    result = nm.compress(model, X, target_params=0.3, method="merge-ls", calibration=BATCHES)
    assert abs(result.report.params_after / result.report.params_before - 0.3) <= 0.01 * 0.3 + 1e-9
    assert result.model(X).shape == model(X).shape
