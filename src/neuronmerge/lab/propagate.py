"""Activation moments without data (research): propagated through the graph from BatchNorm statistics.

``merge-ls`` needs each group's channel mean and covariance at the tensors its consumers read
(``activations`` measures them on batches). A BatchNorm model already stores, per channel, the mean
and variance of its input over the training data; what it lacks is how channels co-vary, and that
follows from the weights. One pass over the captured graph carries a Gaussian summary of every
tensor (``Gaussian``: a mean per channel and a channel-by-channel covariance, every spatial position
an independent draw of it) from op to op, by the rules of ``RULES``:

* conv and linear layers: mean ``W mu + b``, covariance ``sum_k W_k Sigma W_k^T`` over kernel taps;
* BatchNorm: the propagated correlations are kept and each channel's mean and variance replaced by
  the stored ones, so the errors of the approximation (positions are not independent, activations
  not Gaussian) do not accumulate from one BatchNorm to the next;
* ReLU: the rectified Gaussian's mean and variance in closed form, and the covariance of a pair by
  Price's theorem, ``d Cov / d rho = P(x > 0, y > 0)``: one integral over the correlation;
* pooling, flattening, dropout: moments unchanged; sums: branches taken as independent; concatenation:
  channels side by side.

An op outside the table, or a model without BatchNorm statistics (nothing anchors the propagation;
the input distribution is unknown), raises ``Unsupported``.

``PropagatedMoments`` is a ``lsq.MomentSource`` built on it: moments for the fit, and BatchNorm
statistics of the merged model corrected by the change the merge made to the predicted moments. It
runs in well under a second where probes take minutes, but lost 10-45 validation points against
the probes on vgg-fmnist and resnet-fmnist (``experiments/moments_validation.json``), so the core
keeps the probes and this lives here, measured, for whoever improves it.

``NoiseMoments`` replaces the closed forms by samples: Gaussian noise images run through the model
with every BatchNorm normalising by its batch's own statistics (the same anchor), the moments
measured at the consumers, and the merged model's statistics corrected by the change measured the
same way. A forward pass of a few hundred inputs, no optimisation; closer to the probes than the
closed forms, still behind them at ratios 0.6-0.8 (same file).
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from neuronmerge import decompose, lsq
from neuronmerge.activations import tensor_moments
from neuronmerge.api import Result, compress
from neuronmerge.methods.base import GroupDecomposition
from neuronmerge.types import Group

#: Gauss-Legendre nodes of the covariance integral of a ReLU pair (error below 1e-6 of the variance
#: on the test pairs of ``tests/test_propagate.py``).
_NODES = 24
#: Correlations are clipped to this magnitude inside the integral (the exact variance is set apart).
_MAX_CORRELATION = 1 - 1e-6


class Unsupported(Exception):
    """The graph holds an op whose moments ``propagate`` cannot carry, or nothing anchors them."""


@dataclass(frozen=True)
class Gaussian:
    """A tensor's channels: mean ``(C,)`` and covariance ``(C, C)`` (float64), the same at every
    position. ``grid`` is the map's spatial shape when the tensor is a flattened map (feature
    ``c * block + p`` is channel ``c`` at position ``p``); ``pre`` the Gaussian this one is the ReLU
    of, kept for max pooling (the max of rectified values is the rectified max)."""

    mean: torch.Tensor
    cov: torch.Tensor
    grid: tuple[int, ...] = ()
    pre: Gaussian | None = None

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def block(self) -> int:
        return math.prod(self.grid)


@dataclass(frozen=True)
class Assumptions:
    """What the propagation assumes about positions: the correlation of one channel's values at
    two positions a distance ``d`` apart is ``spatial ** d`` (0: independent positions)."""

    spatial: float = 0.0


#: The assumptions ``lsq.PropagatedMoments`` makes, chosen on the validation split
#: (``experiments/moments_validation.json``).
DEFAULT_ASSUMPTIONS = Assumptions(spatial=0.5)


@dataclass(frozen=True)
class Propagation:
    """Every tensor's ``Gaussian`` (by fx node name), and, per BatchNorm module, the moments its
    input was predicted to have before they were replaced by the stored ones, and its stored mean."""

    values: dict[str, Gaussian]
    norm_inputs: dict[str, Gaussian]
    norm_means: dict[str, torch.Tensor]


#: Called at each BatchNorm with its module path, the module and its predicted input; it may rewrite
#: the module's running statistics before they anchor the propagation (``correct_batchnorm``).
NormHook = Callable[[str, nn.modules.batchnorm._BatchNorm, Gaussian], None]


def _rows(weight: torch.Tensor, groups: int, channels: int) -> torch.Tensor:
    """``(out, in_channels, taps)``: a layer's weight with grouped convs written out block-diagonally."""
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], weight.shape[1], -1)
    if groups == 1:
        return w
    full = torch.zeros(w.shape[0], channels, w.shape[2], dtype=torch.float64)
    per_out, per_in = w.shape[0] // groups, w.shape[1]
    for g in range(groups):
        full[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] = w[
            g * per_out : (g + 1) * per_out
        ]
    return full


def _grid_correlation(grid: tuple[int, ...], spacing: tuple[int, ...], spatial: float) -> torch.Tensor:
    """``spatial ** distance`` between every two positions of ``grid`` (spaced ``spacing`` apart)."""
    if not grid or spatial == 0:
        return torch.eye(math.prod(grid), dtype=torch.float64)
    axes = [torch.arange(n, dtype=torch.float64) * step for n, step in zip(grid, spacing, strict=True)]
    points = torch.cartesian_prod(*axes).reshape(-1, len(grid))
    return torch.tensor(spatial, dtype=torch.float64) ** torch.cdist(points, points)


def _affine_map(
    weight: torch.Tensor, bias: torch.Tensor | None, x: Gaussian, taps: torch.Tensor
) -> Gaussian:
    """``y = sum_k W_k x_k + b`` over taps ``k`` of ``x`` correlated as ``taps`` says: ``weight``
    is ``(out, C, taps)``, the covariance of taps ``k, l`` is ``taps[k, l] * Sigma``."""
    mean = weight.sum(dim=2) @ x.mean
    if bias is not None:
        mean = mean + bias.detach().to(torch.float64)
    mixed = torch.einsum("ock,kl->ocl", weight, taps)
    cov = torch.einsum("ocl,cd,edl->oe", mixed, x.cov, weight)
    return Gaussian(mean, (cov + cov.T) / 2)


def _conv(module: nn.Module, x: Gaussian, assume: Assumptions) -> Gaussian:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if x.block != 1:
        raise Unsupported("a conv reading a flattened tensor")
    taps = _grid_correlation(tuple(module.kernel_size), tuple(module.dilation), assume.spatial)
    return _affine_map(_rows(module.weight, module.groups, x.channels), module.bias, x, taps)


def _linear(module: nn.Module, x: Gaussian, assume: Assumptions) -> Gaussian:
    assert isinstance(module, nn.Linear)
    if module.in_features != x.channels * x.block:
        raise Unsupported("a linear layer reading more than the channel axis (tokens)")
    weight = module.weight.detach().to(torch.float64).reshape(module.out_features, x.channels, x.block)
    taps = _grid_correlation(x.grid, (1,) * len(x.grid), assume.spatial)
    return _affine_map(weight, module.bias, x, taps)


def _max_pool(module: nn.Module, x: Gaussian, assume: Assumptions) -> Gaussian:
    """The max over a window of ``m`` values, each channel's pairwise correlated ``r`` (the mean
    over the window's pairs): ``mu + s (sqrt(r) z + sqrt(1 - r) max_m z_i)``, taken as Gaussian with
    that mean and variance and the channels' correlations unchanged; of a ReLU, the ReLU of that."""
    assert isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
    dims = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(module)]
    kernel = _tuple(module.kernel_size, dims)
    window = _grid_correlation(kernel, _tuple(module.dilation, dims), assume.spatial)
    m = window.shape[0]
    if m == 1:
        return x
    r = float((window.sum() - m) / (m * (m - 1)))
    top_mean, top_var = _max_of_normals(m)
    base = x.pre if x.pre is not None else x
    std = base.cov.diagonal().clamp_min(0).sqrt()
    new_std = std * math.sqrt(r + (1 - r) * top_var)
    mean = base.mean + std * math.sqrt(1 - r) * top_mean
    cov = _correlation(base.cov) * new_std[:, None] * new_std[None, :]
    pooled = Gaussian(mean, cov)
    return rectified(pooled) if x.pre is not None else pooled


def _tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _max_of_normals(m: int) -> tuple[float, float]:
    """Mean and variance of the max of ``m`` independent standard normals (by quadrature)."""
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    density = m * _normal_pdf(z) * _normal_cdf(z) ** (m - 1)
    step = float(z[1] - z[0])
    mean = float((z * density).sum() * step)
    return mean, float(((z - mean).square() * density).sum() * step)


def _correlation(cov: torch.Tensor) -> torch.Tensor:
    std = cov.diagonal().clamp_min(0).sqrt()
    alive = std > 0
    inverse = torch.where(alive, 1 / std.clamp_min(1e-300), torch.zeros_like(std))
    corr = cov * inverse[:, None] * inverse[None, :]
    corr.diagonal().copy_(alive.to(corr.dtype))  # a dead channel: correlated with nothing
    return corr.clamp(-1, 1)


def _anchored(module: nn.Module, x: Gaussian, _assume: Assumptions) -> Gaussian:
    """BatchNorm in eval mode, its input's mean and variance replaced by the stored ones."""
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    if module.running_mean is None or module.running_var is None or x.block != 1:
        raise Unsupported(f"a BatchNorm without running statistics ({type(module).__name__})")
    var = module.running_var.detach().to(torch.float64)
    scale = 1 / torch.sqrt(var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().to(torch.float64)
    bias = torch.zeros_like(var) if module.bias is None else module.bias.detach().to(torch.float64)
    std = scale * var.sqrt()
    return Gaussian(bias.clone(), _correlation(x.cov) * std[:, None] * std[None, :])


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2))


def _normal_pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x.square()) / math.sqrt(2 * math.pi)


def rectified(x: Gaussian) -> Gaussian:
    """Moments of ``relu(x)`` for Gaussian ``x``.

    Mean and variance are the rectified Gaussian's; the covariance of channels ``i, j`` with
    standardised means ``h`` and correlation ``rho`` is ``s_i s_j (rho Phi(h_i) Phi(h_j) +
    int_0^rho (rho - r) p(r) dr)``, ``p(r)`` the bivariate normal density at ``(-h_i, -h_j)`` with
    correlation ``r`` (Price's theorem, integrated twice), on Gauss-Legendre nodes.
    """
    std = x.cov.diagonal().clamp_min(0).sqrt()
    h = x.mean / std.clamp_min(1e-300)
    cdf, pdf = _normal_cdf(h), _normal_pdf(h)
    mean = torch.where(std > 0, x.mean * cdf + std * pdf, x.mean.clamp_min(0))
    second = (x.mean.square() + std.square()) * cdf + x.mean * std * pdf
    var = torch.where(std > 0, second - mean.square(), torch.zeros_like(mean)).clamp_min(0)

    rho = _correlation(x.cov).clamp(-_MAX_CORRELATION, _MAX_CORRELATION)
    t, w = _gauss_legendre(_NODES)
    hi, hj = h[:, None], h[None, :]
    a, b = hi.square() + hj.square(), hi * hj
    integral = torch.zeros_like(rho)
    for node, weight in zip(t.tolist(), w.tolist(), strict=True):
        r = rho * (node + 1) / 2
        density = torch.exp(-(a - 2 * r * b) / (2 * (1 - r.square()))) / (
            2 * math.pi * torch.sqrt(1 - r.square())
        )
        integral += weight * (rho - r) * density
    integral *= rho / 2
    cov = (rho * cdf[:, None] * cdf[None, :] + integral) * std[:, None] * std[None, :]
    cov.diagonal().copy_(var)
    return Gaussian(mean, (cov + cov.T) / 2, x.grid, x if not x.grid else None)


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [-1, 1] (Golub-Welsch)."""
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k.square() - 1)
    nodes, vectors = torch.linalg.eigh(torch.diag(beta, 1) + torch.diag(beta, -1))
    return nodes, 2 * vectors[0].square()


def _same(_module: object, x: Gaussian, _assume: Assumptions) -> Gaussian:
    return x


def _without_pre(_module: object, x: Gaussian, _assume: Assumptions) -> Gaussian:
    """Moments unchanged, but no longer the ReLU of a known Gaussian (average pooling)."""
    return Gaussian(x.mean, x.cov, x.grid)


def _sum(*terms: Gaussian | float | int) -> Gaussian:
    gaussians = [t for t in terms if isinstance(t, Gaussian)]
    constant = sum(float(t) for t in terms if not isinstance(t, Gaussian))
    if len({(g.channels, g.block) for g in gaussians}) != 1:
        raise Unsupported("a sum of tensors with different channels")
    mean = sum((g.mean for g in gaussians), torch.zeros_like(gaussians[0].mean)) + constant
    cov = sum((g.cov for g in gaussians), torch.zeros_like(gaussians[0].cov))
    return Gaussian(mean, cov, gaussians[0].grid)


def _concat(parts: list[Gaussian], dim: int = 0) -> Gaussian:
    if dim != 1 or len({p.grid for p in parts}) != 1:
        raise Unsupported("a concatenation along another axis than the channels")
    return Gaussian(
        torch.cat([p.mean for p in parts]), torch.block_diag(*[p.cov for p in parts]), parts[0].grid
    )


#: Module types and the moments of their output (a function of the module and its input).
MODULE_RULES: dict[type[nn.Module], Callable[[Any, Gaussian, Assumptions], Gaussian]] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm1d: _anchored,
    nn.BatchNorm2d: _anchored,
    nn.BatchNorm3d: _anchored,
    nn.ReLU: lambda _m, x, _a: rectified(x),
    nn.Identity: _same,
    nn.Dropout: _same,
    nn.MaxPool1d: _max_pool,
    nn.MaxPool2d: _max_pool,
    nn.AvgPool2d: _without_pre,  # an average of positions: the same mean, correlations kept
    nn.AdaptiveAvgPool2d: _without_pre,
}
#: Functions and tensor methods (by name), each spelling in one row, with their rule.
FUNCTION_RULES: dict[object, Callable[..., Gaussian]] = {
    torch.relu: rectified,
    nn.functional.relu: lambda x, inplace=False: rectified(x),
    "relu": rectified,
    operator.add: _sum,
    operator.iadd: _sum,
    torch.add: _sum,
    "add": _sum,
    torch.cat: _concat,
    nn.functional.dropout: lambda x, *_a, **_k: x,
    nn.functional.adaptive_avg_pool2d: lambda x, *_a, **_k: Gaussian(x.mean, x.cov, x.grid),
    "contiguous": lambda x: x,
}
#: Functions and methods that flatten a map into features (``block`` positions per channel).
FLATTENS: frozenset[object] = frozenset({torch.flatten, "flatten", "view", "reshape"})


def propagate(
    graph_module: fx.GraphModule,
    example: torch.Tensor,
    on_norm: NormHook | None = None,
    assume: Assumptions | None = None,
) -> Propagation:
    """The ``Gaussian`` of every tensor of ``graph_module`` (one tensor input, ``example`` its shape).

    The input is taken as zero-mean, unit-variance and uncorrelated; a model without BatchNorm has
    nothing to correct that guess and raises ``Unsupported``, as does any op outside the tables.
    """
    assume = assume or DEFAULT_ASSUMPTIONS
    norms = [m for m in graph_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise Unsupported("no BatchNorm statistics to anchor the moments")
    shapes: dict[str, torch.Size] = {}
    with torch.no_grad():
        ShapeProp(graph_module).propagate(example)
    for node in graph_module.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node.name] = meta.shape
    values: dict[str, Gaussian] = {}
    norm_inputs: dict[str, Gaussian] = {}
    norm_means: dict[str, torch.Tensor] = {}

    def arg(a: object) -> object:
        if isinstance(a, fx.Node):
            if a.name not in values:
                raise Unsupported(f"{a.name} has no moments")
            return values[a.name]
        if isinstance(a, (list, tuple)):
            return [arg(v) for v in a]
        return a

    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if len(example.shape) < 2:
                raise Unsupported("an input without a channel axis")
            c = int(example.shape[1])
            values[node.name] = Gaussian(
                torch.zeros(c, dtype=torch.float64), torch.eye(c, dtype=torch.float64)
            )
        elif node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            if isinstance(module, nn.Flatten):
                values[node.name] = _flattened(node, shapes, arg(node.args[0]))
                continue
            rule = MODULE_RULES.get(type(module))
            if rule is None:
                raise Unsupported(f"no moment rule for {type(module).__name__} ({node.name})")
            x = arg(node.args[0])
            assert isinstance(x, Gaussian)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                norm_inputs[node.target] = x
                if module.running_mean is not None:
                    norm_means[node.target] = module.running_mean.detach().to(torch.float64).clone()
                if on_norm is not None:
                    on_norm(node.target, module, x)
            values[node.name] = rule(module, x, assume)
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if target in FLATTENS:
                values[node.name] = _flattened(node, shapes, arg(node.args[0]))
                continue
            rule_fn = FUNCTION_RULES.get(target)
            if rule_fn is None:
                raise Unsupported(f"no moment rule for {getattr(target, '__name__', target)}")
            values[node.name] = rule_fn(
                *[arg(a) for a in node.args], **{k: arg(v) for k, v in node.kwargs.items()}
            )
        elif node.op == "output":
            break
        else:
            raise Unsupported(f"no moment rule for a {node.op} node ({node.name})")
    return Propagation(values, norm_inputs, norm_means)


def _flattened(node: fx.Node, shapes: dict[str, torch.Size], x: object) -> Gaussian:
    """A map ``(N, C, *positions)`` flattened to ``(N, C * positions)``: the same channels."""
    source = node.args[0]
    assert isinstance(source, fx.Node) and isinstance(x, Gaussian)
    before, after = shapes.get(source.name), shapes.get(node.name)
    if before is None or after is None or len(after) != 2 or after[0] != before[0]:
        raise Unsupported(f"a reshape other than flattening a map ({node.name})")
    return Gaussian(x.mean, x.cov, (*x.grid, *before[2:]))


@dataclass(frozen=True)
class PropagatedMoments:
    """A ``lsq.MomentSource``: moments propagated from the stored BatchNorm statistics
    (``propagate``: no data, no probes); the statistics of the merged model corrected by the change
    the merge made to the predicted moments of each BatchNorm's input (``correct_batchnorm``)."""

    example: torch.Tensor
    propagation: Propagation
    assume: Assumptions

    @classmethod
    def of(
        cls,
        graph_module: fx.GraphModule,
        example: torch.Tensor,
        assume: Assumptions = DEFAULT_ASSUMPTIONS,
    ) -> PropagatedMoments:
        """Raises ``Unsupported`` when the graph cannot be propagated."""
        return cls(example, propagate(graph_module, example, assume=assume), assume)

    def moments(
        self, graph_module: fx.GraphModule, groups: list[Group]
    ) -> dict[tuple[str, str], decompose.Moments]:
        result: dict[tuple[str, str], decompose.Moments] = {}
        for group in groups:
            for piece in group.consumers:
                x = self.propagation.values[piece.tensor]
                start = piece.offset // x.block
                if x.block != piece.block or start * x.block != piece.offset:
                    raise Unsupported(f"{piece.module} reads {piece.tensor} in pieces")
                span = slice(start, start + group.channels)
                result[(group.name, piece.tensor)] = decompose.Moments(
                    x.mean[span], x.cov[span, span], 0
                )
        return result

    def repair(
        self, small: fx.GraphModule, groups: list[Group], decompositions: dict[str, GroupDecomposition]
    ) -> fx.GraphModule:
        return correct_batchnorm(
            small, self.example, self.propagation, groups, decompositions, self.assume
        )


def correct_batchnorm(
    small: fx.GraphModule,
    example: torch.Tensor,
    before: Propagation,
    groups: list[Group],
    decompositions: dict[str, GroupDecomposition],
    assume: Assumptions,
) -> fx.GraphModule:
    """A copy of ``small`` whose BatchNorm statistics follow what the merge did to their inputs.

    Moments are propagated through ``small`` as through the original (``before``); at each
    BatchNorm, in graph order, the stored variance is scaled by the ratio of the predicted input
    variances after and before the merge (a ratio: the prediction's own error, positions taken as
    independent, is shared by both), and the mean becomes the original stored mean plus the
    predicted shift (means propagate exactly through linear layers; this also replaces any constant
    surgery moved into the statistics), before they anchor the rest of the propagation.
    """
    repaired = copy.deepcopy(small)

    def correct(path: str, bn: nn.modules.batchnorm._BatchNorm, after: Gaussian) -> None:
        assert bn.running_mean is not None and bn.running_var is not None
        was = before.norm_inputs[path]
        index = _kept_channels(path, was.channels, groups, decompositions)
        var_was, mean_was = was.cov.diagonal()[index], was.mean[index]
        alive = var_was > 0
        ratio = torch.where(
            alive, after.cov.diagonal() / var_was.clamp_min(1e-300), torch.ones_like(var_was)
        )
        stored_mean = before.norm_means[path][index]
        bn.running_var.mul_(ratio.to(bn.running_var.dtype))
        bn.running_mean.copy_((stored_mean + after.mean - mean_was).to(bn.running_mean.dtype))

    with torch.no_grad():
        propagate(repaired, example, on_norm=correct, assume=assume)
    return repaired


def _kept_channels(
    path: str, channels: int, groups: list[Group], decompositions: dict[str, GroupDecomposition]
) -> torch.Tensor:
    """The original indices of the channels the merged BatchNorm ``path`` still holds, in order."""
    keep = torch.ones(channels, dtype=torch.bool)
    for group in groups:
        dec = decompositions.get(group.name)
        for piece in group.params:
            if piece.owner != path or dec is None:
                continue
            removed = torch.ones(group.channels, dtype=torch.bool)
            removed[dec.kept] = False
            within = torch.arange(piece.block)
            lost = piece.offset + torch.nonzero(removed).flatten()[:, None] * piece.block + within
            keep[lost.flatten()] = False
    return torch.nonzero(keep).flatten()


#: Noise inputs of ``NoiseMoments``, in batches of ``NOISE_BATCH``.
NOISE_COUNT = 256
NOISE_BATCH = 128


@contextlib.contextmanager
def _batch_normalised(graph_module: nn.Module, record: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Every BatchNorm of ``graph_module`` normalises by its batch's statistics (its affine kept)
    and adds the count, sum and sum of squares of its input channels to ``record[path]``."""

    def normalise(path: str, module: nn.Module, args: tuple[torch.Tensor, ...], _out: object) -> object:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        x = args[0]
        dims = [0, *range(2, x.dim())]
        sums = record.setdefault(path, [torch.zeros(()), torch.zeros(()), torch.zeros(())])
        sums[0] = sums[0] + x.numel() // x.shape[1]
        sums[1] = sums[1] + x.sum(dims).to(torch.float64)
        sums[2] = sums[2] + x.square().sum(dims).to(torch.float64)
        return nn.functional.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)

    handles = [
        module.register_forward_hook(lambda m, a, o, path=path: normalise(path, m, a, o))
        for path, module in graph_module.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _mean_var(record: dict[str, list[torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for path, (count, total, squares) in record.items():
        mean = total / count
        out[path] = (mean, (squares / count - mean.square()).clamp_min(0))
    return out


@dataclass(frozen=True)
class NoiseMoments:
    """A ``lsq.MomentSource``: moments measured on noise inputs run with every BatchNorm normalising
    by its batch's statistics; the merged model's statistics corrected by the change in each
    BatchNorm's input measured the same way (the variance by its ratio, the mean by its shift)."""

    batches: tuple[tuple[torch.Tensor, ...], ...]
    #: Per BatchNorm: the stored mean, and its input's mean and variance on the noise.
    stored_means: dict[str, torch.Tensor]
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(
        cls, graph_module: fx.GraphModule, example: torch.Tensor, count: int = NOISE_COUNT, seed: int = 0
    ) -> NoiseMoments:
        norms = {
            path: m
            for path, m in graph_module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
        if not norms or any(m.running_mean is None for m in norms.values()):
            raise Unsupported("no BatchNorm statistics to anchor the moments")
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((count, *example.shape[1:]), generator=generator, dtype=example.dtype)
        batches = tuple((b,) for b in noise.split(NOISE_BATCH))
        record: dict[str, list[torch.Tensor]] = {}
        with _batch_normalised(graph_module, record), torch.no_grad():
            for batch in batches:
                graph_module(*batch)
        stored = {}
        for path, m in norms.items():
            assert m.running_mean is not None
            stored[path] = m.running_mean.detach().to(torch.float64).clone()
        return cls(batches, stored, _mean_var(record))

    def moments(
        self, graph_module: fx.GraphModule, groups: list[Group]
    ) -> dict[tuple[str, str], decompose.Moments]:
        with _batch_normalised(graph_module, {}):
            return tensor_moments(graph_module, groups, self.batches)

    def repair(
        self, small: fx.GraphModule, groups: list[Group], decompositions: dict[str, GroupDecomposition]
    ) -> fx.GraphModule:
        repaired = copy.deepcopy(small)
        record: dict[str, list[torch.Tensor]] = {}
        with _batch_normalised(repaired, record), torch.no_grad():
            for batch in self.batches:
                repaired(*batch)
        for path, (mean_now, var_now) in _mean_var(record).items():
            bn = repaired.get_submodule(path)
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            assert bn.running_mean is not None and bn.running_var is not None
            mean_was, var_was = self.inputs[path]
            index = _kept_channels(path, mean_was.shape[0], groups, decompositions)
            alive = var_was[index] > 0
            ratio = torch.where(
                alive, var_now / var_was[index].clamp_min(1e-300), torch.ones_like(var_now)
            )
            with torch.no_grad():
                bn.running_var.mul_(ratio.to(bn.running_var.dtype))
                mean = self.stored_means[path][index] + mean_now - mean_was[index]
                bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        return repaired


def compress_with(
    model: nn.Module, example: torch.Tensor, ratio: float, source: lsq.MomentSource
) -> Result:
    """``compress(model, example, ratio, method="merge-ls")`` with the moments of ``source``, for
    measuring the sources here against the core's own choice (``lsq.moment_source``), which this
    replaces for the duration of the call."""
    chosen = lsq.moment_source
    lsq.moment_source = lambda *_args: source  # type: ignore[assignment]
    try:
        return compress(model, example, ratio, method="merge-ls")
    finally:
        lsq.moment_source = chosen
