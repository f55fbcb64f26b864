"""Compress to a budget: choose every group's width so that the model meets a parameter or MAC target.

This module is pure: it sees plain values, never a graph. The engine describes each group of coupled
channels by its channel count and an *error curve* (``error[k]``: how much the model is expected to
suffer when the group keeps ``k`` channels), and the whole model's cost by polynomial ``Term``s in the
kept counts (a layer whose rows belong to group ``g`` and whose columns to group ``h`` costs
``coefficient * k_g * k_h`` parameters; a BatchNorm of ``g`` costs ``2 * k_g``; what no group touches
is a constant). From these ``allocate`` returns a kept count per group.

The data-free idea (``merge_error_curve``): a removed channel costs what its kept neighbours cannot
reproduce. Channel ``i`` computes the row ``f_i`` (producer weights with BatchNorm folded in, and its
constant); merging it into the kept channel ``j`` most similar to it leaves the residual
``|f_i|^2 (1 - cos^2(f_i, f_j))``, which reaches the next layer through the consumer columns that read
``i``, so it is weighted by their energy ``|W_next[:, i]|^2``. Summed over the removed channels, with
channels kept in the method's order (largest first), this is the group's error as a function of its
kept count, computed from the weights alone, in one matrix product and a running maximum. Each curve
is divided by its value at zero kept channels, so that groups are compared by the fraction of their
signal lost rather than by the scale of their weights. ``merge-ls`` does not merge into one
neighbour: it writes a removed channel as a least-squares combination of all kept ones, fitted on
the probes' moments, so its curve is its own loss instead (``criteria.covering_curve``: the
consumer-weighted variance its fit leaves unexplained, for every kept count, in one pivoted
Cholesky pass over the covariance), relative in the same way.

Both curves rank groups only roughly: they see one layer's error, not how it grows through the
layers after it, nor how BatchNorm re-measurement repairs it. So the allocation moves widths only
within a *trust band* around the uniform ones (``BAND``): each group's kept fraction stays within
``BAND`` of the fraction the uniform allocation gives it, and inside that band the curves decide.
A small band keeps what uniform widths get right and still moves channels from the layers whose
curve says they are free to the ones that are not. A residual stream (a group written by several
layers) is *held* at the uniform width: its error reaches every later block and the output, which
a curve measured at its readers does not see (on resnet-fmnist's validation split, cutting streams
by their curve lost 17.6 points at 10% of the parameters kept; ``experiments/budget_streams.py``).
The band and the curve of ``merge-ls`` were chosen on the validation split
(``experiments/budget_validation.py``, ``.json``). The engine then checks the whole model, for every
method: it keeps an allocation only when its outputs on the probes beat the uniform widths'
(``allocation_check``).

``allocate`` is greedy on marginal utility: starting from every group at full width it repeatedly
removes ``round_to`` channels from the group whose error grows least per unit of cost saved, until
the cost fits the target; then it adds back, best error first, channels whose cost still fits in the
slack. Costs are bilinear (removing a group's channel also removes columns of the next group's
layers), so marginal costs are recomputed from the current widths at every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from neuronmerge.errors import InvalidArgumentError

#: A result within this fraction of the target counts as meeting it.
TOLERANCE = 0.01

#: How far (in kept fraction) ``allocate`` lets a group move from the uniform widths: a trust
#: region around them, since the error curves rank groups only roughly. Chosen on the validation
#: split (``experiments/budget_validation.py``, ``experiments/budget_validation.json``).
BAND = 0.2

#: How widths are chosen for a target: ``error`` (the data-free allocation of this module) or
#: ``uniform`` (the same fraction of every group).
Allocation = Literal["error", "uniform"]
ALLOCATIONS = ("error", "uniform")


@dataclass(frozen=True)
class Request:
    """What the caller asked for, validated (see ``request``).

    ``metric``/``amount``: a target (``None`` for none): a fraction of the model's count kept (a
    float in (0, 1]) or an absolute count (an int). ``ratios``: (glob, ratio) pairs fixing the
    fraction removed from matching groups, first match wins. ``round_to``: kept widths are
    multiples of it (or the full width).
    """

    metric: Literal["params", "macs"] | None = None
    amount: float | int | None = None
    ratios: tuple[tuple[str, float], ...] = ()
    round_to: int = 1
    allocation: Allocation = "error"

    def absolute(self, full: int) -> int:
        """The target as a count, for a model whose count is ``full``."""
        assert self.amount is not None
        if isinstance(self.amount, int):
            return self.amount
        return round(self.amount * full)


def _fraction_or_count(name: str, value: object) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a fraction in (0, 1] or a count, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise InvalidArgumentError(f"{name} as a count must be at least 1, got {value}")
        return value
    if not 0 < value <= 1:
        raise InvalidArgumentError(
            f"{name} as a fraction of the model must be in (0, 1], got {value}; "
            "pass an int for an absolute count"
        )
    return float(value)


def request(
    target_params: float | None = None,
    target_macs: float | None = None,
    ratios: Mapping[str, float] | None = None,
    round_to: int | None = None,
    allocation: str = "error",
) -> Request:
    """Validate the budget options of ``compress`` once, into a ``Request``."""
    if target_params is not None and target_macs is not None:
        raise InvalidArgumentError("give target_params or target_macs, not both")
    metric: Literal["params", "macs"] | None = None
    amount: float | int | None = None
    if target_params is not None:
        metric, amount = "params", _fraction_or_count("target_params", target_params)
    elif target_macs is not None:
        metric, amount = "macs", _fraction_or_count("target_macs", target_macs)
    pairs: list[tuple[str, float]] = []
    for glob, ratio in (ratios or {}).items():
        if not isinstance(glob, str) or not glob:
            raise InvalidArgumentError(f"ratios keys are layer-name globs, got {glob!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise InvalidArgumentError(
                f"ratios[{glob!r}] must be a fraction removed in [0, 1), got {ratio!r}"
            )
        pairs.append((glob, float(ratio)))
    step = 1 if round_to is None else round_to
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise InvalidArgumentError(f"round_to must be a positive integer, got {round_to!r}")
    if allocation not in ALLOCATIONS:
        raise InvalidArgumentError(
            f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}"
        )
    return Request(metric, amount, tuple(pairs), step, allocation)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Term:
    """``coefficient * prod(kept[g] for g in groups)``: one part of a model's cost."""

    coefficient: int
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupBudget:
    """What the allocation needs to know of one group.

    ``error[k]`` is the expected damage of keeping ``k`` of ``channels`` channels (length
    ``channels + 1``, ``error[channels] == 0``); ``low``/``high`` bound the kept count (equal when the
    caller fixed the width, e.g. with an explicit ratio).
    """

    name: str
    channels: int
    error: tuple[float, ...]
    low: int
    high: int
    #: Keep the uniform allocation's width under ``allocate`` (its curve is not trusted).
    held: bool = False


def total(terms: Sequence[Term], kept: Mapping[str, int]) -> int:
    """The cost of ``terms`` at the widths ``kept``."""
    return sum(t.coefficient * math.prod(kept[g] for g in t.groups) for t in terms)


def widths(channels: int, round_to: int, low: int = 1) -> list[int]:
    """Every kept count a group of ``channels`` may take: multiples of ``round_to`` from ``low``
    up, and the full width (a group is never forced to change)."""
    step = max(1, round_to)
    first = max(step, math.ceil(max(1, low) / step) * step)
    counts = list(range(first, channels + 1, step))
    if not counts or counts[-1] != channels:
        counts.append(channels)
    return counts


def merge_error_curve(
    rows: torch.Tensor, energy: torch.Tensor, order: torch.Tensor, relative: bool = True
) -> torch.Tensor:
    """The merge residual of a group as a function of its kept count (length ``n + 1``).

    ``rows`` (n, d): each channel's folded row; ``energy`` (n,): the squared norm of the consumer
    columns that read each channel; ``order`` (n,): the channels in the order the method keeps them.
    ``error[k] = sum_i a_i (1 - c_i(k)^2) / sum_i a_i`` with ``a_i = energy_i |f_i|^2`` and ``c_i(k)``
    the largest positive cosine between ``f_i`` and the first ``k`` kept rows (1 for a kept channel).
    ``relative=False`` leaves out the division (weights of different layers then compete on their
    raw scale).
    """
    rows = rows.detach().to(torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1)
    weight = energy.detach().to(torch.float64) * norms.square()
    n = rows.shape[0]
    whole = weight.sum()
    if n == 0 or whole <= 0:
        return torch.zeros(n + 1, dtype=torch.float64)
    unit = rows / norms.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    cosine = (unit @ unit[order].T).clamp_min(0)  # (n, n): channel i against the k-th kept
    cosine[order, torch.arange(n)] = 1.0  # a kept channel is reproduced exactly (also if zero)
    best = torch.cummax(cosine, dim=1).values  # best[i, k-1]: best cosine among the first k kept
    residual = weight @ (1 - best.square())  # (n,): error with 1..n kept
    curve = torch.cat([whole.reshape(1), residual])
    return curve / whole if relative else curve


def rescaled(error: Sequence[float], at: int, value: float) -> tuple[float, ...]:
    """``error`` multiplied so that ``error[at] == value`` (its shape kept): a curve put on the scale
    of a measurement taken at one width (``group_impact``). Unchanged when ``error[at]`` is not
    positive (nothing to scale)."""
    if error[at] <= 0:
        return tuple(error)
    factor = value / error[at]
    return tuple(e * factor for e in error)


def _monotone(error: Sequence[float]) -> list[float]:
    """``error`` made non-increasing in the kept count (a kept channel never adds damage)."""
    out = list(error)
    for k in range(len(out) - 2, -1, -1):
        out[k] = max(out[k], out[k + 1])
    return out


class _Costs:
    """Marginal costs of the terms at the current widths, per group."""

    def __init__(self, terms: Sequence[Term]) -> None:
        self.terms = [t for t in terms if t.coefficient]
        self.by_group: dict[str, list[Term]] = {}
        for term in self.terms:
            for g in dict.fromkeys(term.groups):
                self.by_group.setdefault(g, []).append(term)

    def change(self, kept: dict[str, int], group: str, new: int) -> int:
        """How much the cost changes when ``group`` goes from ``kept[group]`` to ``new`` channels."""
        old = kept[group]
        delta = 0
        for term in self.by_group.get(group, ()):
            rest = math.prod(kept[g] for g in term.groups if g != group)
            power = term.groups.count(group)
            delta += term.coefficient * rest * (new**power - old**power)
        return delta


def reachable(terms: Sequence[Term], groups: Sequence[GroupBudget], round_to: int) -> tuple[int, int]:
    """The smallest and largest cost the groups' widths can reach."""
    smallest = {g.name: widths(g.channels, round_to, g.low)[0] for g in groups}
    for g in groups:  # a fixed width stays fixed
        if g.low == g.high:
            smallest[g.name] = g.high
    return total(terms, smallest), total(terms, {g.name: g.high for g in groups})


def allocate(
    groups: Sequence[GroupBudget],
    terms: Sequence[Term],
    target: int,
    *,
    round_to: int = 1,
    what: str = "parameters",
    band: float | None = None,
) -> dict[str, int]:
    """Kept counts per group whose cost is within ``TOLERANCE`` of ``target`` (at most ``target``
    when the widths allow), removing channels where the error curves say they matter least, each
    group's kept fraction within ``band`` (default ``BAND``) of the uniform widths' (``uniform``;
    1: unbounded).

    Raises ``InvalidArgumentError`` naming the reachable range when the target is out of it, or when
    the width steps (``round_to``) are too coarse to land within the tolerance.
    """
    low, high = reachable(terms, groups, round_to)
    _check_target(target, low, high, what)
    band = BAND if band is None else band
    centre = None
    if band < 1 or any(g.held for g in groups):
        centre = uniform(groups, terms, target, round_to=round_to, what=what)
        groups = [_banded(g, centre[g.name], band) for g in groups]
    options = {
        g.name: [w for w in widths(g.channels, round_to, g.low) if w <= g.high]
        if g.low != g.high
        else [g.high]
        for g in groups
    }
    error = {g.name: _monotone(g.error) for g in groups}
    position = {name: len(counts) - 1 for name, counts in options.items()}
    kept = {name: counts[-1] for name, counts in options.items()}
    costs = _Costs(terms)
    cost = total(terms, kept)
    while cost > target:
        best: tuple[float, str, int] | None = None
        for name, counts in options.items():
            if position[name] == 0:
                continue
            new = counts[position[name] - 1]
            saved = -costs.change(kept, name, new)
            if saved <= 0:
                continue
            harm = error[name][new] - error[name][kept[name]]
            utility = harm / saved
            if best is None or utility < best[0]:
                best = (utility, name, saved)
        if best is None:  # nothing left to remove: ``reachable`` said this cannot happen
            break
        _, name, saved = best
        position[name] -= 1
        kept[name] = options[name][position[name]]
        cost -= saved
    _land(options, error, position, kept, costs, terms, target)
    if centre is not None and abs(total(terms, kept) - target) > TOLERANCE * target:
        return centre  # the band left the greedy steps no way to land: the uniform widths do
    return _checked(kept, terms, target, low, high, what)


def _banded(group: GroupBudget, centre: int, band: float) -> GroupBudget:
    """``group`` with its kept count bounded to ``centre``'s kept fraction plus or minus ``band``."""
    if group.low == group.high:
        return group
    if group.held:
        return GroupBudget(group.name, group.channels, group.error, centre, centre, True)
    low = max(group.low, math.floor((centre / group.channels - band) * group.channels))
    high = min(group.high, math.ceil((centre / group.channels + band) * group.channels))
    return GroupBudget(group.name, group.channels, group.error, min(low, centre), max(high, centre))


def _fill(
    options: Mapping[str, list[int]],
    error: Mapping[str, list[float]],
    position: dict[str, int],
    kept: dict[str, int],
    costs: _Costs,
    slack: int,
) -> None:
    """Add back, largest error reduction per unit of cost first, the steps that fit in ``slack``."""
    while True:
        best: tuple[float, str, int] | None = None
        for name, counts in options.items():
            if position[name] + 1 >= len(counts):
                continue
            new = counts[position[name] + 1]
            added = costs.change(kept, name, new)
            if added > slack:
                continue
            gain = error[name][kept[name]] - error[name][new]
            utility = gain / max(added, 1)
            if best is None or utility > best[0]:
                best = (utility, name, added)
        if best is None:
            return
        _, name, added = best
        position[name] += 1
        kept[name] = options[name][position[name]]
        slack -= added


def uniform(
    groups: Sequence[GroupBudget],
    terms: Sequence[Term],
    target: int,
    *,
    round_to: int = 1,
    what: str = "parameters",
) -> dict[str, int]:
    """The same fraction of channels removed from every free group, that fraction chosen (by
    bisection) so that the cost is within ``TOLERANCE`` of ``target``; leftover slack is filled one
    step at a time, so the widths may differ from a plain ratio by a step or two."""
    low, high = reachable(terms, groups, round_to)
    _check_target(target, low, high, what)

    def at(ratio: float) -> dict[str, int]:
        return {
            g.name: g.high if g.low == g.high else snap(g, round(g.channels * (1 - ratio)), round_to)
            for g in groups
        }

    lo, hi = 0.0, 1.0  # cost(at(lo)) > target >= cost(at(hi)) once bisected
    if total(terms, at(0.0)) <= target:
        return at(0.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        if total(terms, at(mid)) > target:
            lo = mid
        else:
            hi = mid
    kept = at(hi)
    options = {
        g.name: [w for w in widths(g.channels, round_to, g.low) if w <= g.high]
        if g.low != g.high
        else [g.high]
        for g in groups
    }
    position = {name: options[name].index(kept[name]) for name in kept}
    # Slack goes to the groups that lost the largest fraction of their channels.
    linear = {g.name: [1 - k / g.channels for k in range(g.channels + 1)] for g in groups}
    _land(options, linear, position, kept, _Costs(terms), terms, target)
    return _checked(kept, terms, target, low, high, what)


def _land(
    options: Mapping[str, list[int]],
    error: Mapping[str, list[float]],
    position: dict[str, int],
    kept: dict[str, int],
    costs: _Costs,
    terms: Sequence[Term],
    target: int,
) -> None:
    """From widths at or under ``target``, add back what fits under it; where the steps are too
    coarse to come within the tolerance, trade one step of a group for one of another, then allow
    the tolerance above the target."""
    _fill(options, error, position, kept, costs, target - total(terms, kept))
    if target - total(terms, kept) > TOLERANCE * target:
        _exchange(options, error, position, kept, costs, terms, target)
    _fill(options, error, position, kept, costs, _over(terms, kept, target))


def _exchange(
    options: Mapping[str, list[int]],
    error: Mapping[str, list[float]],
    position: dict[str, int],
    kept: dict[str, int],
    costs: _Costs,
    terms: Sequence[Term],
    target: int,
) -> None:
    """One step fewer in a group and one more in another, landing within the tolerance of
    ``target`` with the smallest error added (nothing when no such pair exists)."""
    best: tuple[float, str, str] | None = None
    for down in options:
        if position[down] == 0:
            continue
        for up in options:
            if up == down or position[up] + 1 >= len(options[up]):
                continue
            trial = dict(kept)
            trial[down] = options[down][position[down] - 1]
            trial[up] = options[up][position[up] + 1]
            if abs(total(terms, trial) - target) > TOLERANCE * target:
                continue
            harm = (
                error[down][trial[down]]
                - error[down][kept[down]]
                - (error[up][kept[up]] - error[up][trial[up]])
            )
            if best is None or harm < best[0]:
                best = (harm, down, up)
    if best is not None:
        _, down, up = best
        position[down] -= 1
        position[up] += 1
        kept[down], kept[up] = options[down][position[down]], options[up][position[up]]


def _over(terms: Sequence[Term], kept: Mapping[str, int], target: int) -> int:
    """The slack above ``target`` that still meets it, when the steps could not land below it
    within the tolerance (0 otherwise: staying under the target is preferred)."""
    reached = total(terms, kept)
    if target - reached <= TOLERANCE * target:
        return 0
    return math.floor(target * (1 + TOLERANCE)) - reached


def snap(group: GroupBudget, count: int, round_to: int) -> int:
    """``count`` moved to the nearest width ``group`` may take (see ``widths``)."""
    allowed = [w for w in widths(group.channels, round_to, group.low) if w <= group.high]
    return min(allowed, key=lambda w: (abs(w - count), -w))


def _check_target(target: int, low: int, high: int, what: str) -> None:
    if target < low * (1 - TOLERANCE) or target > high:
        raise InvalidArgumentError(
            f"a target of {target:,} {what} is out of reach: the mergeable groups allow "
            f"{low:,} to {high:,} {what} (every group at its narrowest to all of them whole)"
        )


def _checked(
    kept: dict[str, int], terms: Sequence[Term], target: int, low: int, high: int, what: str
) -> dict[str, int]:
    reached = total(terms, kept)
    if abs(reached - target) > TOLERANCE * target:
        raise InvalidArgumentError(
            f"the widths allowed (round_to) cannot land within {TOLERANCE:.0%} of {target:,} {what}: "
            f"the closest below is {reached:,} (reachable range {low:,} to {high:,}); use a "
            "smaller round_to or another target"
        )
    return kept
