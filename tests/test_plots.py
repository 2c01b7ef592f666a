"""rbkd.analysis.plots: every figure in every format is a real file of that format, the format
comes from the name, axes show plain numbers (no offset, no 2^k) and classes by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rbkd.analysis import plots
from rbkd.analysis.plots import (
    SIGNATURES,
    Band,
    ProjectionPanel,
    Reference,
    Series,
    figure_format,
    log_axis_at,
    plain_numbers,
    plot_bars,
    plot_entropy_curves,
    plot_entropy_hypothesis,
    plot_image_grid,
    plot_lines,
    plot_projection,
    plot_projections,
    plot_series,
    plot_table_heatmap,
)

FORMATS = ("png", "pdf", "svg")


def assert_figure(path, fmt: str) -> None:
    data = path.read_bytes()
    assert data.startswith(SIGNATURES[fmt]), f"{path} does not start with {SIGNATURES[fmt]!r}"
    if fmt == "svg":
        assert b"<svg" in data[:2000]
    assert not list(path.parent.glob(".*.part")), "a temporary file was left behind"


def _table():
    temps = [1.0, 3.0, 9.0]
    return {
        "temperatures": temps,
        "mean_entropy": [0.1, 0.9, 2.0],
        "per_class_entropy": [[0.1, 0.2], [0.8, 1.0], [1.9, 2.1]],
    }


def _draw_all(tmp_path, fmt):
    yield plot_entropy_curves(
        tmp_path / f"entropy.{fmt}",
        {"small": _table(), "large": _table()},
        band=Band(0.3, 0.9, "label smoothing A = 0.1-0.5"),
        max_entropy=math.log(10),
        labels={"small": "small teacher"},
        bold=["small"],
    )
    yield plot_entropy_curves(
        tmp_path / f"entropy_ls.{fmt}", {"t": _table()}, label_smoothing={"0.1": 0.5}
    )
    yield plot_entropy_hypothesis(
        tmp_path / f"hypothesis.{fmt}",
        ["small", "large-b64", "large-b4096"],
        [2.1, 0.4, 1.7],
        T=9,
        band=Band(0.3, 0.9, "LS"),
        max_entropy=math.log(10),
        accuracies=[91.0, None, 60.0],
    )
    yield plot_series(
        tmp_path / f"series.{fmt}",
        [
            Series("small, entropy", [5, 10, 50], [60, 70, 80], err=[1, 2, 0]),
            Series("small, random", [5, 10, 50], [50, 65, 79], linestyle="--", color="black"),
        ],
        xlabel="examples per class",
        ylabel="accuracy (%)",
        title="t",
        logx=True,
        references=[Reference(85.0, "all data")],
    )
    yield plot_lines(
        tmp_path / f"lines.{fmt}",
        {"a": ([16, 64], [1.0, 2.0])},
        xlabel="x",
        ylabel="y",
        title="t",
        logx=True,
    )
    yield plot_bars(
        tmp_path / f"bars.{fmt}", ["T-shirt", "Trouser"], [0.5, float("nan")], ylabel="y", title="t"
    )
    yield plot_table_heatmap(
        tmp_path / f"heatmap.{fmt}",
        [[91.9, None], [0.0, 12.5]],
        ["T-shirt/top", "Trouser"],
        ["T=3", "T=9"],
        stds=[[1.2, None], [0.0, None]],
        title="t",
        xlabel="temperature",
        ylabel="missing class",
    )
    grey = [np.full((1, 8, 8), 40 * i, dtype=np.uint8) for i in range(3)]
    yield plot_image_grid(
        tmp_path / f"grid.{fmt}",
        [grey, grey[:2]],
        ["Bag", "Coat"],
        title="t",
        captions=[["a"] * 3, ["b"] * 2],
    )
    rgb = [np.zeros((3, 8, 8), dtype=np.uint8)]
    yield plot_image_grid(tmp_path / f"grid_rgb.{fmt}", [rgb], ["Airplane"], title="t")
    coords = [[0.0, 1.0], [1.0, 0.0], [-1.0, -1.0]]
    yield plot_projection(
        tmp_path / f"projection.{fmt}", coords, [0, 2, 4], [0, 2, 4], coords, class_names=["a"] * 5
    )
    panel = ProjectionPanel("small", coords, [0, 2, 4], coords)
    yield plot_projections(
        tmp_path / f"projections.{fmt}", [panel, panel], [0, 2, 4], class_names=["a"] * 5
    )


def test_every_figure_is_a_real_png(tmp_path):
    paths = list(_draw_all(tmp_path, "png"))
    assert len(paths) == 11
    for path in paths:
        assert path.suffix == ".png"
        assert_figure(path, "png")


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_follows_the_file_name(tmp_path, fmt):
    # a line figure and an image figure (the two kinds of content) in each format
    drawn = _draw_all(tmp_path, fmt)
    for path in (
        next(drawn),
        plot_image_grid(
            tmp_path / f"g.{fmt}", [[np.zeros((1, 4, 4), np.uint8)]], ["Bag"], title="t"
        ),
    ):
        assert_figure(path, fmt)
    drawn.close()


def test_format_from_suffix_is_case_insensitive(tmp_path):
    path = plot_bars(tmp_path / "bars.PDF", ["a"], [1.0], ylabel="y", title="t")
    assert_figure(path, "pdf")
    assert figure_format("x.SVG") == "svg"


@pytest.mark.parametrize("name", ["plot.jpg", "plot", "plot.png.txt", "plot.eps"])
def test_unknown_format_is_one_clear_error_and_writes_nothing(tmp_path, name):
    with pytest.raises(ValueError, match=r"must end in \.png, \.pdf or \.svg") as err:
        plot_bars(tmp_path / name, ["a"], [1.0], ylabel="y", title="t")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_plain_numbers_no_offset_no_power_labels():
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([1, 2, 3], [2.3020, 2.3024, 2.3026])  # would get an offset of +2.302
    plain_numbers(ax.yaxis)
    FigureCanvasAgg(fig).draw()
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(lab.startswith("2.30") and "+" not in lab for lab in labels), labels

    fig = Figure()
    ax = fig.add_subplot()
    sizes = [16, 64, 256, 4096, 8192]
    ax.plot(sizes, [1, 2, 3, 4, 5])
    log_axis_at(ax, sizes)
    FigureCanvasAgg(fig).draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "64", "256", "4096", "8192"]


def test_series_skips_missing_points_and_keeps_x_order(tmp_path):
    # None / NaN points are dropped (a seed not run yet), unsorted x is drawn in order
    path = plot_series(
        tmp_path / "s.png",
        [Series("a", [50, 5, 10], [80.0, None, float("nan")], err=[None, 1.0, 2.0])],
        xlabel="x",
        ylabel="y",
        title="t",
    )
    assert_figure(path, "png")


def test_module_uses_no_pyplot():
    # pyplot keeps global figure state; the plots use Figure + FigureCanvasAgg only
    with open(plots.__file__) as f:
        source = f.read()
    assert "import pyplot" not in source and "matplotlib.pyplot" not in source
