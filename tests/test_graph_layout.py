"""The pure layout rules (``graph.layout``) and the op table (``graph.ops``), without any model."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from neuronmerge.graph import layout
from neuronmerge.graph.layout import Layout
from neuronmerge.graph.ops import OPS, lookup


@pytest.mark.parametrize(
    ("before", "after", "where", "expected"),
    [
        ((2, 6, 3, 3), (2, 54), Layout(1), Layout(1, 0, 9)),  # flatten a conv map: blocks of H*W
        ((2, 6, 3, 3), (2, 54), Layout(1, 2, 1), Layout(1, 18, 9)),  # after a concatenation
        ((2, 5, 7), (10, 7), Layout(2), Layout(1)),  # (B, T, C) -> (B*T, C): channels stay last
        ((2, 768, 14, 14), (2, 768, 196), Layout(1), Layout(1)),  # spatial axes merged
        ((2, 6), (2, 6, 1, 1), Layout(1), Layout(1)),  # unsqueeze
        ((2, 6, 4), (2, 3, 8), Layout(1), None),  # channels split across two axes
        ((2, 6, 4), (12, 4), Layout(1), None),  # batch and channels merged
    ],
)
def test_reshape_rule(
    before: tuple[int, ...], after: tuple[int, ...], where: Layout, expected: Layout | None
) -> None:
    assert layout.reshaped(before, after, where) == expected


def test_permute_transpose_reduce_pad_pool_cat_and_parameter_axes() -> None:
    assert layout.permuted(Layout(1), (0, 2, 3, 1)) == Layout(3)  # NCHW -> NHWC
    assert layout.permuted(Layout(3), (0, 3, 1, 2)) == Layout(1)
    assert layout.permuted(Layout(1, 0, 4), (0, 2, 1)) is None  # flattened blocks cannot move
    assert layout.transposed(Layout(2), 1, 2, 3) == Layout(1)
    assert layout.transposed(Layout(0), 1, 2, 3) == Layout(0)
    assert layout.reduced(Layout(1), 4, (2, 3), keepdim=False) == Layout(1)
    assert layout.reduced(Layout(3), 4, (1, 2), keepdim=False) == Layout(1)
    assert layout.reduced(Layout(1), 4, (1,), keepdim=True) is None
    assert layout.padded(Layout(1), 4, (1, 1, 1, 1)) and not layout.padded(Layout(1), 3, (1, 1, 2, 2))
    assert layout.pooled(Layout(1), 4, 2) and not layout.pooled(Layout(1), 3, 2)
    assert layout.concatenated(Layout(1, 3), 1, 4, 5) == Layout(1, 8)
    assert layout.concatenated(Layout(1), 2, 4, 5) is None
    assert layout.param_axis(Layout(1), 4, (6, 1, 1)) == 0  # ConvNeXt's layer scale
    assert layout.param_axis(Layout(2), 3, (6,)) == 0  # LayerScale on (B, T, C)
    assert layout.param_axis(Layout(1), 4, (6, 3, 1)) is None


def test_every_spelling_of_an_op_finds_its_one_row() -> None:
    class Spellings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x) + F.relu(x) + torch.relu(x) + x.relu() + x * x + x.view(-1).sum()

    graph = fx.symbolic_trace(Spellings()).graph
    modules = {"act": nn.ReLU()}
    found = {
        node.name: lookup(node, modules.get(str(node.target)))
        for node in graph.nodes
        if node.op not in ("placeholder", "output")
    }
    relu = next(op for op in OPS if op.name == "relu")
    assert [found[name] for name in ("act", "relu", "relu_1", "relu_2")] == [relu] * 4
    assert found["add"] is not None and found["add"].effect == "add"
    assert found["mul"] is not None and found["mul"].effect == "mul"
    assert found["view"] is not None and found["view"].effect == "layout"
    # One row per op: no function or method spelling appears in two rows.
    functions = [f for op in OPS for f in op.functions]
    methods = [m for op in OPS for m in op.methods]
    assert operator.add in functions
    assert len(functions) == len(set(map(id, functions))) and len(methods) == len(set(methods))


def test_index_rule() -> None:
    assert layout.indexed(Layout(2), 3, (slice(None), 0)) == Layout(1)  # ViT's class token
    assert layout.indexed(Layout(1), 4, (Ellipsis, slice(None, None, 2), slice(None, None, 2))) == (
        Layout(1)
    )
    assert layout.indexed(Layout(1), 4, (slice(None), None)) == Layout(2)
    assert layout.indexed(Layout(1), 4, (slice(None), slice(0, 3))) is None  # some channels
    assert layout.indexed(Layout(1), 2, (slice(None), 1)) is None
