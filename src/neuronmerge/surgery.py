"""Surgery: apply each site's kept set and scaling matrix to the captured graph's layers.

For a site with decomposition (K, Z):

* producer: keep weight rows (and bias) ``[K]``; its BatchNorm keeps ``[K]`` of every per-channel
  tensor;
* every consumer: the input columns that carry the site's channels become ``W . Z``, computed as "copy
  the kept columns, then add ``s * column_i`` into its target column" (one gather and one index_add,
  proportional to the weight's size, never a dense product with Z);
* views on the path whose target shapes hold a literal channel count are rewritten.

A layer that is the consumer of one site and the producer of another gets both; row selection and
column mixing commute, so the order does not matter. Layers are updated inside the captured copy (never
the caller's model) and resized in place, so subclasses, hooks and attributes survive.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import fx, nn

from neuronmerge.decompose import Decomposition
from neuronmerge.sites import ConsumerSlice, Site


def _mix_columns(
    weight: torch.Tensor, slices: list[tuple[ConsumerSlice, Decomposition]]
) -> torch.Tensor:
    """Rebuild ``weight``'s input axis (dim 1) with each slice's channels merged by its Z."""
    pieces: list[torch.Tensor] = []
    cursor = 0
    for piece, dec in sorted(slices, key=lambda item: item[0].offset):
        if piece.offset < cursor:
            raise RuntimeError("overlapping channel slices on one consumer")
        pieces.append(weight[:, cursor : piece.offset])
        end = piece.offset + dec.channels * piece.block
        segment = weight[:, piece.offset : end]
        segment = segment.reshape(weight.shape[0], dec.channels, piece.block, *weight.shape[2:])
        mixed = segment[:, dec.kept].clone()
        merged = dec.merged()
        if merged.numel():
            scale = dec.scale[merged].to(weight.dtype)
            scale = scale.view(1, -1, *([1] * (segment.dim() - 2)))
            mixed.index_add_(1, dec.target[merged], segment[:, merged] * scale)
        pieces.append(mixed.reshape(weight.shape[0], -1, *weight.shape[2:]))
        cursor = end
    pieces.append(weight[:, cursor:])
    return torch.cat(pieces, dim=1)


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _resize_layer(
    module: nn.Module,
    kept: torch.Tensor | None,
    slices: list[tuple[ConsumerSlice, Decomposition]],
) -> None:
    """Select output rows ``kept`` and mix input columns per ``slices``, then fix size fields."""
    assert isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    with torch.no_grad():
        weight = module.weight.detach()
        if kept is not None:
            weight = weight[kept]
            if module.bias is not None:
                _set_parameter(module, "bias", module.bias.detach()[kept])
        if slices:
            weight = _mix_columns(weight, slices)
        _set_parameter(module, "weight", weight)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape[0], weight.shape[1]
    else:
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1]


def _resize_norm(bn: nn.Module, kept: torch.Tensor) -> None:
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        if bn.weight is not None:
            _set_parameter(bn, "weight", bn.weight.detach()[kept])
        if bn.bias is not None:
            _set_parameter(bn, "bias", bn.bias.detach()[kept])
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean = bn.running_mean[kept].clone()
        bn.running_var = bn.running_var[kept].clone()
    bn.num_features = int(kept.shape[0])


def _patch_reshape(node: fx.Node, dim: int, delta: int) -> None:
    """Shift the literal size at ``dim`` of a view/reshape node's target shape by ``delta``."""
    args = list(node.args)
    shape = args[1] if len(args) == 2 else None
    nested = isinstance(shape, (tuple, list))
    sizes = list(shape) if isinstance(shape, (tuple, list)) else args[1:]
    size = sizes[dim] if dim < len(sizes) else None
    if not isinstance(size, int) or size == -1:
        return  # computed at run time (x.size(0), -1): nothing stale to rewrite
    sizes[dim] = size + delta
    node.args = (args[0], tuple(sizes)) if nested else (args[0], *sizes)


def apply(
    graph_module: fx.GraphModule, sites: list[Site], decompositions: Mapping[str, Decomposition]
) -> fx.GraphModule:
    """Resize every layer touched by ``sites`` in ``graph_module`` (in place) and recompile it."""
    slices: dict[str, list[tuple[ConsumerSlice, Decomposition]]] = defaultdict(list)
    for site in sites:
        for piece in site.consumers:
            slices[piece.module].append((piece, decompositions[site.producer]))

    kept_of = {site.producer: decompositions[site.producer].kept for site in sites}
    for name in dict.fromkeys([*kept_of, *slices]):
        _resize_layer(graph_module.get_submodule(name), kept_of.get(name), slices.get(name, []))
    for site in sites:
        if site.norm is not None:
            _resize_norm(graph_module.get_submodule(site.norm), kept_of[site.producer])

    deltas: dict[tuple[str, int], int] = defaultdict(int)
    for site in sites:
        removed = site.channels - int(decompositions[site.producer].kept.shape[0])
        for fix in site.reshapes:
            deltas[(fix.node, fix.dim)] -= removed * fix.block
    nodes = {node.name: node for node in graph_module.graph.nodes}
    for (node_name, dim), delta in deltas.items():
        _patch_reshape(nodes[node_name], dim, delta)

    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module
