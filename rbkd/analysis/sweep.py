"""The batch-size / epochs sweep of chapter 6 (figures 6.2-6.5).

Train one teacher per (batch size, epochs) pair, record the mean entropy of its train-split soft
labels at T and its test accuracy, and optionally distill a student from each. The thesis's claim:
entropy rises with the teacher's batch size (fig. 6.2) and falls with more epochs (fig. 6.3), and
higher-entropy teachers distill better (fig. 6.5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rbkd.analysis.entropy import check_temperature, entropy_at
from rbkd.analysis.files import write_csv, write_json
from rbkd.analysis.plots import plot_lines
from rbkd.analysis.runs import DistillSpec, distill, load_splits, train_teacher
from rbkd.softlabels import TRAIN_FILE, read_soft_labels

CSV_COLUMNS = (
    "batch_size",
    "epochs",
    "teacher_test_accuracy",
    "mean_entropy",
    "student_test_accuracy",
    "teacher_run",
    "student_run",
)


def batch_sweep(
    *,
    dataset: str,
    capacity: str,
    batch_sizes: Sequence[int],
    epochs: Sequence[int],
    T: float,
    base_cfg,
    out: Path,
    student: str | None = None,
    student_epochs: int = 1,
    student_batch_size: int = 64,
    alpha: float = 0.99,
    data_dir: Path | None = None,
    limit: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the sweep; write sweep.json, sweep.csv and entropy_vs_batch_size.png (and
    student_accuracy_vs_batch_size.png with a student) into `out`; return the rows."""
    check_temperature(T)
    if not batch_sizes or not epochs:
        raise ValueError("give at least one batch size and one number of epochs")
    bad = [b for b in batch_sizes if b < 1] + [e for e in epochs if e < 1]
    if bad:
        raise ValueError(f"batch sizes and epochs must be >= 1, got {bad[0]}")
    out = Path(out)
    splits = load_splits(dataset, data_dir, limit)
    rows: list[dict[str, Any]] = []
    for e in epochs:
        for b in batch_sizes:
            cfg = dataclasses.replace(base_cfg, batch_size=b, epochs=e)
            if on_step:
                on_step(f"teacher batch {b}, {e} epoch(s)")
            run = out / f"teacher-b{b}-e{e}"
            result = train_teacher(
                dataset=dataset,
                capacity=capacity,
                cfg=cfg,
                out=run,
                data_dir=data_dir,
                limit=limit,
                progress=False,
            )
            soft = read_soft_labels(run / TRAIN_FILE, dataset=splits[0])
            row = {
                "batch_size": b,
                "epochs": e,
                "teacher_test_accuracy": float(result["metrics"]["test_accuracy"]),
                "mean_entropy": float(entropy_at(soft.logits, T).mean()),
                "student_test_accuracy": None,
                "teacher_run": str(run),
                "student_run": None,
            }
            if student is not None:
                if on_step:
                    on_step(f"student from teacher batch {b}, {e} epoch(s)")
                spec = DistillSpec(
                    teacher=run, T=T, alpha=alpha, student=student, data_dir=data_dir, limit=limit
                )
                scfg = dataclasses.replace(
                    base_cfg, batch_size=student_batch_size, epochs=student_epochs
                )
                report = distill(
                    spec, scfg, out=out / f"student-b{b}-e{e}", progress=False, splits=splits
                )
                row["student_test_accuracy"] = report["test_accuracy"]
                row["student_run"] = report["run_dir"]
            rows.append(row)
            _write(out, rows, dataset=dataset, capacity=capacity, T=T, student=student)
    return rows


def _write(out: Path, rows: list[dict], **meta: Any) -> None:
    """Results so far (rewritten after every run: a stopped sweep keeps what it finished)."""
    write_json(out / "sweep.json", {**meta, "entropy_unit": "nats", "rows": rows})
    write_csv(out / "sweep.csv", CSV_COLUMNS, [[r[k] for k in CSV_COLUMNS] for r in rows])
    by_epochs: dict[str, tuple[list, list]] = {}
    acc: dict[str, tuple[list, list]] = {}
    for r in rows:
        name = f"{r['epochs']} epoch(s)"
        by_epochs.setdefault(name, ([], []))
        by_epochs[name][0].append(r["batch_size"])
        by_epochs[name][1].append(r["mean_entropy"])
        if r["student_test_accuracy"] is not None:
            acc.setdefault(name, ([], []))
            acc[name][0].append(r["batch_size"])
            acc[name][1].append(r["student_test_accuracy"])
    title = f"{meta['capacity']} teacher, {meta['dataset']}"
    plot_lines(
        out / "entropy_vs_batch_size.png",
        by_epochs,
        xlabel="teacher batch size",
        ylabel=f"mean soft-label entropy at T={meta['T']:g} (nats)",
        title=title,
        logx=True,
    )
    if acc:
        plot_lines(
            out / "student_accuracy_vs_batch_size.png",
            acc,
            xlabel="teacher batch size",
            ylabel="student test accuracy",
            title=f"{meta['student']} student from {title}",
            logx=True,
        )
