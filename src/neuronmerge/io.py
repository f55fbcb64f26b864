"""Reading checkpoints and saving / loading compressed models, without ever unpickling code.

* ``load_checkpoint(path, arch)`` reads the authors' format ``{'acc': float, 'state_dict': ...}``, a
  bare state dict, or a safetensors file, with ``torch.load(weights_only=True)``.
* ``save(model, path, arch=...)`` writes what the file name says. ``.safetensors``: the weights, with
  a small JSON description (architecture, how it was compressed) in the header metadata; because every
  registered architecture can rebuild itself at any widths from tensor shapes, ``load(path)`` returns
  an ordinary module with no pickle involved. ``.pt2``: a ``torch.export`` program, for any model
  (the only format for a model of no registered architecture: its weights alone cannot rebuild it),
  which ``torch.export.load(path).module()`` runs without neuronmerge installed; the same description
  travels in the archive. Writes are atomic (a temporary file in the same folder, then
  ``os.replace``) and get the permissions the user's umask gives, like any file the user creates.
* Whole pickled modules are read only when the caller says ``trust=True``: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import types
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
#: The description's name inside a ``.pt2`` archive (``torch.export.save(extra_files=...)``).
_PT2_DESCRIPTION = "neuronmerge.json"

#: What ``save`` writes, by file suffix.
SAVE_FORMATS = {".safetensors": "safetensors", ".pt2": "torch.export"}


def save_format(path: str | os.PathLike[str], arch: str | None) -> str:
    """The format ``save`` writes to ``path`` for a model of ``arch`` (None: no registered
    architecture), or ``InvalidArgumentError`` naming the suffix to use: a file is what its name says."""
    suffix = Path(path).suffix.lower()
    if suffix not in SAVE_FORMATS:
        wanted = ".safetensors or .pt2" if arch is not None else ".pt2"
        raise InvalidArgumentError(
            f"{path}: a saved model is named {wanted} (the format is chosen by the suffix)"
        )
    if SAVE_FORMATS[suffix] == "safetensors" and arch is None:
        raise InvalidArgumentError(
            f"{path}: safetensors holds weights only, which cannot rebuild a model of no registered "
            "architecture; name the file .pt2 (a torch.export program)"
        )
    return SAVE_FORMATS[suffix]


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
        raw = _pt2_description(file)
    if not raw:
        return {}
    try:
        description = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: its neuronmerge description is not valid JSON") from exc
    return description if isinstance(description, dict) else {}


def _pt2_description(file: Path) -> str | None:
    """The description ``save`` put in a ``.pt2`` archive, read without loading the program."""
    try:
        with zipfile.ZipFile(file) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/{_PT2_DESCRIPTION}")), None)
            return None if name is None else archive.read(name).decode()
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError):
        return None


def _umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a file of the same name in a temporary folder beside ``target``, then rename
    it over ``target``.

    Readers never see half a file, and an interrupted write leaves any old ``target`` intact. The
    writer sees the final file name (torch.export names its archive after it, ONNX its external
    data). Some writers create private files (safetensors: mode 0600), so the file is then given the
    mode the user's umask gives a new file, as ``open`` would. An ``OSError`` on the way
    (no such folder, no permission, disk full) becomes ``OutputWriteError``.
    """
    try:
        folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as exc:
        raise OutputWriteError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        temp = folder / target.name
        write(temp)
        os.chmod(temp, 0o666 & ~_umask())
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

    The suffix says the format (``save_format``). ``.safetensors`` needs ``arch`` (a registered
    architecture, possibly narrower than its default widths): the weights, with a JSON description in
    the header. ``.pt2``: a ``torch.export`` program traced on ``example_inputs`` (the architecture's
    own example when ``arch`` is given), loadable with plain PyTorch; it carries the same description
    and the input shapes, so that the command line needs no ``--input-shape`` to read it back.
    """
    target = Path(path)
    kind = save_format(target, arch)
    if target.exists() and not force:
        raise OutputExistsError(f"{target} exists; pass force=True (--force) to replace it")
    if not target.parent.is_dir():
        raise OutputWriteError(f"cannot write {target}: folder {target.parent} does not exist")
    name = None if arch is None else get_spec(arch).name
    if kind == "torch.export":
        if example_inputs is None:
            if name is None:
                raise InvalidArgumentError(
                    "saving a model of no registered architecture needs example inputs"
                )
            example_inputs = get_spec(name).example_inputs()
        inputs = as_input_tuple(example_inputs)
        _export_program(model, inputs, target, {"arch": name, **(description or {})})
        return target
    assert name is not None  # save_format refuses .safetensors without an architecture
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    model_from_state_dict(name, tensors)  # refuse to write what load() could not read back
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "arch": name, **(description or {})}
    metadata = {_METADATA_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(target, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    return target


def _export_program(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Path, description: Mapping[str, Any]
) -> None:
    """Write ``model`` as a ``torch.export`` archive, any batch size, its description inside."""
    batch_dynamic = tuple({0: torch.export.Dim.AUTO} for _ in inputs)
    try:
        program = torch.export.export(model, inputs, dynamic_shapes=batch_dynamic)
    except Exception as exc:  # torch.export raises many kinds; all mean "cannot capture"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export could not save {type(model).__name__}: {first}") from exc
    shapes = [list(t.shape[1:]) for t in inputs]  # per example: the batch size is free
    meta = {"version": FORMAT_VERSION, **description, "input_shapes": shapes}
    extra = {_PT2_DESCRIPTION: json.dumps(meta, sort_keys=True)}
    atomic_write(target, lambda temp: torch.export.save(program, temp, extra_files=extra))


def _inference_only(module: nn.Module) -> nn.Module:
    """Let ``eval()`` through on an exported program's module and refuse ``train()``.

    torch refuses both on the module of an ``ExportedProgram``: its graph is fixed in the mode it was
    exported in (save exports eval-mode models), so asking for eval mode is a no-op and only training
    mode is impossible. Accepting ``eval()`` lets the module go where any inference module goes
    (``evaluate``, ONNX export, ``compress`` again).
    """

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        if mode:
            raise NotImplementedError(
                "a torch.export program is fixed in inference mode; train the original model"
            )
        return nn.Module.train(self, False)  # the flags only: the graph is what it is

    module.train = types.MethodType(train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(lambda self: self.train(False), module)  # type: ignore[method-assign]
    return module.eval()


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Read a model written by ``save`` back as an ``nn.Module`` in eval mode: the registered
    architecture from ``.safetensors``, the program's module from ``.pt2`` (which accepts ``eval()``
    and refuses ``train()``: its graph is fixed)."""
    file = _existing_file(path)
    meta = read_metadata(file)
    if meta.get("format") == FORMAT:
        return model_from_state_dict(str(meta["arch"]), load_file(str(file), device="cpu"))
    if zipfile.is_zipfile(file):
        try:
            program = torch.export.load(file)
        except Exception:  # not an exported program: fall through to the message below
            pass
        else:
            return _inference_only(program.module())
    raise CheckpointError(
        f"{file} is not a model saved by neuronmerge; "
        "for a checkpoint use load_checkpoint(path, arch=...)"
    )
