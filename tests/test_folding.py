"""Model folding (the Wang et al. 2025 peer): exact on planted clusters, Fold-AR's scale, Fold-DIR."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import neuronmerge as nm
from neuronmerge.lab import sweep as sweeps
from neuronmerge.lab.folding import cluster_scale, fold, kmeans
from neuronmerge.models import create_model


def planted_mlp(seed: int) -> nn.Sequential:
    """Linear(5, 8) whose 8 rows are 3 distinct rows repeated (3, 3, 2 times), then a reader."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        source = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        model[0].weight.copy_(model[0].weight[source])
        model[0].bias.copy_(model[0].bias[source])
    return model


def planted_conv_bn(seed: int) -> nn.Sequential:
    """Conv -> BN -> ReLU -> pool -> flatten -> Linear, the conv's 6 channels 2 distinct ones x 3."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 4),
    ).double()
    source = torch.tensor([0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        for tensor in (model[0].weight, model[0].bias, bn.weight, bn.bias):
            tensor.copy_(tensor[source])
        bn.running_mean.copy_(bn.running_mean[source])
        bn.running_var.copy_(bn.running_var[source])
    return model.eval()


@pytest.mark.parametrize("repair", ["none", "ar"])
def test_fold_is_exact_on_planted_duplicate_clusters(repair: str) -> None:
    for model, x, ratio, widths in [
        (planted_mlp(0), torch.randn(16, 5, dtype=torch.float64), 5 / 8, ("0", 3)),
        (planted_conv_bn(1), torch.randn(4, 2, 6, 6, dtype=torch.float64), 4 / 6, ("0", 2)),
    ]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        # Duplicate rows read through unequal columns: found by clustering the rows alone.
        small = fold(model, x[:2], ratio, repair=repair, columns=False)  # type: ignore[arg-type]
        name, width = widths
        assert small.get_submodule(name).weight.shape[0] == width
        assert torch.allclose(small(x), model(x), rtol=1e-10, atol=1e-10)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fold_ar_scale_matches_the_formula_by_hand() -> None:
    # Orthogonal rows: E[c] = 0, scale = 2 / sqrt(2). Rows at 45 degrees: E[c] = 1/sqrt(2).
    assert cluster_scale(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(math.sqrt(2))
    by_hand = 2 / math.sqrt(2 + 2 * (1 / math.sqrt(2)))
    assert cluster_scale(torch.tensor([[1.0, 0.0], [3.0, 3.0]])) == pytest.approx(by_hand)
    # three rows, cosines 1/2, 0, 0: E[c] = 1/6, scale = 3 / sqrt(3 + 6 / 6)
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0], [0.0, 0.0, 2.0]])
    assert cluster_scale(rows) == pytest.approx(3 / 2)
    assert cluster_scale(torch.tensor([[1.0, 2.0]])) == 1.0

    # In a model: two orthogonal BN channels (gamma 1, beta 0.5, running mean 0, var 1) fold into one
    # that computes sqrt(2) * ((x0 + x1) / 2) + 0.5 before its ReLU, read through the summed columns.
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 1))
    model = model.double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[1].bias.fill_(0.5)
        model[1].running_var.fill_(1 - model[1].eps)
        model[3].weight.copy_(torch.tensor([[2.0, 3.0]]))
        model[3].bias.fill_(0.25)
    x = torch.tensor([[1.0, 2.0], [-3.0, 1.0]], dtype=torch.float64)
    expected = torch.relu(math.sqrt(2) * x.mean(dim=1, keepdim=True) + 0.5) * 5 + 0.25
    assert torch.allclose(fold(model, x, 0.5, repair="ar")(x), expected)
    plain = torch.relu(x.mean(dim=1, keepdim=True) + 0.5) * 5 + 0.25
    assert torch.allclose(fold(model, x, 0.5, repair="none")(x), plain)


def test_fold_dir_measures_batchnorm_on_the_first_probe_batch() -> None:
    model = planted_conv_bn(2)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    probes = [(torch.randn(32, 2, 6, 6, dtype=torch.float64) * 2 + 1,), (torch.zeros(4, 2, 6, 6),)]
    small = fold(model, x, 0.5, repair="dir", probes=probes)
    conv, bn = small.get_submodule("0"), small.get_submodule("1")
    measured = conv(probes[0][0]).transpose(0, 1).flatten(1)
    assert torch.allclose(bn.running_mean, measured.mean(dim=1))
    assert torch.allclose(bn.running_var, measured.var(dim=1), rtol=1e-6)
    with pytest.raises(nm.InvalidArgumentError, match="probes"):
        fold(model, x, 0.5, repair="dir")
    with pytest.raises(nm.InvalidArgumentError, match="repair"):
        fold(model, x, 0.5, repair="fast")  # type: ignore[arg-type]
    # Without a BatchNorm there is nothing to re-measure: plain folding, and no probes needed.
    mlp, rows = planted_mlp(4), torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        mlp[0].weight.add_(0.1 * torch.randn_like(mlp[0].weight))  # unequal members: folding is lossy
    plain = fold(mlp, rows, 0.5, repair="none")(rows)
    assert torch.equal(fold(mlp, rows, 0.5, repair="dir")(rows), plain)
    assert not torch.allclose(plain, mlp(rows))


def test_kmeans_finds_separated_clusters_and_never_leaves_one_empty() -> None:
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    rows = centres.repeat_interleave(5, dim=0) + 0.1 * torch.randn(15, 2)
    labels = kmeans(rows, 3, seed=1)
    assert all(len(set(labels[i * 5 : i * 5 + 5].tolist())) == 1 for i in range(3))
    assert len(set(labels.tolist())) == 3
    same = kmeans(torch.zeros(6, 3), 4)  # identical rows: still four non-empty clusters
    assert sorted(torch.bincount(same, minlength=4).tolist())[0] >= 1


def test_sweep_registers_fold_at_the_same_widths_as_merge() -> None:
    assert sweeps.METHODS["fold-ar"].data_free and sweeps.METHODS["fold-dir"].data_free
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)
    ).eval()
    x = torch.randn(2, 1, 6, 6)
    context = sweeps.SweepContext(arch=None)
    context.cache["probes"] = [(torch.randn(16, 1, 6, 6),)]  # what the sweep made once for merge-ls
    merged = nm.merge(model, x, 0.5)
    for name in ("fold-ar", "fold-dir"):
        small = sweeps.METHODS[name].compress(model, x, 0.5, context)
        assert nm.evaluate.count_parameters(small) == nm.evaluate.count_parameters(merged)
        assert small(x).shape == (2, 3)


class PlantedResidual(nn.Module):
    """Stem -> basic block (identity shortcut) -> BatchNorm after the sum -> pool -> Linear.

    The stream (stem, conv2 and the BatchNorm after the sum) holds 3 distinct channels twice over,
    the block's inner width 2 distinct ones twice over: folding to half is exact.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.post = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        s = torch.relu(self.post(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(s))))) + s))
        return self.fc(s.mean(dim=(2, 3)))

    @classmethod
    def planted(cls, seed: int) -> PlantedResidual:
        torch.manual_seed(seed)
        model = cls().double()
        stream, inner = torch.tensor([0, 1, 2, 2, 0, 1]), torch.tensor([0, 1, 1, 0])
        with torch.no_grad():
            for conv, bn, source in [
                (model.stem, model.bn0, stream),
                (model.conv1, model.bn1, inner),
                (model.conv2, model.bn2, stream),
                (None, model.post, stream),
            ]:
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)
                tensors = [bn.weight, bn.bias, bn.running_mean, bn.running_var]
                for tensor in tensors + ([conv.weight] if conv is not None else []):
                    tensor.copy_(tensor[source])
            # Duplicates read through equal columns too, so that clustering on them finds them.
            for reader, source in [(model.conv1, stream), (model.conv2, inner), (model.fc, stream)]:
                reader.weight.copy_(reader.weight[:, source])
        return model.eval()


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("repair", ["none", "ar"])
def test_fold_is_exact_on_a_residual_stream_of_planted_duplicates(repair: str, columns: bool) -> None:
    # One clustering for the whole stream: the stem, conv2 and the BatchNorm after the sum all lose
    # the same channels, and every producer's duplicates fold into one.
    model = PlantedResidual.planted(3)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fold(model, x[:2], 0.5, repair=repair, columns=columns)  # type: ignore[arg-type]
    widths = {name: small.get_submodule(name).weight.shape[0] for name in ("stem", "conv1", "conv2")}
    assert widths == {"stem": 3, "conv1": 2, "conv2": 3}
    assert small.get_submodule("post").num_features == 3 and small.get_submodule("fc").in_features == 3
    assert torch.allclose(small(x), model(x), rtol=1e-10, atol=1e-10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def grouped_convs() -> nn.Sequential:
    """Convs read by grouped convs: each group's channels come in two blocks, folded block by block."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: create_model("resnet-fmnist", stage_widths=(6, 8, 10)),
        lambda: create_model("vgg-fmnist"),
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 10)),
        grouped_convs,
    ],
    ids=["resnet", "vgg", "mlp", "grouped"],
)
def test_fold_reaches_merges_parameter_count_on_every_group(build: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 1, 28, 28)
    for ratio in (0.25, 0.7):
        merged = nm.merge(model, x, ratio)
        small = fold(model, x, ratio, repair="ar")
        assert nm.evaluate.count_parameters(small) == nm.evaluate.count_parameters(merged), ratio
        assert nm.evaluate.count_parameters(small) < nm.evaluate.count_parameters(model)
        assert small(x).shape == model(x).shape


def test_what_folding_clusters_on_is_the_validation_winner() -> None:
    record = Path(__file__).resolve().parents[1] / "experiments" / "folding_validation.json"
    best = json.loads(record.read_text())["best"]
    assert inspect.signature(fold).parameters["columns"].default == (best == "rows+columns")
