"""Patterns the torchvision-wide smoke test (``experiments/torchvision_smoke.py``) found, each in a
tiny hand-built module (the main suite has no torchvision): planted exact duplicates merge exactly
through them, or the library refuses with one clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronmerge as nm
from tests.builders import plant_duplicates

pytestmark = pytest.mark.usefixtures("single_thread")


def merged_exactly(model: nn.Module, x: torch.Tensor, groups: int) -> nm.Result:
    """Plant duplicates at every site of ``model`` (float64), merge them; the output must not move."""
    model = model.double().eval()
    x = x.double()
    sites = nm.plan(model, x).sites
    assert len(sites) == groups, [s.producers for s in sites]
    plant_duplicates(model, sites, 0.5, "l2-norm", torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
    result = nm.compress(model, x, 0.5, criterion="l2-norm", threshold=None)
    with torch.no_grad():
        assert torch.allclose(result.model(x), reference, rtol=0, atol=1e-10 * reference.abs().max())
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    return result


class SegmentationHead(nn.Module):
    """Convs whose features are upsampled before the next conv reads them (FCN, LR-ASPP, FPN)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.interpolate(h, size=(10, 10), mode="bilinear", align_corners=False)
        h = F.relu(self.conv2(h))
        return self.out(self.up(h))


def test_channels_merge_exactly_through_interpolation() -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    result = merged_exactly(SegmentationHead(), x, groups=2)
    assert [s.producers for s in result.report.sites] == [("conv1",), ("conv2",)]


class VideoBlock(nn.Module):
    """Conv3d -> BatchNorm3d -> ReLU -> pool, twice, and a residual 3-D stage (R3D, MC3, S3D)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(3, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8)
        self.conv2, self.bn2 = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(8)
        self.conv3 = nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.relu(self.bn2(self.conv2(h)))
        h = F.relu(h + self.conv3(h))
        return self.head(torch.flatten(F.adaptive_avg_pool3d(h, 1), 1))


def test_conv3d_channels_merge_exactly() -> None:
    x = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    result = merged_exactly(VideoBlock(), x, groups=2)
    assert sorted(s.producers for s in result.report.sites) == [("conv1",), ("conv2", "conv3")]


class ShapeCheckedVideoBlock(VideoBlock):
    """``VideoBlock`` behind a Python check on the input's shape: torch.fx cannot trace it, so
    ``torch.export`` captures it and its ATen Conv3d / 5-D BatchNorm calls are lifted to layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] < 2:
            raise ValueError("at least two frames")
        return super().forward(x)


def test_exported_conv3d_layers_are_lifted_and_merge_exactly() -> None:
    x = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    result = merged_exactly(ShapeCheckedVideoBlock(), x, groups=2)
    assert isinstance(result.model.get_submodule(result.report.sites[0].producers[0]), nn.Conv3d)


class ListOfImages(nn.Module):
    """A forward that takes a list of images of any sizes (torchvision's detection models)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.conv(image[None])[0] for image in images]


@pytest.mark.parametrize("call", ["compress", "plan"])
def test_a_list_of_images_is_refused_with_what_to_do(call: str) -> None:
    model = ListOfImages()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ([torch.randn(3, 8, 8)],)
    run = {"compress": lambda: nm.compress(model, x, 0.5), "plan": lambda: nm.plan(model, x)}[call]
    with pytest.raises(nm.InvalidArgumentError, match=r"argument 0 is a list.*compress a part of it"):
        run()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def clip_window(window: list[int], size: list[int]) -> list[int]:
    """Clips ``window`` to ``size`` in place, as torchvision's Swin3D ``_get_window_and_shift_size``
    does (traced as one call: ``torch.fx.wrap`` below)."""
    for i, (w, s) in enumerate(zip(window, size, strict=True)):
        window[i] = min(w, s)
    return window


torch.fx.wrap("clip_window")


class ClippedWindow(nn.Module):
    """A block that passes a list attribute to a wrapped function that edits it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.window = [8, 8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = clip_window(self.window, [x.shape[2], x.shape[3]])
        return self.conv2(F.relu(F.avg_pool2d(self.conv1(x), window[0])))


def test_a_function_editing_its_list_argument_captures_and_merges_exactly() -> None:
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    merged_exactly(ClippedWindow(), x, groups=1)
