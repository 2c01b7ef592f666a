"""Formatting for the report's Markdown: cells, numbers, tables, slugs and heading anchors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from rbkd.study.report.load import finite, mean_std

DASH = "–"


def format_cell(
    values: Iterable[Any], *, scale: float = 100.0, digits: int = 1, seeds: int = 0
) -> str:
    """ "91.9" for one value, "91.9 ± 1.2" for several (sample std), "–" for none; " (n=2)" is
    added when fewer values than the study's `seeds` are there yet."""
    m, s, n = mean_std(values)
    if m is None:
        return DASH
    text = f"{m * scale:.{digits}f}"
    if s is not None:
        text += f" ± {s * scale:.{digits}f}"
    if seeds > 1 and n < seeds:
        text += f" (n={n})"
    return text


def fmt_num(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if finite(v) else DASH if v is None else str(v)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def anchor(title: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub Markdown table; `align` per column: "l" or "r" (default: first left, rest right)."""
    header = [_md_escape(h) for h in header]
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_entropy(v: float | None) -> str:
    return f"{v:.4f}" if finite(v) else DASH


def fmt_seconds(v: Any) -> str:
    return f"{v:.0f}" if finite(v) else DASH


def fmt_count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def fmt_epochs(e: int) -> str:
    return f"{e} epoch" if e == 1 else f"{e} epochs"


def class_label(names: Sequence[str], k: int) -> str:
    """Class k's name, or its number when the study has fewer names."""
    return names[k] if k < len(names) else str(k)
