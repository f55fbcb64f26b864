"""A reader for the IDX format of (Fashion-)MNIST, gzip-compressed or raw.

The format is a 4-byte magic ``0x00 0x00 <dtype code> <ndims>``, then ``ndims`` big-endian uint32
sizes, then the row-major payload in big-endian order. We validate all of it, because a silently
short or mis-typed array would surface much later as a puzzling accuracy, not as an error.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from neuronmerge.errors import DatasetCorruptError, DatasetNotFoundError

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes -> big-endian numpy dtypes.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's decompressed content; gzip is detected by content, not by the file name."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"IDX file not found: {path}") from exc
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetCorruptError(
            f"{path}: damaged gzip stream ({exc}); re-install or re-copy it"
        ) from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode the IDX file at ``path`` (``.gz`` or raw) into a writable native-endian array.

    Raises ``DatasetNotFoundError`` if the file is missing and ``DatasetCorruptError`` if its
    header is malformed or the payload length does not match the dimensions in the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetCorruptError(
            f"{path}: not an IDX file (magic {data[:4].hex(' ') or 'empty'}, "
            "expected 00 00 <type> <ndims>)"
        )
    code, ndims = data[2], data[3]
    dtype = _DTYPES.get(code)
    if dtype is None:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise DatasetCorruptError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    header = 4 + 4 * ndims
    if ndims == 0 or len(data) < header:
        raise DatasetCorruptError(f"{path}: IDX header with {ndims} dimensions is truncated")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndims, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        raise DatasetCorruptError(
            f"{path}: payload is {actual} bytes but dimensions {dims} of {dtype.name} need "
            f"{expected} bytes (truncated or damaged file)"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))
