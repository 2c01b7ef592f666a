"""Reading a study folder (study.json, teachers.jsonl, results.jsonl; docs/studies.md is the
contract) and the statistics over seeds that every table is made of."""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbkd.io import read_json_file
from rbkd.study.results import read_jsonl


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None for one value, n) of the finite values."""
    xs = [float(v) for v in values if finite(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def group_key(v: Any) -> Any:
    """A grouping key for a value read from JSON: floats rounded (T = 9 and 9.0 are one)."""
    return round(float(v), 6) if finite(v) else v


@dataclass
class StudyOutput:
    """What a study folder holds, read once."""

    folder: Path
    spec: dict
    teachers: list[dict]
    results: list[dict]

    @property
    def dataset(self) -> str:
        return str(self.spec.get("dataset") or "")

    @property
    def experiments(self) -> dict:
        return self.spec.get("experiments") or {}

    @property
    def seeds(self) -> int:
        return len(self.spec.get("seeds") or [])

    @property
    def class_names(self) -> list[str]:
        for row in (*self.teachers, *self.results):
            if row.get("class_names"):
                return [str(n) for n in row["class_names"]]
        try:
            from rbkd.data.registry import get_info

            return list(get_info(self.dataset).class_names)
        except Exception:  # an unknown dataset: classes by number
            c = max(
                (len(r.get("per_class_accuracy") or []) for r in (*self.teachers, *self.results)),
                default=0,
            )
            return [str(k) for k in range(max(c, 2))]

    def teacher(self, name: str) -> dict | None:
        return next((t for t in self.teachers if t.get("name") == name), None)

    def rows(self, experiment: str) -> list[dict]:
        return [r for r in self.results if experiment in (r.get("experiments") or [])]


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _finished_key(run_dir: Path) -> str | None:
    """The key a student run folder's report.json (written last) records, or None."""
    try:
        report = read_json_file(run_dir / "report.json", "run report")
    except (OSError, ValueError):
        return None
    key = report.get("key") if isinstance(report, dict) else None
    return key if isinstance(key, str) else None


def _row_problem(folder: Path, name: str, n: int, row: dict) -> str | None:
    """Why results.jsonl row `n` is not a finished student run of this study, or None."""
    key, run_dir = row.get("key"), row.get("run_dir")
    if not isinstance(key, str) or not isinstance(run_dir, str) or not run_dir:
        return f"row {n} names no run (key and run_dir)"
    if row.get("study") != name:
        return f"row {n} is of study {row.get('study')!r}, not {name!r}"
    path = Path(run_dir) if Path(run_dir).is_absolute() else folder / run_dir
    if _finished_key(path) != key:
        return f"row {n} (key {key[:12]}) has no finished run in {path}"
    return None


def _rebuild(folder: Path, spec: dict, teachers: list[dict], data_dir) -> tuple[list, list]:
    """(teachers.jsonl rows, results.jsonl rows) made again from the study's plan and its
    finished run folders, as `rbkd study run` makes them (it needs the dataset: run keys hash
    the data). Trains nothing."""
    from rbkd.study.results import student_row, teacher_row
    from rbkd.study.study_runs import prepare

    run, splits = prepare(spec, folder, data_dir=Path(data_dir) if data_dir else None, device="cpu")
    old = {(t.get("name"), t.get("key")): t for t in teachers}
    teacher_rows: list[dict] = []
    by_name: dict[str, dict] = {}
    for task in run.plan.teachers:
        rows = [old.get((name, task.key)) for name in task.names]
        if any(r is None for r in rows):
            rows = _teacher_rows(spec, task, run.states[task.key], splits, folder, teacher_row)
        teacher_rows += rows
        by_name.update({r["name"]: r for r in rows})
    students = []
    for task in run.plan.students:
        state = run.states[task.key]
        if state.status != "done" or (task.teacher and task.teacher not in by_name):
            continue
        row = student_row(spec, task, state.result, by_name.get(task.teacher), folder)
        row["device"] = _run_device(task.run_dir)
        students.append(row)
    return teacher_rows, students


def _teacher_rows(spec, task, state, splits, folder: Path, teacher_row) -> list[dict]:
    """teachers.jsonl rows of a finished teacher run ([] when it is not finished)."""
    from rbkd.engine import read_config
    from rbkd.study.soft_label_source import teacher_soft_labels

    if task.external:
        metrics = read_config(task.run_dir).get("final_metrics") or {}
        result = {"metrics": metrics, "wall_time_s": None}
    else:
        result = state.result if state.status == "done" else None
    if not result or "test_accuracy" not in (result.get("metrics") or {}):
        return []
    soft = teacher_soft_labels(task.run_dir, "train", splits[0], allow_partial=True)
    return teacher_row(spec, task, result, soft, folder)


def _run_device(run_dir: Path) -> str | None:
    try:
        config = read_json_file(run_dir / "config.json", "run config")
        return str(config["provenance"]["device"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_results(
    folder: Path, spec: dict, teachers: list[dict], rows: list[dict] | None, data_dir=None
) -> tuple[list[dict], list[dict]]:
    """The (teachers, results) rows a report may trust. results.jsonl (`rows`; None when it
    does not exist) must agree with the run folders: every row a finished student run of this
    study, and no finished run of the study's plan left out. When it does not, the tables are
    rebuilt from the run folders (and written back when no study is running in the folder),
    saying so on stderr; when they cannot be (no dataset here), ValueError, one line. Tables
    copied without the run folders (no students/ beside them) are taken as they are."""
    from rbkd.study.plan import make_plan

    results = folder / "results.jsonl"
    if not (folder / "students").is_dir():  # tables without their runs (copied to be drawn)
        return teachers, rows or []
    name = str(spec.get("name"))
    problem = next(
        (p for n, r in enumerate(rows or [], 1) if (p := _row_problem(folder, name, n, r))), None
    )
    if problem is None and rows is not None:
        known = {r["key"] for r in rows}
        found = [
            d for d in sorted((folder / "students").glob("*")) if (d / "report.json").is_file()
        ]
        unlisted = [d for d in found if _finished_key(d) not in known]
        if not unlisted:
            return teachers, rows
        try:  # runs of an earlier, larger version of the study are not the study's: plan it
            planned = len(make_plan(spec, folder, "0" * 64, "cpu").students)
        except Exception:
            planned = None
        if planned is not None and len(rows) >= planned:
            return teachers, rows
        problem = f"leaves out finished runs such as {unlisted[0]}"
    elif rows is None:
        if not any((folder / "students").glob("*/report.json")):
            return teachers, []  # nothing has finished yet
        problem = "is missing"
    elif problem is None:
        problem = "disagrees with the run folders"

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"{results} {problem}, and the tables cannot be rebuilt here ({why}); run `rbkd "
            f"study run {folder / 'study.toml'} --out {folder}` where the study's data is (it "
            "trains nothing that is done), or give --data-dir"
        )

    try:
        new_teachers, new_rows = _rebuild(folder, spec, teachers, data_dir)
    except Exception as e:
        raise refuse(" ".join(str(e).split())) from None
    # Run keys hash the data: rebuilt on other data (another copy or cut of the dataset), the
    # plan finds none of the finished runs. Never replace the tables with that.
    good = {
        r.get("key") for n, r in enumerate(rows or [], 1) if not _row_problem(folder, name, n, r)
    }
    if not new_rows or not good <= {r["key"] for r in new_rows}:
        raise refuse(
            "the data found here is not the data the study ran on: its plan finds "
            f"{len(new_rows)} of the finished runs"
        )
    if rows is not None and [r.get("key") for r in rows] == [r["key"] for r in new_rows]:
        return teachers, rows
    from rbkd.locking import FolderBusyError, folder_lock, tables_lock
    from rbkd.study.results import write_results

    try:
        # Runners of the study rewrite the tables under its tables lock: where one did since
        # they were read here, its tables are the newer ones and stay.
        with folder_lock(folder, "report"), tables_lock(folder, timeout=60):
            if (read_jsonl(results) if results.exists() else None) != rows:
                raise FolderBusyError(str(folder))
            write_results(folder, new_teachers, new_rows)
        kept = "rewrote it"
    except FolderBusyError:  # a study is running there: it rewrites the tables itself
        kept = "used them for this report"
    _note(
        f"{results} {problem}; rebuilt the tables from the {len(new_rows)} finished student "
        f"runs in {folder / 'students'} and {kept}"
    )
    return new_teachers, new_rows


def read_study_output(study_dir: str | os.PathLike, data_dir=None) -> StudyOutput:
    """The study folder, its results checked against its run folders (`check_results`)."""
    folder = Path(study_dir)
    path = folder / "study.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass the folder `rbkd study run` wrote (it holds study.json, "
            "teachers.jsonl and results.jsonl)"
        )
    spec = read_json_file(path, "study file")
    if not isinstance(spec, dict):
        raise ValueError(f"{path} does not hold a study (a JSON object); rerun `rbkd study run`")
    results = folder / "results.jsonl"
    rows = read_jsonl(results) if results.exists() else None
    teachers, rows = check_results(
        folder, spec, read_jsonl(folder / "teachers.jsonl"), rows, data_dir
    )
    return StudyOutput(folder, spec, teachers, rows)
