"""`rbkd distill`: train a student on a teacher's soft labels (or on label-smoothed targets)."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rbkd.cli.config_file import ConfigOpt
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import (
    AlphaOpt,
    BatchSizeOpt,
    BetaOpt,
    DataDirOpt,
    Dataset,
    DeviceOpt,
    DivergenceOpt,
    DkdAlphaOpt,
    DkdBetaOpt,
    EpochsOpt,
    ExcludeClassOpt,
    LabelSmoothingOpt,
    LimitOpt,
    LrOpt,
    NoiseOpt,
    OptimizerOpt,
    OutDirOpt,
    PerClassOpt,
    ProgressOpt,
    SeedOpt,
    SelectOpt,
    SkewOpt,
    SoftLabelsOpt,
    StandardizeOpt,
    StudentOpt,
    TeacherOpt,
    TensorBoardOpt,
    ThreadsOpt,
    TOpt,
    TSquaredOpt,
)
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.tensorboard import close_logger, epoch_callbacks
from rbkd.cli.text import escape
from rbkd.cli.threads import start_compute
from rbkd.cli.typer_app import new_app
from rbkd.cli.usage import usage_errors
from typer._click.core import ParameterSource
from typer._click.globals import get_current_context

from rbkd.config import DistillSpec, LossSpec, TrainConfig

app = new_app()
_DISTILL, _TRAIN = DistillSpec(), TrainConfig()


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2%}"


def print_report(report: dict) -> None:
    """The terminal table of one distillation run."""
    source = report["source"]
    if source["kind"] == "label_smoothing":
        what = f"label smoothing A={report['label_smoothing']:g}"
    else:
        run, _, digest = source["teacher"].partition("@sha256:")
        what = f"{run} (sha256 {digest[:12]}) at T={report['T']:g}"
    if report.get("noise"):
        what += f", noise {report['noise']}"
    loss = report.get("loss")
    if loss and source["kind"] != "label_smoothing":
        what += f", divergence {LossSpec.from_dict(loss).label()}"
    t = report["transfer"]
    title = f"{report['student']} student on {report['dataset']}"
    if report.get("reused"):
        title += " (already done: nothing trained)"
    summary = titled_table(escape(title), show_header=False)
    summary.add_column(no_wrap=True)
    summary.add_column(overflow="fold")
    summary.add_row("run folder", escape(report["run_dir"]))
    summary.add_row("targets", escape(what))
    if t["per_class"] is not None:
        chosen = f"{t['per_class']} per class ({t['select']})"
    elif t.get("candidates", 0) < t.get("split_size", 0):
        chosen = f"the {t['candidates']} of {t['split_size']} examples the soft labels cover"
    else:
        chosen = "all examples" + (" but the excluded class(es)" if t["excluded_classes"] else "")
    summary.add_row("transfer set", f"{t['size']} examples: {chosen}")
    if t.get("labels") == "unlabelled":
        summary.add_row("labels", "none used (--unlabelled: the soft labels alone, alpha 1)")
    summary.add_row("test accuracy", _pct(report["test_accuracy"]))
    if t["excluded_classes"]:
        names = ", ".join(map(str, t["excluded_classes"]))
        summary.add_row(
            f"accuracy on excluded class(es) {names}", _pct(report["excluded_accuracy"])
        )
    print_table(summary)

    per = titled_table("test accuracy per class")
    per.add_column("class", justify="right")
    per.add_column("name")
    per.add_column("transfer examples", justify="right")
    per.add_column("accuracy", justify="right")
    names = report.get("class_names") or []
    for k, acc in enumerate(report["per_class_accuracy"]):
        excluded = k in t["excluded_classes"]
        row = [
            str(k),
            escape(names[k]) if k < len(names) else "",
            "excluded" if excluded else str(t["per_class_counts"][k]),
            _pct(acc),
        ]
        per.add_row(*row, style="bold yellow" if excluded else None)
    print_table(per)


def _unlabelled_alpha(unlabelled: bool, alpha: float) -> float:
    """alpha is 1 for --unlabelled unless the user set it (on the command line, by --config or
    by environment): another value is then refused by DistillSpec.check. The run records the 1,
    so that `rbkd rerun` repeats it."""
    ctx = get_current_context(silent=True)
    if not unlabelled or ctx is None:
        return alpha
    if ctx.get_parameter_source("alpha") not in (None, ParameterSource.DEFAULT):
        return alpha
    ctx.params["alpha"] = 1.0  # what config.json's invocation records
    return 1.0


@app.command("distill")
@handle_errors
def distill(
    teacher: TeacherOpt = None,
    soft_labels: SoftLabelsOpt = None,
    T: TOpt = _DISTILL.T,
    alpha: AlphaOpt = _DISTILL.alpha,
    t_squared: TSquaredOpt = _DISTILL.t_squared,
    divergence: DivergenceOpt = _DISTILL.loss.divergence,
    beta: BetaOpt = _DISTILL.loss.beta,
    skew: SkewOpt = _DISTILL.loss.skew,
    dkd_alpha: DkdAlphaOpt = _DISTILL.loss.dkd_alpha,
    dkd_beta: DkdBetaOpt = _DISTILL.loss.dkd_beta,
    standardize: StandardizeOpt = _DISTILL.loss.standardize,
    student: StudentOpt = _DISTILL.student,
    exclude_class: ExcludeClassOpt = None,
    per_class: PerClassOpt = None,
    select: SelectOpt = _DISTILL.select,
    label_smoothing: LabelSmoothingOpt = None,
    noise: NoiseOpt = None,
    dataset: Annotated[
        Dataset | None,
        typer.Option("--dataset", help="Dataset (needed only with --label-smoothing)."),
    ] = None,
    epochs: EpochsOpt = _TRAIN.epochs,
    batch_size: BatchSizeOpt = _TRAIN.batch_size,
    lr: LrOpt = _TRAIN.lr,
    optimizer: OptimizerOpt = _TRAIN.optimizer,
    seed: SeedOpt = _TRAIN.seed,
    device: DeviceOpt = _TRAIN.device,
    data_dir: DataDirOpt = None,
    out: OutDirOpt = None,
    limit: LimitOpt = None,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Distill on the rows a soft-label file has even when it covers only part of "
            "the split (otherwise an error).",
        ),
    ] = _DISTILL.allow_partial,
    unlabelled: Annotated[
        bool,
        typer.Option(
            "--unlabelled",
            help="Pure distillation: the training loop sees no label, only the teacher's soft "
            "labels (alpha is 1; another --alpha is an error).",
        ),
    ] = _DISTILL.unlabelled,
    progress: ProgressOpt = True,
    tensorboard: TensorBoardOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Distill a student from a teacher's soft labels at temperature T (loss: rbkd.ops.kd_loss).

    The targets come from one of: --teacher RUN (its soft_labels_train.safetensors),
    --soft-labels FILE, or --label-smoothing A (no teacher: (1-A)*onehot + A/C, the LS
    baseline). The transfer set is the training split, less every class given with
    --exclude-class (the missing-class test; its accuracy is reported), or N examples per class
    with --per-class N, chosen by highest soft-label entropy at T or at random. --noise adds
    uniform:S or normal:S noise to the soft labels, redrawn every epoch. The report goes to the
    terminal and to report.json in the run folder. The same command again reuses the finished
    run; a killed one continues from its last epoch. A --teacher trained with --limit N lends
    the student its N (the first N examples of each split) unless --limit is given.
    --unlabelled distills on an unlabelled transfer set: no label reaches the loss (alpha 1);
    --exclude-class and --per-class still choose the examples by their label.

    Example:

        rbkd distill --teacher runs/t1 --T 9 --exclude-class 3 --epochs 1 --limit 2000 --out runs/s1
    """
    from rbkd.study.student import distill as run_distill

    # Option values were checked by handle_errors; these checks span options (exit code 2).
    alpha = _unlabelled_alpha(unlabelled, alpha)
    spec = DistillSpec(
        teacher=teacher,
        soft_labels=soft_labels,
        label_smoothing=label_smoothing,
        dataset=dataset,
        T=T,
        alpha=alpha,
        t_squared=t_squared,
        student=student,
        exclude_classes=list(exclude_class or []),
        per_class=per_class,
        select=select,
        noise=noise,
        data_dir=data_dir,
        limit=limit,
        allow_partial=allow_partial,
        loss=LossSpec(divergence, beta, skew, dkd_alpha, dkd_beta, standardize),
        unlabelled=unlabelled,
    )
    with usage_errors():
        spec.check()
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            seed=seed,
            device=device,
        )
    with usage_errors():  # before anything trains: a missing tensorboard is exit code 2
        hooks, logger = epoch_callbacks(tensorboard)
    start_compute(threads)
    try:
        report = run_distill(spec, cfg, out=out, progress=progress, callbacks=hooks)
    finally:
        close_logger(logger)
    if as_json:
        print_json(report)
        return
    print_report(report)
