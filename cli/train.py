"""`rbkd train-teacher`: train a thesis teacher on hard labels and write its soft labels."""

from __future__ import annotations

from typing import Annotated

import typer
from rbkd.cli.common import (
    BatchSizeOpt,
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
    check_choice,
    console,
    escape,
    handle_errors,
    new_app,
    titled_table,
)

app = new_app()

CapacityOpt = Annotated[
    str, typer.Option("--capacity", help="Teacher capacity: small or large (thesis App. A).")
]


@app.command("train-teacher")
@handle_errors
def train_teacher(
    dataset: DatasetOpt = "fashion-mnist",
    capacity: CapacityOpt = "small",
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 64,
    lr: LrOpt = 1e-3,
    optimizer: OptimizerOpt = "adam",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    out: OutDirOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the unfinished run in --out.")
    ] = False,
    limit: LimitOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Train a teacher on hard labels (cross-entropy) and write its run folder.

    The run folder holds model.safetensors, config.json, metrics.jsonl, a checkpoint for
    --resume, and the teacher's soft labels (raw logits) for both splits:
    soft_labels_train.safetensors and soft_labels_test.safetensors.

    Example:

        rbkd train-teacher --capacity small --epochs 1 --batch-size 128 --limit 2000 --out runs/t1
    """
    from rbkd.analysis.entropy import entropy_at
    from rbkd.analysis.runs import TEACHERS
    from rbkd.analysis.runs import train_teacher as run_train_teacher
    from rbkd.engine import TrainConfig
    from rbkd.softlabels import read_soft_labels

    check_choice(capacity, TEACHERS, "--capacity")
    if resume and out is None:
        raise ValueError("--resume needs --out RUN, the folder of the run to continue")
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, device=device
    )
    result = run_train_teacher(
        dataset=dataset,
        capacity=capacity,
        cfg=cfg,
        out=out,
        data_dir=data_dir,
        limit=limit,
        resume=resume,
        progress=progress,
    )
    m = result["metrics"]
    soft = read_soft_labels(result["soft_labels"]["train"])
    table = titled_table(f"{capacity} teacher on {dataset}", show_header=False)
    table.add_row("run folder", escape(result["run_dir"]))
    table.add_row("epochs", str(m["epochs"]))
    table.add_row("test accuracy", f"{m['test_accuracy']:.2%}")
    for T in (1.0, 9.0):
        h = float(entropy_at(soft.logits, T).mean())
        table.add_row(f"mean soft-label entropy, T={T:g}", f"{h:.4f} nats")
    for split, path in result["soft_labels"].items():
        table.add_row(f"soft labels ({split})", escape(path))
    console.print(table)
