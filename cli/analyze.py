"""`rbkd analyze ...`: soft-label entropy against temperature, penultimate-layer projections."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated

import typer
from rbkd.cli.consoles import console, err_console
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import (
    DataDirOpt,
    DeviceOpt,
    LimitOpt,
    SeedOpt,
    SoftLabelFilesOpt,
    Split,
    TeachersOpt,
    ThreadsOpt,
    TListOpt,
    parse_int_list,
)
from rbkd.cli.output import JsonOpt, check_plot, print_json, print_table, titled_table
from rbkd.cli.text import escape
from rbkd.cli.threads import start_compute
from rbkd.cli.typer_app import new_app
from rbkd.cli.usage import usage_errors

app = new_app(help="Analyse soft labels and representations (thesis sections 4.5-4.7).")

PlotOpt = Annotated[
    Path | None, typer.Option("--plot", help="Write the figure here (.png, .pdf or .svg).")
]
JsonFileOpt = Annotated[
    Path | None,
    typer.Option("--json", help="Write the numbers as JSON here (-: to stdout, nothing else)."),
]


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _check_limit(limit: int | None) -> None:
    with usage_errors():
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")


def _first_examples(dataset, limit: int | None):
    """The first `limit` examples of a split (indices stay those of the full split)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataclasses.replace(
        dataset, images=dataset.images[:limit], labels=dataset.labels[:limit]
    )


def _first_rows(soft, limit: int | None):
    """The rows of a soft-label file that belong to the first `limit` examples of its split."""
    if limit is None:
        return soft
    keep = soft.indices < limit
    if not bool(keep.any()):
        raise ValueError(
            f"{soft.path}: none of its rows fall in the first {limit} examples; use a larger "
            "--limit"
        )
    return dataclasses.replace(
        soft, logits=soft.logits[keep], labels=soft.labels[keep], indices=soft.indices[keep]
    )


@app.command("entropy")
@handle_errors
def entropy(
    soft_labels: SoftLabelFilesOpt = None,
    teacher: TeachersOpt = None,
    split: Annotated[
        Split, typer.Option("--split", help="With --teacher: which split's soft labels.")
    ] = "train",
    T: TListOpt = "1,3,6,9,12,15,18,20",
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also show the mean entropy of each class.")
    ] = False,
    label_smoothing_curve: Annotated[
        bool,
        typer.Option(
            "--label-smoothing-curve",
            help="Add the entropy of label-smoothed targets (1-A)*onehot + A/C for A = 0.1, "
            "0.3, 0.5, 0.7, 0.9: flat lines, since LS targets do not depend on T.",
        ),
    ] = False,
    plot: PlotOpt = None,
    json_out: JsonFileOpt = None,
    csv_out: Annotated[
        Path | None,
        typer.Option("--csv", help="With a sparse soft-label store: write its tables here (CSV)."),
    ] = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Mean soft-label entropy (nats) at each temperature T, overall and per class.

    Entropy grows with T; at the same T a teacher that keeps similarity information between
    classes has higher entropy (thesis figures 4.4, 5.2-5.4). All temperatures are computed in
    one pass with rbkd.ops.soft_label_entropy. Pass several --teacher/--soft-labels to compare.

    A sparse soft-label store (a folder with index.json, docs/sparse-soft-labels.md) given to
    --soft-labels is read shard by shard: mean token entropy at the temperatures of its grid
    (--T picks some), by frequency rank of the input and of the next token, by position in the
    document, and the teacher's top-k mass against k (--csv writes these tables).

    Example:

        rbkd analyze entropy --teacher runs/t1 --T 1:20 --label-smoothing-curve --plot entropy.png --json entropy.json
    """
    from rbkd.analysis.token_entropy import is_store

    if any(is_store(p) for p in soft_labels or []):  # language-model token soft labels
        _store_entropy(soft_labels, teacher, T, per_class, label_smoothing_curve, plot,
                       json_out, csv_out, limit, threads)  # fmt: skip
        return
    if csv_out is not None:
        raise ValueError("--csv writes a sparse soft-label store's tables; give the store's folder")
    from rbkd.analysis.entropy import (
        entropy_table,
        parse_temperatures,
    )
    from rbkd.analysis.entropy import (
        label_smoothing_curve as ls_curve,
    )
    from rbkd.analysis.files import write_json
    from rbkd.analysis.plots import plot_entropy_curves
    from rbkd.data import load_dataset
    from rbkd.engine import read_config
    from rbkd.soft_label_file import read_soft_labels
    from rbkd.study.soft_label_source import teacher_soft_labels

    with usage_errors():
        temps = parse_temperatures(T)
    _check_limit(limit)
    check_plot(plot)
    start_compute(threads)
    to_stdout = json_out is not None and str(json_out) == "-"
    shown = err_console if to_stdout else console  # `--json -`: stdout holds the JSON only
    sources = [("file", p) for p in soft_labels or []] + [("run", p) for p in teacher or []]
    if not sources:
        raise ValueError("give --soft-labels FILE or --teacher RUN (either may be repeated)")

    tables: dict[str, dict] = {}
    legend: dict[str, str] = {}  # the figure names a teacher by its name, not its folder's path
    num_classes = None
    class_names: list[str] = []
    for kind, path in sources:
        if kind == "file":
            soft = _first_rows(read_soft_labels(path), limit)
            shown_as = Path(path).name
        else:
            config = read_config(path)
            shown_as = _teacher_name(path, config)
            ds = load_dataset(config["dataset"], split, data_dir)
            soft = teacher_soft_labels(path, split, _first_examples(ds, limit), allow_partial=True)
            class_names = list(ds.class_names)
        if num_classes is not None and soft.num_classes != num_classes:
            raise ValueError(f"{path} has {soft.num_classes} classes, the others {num_classes}")
        num_classes = soft.num_classes
        name = str(path)
        while name in tables:
            name += "'"
        legend[name] = shown_as
        table = entropy_table(soft.logits, soft.labels, temps, num_classes=soft.num_classes)
        tables[name] = {
            **table.to_dict(),
            "dataset": soft.dataset,
            "split": soft.split,
            "teacher": soft.teacher,
        }

    out = titled_table("mean soft-label entropy (nats) vs temperature")
    out.add_column("T", justify="right")
    for name in tables:
        out.add_column(escape(name), justify="right")
    for i, t in enumerate(temps):
        out.add_row(f"{t:g}", *[_num(tab["mean_entropy"][i]) for tab in tables.values()])
    print_table(out, shown)
    if per_class:
        for name, tab in tables.items():
            print_table(_per_class_table(name, tab, temps, class_names), shown)
    ls = ls_curve(num_classes) if label_smoothing_curve else None
    if ls:
        lt = titled_table("label smoothing reference (independent of T)")
        lt.add_column("A", justify="right")
        lt.add_column("entropy (nats)", justify="right")
        for a, h in ls.items():
            lt.add_row(a, _num(h))
        print_table(lt, shown)
    shown.print(
        f"maximum possible entropy (uniform over {num_classes} classes): "
        f"{math.log(num_classes):.4f} nats"
    )
    numbers = {
        "unit": "nats",
        "temperatures": temps,
        "sources": tables,
        "label_smoothing": ls,
        "max_entropy": math.log(num_classes),
    }
    if to_stdout:
        print_json(numbers)
    elif json_out is not None:
        write_json(json_out, numbers)
        shown.print(f"wrote {escape(json_out)}", soft_wrap=True)
    if plot is not None:
        if len(set(legend.values())) < len(legend):  # two teachers of one name: their paths
            legend = {}
        plot_entropy_curves(
            plot,
            tables,
            per_class=per_class,
            label_smoothing=ls,
            max_entropy=math.log(num_classes),
            labels=legend,
        )
        shown.print(f"wrote {escape(plot)}", soft_wrap=True)


def _store_entropy(stores, teacher, T, per_class, ls_curve, plot, json_out, csv_out, limit,
                   threads) -> None:  # fmt: skip
    from rbkd.cli.analyze_tokens import store_entropy
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context

    if teacher:
        raise ValueError("give sparse soft-label stores or --teacher runs, not both")
    if per_class or ls_curve:
        raise ValueError(
            "--per-class and --label-smoothing-curve are for classifiers' soft labels; a store's "
            "tables are by token frequency and position"
        )
    ctx = get_current_context(silent=True)
    given = ctx is not None and ctx.get_parameter_source("T") not in (None, ParameterSource.DEFAULT)
    store_entropy(stores, temperatures=T if given else None, limit=limit, plot=plot,
                  json_out=json_out, csv_out=csv_out, threads=threads)  # fmt: skip


def _teacher_name(path: Path, config: dict) -> str:
    """A teacher run as a legend names it: its folder's name and how it was trained,
    "teacher (small, batch 256, 1 epoch)"."""
    cfg = config.get("train_config") or {}
    epochs, batch = cfg.get("epochs"), cfg.get("batch_size")
    how = [
        str(config.get("arch") or ""),
        f"batch {batch}" if batch else "",
        (f"{epochs} epoch" if epochs == 1 else f"{epochs} epochs") if epochs else "",
    ]
    how = [h for h in how if h]
    return f"{Path(path).name} ({', '.join(how)})" if how else Path(path).name


def _per_class_table(name: str, tab: dict, temps: list[float], class_names: list[str]):
    """One row per temperature, one column per class: ten narrow columns fit a terminal, where
    a column per temperature (--T 1:20) would not."""
    table = titled_table(f"per-class mean entropy (nats): {escape(name)}")
    table.add_column("T", justify="right")
    for k in range(tab["num_classes"]):
        label = f"{k} {class_names[k]}" if k < len(class_names) else str(k)
        table.add_column(escape(label), justify="right", min_width=5)
    for t, row in zip(temps, tab["per_class_entropy"], strict=True):
        table.add_row(f"{t:g}", *[_num(h, 3) for h in row])
    return table


@app.command("projection")
@handle_errors
def projection(
    teacher: Annotated[
        Path, typer.Option("--teacher", help="Run folder of the model to look at (any run).")
    ],
    classes: Annotated[str, typer.Option("--classes", help="Three classes, e.g. 0,1,2.")] = "0,1,2",
    per_class: Annotated[
        int, typer.Option("--per-class", help="Examples per class (random, seeded).")
    ] = 100,
    split: Annotated[Split, typer.Option("--split", help="Dataset split.")] = "test",
    seed: SeedOpt = 0,
    plot: PlotOpt = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Write index,label,x,y rows here.")
    ] = None,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Project penultimate-layer activations of three classes onto the plane through their
    class templates (rows of the final layer), as in Müller et al. 2019 and thesis fig. 5.14.

    Tight clusters: little similarity information kept (LS-like); broad clusters: more. The
    table gives each cluster's spread (mean distance to its centre / mean distance between
    centres).

    Example:

        rbkd analyze projection --teacher runs/t1 --classes 0,2,4 --plot projection.png --csv projection.csv
    """
    from rbkd.analysis.files import write_csv
    from rbkd.analysis.plots import plot_projection
    from rbkd.analysis.projection import project_model
    from rbkd.data import load_dataset
    from rbkd.engine import load_run

    ks = parse_int_list(classes, "--classes")
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    _check_limit(limit)
    check_plot(plot)
    start_compute(threads)
    shown = err_console if as_json else console
    model, config = load_run(teacher)
    ds = _first_examples(load_dataset(config["dataset"], split, data_dir), limit)
    proj = project_model(model, ds, ks, per_class=per_class, seed=seed, device=device)
    names = list(ds.class_names)
    table = titled_table(f"penultimate projection: {escape(teacher)} ({config['arch']})")
    table.add_column("class", justify="right")
    table.add_column("name")
    table.add_column("examples", justify="right")
    table.add_column("spread", justify="right")
    clusters = []
    for k in ks:
        clusters.append(
            {
                "class": k,
                "name": names[k],
                "examples": int((proj.labels == k).sum()),
                "spread": proj.spread[k],
            }
        )
        table.add_row(str(k), escape(names[k]), str(clusters[-1]["examples"]), _num(proj.spread[k]))
    if as_json:
        print_json({"teacher": teacher, "arch": config["arch"], "clusters": clusters})
    else:
        print_table(table)
    if csv_out is not None:
        write_csv(csv_out, ["index", "label", "x", "y"], proj.rows())
        shown.print(f"wrote {escape(csv_out)}", soft_wrap=True)
    if plot is not None:
        plot_projection(
            plot,
            proj.coords.tolist(),
            proj.labels.tolist(),
            ks,
            proj.template_coords.tolist(),
            class_names=names,
            title=f"{config['arch']} {config['dataset']}: penultimate layer",
        )
        shown.print(f"wrote {escape(plot)}", soft_wrap=True)


from rbkd.cli import analyze_examples  # noqa: E402,F401  (registers `rbkd analyze examples`)
