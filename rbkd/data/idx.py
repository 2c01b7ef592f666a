"""IDX files (MNIST, Fashion-MNIST): a big-endian header, then unsigned bytes.

Header: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then one
uint32 per dimension. Labels are magic 2049 (ubyte, 1 dim), images 2051 (ubyte, 3 dims).
Files may be gzipped or not; gzip is recognised by its own magic bytes, not by the file name.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from rbkd.data.errors import DataError
from rbkd.io import atomic_write_bytes, read_bounded

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "read_idx", "read_maybe_gzip", "write_idx"]

IDX_LABELS_MAGIC = 2049
IDX_IMAGES_MAGIC = 2051
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


# The largest IDX file rbkd reads is 47 MB (60,000 images of 28x28); 256 MiB, compressed or not,
# leaves room for any MNIST-like set and stops a gzip bomb before it fills the memory.
MAX_IDX_BYTES = 256 << 20


def read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped if it is a gzip stream; a truncated or corrupt gzip is a
    DataError naming the file. Only regular files of at most MAX_IDX_BYTES (also unpacked)."""
    try:
        raw = read_bounded(path, MAX_IDX_BYTES, "dataset file")
    except ValueError as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            data = stream.read(MAX_IDX_BYTES + 1)
        if len(data) > MAX_IDX_BYTES:
            raise DataError(
                f"{path} unpacks to more than {MAX_IDX_BYTES >> 20} MiB, far more than any "
                "IDX dataset: delete it and fetch it again"
            )
        return data
    except EOFError as exc:
        raise DataError(
            f"{path} is a truncated gzip file ({len(raw)} bytes): delete it and fetch it again"
        ) from exc
    except (OSError, zlib.error) as exc:
        raise DataError(
            f"{path} is a corrupt gzip file ({exc}): delete it and fetch it again"
        ) from exc


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes into a uint8 array of the shape its header gives.

    Checks the magic number (against `expected_magic` if given), the header length and that the
    payload holds exactly prod(dims) bytes.
    """
    path = Path(path)
    data = read_maybe_gzip(path)
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file: only {len(data)} bytes")
    (magic,) = struct.unpack(">I", data[:4])
    zeros, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zeros != 0 or type_code != _UBYTE or ndim == 0:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes: magic number {magic} "
            f"(expected {IDX_LABELS_MAGIC} for labels or {IDX_IMAGES_MAGIC} for images)"
        )
    if expected_magic is not None and magic != expected_magic:
        kind = "labels" if expected_magic == IDX_LABELS_MAGIC else "images"
        raise DataError(
            f"{path} has IDX magic number {magic}, expected {expected_magic} ({kind}); "
            "are the images and labels files swapped?"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path} is truncated inside its IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = math.prod(dims)
    payload = len(data) - header_size
    if payload != expected:
        shape = " x ".join(map(str, dims))
        what = "truncated" if payload < expected else "too long"
        raise DataError(
            f"{path} is {what}: its header says {shape} = {expected} bytes of data, "
            f"the file holds {payload}"
        )
    # A copy, so the tensor made from it owns writable memory rather than the bytes object.
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz), atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"IDX arrays must be uint8, got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX arrays need 1 to 255 dimensions, got {array.ndim}")
    header = struct.pack(">I", (_UBYTE << 8) | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
