"""Methods beyond the paper: merge-ls (exactness, the data-free targets on the authors' LeNet-300-100),
synthetic probes, and the data-aware BatchNorm recalibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge import engine
from neuronmerge.capture import capture
from neuronmerge.criteria import kept_count
from neuronmerge.evaluate import accuracy
from neuronmerge.io import load_checkpoint
from neuronmerge.lab.data import load_fashion_mnist
from neuronmerge.lsq import MeasuredMoments
from neuronmerge.methods.base import Inputs
from tests.builders import duplicated_convnet, duplicated_mlp

pytestmark = pytest.mark.usefixtures("single_thread")


def split(width: int, ratio: float) -> tuple[int, int]:
    keep = kept_count(width, ratio)
    return keep, width - keep


def test_merge_ls_is_exact_on_duplicate_fc_neurons() -> None:
    ratio = 0.4
    (b1, d1), (b2, d2) = split(20, ratio), split(10, ratio)
    model = duplicated_mlp(12, [b1, b2], [d1, d2], "l1-norm", seed=1)
    x = torch.randn(512, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = nm.compress(model, x[:2], ratio, method="merge-ls", calibration=[x[:256], x[256:]])
    small = result.model
    assert [small.get_submodule(f"layers.{i}").out_features for i in (0, 1)] == [b1, b2]
    assert torch.allclose(small(x), model(x), rtol=1e-7, atol=1e-8)
    assert [(s.kept, s.merged + s.dropped) for s in result.report.sites] == [(b1, d1), (b2, d2)]
    pruned = nm.prune(model, x[:2], ratio)
    assert not torch.allclose(pruned(x), model(x), atol=1e-3)


def test_least_squares_merge_is_exact_on_conv_batchnorm_and_flatten() -> None:
    """The merge step of merge-ls alone: compress() then re-measures BatchNorm statistics on the
    calibration batches, which changes any BatchNorm model (tested below and in the sweeps)."""
    ratio = 0.5
    bases, dups = zip(*(split(w, ratio) for w in (8, 6, 10)))
    model = duplicated_convnet(list(bases), list(dups), "l1-norm", seed=2)
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gm = engine.capture(model, x[:2])
    options = nm.Options(method="merge-ls")
    groups, _ = engine.groups(gm, options)
    keep = engine.kept_counts(groups, ratio, options.method_object())
    inputs = Inputs((x[:2],), MeasuredMoments(((x,),)))
    decompositions = engine.decompose(gm, groups, keep, options, inputs)
    small = engine.surgery(gm, groups, decompositions)
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == bases
    assert torch.allclose(small(x), model(x), rtol=1e-7, atol=1e-8)
    remeasured = nm.compress(model, x[:2], ratio, method="merge-ls", calibration=[x]).model
    with torch.no_grad():
        into_bn2 = remeasured.conv2(torch.relu(remeasured.bn1(remeasured.conv1(x))))
    assert torch.allclose(remeasured.bn2.running_mean, into_bn2.mean(dim=(0, 2, 3)), atol=1e-3)
    assert not torch.allclose(remeasured.bn2.running_mean, small.bn2.running_mean, atol=1e-3)


class _ConstantChannelNet(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 (no bias, no padding) -> BN -> ReLU -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_constant_channels_go_into_the_next_batchnorm_when_the_consumer_has_no_bias() -> None:
    torch.manual_seed(0)
    model = _ConstantChannelNet().double().eval()
    with torch.no_grad():  # channels 4 and 5 of conv1 compute the constants relu(beta) = 0.7, 1.3
        model.conv1.weight[4:] = 0
        model.bn1.bias[4:] = torch.tensor([0.7, 1.3], dtype=torch.float64)
    x = torch.randn(32, 2, 9, 9, dtype=torch.float64)
    model = nm.recalibrate_batchnorm(model, [x])  # statistics of x, which merge-ls re-measures
    small = nm.compress(model, x[:2], 2 / 6, method="merge-ls", calibration=[x], include=["conv1"]).model
    assert small.conv1.out_channels == 4 and small.conv2.bias is None
    assert torch.allclose(small(x), model(x), rtol=1e-7, atol=1e-8)
    assert not torch.equal(small.bn2.running_mean, model.bn2.running_mean)


def test_merge_ls_refuses_paper_fidelity_and_lists_methods() -> None:
    model = duplicated_mlp(4, [3], [1], "l1-norm", seed=0)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(nm.InvalidArgumentError, match="paper"):
        nm.compress(model, x, 0.25, method="merge-ls", fidelity="paper")
    with pytest.raises(nm.InvalidArgumentError, match="merge-ls"):
        nm.compress(model, x, 0.25, method="fold")  # type: ignore[arg-type]
    assert set(nm.METHODS) == {"prune", "merge", "merge-ls"}


def test_probes_are_seeded_and_leave_the_model_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():  # running statistics of inputs ~ N(1.5, 0.5^2): what the probes should match
        reference = model[0](1.5 + 0.5 * torch.randn(4096, 6))
        model[1].running_mean.copy_(reference.mean(0))
        model[1].running_var.copy_(reference.var(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = capture(model, torch.randn(2, 6))
    first = nm.synthesize_probes(gm, torch.randn(2, 6), 96, steps=150, batch_size=64)
    again = nm.synthesize_probes(gm, torch.randn(2, 6), 96, steps=150, batch_size=64)
    assert [b[0].shape for b in first] == [(64, 6), (32, 6)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    # the BatchNorm term pulls the probes' statistics at bn towards its running ones
    with torch.no_grad():
        pre = model[0](torch.cat([b[0] for b in first]))
        noise = model[0](torch.randn(96, 6))
    mean, var = model[1].running_mean, model[1].running_var
    assert (pre.mean(0) - mean).abs().mean() < (noise.mean(0) - mean).abs().mean() / 2
    assert (pre.var(0) - var).abs().mean() < (noise.var(0) - var).abs().mean() / 2


def test_recalibrate_batchnorm_measures_the_batches_and_copies() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU()).eval()
    batches = [torch.randn(8, 1, 6, 6) * 3 + 1 for _ in range(3)]
    fresh = nm.recalibrate_batchnorm(model, batches)
    inputs = torch.cat([model[0](b) for b in batches]).detach()
    assert torch.allclose(fresh[1].running_mean, inputs.mean(dim=(0, 2, 3)), atol=1e-5)
    assert fresh[1].momentum == 0.3 and not fresh.training
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # the input model is untouched
    with pytest.raises(nm.InvalidArgumentError):
        nm.recalibrate_batchnorm(model, [])


# Test accuracy (percent) of the paper's merge on the authors' checkpoint (their Table 1, reproduced
# to the hundredth by test_reproduce.py), and the margins merge-ls must clear: >= +3 points at 0.7 and
# 0.8, never below at 0.5 and 0.6; TOLERANCE (5 of the 10,000 test images) absorbs the rounding
# differences of other CPUs and thread counts. Measured here: 88.70, 88.04, 86.13, 84.60.
PAPER_MERGE = {0.5: 88.69, 0.6: 86.92, 0.7: 82.75, 0.8: 80.02}
MARGIN = {0.5: 0.0, 0.6: 0.0, 0.7: 3.0, 0.8: 3.0}
TOLERANCE = 0.05


def test_merge_ls_beats_the_paper_merge_on_the_authors_lenet_without_data(
    lenet_checkpoint: Path, fashion_mnist_dir: Path
) -> None:
    model = load_checkpoint(lenet_checkpoint, "lenet-300-100")
    images, labels = load_fashion_mnist("test", fashion_mnist_dir)
    shape_only = torch.zeros(2, 1, 28, 28)  # tracing and probes read the input shape, no image
    probes = nm.synthesize_probes(capture(model, shape_only), shape_only)
    for ratio, paper in PAPER_MERGE.items():
        small = nm.compress(model, shape_only, ratio, method="merge-ls", calibration=probes).model
        assert accuracy(small, images, labels) >= paper + MARGIN[ratio] - TOLERANCE, ratio


def test_sweep_rows_say_which_methods_use_data_and_reuse_the_probes() -> None:
    from neuronmerge.lab import sweep as sweeps

    assert sweeps.METHODS["merge-ls"].data_free
    assert not sweeps.METHODS["merge-ls-data"].data_free
    assert not sweeps.METHODS["merge-exact-recal"].data_free
    model = duplicated_mlp(6, [5], [3], "l1-norm", seed=3).float()
    x = torch.randn(2, 6)
    context = sweeps.SweepContext(arch=None, calibration=(torch.randn(64, 6),))
    first = sweeps.METHODS["merge-ls"].compress(model, x, 0.375, context)
    probes = context.cache["probes"]
    second = sweeps.METHODS["merge-ls"].compress(model, x, 0.375, context)
    assert context.cache["probes"] is probes and len(probes) == 4  # made once, 2048 in batches of 512
    assert torch.equal(first(x), second(x))
    data_aware = sweeps.METHODS["merge-ls-data"].compress(model, x, 0.375, context)
    assert data_aware.get_submodule("layers.0").out_features == 5


def test_cli_compresses_with_merge_ls_and_the_result_reloads(
    lenet_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuronmerge.cli import main

    out = tmp_path / "small.safetensors"
    args = [str(lenet_checkpoint), "--arch", "lenet-300-100", "--ratio", "0.7"]
    assert main(["compress", *args, "--method", "merge-ls", "--out", str(out), "--json"]) == 0
    assert '"method": "merge-ls"' in capsys.readouterr().out
    small = nm.load(out)
    assert (small.ip1.out_features, small.ip2.out_features) == (90, 30)
