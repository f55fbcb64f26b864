"""External peers for the sweeps: other libraries' data-free structured pruning, run as they ship.

Torch-Pruning (Fang et al., CVPR 2023, PyPI ``torch-pruning``) prunes by its own dependency graph and
group importance. For a fair row it is asked to remove the same number of channels from the same
layers that neuronmerge compresses (``plan``'s merge sites), so both end at the same widths and the
same parameter count; which channels go is Torch-Pruning's own choice (its magnitude importance,
aggregated over every layer coupled to the channel). No fine-tuning, like every other sweep row.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from neuronmerge.api import plan
from neuronmerge.criteria import kept_count
from neuronmerge.errors import InvalidArgumentError
from neuronmerge.lab import require

#: Torch-Pruning's magnitude importance with the l1 norm, the criterion of the paper's rows.
TORCH_PRUNING_NORM = 1


def torch_pruning_magnitude(model: nn.Module, example: Tensor, ratio: float) -> nn.Module:
    """A pruned deep copy of ``model``: Torch-Pruning's magnitude pruner on neuronmerge's sites.

    Each site keeps ``kept_count(channels, ratio)`` channels, exactly as ``neuronmerge.merge`` does;
    every other Linear/Conv is in Torch-Pruning's ``ignored_layers`` (its outputs are tied to a
    residual add or are the model's output). ``model`` itself is not modified.
    """
    tp = require("torch_pruning", "the Torch-Pruning peer row")

    sites = plan(model, example).sites
    pruned = copy.deepcopy(model).eval()
    producers = {p for site in sites for p in site.producers}
    ratios: dict[nn.Module, float] = {}
    for site in sites:
        keep = kept_count(site.channels, ratio)
        if keep < 1:
            raise InvalidArgumentError(
                f"ratio {ratio} keeps 0 of the {site.channels} channels of {site.producer}"
            )
        if keep < site.channels:
            # Torch-Pruning keeps int(n * (1 - r)) channels; half a channel of slack makes that
            # floor land on ``keep`` whatever the float rounding.
            # Every layer writing the group (a residual stream has several) gets the same ratio.
            for producer in site.producers:
                ratios[pruned.get_submodule(producer)] = 1 - (keep + 0.5) / site.channels
    if not ratios:
        return pruned
    ignored = [
        module
        for name, module in pruned.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and name not in producers
    ]
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        example,
        importance=tp.importance.MagnitudeImportance(p=TORCH_PRUNING_NORM),
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        ignored_layers=ignored,
    )
    pruner.step()
    return pruned.eval()
