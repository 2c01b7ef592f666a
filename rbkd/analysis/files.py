"""Atomic writers for the small result files of the analyses: JSON, CSV and raw bytes (PNG).

Every file lands through `rbkd.io.atomic_write_bytes` (temporary file in the same folder, fsync,
rename), so a crash never leaves half a table behind.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rbkd.io import jsonable, write_bytes, write_json

__all__ = ["write_bytes", "write_csv", "write_json"]


def write_csv(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> Path:
    """Write a CSV table with `header`, atomically. Floats are written in full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in jsonable(list(row))])
    return write_bytes(path, buf.getvalue().encode())
