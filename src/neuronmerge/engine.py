"""The public stages of a compression: capture -> groups -> decompose -> surgery -> verify.

``api.compress`` chains them; benchmarks and experiments may call them one by one (to time a stage,
or to try a decomposition of their own between ``groups`` and ``surgery``). Each stage returns values
and leaves the caller's model alone.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from neuronmerge import surgery as _surgery
from neuronmerge.capture import ExampleInputs, as_input_tuple, detach
from neuronmerge.capture import capture_with_outputs as _capture_with_outputs
from neuronmerge.errors import InvalidArgumentError, NeuronMergeError
from neuronmerge.graph.groups import find_groups
from neuronmerge.methods.base import GroupDecomposition, Inputs, Method
from neuronmerge.options import Options
from neuronmerge.types import Group, Skipped


def capture(model: nn.Module, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Trace ``model`` (a structural copy in eval mode) with shapes; refuse NaN or infinite tensors."""
    return capture_with_outputs(model, example_inputs)[0]


def capture_with_outputs(
    model: nn.Module, example_inputs: ExampleInputs
) -> tuple[fx.GraphModule, object]:
    """``capture``, and the model's outputs on the example inputs as the shape-recording forward
    computed them (``reference_outputs`` turns them into what the module returns)."""
    gm, outputs = _capture_with_outputs(model, as_input_tuple(example_inputs))
    _check_finite(gm)
    return gm, outputs


def reference_outputs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], recorded: object) -> object:
    """What ``gm(*inputs)`` returns, from the output values capture ``recorded``: those values
    themselves, except for a torch.export module, whose generated code regroups them (a pytree
    codegen), which is run instead."""
    if isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
        return run(gm, inputs)
    return recorded


def _check_finite(gm: fx.GraphModule) -> None:
    """Refuse NaN or infinite parameters or buffers (BatchNorm statistics) anywhere: merging would
    spread them through Z into the kept neurons and the readers, and the similarity scores would be
    meaningless."""
    tensors = [t.detach() for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()]
    # One fused norm over every tensor (a few kernel launches, not one per tensor, which on a network
    # of many small layers cost more than the norms) screens them all; only a non-finite total (NaN,
    # inf, or an overflow of finite values) pays for the exact elementwise test of each tensor.
    try:
        if not tensors or torch.isfinite(nn.utils.get_total_norm(tensors, foreach=True)):
            return
    except RuntimeError:  # a layout the fused kernel does not take (sparse, say): test each tensor
        pass
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor.detach()).all():
            module, _, leaf = name.rpartition(".")
            raise InvalidArgumentError(f"{module or '<model>'}: {leaf} holds NaN or infinite values")


def groups(
    graph_module: fx.GraphModule, options: Options, method: Method | None = None
) -> tuple[list[Group], list[Skipped]]:
    """The groups ``method`` (by default the one ``options`` select) will shrink, and every producer
    it leaves alone with the reason."""
    method = options.method_object() if method is None else method
    found, skipped = find_groups(graph_module)
    chosen: list[Group] = []
    for group in found:
        wanted = options.include is None or any(
            fnmatch.fnmatchcase(p, pattern) for p in group.producers for pattern in options.include
        )
        unwanted = options.exclude is not None and any(
            fnmatch.fnmatchcase(p, pattern) for p in group.producers for pattern in options.exclude
        )
        reason = "left out by include/exclude" if not wanted or unwanted else None
        reason = reason or _indivisible(group) or method.refusal(group, options)
        if reason is None:
            chosen.append(group)
        else:
            skipped += [Skipped(p, reason) for p in group.producers]
    return chosen, skipped


def _indivisible(group: Group) -> str | None:
    """Why ``group`` cannot lose a channel under any method: every block keeps as many channels, so
    blocks of one channel (a single channel, or a grouped layer reading one channel per group, as
    PiT's pooling conv does) could only lose them all."""
    if group.channels // group.blocks > 1:
        return None
    if group.blocks == 1:
        return "a single channel, which cannot be removed"
    return f"each of its {group.blocks} blocks (a grouped layer's groups) holds one channel"


def kept_counts(
    groups: Sequence[Group], ratio: float | Mapping[str, float], method: Method
) -> dict[str, int]:
    """How many channels each group keeps: one ``ratio`` for all, or a ratio per group name.

    The one place a kept count is decided (a budget planner passes a mapping of ratios).
    """
    counts = {}
    for group in groups:
        share = ratio if isinstance(ratio, (int, float)) else ratio[group.name]
        counts[group.name] = method.kept_count(group, share)
        if counts[group.name] < 1:
            raise InvalidArgumentError(
                f"ratio {share} keeps 0 of the {group.channels} channels of {group.name}; "
                "use a smaller ratio or exclude this layer"
            )
    return counts


def decompose(
    graph_module: fx.GraphModule,
    groups: Sequence[Group],
    keep: Mapping[str, int],
    options: Options,
    inputs: Inputs,
    method: Method | None = None,
) -> dict[str, GroupDecomposition]:
    """Every group's kept channels and Z per consumed tensor, by ``method`` (default: options')."""
    method = options.method_object() if method is None else method
    return method.decompose(graph_module, groups, keep, options, inputs)


def surgery(
    graph_module: fx.GraphModule,
    groups: Sequence[Group],
    decompositions: Mapping[str, GroupDecomposition],
    in_place: bool = False,
) -> fx.GraphModule:
    """The smaller model: ``graph_module`` resized by ``decompositions``, sharing nothing with the
    caller's model. ``graph_module`` itself is consumed (its layers are replaced). ``in_place``: the
    resized weights reuse the old weights' memory (``surgery.apply``), which the caller gives up."""
    owned = _surgery.apply(graph_module, list(groups), decompositions, in_place)
    return detach(graph_module, owned)


def run(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> object:
    """``module(*inputs)`` without gradients."""
    with torch.no_grad():
        return module(*inputs)


def output_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> object:
    """The original model's output shapes, as ``verify`` compares them, from capture's shape record.

    Reading them saves a forward pass of the full model (a fifth of a second for VGG-16 at 224 x 224);
    an output holding no tensor has no record, and is run instead, as are torch.export modules.
    """
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    # torch.export's modules rebuild their output structure in generated code (a pytree codegen):
    # the graph's own output is then not what the caller gets, so run those too.
    if "tensor_meta" not in output.meta or isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
        return _shapes(run(gm, inputs))
    return _shapes(output.meta["tensor_meta"])


def _shapes(output: object) -> object:
    if isinstance(output, (torch.Tensor, TensorMetadata)):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return [_shapes(item) for item in output]
    if isinstance(output, dict):
        return {key: _shapes(value) for key, value in output.items()}
    return type(output).__name__


def verify(
    small: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    expected_shapes: object,
    reference: object | None = None,
) -> float | None:
    """Run the compressed model; check its output shapes; with the original ``reference`` outputs,
    return the relative L2 change ``||small(x) - model(x)|| / ||model(x)||``.

    Without ``reference`` only shapes are compared, and where the inputs and outputs share a leading
    batch axis the first example alone is run first (a shrunken layer breaks on one example as on
    many, at a fraction of the cost); anything unexpected there, an error or another shape, is
    settled by the full run, so a model that is not batch-wise (a hard-coded batch size, a
    ``squeeze``) is checked as before.
    """
    if reference is None:
        single = _one_example(inputs, expected_shapes)
        if single is not None:
            try:
                if _shapes(run(small, single[0])) == single[1]:
                    return None
            except Exception:  # the full run below reports it, or finds it benign
                pass
    try:
        produced = run(small, inputs)
    except Exception as exc:  # a bug of ours, not the user's: say so plainly
        raise NeuronMergeError(f"the compressed model failed to run ({exc}); please report") from exc
    if _shapes(produced) != expected_shapes:
        raise NeuronMergeError("the compressed model's output shape changed; please report")
    return None if reference is None else relative_error(produced, reference)


def _one_example(
    inputs: tuple[torch.Tensor, ...], expected_shapes: object
) -> tuple[tuple[torch.Tensor, ...], object] | None:
    """The inputs cut to their first example and the output shapes that implies, where every input
    and every output tensor leads with the same batch size (more than one); else ``None``."""
    sizes = {int(t.shape[0]) if t.dim() else 0 for t in inputs}
    if len(sizes) != 1 or (batch := sizes.pop()) < 2:
        return None
    leading: set[int] = set()

    def cut(shapes: object) -> object:
        if isinstance(shapes, tuple):  # one tensor's shape
            leading.add(shapes[0] if shapes else 0)
            return (1, *shapes[1:])
        if isinstance(shapes, list):
            return [cut(item) for item in shapes]
        if isinstance(shapes, dict):
            return {key: cut(value) for key, value in shapes.items()}
        leading.add(0)  # a non-tensor output: nothing to say about its batch
        return shapes

    single = cut(expected_shapes)
    if leading != {batch}:
        return None
    return tuple(t[:1] for t in inputs), single


def _flat(output: object) -> torch.Tensor:
    """Every floating-point tensor of a (nested) model output, as one float64 vector."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.detach().flatten().double()
    if isinstance(output, dict):
        output = list(output.values())
    parts = [_flat(item) for item in output] if isinstance(output, (tuple, list)) else []
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def relative_error(produced: object, expected: object) -> float:
    """``||produced - expected|| / ||expected||`` over all floating outputs (0 when both are 0)."""
    got, want = _flat(produced), _flat(expected)
    scale = torch.linalg.vector_norm(want)
    change = torch.linalg.vector_norm(got - want)
    return float(change / scale) if scale > 0 else float(change)
