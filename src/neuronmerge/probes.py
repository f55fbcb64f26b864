"""Synthetic probe inputs made from the model alone (no data): model inversion.

``merge-ls`` needs activation moments, and a data-free method has no samples to measure them on. We
synthesise inputs that the model itself finds typical: starting from Gaussian noise, each batch of
inputs is optimised so that the model classifies it confidently as randomly drawn classes (Nayak et al.
2019, "data impressions"), with a small L2 prior on the inputs, and, in models with BatchNorm, so that
the batch statistics at every BatchNorm match its running mean and variance (Yin et al. 2020,
DeepInversion), which are a summary of the training data that the model already stores.

Cost is what limits this: every optimisation step is a forward and a backward pass over every probe.
The work is therefore sized by the model, not fixed (``schedule``): a budget of multiply-accumulates
buys up to ``PROBES`` probes of ``STEPS`` steps, and a BatchNorm model too heavy for that gets fewer
probes, then fewer steps (a model without BatchNorm keeps them all: its probes have no stored
statistics to match, and few of them measure its moments badly). A batch also stops early once its
loss stops falling. A conv net needs fewer probes than a fully connected one anyway, since every
spatial position is one more sample of each channel.
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

#: The most probes and optimisation steps a model gets, and the batch size. Chosen on the validation
#: split of the authors' LeNet-300-100 (``experiments/methods_validation.json``): 1024 probes lost 0.4
#: points, 4096 gained nothing, 100 steps did as well as 200 over two probe seeds.
PROBES = 2048
STEPS = 100
BATCH = 512
#: Forward multiply-accumulates the optimisation may spend (a backward pass counts as two forwards):
#: a small net (LeNet-300-100: 0.27 M MACs per input) gets all ``PROBES`` x ``STEPS``, a Fashion-MNIST
#: BatchNorm conv net (about 5.6 M) about a hundred probes. Chosen on the validation split
#: (``experiments/probe_validation.json``): on vgg-fmnist a hundred probes beat 256 and 512.
BUDGET_MACS = 170e9
#: Never fewer probes or steps than these, whatever the model costs.
MIN_PROBES = 32
MIN_STEPS = 10
#: A batch stops when its loss fell by less than this fraction over the last ``PATIENCE`` steps.
TOLERANCE = 0.01
PATIENCE = 10
#: Weight of the input L2 prior (on the mean squared input), and of the BatchNorm-statistics term.
L2_PRIOR = 1.0
BN_WEIGHT = 1.0
LEARNING_RATE = 0.05
#: Work expected to take longer than this (seconds, estimated after the first step) shows a bar.
PROGRESS_AFTER_S = 2.0


@dataclass(frozen=True)
class Schedule:
    """How many probes to make and the most optimisation steps each batch may take."""

    count: int
    steps: int


def schedule(macs_per_input: float, budget: float = BUDGET_MACS, *, batchnorm: bool = True) -> Schedule:
    """The probes a model of ``macs_per_input`` forward MACs gets for ``budget``.

    Probes go first (up to ``PROBES`` at ``STEPS`` steps), then steps (down to ``MIN_STEPS`` at
    ``MIN_PROBES`` probes): moments need samples more than they need polished probes. A model
    without BatchNorm gets all ``PROBES`` x ``STEPS`` whatever it costs: with no stored statistics
    to match, a hundred probes lost up to 30 points on alexnet-fmnist's validation split
    (``experiments/probe_validation.json``), where BatchNorm nets lost nothing.
    """
    if not batchnorm:
        return Schedule(PROBES, STEPS)
    per_step = 3 * max(macs_per_input, 1.0)  # forward + backward
    count = int(budget / (per_step * STEPS))
    if count >= MIN_PROBES:
        return Schedule(min(PROBES, count), STEPS)
    steps = int(budget / (per_step * MIN_PROBES))
    return Schedule(MIN_PROBES, max(MIN_STEPS, steps))


def _norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


def synthesize_probes(
    model: nn.Module | fx.GraphModule,
    example: torch.Tensor,
    count: int | None = None,
    *,
    steps: int | None = None,
    batch_size: int = BATCH,
    seed: int = 0,
    prior: float = L2_PRIOR,
    tolerance: float = TOLERANCE,
    progress: bool | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` synthetic inputs shaped like ``example[0]``, in batches, made by model inversion.

    ``model`` must be in eval mode and return class logits ``(batch, classes)``; it is not modified.
    ``count`` and ``steps`` default to ``schedule`` of the model's cost. A batch stops before
    ``steps`` when its loss fell by less than ``tolerance`` (relative) over ``PATIENCE`` steps; 0
    runs every step. ``prior`` weighs the L2 penalty on the inputs (on their mean square).
    ``progress``: draw a bar on stderr (``None``: only on a terminal, and when the work is expected
    to take over ``PROGRESS_AFTER_S``). Returns one-tensor input tuples, ready to be passed as
    ``calibration``.
    """
    if count is None or steps is None:
        with torch.no_grad():
            macs = count_flops(model, example[:1])
        planned = schedule(macs, batchnorm=bool(_norm_layers(model)))
        count = planned.count if count is None else count
        steps = planned.steps if steps is None else steps
    if steps < 0 or count < 1 or batch_size < 1 or tolerance < 0:
        raise InvalidArgumentError(
            "count and batch_size must be positive, steps and tolerance non-negative"
        )
    generator = torch.Generator().manual_seed(seed)
    norms = _norm_layers(model)
    observed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].transpose(0, 1).flatten(1)  # (channels, samples)
        observed[id(module)] = (x.mean(dim=1), x.var(dim=1, unbiased=False))

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

    total_steps = math.ceil(count / batch_size) * steps
    show = sys.stderr.isatty() if progress is None else progress
    handles = [bn.register_forward_pre_hook(record) for bn in norms]
    batches: list[tuple[torch.Tensor, ...]] = []
    started = time.perf_counter()
    advance: Advance | None = None
    with contextlib.ExitStack() as stack:
        for handle in handles:
            stack.callback(handle.remove)
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            x = torch.randn((n, *example.shape[1:]), generator=generator, dtype=example.dtype)
            x.requires_grad_(True)
            optimiser = torch.optim.Adam([x], lr=LEARNING_RATE)
            targets: torch.Tensor | None = None
            history: list[float] = []
            for step in range(steps):
                loss, targets = loss_of(x, targets)
                (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                optimiser.step()
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
            batches.append((x.detach(),))
    return batches


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
    model: nn.Module | fx.GraphModule, example: torch.Tensor, *, progress: bool | None = None
) -> list[tuple[torch.Tensor, ...]]:
    """``synthesize_probes(model, example)`` with the defaults, made once per model and reused.

    The key is a digest of the model's weights and buffers and of the input shape, so a model
    changed in place is never served stale probes. The returned tensors are shared: read them only.
    """
    key = _fingerprint(model, example, (PROBES, STEPS, BUDGET_MACS, TOLERANCE, LEARNING_RATE))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return list(_CACHE[key])
    probes = synthesize_probes(model, example, progress=progress)
    _CACHE[key] = probes
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return list(probes)
