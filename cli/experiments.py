"""`rbkd experiment ...`: one thesis experiment on the command line (missing class 4.4/5.1,
transfer sets 4.6/5.3, batch size ch. 6), run as a one-experiment study (`rbkd.study`).

Runs are content-addressed under --out: the same command again trains nothing, a killed one
continues where it stopped, a longer list of classes or temperatures runs only the new cells.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rbkd.cli.config_file import ConfigOpt
from rbkd.cli.consoles import err_console
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import (
    AlphaOpt,
    BatchSizeOpt,
    Capacity,
    DataDirOpt,
    Dataset,
    DatasetOpt,
    DeviceOpt,
    EpochsOpt,
    LimitOpt,
    LrOpt,
    OptimizerOpt,
    ProgressOpt,
    SeedOpt,
    Student,
    StudentOpt,
    TeachersOpt,
    ThreadsOpt,
    TListOpt,
    TOpt,
    TSquaredOpt,
    parse_int_list,
)
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.study_progress import run_with_progress
from rbkd.cli.text import escape
from rbkd.cli.threads import start_compute
from rbkd.cli.typer_app import new_app
from rbkd.cli.usage import usage_errors

from rbkd.config import (
    DEFAULT_DATASET,
    SELECTIONS,
    STUDENTS,
    TEACHERS,
    DistillSpec,
    TrainConfig,
    check_choice,
)
from rbkd.study.experiments import batch_sweep_study, missing_class_study, transfer_set_study
from rbkd.study.results import read_jsonl

app = new_app(help="Run the thesis's experiments: grids of distillations with result tables.")

_TRAIN, _DISTILL = TrainConfig(), DistillSpec()
OutOpt = Annotated[Path, typer.Option("--out", help="Folder for results, report and runs.")]


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2%}"


def _run(
    study: dict, out: Path, data_dir, device: str, progress: bool, threads, as_json: bool
) -> list[dict]:
    """Run the study with a progress bar and its report; return its results rows."""
    start_compute(threads)
    run_with_progress(
        study,
        out,
        data_dir=data_dir,
        device=device,
        progress=progress,
        report=True,
        summary=err_console if as_json else None,  # --json: stdout holds the JSON only
    )
    return read_jsonl(out / "results.jsonl")


def _train_config(epochs, batch_size, lr, optimizer, seed, device) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, device=device
    )


@app.command("missing-class")
@handle_errors
def missing_class(
    teacher: TeachersOpt = None,
    label_smoothing: Annotated[
        list[float] | None,
        typer.Option(
            "--label-smoothing",
            help="Also (or only) train with label smoothing A instead of a teacher (repeatable: "
            "table 5.7's baseline).",
        ),
    ] = None,
    dataset: Annotated[
        Dataset, typer.Option("--dataset", help="Dataset (for --label-smoothing alone).")
    ] = DEFAULT_DATASET,
    classes: Annotated[
        str, typer.Option("--classes", help="Classes to exclude in turn: all, or e.g. 0,3,6.")
    ] = "all",
    T: TListOpt = f"{_DISTILL.T:g}",
    alpha: AlphaOpt = _DISTILL.alpha,
    t_squared: TSquaredOpt = _DISTILL.t_squared,
    student: StudentOpt = _DISTILL.student,
    epochs: EpochsOpt = _TRAIN.epochs,
    batch_size: BatchSizeOpt = _TRAIN.batch_size,
    lr: LrOpt = _TRAIN.lr,
    optimizer: OptimizerOpt = _TRAIN.optimizer,
    seed: SeedOpt = _TRAIN.seed,
    device: DeviceOpt = _TRAIN.device,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = Path("results/missing-class"),
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Exclude each class in turn from the transfer set, distill, and report the student's
    accuracy on the class it never saw (thesis tables 5.1-5.7), per teacher and T.

    High accuracy on a missing class means the soft labels carry similarity information; label
    smoothing (--label-smoothing A) carries none. Writes results.csv, results.jsonl and
    report/report.md (the tables in the thesis's layout, with figures) into --out.

    Example:

        rbkd experiment missing-class --teacher runs/t1 --classes 0,1 --T 3,9 --epochs 1 --limit 2000 --out results/missing
    """
    from rbkd.analysis.entropy import parse_temperatures
    from rbkd.engine import read_config

    with usage_errors():
        temperatures = parse_temperatures(T)
    teachers = list(teacher or [])
    if not teachers and not label_smoothing:
        raise ValueError("give --teacher RUN (repeatable) or --label-smoothing A, or both")
    if teachers:
        dataset = str(read_config(teachers[0])["dataset"])
    study = missing_class_study(
        teachers=teachers,
        label_smoothing=list(label_smoothing or []),
        dataset=dataset,
        classes="all" if classes.strip() == "all" else parse_int_list(classes, "--classes"),
        temperatures=temperatures,
        student=check_choice(student, STUDENTS, "--student"),
        alpha=alpha,
        t_squared=t_squared,
        cfg=_train_config(epochs, batch_size, lr, optimizer, seed, device),
        limit=limit,
    )
    rows = _run(study, out, data_dir, device, progress, threads, as_json)
    if as_json:
        print_json({"results": rows})
        return
    e = study["experiments"]["missing_class"]
    table = titled_table("student accuracy on the missing class")
    table.add_column("missing class")
    columns = [(t, T) for t in e["teachers"] for T in e["T"]]
    columns += [(None, A) for A in e["label_smoothing"]]
    for name, x in columns:
        head = f"{name} T={x:g}" if name else f"LS A={x:g}"
        table.add_column(escape(head), justify="right")
    names = next((r["class_names"] for r in rows), [])
    for k in e["classes"]:
        cells = []
        for name, x in columns:
            match = [
                r
                for r in rows
                if r["missing_class"] == k
                and r["teacher"] == name
                and (r["T"] == x if name else r["label_smoothing"] == x)
            ]
            cells.append(_pct(match[0]["missing_class_accuracy"]) if match else "-")
        label = f"{k} {names[k]}" if k < len(names) else str(k)
        table.add_row(escape(label), *cells)
    print_table(table)


@app.command("transfer-set")
@handle_errors
def transfer_set(
    teacher: TeachersOpt = None,
    per_class: Annotated[
        str, typer.Option("--per-class", help="Examples per class to try, e.g. 5,10,50,100.")
    ] = "5,10,50,100",
    select: Annotated[
        str,
        typer.Option(
            "--select", metavar="<entropy,random>", help="entropy, random, or both: entropy,random."
        ),
    ] = _DISTILL.select,
    T: TOpt = _DISTILL.T,
    alpha: AlphaOpt = _DISTILL.alpha,
    t_squared: TSquaredOpt = _DISTILL.t_squared,
    student: StudentOpt = _DISTILL.student,
    epochs: EpochsOpt = _TRAIN.epochs,
    batch_size: BatchSizeOpt = _TRAIN.batch_size,
    lr: LrOpt = _TRAIN.lr,
    optimizer: OptimizerOpt = _TRAIN.optimizer,
    seed: SeedOpt = _TRAIN.seed,
    device: DeviceOpt = _TRAIN.device,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = Path("results/transfer-set"),
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Distill on N examples per class, chosen by highest soft-label entropy at T (or at
    random), for each N, and on the whole split for reference; report test accuracy against N
    (thesis section 5.3, figs 5.5, 5.8).

    A teacher rich in similarity information needs fewer examples per class. Writes
    results.csv, results.jsonl and report/report.md into --out.

    Example:

        rbkd experiment transfer-set --teacher runs/t1 --per-class 5,10 --select entropy --epochs 1 --limit 2000 --out results/transfer
    """
    from rbkd.engine import read_config

    if not teacher:
        raise ValueError("give --teacher RUN (repeatable: one curve each)")
    selects = [s.strip() for s in select.split(",") if s.strip()]
    for s in selects:
        check_choice(s, SELECTIONS, "--select")
    study = transfer_set_study(
        teachers=list(teacher),
        dataset=str(read_config(teacher[0])["dataset"]),
        per_class=parse_int_list(per_class, "--per-class"),
        select=selects,
        T=T,
        student=check_choice(student, STUDENTS, "--student"),
        alpha=alpha,
        t_squared=t_squared,
        cfg=_train_config(epochs, batch_size, lr, optimizer, seed, device),
        limit=limit,
    )
    rows = _run(study, out, data_dir, device, progress, threads, as_json)
    if as_json:
        print_json({"results": rows})
        return
    e = study["experiments"]["transfer_set"]
    table = titled_table(f"student test accuracy vs examples per class (T={T:g})")
    table.add_column("per class", justify="right")
    columns = [(t, s) for t in e["teachers"] for s in e["select"]]
    for name, s in columns:
        table.add_column(escape(f"{name} ({s})"), justify="right")
    for n in [*e["per_class"], None]:
        cells = []
        for name, s in columns:
            match = [
                r
                for r in rows
                if r["teacher"] == name and r["per_class"] == n and (n is None or r["select"] == s)
            ]
            cells.append(_pct(match[0]["test_accuracy"]) if match else "-")
        table.add_row("all" if n is None else str(n), *cells)
    print_table(table)


@app.command("batch-sweep")
@handle_errors
def batch_sweep(
    dataset: DatasetOpt = DEFAULT_DATASET,
    capacity: Annotated[Capacity, typer.Option("--capacity", help="Teacher capacity.")] = "large",
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Teacher batch sizes, e.g. 32,256,2048.")
    ] = "32,256,2048",
    epochs: Annotated[
        str, typer.Option("--epochs", help="Teacher epochs: one value or a list (fig. 6.3).")
    ] = str(_TRAIN.epochs),
    T: TOpt = _DISTILL.T,
    student: Annotated[
        Student | None, typer.Option("--student", help="Also distill this student.")
    ] = None,
    student_epochs: Annotated[
        int, typer.Option("--student-epochs", help="Epochs of each student.")
    ] = _TRAIN.epochs,
    student_batch_size: Annotated[
        int, typer.Option("--student-batch-size", help="Batch size of each student.")
    ] = _TRAIN.batch_size,
    alpha: AlphaOpt = _DISTILL.alpha,
    lr: LrOpt = _TRAIN.lr,
    optimizer: OptimizerOpt = _TRAIN.optimizer,
    seed: SeedOpt = _TRAIN.seed,
    device: DeviceOpt = _TRAIN.device,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = Path("results/batch-sweep"),
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train a teacher at each batch size (and number of epochs), record its mean soft-label
    entropy at T and test accuracy, and optionally distill a student from each (thesis ch. 6).

    The thesis finds entropy rising with the teacher's batch size and falling with more
    epochs. Writes teachers.jsonl, results.csv and report/report.md into --out.

    Example:

        rbkd experiment batch-sweep --capacity small --batch-sizes 32,256 --epochs 1 --limit 2000 --out results/sweep
    """
    check_choice(capacity, TEACHERS, "--capacity")
    if student is not None:
        check_choice(student, STUDENTS, "--student")
    study = batch_sweep_study(
        dataset=dataset,
        capacity=capacity,
        batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        epochs=parse_int_list(epochs, "--epochs"),
        T=T,
        teacher_cfg=_train_config(1, 1, lr, optimizer, seed, device),
        student=student,
        student_cfg=_train_config(student_epochs, student_batch_size, lr, optimizer, seed, device),
        alpha=alpha,
        limit=limit,
    )
    rows = _run(study, out, data_dir, device, progress, threads, as_json)
    teachers = [t for t in read_jsonl(out / "teachers.jsonl") if t["role"] == "sweep"]
    if as_json:
        print_json({"teachers": teachers, "results": rows})
        return
    table = titled_table(f"{capacity} teacher on {dataset}: batch size sweep (entropy at T={T:g})")
    for col in ("batch size", "epochs", "teacher accuracy", "mean entropy (nats)"):
        table.add_column(col, justify="right")
    if student:
        table.add_column(f"{student} student accuracy", justify="right")
    for t in teachers:
        entropy = t["mean_entropy"][t["entropy_T"].index(float(T))]
        cells = [str(t["batch_size"]), str(t["epochs"]), _pct(t["test_accuracy"]), f"{entropy:.4f}"]
        if student:
            match = [r for r in rows if r["teacher"] == t["name"]]
            cells.append(_pct(match[0]["test_accuracy"]) if match else "-")
        table.add_row(*cells)
    print_table(table)
