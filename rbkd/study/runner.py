"""`run_study`: run every run of a study that is not done yet, then write its tables and report.

The study folder is locked for the whole run (a second `study run` on it stops at once with a
clear message). Teachers train first, then the students of each teacher, sharing the loaded data
and soft labels. After every run the tables are rebuilt from the finished runs, so a study killed
at any moment keeps all it finished, and the same command continues it (an interrupted run
resumes from its last epoch checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbkd.engine import read_config, resolve_device
from rbkd.engine.distributed import is_main_process, main_folder_lock
from rbkd.io import NotOursError, claim_folder, read_json_file, write_bytes, write_json
from rbkd.study.keys import data_fingerprint
from rbkd.study.plan import Plan, make_plan
from rbkd.study.results import student_row, teacher_row, write_results
from rbkd.study.runstate import RunState, run_state
from rbkd.study.softlabels import fit_to_dataset, teacher_soft_labels
from rbkd.study.splits import load_splits
from rbkd.study.student import distill
from rbkd.study.teacher import train_teacher

Log = Callable[[str], None]

STUDY_MARKER = ".rbkd-study.json"  # {"study": name}: the study this folder belongs to


def _held_study(folder: Path) -> str | None:
    """The name of the study `folder` belongs to: its marker's, or (a folder written before
    markers existed) its study.json's; None when it holds neither."""
    for name, key in ((STUDY_MARKER, "study"), ("study.json", "name")):
        path = folder / name
        if path.exists() or path.is_symlink():
            try:
                held = read_json_file(path, "study record")
            except (OSError, ValueError):
                held = None
            if not isinstance(held, dict) or not isinstance(held.get(key), str):
                raise NotOursError(
                    f"{path} is not a study record rbkd wrote; rbkd does not write into "
                    f"{folder}: give the study another --out"
                )
            return held[key]
    return None


def check_study_folder(out: Path, name: str) -> bool:
    """Whether `out` may hold study `name` (True: it does not exist yet). A study writes only
    into a new or empty folder or one of its own earlier runs: a folder of the user's, or of
    another study, is refused with one line (NotOursError). Writes nothing."""

    def recognise(folder: Path) -> bool:
        held = _held_study(folder)
        if held is None:
            return False
        if held != name:
            raise NotOursError(
                f"{folder} holds the results of study {held!r}, not of {name!r}; two studies "
                f"never share a folder: give this one another --out (default: results/<name>)"
            )
        return True

    return claim_folder(
        out,
        f"results of study {name!r}",
        recognise=recognise,
        todo="give the study a new or empty --out (default: results/<study name>)",
    )


@dataclass
class StudyRun:
    out: Path
    plan: Plan
    states: dict[str, RunState]  # key -> state (as found, then updated as runs finish)
    trained: list[str] = field(default_factory=list)  # keys run now
    wall_time_s: float = 0.0
    report: Path | None = None

    @property
    def todo(self) -> int:
        return sum(1 for s in self.states.values() if s.status != "done")

    def runs(self) -> list[dict[str, Any]]:
        """Every run of the plan, teachers first: kind, key, label, run_dir and status ("ran":
        trained by this call; else as found: "done", "partial" with epochs_done, or "new")."""
        rows = []
        for task in self.plan.teachers + self.plan.students:
            state = self.states[task.key]
            status = "ran" if task.key in self.trained else state.status
            row = {
                "kind": task_kind(task),
                "key": task.key,
                "label": task_label(task),
                "run_dir": str(task.run_dir),
                "status": status,
            }
            if status == "partial":
                row["epochs_done"] = state.epochs_done
            rows.append(row)
        return rows


def _external_result(task) -> dict[str, Any]:
    """A teacher trained elsewhere, in the shape of train_teacher's result."""
    config = read_config(task.run_dir)
    metrics = config.get("final_metrics") or {}
    if "test_accuracy" not in metrics:
        raise ValueError(f"{task.run_dir}/config.json has no final metrics: the run did not finish")
    return {"metrics": metrics, "wall_time_s": None, "reused": True}


def _states(plan: Plan) -> dict[str, RunState]:
    states = {
        t.key: RunState(t.run_dir, t.key, "done")
        if t.external
        else run_state(t.run_dir, t.key, "result.json")
        for t in plan.teachers
    }
    states.update({s.key: run_state(s.run_dir, s.key, "report.json") for s in plan.students})
    return states


def task_kind(task) -> str:
    """ "teacher" or "student"."""
    return "teacher" if hasattr(task, "names") else "student"


def task_label(task) -> str:
    """What a run is, in one line: "teacher small: small, batch 64, 10 epochs, seed 0"."""
    if task_kind(task) == "teacher":
        return (
            f"teacher {'/'.join(task.names)}: {task.spec.capacity}, batch {task.cfg.batch_size}, "
            f"{task.cfg.epochs} epochs, seed {task.cfg.seed}"
        )
    s = task.spec
    src = f"LS A={s.label_smoothing:g}" if s.label_smoothing is not None else task.teacher
    bits = [f"{'+'.join(task.experiments)}: {s.student} from {src}"]
    if s.label_smoothing is None:
        bits.append(f"T={s.T:g}" + ("" if s.t_squared else " without the T^2 factor"))
        if not s.loss.is_default():  # forward KL, the default, goes unsaid as it always did
            bits.append(f"divergence {s.loss.label()}")
    if s.exclude_classes:
        bits.append(f"without class {','.join(map(str, s.exclude_classes))}")
    if s.per_class is not None:
        bits.append(f"{s.per_class}/class by {s.select}")
    if s.noise:
        bits.append(f"noise {s.noise}")
    bits.append(f"seed {task.cfg.seed}")
    return ", ".join(bits)


def describe(task, state: RunState) -> str:
    """One line for --dry-run and the progress display: "[to run] " and the task's label."""
    status = {"done": "done", "new": "to run"}.get(
        state.status, f"to resume after epoch {state.epochs_done}"
    )
    return f"[{status}] {task_label(task)}"


def prepare(
    study: dict, out: Path, *, data_dir: Path | None = None, device: str = "auto"
) -> tuple[StudyRun, Any]:
    """(the study's plan with each run's state, the loaded (train, test) splits)."""
    splits = load_splits(study["dataset"], data_dir, study["limit"])
    plan = make_plan(study, out, data_fingerprint(*splits), device)
    return StudyRun(Path(out), plan, _states(plan)), splits


def _record(run: StudyRun, study: dict, teacher_rows: dict) -> None:
    """Rebuild the tables from the finished runs, in plan order (their reports are in
    run.states: read once at the start, or handed back by the run that just finished)."""
    if not is_main_process():  # under torchrun, rank 0 alone writes
        return
    students = []
    for task in run.plan.students:
        state = run.states[task.key]
        if state.status != "done":
            continue
        teacher = teacher_rows.get(task.teacher) if task.teacher else None
        row = student_row(study, task, state.result, teacher, run.out)
        row["device"] = task.cfg.device
        students.append(row)
    rows = [r for t in run.plan.teachers for r in teacher_rows.get(("task", t.key), [])]
    write_results(run.out, rows, students)


def run_study(
    study: dict,
    out: Path,
    *,
    data_dir: Path | None = None,
    device: str = "auto",
    dry_run: bool = False,
    log: Log = print,
    on_run: Callable[[str, int, int], None] | None = None,
    report: bool = True,
    source: Path | None = None,
) -> StudyRun:
    """Run what is not done of `study` in `out`; returns what was planned, found and run."""
    out = Path(out)
    check_study_folder(out, study["name"])  # before the lock: it writes into the folder
    if dry_run:
        run, _ = prepare(study, out, data_dir=data_dir, device=device)
        return run
    device = str(resolve_device(device))
    t_start = time.perf_counter()
    with main_folder_lock(out, "study", device) as ctx:
        check_study_folder(out, study["name"])  # again, now that no other writer can be at it
        if ctx.is_main and not (out / STUDY_MARKER).exists():  # rank 0 alone writes
            write_json(out / STUDY_MARKER, {"study": study["name"]})  # first: the folder's owner
        run, splits = prepare(study, out, data_dir=data_dir, device=device)
        if ctx.is_main:  # under torchrun, rank 0 alone writes
            write_json(out / "study.json", study)
            if source is not None and Path(source).resolve() != (out / "study.toml").resolve():
                write_bytes(out / "study.toml", Path(source).read_bytes())  # the file as it ran
        total, done = run.todo, 0
        teacher_rows: dict = {}
        soft_cache: dict[str, Any] = {}

        def step(label: str) -> None:
            if on_run is not None:
                on_run(label, done, total)

        for task in run.plan.teachers:
            state = run.states[task.key]
            if state.status != "done":
                step(describe(task, state))
            if task.external:
                result = _external_result(task)
            else:
                result = train_teacher(
                    task.spec,
                    task.cfg,
                    out=task.run_dir,
                    splits=splits,
                    limit=study["limit"],  # recorded; the splits are already cut
                    progress=False,
                )
            if not result["reused"]:
                done += 1
                run.trained.append(task.key)
                acc = result["metrics"]["test_accuracy"]
                log(f"teacher {'/'.join(task.names)}: test accuracy {acc:.2%}")
            soft = teacher_soft_labels(
                task.run_dir, "train", splits[0], device=device, allow_partial=task.external
            )
            soft_cache[task.key] = soft
            rows = teacher_row(study, task, result, soft, out)
            teacher_rows[("task", task.key)] = rows
            for r in rows:
                teacher_rows[r["name"]] = r
            _record(run, study, teacher_rows)

        for task in run.plan.students:
            state = run.states[task.key]
            if state.status == "done":
                continue
            step(describe(task, state))
            spec, soft, source_id = task.spec, None, {"label_smoothing": task.spec.label_smoothing}
            if task.teacher is not None:
                teacher = run.plan.teacher(task.teacher)
                spec = spec.replace(teacher=teacher.run_dir)
                soft = fit_to_dataset(soft_cache[teacher.key], splits[0])
                source_id = {"teacher": teacher.key}
            result = distill(
                spec,
                task.cfg,
                out=task.run_dir,
                progress=False,
                splits=splits,
                soft=soft,
                source_id=source_id,
            )
            done += 1
            run.trained.append(task.key)
            run.states[task.key] = RunState(task.run_dir, task.key, "done", result=result)
            log(
                f"{task_label(task)}: test accuracy "
                f"{result['test_accuracy']:.2%}"
                + (
                    f", missing class {result['excluded_accuracy']:.2%}"
                    if result.get("excluded_accuracy") is not None
                    else ""
                )
            )
            _record(run, study, teacher_rows)
        step("done")
        _record(run, study, teacher_rows)
    run.wall_time_s = time.perf_counter() - t_start
    if report and ctx.is_main:
        # Here, not at the top: rbkd.study.report.load imports this module (a cycle).
        from rbkd.study.report import write_report

        run.report = write_report(out, data_dir=data_dir)
    return run
