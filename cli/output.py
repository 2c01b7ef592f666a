"""Printing a command's result: rich tables for people, one JSON document for scripts.

Two rules every command follows through these helpers:
- a table never cuts a number or a path: columns fold instead of ending in "…", and when stdout
  is a file or a pipe (no edge to fit) the table is drawn at its natural width;
- `--json` prints exactly one JSON document on stdout and nothing else (progress, epoch lines
  and warnings go to stderr), so `rbkd models --json | python -m json.tool` works.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import PurePath
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as one JSON document on stdout, nothing else."),
]

_WIDEST = 10_000  # an upper bound for measuring; no table of ours comes near it


def jsonable(value: Any) -> Any:
    """`value` as plain JSON: paths as strings, tuples as lists, NaN and inf as null (JSON has
    no NaN; jq and most parsers reject it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (PurePath, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # a tensor or an array
        return jsonable(value.tolist())
    return str(value)


def print_json(data: Any) -> None:
    """One JSON document on stdout: plain `sys.stdout`, never rich (no markup, no wrapping)."""
    import json

    sys.stdout.write(json.dumps(jsonable(data), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def never_cut(table: Table) -> Table:
    """Let every column fold (wrap at spaces, then between characters) instead of ending in "…"."""
    for column in table.columns:
        column.no_wrap = False
        column.overflow = "fold"
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    """Print `table` whole: folded to fit a terminal, at its natural width into a file or pipe."""
    if console is None:
        from rbkd.cli.common import console
    from rich.measure import Measurement

    never_cut(table)
    if not console.is_terminal:
        wide = console.options.update_width(_WIDEST)
        width = Measurement.get(console, wide, table).maximum
        if width > console.width:  # console.print(width=) only narrows: draw on a wider one
            console = Console(file=console.file, width=width, highlight=False)
    console.print(table)


def check_plot(path: os.PathLike | str | None) -> None:
    """--plot FILE, checked before any work: matplotlib importable and a .png, .pdf or .svg
    name (the format follows the suffix)."""
    if path is None:
        return
    from rbkd.analysis.plots import figure_format  # ImportError: "figures need matplotlib..."

    figure_format(path)
