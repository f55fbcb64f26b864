"""Paper fidelity on conv + BatchNorm.

The authors' ResNet-56, merged and pruned by our vectorised engine, must compute what their procedure
computes. The oracle below follows their algorithm 3 literally, one neuron and one candidate at a time,
on the raw state dict (written here from the paper and the published procedure's semantics; no shared
code with the engine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import neuronmerge as nm
from neuronmerge.models import get_spec, model_from_state_dict
from tests.builders import compress_announced


def _scaling_matrix_literal(
    weight: np.ndarray, bn: dict[str, np.ndarray], kept: list[int], threshold: float, lam: float
) -> np.ndarray:
    rows = weight.reshape(weight.shape[0], -1)
    z = np.zeros((rows.shape[0], len(kept)), dtype=np.float64)
    for i in range(rows.shape[0]):
        if i in kept:
            z[i, kept.index(i)] = 1
            continue
        g1, b1, m1, v1 = bn["weight"][i], bn["bias"][i], bn["running_mean"][i], bn["running_var"][i]
        distances, scales, biases = [], [], []
        for j in kept:
            g2, b2, m2, v2 = bn["weight"][j], bn["bias"][j], bn["running_mean"][j], bn["running_var"][j]
            cos = rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]))
            s = np.linalg.norm(rows[i]) / np.linalg.norm(rows[j])
            scale = s * (g2 / g1) * (v1 / v2)
            shift = abs((g2 / v2) * (s * (-(v1 * b1 / g1) + m1) - m2) + b2)
            distances.append(1 - cos)
            scales.append(scale)
            biases.append(shift / scale)
        biases_arr = np.array(biases)
        normalised = (biases_arr - biases_arr.min()) / (biases_arr.max() - biases_arr.min())
        score = lam * np.array(distances) + (1 - lam) * normalised
        best = int(np.argmin(score))
        if threshold and 1 - distances[best] < threshold:
            continue
        z[i, best] = scales[best]
    return z


def _authors_procedure(
    state: dict[str, torch.Tensor], ratio: float, threshold: float, lam: float, merge: bool
) -> dict[str, torch.Tensor]:
    new = dict(state)
    for stage, width in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        keep = int(width * (1 - ratio))
        for block in range(9):
            p = f"{stage}.{block}."
            weight = state[p + "conv1.weight"].numpy()
            l1 = np.abs(weight.reshape(width, -1)).sum(1)
            kept = sorted(np.argsort(-l1, kind="stable")[:keep].tolist())
            bn = {
                k: state[p + "bn1." + k].numpy()
                for k in ("weight", "bias", "running_mean", "running_var")
            }
            if merge:
                z = _scaling_matrix_literal(weight, bn, kept, threshold, lam)
            else:
                z = np.zeros((width, keep))
                z[kept, range(keep)] = 1
            new[p + "conv1.weight"] = state[p + "conv1.weight"][kept]
            for k in bn:
                new[p + "bn1." + k] = state[p + "bn1." + k][kept]
            conv2 = state[p + "conv2.weight"].double().numpy()
            new[p + "conv2.weight"] = torch.from_numpy(np.einsum("ocxy,ck->okxy", conv2, z)).float()
    return new


@pytest.mark.parametrize("method", ["merge", "prune"])
def test_resnet56_paper_fidelity_matches_the_authors_procedure(
    resnet56_checkpoint: Path, method: str
) -> None:
    state = nm.io.read_state_dict(resnet56_checkpoint)
    model = model_from_state_dict("resnet56", state)
    expected = model_from_state_dict(
        "resnet56", _authors_procedure(state, 0.5, 0.1, 0.85, merge=method == "merge")
    )
    x = get_spec("resnet56").example_inputs(batch=8, seed=1)
    result = compress_announced(
        model,
        x[:2],
        0.5,
        method=method,
        threshold=0.1,
        lam=0.85 if method == "merge" else None,
        fidelity="paper",
    )
    assert len(result.report.sites) == 27
    merged = sum(site.merged for site in result.report.sites)
    assert (merged > 100) if method == "merge" else (merged == 0)
    with torch.no_grad():
        ours, theirs = result.model(x), expected(x)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    assert result.report.params_after == sum(p.numel() for p in expected.parameters())
