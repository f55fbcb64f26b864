"""Criteria: which neurons to keep at a site, from importance scores of their weight rows.

The paper's three criteria score each neuron's weight row (higher score = keep):

* ``l1-norm`` and ``l2-norm``: magnitude of the row (Li et al., 2017).
* ``l2-GM``: sum of Euclidean distances to all other rows (He et al., 2019, FPGM). Rows near the
  geometric median are the most replaceable by the others, so the rows *far* from it are kept.

Ties are broken towards the lower index (a stable sort), so the kept set is deterministic.

Beyond the paper, ``covering_kept`` chooses the kept set from activation moments instead of norms:
the channels that best *explain* the others (so that a least-squares merge leaves the least error),
not the largest ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from neuronmerge.decompose import Rows
from neuronmerge.errors import InvalidArgumentError

CRITERIA = ("l1-norm", "l2-norm", "l2-GM")

# Rows per block when summing pairwise distances: bounds l2-GM's memory to block x N, not N x N.
_GM_BLOCK = 1024


def channel_scores(rows: torch.Tensor | Rows, criterion: str) -> torch.Tensor:
    """One importance score per row of ``rows`` (N x D); higher means more worth keeping.

    The norms are single reductions over the weight (``Rows`` folds its scale and shift in
    afterwards): no ``abs()`` or ``[w | b]`` copy of a weight that may be hundreds of megabytes.
    """
    if isinstance(rows, torch.Tensor):
        rows = Rows(rows)
    if criterion == "l1-norm":
        return rows.l1_norms()
    if criterion == "l2-norm":
        return rows.l2_norms()
    if criterion == "l2-GM":
        # Float64 and exact differences (not the matmul expansion) so that rankings of
        # near-equal sums do not depend on rounding.
        rows64 = rows.dense().double()
        total = torch.zeros(rows64.shape[0], dtype=torch.float64)
        for start in range(0, rows64.shape[0], _GM_BLOCK):
            block = rows64[start : start + _GM_BLOCK]
            total += torch.cdist(block, rows64, compute_mode="donot_use_mm_for_euclid_dist").sum(0)
        return total
    raise InvalidArgumentError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def select_kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in increasing index order (along the last axis: a
    stack of sites' scores gives each site's kept channels)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.sort(order[..., :keep], dim=-1).values


def _covering_steps(cov: torch.Tensor, weights: torch.Tensor, steps: int) -> Iterator[tuple[int, float]]:
    """The greedy pivots of ``covering_kept``, one per step, each with the weighted residual
    variance ``sum_i weights_i * residual_var_i`` left after it."""
    residual = cov.to(torch.float64).clone()
    w = weights.to(torch.float64)
    n = residual.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)
    floor = residual.diagonal().max().clamp_min(1e-300) * 1e-12
    for _ in range(steps):
        diag = residual.diagonal().clamp_min(floor)
        gain = (w[:, None] * residual.square()).sum(dim=0) / diag
        gain[chosen] = -torch.inf
        j = int(torch.argmax(gain))
        chosen[j] = True
        column = residual[:, j] / diag[j].sqrt()
        residual -= column[:, None] * column[None, :]
        yield j, float((w * residual.diagonal().clamp_min(0)).sum())


def covering_kept(cov: torch.Tensor, weights: torch.Tensor, keep: int) -> torch.Tensor:
    """``keep`` channels chosen greedily to minimise the weighted residual variance of all channels.

    ``cov`` is the channels' covariance and ``weights[i]`` the energy of the consumer columns that read
    channel ``i`` (so an error on a channel that nobody reads much costs little). Each step adds the
    channel ``j`` whose least-squares use removes the most ``sum_i weights_i * residual_var_i``, which is
    ``sum_i weights_i * C[i, j]^2 / C[j, j]`` on the current residual covariance, then deflates ``C`` by
    it (a pivoted Cholesky factorisation). The loop runs over the ``keep`` steps; each step is one
    vectorised pass over the N x N matrix.
    """
    chosen = [j for j, _ in _covering_steps(cov, weights, keep)]
    return torch.tensor(sorted(chosen), dtype=torch.long)


def covering_blocks(cov: torch.Tensor, weights: torch.Tensor, keep: int, width: int) -> torch.Tensor:
    """``keep`` blocks of ``width`` consecutive channels (the dims of an attention head), chosen
    greedily as ``covering_kept`` chooses channels, a whole block at a time.

    A head is kept or removed whole, and its dims are kept together, so the step that keeps it
    fits every channel on all of them at once: keeping block ``B`` removes
    ``sum_i weights_i * R[i, B] R[B, B]^+ R[B, i]`` of the weighted residual variance (``R`` the
    residual covariance; a pseudo-inverse, since a head's dims may be collinear, or already
    explained by kept heads), and ``R`` is then deflated by it. With ``width`` 1 this is
    ``covering_kept``'s step. Returns the kept block indices, increasing.
    """
    residual = cov.to(torch.float64).clone()
    w = weights.to(torch.float64)
    blocks = residual.shape[0] // width
    chosen = torch.zeros(blocks, dtype=torch.bool)
    floor = residual.diagonal().max().clamp_min(1e-300) * 1e-12
    for _ in range(keep):
        columns = residual.reshape(-1, blocks, width).transpose(0, 1)  # (blocks, N, width)
        diagonal = columns.reshape(blocks, blocks, width, width)[
            torch.arange(blocks), torch.arange(blocks)
        ]
        values, vectors = torch.linalg.eigh(diagonal)
        inverse = torch.where(values > floor, 1 / values.clamp_min(floor), 0)
        pinv = (vectors * inverse[:, None, :]) @ vectors.transpose(1, 2)
        explained = ((columns @ pinv) * columns).sum(dim=2)  # (blocks, N): each channel's share
        gain = explained @ w
        gain[chosen] = -torch.inf
        j = int(torch.argmax(gain))
        chosen[j] = True
        residual -= columns[j] @ pinv[j] @ columns[j].T
    return torch.nonzero(chosen).flatten()


def covering_curve(cov: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted residual variance that ``covering_kept`` leaves, for every kept count ``0..N``
    (length ``N + 1``): the least-squares merge's own error at the consumers, as ``budget`` needs
    it. The greedy picks are nested, so one run gives every count."""
    w = weights.to(torch.float64)
    start = float((w * cov.diagonal().to(torch.float64).clamp_min(0)).sum())
    left = [r for _, r in _covering_steps(cov, weights, cov.shape[0])]
    return torch.tensor([start, *left], dtype=torch.float64)


def kept_count(channels: int, ratio: float, rounding: str = "round") -> int:
    """How many of ``channels`` neurons survive removing the fraction ``ratio``.

    ``round`` is Python's rounding of ``channels * (1 - ratio)``, as the authors do for
    LeNet-300-100; ``floor`` truncates as they do for their CIFAR conv nets.
    """
    exact = channels * (1 - ratio)
    return int(exact) if rounding == "floor" else round(exact)


def check_ratio(ratio: float) -> float:
    """Validate a pruning ratio: a real number in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise InvalidArgumentError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0 <= ratio < 1:
        raise InvalidArgumentError(
            f"ratio must be in [0, 1) (the fraction of neurons removed per layer), got {ratio}"
        )
    return float(ratio)
