"""The relative BatchNorm repair (``norm_repair``): the identity when nothing changed, an affine change
before a BatchNorm undone exactly (one pass or one pass per BatchNorm), kept channels mapped, the
trust blend with re-measuring, and merge-ls exact on duplicates with it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge import engine, lsq, norm_repair
from neuronmerge.criteria import kept_count
from neuronmerge.methods.base import Inputs
from tests.builders import duplicated_convnet

pytestmark = pytest.mark.usefixtures("single_thread")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3),
    ).double()
    with torch.no_grad():  # stored statistics that the batches below do not have
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _batches(count: int) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 2, 8, 8, dtype=torch.float64, generator=generator),) for _ in range(count)]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k}


@pytest.mark.parametrize("count", [1, 3])
def test_relative_repair_is_the_identity_when_nothing_changed(count: int) -> None:
    model, batches = _net(), _batches(count)
    reference = norm_repair.normalised_moments(model, batches)
    before = copy.deepcopy(_buffers(model))
    repaired = norm_repair.correct(model, batches, reference, {})
    assert repaired is not model and set(reference) == {"1", "4"}
    for key, value in _buffers(repaired).items():
        assert torch.allclose(value, before[key], rtol=1e-10, atol=1e-12), key
    assert all(torch.equal(v, before[k]) for k, v in _buffers(model).items())  # input untouched


@pytest.mark.parametrize("count", [1, 3])
def test_an_affine_change_before_a_batchnorm_is_undone_in_call_order(count: int) -> None:
    model, batches = _net(), _batches(count)
    reference = norm_repair.normalised_moments(model, batches)
    changed = copy.deepcopy(model)
    with torch.no_grad():  # every channel of conv 0 scaled and shifted: bn 1 sees a + b x
        a = torch.tensor([2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
        changed[0].weight.mul_(a[:, None, None, None])
        changed[0].bias.mul_(a).add_(torch.tensor([1.0, -2.0, 0.0, 0.3], dtype=torch.float64))
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    assert not torch.allclose(changed(x), model(x), atol=1e-3)
    repaired = norm_repair.correct(changed, batches, reference, {})
    # bn 1 moves with its input; bn 4, corrected after it, then sees what it saw before and stays
    assert torch.allclose(repaired(x), model(x), rtol=1e-8, atol=1e-10)
    assert torch.allclose(repaired[4].running_mean, model[4].running_mean, atol=1e-10)
    # correcting both from the unrepaired model at once would have moved bn 4 as well
    assert not torch.allclose(
        norm_repair.normalised_moments(changed, batches)["4"][1], reference["4"][1], atol=1e-3
    )


def test_a_batchnorm_that_lost_channels_blends_with_remeasuring() -> None:
    model, batches = _net(), _batches(1)
    reference = norm_repair.normalised_moments(model, batches)
    kept = torch.tensor([0, 2])
    small = copy.deepcopy(model)
    with torch.no_grad():  # the kept channels of conv 0 and bn 1, then channel 0 scaled by 2
        small[0] = nn.Conv2d(2, 2, 3).double()
        small[0].weight.copy_(model[0].weight[kept] * torch.tensor([2.0, 1.0])[:, None, None, None])
        small[0].bias.copy_(model[0].bias[kept] * torch.tensor([2.0, 1.0]))
        small[1] = nn.BatchNorm2d(2).double().eval()
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(small[1], name).copy_(getattr(model[1], name)[kept])
        small[3] = nn.Conv2d(2, 5, 3).double()
        small[3].weight.copy_(model[3].weight[:, kept])
        small[3].bias.copy_(model[3].bias)
    inputs = torch.cat([small[0](b[0]) for b in batches]).detach().transpose(0, 1).flatten(1)
    dense_mean, dense_std = reference["1"][0][kept], reference["1"][1][kept]
    for exponent in (0.0, 1.0, 2.0):
        trust = 0.5**exponent
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(norm_repair, "TRUST_EXPONENT", exponent)
            repaired = norm_repair.correct(small, batches, reference, {"1": kept})
        bn = repaired[1]
        # scale = input std / dense std ** trust; mean = input mean - scale * trust * dense mean
        scale = inputs.std(dim=1, unbiased=False) / dense_std**trust
        assert torch.allclose(bn.running_var + bn.eps, scale.square(), rtol=1e-8)
        assert torch.allclose(bn.running_mean, inputs.mean(dim=1) - scale * trust * dense_mean)
    # full trust: channel 0's scaling undone, so bn 1 outputs what the dense model's kept channels do
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norm_repair, "TRUST_EXPONENT", 0.0)
        repaired = norm_repair.correct(small, batches, reference, {"1": kept})
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    assert torch.allclose(repaired[:2](x), model[:2](x)[:, kept], rtol=1e-8, atol=1e-10)


def test_merge_ls_with_the_relative_repair_stays_exact_on_duplicates() -> None:
    widths = [(kept_count(w, 0.5), w - kept_count(w, 0.5)) for w in (8, 6, 10)]
    model = duplicated_convnet([b for b, _ in widths], [d for _, d in widths], "l1-norm", seed=2)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # stored statistics unlike the batches', as a trained model's are
        for bn in (model.bn1, model.bn2):
            bn.running_mean.add_(0.3)
            bn.running_var.mul_(1.7)
    options = nm.Options(method="merge-ls")
    outcomes = {}
    for relative in (False, True):
        gm = engine.capture(model, x[:2])
        groups, _ = engine.groups(gm, options)
        keep = engine.kept_counts(groups, 0.5, options.method_object())
        reference = norm_repair.normalised_moments(gm, [(x,)]) if relative else None
        source = lsq.MeasuredMoments(((x,),), reference)
        decompositions = engine.decompose(gm, groups, keep, options, Inputs((x[:2],), source))
        small = engine.surgery(gm, groups, decompositions)
        with pytest.MonkeyPatch.context() as patch:  # full trust: exact merges change nothing
            patch.setattr(norm_repair, "TRUST_EXPONENT", 0.0)
            small = source.repair(small, groups, decompositions)
        assert small.bn1.num_features == widths[0][0] and small.bn2.num_features == widths[1][0]
        outcomes[relative] = torch.allclose(small(x), model(x), rtol=1e-7, atol=1e-8)
    assert outcomes == {False: False, True: True}  # re-measuring moves what training stored
