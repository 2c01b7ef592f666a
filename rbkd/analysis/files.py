"""Atomic writers for the small result files of the analyses: JSON, CSV and raw bytes (PNG).

Every file lands through `rbkd.io.atomic_write_bytes` (temporary file in the same folder, fsync,
rename), so a crash never leaves half a table behind. An existing file is replaced only when it
is recognisably the same kind of result (the same CSV header, a JSON object with the same keys):
rbkd never overwrites a file of the user's (rbkd.io.check_new_file says so in one line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rbkd import io as rbkd_io
from rbkd.io import check_new_file, jsonable, write_bytes

__all__ = ["write_bytes", "write_csv", "write_json"]


def _first_line(path: Path) -> str:
    with path.open("rb") as f:
        return f.readline(1 << 16).decode("utf-8", "replace").rstrip("\r\n")


def write_csv(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> Path:
    """Write a CSV table with `header`, atomically; floats in full precision, formula-like text
    cells neutralised (rbkd.io.csv_cell). Replaces only a CSV with the same header."""
    wanted = ",".join(str(rbkd_io.csv_cell(str(h))) for h in header)
    path = check_new_file(path, "CSV table", owned=lambda p: _first_line(p) == wanted)
    return rbkd_io.write_csv(path, list(header), rows)


def _same_json_keys(path: Path, keys: set[str]) -> bool:
    try:
        with path.open() as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and set(old) == keys


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON, atomically. Replaces only a JSON object with the same keys."""
    value = jsonable(obj)
    keys = set(value) if isinstance(value, dict) else set()
    path = check_new_file(
        path, "JSON file", owned=lambda p: bool(keys) and _same_json_keys(p, keys)
    )
    return rbkd_io.write_json(path, obj)
