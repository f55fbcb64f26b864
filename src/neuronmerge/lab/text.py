"""The King James Bible as a byte-level language-modelling corpus, from Debian's ``bible-kjv-text``.

The package stores the text in its own compressed format (``bible.data`` in ``/usr/lib``) that only its
companion reader ``bible`` (package ``bible-kjv``) decodes, so the text is read through that program:
one verse per line, about 4.4 MB of ASCII. Validation and test are whole chapters held out of training
(every 40th chapter each, at two different offsets), so no verse of a held-out chapter is ever trained
on and both splits sample the whole book rather than its last pages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from neuronmerge.errors import DatasetCorruptError, DatasetNotFoundError

#: Debian packages that provide the text (``bible.data``) and its reader (``bible``).
KJV_PACKAGES = ("bible-kjv-text", "bible-kjv")
DEFAULT_KJV_DIR = "/usr/lib"
KJV_DIR_ENV_VAR = "NEURONMERGE_KJV_DIR"
_HOLD_OUT_EVERY = 40
_VAL_OFFSET, _TEST_OFFSET = 17, 37
_INSTALL = f"apt-get install {' '.join(KJV_PACKAGES)} (or run `make data`)"


@dataclass(frozen=True)
class Corpus:
    """Byte tokens (``uint8``, vocabulary 256) of the three splits."""

    train: Tensor
    val: Tensor
    test: Tensor

    def split(self, name: str) -> Tensor:
        """The tokens of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        tokens: Tensor = getattr(self, name)
        return tokens


def read_verses(directory: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """Every verse as ``(chapter reference, text)``, e.g. ``("Ge1", "In the beginning ...")``.

    ``directory`` holds ``bible.data`` (default ``$NEURONMERGE_KJV_DIR`` or ``/usr/lib``).
    """
    folder = Path(directory or os.environ.get(KJV_DIR_ENV_VAR) or DEFAULT_KJV_DIR)
    if not (folder / "bible.data").is_file():
        raise DatasetNotFoundError(
            f"the King James Bible text is not in {folder} (no bible.data); install the Debian "
            f"package {KJV_PACKAGES[0]}: {_INSTALL}"
        )
    reader = shutil.which("bible")
    if reader is None:
        raise DatasetNotFoundError(
            f"found {folder / 'bible.data'} but not its reader `bible` (Debian package "
            f"{KJV_PACKAGES[1]}): {_INSTALL}"
        )
    done = subprocess.run(
        [reader, "-p", str(folder), "-f", "gen1:1-rev22:21"],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    verses = []
    for line in done.stdout.splitlines():
        ref, _, text = line.partition(" ")
        if ":" in ref and text:
            verses.append((ref.split(":", 1)[0], text))
    # 31,102 verses in the KJV; anything far short of it is a damaged file or a failing reader.
    if done.returncode != 0 or len(verses) < 30_000:
        raise DatasetCorruptError(
            f"`bible` read only {len(verses)} verses from {folder / 'bible.data'} (exit "
            f"{done.returncode}): reinstall {KJV_PACKAGES[0]}: {_INSTALL}"
        )
    return verses


def load_kjv(directory: str | os.PathLike[str] | None = None) -> Corpus:
    """The corpus split by chapter: every 40th chapter to validation, another 40th to test."""
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    chapter, ordinal = None, -1
    for ref, text in read_verses(directory):
        if ref != chapter:
            chapter, ordinal = ref, ordinal + 1
        slot = ordinal % _HOLD_OUT_EVERY
        name = "val" if slot == _VAL_OFFSET else "test" if slot == _TEST_OFFSET else "train"
        parts[name].append(text + "\n")

    def encode(lines: list[str]) -> Tensor:
        data = bytearray("".join(lines).encode("utf-8"))
        return torch.frombuffer(data, dtype=torch.uint8).clone()

    return Corpus(encode(parts["train"]), encode(parts["val"]), encode(parts["test"]))
