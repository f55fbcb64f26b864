"""Every file neuronmerge writes gets the permissions the user's umask gives (issue 15, item 10), and
the sweep plot's parameter axis is labelled."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import neuronmerge as nm
from neuronmerge.io import atomic_write
from neuronmerge.models import create_model


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_umask(umask: int, tmp_path: Path) -> None:
    lenet = create_model("lenet-300-100").eval()
    written = [
        nm.save(lenet, tmp_path / "m.safetensors", arch="lenet-300-100"),
        nm.save(lenet, tmp_path / "m.pt2", arch="lenet-300-100"),
    ]
    cache = tmp_path / "cache.safetensors"  # how the training cache is written
    atomic_write(cache, lambda temp: save_file({"w": torch.zeros(2)}, str(temp)))
    text = tmp_path / "sweep.csv"
    atomic_write(text, lambda temp: temp.write_text("ratio\n"))
    for path in [*written, cache, text]:
        assert _mode(path) == 0o666 & ~umask, path.name


def test_sweep_plot_labels_the_parameter_axis() -> None:
    pytest.importorskip("matplotlib")
    from neuronmerge.lab.plots import sweep_figure

    rows = [
        {
            "method": m,
            "ratio": r,
            "accuracy": 90 - 50 * r,
            "params": int(266_000 * (1 - r) ** 2 + 1000),
            "data_free": True,
        }
        for m in ("prune", "merge")
        for r in (0.1, 0.3, 0.5)
    ]  # 66k-216k parameters: less than a decade, so a log axis alone labels nothing
    figure = sweep_figure({"results": rows, "baseline_accuracy": 90.0, "dataset": "d", "model": "m"})
    figure.canvas.draw()
    by_params = figure.axes[1]
    low, high = by_params.get_xlim()
    labels = [
        tick.label1.get_text()
        for tick in [*by_params.xaxis.get_major_ticks(), *by_params.xaxis.get_minor_ticks()]
        if tick.label1.get_visible() and tick.label1.get_text() and low <= tick.get_loc() <= high
    ]
    assert len(labels) >= 2, labels
    import matplotlib.pyplot as plt

    plt.close(figure)
