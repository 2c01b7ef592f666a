"""PNG plots of the analyses, drawn with matplotlib's Agg canvas (no display, no pyplot state) and
written atomically."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rbkd.analysis.files import write_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLORS = ("black", "tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple")


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return write_bytes(path, buf.getvalue())


def plot_entropy_curves(
    path: str | os.PathLike,
    curves: Mapping[str, Mapping],
    *,
    per_class: bool = True,
    label_smoothing: Mapping[str, float] | None = None,
    max_entropy: float | None = None,
    title: str = "Soft-label entropy vs temperature",
) -> Path:
    """Thesis figure 4.4/5.2: bold mean entropy line per teacher, faded line per class, and
    dashed horizontal LS reference lines (their entropy does not depend on T).

    `curves` maps a name to an `EntropyTable.to_dict()`.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for i, (name, table) in enumerate(curves.items()):
        color = _COLORS[i % len(_COLORS)]
        temps = table["temperatures"]
        if per_class:
            for k, _ in enumerate(table["per_class_entropy"][0]):
                ys = [row[k] for row in table["per_class_entropy"]]
                if all(y is not None and not math.isnan(y) for y in ys):
                    ax.plot(temps, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(temps, table["mean_entropy"], color=color, linewidth=2.5, marker="o", label=name)
    if label_smoothing:
        for a, h in label_smoothing.items():
            ax.axhline(h, color="gray", linestyle="--", linewidth=0.8)
            ax.annotate(
                f"LS A={a}",
                (1.0, h),
                xycoords=("axes fraction", "data"),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=7,
                va="center",
                color="gray",
            )
    if max_entropy is not None:
        ax.axhline(max_entropy, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("temperature T")
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_projection(
    path: str | os.PathLike,
    coords: Sequence[Sequence[float]],
    labels: Sequence[int],
    classes: Sequence[int],
    template_coords: Sequence[Sequence[float]],
    *,
    class_names: Sequence[str] | None = None,
    title: str = "Penultimate-layer projection",
) -> Path:
    """Scatter plot of projected activations, one colour per class. The class templates are
    drawn as stars, scaled by one common factor so the farthest sits at the edge of the data
    (final-layer weights are usually far smaller than the activations)."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    colors = ("tab:blue", "tab:orange", "tab:green")
    radius = max((math.hypot(x, y) for x, y in coords), default=1.0)
    t_radius = max((math.hypot(x, y) for x, y in template_coords), default=0.0)
    scale = radius / t_radius if t_radius > 0 else 1.0
    for k, color, t in zip(classes, colors, template_coords, strict=True):
        pts = [xy for xy, y in zip(coords, labels, strict=True) if y == k]
        name = class_names[k] if class_names and k < len(class_names) else f"class {k}"
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=8, alpha=0.6, color=color, label=name)
        ax.scatter(
            [t[0] * scale], [t[1] * scale], marker="*", s=250, color=color, edgecolors="black"
        )
    ax.text(
        0.01,
        0.01,
        f"stars: class templates x {scale:.3g}",
        transform=ax.transAxes,
        fontsize=7,
        color="gray",
    )
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_lines(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path:
    """Line plot of named (x, y) series: accuracy vs examples per class, entropy vs batch size."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for i, (name, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, marker="o", linewidth=2, color=_COLORS[i % len(_COLORS)], label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(loc="best")
    return _save(fig, path)


def plot_bars(
    path: str | os.PathLike,
    names: Sequence[str],
    values: Sequence[float],
    *,
    ylabel: str,
    title: str,
) -> Path:
    """Bar chart (missing-class accuracy per excluded class)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.bar(range(len(values)), [0.0 if v is None or math.isnan(v) else v for v in values])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
