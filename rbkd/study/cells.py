"""Running one cell of a study: a teacher (trained, reused, or read as it is when trained
elsewhere) or a student distilled from its teacher's soft labels, through the one implementation
of each verb (rbkd.study.teacher.train_teacher, rbkd.study.student.distill)."""

from __future__ import annotations

from typing import Any

from rbkd.engine import read_config
from rbkd.study.soft_label_source import fit_to_dataset
from rbkd.study.student import distill
from rbkd.study.teacher import train_teacher


def external_result(task) -> dict[str, Any]:
    """A teacher trained elsewhere, in the shape of train_teacher's result."""
    config = read_config(task.run_dir)
    metrics = config.get("final_metrics") or {}
    if "test_accuracy" not in metrics:
        raise ValueError(f"{task.run_dir}/config.json has no final metrics: the run did not finish")
    return {"metrics": metrics, "wall_time_s": None, "reused": True}


def run_teacher(task, study: dict, splits) -> dict[str, Any]:
    """train_teacher's result for a study teacher (reused when done, resumed when killed); a
    teacher trained elsewhere is read as it is, never trained."""
    if task.external:
        return external_result(task)
    return train_teacher(
        task.spec,
        task.cfg,
        out=task.run_dir,
        splits=splits,
        limit=study["limit"],  # recorded; the splits are already cut
        progress=False,
    )


def run_student(task, plan, soft: dict[str, Any], splits) -> dict[str, Any]:
    """distill's report for a study student; `soft`: each done teacher's train-split soft labels
    by its key. The student names its teacher by the teacher's key, as the plan did."""
    spec = task.spec
    labels, source_id = None, {"label_smoothing": spec.label_smoothing}
    if task.teacher is not None:
        teacher = plan.teacher(task.teacher)
        spec = spec.replace(teacher=teacher.run_dir)
        labels = fit_to_dataset(soft[teacher.key], splits[0])
        source_id = {"teacher": teacher.key}
    return distill(
        spec,
        task.cfg,
        out=task.run_dir,
        progress=False,
        splits=splits,
        soft=labels,
        source_id=source_id,
    )
