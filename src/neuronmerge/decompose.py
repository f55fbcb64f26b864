"""Decompose: the scaling matrix Z of each site (the paper's algorithms 2 and 3, and exact variants).

A site's N channels become K kept channels. Z is N x K with at most one positive entry per row: row i
of a kept channel is the unit vector of its own position; row i of a removed channel is ``s * e_j``
(folded into kept channel j with scale s) or all zero (dropped, i.e. plain pruning). The layers that
consume the site absorb Z: ``W_consumer' = W_consumer . Z`` (see ``surgery``).

Z is stored sparsely as ``target`` (the kept position each channel folds into, -1 for dropped) and
``scale``. Every strategy here is a couple of dense matrix products over all removed-by-kept pairs;
there is no loop over neurons.

Strategies:

* ``norm_ratio`` (paper algorithm 2, and our exact default): each removed row goes to the kept row of
  highest cosine similarity, with ``s = ||f_i|| / ||f_j||``, unless the similarity is below the
  threshold. Exact when the row *is* a positive multiple of a kept one. What the rows ``f`` are decides
  exactness: ``[w | b]`` for a layer alone, and for a layer followed by BatchNorm the *folded* rows
  ``[a*w | c]`` with ``a = gamma / sqrt(var + eps)`` and ``c = beta + a*(b - mean)``, because those are
  what the channel computes before its activation.
* ``paper_conv_bn`` (paper algorithm 3 as the authors' code computes it): cosine distance on the raw
  conv weights combined with a min-max normalised BatchNorm bias distance, and the authors' scale,
  which uses the BN *variance* where the standard deviation belongs. Not exact in general; it exists to
  reproduce their numbers.
* ``least_squares`` (beyond the paper, ``method="merge-ls"``): a *general* Z, every removed channel
  written as the best linear combination of all kept ones plus a constant, fitted on activation
  moments (``Moments``) measured at the consumers' input. Z is then dense (``Decomposition.mixing``)
  and the constants (``Decomposition.shift``) go into the consumers' biases. Exact on duplicates
  (a removed channel that is a positive multiple of a kept one has zero residual); otherwise an
  approximation that, unlike a single-target merge, can use several kept channels at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BatchNormParams:
    """Inference-time BatchNorm parameters of a site (gamma, beta, running mean and variance)."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float

    @classmethod
    def of(cls, bn: nn.modules.batchnorm._BatchNorm) -> BatchNormParams:
        assert bn.running_mean is not None and bn.running_var is not None
        n = bn.running_mean.shape[0]
        weight = bn.weight.detach() if bn.weight is not None else torch.ones(n)
        bias = bn.bias.detach() if bn.bias is not None else torch.zeros(n)
        return cls(weight, bias, bn.running_mean.detach(), bn.running_var.detach(), bn.eps)

    def scale(self) -> torch.Tensor:
        """Per-channel multiplier ``a = gamma / sqrt(var + eps)``."""
        return self.weight / torch.sqrt(self.var + self.eps)


#: Bytes of weight rows whose absolute values are summed at once by ``_l1_norms``: a cache-sized
#: temporary instead of a copy of the whole weight.
_L1_BLOCK_BYTES = 4 * 2**20


def _l1_norms(weight: torch.Tensor) -> torch.Tensor:
    """Row sums of ``|weight|``, taken ``abs().sum()`` on blocks of rows.

    ``torch.linalg.vector_norm(ord=1)`` reads the weight once but runs a generic kernel two to three
    times slower (torch 2.13, CPU); ``abs().sum()`` over the whole weight writes a full copy first.
    """
    rows = max(1, _L1_BLOCK_BYTES // max(1, weight.shape[-1] * weight.element_size()))
    if weight.dim() > 2 or rows >= weight.shape[0]:  # a stack of small sites' rows: at once
        return weight.abs().sum(dim=-1)
    # Into one result allocated first: a small result allocated after each block's temporary would
    # keep the heap from reusing the freed block (glibc), and the blocks would pile up to a copy.
    norms = torch.empty(weight.shape[0], dtype=weight.dtype)
    for start in range(0, weight.shape[0], rows):
        torch.sum(weight[start : start + rows].abs(), dim=1, out=norms[start : start + rows])
    return norms


@dataclass(frozen=True)
class Rows:
    """A site's rows ``f_i = [scale_i * w_i | shift_i]``, kept factored instead of materialised.

    Materialising ``[a*w | c]`` copies the whole weight (411 MB for VGG-16's first FC layer) only to
    read it once or twice; every quantity the strategies need has a factored form: norms
    ``|f_i|^2 = scale_i^2 |w_i|^2 + shift_i^2`` and dot products
    ``f_i . f_j = scale_i scale_j (w_i . w_j) + shift_i shift_j``.

    ``weight`` may carry a leading stack axis (G, N, D), with ``scale`` and ``shift`` (G, N): the
    rows of several small sites of one shape, whose norms are then taken at once
    (``norm_ratio_stacked``).
    """

    weight: torch.Tensor  # (N, D)
    scale: torch.Tensor | None = None  # (N,) row multipliers; None means 1
    shift: torch.Tensor | None = None  # (N,) one extra column; None means no column

    def columns(self) -> list[torch.Tensor]:
        """The dense matrix's column blocks: the (scaled) weight, and the shift as one column."""
        rows = self.weight if self.scale is None else self.scale[:, None] * self.weight
        return [rows] if self.shift is None else [rows, self.shift[:, None]]

    def dense(self) -> torch.Tensor:
        """The (N, D[+1]) matrix itself (a copy unless there is nothing to fold)."""
        parts = self.columns()
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @staticmethod
    def side_by_side(rows: Sequence[Rows]) -> Rows:
        """Several row sets of the same channels as one, each channel's rows concatenated: written
        once from every set's column blocks (no dense copy of each set first)."""
        return Rows(torch.cat([part for r in rows for part in r.columns()], dim=1))

    def l1_norms(self) -> torch.Tensor:
        norms = _l1_norms(self.weight)
        if self.scale is not None:
            norms = norms * self.scale.abs()
        return norms if self.shift is None else norms + self.shift.abs()

    def l2_norms(self) -> torch.Tensor:
        norms = torch.linalg.vector_norm(self.weight, dim=-1)
        if self.scale is not None:
            norms = norms * self.scale.abs()
        return norms if self.shift is None else torch.hypot(norms, self.shift)


@dataclass(frozen=True)
class SiteTensors:
    """The weights that define a site's channels: producer rows, bias, optional BatchNorm."""

    weight: torch.Tensor  # (N, D): producer weight, flattened per output channel
    bias: torch.Tensor | None
    bn: BatchNormParams | None

    def raw(self) -> Rows:
        """``[w | b]`` (just ``w`` without a bias): what the paper compares for FC layers."""
        return Rows(self.weight, None, self.bias)

    def folded(self) -> Rows:
        """``[a*w | c]``: the affine map each channel computes before its activation."""
        if self.bn is None:
            return self.raw()
        a = self.bn.scale()
        bias = self.bias if self.bias is not None else torch.zeros_like(a)
        return Rows(self.weight, a, self.bn.bias + a * (bias - self.bn.mean))

    def raw_rows(self) -> torch.Tensor:
        """``raw()`` as one dense matrix."""
        return self.raw().dense()

    def folded_rows(self) -> torch.Tensor:
        """``folded()`` as one dense matrix."""
        return self.folded().dense()


@dataclass(frozen=True)
class Decomposition:
    """Z in sparse form: ``kept`` channel indices, and per channel its ``target`` and ``scale``."""

    kept: torch.Tensor  # (K,) int64, increasing
    target: torch.Tensor  # (N,) int64 position in ``kept``, -1 where dropped
    scale: torch.Tensor  # (N,) float, 1 on kept channels, 0 where dropped
    #: A dense Z (N x K) when removed channels mix into several kept ones (``least_squares``); it then
    #: replaces ``target``/``scale`` for the removed channels, whose ``target`` is -1.
    mixing: torch.Tensor | None = None
    #: (N,) constant activation credited to each removed channel (0 on kept ones): the consumers add
    #: ``W[:, i] * shift_i`` to their bias. ``None`` means no constants.
    shift: torch.Tensor | None = None
    #: Columns of each channel that ``mixing`` and ``shift`` address one by one (an attention head's
    #: dims, whose consumer columns read different things): ``mixing`` is then (N * width) x
    #: (K * width) and ``shift`` N * width long, over the channels' columns in order. 1: one entry
    #: per channel, shared by all its columns.
    width: int = 1

    @property
    def channels(self) -> int:
        return int(self.target.shape[0])

    def merged(self) -> torch.Tensor:
        """Indices of removed channels that were folded into a kept one."""
        is_kept = torch.zeros(self.channels, dtype=torch.bool)
        is_kept[self.kept] = True
        if self.mixing is None:
            folded = self.target >= 0
        else:
            folded = (self.mixing != 0).reshape(self.channels, -1).any(dim=1)
        return torch.nonzero(folded & ~is_kept).flatten()

    def matrix(self) -> torch.Tensor:
        """The dense N x K scaling matrix Z (for inspection and tests; per column when ``width``)."""
        if self.mixing is not None:
            return self.mixing
        z = torch.zeros(self.channels, self.kept.shape[0], dtype=self.scale.dtype)
        rows = torch.nonzero(self.target >= 0).flatten()
        z[rows, self.target[rows]] = self.scale[rows]
        return z


def _removed(n: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).flatten()


def identity_on_kept(n: int, kept: torch.Tensor, dtype: torch.dtype) -> Decomposition:
    """Plain pruning: kept channels map to themselves, removed ones are dropped."""
    target = torch.full((n,), -1, dtype=torch.long)
    target[kept] = torch.arange(kept.shape[0])
    scale = torch.zeros(n, dtype=dtype)
    scale[kept] = 1
    return Decomposition(kept, target, scale)


def _with_merges(
    base: Decomposition, removed: torch.Tensor, choice: torch.Tensor, s: torch.Tensor
) -> Decomposition:
    target, scale = base.target.clone(), base.scale.clone()
    target[removed] = choice
    scale[removed] = s.to(scale.dtype)
    return Decomposition(base.kept, target, scale)


#: Bytes of removed rows (and their similarities), and of kept rows, handled at once by ``cosines``:
#: bounds the working memory of merging to a few of these, instead of copies of every row.
_BLOCK_BYTES = 8 * 2**20


def best_partners(
    rows: Sequence[Rows],
    removed: torch.Tensor,
    kept: torch.Tensor,
    inverses: Sequence[torch.Tensor],
    dead: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each removed row's kept row of highest cosine (the mean over ``rows``, the roots of a group:
    a gated MLP's gate and up rows), and that cosine; a ``dead`` kept row (zero norm) is never
    chosen. ``inverses``: each root's inverse row norms.

    ``cos(f_i, f_j) = (u_i u_j) (w_i . w_j) + v_i v_j`` with ``u = scale / |f|`` and ``v = shift / |f|``,
    so no normalised, folded or concatenated copy of the rows exists. Blocks of removed rows against
    blocks of kept rows, in four buffers of at most ``_BLOCK_BYTES`` allocated once and reused
    (``out=``): the working memory is a few of those whatever the layer (a LLaMA-7B MLP's kept rows
    alone are 144 MB), and no fresh temporary per block fragments the heap into a peak of its own.
    """
    dtype = rows[0].weight.dtype
    size = rows[0].weight.element_size()
    best = torch.empty(removed.shape[0], dtype=dtype)
    choice = torch.empty(removed.shape[0], dtype=torch.long)
    width = max(r.weight.shape[1] for r in rows)
    block = max(1, min(removed.shape[0], _BLOCK_BYTES // ((width + kept.shape[0]) * size)))
    step = max(1, min(kept.shape[0], _BLOCK_BYTES // (width * size)))
    cosine = torch.empty(block, kept.shape[0], dtype=dtype)
    left = torch.empty(block * width, dtype=dtype)
    gathered = torch.empty(step * width, dtype=dtype)
    product = torch.empty(step * block, dtype=dtype)
    factors = []
    for root, inverse in zip(rows, inverses, strict=True):
        u = inverse if root.scale is None else root.scale * inverse
        factors.append((u, None if root.shift is None else root.shift * inverse))
    for start in range(0, removed.shape[0], block):
        part = removed[start : start + block]
        count = part.shape[0]
        similarity = cosine[:count].zero_()
        for root, (u, v) in zip(rows, factors, strict=True):
            weight = root.weight
            inner = weight.shape[1]
            these = torch.index_select(weight, 0, part, out=left[: count * inner].view(count, inner))
            u_part = u[part]
            for first in range(0, kept.shape[0], step):
                columns = kept[first : first + step]
                taken = columns.shape[0]
                others = gathered[: taken * inner].view(taken, inner)
                torch.index_select(weight, 0, columns, out=others)
                dots = torch.mm(others, these.T, out=product[: taken * count].view(taken, count))
                dots.mul_(u[columns, None]).mul_(u_part)
                if v is not None:
                    dots.addr_(v[columns], v[part])
                similarity[:, first : first + taken] += dots.T
        if len(rows) > 1:
            similarity /= len(rows)
        end = start + count
        torch.max(
            similarity.masked_fill_(dead, -torch.inf), dim=1, out=(best[start:end], choice[start:end])
        )
    return best, choice


def norm_ratio(
    rows: torch.Tensor | Rows,
    kept: torch.Tensor,
    threshold: float | None,
    norms: torch.Tensor | None = None,
) -> Decomposition:
    """Paper algorithm 2 on ``rows``: nearest kept row by cosine, scale by the norm ratio.

    ``norms`` are the rows' l2 norms when the caller has them already. The cosines (``cosines``) are
    taken in blocks of removed rows, each block's best kept partner found before the next.
    """
    if isinstance(rows, torch.Tensor):
        rows = Rows(rows)
    weight = rows.weight
    n = weight.shape[0]
    removed = _removed(n, kept)
    target = torch.empty(n, dtype=torch.long)
    target[kept] = torch.arange(kept.shape[0])
    scale = torch.ones(n, dtype=weight.dtype)
    if removed.numel() == 0:
        return Decomposition(kept, target, scale)
    if norms is None:
        norms = rows.l2_norms()
    inverse = torch.where(norms > 0, norms, 1).reciprocal_()
    # A kept row of zero norm has no direction and cannot absorb anything.
    kept_norms = norms[kept]
    dead = kept_norms == 0
    best, choice = best_partners([rows], removed, kept, [inverse], dead)
    # NaN and -inf (every kept row dead) fail ``>=`` by themselves.
    accept = torch.isfinite(best) if threshold is None else best >= threshold
    rejected = ~accept
    scale[removed] = (norms[removed] / kept_norms[choice]).masked_fill_(rejected, 0)
    target[removed] = choice.masked_fill_(rejected, -1)
    return Decomposition(kept, target, scale)


def norm_ratio_stacked(
    rows: Rows, kept: torch.Tensor, threshold: float | None, norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm_ratio`` on G sites of one shape at once: ``rows`` stacked (G, N, D) and each site's
    ``kept`` channels (G, K); returns every site's ``target`` and ``scale`` (G, N).

    For networks of many small layers (a ResNet's blocks: 16-64 channels), where the per-site
    tensor operations of ``norm_ratio`` cost several times their arithmetic: here they run once per
    stack, the similarities as one batched product of kept against removed rows. The stack is the
    rows of small layers only (the caller bounds its bytes), so no blocking is needed.
    """
    weight = rows.weight
    sites, n, width = weight.shape
    k = kept.shape[1]
    positions = torch.arange(k).expand(sites, k)
    target = torch.empty(sites, n, dtype=torch.long).scatter_(1, kept, positions)
    scale = torch.ones(sites, n, dtype=weight.dtype)
    if k == n:
        return target, scale
    is_removed = torch.ones(sites, n, dtype=torch.bool).scatter_(1, kept, False)
    removed = torch.nonzero(is_removed)[:, 1].view(sites, n - k)  # increasing, per site
    if norms is None:
        norms = rows.l2_norms()
    inverse = torch.where(norms > 0, norms, 1).reciprocal_()
    u = inverse if rows.scale is None else rows.scale * inverse
    kept_norms = norms.gather(1, kept)
    # cos(f_i, f_j) = (u_i u_j)(w_i . w_j) + v_i v_j, as ``best_partners`` computes it.
    flat = weight.reshape(sites * n, width)  # whole rows by index: a copy per row, not per value
    first = torch.arange(0, sites * n, n)[:, None]
    others = flat.index_select(0, (kept + first).flatten()).view(sites, k, width)
    these = flat.index_select(0, (removed + first).flatten()).view(sites, n - k, width)
    dots = torch.bmm(others, these.transpose(1, 2))  # (G, K, R)
    dots.mul_(u.gather(1, kept)[..., None]).mul_(u.gather(1, removed)[:, None, :])
    if rows.shift is not None:
        v = rows.shift * inverse
        dots.add_(v.gather(1, kept)[..., None] * v.gather(1, removed)[:, None, :])
    similarity = dots.transpose(1, 2).masked_fill_((kept_norms == 0)[:, None, :], -torch.inf)
    best, choice = similarity.max(dim=2)
    # NaN and -inf (every kept row dead) fail ``>=`` by themselves.
    rejected = ~(torch.isfinite(best) if threshold is None else best >= threshold)
    ratio = norms.gather(1, removed) / kept_norms.gather(1, choice)
    scale.scatter_(1, removed, ratio.masked_fill_(rejected, 0))
    target.scatter_(1, removed, choice.masked_fill_(rejected, -1))
    return target, scale


def paper_conv_bn(
    weight: torch.Tensor,
    bn: BatchNormParams,
    kept: torch.Tensor,
    threshold: float | None,
    lam: float,
) -> Decomposition:
    """Paper algorithm 3 as the authors' code computes it (see the module docstring)."""
    n = weight.shape[0]
    base = identity_on_kept(n, kept, weight.dtype)
    removed = _removed(n, kept)
    if removed.numel() == 0:
        return base
    norms = torch.linalg.vector_norm(weight, dim=1)
    cosine = F.normalize(weight[removed], dim=1) @ F.normalize(weight[kept], dim=1).T
    distance = 1 - cosine
    gamma, beta, mu, var = bn.weight, bn.bias, bn.mean, bn.var
    i, j = removed[:, None], kept[None, :]
    s = norms[i] / norms[j]
    scale = s * (gamma[j] / gamma[i]) * (var[i] / var[j])
    shift = (gamma[j] / var[j]) * (s * (-(var[i] * beta[i] / gamma[i]) + mu[i]) - mu[j]) + beta[j]
    bias_distance = shift.abs() / scale
    low = bias_distance.min(dim=1, keepdim=True).values
    spread = bias_distance.max(dim=1, keepdim=True).values - low
    # The authors divide by the spread unguarded; a zero spread (one kept channel, or all equal)
    # makes their score NaN. Treat it as "no bias information" instead.
    normalised = torch.where(spread > 0, (bias_distance - low) / spread, torch.zeros_like(low))
    score = lam * distance + (1 - lam) * normalised
    choice = score.argmin(dim=1)
    rows = torch.arange(removed.shape[0])
    best_similarity = 1 - distance[rows, choice]
    accept = torch.ones_like(best_similarity, dtype=torch.bool)
    if threshold is not None:
        accept = best_similarity >= threshold
    return _with_merges(base, removed[accept], choice[accept], scale[rows, choice][accept])


@dataclass(frozen=True)
class Moments:
    """First and second moments of a site's channels as its consumers read them (see ``activations``)."""

    mean: torch.Tensor  # (N,) float64
    cov: torch.Tensor  # (N, N) float64, centred
    count: int


def through_origin(moments: Moments) -> Moments:
    """Moments whose least-squares fit has no constant: zero mean and the raw second moment
    ``E[h h^T] = C + mu mu^T`` in place of the covariance, so ``least_squares`` minimises
    ``E[(h_i - sum_j z_ij h_j)^2]``."""
    raw = moments.cov + torch.outer(moments.mean, moments.mean)
    return Moments(torch.zeros_like(moments.mean), raw, moments.count)


def least_squares(
    moments: Moments, kept: torch.Tensor, floor: float, intercept: bool = True
) -> Decomposition:
    """Each removed channel as the least-squares linear combination of the kept ones, plus a constant.

    Minimises ``E[(h_i - sum_j z_ij h_j - m_i)^2]`` for every removed ``i`` over the kept ``j``:
    ``Z_R = C[R, K] C[K, K]^-1`` and ``m = mu_R - Z_R mu_K``. The consumer's output error is
    ``W[:, R]`` times these residuals, so this Z minimises it for every consumer at once. The inverse
    raises the eigenvalues of ``C[K, K]`` to at least ``floor`` times their mean, which keeps the solve
    stable when kept channels are nearly collinear or never active, and leaves a well-conditioned solve
    untouched, so a removed channel that is a multiple of a kept one is still reproduced exactly.
    ``intercept=False`` fits through the origin (``through_origin``) and returns no constants at all,
    so no consumer gains a bias.
    """
    if not intercept:
        moments = through_origin(moments)
    n = moments.mean.shape[0]
    base = identity_on_kept(n, kept, torch.float32)
    removed = _removed(n, kept)
    if removed.numel() == 0:
        return base
    cov = moments.cov
    values, vectors = torch.linalg.eigh(cov[kept][:, kept])
    level = values.mean().clamp_min(torch.finfo(cov.dtype).tiny)
    inverse = (vectors / values.clamp_min(floor * level)) @ vectors.T
    z_removed = cov[removed][:, kept] @ inverse
    mixing = torch.zeros(n, kept.shape[0], dtype=cov.dtype)
    mixing[kept, torch.arange(kept.shape[0])] = 1
    mixing[removed] = z_removed
    shift = torch.zeros(n, dtype=cov.dtype)
    shift[removed] = moments.mean[removed] - z_removed @ moments.mean[kept]
    return Decomposition(base.kept, base.target, base.scale, mixing, shift if intercept else None)
