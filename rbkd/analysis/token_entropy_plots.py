"""The figure of `rbkd analyze entropy STORE`: four panels drawn from rbkd.analysis.token_entropy's
tables (the thesis's figure 5.3, for a language model's tokens).

(a) mean entropy against T, one line per store; (b) by frequency rank of the input token,
(c) by position in the document and (d) the teacher's mean top-k mass against k, at each T (one
store) or at one T all stores share (several stores: T = 1 if they all hold it). Entropy axes are
fixed to [0, ln V] (a little room above), the mass axis to [0, 1]: a flat result looks flat and
two stores of one vocabulary compare at a glance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from rbkd.analysis.plots import (
    _finite,
    _new_figure,
    _save,
    color,
    entropy_axis,
    log_axis_at,
    plain_numbers,
)

_STYLES = ("-", "--", ":", "-.")


def _label(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _lines(results: Mapping[str, Mapping]) -> list[tuple[str, Mapping, int, str, str]]:
    """(name, result, temperature column, colour, legend label) of each drawn line in panels
    (b)-(d): every T of a single store, or each store at the first T all of them hold."""
    if len(results) == 1:
        name, res = next(iter(results.items()))
        return [(name, res, c, color(c), f"T = {t:g}") for c, t in enumerate(res["temperatures"])]
    common = set.intersection(*(set(r["temperatures"]) for r in results.values()))
    out = []
    for i, (name, res) in enumerate(results.items()):
        temps = res["temperatures"]
        # T = 1 where every store has it (the language model's own distribution), else the
        # smallest shared T, else each store's first
        shared = 1.0 if 1.0 in common else min(common) if common else temps[0]
        c = temps.index(shared)
        out.append((name, res, c, color(i), f"{name}, T = {temps[c]:g}"))
    return out


def _ys(values) -> list[float]:
    return [v if _finite(v) else math.nan for v in values]


def plot_token_entropy(
    path: str | os.PathLike,
    results: Mapping[str, Mapping],
    *,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Draw the four panels for `results` ({name: token_entropy(...)}) to a .png, .pdf or .svg."""
    labels = dict(labels or {})
    named = {labels.get(n, n): r for n, r in results.items()}
    fig = _new_figure(path, (11, 8))
    axes = fig.subplots(2, 2)
    max_h = max(r["max_entropy"] for r in named.values())
    vocab = max(r["vocab_size"] for r in named.values())

    ax = axes[0][0]
    for i, (name, res) in enumerate(named.items()):
        ax.plot(res["temperatures"], _ys(res["mean_entropy"]), color=color(i), marker="o",
                linewidth=2, ms=4, label=name)  # fmt: skip
    ax.axhline(max_h, color="gray", linestyle=":", linewidth=1.2, label=f"ln V = {max_h:.3f}")
    ax.set_xlabel("temperature T")
    ax.set_title("(a) mean token entropy against T")

    lines = _lines(named)
    for ax, table, bounds, xlabel, title in (
        (axes[0][1], "by_input_frequency", "ranks", "frequency rank of the input token",
         "(b) by token frequency (1 = most frequent)"),
        (axes[1][0], "by_position", "offsets", "position in the document",
         "(c) by position in the document"),
    ):  # fmt: skip
        ticks: list[str] = []
        for j, (_, res, c, col, legend) in enumerate(lines):
            buckets = res[table]["buckets"]
            names = [_label(*b[bounds]) for b in buckets]
            if len(names) > len(ticks):
                ticks = names
            ys = _ys(b["mean_entropy"][c] for b in buckets)
            style = _STYLES[j % len(_STYLES)] if len(named) == 1 else "-"
            ax.plot(range(len(ys)), ys, color=col, linestyle=style, marker="o", ms=4, label=legend)
        ax.set_xticks(range(len(ticks)), ticks, rotation=30 if len(ticks) > 6 else 0, fontsize=8)
        ax.axhline(max_h, color="gray", linestyle=":", linewidth=1.2)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
    for ax in (axes[0][0], axes[0][1], axes[1][0]):
        ax.set_ylabel("mean entropy (nats)")
        ax.set_ylim(entropy_axis(max_h))
        plain_numbers(ax.yaxis)

    ax = axes[1][1]
    ks: list[int] = []
    for _, res, c, col, legend in lines:
        mass = res["topk_mass"]["mean_mass"][c]
        if mass is None:
            continue
        ks = res["topk_mass"]["k"]
        ax.plot(ks, _ys(mass), color=col, marker="o" if len(ks) <= 32 else None, ms=3,
                linewidth=2, label=legend)  # fmt: skip
    if ks and max(ks) > 1:
        log_axis_at(ax, [k for k in ks if k & (k - 1) == 0 or k == ks[-1]])
    ax.set_ylim(0, 1.02)
    plain_numbers(ax.yaxis)
    ax.set_xlabel("k (log scale)" if ks and max(ks) > 1 else "k")
    ax.set_ylabel("teacher's mean probability in its top k")
    ax.set_title("(d) top-k mass against k")
    for ax in (a for row in axes for a in row):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(f"Token soft-label entropy (V = {vocab:,})")
    return _save(fig, path)
