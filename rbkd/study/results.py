"""A study's tidy tables: teachers.jsonl, results.jsonl and results.csv (one row per run).

They are rebuilt from the finished runs' own result files after every run and replaced
atomically, so a killed study never leaves half a row, and a row exists only for a run whose
result file (written last) says it is done. docs/studies.md lists every column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rbkd.config import LOSS_OPTIONS
from rbkd.io import jsonable, read_bounded, write_bytes, write_csv

ENTROPY_T = tuple(float(t) for t in range(1, 21))  # figs 5.2-5.4 and 6.4 span T = 1..20

RESULT_COLUMNS = (
    "study",
    "dataset",
    "key",
    "experiments",
    "teacher",
    "teacher_key",
    "teacher_capacity",
    "teacher_batch_size",
    "teacher_epochs",
    "teacher_lr",
    "teacher_seed",
    "teacher_accuracy",
    "teacher_entropy_at_T",
    "student",
    "T",
    "alpha",
    "t_squared",
    # kd_loss's divergence and the options it uses (empty: an option it does not use, or a
    # label-smoothing student, which has no divergence)
    "divergence",
    "beta",
    "skew",
    "dkd_alpha",
    "dkd_beta",
    "standardize",
    "label_smoothing",
    "noise",
    "missing_class",
    "missing_class_name",
    "per_class",
    "select",
    "transfer_size",
    "transfer_labels",  # "unlabelled": the student's loop saw no label (alpha 1)
    "seed",
    "epochs",
    "batch_size",
    "lr",
    "test_accuracy",
    "missing_class_accuracy",
    "wall_time_s",
    "samples_per_s",
    "device",
    "run_dir",
)


def _relative(path: Path, out: Path) -> str:
    """A run folder relative to the study folder (portable), or as given when outside it."""
    try:
        return str(Path(path).resolve().relative_to(Path(out).resolve()))
    except ValueError:
        return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in rows)
    write_bytes(path, text.encode())


MAX_TABLE_BYTES = 256 << 20  # a results table of a million runs is ~1 GB; a study has thousands


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines table ([] when it does not exist yet), read bounded from a
    regular file; ValueError naming the line for a row that is not a JSON object."""
    path = Path(path)
    if not path.exists():
        return []
    text = read_bounded(path, MAX_TABLE_BYTES, "results table").decode(errors="replace")
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {n} is not valid JSON ({e.msg}); rerun `rbkd study run` on the "
                "folder to rebuild it"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n} is not a JSON object")
        rows.append(row)
    return rows


def study_temperatures(study: dict) -> set[float]:
    """Every temperature the study names anywhere (its teachers' entropy is tabled at each)."""
    temps = {float(t) for t in study["loss"]["T"]}
    for e in study["experiments"].values():
        value = e.get("T")
        temps |= {
            float(t) for t in (value if isinstance(value, list) else [value] if value else [])
        }
    return temps


def teacher_row(study: dict, task, result: dict, soft, out: Path) -> list[dict[str, Any]]:
    """The rows of one teacher run (one per study name), with its soft-label entropy curves."""
    # Here, not at the top: rbkd.analysis imports torch, and the commands' modules read tables
    # with read_jsonl (their --help stays torch-free).
    from rbkd.analysis.entropy import entropy_table

    temps = sorted(set(ENTROPY_T) | study_temperatures(study))
    table = entropy_table(soft.logits, soft.labels, temps, num_classes=soft.num_classes).to_dict()
    metrics = result["metrics"]
    base = {
        "study": study["name"],
        "dataset": study["dataset"],
        "key": task.key,
        "capacity": task.spec.capacity,
        "batch_size": task.cfg.batch_size,
        "epochs": task.cfg.epochs,
        "lr": task.cfg.lr,
        "seed": task.cfg.seed,
        "test_accuracy": metrics["test_accuracy"],
        "per_class_accuracy": metrics["per_class_accuracy"],
        "entropy_T": table["temperatures"],
        "mean_entropy": table["mean_entropy"],
        "per_class_entropy": table["per_class_entropy"],
        "wall_time_s": result.get("wall_time_s"),
        "samples_per_s": metrics.get("samples_per_s"),
        "run_dir": _relative(task.run_dir, out),
    }
    return [
        {"name": name, "role": role, **base}
        for name, role in zip(task.names, task.roles, strict=True)
    ]


def loss_columns(spec) -> dict[str, Any]:
    """The divergence columns of a student (a DistillSpec): the options its divergence uses,
    None for the others; all None for label smoothing."""
    used = spec.loss.describe() if spec.label_smoothing is None else {}
    return {k: used.get(k) for k in LOSS_OPTIONS}


def student_row(study: dict, task, report: dict, teacher: dict | None, out: Path) -> dict:
    """One row of results.jsonl from a finished student run's report.json."""
    names = report.get("class_names") or []
    k = task.missing_class
    T = report.get("T")
    entropy_at_T = None
    if teacher is not None and T is not None and T in teacher["entropy_T"]:
        entropy_at_T = teacher["mean_entropy"][teacher["entropy_T"].index(T)]
    t = report["transfer"]
    return {
        "study": study["name"],
        "dataset": study["dataset"],
        "key": task.key,
        "experiments": list(task.experiments),
        "teacher": task.teacher,
        "teacher_key": teacher["key"] if teacher else None,
        "teacher_capacity": teacher["capacity"] if teacher else None,
        "teacher_batch_size": teacher["batch_size"] if teacher else None,
        "teacher_epochs": teacher["epochs"] if teacher else None,
        "teacher_lr": teacher["lr"] if teacher else None,
        "teacher_seed": teacher["seed"] if teacher else None,
        "teacher_accuracy": teacher["test_accuracy"] if teacher else None,
        "teacher_entropy_at_T": entropy_at_T,
        "student": report["student"],
        "T": T,
        "alpha": task.spec.alpha,
        "t_squared": task.spec.t_squared,
        **loss_columns(task.spec),
        "label_smoothing": report.get("label_smoothing"),
        "noise": report.get("noise"),
        "missing_class": k,
        "missing_class_name": names[k] if k is not None and k < len(names) else None,
        "per_class": t["per_class"],
        "select": t["select"],
        "transfer_size": t["size"],
        "transfer_labels": "unlabelled" if task.spec.unlabelled else "labelled",
        "seed": task.cfg.seed,
        "epochs": task.cfg.epochs,
        "batch_size": task.cfg.batch_size,
        "lr": task.cfg.lr,
        "test_accuracy": report["test_accuracy"],
        "per_class_accuracy": report["per_class_accuracy"],
        "missing_class_accuracy": report.get("excluded_accuracy") if k is not None else None,
        "class_names": names,
        "wall_time_s": report.get("wall_time_s"),
        "samples_per_s": report.get("samples_per_s"),
        "device": report.get("device"),
        "run_dir": _relative(task.run_dir, out),
    }


def accuracy_columns(class_names: Sequence[str]) -> list[str]:
    """results.csv's per-class accuracy headers, identifiers that pandas, R and SQL take as they
    are: `acc_` and the class name, each run of characters other than ASCII letters and digits
    made one '_' ("T-shirt/top" -> acc_T_shirt_top, "Ankle boot" -> acc_Ankle_boot, "3" ->
    acc_3). Where a name leaves nothing, or two names would give one header, every header is
    the class index instead (acc_0, acc_1, ...)."""
    slugs = [re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_") for name in class_names]
    columns = [f"acc_{slug}" for slug in slugs]
    if all(slugs) and len(set(columns)) == len(columns):
        return columns
    return [f"acc_{k}" for k in range(len(slugs))]


def write_results(out: Path, teachers: list[dict], students: list[dict]) -> None:
    """teachers.jsonl, results.jsonl and results.csv, each replaced atomically. A text cell of
    results.csv that a spreadsheet would run as a formula (a teacher named "=HYPERLINK(...)")
    starts with a single quote (`rbkd.io.csv_cell`); numbers stay numbers."""
    write_jsonl(out / "teachers.jsonl", teachers)
    write_jsonl(out / "results.jsonl", students)
    names = next((r["class_names"] for r in students if r.get("class_names")), [])
    columns = list(RESULT_COLUMNS) + accuracy_columns(names)
    rows = []
    for r in students:
        cells = ["+".join(r[c]) if c == "experiments" else r.get(c) for c in RESULT_COLUMNS] + list(
            r["per_class_accuracy"][: len(names)]
        )
        rows.append(cells)
    write_csv(out / "results.csv", columns, rows)
