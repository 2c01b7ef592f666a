"""One experiment as a one-experiment study: what `rbkd experiment ...` runs.

Each builder turns command-line choices into the same study a file would declare, so that an
experiment command and a study file share one code path: the same grids, the same content-
addressed runs (a rerun trains nothing, a killed one continues), the same tables and report.
Teachers given as run folders are used as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rbkd.config import TrainConfig
from rbkd.study.schema import MAX_NAME_CHARS, parse_study, sweep_names

COMMAND_LINE = Path("<command line>")


def _teacher_name(run: Path, taken: list[str]) -> str:
    """A study name for a teacher run folder: its last name made safe (check_name: letters,
    digits, '-', '_', '.', bounded), told apart from the names already taken by -2, -3, ..."""
    raw = Path(run).resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).lstrip(".-")[: MAX_NAME_CHARS - 8] or "teacher"
    base, n = name, 1
    while name in taken:  # two folders with the same last name: keep both, told apart
        n += 1
        name = f"{base}-{n}"
    return name


def _teachers(runs: list[Path]) -> list[dict[str, Any]]:
    names: list[str] = []
    for run in runs:
        names.append(_teacher_name(run, names))
    return [{"name": n, "run": str(Path(r).resolve())} for n, r in zip(names, runs, strict=True)]


def _base(name: str, dataset: str, cfg: TrainConfig, limit: int | None, alpha: float) -> dict:
    return {
        "study": {"name": name, "dataset": dataset, "seeds": [cfg.seed], **_limit(limit)},
        "loss": {"alpha": alpha},
        "student": {
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "optimizer": cfg.optimizer,
        },
    }


def _limit(limit: int | None) -> dict:
    return {} if limit is None else {"limit": limit}


def missing_class_study(
    *,
    teachers: list[Path],
    label_smoothing: list[float],
    dataset: str,
    classes: list[int] | str,
    temperatures: list[float],
    student: str,
    alpha: float,
    t_squared: bool,
    cfg: TrainConfig,
    limit: int | None,
) -> dict[str, Any]:
    data = _base("missing-class", dataset, cfg, limit, alpha)
    data["teacher"] = _teachers(teachers)
    data["experiments"] = {
        "missing_class": {
            "teachers": [t["name"] for t in data["teacher"]],
            "student": student,
            "classes": classes,
            "T": temperatures,
            "label_smoothing": label_smoothing,
            "t_squared": t_squared,
        }
    }
    if not teachers:
        del data["experiments"]["missing_class"]["teachers"]
    return parse_study(data, COMMAND_LINE)


def transfer_set_study(
    *,
    teachers: list[Path],
    dataset: str,
    per_class: list[int],
    select: list[str],
    T: float,
    student: str,
    alpha: float,
    t_squared: bool,
    cfg: TrainConfig,
    limit: int | None,
) -> dict[str, Any]:
    data = _base("transfer-set", dataset, cfg, limit, alpha)
    data["teacher"] = _teachers(teachers)
    data["experiments"] = {
        "transfer_set": {
            "student": student,
            "per_class": per_class,
            "select": select,
            "T": [T],
            "t_squared": t_squared,
        }
    }
    return parse_study(data, COMMAND_LINE)


def batch_sweep_study(
    *,
    dataset: str,
    capacity: str,
    batch_sizes: list[int],
    epochs: list[int],
    T: float,
    teacher_cfg: TrainConfig,
    student: str | None,
    student_cfg: TrainConfig,
    alpha: float,
    limit: int | None,
) -> dict[str, Any]:
    data = _base("batch-sweep", dataset, student_cfg, limit, alpha)
    sweep = {
        "capacity": capacity,
        "batch_sizes": batch_sizes,
        "epochs": epochs,
        "lr": teacher_cfg.lr,
        "optimizer": teacher_cfg.optimizer,
        "seed": teacher_cfg.seed,
        "T": [T],
    }
    data["experiments"] = {"batch_sweep": sweep}
    if student is not None:
        data["experiments"]["temperature"] = {
            "teachers": sweep_names(sweep),
            "student": student,
            "T": [T],
        }
    return parse_study(data, COMMAND_LINE)
