"""What the architecture smoke tests share (``timm_smoke.py``, ``torchvision_smoke.py``).

One model per fresh process under a time limit (``main``); in that process ``compress_row``
compresses it at ratio 0.5 with ``approximate=True`` and classifies the outcome, and ``planted``
runs the exactness check: exact duplicates planted at every exact site of a float64 copy as captured
(``tests.builders.plant_duplicates``) must merge without moving the output. A row's ``status``:

* ``ok``: fewer parameters, same output structure and shapes, the caller's model untouched;
* ``not-reduced``, ``shape-changed``, ``input-modified``: it ran, with that defect;
* ``refused``: a ``neuronmerge`` error (``NeuronMergeError``: the library's one clear refusal);
* ``crash``: any other exception (a bug to fix), ``timeout``: over the per-model limit.

``planted`` is ``exact``, ``WRONG`` (a plan said exact and the output moved), ``no-sites``,
``not-planted`` (a pattern the test helper cannot plant into) or ``crash``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import neuronmerge as nm
from neuronmerge.capture import capture
from neuronmerge.errors import NeuronMergeError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.builders import plant_duplicates  # noqa: E402 - the repository root is put on the path first


def redraw_zero_weights(model: nn.Module) -> nn.Module:
    """Redraw every all-zero weight of ``model`` in place (zero-initialised heads, residual-branch
    BatchNorm scales, skip-init gains would make merges look free); return it."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias") or bool(p.any()):
                continue
            if p.dim() <= 1:  # a scale: per channel, or one (NFNets' skipinit_gain)
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
    return model


def _tensors(value: object) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def same_shapes(out: object, reference: object) -> bool:
    """Whether two outputs hold tensors of the same shapes in the same structure."""
    got, want = _tensors(out), _tensors(reference)
    return len(got) == len(want) and all(a.shape == b.shape for a, b in zip(got, want, strict=True))


def relative_error(out: object, reference: object) -> float:
    """``||out - reference|| / ||reference||`` over every floating tensor of the outputs."""
    if isinstance(out, torch.Tensor) and isinstance(reference, torch.Tensor):
        return float((out - reference).norm() / reference.norm())
    pairs = [
        (a.double(), b.double())
        for a, b in zip(_tensors(out), _tensors(reference), strict=True)
        if b.is_floating_point()
    ]
    difference = sum(float((a - b).pow(2).sum()) for a, b in pairs)
    size = sum(float(b.pow(2).sum()) for _, b in pairs)
    return (difference / size) ** 0.5 if size else difference**0.5


def failure(error: BaseException) -> str:
    """The error as a row shows it."""
    return f"{type(error).__name__}: {str(error)[:400]}"


def planted(
    build: Callable[[], nn.Module], x: tuple[torch.Tensor, ...], exclude: Sequence[str]
) -> dict[str, Any]:
    """Plant exact duplicates at every exact site (``x`` and the model in float64), merge them;
    the output must not move."""
    try:
        # Planted where merging reads the rows: in the captured model, whose computed weights
        # (weight standardisation) are stored tensors; elsewhere it shares the model's tensors.
        model = capture(build().double(), x)
        found = nm.plan(model, x, exclude=list(exclude))
        plant_duplicates(model, found.sites, 0.5, "l2-norm", torch.Generator().manual_seed(0))
    except Exception as error:  # noqa: BLE001 - a pattern the test helper cannot plant into
        return {"planted": "not-planted", "planted_error": f"{type(error).__name__}: {error}"[:300]}
    with torch.no_grad():
        reference = model(*x)
    try:
        result = nm.compress(model, x, 0.5, criterion="l2-norm", threshold=None, exclude=list(exclude))
        with torch.no_grad():
            error = relative_error(result.model(*x), reference)
    except Exception as error:  # noqa: BLE001
        return {"planted": "crash", "planted_error": f"{type(error).__name__}: {error}"[:300]}
    return {
        "planted": "no-sites" if not result.report.sites else "exact" if error < 1e-9 else "WRONG",
        "planted_error": error,
        "planted_sites": len(result.report.sites),
    }


def compress_row(
    model: nn.Module, x: tuple[torch.Tensor, ...], exclude: Sequence[str], row: dict[str, Any]
) -> dict[str, Any]:
    """Compress ``model`` at ratio 0.5 with ``approximate=True``; ``row`` with what happened."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(*x)
    params = sum(p.numel() for p in model.parameters())
    row["params_before"] = params
    try:
        result = nm.compress(model, x, 0.5, approximate=True, exclude=list(exclude))
    except Exception as error:  # noqa: BLE001 - the smoke test records every failure
        status = "refused" if isinstance(error, NeuronMergeError) else "crash"
        return {**row, "status": status, "error": failure(error)}
    after = model.state_dict()
    modified = after.keys() != before.keys() or any(not torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        out = result.model(*x)
    params_after = sum(p.numel() for p in result.model.parameters())
    row.update(
        params_after=params_after,
        removed=round(1 - params_after / params, 4),
        output_error=result.report.output_error,
        sites=len(result.report.sites),
        skipped=[s.reason for s in result.report.skipped][:5],
    )
    if modified:
        row["status"] = "input-modified"
    elif not same_shapes(out, reference):
        row["status"] = "shape-changed"
    elif params_after >= params:
        row["status"] = "not-reduced"
    else:
        row["status"] = "ok"
    return row


def main(
    script: str,
    names: Sequence[str],
    run_one: Callable[[str], dict[str, Any]],
    out: Path,
    description: str,
    timeout: float = 300.0,
) -> None:
    """The command line of a smoke script: every model of ``names`` (or ``--only`` some) in a fresh
    process (``script --one NAME``, which prints ``run_one(NAME)``) under ``--timeout`` seconds;
    rows and their counts by status written to ``--out`` after each model."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="rerun these models, keep the other rows")
    parser.add_argument("--timeout", type=float, default=timeout)
    parser.add_argument("--out", type=Path, default=out, help="the JSON to write (and to keep rows of)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    path = args.out
    rows = {r["model"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    for name in args.only or list(names):
        start = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, script, "--one", name],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            lines = done.stdout.strip().splitlines()
            row = (
                json.loads(lines[-1])
                if done.returncode == 0 and lines
                else {"model": name, "status": "crash", "error": done.stderr.strip()[-400:]}
            )
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "timeout", "error": f"over {args.timeout:.0f} s"}
        row["seconds"] = round(time.monotonic() - start, 1)
        rows[name] = row
        print(json.dumps(row), flush=True)
        counts: dict[str, int] = {}
        for r in rows.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        path.write_text(json.dumps({"counts": counts, "rows": list(rows.values())}, indent=1) + "\n")
