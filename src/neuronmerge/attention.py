"""The inner dims an ``nn.MultiheadAttention`` keeps when the width of its stream shrinks.

torch ties three widths of an ``nn.MultiheadAttention`` together: the embedding it reads (``in_proj``
columns), the embedding it writes (``out_proj`` rows) and the inner width of its queries, keys and
values (``num_heads * head_dim``). When its group keeps E' channels the inner width must become E'
too, so some inner dims go as well. A ``HeadPlan`` says which; ``surgery`` applies it.

* **Whole heads** when E' is a multiple of ``head_dim``: E' / head_dim heads survive and compute
  exactly what they did. A removed head whose query and key rows (with biases) equal a kept head's
  and whose value rows are ``s > 0`` times the kept head's has the same attention map and ``s``
  times its output, so ``out_proj``'s columns of the kept head gain ``s`` times the removed head's
  and nothing changes (``merge``; elsewhere the same norm-ratio approximation as for neurons).
* **Every head narrower** otherwise: each of the ``num_heads`` heads (fewer, the most that divide E',
  when E' / num_heads is no whole number) keeps the same number of dims, as torch needs. Query and
  key dims go in pairs (dim ``d`` adds ``q_d k_d`` to its head's scores; a pair scores
  ``|q row| |k row|``), value dims with their ``out_proj`` columns (``|v row| |out_proj column|``).
  An approximation even on duplicates.

The kept count of a group holding attention is a multiple of every head count (``Group.multiple``),
so one of the two always applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neuronmerge import criteria
from neuronmerge.decompose import Rows


@dataclass(frozen=True)
class HeadPlan:
    """The inner dims one attention keeps: ``qk`` for queries and keys, ``v`` for values and the
    ``out_proj`` columns (inner indices, head after head), and removed value dims folded into kept
    ones: ``out_proj`` column ``v_target[i]`` (a position in ``v``) gains ``v_scale[i]`` times the
    old column ``v_source[i]``."""

    num_heads: int
    qk: torch.Tensor
    v: torch.Tensor
    v_source: torch.Tensor
    v_target: torch.Tensor
    v_scale: torch.Tensor
    #: Whole heads folded into kept ones.
    merged_heads: int = 0


def head_layout(embed: int, heads: int, kept: int) -> tuple[int, int]:
    """``(num_heads, head_dim)`` of an attention of ``embed`` dims in ``heads`` heads narrowed to
    ``kept``: whole heads when ``kept`` is a multiple of the head width, else as many heads as
    divide ``kept`` into heads no wider than before."""
    width = embed // heads
    if kept % width == 0 and kept // width <= heads:
        return kept // width, width
    for count in range(heads, 0, -1):
        if kept % count == 0 and kept // count <= width:
            return count, kept // count
    raise ValueError(f"{kept} dims cannot be split into at most {heads} heads of {width}")


def projections(module: nn.MultiheadAttention) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, bias)`` of the query, key and value projections (zero biases where absent)."""
    if module._qkv_same_embed_dim:
        assert module.in_proj_weight is not None
        weights = list(module.in_proj_weight.detach().chunk(3))
    else:
        weights = [
            w.detach()
            for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            if w is not None
        ]
    e = module.embed_dim
    if module.in_proj_bias is not None:
        biases = list(module.in_proj_bias.detach().chunk(3))
    else:
        biases = [torch.zeros(e, dtype=weights[0].dtype)] * 3
    return list(zip(weights, biases, strict=True))


def head_rows(module: nn.MultiheadAttention) -> list[Rows]:
    """Per head, its query, key and value rows with their biases, flattened: three ``Rows``."""
    heads = module.num_heads
    return [Rows(torch.cat([w, b[:, None]], dim=1).reshape(heads, -1)) for w, b in projections(module)]


def head_pairs(
    rows: list[Rows], kept: torch.Tensor, threshold: float | None, tolerance: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's kept partner position (-1: dropped) and value scale, from its query, key and
    value ``rows``. A removed head merges only into a kept head whose query and key rows equal its
    own (within ``tolerance``, relative): their attention maps are then the same, and the removed
    head's output is the kept head's with its own value rows. It goes to the one whose value rows
    are the most parallel to its own (cosine at least ``threshold``), with the ratio of their norms
    as scale: exact where they are parallel, the paper's approximation elsewhere. Heads with other
    attention maps are dropped (merging them would mix two different maps)."""
    q, k, v = (r.dense() for r in rows)
    n = q.shape[0]
    is_kept = torch.zeros(n, dtype=torch.bool)
    is_kept[kept] = True
    removed = torch.nonzero(~is_kept).flatten()

    def equal(a: torch.Tensor) -> torch.Tensor:
        size = torch.linalg.vector_norm(a[kept], dim=1)
        return torch.cdist(a[removed], a[kept]) <= tolerance * size[None, :]

    norms = torch.linalg.vector_norm(v, dim=1)
    unit = v / torch.where(norms > 0, norms, 1)[:, None]
    cosine = (unit[removed] @ unit[kept].T).masked_fill(~(equal(q) & equal(k)), -torch.inf)
    cosine = cosine.masked_fill(norms[kept][None, :] == 0, -torch.inf)
    best, choice = cosine.max(dim=1)  # a group keeps at least one head
    accept = torch.isfinite(best) & (best >= (-1.0 if threshold is None else threshold))
    target = torch.full((n,), -1, dtype=torch.long)
    target[kept] = torch.arange(kept.shape[0])
    target[removed] = torch.where(accept, choice, -1)
    scale = torch.ones(n, dtype=v.dtype)
    ratio = norms[removed] / torch.where(norms[kept] > 0, norms[kept], 1)[choice]
    scale[removed] = torch.where(accept, ratio, 0)
    return target, scale


def _spans(heads: torch.Tensor, width: int) -> torch.Tensor:
    return (heads[:, None] * width + torch.arange(width)).flatten()


def whole_heads(
    module: nn.MultiheadAttention,
    kept: torch.Tensor,
    target: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> HeadPlan:
    """Keep heads ``kept``; with ``target`` (each head's kept partner position, -1: dropped) and
    ``scale`` (its value scale), fold removed heads' value columns into their partners'."""
    width = module.embed_dim // module.num_heads
    dims = _spans(kept, width)
    empty = torch.zeros(0, dtype=torch.long)
    sources, targets, scales = empty, empty, torch.zeros(0)
    merged = 0
    if target is not None and scale is not None:
        is_kept = torch.zeros(module.num_heads, dtype=torch.bool)
        is_kept[kept] = True
        folded = torch.nonzero((target >= 0) & ~is_kept).flatten()
        merged = int(folded.shape[0])
        sources = _spans(folded, width)
        targets = _spans(target[folded], width)
        scales = scale[folded].repeat_interleave(width)
    return HeadPlan(int(kept.shape[0]), dims, dims, sources, targets, scales, merged)


def narrower_heads(module: nn.MultiheadAttention, heads: int, width: int) -> HeadPlan:
    """``heads`` heads (the highest-scoring, by their rows' l1 norms) of ``width`` dims each, the
    dims chosen per head (see the module docstring)."""
    old = module.embed_dim // module.num_heads
    (wq, bq), (wk, bk), (wv, bv) = projections(module)
    whole = Rows.side_by_side(head_rows(module))
    chosen = criteria.select_kept(criteria.channel_scores(whole, "l1-norm"), heads)

    def norms(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.cat([w, b[:, None]], dim=1), dim=1)

    out = module.out_proj.weight.detach()
    pair_scores = (norms(wq, bq) * norms(wk, bk)).reshape(module.num_heads, old)
    value_scores = (norms(wv, bv) * torch.linalg.vector_norm(out, dim=0)).reshape(module.num_heads, old)

    def per_head(scores: torch.Tensor) -> torch.Tensor:
        dims = [criteria.select_kept(scores[h], width) + h * old for h in chosen.tolist()]
        return torch.cat(dims)

    empty = torch.zeros(0, dtype=torch.long)
    return HeadPlan(heads, per_head(pair_scores), per_head(value_scores), empty, empty, torch.zeros(0))


def pruned(module: nn.Module, kept: int, criterion: str) -> HeadPlan:
    """The plan for ``kept`` inner dims of attention ``module`` without merging: whole heads by
    ``criterion`` on their rows where ``head_layout`` allows, else narrower heads."""
    assert isinstance(module, nn.MultiheadAttention)
    heads, width = head_layout(module.embed_dim, module.num_heads, kept)
    if width == module.embed_dim // module.num_heads:
        whole = Rows.side_by_side(head_rows(module))
        return whole_heads(
            module, criteria.select_kept(criteria.channel_scores(whole, criterion), heads)
        )
    return narrower_heads(module, heads, width)
