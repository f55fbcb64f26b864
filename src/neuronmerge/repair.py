"""BatchNorm statistics repair after merging, from the same batches that fitted the merge.

Merging changes what every BatchNorm after a site receives: its input shifts, and its variance shrinks
when removed channels are only approximately compensated ("variance collapse"; Jordan et al. 2023,
REPAIR; Wang et al. 2025, model folding). The running statistics stored during training then
normalise the wrong distribution. We measure, on the same calibration batches, the mean and standard
deviation of each BatchNorm's *normalised* input ``(x - running_mean) / sqrt(running_var + eps)`` in
the original and in the merged model, and change the merged model's statistics so that the second
matches the first. Correcting the change rather than re-measuring the statistics keeps what training
measured wherever the merge changed nothing (a merge of exact duplicates stays exact; a constant moved
into the running mean by ``surgery`` is no change), and asks less of synthetic probes, which only need
to show how the merge moves the statistics, not the statistics themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx, nn

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def normalised_moments(graph_module: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]]) -> Stats:
    """Per BatchNorm (by module name): mean and standard deviation of its normalised input channels."""
    sums: dict[str, torch.Tensor] = {}  # per BatchNorm: (count, sum, sum of squares) per channel

    def hook(name: str, bn: nn.modules.batchnorm._BatchNorm, inputs: torch.Tensor) -> None:
        assert bn.running_mean is not None and bn.running_var is not None
        x = inputs.detach().transpose(0, 1).flatten(1).to(torch.float64)  # (channels, samples)
        mean = bn.running_mean.to(torch.float64)[:, None]
        z = (x - mean) / torch.sqrt(bn.running_var.to(torch.float64)[:, None] + bn.eps)
        count = torch.full((z.shape[0],), float(z.shape[1]), dtype=torch.float64)
        total = torch.stack([count, z.sum(1), z.square().sum(1)])
        sums[name] = sums[name] + total if name in sums else total

    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: hook(name, m, args[0]))
        for name, module in graph_module.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                graph_module(*batch)
    finally:
        for handle in handles:
            handle.remove()
    moments: Stats = {}
    for name, (count, first, second) in sums.items():
        mean = first / count
        moments[name] = (mean, (second / count - mean.square()).clamp_min(0).sqrt())
    return moments


def repair_batchnorm(
    merged: fx.GraphModule,
    original: Stats,
    batches: list[tuple[torch.Tensor, ...]],
    kept_of_norm: Mapping[str, torch.Tensor],
) -> None:
    """Change ``merged``'s BatchNorm statistics (in place) so that their normalised inputs have the
    moments they had before merging (``original``, from ``normalised_moments`` of the original model).

    ``kept_of_norm`` maps the BatchNorm of each site to its kept channels (other BatchNorms kept all
    theirs). ``merged`` must own its BatchNorm buffers (a fresh result of the pipeline).
    """
    after = normalised_moments(merged, batches)
    for name, (mean, std) in after.items():
        if name not in original:
            continue
        bn = merged.get_submodule(name)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        assert bn.running_mean is not None and bn.running_var is not None
        target_mean, target_std = original[name]
        if name in kept_of_norm:
            target_mean, target_std = target_mean[kept_of_norm[name]], target_std[kept_of_norm[name]]
        scale = torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
        # A channel that never varied on the batches says nothing about a change of scale.
        usable = (std > 0) & (target_std > 0)
        new_scale = torch.where(usable, scale * std / target_std.clamp_min(1e-300), scale)
        new_mean = bn.running_mean.to(torch.float64) + scale * mean - new_scale * target_mean
        dtype = bn.running_mean.dtype
        bn.running_mean = new_mean.to(dtype)
        bn.running_var = (new_scale.square() - bn.eps).clamp_min(0).to(dtype)
