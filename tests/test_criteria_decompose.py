"""Kept-neuron criteria and the scaling matrix, checked against hand computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge import criteria
from neuronmerge.decompose import Moments, Rows, least_squares, norm_ratio, norm_ratio_stacked

ROWS = torch.tensor(
    [
        [3.0, 0.0, 0.0],  # l1 3, l2 3
        [1.0, 1.0, 1.0],  # l1 3, l2 1.73
        [0.0, -2.0, 0.0],  # l1 2, l2 2
        [0.1, 0.1, 0.0],  # small: near the others' median
    ]
)


def test_l1_and_l2_scores() -> None:
    assert torch.allclose(criteria.channel_scores(ROWS, "l1-norm"), torch.tensor([3.0, 3.0, 2.0, 0.2]))
    assert torch.allclose(criteria.channel_scores(ROWS, "l2-norm"), ROWS.norm(dim=1))


def test_l2_gm_is_sum_of_distances_and_blocking_does_not_change_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = torch.tensor(
        [sum(float((a - b).norm()) for b in ROWS.double()) for a in ROWS.double()], dtype=torch.float64
    )
    assert torch.allclose(criteria.channel_scores(ROWS, "l2-GM"), expected)
    monkeypatch.setattr(criteria, "_GM_BLOCK", 3)
    assert torch.allclose(criteria.channel_scores(ROWS, "l2-GM"), expected)
    # The row closest to the others (the geometric median's neighbour) is the first to go.
    assert criteria.select_kept(criteria.channel_scores(ROWS, "l2-GM"), 3).tolist() == [0, 1, 2]


def test_select_kept_is_sorted_and_breaks_ties_towards_lower_index() -> None:
    scores = criteria.channel_scores(ROWS, "l1-norm")
    assert criteria.select_kept(scores, 1).tolist() == [0]
    assert criteria.select_kept(scores, 2).tolist() == [0, 1]
    assert criteria.select_kept(torch.tensor([1.0, 5.0, 1.0, 5.0]), 3).tolist() == [0, 1, 3]


def test_kept_count_rounding() -> None:
    assert criteria.kept_count(16, 0.7) == 5  # round(4.8)
    assert criteria.kept_count(16, 0.7, "floor") == 4  # int(4.8), the authors' conv nets
    assert criteria.kept_count(300, 0.6) == 120
    with pytest.raises(nm.InvalidArgumentError):
        criteria.channel_scores(ROWS, "random")


def test_scaling_matrix_by_hand() -> None:
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.2], [-1.0, -1.0]])
    dec = norm_ratio(rows, torch.tensor([0, 1]), threshold=None)
    z = dec.matrix()
    assert z[:2].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # row 2 is most similar to row 0: scale ||r2|| / ||r0||
    assert z[2, 1] == 0 and z[2, 0] == pytest.approx(float(rows[2].norm()))
    # row 3 has cosine -0.71 with both: merged anyway without a threshold (first best: row 0)
    assert z[3].tolist() == pytest.approx([float(rows[3].norm()), 0.0])
    strict = norm_ratio(rows, torch.tensor([0, 1]), threshold=0.0).matrix()
    assert strict[3].tolist() == [0.0, 0.0]
    assert (z >= 0).all() and ((z > 0).sum(dim=1) <= 1).all()


def test_zero_norm_kept_row_never_absorbs() -> None:
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    dec = norm_ratio(rows, torch.tensor([0, 2]), threshold=None)
    assert dec.target.tolist() == [0, 1, 1]
    assert torch.isfinite(dec.scale).all()


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.1])
def test_stacked_sites_pair_as_each_site_alone(folded: bool, threshold: float | None) -> None:
    """``norm_ratio_stacked`` gives every site of a stack the kept set, partners and scales that
    ``select_kept`` and ``norm_ratio`` give it alone: duplicates (exact merges), a dead kept row and
    a dead removed row included."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 10, 6, generator=generator)
    weight[0, 7] = 2.5 * weight[0, 1]  # a positive multiple: merged exactly
    weight[1, 3] = 0.0  # a dead row
    weight[2, 9] = -weight[2, 4]  # opposite: never similar
    scale = torch.rand(4, 10, generator=generator) + 0.5 if folded else None
    shift = torch.randn(4, 10, generator=generator) if folded else None
    stack = Rows(weight, scale, shift)
    for criterion in ("l1-norm", "l2-norm"):
        kept = criteria.select_kept(criteria.channel_scores(stack, criterion), 5)
        target, z = norm_ratio_stacked(stack, kept, threshold)
        for site in range(4):
            alone = Rows(
                weight[site],
                None if scale is None else scale[site],
                None if shift is None else shift[site],
            )
            own = criteria.select_kept(criteria.channel_scores(alone, criterion), 5)
            assert torch.equal(kept[site], own)
            dec = norm_ratio(alone, own, threshold)
            assert torch.equal(target[site], dec.target)
            assert torch.allclose(z[site], dec.scale, rtol=1e-6, atol=0)
    # Nothing removed: every channel is its own partner.
    target, z = norm_ratio_stacked(stack, torch.arange(10).expand(4, 10), threshold)
    assert torch.equal(target, torch.arange(10).expand(4, 10)) and bool((z == 1).all())


def test_stacked_groups_compress_as_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ResNet's same-shape blocks, decomposed as stacks, give the model that deciding each group
    alone gives (``stacked_pairs`` switched off)."""
    from neuronmerge.methods import norm_ratio as method

    torch.manual_seed(0)
    model = nm.create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    found: list[str] = []
    original = method.stacked_pairs

    def spy(*args: object) -> object:
        pairs = original(*args)  # type: ignore[arg-type]
        found.extend(pairs)
        return pairs

    monkeypatch.setattr(method, "stacked_pairs", spy)
    stacked = nm.compress(model, x, 0.5, threshold=None)
    # Stage 1's three blocks, and the two later blocks of stages 2 and 3 (their first differs).
    assert len(found) == 7
    monkeypatch.setattr(method, "stacked_pairs", lambda *args: {})
    alone = nm.compress(model, x, 0.5, threshold=None)
    assert [s.merged for s in stacked.report.sites] == [s.merged for s in alone.report.sites]
    one, two = stacked.model.state_dict(), alone.model.state_dict()
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("criterion", criteria.CRITERIA)
def test_every_criterion_runs_end_to_end(criterion: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    result = nm.compress(model.eval(), torch.randn(2, 8), 0.5, criterion=criterion)
    assert [(s.producer, s.kept, s.merged + s.dropped) for s in result.report.sites] == [
        ("0", 6, 6),
        ("2", 3, 3),
    ]
    assert result.model(torch.randn(3, 8)).shape == (3, 2)


def test_default_threshold_is_the_validation_winner() -> None:
    record = Path(__file__).resolve().parents[1] / "experiments" / "threshold_validation.json"
    assert nm.DEFAULT_THRESHOLD == json.loads(record.read_text())["best_threshold"]


def test_least_squares_through_the_origin_has_no_constants_and_fits_raw_moments() -> None:
    # channel 2 = 2 * channel 0 + 1: with a constant the fit is exact (z = 2, m = 1); through the
    # origin it is the hand-computed z = E[h2 h0] / E[h0^2] with no constant
    h0 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    h = torch.stack([h0, torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64), 2 * h0 + 1], 1)
    mean = h.mean(0)
    moments = Moments(mean, (h - mean).T @ (h - mean) / 4, 4)
    kept = torch.tensor([0, 1])
    fitted = least_squares(moments, kept, 0.0)
    assert fitted.shift is not None and torch.allclose(fitted.shift[2], torch.tensor(1.0).double())
    assert torch.allclose(fitted.mixing[2], torch.tensor([2.0, 0.0]).double(), atol=1e-9)
    origin = least_squares(moments, kept, 0.0, intercept=False)
    assert origin.shift is None
    raw = h.T @ h / 4
    expected = raw[2, :2] @ torch.linalg.inv(raw[:2, :2])
    assert torch.allclose(origin.mixing[2], expected, atol=1e-9)


def test_covering_blocks_keeps_whole_heads_and_is_covering_kept_for_single_channels() -> None:
    torch.manual_seed(0)
    basis = torch.randn(200, 6, dtype=torch.float64)
    weights = torch.rand(6, dtype=torch.float64) + 0.5
    cov = basis.T @ basis / 200
    assert torch.equal(
        criteria.covering_blocks(cov, weights, 3, 1), criteria.covering_kept(cov, weights, 3)
    )
    # Heads of 2 dims: head 2 is a linear map of head 0, so it explains nothing once head 0 is kept.
    heads = basis.clone()
    heads[:, 4:] = heads[:, :2] @ torch.randn(2, 2, dtype=torch.float64)
    cov = heads.T @ heads / 200
    kept = criteria.covering_blocks(cov, torch.ones(6, dtype=torch.float64), 2, 2)
    assert kept.tolist() in ([0, 1], [1, 2])
