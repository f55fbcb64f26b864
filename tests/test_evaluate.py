"""Accuracy, parameter and MAC counts on models whose answers are known by construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuronmerge.errors import InvalidArgumentError
from neuronmerge.evaluate import accuracy, count_flops, count_parameters


def _copier(n: int = 4) -> nn.Linear:
    """A Linear layer that copies its input, so the prediction is the input's hot index."""
    layer = nn.Linear(n, n)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
        layer.bias.zero_()
    return layer


def test_accuracy_counts_right_answers_across_uneven_batches() -> None:
    hot = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    images = nn.functional.one_hot(hot, 4).float()
    labels = hot.clone()
    labels[[2, 5, 9]] = (labels[[2, 5, 9]] + 1) % 4
    assert accuracy(_copier(), images, labels, batch_size=3) == pytest.approx(70.0)
    assert accuracy(_copier(), images, hot, batch_size=1000) == 100.0


def test_accuracy_restores_each_train_flag_and_leaves_state_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3))
    model.train()
    model[2].eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images, labels = torch.randn(32, 4), torch.randint(0, 3, (32,))
    first = accuracy(model, images, labels, batch_size=5)
    assert accuracy(model, images, labels) == first  # eval mode: dropout off, stats frozen
    assert [m.training for m in model] == [True, True, False, True] and model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_accuracy_rejects_mismatched_inputs() -> None:
    with pytest.raises(InvalidArgumentError, match="as many labels as images"):
        accuracy(_copier(), torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        accuracy(_copier(), torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), batch_size=0)


def test_count_parameters_counts_shared_tensors_once() -> None:
    shared = nn.Linear(5, 5)  # 30 parameters
    tied = nn.Linear(5, 5, bias=False)
    tied.weight = shared.weight
    model = nn.Sequential(shared, nn.ReLU(), shared, tied, nn.Linear(5, 2))  # + 12
    assert count_parameters(model) == 30 + 12
    assert count_parameters(nn.ReLU()) == 0


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(2, 4, kernel_size=3)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(8, 8, kernel_size=(3, 1), padding=(1, 0), groups=4, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, image: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.grouped(self.conv(image)))
        return self.fc(x.flatten(1)) + self.conv1d(signal).sum(dim=(1, 2), keepdim=True)


def test_count_flops_matches_hand_count_and_leaves_no_trace() -> None:
    model = _Tiny().train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batch = 2
    macs = count_flops(model, (torch.randn(batch, 3, 6, 6), torch.randn(batch, 2, 7)))
    conv = batch * 8 * 6 * 6 * (3 * 3 * 3)
    grouped = batch * 8 * 6 * 6 * (8 // 4 * 3 * 1)
    fc = batch * 10 * (8 * 6 * 6)
    conv1d = batch * 4 * 5 * (2 * 3)
    assert macs == conv + grouped + fc + conv1d
    assert model.training and all(not m._forward_hooks for m in model.modules())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_count_flops_of_lenet_is_its_weight_count() -> None:
    from neuronmerge.models import create_model

    model = create_model("lenet-300-100")
    assert count_flops(model, torch.zeros(1, 1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10
