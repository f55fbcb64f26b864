"""ONNX export of a (merged) model, checked against onnxruntime.

A merged model is an ordinary module, so ``torch.onnx.export`` (the torch.export-based exporter) does
the work; this module adds what a command line needs around it: the batch dimension made dynamic, an
atomic write that refuses to replace a file without ``force``, one clear error when the optional
``onnx`` extra is missing, and a check that onnxruntime computes what PyTorch computes, so a broken
export is caught here rather than in a deployment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neuronmerge.capture import ExampleInputs, as_input_tuple
from neuronmerge.errors import (
    CaptureError,
    MissingDependencyError,
    NeuronMergeError,
    OutputExistsError,
    OutputWriteError,
)
from neuronmerge.evaluate import _eval_mode
from neuronmerge.io import atomic_write

#: Packages ``torch.onnx.export`` needs (the torch.export-based exporter) and the checker needs.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


@dataclass(frozen=True)
class OnnxExport:
    """Where the model was written and how closely onnxruntime reproduced PyTorch's output."""

    path: Path
    max_abs_diff: float
    batch_checked: int


def _require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"ONNX export needs {', '.join(missing)}: pip install 'neuronmerge[onnx]'"
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: ExampleInputs,
    *,
    force: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> OnnxExport:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch dimension, then check it.

    The check runs the written file with onnxruntime on a batch of a different size than
    ``example_inputs`` (so the dynamic batch is exercised too) and compares with PyTorch within
    ``atol``/``rtol``; a mismatch removes nothing the caller had and raises ``NeuronMergeError``.
    Refuses to replace an existing file unless ``force``; the write is atomic.
    """
    _require_onnx()
    target = Path(path)
    if target.exists() and not force:
        raise OutputExistsError(f"{target} exists; pass force=True (--force) to replace it")
    if not target.parent.is_dir():
        raise OutputWriteError(f"cannot write {target}: folder {target.parent} does not exist")
    inputs = as_input_tuple(example_inputs)
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} for _ in inputs)
    check = tuple(torch.cat([t, t[:1]]) for t in inputs)  # one more row than the traced batch
    with _eval_mode(model), _quiet_exporter():
        try:
            program = torch.onnx.export(
                model, inputs, dynamic_shapes=dynamic, dynamo=True, verbose=False
            )
        except Exception as exc:  # the exporter raises many kinds; all mean "cannot export"
            raise CaptureError(f"torch.onnx could not export {type(model).__name__}: {exc}") from exc
        with torch.no_grad():
            expected = model(*check)
    if program is None:  # only without dynamo=True; keeps the type checker honest
        raise CaptureError("torch.onnx.export returned no program")
    # Check the file before it replaces anything: a wrong export must not cost the user a good one.
    diff: float = 0.0

    def write_and_check(temp: Path) -> None:
        nonlocal diff
        program.save(str(temp), external_data=False)  # one self-contained file (< 2 GB)
        diff = _max_diff_onnxruntime(temp, check, expected, atol, rtol)

    atomic_write(target, write_and_check)
    return OnnxExport(target, diff, int(check[0].shape[0]))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence, for the export only, the exporter's log line for every optional torchvision operator
    it cannot register and a deprecation warning from inside torch: noise to a user."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            yield
    finally:
        logger.setLevel(level)


def _max_diff_onnxruntime(
    file: Path, inputs: tuple[torch.Tensor, ...], expected: object, atol: float, rtol: float
) -> float:
    import onnxruntime  # type: ignore[import-untyped]

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)}
    produced = session.run(None, feeds)
    wanted = _flat(expected)
    if len(produced) != len(wanted):
        raise NeuronMergeError(
            f"the ONNX model returns {len(produced)} outputs where PyTorch returns {len(wanted)}"
        )
    worst = 0.0
    for got, want in zip(produced, wanted):
        got_t = torch.from_numpy(got)
        if got_t.shape != want.shape:
            raise NeuronMergeError(
                f"onnxruntime output shape {tuple(got_t.shape)} != PyTorch {tuple(want.shape)}"
            )
        worst = max(worst, float((got_t.to(want.dtype) - want).abs().max()) if want.numel() else 0.0)
        if not torch.allclose(got_t.to(want.dtype), want, atol=atol, rtol=rtol):
            raise NeuronMergeError(
                f"onnxruntime output differs from PyTorch by up to {worst:.3g}; the export is wrong"
            )
    return worst


def _flat(output: object) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _flat(item)]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _flat(value)]
    raise NeuronMergeError(f"cannot compare a model output of type {type(output).__name__}")
