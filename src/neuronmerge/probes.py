"""Synthetic probe inputs made from the model alone (no data): model inversion.

``merge-ls`` needs activation moments, and a data-free method has no samples to measure them on. We
synthesise inputs that the model itself finds typical: starting from Gaussian noise, each batch of
inputs is optimised so that the model classifies it confidently as randomly drawn classes (Nayak et al.
2019, "data impressions"), with a small L2 prior on the inputs, and, in models with BatchNorm, so that
the batch statistics at every BatchNorm match its running mean and variance (Yin et al. 2020,
DeepInversion), which are a summary of the training data that the model already stores.

Nothing is read from disk or the network: the probes depend only on the weights and the seed. The
model's parameters are never written (gradients are taken with respect to the inputs only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from neuronmerge.errors import InvalidArgumentError

#: Probe count, optimisation steps and batch size of the defaults; chosen on the validation split of
#: the authors' LeNet-300-100 (``experiments/methods_validation.json``): 1024 probes lost 0.4 points,
#: 4096 gained nothing, 100 steps did as well as 200 over two probe seeds.
PROBES = 2048
STEPS = 100
BATCH = 512
#: Weight of the input L2 prior (on the mean squared input), and of the BatchNorm-statistics term.
L2_PRIOR = 1.0
BN_WEIGHT = 1.0
LEARNING_RATE = 0.05


def _norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


def synthesize_probes(
    model: nn.Module | fx.GraphModule,
    example: torch.Tensor,
    count: int = PROBES,
    *,
    steps: int = STEPS,
    batch_size: int = BATCH,
    seed: int = 0,
    prior: float = L2_PRIOR,
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` synthetic inputs shaped like ``example[0]``, in batches, made by model inversion.

    ``model`` must be in eval mode and return class logits ``(batch, classes)``; it is not modified.
    ``prior`` weighs the L2 penalty on the inputs (on their mean square).
    Returns a list of one-tensor input tuples, ready to be passed as ``calibration``.
    """
    if steps < 0 or count < 1 or batch_size < 1:
        raise InvalidArgumentError("count and batch_size must be positive and steps non-negative")
    generator = torch.Generator().manual_seed(seed)
    norms = _norm_layers(model)
    observed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].transpose(0, 1).flatten(1)  # (channels, samples)
        observed[id(module)] = (x.mean(dim=1), x.var(dim=1, unbiased=False))

    handles = [bn.register_forward_pre_hook(record) for bn in norms]
    batches: list[tuple[torch.Tensor, ...]] = []
    try:
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            x = torch.randn((n, *example.shape[1:]), generator=generator, dtype=example.dtype)
            x.requires_grad_(True)
            optimiser = torch.optim.Adam([x], lr=LEARNING_RATE)
            targets: torch.Tensor | None = None
            for _ in range(steps):
                observed.clear()
                logits = model(x)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise InvalidArgumentError(
                        "synthetic probes need a model returning class logits (batch, classes); "
                        "pass calibration batches instead"
                    )
                if targets is None:
                    targets = torch.randint(0, logits.shape[1], (n,), generator=generator)
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
                (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                optimiser.step()
            batches.append((x.detach(),))
    finally:
        for handle in handles:
            handle.remove()
    return batches
