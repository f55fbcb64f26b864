"""Reading checkpoints and saving / loading compressed models, without ever unpickling code.

* ``load_checkpoint(path, arch)`` reads the authors' format ``{'acc': float, 'state_dict': ...}``, a
  bare state dict, or a safetensors file, with ``torch.load(weights_only=True)``.
* ``save(model, path, arch=...)`` writes one ``.safetensors`` file whose header metadata holds a small
  JSON description (architecture, how it was compressed). Because every registered architecture can
  rebuild itself at any widths from tensor shapes, ``load(path)`` returns an ordinary module with no
  pickle involved. A model of no registered architecture is saved with ``torch.export`` instead (a
  ``.pt2`` program that ``torch.export.load(path).module()`` runs without neuronmerge installed).
  Writes are atomic: a temporary file in the same folder, then ``os.replace``.
* Whole pickled modules are read only when the caller says ``trust=True``: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from neuronmerge.capture import ExampleInputs, as_input_tuple
from neuronmerge.errors import (
    CaptureError,
    CheckpointError,
    InvalidArgumentError,
    OutputExistsError,
    OutputWriteError,
)
from neuronmerge.models import get_spec, model_from_state_dict

FORMAT = "neuronmerge"
FORMAT_VERSION = 1
_METADATA_KEY = "neuronmerge"


def _existing_file(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"no such file: {file}")
    if not file.is_file():
        raise CheckpointError(f"not a file: {file}")
    return file


def _is_safetensors(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt"):
            return True
    except (SafetensorError, OSError, ValueError):
        return False


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on the CPU; clear errors for every way it can be wrong."""
    file = _existing_file(path)
    if _is_safetensors(file):
        return load_file(str(file), device="cpu")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a refused class: the bytes are not a pickle
            raise CheckpointError(f"cannot read {file}: corrupt or not a checkpoint") from exc
        raise CheckpointError(
            f"{file} holds Python objects beyond tensors (a pickled class), which are not loaded "
            "for safety (torch.load weights_only=True). Re-save its state_dict, or pass --trust if "
            "you trust where it came from."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {file}: corrupt or truncated? ({exc})") from exc
    return _state_dict_of(payload, file)


def _state_dict_of(payload: Any, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, Mapping) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not payload:
        raise CheckpointError(f"{file} holds no state dict (a mapping of names to tensors)")
    if not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"{file}: its state dict holds values that are not tensors")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    return {str(k).removeprefix("module."): v for k, v in payload.items()}


def load_checkpoint(
    path: str | os.PathLike[str], arch: str | None = None, *, trust: bool = False
) -> nn.Module:
    """Build architecture ``arch`` at the widths of the checkpoint at ``path`` and load it.

    With ``trust=True`` the file is fully unpickled (this can run arbitrary code): a whole pickled
    ``nn.Module`` is returned as it is, and ``arch`` may be left out.
    """
    if arch is not None:
        get_spec(arch)  # an unknown name fails before the file is read
    if trust:
        file = _existing_file(path)
        try:
            payload = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:  # unpickling can raise anything
            raise CheckpointError(f"cannot read {file}: corrupt or truncated? ({exc})") from exc
        if isinstance(payload, nn.Module):
            return payload.eval()
        state = _state_dict_of(payload, file)
    else:
        state = read_state_dict(path)
    if arch is None:
        raise InvalidArgumentError(
            f"{path} holds a state dict; say which architecture it is (arch=..., --arch NAME)"
        )
    return model_from_state_dict(arch, state)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON description stored in a file written by ``save`` (empty if there is none)."""
    file = _existing_file(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY)
    except (SafetensorError, OSError, ValueError):
        return {}
    if raw is None:
        return {}
    try:
        description = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: its neuronmerge description is not valid JSON") from exc
    return description if isinstance(description, dict) else {}


def atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a file of the same name in a temporary folder beside ``target``, then rename
    it over ``target``.

    Readers never see half a file, and an interrupted write leaves any old ``target`` intact. The
    writer sees the final file name (torch.export names its archive after it, ONNX its external
    data), and creates the file itself, so it gets the usual permissions. An ``OSError`` on the way
    (no such folder, no permission, disk full) becomes ``OutputWriteError``.
    """
    try:
        folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as exc:
        raise OutputWriteError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        temp = folder / target.name
        write(temp)
        os.replace(temp, target)
    except OSError as exc:
        raise OutputWriteError(
            f"cannot write {target}: {exc.strerror or exc}"
            + ("; the existing file is unchanged" if target.exists() else "")
        ) from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def is_exported_program(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``torch.export`` archive (what ``save`` writes without ``arch``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/archive_format") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    example_inputs: ExampleInputs | None = None,
    description: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` to ``path`` atomically; refuse to replace an existing file unless ``force``.

    With ``arch`` (a registered architecture, possibly narrower than its default widths): one
    safetensors file with a JSON description in its header. Without: a ``torch.export`` program traced
    on ``example_inputs`` (required then), loadable with plain PyTorch.
    """
    target = Path(path)
    if target.exists() and not force:
        raise OutputExistsError(f"{target} exists; pass force=True (--force) to replace it")
    if not target.parent.is_dir():
        raise OutputWriteError(f"cannot write {target}: folder {target.parent} does not exist")
    if arch is None:
        if example_inputs is None:
            raise InvalidArgumentError(
                "saving a model of no registered architecture needs example inputs"
            )
        inputs = as_input_tuple(example_inputs)
        batch_dynamic = tuple({0: torch.export.Dim.AUTO} for _ in inputs)  # any batch size
        try:
            program = torch.export.export(model, inputs, dynamic_shapes=batch_dynamic)
        except Exception as exc:  # torch.export raises many kinds; all mean "cannot capture"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(f"torch.export could not save {type(model).__name__}: {first}") from exc
        atomic_write(target, lambda temp: torch.export.save(program, temp))
        return target
    spec = get_spec(arch)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    model_from_state_dict(spec.name, tensors)  # refuse to write what load() could not read back
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "arch": spec.name, **(description or {})}
    metadata = {_METADATA_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(target, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    return target


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Read a model written by ``save`` back as an ordinary ``nn.Module`` in eval mode."""
    file = _existing_file(path)
    meta = read_metadata(file)
    if meta.get("format") == FORMAT:
        return model_from_state_dict(str(meta["arch"]), load_file(str(file), device="cpu"))
    if zipfile.is_zipfile(file):
        try:
            return torch.export.load(file).module()
        except Exception:  # not an exported program: fall through to the message below
            pass
    raise CheckpointError(
        f"{file} is not a model saved by neuronmerge; "
        "for a checkpoint use load_checkpoint(path, arch=...)"
    )
