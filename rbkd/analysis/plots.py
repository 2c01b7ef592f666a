"""Paper-grade figures of the analyses, drawn with matplotlib's Agg canvas (no display, no pyplot
state) and written atomically (`rbkd.io.write_bytes`).

Conventions every figure follows (the thesis's figures, made readable):
- the file format comes from the file name: .png, .pdf or .svg (anything else: ValueError);
- numeric axes show plain numbers: no offset ("+2.302"), no scientific notation, and batch sizes
  on a log axis are labelled 16, 64, 4096, not 2^4;
- classes are named (categorical axes), reference lines carry a label, titles name the dataset and
  the teacher, and legend names can be replaced by the caller (`labels`).
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rbkd.io import write_bytes

MISSING_MATPLOTLIB = "figures need matplotlib: pip install 'rbkd[plots]'"
try:  # matplotlib is the optional `plots` extra
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter
except ImportError as exc:
    raise ImportError(MISSING_MATPLOTLIB) from exc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
# The first bytes of each format: what the tests (and a careful caller) check.
SIGNATURES = {"png": PNG_SIGNATURE, "pdf": b"%PDF-", "svg": b"<?xml"}
_COLORS = ("black", "tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple")
CLASS_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
DPI = 150


def figure_format(path: str | os.PathLike) -> str:
    """ "png", "pdf" or "svg" from the file name's suffix; ValueError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise ValueError(
            f"cannot write a figure to {os.fspath(path)!r}: the name must end in .png, .pdf or "
            f".svg (got {suffix or 'no suffix'!r})"
        )
    return FIGURE_FORMATS[suffix]


def color(i: int) -> str:
    """The i-th colour of the house palette (black first, as in the thesis's figures)."""
    return _COLORS[i % len(_COLORS)]


# Every figure rbkd draws carries this in its metadata (PNG Software, PDF and SVG Creator): the
# mark that lets a later figure replace it. A file without it is the user's and is not replaced.
FIGURE_MARK = "rbkd-figure"
MAX_FIGURE_BYTES = 64 << 20  # rbkd's figures are well under a few MB


def is_rbkd_figure(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file holding a figure rbkd drew (its metadata mark)."""
    from rbkd.io import read_bounded

    try:
        return FIGURE_MARK.encode() in read_bounded(path, MAX_FIGURE_BYTES, "figure")
    except (OSError, ValueError):
        return False


def check_figure_target(path: str | os.PathLike) -> Path:
    """`path` if a figure may be written there: a new file, a figure rbkd drew, or any file of
    a report folder rbkd owns (it holds the report's figure list). A file of the user's is
    refused with one line (rbkd.io.NotOursError, a ValueError)."""
    from rbkd.io import check_new_file

    path = Path(path)

    def owned(existing: Path) -> bool:
        return (existing.parent / ".report-figures.json").is_file() or is_rbkd_figure(existing)

    return check_new_file(
        path, "figure", owned=owned, todo="give another file name, or delete it first"
    )


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    fmt = figure_format(path)
    check_figure_target(path)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No creation date in PDFs and a fixed id salt in SVGs: the same data gives the same bytes.
    metadata = {
        "png": {"Software": FIGURE_MARK},
        "pdf": {"CreationDate": None, "Creator": FIGURE_MARK},
        "svg": {"Date": None, "Creator": FIGURE_MARK},
    }[fmt]
    with rc_context({"svg.hashsalt": "rbkd"}):
        # constrained layout already fits everything in; "tight" would draw the figure twice
        tight = None if fig.get_layout_engine() is not None else "tight"
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches=tight, metadata=metadata)
    return write_bytes(path, buf.getvalue())


def _new_figure(path: str | os.PathLike, figsize: tuple[float, float]) -> Figure:
    figure_format(path)  # fail before drawing, not after
    check_figure_target(path)
    fig = Figure(figsize=figsize)
    fig.set_layout_engine("constrained")
    return fig


def plain_numbers(axis) -> None:
    """Plain tick labels on a linear axis: no offset (+2.302) and no scientific notation."""
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)


def log_axis_at(ax, values: Sequence[float], base: int = 2) -> None:
    """A log x axis whose ticks sit at the data's own values, labelled as plain numbers (64,
    4096; never 2^6), without minor ticks."""
    ax.set_xscale("log", base=base)
    axis = ax.xaxis
    ticks = sorted({float(v) for v in values})
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(_PlainFormatter())


class _PlainFormatter(ScalarFormatter):
    def __init__(self) -> None:
        super().__init__(useOffset=False)
        self.set_scientific(False)

    def __call__(self, x, pos=None) -> str:
        return f"{x:g}" if abs(x) < 1e6 else f"{x:.0f}"


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def entropy_axis(max_entropy: float) -> tuple[float, float]:
    """The fixed y range of an entropy figure: 0 to ln C and a little room above it, so a flat
    result looks flat (an auto-zoomed axis showed 2.3011-2.3026 as a steep rise) and figures
    of one dataset compare at a glance."""
    return (0.0, float(max_entropy) * 1.05)


@dataclass
class Reference:
    """A horizontal reference line (ln C, a label-smoothing level, the full-data student)."""

    value: float
    label: str
    color: str = "gray"
    linestyle: str = ":"


@dataclass
class Band:
    """A shaded horizontal band between two values (the label-smoothing entropy range)."""

    low: float
    high: float
    label: str
    color: str = "tab:gray"


def _draw_references(ax, references: Sequence[Reference], bands: Sequence[Band] = ()) -> None:
    for band in bands:
        lo, hi = sorted((band.low, band.high))
        if hi - lo < 1e-9:  # one A: a line, not an invisible band
            ax.axhline(lo, color=band.color, linewidth=1.5, alpha=0.6, label=band.label)
        else:
            ax.axhspan(lo, hi, color=band.color, alpha=0.2, linewidth=0, label=band.label)
    for ref in references:
        if _finite(ref.value):
            ax.axhline(
                ref.value, color=ref.color, linestyle=ref.linestyle, linewidth=1.2, label=ref.label
            )


# ------------------------------------------------------------------ entropy
def plot_entropy_curves(
    path: str | os.PathLike,
    curves: Mapping[str, Mapping],
    *,
    per_class: bool = True,
    label_smoothing: Mapping[str, float] | None = None,
    max_entropy: float | None = None,
    title: str = "Soft-label entropy vs temperature",
    band: Band | None = None,
    labels: Mapping[str, str] | None = None,
    bold: Sequence[str] = (),
) -> Path:
    """Thesis figures 4.4, 5.2-5.4 and 6.4: a bold mean-entropy line per teacher (faded lines per
    class with `per_class`), dashed label-smoothing levels (`label_smoothing`: {A: entropy}; LS
    targets do not depend on T) or a shaded LS band, and the ln C line labelled.

    `curves` maps a name to an `EntropyTable.to_dict()` (at least "temperatures" and
    "mean_entropy"; "per_class_entropy" for `per_class`). `labels` renames legend entries;
    names in `bold` are drawn thicker (the small teacher of figure 6.4).
    """
    labels = labels or {}
    fig = _new_figure(path, (7, 4.5))
    ax = fig.add_subplot()
    for i, (name, table) in enumerate(curves.items()):
        c = color(i)
        temps = table["temperatures"]
        if per_class and table.get("per_class_entropy"):
            for k, _ in enumerate(table["per_class_entropy"][0]):
                ys = [row[k] for row in table["per_class_entropy"]]
                if all(_finite(y) for y in ys):
                    ax.plot(temps, ys, color=c, alpha=0.25, linewidth=0.8)
        ys = [y if _finite(y) else math.nan for y in table["mean_entropy"]]
        width = 3.5 if name in bold else 2.0
        ax.plot(temps, ys, color=c, linewidth=width, marker="o", ms=4, label=labels.get(name, name))
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
    refs = [] if max_entropy is None else [Reference(max_entropy, f"ln C = {max_entropy:.3f}")]
    _draw_references(ax, refs, [band] if band else [])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("mean soft-label entropy (nats)")
    plain_numbers(ax.xaxis)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    plain_numbers(ax.yaxis)
    if max_entropy is not None and _finite(max_entropy) and max_entropy > 0:
        ax.set_ylim(entropy_axis(max_entropy))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_entropy_hypothesis(
    path: str | os.PathLike,
    names: Sequence[str],
    entropies: Sequence[float],
    *,
    T: float,
    band: Band | None = None,
    max_entropy: float | None = None,
    accuracies: Sequence[float | None] | None = None,
    accuracy_label: str = "mean missing-class accuracy of its students (%)",
    title: str = "Entropy form of the soft-label hypothesis",
) -> Path:
    """Thesis figures 5.15 / 6.8: each teacher (categorical axis) at its mean soft-label entropy
    at T, against the label-smoothing band: near the band distillation behaves like LS, far above
    it like RBKD. With `accuracies` (percent; None where a teacher has no students) a second axis
    shows what its students learnt of a class they never saw."""
    fig = _new_figure(path, (max(6.0, 1.1 * len(names) + 3), 4.8))
    ax = fig.add_subplot()
    xs = list(range(len(names)))
    ys = [e if _finite(e) else math.nan for e in entropies]
    ax.bar(xs, ys, width=0.55, color="tab:blue", alpha=0.85, label=f"mean entropy at T={T:g}")
    for x, y in zip(xs, ys, strict=True):
        if _finite(y):
            ax.annotate(
                f"{y:.3f}",
                (x, y),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    refs = [] if max_entropy is None else [Reference(max_entropy, f"ln C = {max_entropy:.3f}")]
    _draw_references(ax, refs, [band] if band else [])
    ax.set_xticks(
        xs,
        list(names),
        rotation=25 if len(names) > 3 else 0,
        ha="right" if len(names) > 3 else "center",
    )
    ax.set_ylabel(f"mean soft-label entropy at T={T:g} (nats)")
    plain_numbers(ax.yaxis)
    ax.set_ylim(bottom=0)
    handles, legend_labels = ax.get_legend_handles_labels()
    if accuracies is not None and any(_finite(a) for a in accuracies):
        ax2 = ax.twinx()
        pts = [(x, a) for x, a in zip(xs, accuracies, strict=True) if _finite(a)]
        ax2.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            linestyle="none",
            marker="D",
            ms=8,
            color="tab:red",
            label=accuracy_label,
        )
        ax2.set_ylim(0, 105)
        ax2.set_ylabel(accuracy_label, color="tab:red")
        plain_numbers(ax2.yaxis)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, legend_labels = handles + h2, legend_labels + l2
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.legend(handles, legend_labels, loc="outside lower center", ncols=2, fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------ lines with error bands
@dataclass
class Series:
    """One line: y (and optional ± err, drawn as a shaded band) against x."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    err: Sequence[float] | None = None
    color: str | None = None
    linestyle: str = "-"
    marker: str = "o"
    linewidth: float = 2.0


def plot_series(
    path: str | os.PathLike,
    series: Sequence[Series],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    references: Sequence[Reference] = (),
    legend_title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Lines with error bands (mean ± std over seeds) and labelled reference lines: transfer-set
    curves (figures 5.5, 5.8, 6.6), entropy against batch size or epochs (6.2, 6.3), student
    accuracy against T (6.5). With `logx` the x axis is logarithmic with ticks at the data's own
    values, written as plain numbers, and its label says "(log scale)": 10, 50, 200 sit almost
    evenly spaced there, which a reader would otherwise take for a categorical axis. `ylim`
    fixes the y range (entropy: `entropy_axis`). A series of one point is drawn as a point (a
    marker even where its style has none), never as an invisible one-point line."""
    fig = _new_figure(path, (7, 4.5))
    ax = fig.add_subplot()
    xs_all: list[float] = []
    for i, s in enumerate(series):
        c = s.color or color(i)
        pts = sorted(
            (float(x), float(y), float(e) if s.err is not None and _finite(e) else 0.0)
            for x, y, e in zip(
                s.x, s.y, s.err if s.err is not None else [None] * len(s.x), strict=True
            )
            if _finite(x) and _finite(y)
        )
        if not pts:
            continue
        xs, ys, es = (list(v) for v in zip(*pts, strict=True))
        xs_all += xs
        marker = s.marker if s.marker not in ("", "none", None) or len(pts) > 1 else "o"
        ax.plot(
            xs,
            ys,
            color=c,
            linestyle=s.linestyle,
            marker=marker,
            ms=4 if marker == s.marker else 6,
            linewidth=s.linewidth,
            label=s.name,
        )
        if s.err is not None and any(e > 0 for e in es):
            ax.fill_between(
                xs,
                [y - e for y, e in zip(ys, es, strict=True)],
                [y + e for y, e in zip(ys, es, strict=True)],
                color=c,
                alpha=0.15,
                linewidth=0,
            )
    _draw_references(ax, references)
    if logx and xs_all and min(xs_all) > 0:
        log_axis_at(ax, xs_all, base=2)
    else:
        plain_numbers(ax.xaxis)
        if xs_all and all(float(x).is_integer() for x in xs_all):
            if len(set(xs_all)) <= 12:
                ax.set_xticks(sorted(set(xs_all)))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    plain_numbers(ax.yaxis)
    if ylim is not None:
        ax.set_ylim(ylim)
    log_note = " (log scale)"
    ax.set_xlabel(xlabel + log_note if ax.get_xscale() == "log" and "log" not in xlabel else xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) + len(references) > 1:
        # handles 3.5 em long: at the default 2 a dashed line shows one dash and reads as solid
        style = dict(fontsize=8, title=legend_title, title_fontsize=8, handlelength=3.5)
        if len(series) + len(references) > 6:  # a long legend goes beside the axes
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), **style)
        else:
            ax.legend(loc="best", **style)
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
    """Line plot of named (x, y) series: accuracy vs examples per class, entropy vs batch size.
    With `logx` the axis is log2 with ticks at the data's values as plain numbers."""
    return plot_series(
        path,
        [Series(name, xs, ys) for name, (xs, ys) in series.items()],
        xlabel=xlabel,
        ylabel=ylabel,
        title=title,
        logx=logx,
    )


def plot_bars(
    path: str | os.PathLike,
    names: Sequence[str],
    values: Sequence[float],
    *,
    ylabel: str,
    title: str,
) -> Path:
    """Bar chart on a categorical axis (missing-class accuracy per excluded class)."""
    fig = _new_figure(path, (7, 4))
    ax = fig.add_subplot()
    ax.bar(range(len(values)), [v if _finite(v) else 0.0 for v in values])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    plain_numbers(ax.yaxis)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# ------------------------------------------------------------------ tables as heatmaps
def plot_table_heatmap(
    path: str | os.PathLike,
    values: Sequence[Sequence[float | None]],
    row_names: Sequence[str],
    col_names: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    stds: Sequence[Sequence[float | None]] | None = None,
    vmin: float = 0.0,
    vmax: float = 100.0,
    colorbar_label: str = "accuracy (%)",
    digits: int = 1,
) -> Path:
    """A table (rows x columns, thesis tables 5.1-5.7) as a heatmap with each number written in
    its cell ("91.9" or "91.9 ± 1.2" with `stds`); empty cells (None) are left blank and marked
    with a dash."""
    import numpy as np

    n_rows, n_cols = len(row_names), len(col_names)
    grid = np.full((n_rows, n_cols), np.nan)
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            if _finite(v):
                grid[r, c] = float(v)
    cell_w = 1.25 if stds is not None else 0.85
    fig = _new_figure(path, (max(4.5, 2.2 + cell_w * n_cols), max(2.5, 1.4 + 0.42 * n_rows)))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(grid)
    image = ax.imshow(masked, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    for r in range(n_rows):
        for c in range(n_cols):
            v = grid[r, c]
            if math.isnan(v):
                ax.text(c, r, "–", ha="center", va="center", fontsize=8, color="gray")
                continue
            text = f"{v:.{digits}f}"
            s = stds[r][c] if stds is not None else None
            if _finite(s):
                text += f" ± {s:.{digits}f}"
            light = (v - vmin) / (vmax - vmin or 1.0) > 0.6
            ax.text(
                c,
                r,
                text,
                ha="center",
                va="center",
                fontsize=7.5,
                color="black" if light else "white",
            )
    ax.set_xticks(range(n_cols), list(col_names))
    ax.set_yticks(range(n_rows), list(row_names))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, width=max(40, int(fig.get_figwidth() * 11))), fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label(colorbar_label)
    return _save(fig, path)


# ------------------------------------------------------------------ images
def plot_image_grid(
    path: str | os.PathLike,
    rows: Sequence[Sequence],
    row_names: Sequence[str],
    *,
    title: str,
    captions: Sequence[Sequence[str]] | None = None,
) -> Path:
    """An image grid, one row per class (thesis figures 5.6-5.13): `rows[r]` holds uint8 images
    [C, H, W] (tensors or arrays; C = 1 grey, 3 colour), `captions[r][i]` an optional small text
    under each image. Rows may be shorter than the longest one."""
    import numpy as np

    n_rows = max(len(rows), 1)
    n_cols = max((len(r) for r in rows), default=1) or 1
    # sizes in inches: a column of row names, square cells, room for captions and the title
    label_w, cell, caption_h = 1.3, 0.9, (0.3 if captions else 0.05)
    width = label_w + cell * n_cols + 0.1
    title = textwrap.fill(title, width=max(28, int(width * 10)))
    title_h = 0.25 + 0.2 * title.count("\n") + 0.1
    height = title_h + (cell + caption_h) * n_rows + 0.05
    fig = _new_figure(path, (width, height))
    fig.set_layout_engine(None)
    fig.subplots_adjust(
        left=label_w / width,
        right=1 - 0.1 / width,
        top=1 - (title_h + caption_h) / height,
        bottom=0.05 / height,
        wspace=0.06,
        hspace=caption_h / cell,
    )
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c == 0 and r < len(row_names):
                ax.set_ylabel(row_names[r], rotation=0, ha="right", va="center", fontsize=9)
            if r >= len(rows) or c >= len(rows[r]):
                continue
            img = np.asarray(rows[r][c].cpu() if hasattr(rows[r][c], "cpu") else rows[r][c])
            if img.ndim == 3 and img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            elif img.ndim == 3:
                ax.imshow(np.transpose(img, (1, 2, 0)), interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if captions is not None and r < len(captions) and c < len(captions[r]):
                ax.set_title(captions[r][c], fontsize=6, pad=1.5)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    return _save(fig, path)


# ------------------------------------------------------------------ projections
def centre_distance(
    coords: Sequence[Sequence[float]], labels: Sequence[int], classes: Sequence[int]
) -> float:
    """Mean distance between the class centres of projected points: the unit in which
    `plot_projections` draws every panel (and the denominator of `Projection.spread`), so
    panels of models whose activations differ in scale compare directly. 1.0 when there are
    fewer than two classes with points."""
    centres = []
    for k in classes:
        pts = [xy for xy, y in zip(coords, labels, strict=True) if y == k]
        if pts:
            centres.append((sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)))
    dists = [
        math.hypot(a[0] - b[0], a[1] - b[1])
        for i, a in enumerate(centres)
        for b in centres[i + 1 :]
    ]
    mean = sum(dists) / len(dists) if dists else 0.0
    return mean if mean > 0 and math.isfinite(mean) else 1.0


@dataclass
class _Projected:
    """One panel's points and stars in the units it is drawn in."""

    coords: list[tuple[float, float]]
    labels: list[int]
    stars: list[tuple[float, float]]
    template_scale: float  # stars = templates x this, in the activations' own units

    @property
    def radius(self) -> float:
        return max((math.hypot(x, y) for x, y in self.coords + self.stars), default=1.0)


def _projected(coords, labels, classes, template_coords, unit: float) -> _Projected:
    """Points divided by `unit`; templates scaled by one common factor so the farthest sits at
    the edge of the data (final-layer weights are usually far smaller than the activations)."""
    radius = max((math.hypot(x, y) for x, y in coords), default=1.0)
    t_radius = max((math.hypot(x, y) for x, y in template_coords), default=0.0)
    scale = radius / t_radius if t_radius > 0 else 1.0
    return _Projected(
        [(float(x) / unit, float(y) / unit) for x, y in coords],
        [int(y) for y in labels],
        [(t[0] * scale / unit, t[1] * scale / unit) for t in template_coords],
        scale,
    )


def _template_handle():
    from matplotlib.lines import Line2D

    return Line2D(
        [], [], linestyle="none", marker="*", ms=13, color="white", markeredgecolor="black"
    )


def _draw_projection(ax, p: _Projected, classes, class_names, title, limit, unit_label) -> None:
    for i, (k, star) in enumerate(zip(classes, p.stars, strict=True)):
        c = CLASS_COLORS[i % len(CLASS_COLORS)]
        pts = [xy for xy, y in zip(p.coords, p.labels, strict=True) if y == k]
        name = class_names[k] if class_names and k < len(class_names) else f"class {k}"
        xs, ys = zip(*pts, strict=True) if pts else ((), ())
        ax.scatter(xs, ys, s=8, alpha=0.6, color=c, label=name)
        ax.scatter([star[0]], [star[1]], marker="*", s=250, color=c, edgecolors="black")
    # the stars' scale is part of what the panel says: in its title, at the title's size
    scale = f"{float(f'{p.template_scale:.3g}'):g}"  # 3 digits, 1490 rather than 1.49e+03
    ax.set_title(f"{title}\nstars: class templates × {scale}", fontsize=10)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal", adjustable="box")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        plain_numbers(axis)
    ax.set_xlabel(f"template-plane axis 1{unit_label}")
    ax.set_ylabel(f"template-plane axis 2{unit_label}")
    ax.grid(alpha=0.3)


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
    """Scatter plot of projected activations (in their own units, as `--csv` writes them), one
    colour per class, the class templates as stars scaled by one common factor (in the title)
    so the farthest sits at the edge of the data."""
    fig = _new_figure(path, (5.5, 5.4))
    ax = fig.add_subplot()
    p = _projected(coords, labels, classes, template_coords, 1.0)
    _draw_projection(ax, p, classes, class_names, title, 1.08 * p.radius, "")
    handles, names = ax.get_legend_handles_labels()
    ax.legend([*handles, _template_handle()], [*names, "class template"], loc="best", fontsize=8)
    return _save(fig, path)


@dataclass
class ProjectionPanel:
    """One panel of `plot_projections`: a model's projected activations and templates."""

    title: str
    coords: Sequence[Sequence[float]]
    labels: Sequence[int]
    template_coords: Sequence[Sequence[float]]


def plot_projections(
    path: str | os.PathLike,
    panels: Sequence[ProjectionPanel],
    classes: Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
    title: str = "Penultimate-layer projections",
) -> Path:
    """Projections of several models side by side, same classes and colours (thesis figures
    5.14 and 6.7: broad clusters keep similarity information, tight ones lose it).

    Activations of different models differ in scale by an arbitrary factor, so each panel is
    drawn in units of its own mean distance between class centres (`centre_distance`, the
    denominator of the spread in the report's table) and every panel has the same axes: a
    cluster's breadth compares across panels. One legend below names the classes."""
    n = max(len(panels), 1)
    drawn = [
        _projected(
            p.coords,
            p.labels,
            classes,
            p.template_coords,
            centre_distance(p.coords, p.labels, classes),
        )
        for p in panels
    ]
    limit = 1.08 * max((d.radius for d in drawn), default=1.0)
    fig = _new_figure(path, (max(6.0, 4.0 * n + 0.4), 5.2))
    fig.get_layout_engine().set(h_pad=0.1)  # the legend below clears the x labels
    axes = fig.subplots(1, n, squeeze=False)[0]
    for i, (ax, p, d) in enumerate(zip(axes, panels, drawn, strict=False)):
        _draw_projection(ax, d, classes, class_names, p.title, limit, "")
        if i:  # the same axes in every panel: one y label says it
            ax.set_ylabel("")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        [*handles, _template_handle()],
        [*names, "class template (scaled: × in each title)"],
        loc="outside lower center",
        ncols=len(handles) + 1,
        fontsize=8,
    )
    fig.suptitle(f"{title}\nunit: each model's mean distance between class centres")
    return _save(fig, path)
