"""The ``merge-ls`` method: covering kept sets and least-squares merges from activation moments.

Per site: measure the channels' mean and covariance where the consumers read them (``activations``),
keep the channels that best explain the others, weighted by how much the consumers read each one
(``criteria.covering_kept``), and write every removed channel as the least-squares combination of the
kept ones plus a constant (``decompose.least_squares``). Then the BatchNorm statistics of the result
are re-measured on the same batches (``remeasure_batchnorm``): merging shifts and shrinks what
downstream BatchNorms receive ("variance collapse"; Jordan et al. 2023, REPAIR; Wang et al. 2025,
model folding), so the statistics stored during training normalise the wrong distribution. On
synthetic probes this is data-free. The batches are synthetic probes made from the model alone
(``probes``; data-free, the default) or real unlabeled samples when the user has some (data-aware).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn

from neuronmerge import criteria, decompose
from neuronmerge.activations import site_moments
from neuronmerge.capture import ExampleInputs, as_input_tuple
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.probes import cached_probes
from neuronmerge.recalibrate import recalibrate_batchnorm
from neuronmerge.sites import Site

#: Eigenvalue floor of the least-squares solve, relative to the kept channels' mean variance. Chosen
#: on the validation split (``experiments/methods_validation.json``).
FLOOR = 1e-6


def consumer_energy(graph_module: fx.GraphModule, site: Site) -> torch.Tensor:
    """Per channel, the summed squared weights of every consumer column that reads it."""
    energy = torch.zeros(site.channels, dtype=torch.float64)
    for piece in site.consumers:
        layer = graph_module.get_submodule(piece.module)
        assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))
        weight = layer.weight.detach().to(torch.float64)
        columns = weight[:, piece.offset : piece.offset + site.channels * piece.block]
        columns = columns.reshape(weight.shape[0], site.channels, piece.block, -1)
        energy += columns.square().sum(dim=(0, 2, 3))
    return energy


def moment_batches(
    graph_module: fx.GraphModule,
    example: torch.Tensor,
    calibration: Iterable[ExampleInputs] | None,
    sites: list[Site],
) -> list[tuple[torch.Tensor, ...]]:
    """The batches ``merge-ls`` measures moments on: ``calibration`` when given, else the model's
    synthetic probes (``cached_probes``: made once per model), and none when no site needs them.
    """
    if not sites:
        return []
    if calibration is None:
        return cached_probes(graph_module, example)
    return [as_input_tuple(batch) for batch in calibration]


def decompositions(
    graph_module: fx.GraphModule,
    sites: list[Site],
    ratio: float,
    batches: list[tuple[torch.Tensor, ...]],
    floor: float = FLOOR,
) -> dict[str, decompose.Decomposition]:
    """The ``merge-ls`` decomposition of every site, from moments measured on ``batches``."""
    moments = site_moments(graph_module, sites, batches)
    result: dict[str, decompose.Decomposition] = {}
    for site in sites:
        keep = criteria.kept_count(site.channels, ratio)
        if keep < 1:
            raise InvalidArgumentError(
                f"ratio {ratio} keeps 0 of the {site.channels} channels of {site.producer}; "
                "use a smaller ratio or exclude this layer"
            )
        site_moment = moments[site.producer]
        kept = criteria.covering_kept(site_moment.cov, consumer_energy(graph_module, site), keep)
        result[site.producer] = decompose.least_squares(site_moment, kept, floor)
    return result


def remeasure_batchnorm(
    model: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]]
) -> fx.GraphModule:
    """``model`` with its BatchNorm statistics re-measured on ``batches`` (itself if it has no
    BatchNorm, or there are no batches: nothing was merged).

    Re-measuring beat correcting the stored statistics by the change the merge made on the same
    batches (``experiments/methods_validation.json``, vgg-fmnist).
    """
    if not batches or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    repaired = recalibrate_batchnorm(model, batches)
    assert isinstance(repaired, fx.GraphModule)
    return repaired
