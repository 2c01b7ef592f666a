"""Printing a command's result: rich tables for people, one JSON document for scripts.

Two rules every command follows through these helpers:
- a table never cuts a number or a path: on a terminal it wraps at spaces (and a table whose
  longest words do not fit is printed row by row, `header: value`); into a file or a pipe (no
  edge to fit) it is drawn at its natural width;
- `--json` prints exactly one JSON document on stdout and nothing else (progress, epoch lines
  and warnings go to stderr), so `rbkd models --json | python -m json.tool` works.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import PurePath
from typing import Annotated, Any

import typer
from rbkd.cli.consoles import console
from rbkd.cli.usage import usage_errors
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

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


def other_rank() -> bool:
    """Under torchrun every rank runs the command; rank 0 alone reports (as it alone writes).
    torchrun's RANK, read here without importing torch (rbkd.engine.distributed does the same)."""
    return int(os.environ.get("RANK", "0") or 0) != 0


def print_json(data: Any) -> None:
    """One JSON document on stdout: plain `sys.stdout`, never rich (no markup, no wrapping)."""
    if other_rank():
        return
    sys.stdout.write(json.dumps(jsonable(data), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def titled_table(title: str, **kwargs: Any) -> Table:
    """A rich Table at least as wide as its title, so the title never wraps mid-phrase."""
    kwargs.setdefault("min_width", min(len(Text.from_markup(title).plain) + 4, 100))
    return Table(title=title, **kwargs)


def never_cut(table: Table) -> Table:
    """Let every column wrap at spaces and fold what is left instead of ending in "…"."""
    for column in table.columns:
        column.no_wrap = False
        column.overflow = "fold"
    return table


def print_records(table: Table, console: Console) -> None:
    """A table one row at a time, one `header: value` line per cell (psql's expanded display):
    for a terminal too narrow for the table's longest words. Lines are soft-wrapped by the
    terminal, never cut."""

    def plain(cell: Any) -> Text:
        return Text.from_markup(cell) if isinstance(cell, str) else Text(str(cell))

    if table.title:
        console.print(plain(table.title), soft_wrap=True)
    columns = [list(column.cells) for column in table.columns]
    for r in range(table.row_count):
        cells = [plain(column[r]) if r < len(column) else Text() for column in columns]
        if table.show_header:
            for column, cell in zip(table.columns, cells, strict=True):
                console.print(Text.assemble(plain(column.header), ": ", cell), soft_wrap=True)
            console.print()
        else:
            console.print(Text(": ").join(cells), soft_wrap=True)


def print_table(table: Table, target: Console | None = None) -> None:
    """Print `table` whole on `target` (default: stdout's console): wrapped at spaces to fit a
    terminal (row by row, as records, when even its longest words do not fit), at its natural
    width into a file or pipe."""
    if other_rank():
        return
    out = target or console
    never_cut(table)
    need = Measurement.get(out, out.options.update_width(_WIDEST), table)
    if not out.is_terminal:
        if need.maximum > out.width:  # console.print(width=) only narrows: draw wider
            out = Console(file=out.file, width=need.maximum, highlight=False)
    elif need.minimum > out.width:
        print_records(table, out)
        return
    out.print(table)


def check_plot(path: os.PathLike | str | None) -> None:
    """--plot FILE, checked before any work: matplotlib importable, a .png, .pdf or .svg name
    (the format follows the suffix), and a new file or a figure rbkd drew (a file of the user's
    is never replaced: one line naming it)."""
    if path is None:
        return
    # Here, not at the top: rbkd.analysis.plots imports matplotlib (slow, and the optional
    # `plots` extra: without it this is the one-line ImportError "figures need matplotlib...").
    from rbkd.analysis.plots import check_figure_target, figure_format

    with usage_errors():  # a name matplotlib cannot write is a usage error (exit 2)
        figure_format(path)
    check_figure_target(path)
