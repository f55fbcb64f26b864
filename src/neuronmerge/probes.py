"""Synthetic probe inputs made from the model alone (no data): model inversion.

``merge-ls`` needs activation moments, and a data-free method has no samples to measure them on. We
synthesise inputs that the model itself finds typical: starting from Gaussian noise, each batch of
inputs is optimised so that the model classifies it confidently as randomly drawn classes (Nayak et al.
2019, "data impressions"), with a small L2 prior on the inputs, and, in models with BatchNorm, so that
the batch statistics at every BatchNorm match its running mean and variance (Yin et al. 2020,
DeepInversion), which are a summary of the training data that the model already stores.

Cost is what limits this: every optimisation step is a forward and a backward pass over every probe.
The work is therefore sized by the model, not fixed (``schedule``): a budget of multiply-accumulates
buys optimised probes, then steps, under one of three regimes. A model with BatchNorm (``MATCHED``)
gets up to ``PROBES`` probes of sixty steps, all optimised against the stored statistics: about a
hundred for a Fashion-MNIST conv net. A model without BatchNorm cheap enough to get every probe
anyway (``FULL``) gets all ``PROBES`` at a hundred gentle steps. A heavier one (``DERIVED``) gets
as many probes as a smaller budget buys at fifty steps of a larger rate, and the rest of ``PROBES``
derived from them for a forward pass each (``derive``: mixtures of two optimised probes plus
noise), since moments need many samples and it is the optimisation that costs; mixtures broke the
BatchNorm nets' statistics, so those keep their optimised probes only. A batch also stops early
once its loss stops falling. A conv net needs fewer probes than a fully connected
one anyway, since every spatial position is one more sample of each channel.
Probes are remembered per model (``cached_probes``), so compressing one model at several ratios makes
them once.

Nothing is read from disk or the network: the probes depend only on the weights and the seed. The
model's parameters are never written (gradients are taken with respect to the inputs only).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.evaluate import count_flops
from neuronmerge.progress import Advance, progress_bar

#: The most probes returned, and the batch size they are optimised and returned in.
PROBES = 2048
BATCH = 512


@dataclass(frozen=True)
class Regime:
    """How probes are made for one kind of model: at most ``optimised`` probes of at most ``steps``
    Adam steps at ``rate``, for at most ``budget`` forward multiply-accumulates (a backward pass
    counts as two forwards); with ``derived``, the rest of ``PROBES`` derived from them
    (``derive``), for a forward pass each."""

    optimised: int
    steps: int
    rate: float
    budget: float
    derived: bool


#: Models with BatchNorm: every probe optimised, its batch statistics matched to the stored ones; a
#: Fashion-MNIST conv net (about 5.6 M MACs per input) gets about a hundred. Chosen on the
#: validation split (``experiments/probe_validation.json``): on vgg-fmnist a hundred probes beat
#: 256 and 512; on resnet-fmnist, 64 probes x 50 steps at rate 0.2 derived up to 2048 lost 10-16
#: points at ratios 0.5-0.7. Sixty steps at rate 0.08 (the same hundred probes, 0.6 of the work of
#: the former hundred steps at 0.05) did as well on average over seeds (``rows_probespeed``), and
#: still does with the relative BatchNorm repair (``norm_repair``; ``rows_reconcile``, probe seeds
#: 0-4): 49.21 against 50.05 over both nets at 0.5-0.8, inside the seeds' standard error (0.64-1.17;
#: the rule stated before measuring), though vgg-fmnist alone lost 3.4 there and resnet-fmnist
#: gained 1.7.
MATCHED = Regime(optimised=PROBES, steps=60, rate=0.08, budget=102e9, derived=False)
#: Models without BatchNorm that can afford every probe at a hundred gentle steps (LeNet-300-100):
#: fewer steps, a larger rate, or derived probes lost 1.7-3 points at ratio 0.8 on its validation
#: split.
FULL = Regime(optimised=PROBES, steps=100, rate=0.05, budget=170e9, derived=False)
#: Models without BatchNorm (no statistics to match) that ``FULL`` cannot give every probe:
#: probes optimised fast, as many as the budget buys, the rest derived, since the optimisation is
#: what costs. On the validation split of alexnet-fmnist, the budget's 69 probes x 50 steps at rate
#: 0.2 derived up to 2048 matched or beat the former 2048 x 100 at rate 0.05 (-0.8 to +7 points at
#: ratios 0.5-0.8, two seeds) for a fiftieth of the time; 106 probes x 100 steps alone lost up to
#: 30 points.
DERIVED = Regime(optimised=PROBES, steps=50, rate=0.2, budget=55e9, derived=True)
#: Forward multiply-accumulates the derived probes may cost the moments that read them.
FORWARD_MACS = 12e9
#: Never fewer probes or steps than these, whatever the model costs.
MIN_PROBES = 32
MIN_STEPS = 10
#: A batch stops when its loss fell by less than this fraction over the last ``PATIENCE`` steps.
TOLERANCE = 0.01
PATIENCE = 10
#: Weight of the input L2 prior (on the mean squared input), and of the BatchNorm-statistics term.
L2_PRIOR = 1.0
BN_WEIGHT = 1.0
#: Noise added to each derived probe, relative to the optimised probes' spread at each input
#: coordinate: mixtures alone stay in the span of the few optimised probes.
NOISE = 0.5
#: Work expected to take longer than this (seconds, estimated after the first step) shows a bar.
PROGRESS_AFTER_S = 2.0


@dataclass(frozen=True)
class Schedule:
    """How many probes to optimise, the most optimisation steps each batch may take and at what
    learning rate, and how many probes to return in all (the optimised ones, then ones derived from
    them)."""

    optimised: int
    steps: int
    rate: float
    count: int


def schedule(macs_per_input: float, *, batchnorm: bool = True) -> Schedule:
    """The probes a model of ``macs_per_input`` forward MACs gets: ``MATCHED`` with BatchNorm,
    ``FULL`` without when its budget buys every probe (LeNet-300-100), else ``DERIVED``.

    Optimised probes go first (up to the regime's ``optimised`` at its ``steps``), then steps (down
    to ``MIN_STEPS`` at ``MIN_PROBES`` probes); derived probes fill ``FORWARD_MACS`` of forward
    passes, up to ``PROBES``, never fewer than those optimised.
    """
    macs = max(macs_per_input, 1.0)
    per_step = 3 * macs  # forward + backward
    if batchnorm:
        regime = MATCHED
    elif per_step * FULL.steps * FULL.optimised <= FULL.budget:
        regime = FULL
    else:
        regime = DERIVED
    optimised = int(regime.budget / (per_step * regime.steps))
    if optimised >= MIN_PROBES:
        optimised, steps = min(regime.optimised, optimised), regime.steps
    else:
        steps = max(MIN_STEPS, int(regime.budget / (per_step * MIN_PROBES)))
        optimised = MIN_PROBES
    count = optimised
    if regime.derived:
        count = max(optimised, min(PROBES, int(FORWARD_MACS / macs)))
    return Schedule(optimised, steps, regime.rate, count)


def derive(optimised: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``optimised`` followed by ``count - len(optimised)`` probes derived from it for a forward
    pass each: random mixtures of two optimised probes (``lam * a + (1 - lam) * b``, ``lam``
    uniform; Zhang et al. 2018, mixup) plus Gaussian noise of ``NOISE`` times the optimised probes'
    standard deviation at each input coordinate, so that the moments see every direction.

    Why: moments need many samples, and a sample is what the optimisation makes expensive.
    """
    n = optimised.shape[0]
    extra = count - n
    if extra <= 0:
        return optimised
    if n < 2:
        raise InvalidArgumentError("deriving probes needs at least two optimised ones to mix")
    first = torch.randint(0, n, (extra,), generator=generator)
    second = torch.randint(0, n, (extra,), generator=generator)
    shape = (extra,) + (1,) * (optimised.dim() - 1)
    lam = torch.rand(shape, generator=generator, dtype=optimised.dtype)
    spread = optimised.std(dim=0, keepdim=True)
    noise = torch.randn((extra, *optimised.shape[1:]), generator=generator, dtype=optimised.dtype)
    mixed = lam * optimised[first] + (1 - lam) * optimised[second] + NOISE * spread * noise
    return torch.cat([optimised, mixed])


class _Adam:
    """Adam (Kingma & Ba 2015, PyTorch's defaults and arithmetic) on one tensor, in place.

    Why not ``torch.optim.Adam``: constructing the first ``torch.optim`` optimiser of a process
    imports ``torch._dynamo``, 1.3-2.7 CPU seconds on two cores, which was a third of LeNet-300-100's
    whole ``merge-ls`` call; one tensor needs none of its machinery.
    """

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, x: torch.Tensor, rate: float) -> None:
        self.x, self.rate, self.t = x, rate, 0
        self.mean = torch.zeros_like(x, requires_grad=False)
        self.square = torch.zeros_like(x, requires_grad=False)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, scale: float = 1.0) -> None:
        beta1, beta2 = self.BETAS
        self.t += 1
        self.mean.lerp_(grad, 1 - beta1)
        self.square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction1, correction2 = 1 - beta1**self.t, 1 - beta2**self.t
        denom = (self.square.sqrt() / correction2**0.5).add_(self.EPS)
        self.x.addcdiv_(self.mean, denom, value=-self.rate * scale / correction1)


def _norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


def unavailable(inputs: tuple[torch.Tensor, ...], output_shape: object) -> str | None:
    """Why no synthetic probes can be made for a model taking ``inputs`` and returning outputs of
    ``output_shape`` (``engine.output_shapes``), or ``None`` when they can: model inversion
    optimises one real-valued input against the class logits ``(batch, classes)`` it returns."""
    if len(inputs) != 1:
        return "synthetic probes are made for single-input models only"
    if not inputs[0].is_floating_point():
        return (
            f"synthetic probes are made for real-valued inputs only (these are {inputs[0].dtype}: "
            "token ids, say)"
        )
    if not (isinstance(output_shape, tuple) and len(output_shape) == 2):
        return "synthetic probes need a model returning class logits (batch, classes)"
    return None


def synthesize_probes(
    model: nn.Module | fx.GraphModule,
    example: torch.Tensor,
    count: int | None = None,
    *,
    steps: int | None = None,
    optimised: int | None = None,
    rate: float | None = None,
    batch_size: int = BATCH,
    seed: int = 0,
    prior: float = L2_PRIOR,
    tolerance: float = TOLERANCE,
    anneal: bool = False,
    progress: bool | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` synthetic inputs shaped like ``example[0]``, in batches, made by model inversion.

    ``model`` must be in eval mode and return class logits ``(batch, classes)``; it is not modified.
    ``optimised`` of them are optimised, the others derived from those (``derive``). ``count``,
    ``steps`` and ``optimised`` default to ``schedule`` of the model's cost (``optimised``: all
    ``count`` when ``count`` is given). A batch stops before
    ``steps`` when its loss fell by less than ``tolerance`` (relative) over ``PATIENCE`` steps; 0
    runs every step. ``anneal``: the learning rate falls from ``rate`` to zero along a half cosine
    over ``steps`` (Loshchilov & Hutter 2017) instead of staying constant. ``prior`` weighs the L2
    penalty on the inputs (on their mean square).
    ``progress``: draw a bar on stderr (``None``: only on a terminal, and when the work is expected
    to take over ``PROGRESS_AFTER_S``). Returns one-tensor input tuples, ready to be passed as
    ``calibration``.
    """
    if count is None or steps is None or rate is None:
        with torch.no_grad():
            macs = count_flops(model, example[:1])
        planned = schedule(macs, batchnorm=bool(_norm_layers(model)))
        if count is None:
            count, optimised = planned.count, planned.optimised if optimised is None else optimised
        steps = planned.steps if steps is None else steps
        rate = planned.rate if rate is None else rate
    optimised = count if optimised is None else optimised
    if steps < 0 or count < 1 or batch_size < 1 or tolerance < 0 or not 1 <= optimised <= count:
        raise InvalidArgumentError(
            "count and batch_size must be positive, optimised between 1 and count, steps and "
            "tolerance non-negative"
        )
    if optimised < min(2, count):
        raise InvalidArgumentError("deriving probes needs at least two optimised ones to mix")
    generator = torch.Generator().manual_seed(seed)
    norms = _norm_layers(model)
    observed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # Per channel over the batch and every position, as E[x^2] - E[x]^2 from sums over the
        # positions first: a third to a fifth of the time of ``var_mean`` over dims (0, 2, 3) or of
        # a transposed copy, forward and backward; this was a third of a BatchNorm net's step.
        x = args[0].flatten(2) if args[0].dim() > 2 else args[0].unsqueeze(2)
        samples = x.shape[0] * x.shape[2]
        mean = x.sum(dim=2).sum(dim=0) / samples
        observed[id(module)] = (mean, x.square().sum(dim=2).sum(dim=0) / samples - mean.square())

    def loss_of(x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        observed.clear()
        logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise InvalidArgumentError(
                "synthetic probes need a model returning class logits (batch, classes); "
                "pass calibration batches instead"
            )
        if targets is None:
            targets = torch.randint(0, logits.shape[1], (x.shape[0],), generator=generator)
        loss = F.cross_entropy(logits, targets) + prior * x.square().mean()
        for bn in norms:
            if id(bn) not in observed:
                continue
            mean, var = observed[id(bn)]
            assert bn.running_mean is not None and bn.running_var is not None
            loss = loss + BN_WEIGHT * (
                torch.linalg.vector_norm(mean - bn.running_mean)
                + torch.linalg.vector_norm(var - bn.running_var)
            )
        return loss, targets

    total_steps = math.ceil(optimised / batch_size) * steps
    show = sys.stderr.isatty() if progress is None else progress
    handles = [bn.register_forward_pre_hook(record) for bn in norms]
    batches: list[torch.Tensor] = []
    started = time.perf_counter()
    advance: Advance | None = None
    with contextlib.ExitStack() as stack:
        for handle in handles:
            stack.callback(handle.remove)
        for start in range(0, optimised, batch_size):
            n = min(batch_size, optimised - start)
            x = torch.randn((n, *example.shape[1:]), generator=generator, dtype=example.dtype)
            x.requires_grad_(True)
            adam = _Adam(x, rate)
            targets: torch.Tensor | None = None
            history: list[float] = []
            for step in range(steps):
                loss, targets = loss_of(x, targets)
                (grad,) = torch.autograd.grad(loss, [x])
                adam.step(grad, 0.5 * (1 + math.cos(math.pi * step / steps)) if anneal else 1.0)
                history.append(float(loss.detach()))
                if advance is None and show:
                    # Decided once, after the first step: does the whole run earn a bar?
                    expected = (time.perf_counter() - started) * total_steps
                    wanted = progress is True or expected > PROGRESS_AFTER_S
                    advance = stack.enter_context(progress_bar(wanted, total_steps))
                    advance("synthesising probes", len(batches) * steps + step + 1)
                elif advance is not None:
                    advance()
                if tolerance and len(history) > PATIENCE:
                    before = history[-PATIENCE - 1]
                    if before - history[-1] < tolerance * abs(before):
                        if advance is not None:
                            advance(steps=steps - step - 1)
                        break
            batches.append(x.detach())
    probes = derive(torch.cat(batches), count, generator)
    return [(chunk,) for chunk in probes.split(batch_size)]


def _fingerprint(model: nn.Module, example: torch.Tensor, settings: tuple[object, ...]) -> str:
    """A digest of everything the probes depend on: weights, buffers, input shape, settings."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr((type(model).__name__, tuple(example.shape[1:]), example.dtype)).encode())
    digest.update(repr(settings).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach()
        digest.update(f"{name}{tuple(data.shape)}{data.dtype}".encode())
        digest.update(data.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


#: The probes of the last few models (``cached_probes``), most recent last.
_CACHE: OrderedDict[str, list[tuple[torch.Tensor, ...]]] = OrderedDict()
_CACHE_SIZE = 4


def cached_probes(
    model: nn.Module | fx.GraphModule,
    example: torch.Tensor,
    *,
    progress: bool | None = None,
    seed: int = 0,
) -> list[tuple[torch.Tensor, ...]]:
    """``synthesize_probes(model, example, seed=seed)`` with the defaults, made once per model (and
    seed) and reused.

    The key is a digest of the model's weights and buffers and of the input shape, so a model
    changed in place is never served stale probes. The returned tensors are shared: read them only.
    """
    settings = (
        PROBES, MATCHED, FULL, DERIVED, FORWARD_MACS, MIN_PROBES, MIN_STEPS, TOLERANCE, NOISE, seed
    )  # fmt: skip
    key = _fingerprint(model, example, settings)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return list(_CACHE[key])
    probes = synthesize_probes(model, example, progress=progress, seed=seed)
    _CACHE[key] = probes
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return list(probes)
