"""`rbkd experiment ...`: the thesis's experiments as loops over `rbkd distill` and
`rbkd train-teacher` (missing class 4.4/5.1, transfer sets 4.6/5.3, batch size ch. 6)."""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rbkd.cli.common import (
    AlphaOpt,
    BatchSizeOpt,
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    EpochsOpt,
    LabelSmoothingOpt,
    LimitOpt,
    LrOpt,
    OptimizerOpt,
    SeedOpt,
    SelectOpt,
    SoftLabelFilesOpt,
    SoftLabelsOpt,
    StudentOpt,
    TeacherOpt,
    TeachersOpt,
    TListOpt,
    TOpt,
    TSquaredOpt,
    check_choice,
    console,
    escape,
    handle_errors,
    new_app,
    parse_int_list,
    titled_table,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = new_app(help="Run the thesis's experiments: loops of distillations with result tables.")

OutOpt = Annotated[Path, typer.Option("--out", help="Folder for results and runs.")]


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2%}"


@contextmanager
def _progress(total: int):
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("runs", total=total)
        yield progress, task


def _cfg(epochs, batch_size, lr, optimizer, seed, device):
    from rbkd.engine import TrainConfig

    return TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, device=device
    )


@app.command("missing-class")
@handle_errors
def missing_class(
    teacher: TeacherOpt = None,
    soft_labels: SoftLabelsOpt = None,
    label_smoothing: LabelSmoothingOpt = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset (only with --label-smoothing).")
    ] = None,
    classes: Annotated[
        str, typer.Option("--classes", help="Classes to exclude in turn: all, or e.g. 0,3,6.")
    ] = "all",
    T: TListOpt = "9",
    alpha: AlphaOpt = 0.99,
    t_squared: TSquaredOpt = True,
    student: StudentOpt = "general",
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 64,
    lr: LrOpt = 1e-3,
    optimizer: OptimizerOpt = "adam",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = Path("results/missing-class"),
) -> None:
    """Exclude each class in turn from the transfer set, distill, and report the student's
    accuracy on the class it never saw (thesis tables 5.1-5.7).

    High accuracy on a missing class means the soft labels carry similarity information; label
    smoothing (--label-smoothing A) carries none. Writes results.json, results.csv and
    missing_class.png into --out (one run folder per class and T under it).

    Example:

        rbkd experiment missing-class --teacher runs/t1 --classes 0,1 --T 3,9 --epochs 1 --limit 2000 --out results/missing
    """
    from rbkd.analysis.entropy import parse_temperatures
    from rbkd.analysis.files import write_csv, write_json
    from rbkd.analysis.plots import plot_lines
    from rbkd.analysis.runs import DistillSpec, distill, load_splits, source_dataset

    temps = [None] if label_smoothing is not None else parse_temperatures(T)
    base = DistillSpec(
        teacher=teacher,
        soft_labels=soft_labels,
        label_smoothing=label_smoothing,
        dataset=dataset,
        alpha=alpha,
        t_squared=t_squared,
        student=student,
        data_dir=data_dir,
        limit=limit,
    )
    base.check()
    name = dataset or "fashion-mnist"
    if label_smoothing is None:
        name = source_dataset(teacher, soft_labels)
    splits = load_splits(name, data_dir, limit)
    c = splits[0].num_classes
    ks = list(range(c)) if classes.strip() == "all" else parse_int_list(classes, "--classes")
    cfg = _cfg(epochs, batch_size, lr, optimizer, seed, device)
    rows = []
    names = list(splits[0].class_names)
    with _progress(len(ks) * len(temps)) as (progress, task):
        for t in temps:
            for k in ks:
                label = f"class {k}" + ("" if t is None else f", T={t:g}")
                progress.update(task, description=f"excluding {label}")
                spec = dataclasses.replace(base, exclude_classes=[k], T=t if t else 9.0)
                run = out / (f"class{k}" + ("" if t is None else f"-T{t:g}"))
                report = distill(spec, cfg, out=run, progress=False, splits=splits)
                rows.append(
                    {
                        "class": k,
                        "name": names[k] if k < len(names) else str(k),
                        "T": t,
                        "label_smoothing": label_smoothing,
                        "excluded_accuracy": report["excluded_accuracy"],
                        "test_accuracy": report["test_accuracy"],
                        "run_dir": report["run_dir"],
                    }
                )
                progress.advance(task)
                write_json(out / "results.json", {"experiment": "missing-class", "rows": rows})

    cols = (
        "class",
        "name",
        "T",
        "label_smoothing",
        "excluded_accuracy",
        "test_accuracy",
        "run_dir",
    )
    write_csv(out / "results.csv", cols, [[r[k] for k in cols] for r in rows])
    header = "A=" + f"{label_smoothing:g}" if label_smoothing is not None else None
    table = titled_table("student accuracy on the missing class")
    table.add_column("missing class")
    for t in temps:
        table.add_column(header or f"T={t:g}", justify="right")
    series = {}
    for t in temps:
        pts = [r for r in rows if r["T"] == t]
        series[header or f"T={t:g}"] = (
            [r["class"] for r in pts],
            [r["excluded_accuracy"] for r in pts],
        )
    for k in ks:
        cells = [
            _pct(r["excluded_accuracy"])
            for t in temps
            for r in rows
            if r["class"] == k and r["T"] == t
        ]
        table.add_row(escape(f"{k} {names[k] if k < len(names) else ''}"), *cells)
    console.print(table)
    plot_lines(
        out / "missing_class.png",
        series,
        xlabel="excluded class",
        ylabel="accuracy on the excluded class",
        title="missing-class test",
    )
    console.print(f"wrote {escape(out / 'results.json')}, results.csv and missing_class.png")


@app.command("transfer-set")
@handle_errors
def transfer_set(
    teacher: TeachersOpt = None,
    soft_labels: SoftLabelFilesOpt = None,
    per_class: Annotated[
        str, typer.Option("--per-class", help="Examples per class to try, e.g. 5,10,50,100.")
    ] = "5,10,50,100",
    select: SelectOpt = "entropy",
    T: TOpt = 9.0,
    alpha: AlphaOpt = 0.99,
    t_squared: TSquaredOpt = True,
    student: StudentOpt = "general",
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 64,
    lr: LrOpt = 1e-3,
    optimizer: OptimizerOpt = "adam",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = Path("results/transfer-set"),
) -> None:
    """Distill on N examples per class, chosen by highest soft-label entropy at T (or at
    random), for each N; report test accuracy against N (thesis section 5.3, figs 5.5, 5.8).

    A teacher rich in similarity information needs fewer examples per class. Writes
    results.json, results.csv and transfer_set.png into --out.

    Example:

        rbkd experiment transfer-set --teacher runs/t1 --per-class 5,10 --select entropy --epochs 1 --limit 2000 --out results/transfer
    """
    from rbkd.analysis.files import write_csv, write_json
    from rbkd.analysis.plots import plot_lines
    from rbkd.analysis.runs import DistillSpec, distill, load_splits, source_dataset

    sizes = parse_int_list(per_class, "--per-class")
    sources = [("teacher", p) for p in teacher or []] + [
        ("soft_labels", p) for p in soft_labels or []
    ]
    if not sources:
        raise ValueError("give --teacher RUN or --soft-labels FILE (either may be repeated)")
    check_choice(select, ("entropy", "random"), "--select")
    specs = []
    for kind, path in sources:
        spec = DistillSpec(
            T=T,
            alpha=alpha,
            t_squared=t_squared,
            student=student,
            select=select,
            data_dir=data_dir,
            limit=limit,
            per_class=sizes[0],
            **{kind: path},
        )
        spec.check()
        specs.append((str(path), spec))
    datasets = {source_dataset(s.teacher, s.soft_labels) for _, s in specs}
    if len(datasets) != 1:
        raise ValueError(f"the sources are for different datasets: {', '.join(sorted(datasets))}")
    splits = load_splits(datasets.pop(), data_dir, limit)
    cfg = _cfg(epochs, batch_size, lr, optimizer, seed, device)
    rows = []
    with _progress(len(specs) * len(sizes)) as (progress, task):
        for i, (name, spec) in enumerate(specs):
            for n in sizes:
                progress.update(task, description=f"{name}: {n} per class")
                run = out / f"source{i}-{select}{n}"
                report = distill(
                    dataclasses.replace(spec, per_class=n),
                    cfg,
                    out=run,
                    progress=False,
                    splits=splits,
                )
                rows.append(
                    {
                        "source": name,
                        "per_class": n,
                        "select": select,
                        "T": T,
                        "transfer_size": report["transfer"]["size"],
                        "test_accuracy": report["test_accuracy"],
                        "run_dir": report["run_dir"],
                    }
                )
                progress.advance(task)
                write_json(out / "results.json", {"experiment": "transfer-set", "rows": rows})
    cols = ("source", "per_class", "select", "T", "transfer_size", "test_accuracy", "run_dir")
    write_csv(out / "results.csv", cols, [[r[k] for k in cols] for r in rows])
    table = titled_table(f"student test accuracy vs examples per class ({select} at T={T:g})")
    table.add_column("per class", justify="right")
    for name, _ in specs:
        table.add_column(escape(name), justify="right")
    for n in sizes:
        table.add_row(
            str(n),
            *[
                _pct(r["test_accuracy"])
                for name, _ in specs
                for r in rows
                if r["source"] == name and r["per_class"] == n
            ],
        )
    console.print(table)
    series = {
        name: (
            [r["per_class"] for r in rows if r["source"] == name],
            [r["test_accuracy"] for r in rows if r["source"] == name],
        )
        for name, _ in specs
    }
    plot_lines(
        out / "transfer_set.png",
        series,
        xlabel="examples per class",
        ylabel="student test accuracy",
        title=f"transfer set: {select} selection at T={T:g}",
    )
    console.print(f"wrote {escape(out / 'results.json')}, results.csv and transfer_set.png")


@app.command("batch-sweep")
@handle_errors
def batch_sweep(
    dataset: DatasetOpt = "fashion-mnist",
    capacity: Annotated[str, typer.Option("--capacity", help="Teacher: small or large.")] = "large",
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Teacher batch sizes, e.g. 32,256,2048.")
    ] = "32,256,2048",
    epochs: Annotated[
        str, typer.Option("--epochs", help="Teacher epochs: one value or a list (fig. 6.3).")
    ] = "10",
    T: TOpt = 9.0,
    student: Annotated[
        str | None,
        typer.Option("--student", help="Also distill this student (general or baseline)."),
    ] = None,
    student_epochs: Annotated[
        int, typer.Option("--student-epochs", help="Epochs of each student.")
    ] = 10,
    student_batch_size: Annotated[
        int, typer.Option("--student-batch-size", help="Batch size of each student.")
    ] = 64,
    alpha: AlphaOpt = 0.99,
    lr: LrOpt = 1e-3,
    optimizer: OptimizerOpt = "adam",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = Path("results/batch-sweep"),
) -> None:
    """Train a teacher at each batch size (and number of epochs), record its mean soft-label
    entropy at T and test accuracy, and optionally distill a student from each (thesis ch. 6).

    The thesis finds entropy rising with the teacher's batch size and falling with more
    epochs. Writes sweep.json, sweep.csv and entropy_vs_batch_size.png into --out.

    Example:

        rbkd experiment batch-sweep --capacity small --batch-sizes 32,256 --epochs 1 --limit 2000 --out results/sweep
    """
    from rbkd.analysis.runs import STUDENTS, TEACHERS
    from rbkd.analysis.sweep import batch_sweep as run_sweep

    check_choice(capacity, TEACHERS, "--capacity")
    if student is not None:
        check_choice(student, STUDENTS, "--student")
    sizes = parse_int_list(batch_sizes, "--batch-sizes")
    epoch_list = parse_int_list(epochs, "--epochs")
    cfg = _cfg(epoch_list[0], sizes[0], lr, optimizer, seed, device)
    steps = len(sizes) * len(epoch_list) * (2 if student else 1)
    with _progress(steps) as (progress, task):

        def on_step(message: str) -> None:
            if progress.tasks[0].description != "runs":
                progress.advance(task)
            progress.update(task, description=message)

        rows = run_sweep(
            dataset=dataset,
            capacity=capacity,
            batch_sizes=sizes,
            epochs=epoch_list,
            T=T,
            base_cfg=cfg,
            out=out,
            student=student,
            student_epochs=student_epochs,
            student_batch_size=student_batch_size,
            alpha=alpha,
            data_dir=data_dir,
            limit=limit,
            on_step=on_step,
        )
        progress.advance(task)
    table = titled_table(f"{capacity} teacher on {dataset}: batch size sweep (entropy at T={T:g})")
    for col in ("batch size", "epochs", "teacher accuracy", "mean entropy (nats)"):
        table.add_column(col, justify="right")
    if student:
        table.add_column(f"{student} student accuracy", justify="right")
    for r in rows:
        cells = [
            str(r["batch_size"]),
            str(r["epochs"]),
            _pct(r["teacher_test_accuracy"]),
            f"{r['mean_entropy']:.4f}",
        ]
        if student:
            cells.append(_pct(r["student_test_accuracy"]))
        table.add_row(*cells)
    console.print(table)
    console.print(f"wrote {escape(out / 'sweep.json')}, sweep.csv and entropy_vs_batch_size.png")
