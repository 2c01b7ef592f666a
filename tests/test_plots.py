"""rbkd.analysis.plots: every figure in every format is a real file of that format, the format
comes from the name, axes show plain numbers (no offset, no 2^k) and classes by name."""

from __future__ import annotations

import math
import re
from pathlib import Path

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


# ------------------------------------------------------------------ what a reader sees
@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib Figure behind every file drawn in the test, by file name (the file is
    still written): what a reader sees, checked on the figure's own objects."""
    figures = {}
    save = plots._save

    def capture(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def _rendered(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_entropy_axis_is_zero_to_ln_c_so_a_flat_result_looks_flat(tmp_path, drawn):
    # a collapsed teacher: every entropy within 0.0015 of ln 10 (auto-zoom showed 2.3011-2.3026)
    ln_c = math.log(10)
    flat = {
        "temperatures": [1.0, 9.0, 20.0],
        "mean_entropy": [ln_c - 0.0015, ln_c - 0.0004, ln_c - 0.0001],
        "per_class_entropy": [[ln_c - 0.0015] * 2, [ln_c - 0.0004] * 2, [ln_c - 0.0001] * 2],
    }
    plot_entropy_curves(tmp_path / "curves.png", {"t": flat}, max_entropy=ln_c)
    plot_series(
        tmp_path / "per_class.png",
        [Series("mean", flat["temperatures"], flat["mean_entropy"])],
        xlabel="temperature T",
        ylabel="entropy (nats)",
        title="t",
        references=[Reference(ln_c, "ln C")],
        ylim=plots.entropy_axis(ln_c),
    )
    for name in ("curves.png", "per_class.png"):
        (ax,) = drawn[name].axes
        low, high = ax.get_ylim()
        assert low == 0.0 and ln_c < high <= 1.06 * ln_c, (name, low, high)


def test_a_log_axis_says_so_and_a_linear_one_does_not(tmp_path, drawn):
    sizes = [10, 50, 200]  # log2: 3.3, 5.6, 7.6, nearly evenly spaced: looks categorical
    for name, logx in (("log.png", True), ("linear.png", False)):
        plot_series(
            tmp_path / name,
            [Series("a", sizes, [50, 60, 70])],
            xlabel="training examples per class",
            ylabel="accuracy (%)",
            title="t",
            logx=logx,
        )
    assert drawn["log.png"].axes[0].get_xlabel() == "training examples per class (log scale)"
    assert drawn["linear.png"].axes[0].get_xlabel() == "training examples per class"


def test_the_legend_draws_a_dashed_series_dashed(tmp_path, drawn):
    plot_series(
        tmp_path / "s.png",
        [
            Series("small, entropy", [10, 50, 200], [30, 60, 80], marker="o"),
            Series("small, random", [10, 50, 200], [60, 70, 80], linestyle="--", marker="s"),
        ],
        xlabel="x",
        ylabel="y",
        title="t",
        logx=True,
    )
    (ax,) = drawn["s.png"].axes
    _rendered(drawn["s.png"])
    legend = ax.get_legend()
    handles = dict(
        zip([t.get_text() for t in legend.get_texts()], legend.legend_handles, strict=True)
    )
    assert handles["small, entropy"].get_linestyle() == "-"
    assert handles["small, random"].get_linestyle() == "--"
    assert handles["small, random"].get_marker() == "s"
    # long enough to show at least two dashes: a 2 em handle showed one and read as solid
    dash, gap = handles["small, random"]._dash_pattern[1]
    handle_pts = legend.handlelength * legend.prop.get_size_in_points()
    assert handle_pts >= 2 * dash + gap, (handle_pts, dash, gap)


def test_a_one_point_series_is_drawn_as_a_point(tmp_path, drawn):
    plot_series(
        tmp_path / "one.png",
        [Series("batch 64", [8], [2.1], marker=""), Series("mean", [1, 2], [1.0, 2.0], marker="")],
        xlabel="teacher epochs",
        ylabel="entropy",
        title="t",
    )
    lines = {line.get_label(): line for line in drawn["one.png"].axes[0].get_lines()}
    assert lines["batch 64"].get_marker() not in ("", "None", "none", None)
    assert lines["mean"].get_marker() in ("", "None", "none")  # a line keeps its own style


def _cluster_panel(title, scale, spread, seed):
    rng = np.random.default_rng(seed)
    coords, labels = [], []
    for k, (cx, cy) in zip((0, 2, 4), ((-1.0, -0.6), (1.0, -0.6), (0.2, 0.5)), strict=True):
        pts = rng.normal((cx, cy), spread, size=(40, 2)) * scale
        coords += pts.tolist()
        labels += [k] * 40
    templates = [[-0.02, -0.01], [0.02, -0.01], [0.0, 0.02]]
    return ProjectionPanel(title, coords, labels, templates)


def test_projection_panels_share_one_scale_name_their_axes_and_ticks_do_not_collide(
    tmp_path, drawn
):
    # activations of three models at unrelated scales (0.05, 20, 3), as in the quick study
    panels = [
        _cluster_panel("small", 0.05, 0.4, 0),
        _cluster_panel("large-b64", 20.0, 0.2, 1),
        _cluster_panel("large-b4096", 3.0, 0.6, 2),
    ]
    plot_projections(tmp_path / "p.png", panels, [0, 2, 4], class_names=["a", "b", "c", "d", "e"])
    fig = drawn["p.png"]
    renderer = _rendered(fig)
    axes = fig.axes
    assert len(axes) == 3
    assert len({ax.get_xlim() for ax in axes}) == len({ax.get_ylim() for ax in axes}) == 1
    assert all(ax.get_xlabel() for ax in axes) and axes[0].get_ylabel()
    assert "mean distance between class centres" in fig.get_suptitle()
    for ax, panel in zip(axes, panels, strict=True):
        assert ax.get_title().startswith(panel.title)
        assert re.search(r"templates × [0-9.]+$", ax.get_title()), ax.get_title()
        assert ax.title.get_fontsize() >= 9  # not the tiny grey text it was
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(boxes) >= 3
        for a, b in zip(boxes, boxes[1:], strict=False):
            assert not a.overlaps(b), [t.get_text() for t in ax.get_xticklabels()]
    legend_names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_names[:3] == ["a", "c", "e"] and "class template" in legend_names[3]


def test_the_projection_unit_is_the_spread_tables_unit():
    import torch

    from rbkd.analysis.projection import project_features

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(90, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2] * 30)
    feats[:, :3] += 4 * torch.nn.functional.one_hot(labels, 3)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64)
    proj = project_features(feats, labels, weight, None, [0, 1, 2])
    coords, ys = proj.coords.tolist(), proj.labels.tolist()
    unit = plots.centre_distance(coords, ys, [0, 1, 2])
    for k in (0, 1, 2):
        pts = proj.coords[proj.labels == k]
        mean_radius = float((pts - pts.mean(dim=0)).norm(dim=1).mean())
        assert mean_radius / unit == pytest.approx(proj.spread[k], rel=1e-9)


def test_analyze_entropy_names_a_teacher_run_in_the_legend_not_its_path(tmp_path, tiny_data, drawn):
    # the demo's entropy.png: `rbkd analyze entropy --teacher runs/demo-.../teacher --plot ...`
    import importlib.util

    from rbkd.cli.app import app
    from typer.testing import CliRunner

    spec = importlib.util.spec_from_file_location(
        "rbkd_test_examples_helpers", Path(__file__).with_name("test_examples.py")
    )
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    run = helpers.make_teacher_run(tmp_path / "runs" / "demo" / "teacher")
    plot = tmp_path / "e.png"
    result = CliRunner().invoke(
        app,
        ["analyze", "entropy", "--teacher", str(run), "--T", "1,9", "--plot", str(plot)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    legend = drawn["e.png"].axes[0].get_legend()
    names = [t.get_text() for t in legend.get_texts()]
    assert names[0] == "teacher (small, batch 50, 1 epoch)", names
    assert not any("/" in n for n in names)
