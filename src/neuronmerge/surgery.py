"""Surgery: apply each group's kept channels and scaling matrices to the captured graph's layers.

For a group with kept channels K and a Z per consumed tensor:

* every producer keeps weight rows (and bias) ``[K]``;
* every per-channel tensor of the group (BatchNorm anywhere on the path, depthwise conv weights,
  PReLU slopes, LayerScale parameters, LayerNorm affine) keeps the entries ``[K]`` of its slice;
* every consumer: the input columns that carry the group's channels become ``W . Z`` with the Z of
  the tensor it reads, computed as "copy the kept columns, then add ``s * column_i`` into its target
  column" (one gather, of rows and columns together, and one index_add: proportional to the new
  weight's size, never a dense product with Z); a dense Z (``least_squares``) is one matrix product
  over the channel axis instead;
* a Z's ``shift`` (constant activations credited to removed channels) becomes a constant added to
  each consumer's output: into its bias, or, for a bias-free layer read only by a BatchNorm,
  subtracted from that BatchNorm's running mean (the same function, and the architecture unchanged);
  a bias-free layer with no such BatchNorm gets a bias;
* literal sizes on the path (``x.view(-1, 120)``, ``F.layer_norm(x, (C,))``) are rewritten.

A layer that is the consumer of one group and the producer of another gets both; row selection and
column mixing commute, so the order does not matter. The captured graph shares its layers with the
caller's model, so a touched layer is never written to: it is replaced in the graph by a new instance
(a shallow copy with its own parameter and buffer tables, so subclasses and attributes survive)
holding the new tensors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx, nn

from neuronmerge.attention import HeadPlan, projections
from neuronmerge.capture import structural_copy
from neuronmerge.decompose import Decomposition
from neuronmerge.graph.ops import CONVS, LAYERS
from neuronmerge.methods.base import GroupDecomposition
from neuronmerge.types import ConsumerSlice, Group, ParamSlice

#: Bytes of a layer's kept rows up to which ``_resized_weight`` copies them out first (then takes
#: the columns from the copy) rather than taking rows and columns in one indexing operation.
_TWO_STEP_GATHER_BYTES = 2**20

#: Per decomposition (by id, within one ``apply``): its merged channels, their targets and scales.
_Merges = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _merges_of(dec: Decomposition, cache: _Merges) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dec``'s merged channels with their targets and scales, computed once per decomposition (a
    residual stream's is read by every layer adding into it)."""
    found = cache.get(id(dec))
    if found is None:
        merged = dec.merged()
        found = cache[id(dec)] = (merged, dec.target[merged], dec.scale[merged])
    return found


def _resized_weight(
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    slices: list[tuple[ConsumerSlice, Decomposition]],
    cache: _Merges,
) -> torch.Tensor:
    """``weight`` with output rows ``rows`` and its input axis (dim 1) merged by each slice's Z.

    The kept rows and columns are gathered in one indexing operation, so the new weight is written
    once and no intermediate of the layer's size exists; the merged columns are then added in scaled.
    Columns are indexed in groups (the largest size dividing every slice's offset and block: the 49
    columns of one VGG channel after a 7 x 7 flatten), so each index moves a contiguous run.
    """
    if not slices:
        assert rows is not None
        return weight.index_select(0, rows)
    width = weight.shape[1]
    ordered = sorted(slices, key=lambda item: item[0].offset)
    group = math.gcd(width, *(piece.offset for piece, _ in ordered), *(p.block for p, _ in ordered))
    grouped = weight.reshape(weight.shape[0], width // group, group, *weight.shape[2:])
    columns: list[torch.Tensor] = []
    merges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    cursor = written = 0  # in groups: read position in ``weight``, write position in the result
    for piece, dec in ordered:
        start, per = piece.offset // group, piece.block // group
        if start < cursor:
            raise RuntimeError("overlapping channel slices on one consumer")
        if start > cursor:
            columns.append(torch.arange(cursor, start))
        written += start - cursor
        merged, target, scale = _merges_of(dec, cache)
        if per == 1:  # one index per channel (the common case): the decomposition's own indices
            columns.append(dec.kept + start if start else dec.kept)
            if merged.numel():
                merges.append((merged + start, target + written, scale))
        else:
            within = torch.arange(per)
            columns.append((start + dec.kept[:, None] * per + within).flatten())
            if merged.numel():
                source = (start + merged[:, None] * per + within).flatten()
                spread = (written + target[:, None] * per + within).flatten()
                merges.append((source, spread, scale.repeat_interleave(per)))
        written += dec.kept.shape[0] * per
        cursor = start + dec.channels * per
    if cursor < width // group:
        columns.append(torch.arange(cursor, width // group))
    keep = columns[0] if len(columns) == 1 else torch.cat(columns)
    # Rows, then columns, by two row copies (``index_select``) where the kept rows are small: the
    # general index kernel that takes both at once costs several times more per call, which on a
    # network of many small layers is most of the surgery. A large layer is still written once.
    narrow = rows is not None and rows.shape[0] * grouped[0].nbytes <= _TWO_STEP_GATHER_BYTES
    picked = grouped.index_select(0, rows) if narrow and rows is not None else grouped

    def gather(cols: torch.Tensor) -> torch.Tensor:
        if rows is None or narrow:
            return picked.index_select(1, cols)
        return grouped[rows[:, None], cols]

    new = gather(keep)
    for source, target, scale in merges:
        scaled = gather(source).mul_(scale.to(weight.dtype).view(1, -1, *([1] * (grouped.dim() - 2))))
        new.index_add_(1, target, scaled)
    return new.reshape(new.shape[0], -1, *weight.shape[2:])


def _mix_columns(
    weight: torch.Tensor, slices: list[tuple[ConsumerSlice, Decomposition]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rebuild ``weight``'s input axis (dim 1) with each slice's channels merged by its Z.

    Also returns the constant each output row gains from the slices' ``shift`` (``None`` if none).
    """
    pieces: list[torch.Tensor] = []
    offset_out: torch.Tensor | None = None
    cursor = 0
    for piece, dec in sorted(slices, key=lambda item: item[0].offset):
        if piece.offset < cursor:
            raise RuntimeError("overlapping channel slices on one consumer")
        if piece.offset > cursor:
            pieces.append(weight[:, cursor : piece.offset])
        end = piece.offset + dec.channels * piece.block
        segment = weight[:, piece.offset : end]
        # Z's rows: channels, or each channel's columns one by one (``dec.width``: a head's dims)
        fitted = dec.channels * dec.width
        segment = segment.reshape(weight.shape[0], fitted, piece.block // dec.width, *weight.shape[2:])
        if dec.shift is not None:
            per_channel = dec.shift.to(weight.dtype).view(1, -1, *([1] * (segment.dim() - 2)))
            constant = (segment * per_channel).flatten(1).sum(dim=1)
            offset_out = constant if offset_out is None else offset_out + constant
        if dec.mixing is not None:
            mixed = (segment.movedim(1, -1) @ dec.mixing.to(weight.dtype)).movedim(-1, 1)
        else:
            mixed = segment[:, dec.kept]  # advanced indexing: a new tensor, ours to write
            merged = dec.merged()
            if merged.numel():
                scale = dec.scale[merged].to(weight.dtype).view(1, -1, *([1] * (segment.dim() - 2)))
                mixed.index_add_(1, dec.target[merged], segment[:, merged].mul_(scale))
        pieces.append(mixed.reshape(weight.shape[0], -1, *weight.shape[2:]))
        cursor = end
    if cursor < weight.shape[1]:
        pieces.append(weight[:, cursor:])
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)), offset_out


def _grouped_columns(
    weight: torch.Tensor, groups: int, dec: Decomposition
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A grouped conv's input columns merged by a block-diagonal Z (each conv group reads its own
    block of channels, with its own local columns); also the constant its outputs gain from the
    decomposition's shift."""
    out, local = weight.shape[0], weight.shape[1]
    z = dec.matrix().to(weight.dtype)
    k = z.shape[1] // groups
    blocks = weight.reshape(groups, out // groups, local, -1)
    diagonal = torch.stack([z[g * local : (g + 1) * local, g * k : (g + 1) * k] for g in range(groups)])
    new = torch.einsum("gons,gnk->goks", blocks, diagonal).reshape(out, k, *weight.shape[2:])
    if dec.shift is None:
        return new, None
    shift = dec.shift.to(weight.dtype).view(groups, 1, local, 1)
    return new, (blocks * shift).sum(dim=(2, 3)).reshape(out)


def _parameter(old: torch.Tensor | None, value: torch.Tensor) -> nn.Parameter:
    requires_grad = True if old is None else old.requires_grad
    return nn.Parameter(value.contiguous(), requires_grad=requires_grad)


def _put(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Store a parameter or buffer straight into ``module``'s own table.

    ``structural_copy`` gave the new layer tables of its own, so ``nn.Module.__setattr__``'s checks
    have nothing to protect here; on a network of many small layers they are a large part of the
    surgery's time.
    """
    if isinstance(value, nn.Parameter):
        module._parameters[name] = value
    else:
        module._buffers[name] = value


#: Bytes of new weight rows built at once when a layer is resized over its own memory.
_IN_PLACE_BLOCK_BYTES = 8 * 2**20

#: Builds the new weight's rows for some of the old weight's rows, and the constant those output
#: rows gain (``None``: none).
RowBuilder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _over_itself(
    weight: torch.Tensor, kept: torch.Tensor | None, build: RowBuilder
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``build`` applied to all output rows, a block of rows at a time, each block written over
    ``weight``'s own memory: no second weight-sized tensor ever exists (``apply``'s ``in_place``).

    Safe because the output rows are the old rows ``kept`` (increasing, so old row ``kept[i] >= i``)
    and no longer than the old ones: block ``i..j`` lands in the memory of old rows up to ``j``, whose
    unread successors start after it. Returns ``None`` (nothing written) where that does not hold.
    """
    if not weight.is_contiguous():
        return None
    rows = torch.arange(weight.shape[0]) if kept is None else kept
    flat = weight.view(-1)
    old_row = flat.shape[0] // max(1, weight.shape[0])
    step = max(1, _IN_PLACE_BLOCK_BYTES // max(1, old_row * weight.element_size()))
    constants: list[torch.Tensor] = []
    shape: tuple[int, ...] = ()
    for start in range(0, rows.shape[0], step):
        piece, constant = build(rows[start : start + step])
        new_row = piece[0].numel()
        if new_row > old_row:
            assert start == 0, "rows of one layer have one size"
            return None
        shape = tuple(piece.shape[1:])
        flat[start * new_row : start * new_row + piece.numel()].copy_(piece.reshape(-1))
        if constant is not None:
            constants.append(constant)
    new_row = 1
    for size in shape:
        new_row *= size
    new = flat[: rows.shape[0] * new_row].view(rows.shape[0], *shape)
    return new, (torch.cat(constants) if constants else None)


def _resized_layer(
    module: nn.Module,
    kept: torch.Tensor | None,
    slices: list[tuple[ConsumerSlice, Decomposition]],
    cache: _Merges,
    in_place: bool = False,
) -> tuple[nn.Module, torch.Tensor | None]:
    """A new layer: output rows ``kept`` and input columns mixed per ``slices``.

    Also returns the constant its outputs must gain (from the slices' shifts) when the layer has no
    bias to put it in; ``apply`` finds it a place. ``in_place``: the new weight is written over the
    old one's memory where it can be (``_over_itself``), which the old layer cannot use afterwards.
    """
    assert isinstance(module, LAYERS)
    new = structural_copy(module)
    constant = None
    old = module.weight.detach()
    mixed = any(dec.mixing is not None or dec.shift is not None for _, dec in slices)
    build: RowBuilder
    if mixed:
        build = lambda rows: _mix_columns(old.index_select(0, rows), slices)  # noqa: E731
    elif slices:
        build = lambda rows: (_resized_weight(old, rows, slices, cache), None)  # noqa: E731
    else:
        build = lambda rows: (old.index_select(0, rows), None)  # noqa: E731
    grouped = isinstance(module, CONVS) and module.groups > 1 and slices
    done = _over_itself(old, kept, build) if in_place and not grouped else None
    if done is not None:
        weight, constant = done
    elif grouped:
        assert isinstance(module, CONVS)
        (_, dec), *others = slices
        assert not others, "a grouped conv reads one group"
        weight, constant = _grouped_columns(old if kept is None else old[kept], module.groups, dec)
    elif mixed:
        weight, constant = _mix_columns(old if kept is None else old[kept], slices)
    else:  # one-positive-entry Z: the single gather of ``_resized_weight``
        weight = _resized_weight(old, kept, slices, cache)
    if module.bias is not None and (kept is not None or constant is not None):
        bias = module.bias.detach() if kept is None else module.bias.detach()[kept]
        if constant is not None:
            bias, constant = bias + constant, None
        _put(new, "bias", _parameter(module.bias, bias))
    _put(new, "weight", _parameter(module.weight, weight))
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = weight.shape[0], weight.shape[1]
    else:
        assert isinstance(new, CONVS)
        new.out_channels, new.in_channels = weight.shape[0], weight.shape[1] * new.groups
    return new, constant


def _resized_attention(
    module: nn.MultiheadAttention,
    rows: torch.Tensor | None,
    slices: list[tuple[ConsumerSlice, Decomposition]],
    plan: HeadPlan,
) -> nn.MultiheadAttention:
    """A new ``nn.MultiheadAttention``: ``out_proj`` rows ``rows``, query (and key and value, when
    packed) input columns merged by the Z of the tensor they read, and the inner dims of ``plan``
    (see ``attention``): query/key rows ``plan.qk``, value rows and ``out_proj`` columns ``plan.v``,
    removed value columns added in scaled."""
    new = structural_copy(module)
    assert isinstance(new, nn.MultiheadAttention)
    (wq, bq), (wk, bk), (wv, bv) = projections(module)
    weights = [wq[plan.qk], wk[plan.qk], wv[plan.v]]
    biases = [bq[plan.qk], bk[plan.qk], bv[plan.v]]
    packed = module._qkv_same_embed_dim
    if slices:
        (piece, dec), *others = slices
        assert not others, "one tensor feeds the query, key and value"
        read = 3 if packed else 1
        stacked = torch.cat(weights[:read])
        mixed, constant = _mix_columns(stacked, [(piece, dec)])
        if constant is not None:
            bias = torch.cat(biases[:read]) + constant
            biases[:read] = list(bias.split([w.shape[0] for w in weights[:read]]))
        weights[:read] = list(mixed.split([w.shape[0] for w in weights[:read]]))
    if packed:
        _put(new, "in_proj_weight", _parameter(module.in_proj_weight, torch.cat(weights)))
    else:
        for name, weight in zip(("q", "k", "v"), weights, strict=True):
            _put(
                new,
                f"{name}_proj_weight",
                _parameter(getattr(module, f"{name}_proj_weight"), weight),
            )
    if module.in_proj_bias is not None:
        _put(new, "in_proj_bias", _parameter(module.in_proj_bias, torch.cat(biases)))
    for name, index in (("bias_k", plan.qk), ("bias_v", plan.v)):
        old = getattr(module, name)
        if old is not None:
            _put(new, name, _parameter(old, old.detach()[..., index]))
    out = module.out_proj
    weight = out.weight.detach() if rows is None else out.weight.detach()[rows]
    columns = weight[:, plan.v]
    if plan.v_source.numel():
        scaled = weight[:, plan.v_source] * plan.v_scale.to(weight.dtype)
        columns.index_add_(1, plan.v_target, scaled)
    projection = structural_copy(out)
    assert isinstance(projection, nn.Linear)
    _put(projection, "weight", _parameter(out.weight, columns))
    if out.bias is not None and rows is not None:
        _put(projection, "bias", _parameter(out.bias, out.bias.detach()[rows]))
    projection.out_features, projection.in_features = columns.shape
    new._modules["out_proj"] = projection
    width = int(plan.qk.shape[0])
    new.embed_dim, new.num_heads, new.head_dim = width, plan.num_heads, width // plan.num_heads
    if packed:
        new.kdim = new.vdim = width
    return new


def _only_reader_norm(graph_module: fx.GraphModule, name: str) -> str | None:
    """The BatchNorm that alone reads layer ``name``'s output and reads nothing else, if any."""
    node = next(n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == name)
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    reader = users[0]
    target = str(reader.target)
    if not isinstance(graph_module.get_submodule(target), nn.modules.batchnorm._BatchNorm):
        return None
    calls = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == target]
    return target if len(calls) == 1 else None


def _absorb_constant(
    graph_module: fx.GraphModule, name: str, constant: torch.Tensor
) -> list[torch.Tensor]:
    """Add ``constant`` to the outputs of the bias-free layer ``name`` (see the module docstring)."""
    norm_name = _only_reader_norm(graph_module, name)
    if norm_name is not None:
        bn = graph_module.get_submodule(norm_name)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
        new_bn = structural_copy(bn)
        new_bn.running_mean = bn.running_mean - constant.to(bn.running_mean.dtype)
        return _install(graph_module, norm_name, new_bn)
    layer = graph_module.get_submodule(name)
    assert isinstance(layer, LAYERS)
    new = structural_copy(layer)
    new.bias = nn.Parameter(constant.clone(), requires_grad=layer.weight.requires_grad)
    return _install(graph_module, name, new)


def _kept_index(length: int, pieces: list[tuple[ParamSlice, torch.Tensor, int]]) -> torch.Tensor:
    """Indices along an axis of ``length`` that survive: outside every piece all, inside a piece
    ``offset + kept*block ...`` (pieces of several groups can share a tensor: a BatchNorm after a
    concatenation)."""
    if len(pieces) == 1:
        piece, kept, channels = pieces[0]
        if piece.offset == 0 and piece.block == 1 and channels == length:
            return kept  # the whole axis is the group's: its kept channels (the common case)
    keep = torch.ones(length, dtype=torch.bool)
    for piece, kept, channels in pieces:
        within = torch.arange(piece.block)
        span = piece.offset + torch.arange(channels * piece.block)
        keep[span] = False
        keep[(piece.offset + kept[:, None] * piece.block + within).flatten()] = True
    return torch.nonzero(keep).flatten()


def kept_channels(
    groups: Sequence[Group],
    decompositions: Mapping[str, GroupDecomposition],
    lengths: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """Per whole per-channel module that ``apply`` slices (a BatchNorm, say) and whose original
    channel count ``lengths`` gives: the original indices of the channels it keeps."""
    pieces: dict[str, list[tuple[ParamSlice, torch.Tensor, int]]] = defaultdict(list)
    for group in groups:
        for param in group.params:
            if param.name == "*" and param.owner in lengths:
                pieces[param.owner].append((param, decompositions[group.name].kept, group.channels))
    return {owner: _kept_index(lengths[owner], parts) for owner, parts in pieces.items()}


def _sliced(tensor: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    value = tensor.detach().index_select(axis, index)
    if isinstance(tensor, nn.Parameter):
        return _parameter(tensor, value)
    return value


def _channel_count(module: nn.Module) -> int:
    """How many channels a per-channel module holds."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    assert isinstance(module, CONVS)
    return module.out_channels


def _sliced_module(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """A new per-channel module (BatchNorm, depthwise conv, LayerNorm, PReLU) keeping ``index``."""
    new = structural_copy(module)
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is None or tensor.dim() == 0 or name == "num_batches_tracked":
            continue
        _put(new, name, _sliced(tensor, 0, index))
    kept = int(index.shape[0])
    if isinstance(new, nn.modules.batchnorm._BatchNorm):
        new.num_features = kept
    elif isinstance(new, CONVS):
        new.in_channels = new.out_channels = new.groups = kept
    elif isinstance(new, nn.LayerNorm):
        new.normalized_shape = (kept,)
    elif isinstance(new, nn.PReLU):
        new.num_parameters = kept
    return new


def _install(graph_module: fx.GraphModule, name: str, module: nn.Module) -> list[torch.Tensor]:
    """Put ``module`` at path ``name`` in the graph module, in place of the (shared) layer there.

    Returns the tensors that ``module`` created; tensors it still shares with the old layer (an
    untouched bias, say) are not returned, so that ``capture.detach`` copies them.
    """
    parent, _, leaf = name.rpartition(".")
    owner = graph_module.get_submodule(parent) if parent else graph_module
    old = getattr(owner, leaf)
    shared = {id(t) for t in [*old._parameters.values(), *old._buffers.values()] if t is not None}
    if leaf in owner._modules:
        owner._modules[leaf] = module  # what ``setattr`` does for a child module, without its checks
    else:
        setattr(owner, leaf, module)
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return [t for t in tensors if t is not None and id(t) not in shared]


def _patch_reshape(node: fx.Node, dim: int, delta: int) -> None:
    """Shift the literal size at ``dim`` of a view/reshape node's target shape by ``delta``."""
    key = next((k for k in ("shape", "size") if k in node.kwargs), None)
    if key is not None:  # torch.reshape(x, shape=...) / x.view(size=...)
        sizes = list(node.kwargs[key])  # type: ignore[arg-type]
        if dim < len(sizes) and isinstance(sizes[dim], int) and sizes[dim] != -1:
            sizes[dim] += delta
            node.kwargs = {**node.kwargs, key: tuple(sizes)}
        return
    args = list(node.args)
    shape = args[1] if len(args) == 2 else None
    nested = isinstance(shape, (tuple, list))
    sizes = list(shape) if isinstance(shape, (tuple, list)) else args[1:]
    size = sizes[dim] if dim < len(sizes) else None
    if not isinstance(size, int) or size == -1:
        return  # computed at run time (x.size(0), -1): nothing stale to rewrite
    sizes[dim] = size + delta
    node.args = (args[0], tuple(sizes)) if nested else (args[0], *sizes)


def _patch_literal(node: fx.Node, key: str | int, element: int, delta: int) -> None:
    """Shift a literal size in ``node``'s arguments: the target shape of a view/reshape
    (``key == "shape"``, ``element`` the axis) or element ``element`` of positional argument
    ``key`` (``F.layer_norm``'s normalized_shape)."""
    if key == "shape":
        _patch_reshape(node, element, delta)
        return
    assert isinstance(key, int)
    args = list(node.args)
    sizes = list(args[key])  # type: ignore[arg-type]
    sizes[element] += delta
    args[key] = tuple(sizes)
    node.args = tuple(args)


def _shared_storages(graph_module: fx.GraphModule) -> set[int]:
    """Storages that more than one parameter or buffer of ``graph_module`` uses (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    named = [
        *graph_module.named_parameters(remove_duplicate=False),
        *graph_module.named_buffers(remove_duplicate=False),
    ]
    for _, tensor in named:
        pointer = tensor.untyped_storage().data_ptr()
        (shared if pointer in seen else seen).add(pointer)
    return shared


def apply(
    graph_module: fx.GraphModule,
    groups: list[Group],
    decompositions: Mapping[str, GroupDecomposition],
    in_place: bool = False,
) -> list[torch.Tensor]:
    """Replace every layer and parameter touched by ``groups`` in ``graph_module`` by a resized one.

    The generated code looks layers up by name when it runs, so it is regenerated (milliseconds of
    Python code generation) only when a literal size was rewritten.

    ``in_place``: a resized Linear or conv weight is written over the old weight's memory (block by
    block), so a layer never exists twice; the old tensors, shared with the traced model, are then
    garbage. Only for a caller that owns the model and drops it (streaming a checkpoint); a weight
    that two layers share is still copied.

    Returns the tensors of the new layers (``capture.detach`` moves them to the result as they are).
    """
    # One no-grad region for all the layers (entering one per layer cost more than small layers'
    # arithmetic): the new weights are plain tensors, wrapped as parameters afterwards.
    with torch.no_grad():
        return _apply(graph_module, groups, decompositions, in_place)


def _apply(
    graph_module: fx.GraphModule,
    groups: list[Group],
    decompositions: Mapping[str, GroupDecomposition],
    in_place: bool,
) -> list[torch.Tensor]:
    """``apply`` inside its no-grad region."""
    slices: dict[str, list[tuple[ConsumerSlice, Decomposition]]] = defaultdict(list)
    kept_of: dict[str, torch.Tensor] = {}
    pieces: dict[tuple[str, str], list[tuple[ParamSlice, torch.Tensor, int]]] = defaultdict(list)
    plans: dict[str, HeadPlan] = {}
    for group in groups:
        dec = decompositions[group.name]
        for piece in group.consumers:
            slices[piece.module].append((piece, dec.at[piece.tensor]))
        for producer in group.producers:
            block = group.rows_per_channel(producer)
            rows = (
                dec.kept if block == 1 else (dec.kept[:, None] * block + torch.arange(block)).flatten()
            )
            kept_of[producer] = rows
        for param in group.params:
            pieces[(param.owner, param.name)].append((param, dec.kept, group.channels))
        plans.update(dec.heads)

    owned: list[torch.Tensor] = []
    for name, plan in plans.items():
        module = graph_module.get_submodule(name)
        assert isinstance(module, nn.MultiheadAttention)
        out_rows = kept_of.pop(f"{name}.out_proj") if f"{name}.out_proj" in kept_of else None
        owned += _install(
            graph_module, name, _resized_attention(module, out_rows, slices.pop(name, []), plan)
        )
        owned += [*graph_module.get_submodule(f"{name}.out_proj").parameters(recurse=False)]
    constants: dict[str, torch.Tensor] = {}
    shared = _shared_storages(graph_module) if in_place else set()
    cache: _Merges = {}
    for name in dict.fromkeys([*kept_of, *slices]):
        module = graph_module.get_submodule(name)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        own = in_place and weight.untyped_storage().data_ptr() not in shared
        layer, constant = _resized_layer(module, kept_of.get(name), slices.get(name, []), cache, own)
        owned += _install(graph_module, name, layer)
        if constant is not None:
            constants[name] = constant
    for (owner, name), parts in pieces.items():
        module = graph_module.get_submodule(owner)
        if name == "*":
            new = _sliced_module(module, _kept_index(_channel_count(module), parts))
            owned += _install(graph_module, owner, new)
            continue
        # A named parameter (LayerScale, PReLU slopes): the module object is the capture's own
        # (``capture.structural_copy``), only the tensor is shared, so its table can take the new one.
        tensor = getattr(module, name)
        axis = parts[0][0].axis
        index = _kept_index(tensor.shape[axis], parts)
        value = _sliced(tensor, axis, index)
        _put(module, name, value)
        owned.append(value)
        if isinstance(module, nn.PReLU):
            module.num_parameters = int(index.shape[0])
    for name, constant in constants.items():
        owned += _absorb_constant(graph_module, name, constant)

    deltas: dict[tuple[str, str | int, int], int] = defaultdict(int)
    for group in groups:
        removed = group.channels - int(decompositions[group.name].kept.shape[0])
        for fix in group.literals:
            deltas[(fix.node, fix.key, fix.element)] -= removed * fix.block
    nodes = {node.name: node for node in graph_module.graph.nodes}
    for (node_name, key, element), delta in deltas.items():
        _patch_literal(nodes[node_name], key, element, delta)
    if deltas:
        graph_module.graph.lint()
        graph_module.recompile()
    return owned
