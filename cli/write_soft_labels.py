"""`rbkd soft-labels`: write a teacher's soft labels (raw logits) for one split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rbkd.cli.config_file import ConfigOpt
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import DataDirOpt, DeviceOpt, LimitOpt, Split, ThreadsOpt
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.text import escape
from rbkd.cli.threads import start_compute
from rbkd.cli.typer_app import new_app

from rbkd.config import check_choice

app = new_app()


@app.command("soft-labels")
@handle_errors
def soft_labels(
    teacher: Annotated[
        Path, typer.Option("--teacher", help="Teacher run folder (from train-teacher).")
    ],
    split: Annotated[Split, typer.Option("--split", help="Dataset split.")] = "train",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="File to write (default: RUN/soft_labels_SPLIT.safetensors)."),
    ] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    limit: LimitOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing --out file even if it is not rbkd's soft labels of this "
            "teacher and split.",
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Run a teacher over a dataset split and save its logits as a soft-label file.

    The file (safetensors) holds `logits` [N, C] float32, `labels` and `indices` [N] int64, and
    metadata naming the dataset, split and teacher (its run folder and the SHA-256 of its
    model.safetensors), so any temperature can be derived later and a mismatch is caught.
    An existing --out is replaced only when it holds this run's soft labels of the same split
    (or with --force); a file of anything else is refused.

    Example:

        rbkd soft-labels --teacher runs/t1 --split test --limit 2000 --out runs/t1-test.safetensors
    """
    from rbkd.analysis.entropy import entropy_at
    from rbkd.data import load_dataset
    from rbkd.engine import load_run, read_config
    from rbkd.soft_label_file import (
        SPLITS,
        check_soft_labels_target,
        read_soft_labels,
        soft_labels_from_model,
        teacher_id,
    )
    from rbkd.study.splits import limit_dataset

    check_choice(split, SPLITS, "--split")
    start_compute(threads)
    config = read_config(teacher)
    path = out if out is not None else teacher / f"soft_labels_{split}.safetensors"
    # Before any work: --out must be new, or rbkd's soft labels of this run (or --force).
    check_soft_labels_target(
        path,
        dataset=config["dataset"],
        split=split,
        teacher=teacher_id(teacher, ""),
        teacher_run=teacher,
        force=force,
    )
    model, _ = load_run(teacher)
    ds = limit_dataset(load_dataset(config["dataset"], split, data_dir), limit)
    soft_labels_from_model(
        model, ds, path, teacher_run=teacher, split=split, device=device, force=force
    )
    soft = read_soft_labels(path, dataset=ds)
    if as_json:
        accuracy = float((soft.logits.argmax(1) == soft.labels).float().mean())
        mean = {f"{T:g}": float(entropy_at(soft.logits, T).mean()) for T in (1.0, 9.0)}
        print_json(
            {
                "file": path,
                "dataset": soft.dataset,
                "split": soft.split,
                "examples": len(soft),
                "num_classes": soft.num_classes,
                "teacher": soft.teacher,
                "teacher_accuracy": accuracy,
                "mean_entropy_nats": mean,
            }
        )
        return
    table = titled_table("soft labels", show_header=False)
    table.add_row("file", escape(path))
    table.add_row("dataset / split", f"{soft.dataset} / {soft.split}")
    table.add_row("examples x classes", f"{len(soft)} x {soft.num_classes}")
    table.add_row("teacher", escape(soft.teacher))
    table.add_row(
        "teacher accuracy on them", f"{(soft.logits.argmax(1) == soft.labels).float().mean():.2%}"
    )
    for T in (1.0, 9.0):
        table.add_row(
            f"mean entropy, T={T:g}", f"{float(entropy_at(soft.logits, T).mean()):.4f} nats"
        )
    print_table(table)
