"""`rbkd analyze examples`: the highest-entropy training images of each class (thesis figures
5.6-5.13). Registered on `rbkd.cli.analyze.app` by one import at the end of cli/analyze.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rbkd.cli.analyze import app
from rbkd.cli.consoles import console, err_console
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import DataDirOpt, LimitOpt, Split, ThreadsOpt
from rbkd.cli.output import JsonOpt, check_plot, print_json, print_table, titled_table
from rbkd.cli.text import escape
from rbkd.cli.threads import start_compute
from rbkd.cli.usage import usage_errors


@app.command("examples")
@handle_errors
def examples(
    teacher: Annotated[
        Path, typer.Option("--teacher", help="Teacher run folder (from train-teacher).")
    ],
    T: Annotated[float, typer.Option("--T", help="Temperature of the soft labels (> 0).")] = 9.0,
    count: Annotated[
        int, typer.Option("--count", help="Examples per class (highest entropy first).")
    ] = 10,
    split: Annotated[Split, typer.Option("--split", help="Dataset split.")] = "train",
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write the image grid here (.png, .pdf or .svg)."),
    ] = None,
    limit: LimitOpt = None,
    data_dir: DataDirOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The COUNT training images of each class whose soft labels have the highest entropy at T.

    A teacher that keeps similarity information picks images that look like crossovers between
    classes; one that lost it picks distorted or mislabelled ones (thesis section 5.3). The
    table lists their dataset indices; --plot draws them, one row per class, each captioned
    with its entropy and, where the teacher disagrees with the label, the class it predicts.

    Example:

        rbkd analyze examples --teacher runs/t1 --T 9 --count 10 --plot examples.png
    """
    from rbkd.analysis.entropy import check_temperature
    from rbkd.analysis.examples import check_count, plot_top_entropy_examples, teacher_examples

    # every argument is checked before the data is read (a bad value: a usage error, exit 2)
    with usage_errors():
        check_temperature(T)
        if count < 1:
            raise ValueError(f"--count must be >= 1, got {count}")
        check_count(count)
    check_plot(plot)
    start_compute(threads)
    found = teacher_examples(teacher, T, count, data_dir=data_dir, limit=limit, split=split)
    names = found.class_names
    table = titled_table(
        f"top {count} highest-entropy {split} examples per class at T={T:g}: {escape(teacher)}"
    )
    table.add_column("class")
    table.add_column("mean entropy (nats)", justify="right")
    table.add_column("dataset indices, highest entropy first")
    rows = []
    for k, (idx, hs) in enumerate(zip(found.indices, found.entropies, strict=True)):
        mean = sum(hs) / len(hs) if hs else None
        rows.append({"class": k, "name": names[k], "indices": idx, "entropies": hs})
        shown_mean = "-" if mean is None else f"{mean:.4f}"
        table.add_row(escape(f"{k} {names[k]}"), shown_mean, ", ".join(map(str, idx)) or "-")
    if as_json:
        print_json({"teacher": teacher, "T": T, "split": split, "classes": rows})
    else:
        print_table(table)
    if plot is not None:
        plot_top_entropy_examples(plot, found)
        (err_console if as_json else console).print(f"wrote {escape(plot)}", soft_wrap=True)
