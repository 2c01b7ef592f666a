"""`rbkd train-teacher`: train a thesis teacher on hard labels and write its soft labels."""

from __future__ import annotations

from typing import Annotated

import typer
from rbkd.cli.config_file import ConfigOpt
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import (
    BatchSizeOpt,
    Capacity,
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    EpochsOpt,
    LimitOpt,
    LrOpt,
    OptimizerOpt,
    OutDirOpt,
    ProgressOpt,
    SeedOpt,
    TensorBoardOpt,
    ThreadsOpt,
)
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.tensorboard import close_logger, epoch_callbacks
from rbkd.cli.text import escape
from rbkd.cli.threads import start_compute
from rbkd.cli.typer_app import new_app
from rbkd.cli.usage import usage_errors

from rbkd.config import TEACHERS, TeacherSpec, TrainConfig, check_choice

app = new_app()
_SPEC, _TRAIN = TeacherSpec(), TrainConfig()

CapacityOpt = Annotated[
    Capacity, typer.Option("--capacity", help="Teacher capacity (thesis App. A).")
]


@app.command("train-teacher")
@handle_errors
def train_teacher(
    dataset: DatasetOpt = _SPEC.dataset,
    capacity: CapacityOpt = _SPEC.capacity,
    epochs: EpochsOpt = _TRAIN.epochs,
    batch_size: BatchSizeOpt = _TRAIN.batch_size,
    lr: LrOpt = _TRAIN.lr,
    optimizer: OptimizerOpt = _TRAIN.optimizer,
    seed: SeedOpt = _TRAIN.seed,
    device: DeviceOpt = _TRAIN.device,
    data_dir: DataDirOpt = None,
    out: OutDirOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Insist on continuing the run in --out (a rerun of the same command resumes "
            "on its own; this also refuses to start afresh).",
        ),
    ] = False,
    limit: LimitOpt = None,
    progress: ProgressOpt = True,
    tensorboard: TensorBoardOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train a teacher on hard labels (cross-entropy) and write its run folder.

    The run folder holds model.safetensors, config.json, metrics.jsonl, an epoch checkpoint,
    result.json and the teacher's soft labels (raw logits) for both splits:
    soft_labels_train.safetensors and soft_labels_test.safetensors. The folder is named by a
    hash of everything that determines the teacher: the same command again trains nothing, and
    a killed run continues from its last epoch.

    Example:

        rbkd train-teacher --capacity small --epochs 1 --batch-size 128 --limit 2000 --out runs/t1
    """
    from rbkd.analysis.entropy import entropy_at
    from rbkd.soft_label_file import read_soft_labels
    from rbkd.study.teacher import train_teacher as run_train_teacher

    # Option values were checked by handle_errors; these checks span options (exit code 2).
    with usage_errors():
        capacity = check_choice(capacity, TEACHERS, "--capacity")
        spec = TeacherSpec(dataset=dataset, capacity=capacity)
        spec.check()
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            seed=seed,
            device=device,
        )
    if resume and (out is None or not (out / "config.json").is_file()):
        where = "--out RUN, the folder of the run to continue" if out is None else f"{out}"
        raise ValueError(f"--resume needs a run to continue: {where} holds none")
    with usage_errors():  # before anything trains: a missing tensorboard is exit code 2
        hooks, logger = epoch_callbacks(tensorboard)
    start_compute(threads)
    try:
        result = run_train_teacher(
            spec, cfg, out=out, data_dir=data_dir, limit=limit, progress=progress, callbacks=hooks
        )
    finally:
        close_logger(logger)
    m = result["metrics"]
    soft = read_soft_labels(result["soft_labels"]["train"])
    if as_json:
        mean = {f"{T:g}": float(entropy_at(soft.logits, T).mean()) for T in (1.0, 9.0)}
        print_json({**result, "mean_entropy_nats": mean})
        return
    title = f"{capacity} teacher on {dataset}"
    if result["reused"]:
        title += " (already trained: nothing to do)"
    table = titled_table(escape(title), show_header=False)
    table.add_row("run folder", escape(result["run_dir"]))
    table.add_row("epochs", str(m["epochs"]))
    table.add_row("test accuracy", f"{m['test_accuracy']:.2%}")
    for T in (1.0, 9.0):
        h = float(entropy_at(soft.logits, T).mean())
        table.add_row(f"mean soft-label entropy, T={T:g}", f"{h:.4f} nats")
    for split, path in result["soft_labels"].items():
        table.add_row(f"soft labels ({split})", escape(path))
    print_table(table)
