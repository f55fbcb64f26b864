"""neuronmerge on the torchvision architectures of ``benchmarks/reach.py``, with random weights.

Every architecture is compressed at ratio 0.5 with its output layer left alone; the result must run on
a batch it never saw with the output shape of the original, must be smaller, and the caller's model
must be bit-identical afterwards. ResNets with planted exact duplicates (every channel group of the
network carries them: the blocks' inner layers and every tensor of each residual stream) must merge
to the same function, where pruning the same channels must not.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from conftest import reach
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import neuronmerge as nm
from tests.builders import compress_announced

#: name -> (input side, constructor keyword arguments): the architectures of benchmarks/reach.py.
ZOO: dict[str, tuple[int, dict[str, Any]]] = reach().MODELS


def build(name: str, seed: int = 0) -> nn.Module:
    side, kwargs = ZOO[name]
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def example(name: str, batch: int, seed: int) -> torch.Tensor:
    side = ZOO[name][0]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def output_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The last Linear/Conv the forward calls: the layer that writes the logits."""
    called: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return called[-1]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("name", list(ZOO))
def test_compress_keeps_shape_and_input_and_shrinks(name: str) -> None:
    model = build(name)
    x = example(name, 1, seed=1)
    head = output_layer(model, x)
    before = state(model)
    result = compress_announced(model, x, 0.5, approximate=True, exclude=[head])
    assert_untouched(model, before)

    fresh = example(name, 2, seed=2)  # another batch size and other values than the example
    with torch.no_grad():
        want, got = model(fresh), result.model(fresh)
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    # Every architecture here has channel groups that can shrink; each must be used.
    assert result.report.sites, nm.plan(model, x, approximate=True)
    assert params(result.model) == result.report.params_after < result.report.params_before
    assert head not in {site.producer for site in result.report.sites}


def test_vit_shrinks_to_a_vit_of_half_the_width() -> None:
    """ViT-B/16's residual stream (class token, positional embedding, LayerNorms, every attention)
    and its MLPs at half width: as many parameters as torchvision's ViT built with hidden 384, MLP
    1536 and 6 heads of 64 (whole heads go, since 384 is a multiple of the head width)."""
    model = build("vit_b_16")
    x = example("vit_b_16", 1, seed=1)
    result = nm.compress(model, x, 0.5, method="prune", approximate=True, exclude=["heads.head"])
    half = torchvision.models.VisionTransformer(224, 16, 12, 6, 384, 1536)
    assert result.report.params_after == params(half)
    attentions = [m for m in result.model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attentions) == 12
    assert all((m.embed_dim, m.num_heads, m.head_dim) == (384, 6, 64) for m in attentions)
    fresh = example("vit_b_16", 2, seed=2)
    with torch.no_grad():
        assert result.model(fresh).shape == (2, 1000)


# ---------------------------------------------------------------------------------------------
# Planted exact duplicates in ResNets
# ---------------------------------------------------------------------------------------------

Pair = tuple[nn.Conv2d, nn.BatchNorm2d]
#: The conv + BatchNorm pairs that write a group's channels, and the layers that read them.
Group = tuple[list[Pair], list[nn.Module]]


def resnet_groups(model: ResNet) -> tuple[list[Group], list[Group]]:
    """(streams, inner) of a torchvision ResNet.

    A stream is written by the stem (until the first projection), then by each projection and every
    block's last layer, and read by each block's first layer and projection, and by ``fc`` at the end.
    Inner groups are the blocks' other layers, each read by the next layer of its block.
    """
    streams: list[Group] = []
    current: Group = ([(model.conv1, model.bn1)], [])
    inner: list[Group] = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            assert isinstance(block, (BasicBlock, Bottleneck))
            pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
            if isinstance(block, Bottleneck):
                pairs.append((block.conv3, block.bn3))
            current[1].append(block.conv1)
            if block.downsample is not None:
                current[1].append(block.downsample[0])
                streams.append(current)
                current = ([(block.downsample[0], block.downsample[1])], [])
            inner.extend(([pair], [after[0]]) for pair, after in zip(pairs, pairs[1:]))
            current[0].append(pairs[-1])
    current[1].append(model.fc)
    streams.append(current)
    return streams, inner


def plant(pairs: list[Pair], consumers: list[nn.Module], generator: torch.Generator) -> int:
    """Make half the channels of a group exact positive multiples of the other half.

    Every pair gets, for duplicate channel d of source s, a folded row (BatchNorm folded into the
    conv) ``scale[d]`` times that of s, with raw conv rows and BatchNorm parameters *not* in that
    ratio, so only a merge that folds the norm is exact. Sources' rows are rescaled to nearly one norm
    and duplicates also read small weights from their consumers, so that any sensible importance ranks
    them below every source. Returns the number of
    duplicate channels.
    """
    n = pairs[0][0].out_channels
    order = torch.randperm(n, generator=generator)
    base, dups = order[: n // 2], order[n // 2 :]
    source = base[torch.randint(0, len(base), (len(dups),), generator=generator)]
    scale = 0.05 + 0.25 * torch.rand(len(dups), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for conv, bn in pairs:
            assert conv.bias is None and conv.groups == 1
            # Random statistics first, so folding is not the identity.
            bn.weight.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
            bn.bias.copy_(0.1 * torch.randn(n, generator=generator, dtype=torch.float64))
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=generator, dtype=torch.float64))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
            a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            # Sources' folded rows within 20% of one norm: every duplicate (at most 0.3 of its
            # source) then scores below every source.
            norm = (a[:, None] * conv.weight.flatten(1)).abs().sum(1)
            target = norm[base].mean() * (1 + 0.2 * torch.rand(len(base), generator=generator))
            conv.weight[base] *= (target / norm[base]).view(-1, 1, 1, 1)
            c = 0.5 + 1.5 * torch.rand(len(dups), generator=generator, dtype=torch.float64)
            mean = 0.1 * torch.randn(len(dups), generator=generator, dtype=torch.float64)
            folded_bias = bn.bias[source] - a[source] * bn.running_mean[source]
            conv.weight[dups] = (scale / c).view(-1, 1, 1, 1) * conv.weight[source]
            bn.weight[dups] = c * bn.weight[source]
            bn.running_var[dups] = bn.running_var[source]
            bn.running_mean[dups] = mean
            bn.bias[dups] = scale * folded_bias + c * a[source] * mean
        small = 0.05 + 0.25 * torch.rand(len(dups), generator=generator, dtype=torch.float64)
        for layer in consumers:
            shape = (1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else (1, -1)
            layer.weight[:, dups] *= small.view(shape)
    return len(dups)


def planted_resnet(name: str) -> tuple[nn.Module, int]:
    """A float64 ResNet whose every channel group holds exact duplicates (half of its channels), and
    its parameter count once every group has lost them: each conv keeps half its outputs and half
    its inputs (the stem all 3), each BatchNorm half, ``fc`` half its inputs and all its outputs."""
    model = build(name).double()
    assert isinstance(model, ResNet)
    generator = torch.Generator().manual_seed(3)
    streams, inner = resnet_groups(model)
    for pairs, consumers in [*streams, *inner]:
        plant(pairs, consumers, generator)
    expected = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            width = module.in_channels if module is model.conv1 else module.in_channels // 2
            expected += module.out_channels // 2 * width * module.weight[0, 0].numel()
        elif isinstance(module, nn.BatchNorm2d):
            expected += module.num_features  # half the weights and half the biases
        elif isinstance(module, nn.Linear):
            expected += module.out_features * (module.in_features // 2 + 1)
    return model, expected


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_planted_duplicates_merge_exactly(name: str) -> None:
    model, expected_params = planted_resnet(name)
    x = example(name, 1, seed=1).double()
    fresh = example(name, 3, seed=4).double()
    with torch.no_grad():
        want = model(fresh)
    before = state(model)

    merged = nm.compress(model, x, 0.5, method="merge")
    pruned = nm.compress(model, x, 0.5, method="prune")
    assert_untouched(model, before)
    with torch.no_grad():
        merge_error = relative_error(merged.model(fresh), want)
        prune_error = relative_error(pruned.model(fresh), want)
    assert merge_error <= 1e-5
    # The duplicates carry real signal: dropping the same channels instead changes the function.
    assert prune_error > 1e-3
    # Every group (inner layers and residual streams) lost exactly its duplicates.
    assert params(merged.model) == merged.report.params_after == expected_params
    assert {"residual", "chain"} <= {site.pattern for site in merged.sites}
