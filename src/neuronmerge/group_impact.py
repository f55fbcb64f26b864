"""What cutting one group alone does to the whole model: its output error on the probes.

The allocation's error curves (``budget``, ``widths``) measure one layer's loss: the share of a
group's signal its merge cannot reproduce where the next layer reads it. How much of that reaches
the output depends on everything after (later layers may amplify it or wash it out, BatchNorm repair
may absorb part of it), and the curves of different groups are compared as if it did not. Here each
group that the allocation moves is cut on its own to its uniform width, every other group left whole,
and the compressed model's outputs on ``merge-ls``'s probes are compared with the dense model's
(``allocation_check.probe_errors``). ``budget.rescaled`` then scales that group's curve so that its
value at the uniform width equals this measured output error: the allocation then trades whole-model
error between groups, with the curve's shape (how the loss grows with fewer channels) kept from the
layer's own measure.

Cost: one surgery, BatchNorm repair and forward pass on the probes per measured group, from one
decomposition of all of them (the least-squares merge of a group does not depend on the others');
0.5-1.1 s on resnet-fmnist (six or seven groups).

Measured, and off (``ENABLED``): on the validation split of the four models trained here
(``experiments/budget_choice.py``, ``.json``, candidates ``p0.05``-``p0.3``) the rescaled curves did
worse than the layer's own. Alone, band 0.2: +1.319 points over uniform widths on average against
+1.426; under the check on the probes (1.5 standard errors): +1.607 against +1.807, with
resnet-fmnist at 20% and 30% of the parameters kept further below uniform (-0.84 and -1.16 against
0.00 and -0.58), the cells it was meant to fix. Within a trust band the band binds more than the
curves' scale (at resnet-fmnist 30% bands 0.05 and 0.1 give the same widths either way), and where
the scale moved widths the probes' view of the whole model was no better a guide than one layer's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from torch import fx

from neuronmerge import allocation_check, engine
from neuronmerge.lsq import MeasuredMoments
from neuronmerge.methods.base import GroupDecomposition
from neuronmerge.types import Group

#: Whether ``merge-ls`` rescales its curves by each group's measured output error before
#: allocating under a target (``api._checked_allocation``).
ENABLED = False


def output_errors(
    graph_module: fx.GraphModule,
    groups: Sequence[Group],
    decompositions: Mapping[str, GroupDecomposition],
    source: MeasuredMoments,
) -> dict[str, float]:
    """Per group of ``groups``: the mean probe error (``allocation_check.probe_errors`` on
    ``source.batches``) of ``graph_module`` with only that group cut as ``decompositions`` says and
    its BatchNorm statistics repaired as ``source`` repairs them. ``graph_module`` is not changed."""
    dense = allocation_check.outputs(graph_module, source.batches)
    errors = {}
    for group in groups:
        alone = {group.name: decompositions[group.name]}
        small = engine.surgery(copy.deepcopy(graph_module), [group], alone)
        small = source.repair(small, [group], alone)
        produced = allocation_check.outputs(small, source.batches)
        errors[group.name] = float(allocation_check.probe_errors(produced, dense).mean())
    return errors
