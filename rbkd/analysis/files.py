"""Atomic writers for the small result files of the analyses: JSON, CSV and raw bytes (PNG).

Every file lands through `rbkd.io.atomic_write_bytes` (temporary file in the same folder, fsync,
rename), so a crash never leaves half a table behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rbkd.io import atomic_write_bytes


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def _jsonable(value: Any) -> Any:
    """NaN and inf become null (JSON has no spelling for them); tensors and tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _jsonable(value.tolist())
    return value


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically. NaN/inf are written as null."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return write_bytes(path, text.encode())


def write_csv(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> Path:
    """Write a CSV table with `header`, atomically. Floats are written in full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in _jsonable(list(row))])
    return write_bytes(path, buf.getvalue().encode())
