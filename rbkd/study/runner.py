"""`run_study`: run every run of a study that is not done yet, then write its tables and report.

Teachers train first, then the students of each teacher, sharing the loaded data and soft labels.
After every run the tables are rebuilt from the finished runs, so a study killed at any moment
keeps all it finished, and the same command continues it (an interrupted run resumes from its
last epoch checkpoint).

Several runners may share one study folder (processes, Slurm array tasks, machines on a shared
filesystem): each run is claimed by one of them before it trains (rbkd.locking's claims, in
`FOLDER/.rbkd-claims/`), a run whose runner was killed is taken over by the next, a student
waits for its teacher, and the tables are rewritten under one lock, so that they end as a single
runner leaves them. docs/studies.md, "Several runners".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbkd.engine import read_config, resolve_device
from rbkd.engine.distributed import is_main_process, on_main, setup
from rbkd.io import NotOursError, claim_folder, read_json_file, write_bytes, write_json
from rbkd.locking import (
    CLAIMS_DIR,
    FolderBusyError,
    claim_lease_s,
    release_claim,
    tables_lock,
    try_claim,
)
from rbkd.study.keys import data_fingerprint
from rbkd.study.plan import Plan, make_plan
from rbkd.study.results import student_row, teacher_row, write_results
from rbkd.study.runstate import RunState, run_state
from rbkd.study.soft_label_source import fit_to_dataset, teacher_soft_labels
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
    trained: list[str] = field(default_factory=list)  # keys run now, by this runner
    elsewhere: list[str] = field(default_factory=list)  # keys other runners finished meanwhile
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
    if s.unlabelled:
        bits.append("unlabelled transfer")
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


def _open_folder(out: Path, name: str) -> None:
    """Make `out` the folder of study `name`, once, among any number of runners starting at
    the same time: the marker appears whole (linked into place, never overwritten), and the
    folder is checked again after it."""
    out.mkdir(parents=True, exist_ok=True)
    check_study_folder(out, name)  # again: another runner (or user) may have been at it
    marker = out / STUDY_MARKER
    if not (marker.exists() or marker.is_symlink()):
        tmp = out / f"{STUDY_MARKER}.{secrets.token_hex(4)}.tmp"
        write_json(tmp, {"study": name})
        try:
            os.link(tmp, marker)  # atomic, and fails where one is already there
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not marker.exists():
                os.replace(tmp, marker)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    check_study_folder(out, name)  # the marker that won names this study, or we stop here


def _is_busy(error: BaseException) -> bool:
    """A run folder's flock held by another process (under torchrun the other ranks receive it
    as a RuntimeError with the same message): a claim taken over from a claimant that still
    writes, or a command outside the study. The run is tried again later."""
    return isinstance(error, FolderBusyError) or "in use by another rbkd process" in str(error)


FINISHED, WAIT = -1, -2  # what the scheduler hands every rank besides a task's index


class _Runner:
    """The study's runs, each claimed by one runner of the study (rbkd.locking's claims), in
    plan order: teachers first, a student once its teacher is done. A runner alone claims
    every run in turn, exactly as a single `study run` always did; several share the plan, and
    each waits for the runs the others hold before it ends, so that every runner leaves the
    whole tables. Under torchrun rank 0 claims and writes; every rank runs what it hands out."""

    def __init__(self, run, study, splits, ctx, device, *, log, note, on_run):
        self.run, self.study, self.splits, self.ctx, self.device = run, study, splits, ctx, device
        self.log, self.note, self.on_run = log, note, on_run
        self.tasks = run.plan.teachers + run.plan.students
        self.index = {t.key: i for i, t in enumerate(self.tasks)}
        # every teacher passes through train_teacher (which checks its soft labels), as before
        self.pending = list(run.plan.teachers) + [
            s for s in run.plan.students if run.states[s.key].status != "done"
        ]
        self.total, self.done = run.todo, 0
        self.teacher_rows: dict = {}
        self.soft: dict[str, Any] = {}
        self.busy_until: dict[str, float] = {}
        self.claims = run.out / CLAIMS_DIR
        self.poll = min(1.0, claim_lease_s() / 10)
        self.held = None  # rank 0: the claim on the run being done

    def step(self, label: str) -> None:
        if self.on_run is not None:
            self.on_run(label, self.done, self.total)

    # -- rank 0: which run next ----------------------------------------------------------
    def _done_elsewhere(self, task, state: RunState) -> None:
        """A run another runner finished: kept in the tables, counted, never trained here."""
        self.run.states[task.key] = state
        if task in self.pending:
            self.pending.remove(task)
        if task.key not in self.run.elsewhere:
            self.run.elsewhere.append(task.key)
            self.done += 1

    def _student_done(self, task) -> bool:
        state = run_state(task.run_dir, task.key, "report.json")
        if state.status == "done":
            self._done_elsewhere(task, state)
        return state.status == "done"

    def pick(self) -> int:
        """The index of the next run to do, claimed; FINISHED; or WAIT (after a pause) while
        every run left is held by other runners or waits for a teacher they train."""
        now = time.monotonic()
        held = 0
        for task in list(self.pending):
            if self.busy_until.get(task.key, 0.0) > now:
                held += 1
                continue
            student = task_kind(task) == "student"
            if not student and task.external:
                return self.index[task.key]  # trained elsewhere: nothing to claim
            if student:
                teacher = task.teacher and self.run.plan.teacher(task.teacher)
                if teacher and teacher.key not in self.soft:
                    held += 1  # its teacher is not done yet (another runner trains it)
                    continue
                if self._student_done(task):
                    continue
            claim = try_claim(self.claims / task.key, f"{task_kind(task)} {task.key[:12]}")
            if claim is None:
                held += 1
                continue
            if student and self._student_done(task):  # finished while we looked
                release_claim(claim)
                continue
            if claim.took_over:
                who = claim.took_over
                self.note(
                    f"took over {task_label(task)}: its runner (host {who.get('host')}, pid "
                    f"{who.get('pid')}) stopped before finishing it"
                )
            self.held = claim
            return self.index[task.key]
        if not self.pending:
            return FINISHED
        self.step(f"waiting for {held} run(s) that other runners of this study are training")
        time.sleep(self.poll)
        return WAIT

    # -- every rank: run it ------------------------------------------------------------------
    def loop(self) -> None:
        while True:
            self.held = None
            choice = on_main(self.ctx, self.pick)
            if choice == FINISHED:
                break
            if choice == WAIT:
                continue
            task = self.tasks[choice]
            try:
                if task_kind(task) == "teacher":
                    self.teacher(task)
                else:
                    self.student(task)
            except Exception as e:
                if not _is_busy(e):
                    raise
                self.busy_until[task.key] = time.monotonic() + self.poll
            finally:
                if self.held is not None:
                    if self.held.lost:
                        self.note(
                            f"{task_label(task)}: another runner took this run over while it "
                            "trained here (no heartbeat for a whole lease)"
                        )
                    release_claim(self.held)
                    self.held = None
        self.step("done")
        self.record()

    def teacher(self, task) -> None:
        state = self.run.states[task.key]
        if state.status != "done":
            state = run_state(task.run_dir, task.key, "result.json")  # as it is now
            if state.status != "done":
                self.step(describe(task, state))
        if task.external:
            result = _external_result(task)
        else:
            result = train_teacher(
                task.spec,
                task.cfg,
                out=task.run_dir,
                splits=self.splits,
                limit=self.study["limit"],  # recorded; the splits are already cut
                progress=False,
            )
        if not result["reused"]:
            self.done += 1
            self.run.trained.append(task.key)
            acc = result["metrics"]["test_accuracy"]
            self.log(f"teacher {'/'.join(task.names)}: test accuracy {acc:.2%}")
        elif self.run.states[task.key].status != "done" and task.key not in self.run.elsewhere:
            self.run.elsewhere.append(task.key)  # another runner trained it
            self.done += 1
        self.run.states[task.key] = RunState(task.run_dir, task.key, "done")
        soft = teacher_soft_labels(
            task.run_dir, "train", self.splits[0], device=self.device, allow_partial=task.external
        )
        self.soft[task.key] = soft
        self._teacher_rows(task, result, soft)
        self.pending.remove(task)
        self.record()

    def _teacher_rows(self, task, result, soft) -> None:
        rows = teacher_row(self.study, task, result, soft, self.run.out)
        self.teacher_rows[("task", task.key)] = rows
        for r in rows:
            self.teacher_rows[r["name"]] = r

    def student(self, task) -> None:
        state = run_state(task.run_dir, task.key, "report.json")  # as it is now
        self.step(describe(task, state))
        spec = task.spec
        soft, source_id = None, {"label_smoothing": spec.label_smoothing}
        if task.teacher is not None:
            teacher = self.run.plan.teacher(task.teacher)
            spec = spec.replace(teacher=teacher.run_dir)
            soft = fit_to_dataset(self.soft[teacher.key], self.splits[0])
            source_id = {"teacher": teacher.key}
        result = distill(
            spec,
            task.cfg,
            out=task.run_dir,
            progress=False,
            splits=self.splits,
            soft=soft,
            source_id=source_id,
        )
        self.pending.remove(task)
        if result.get("reused"):  # finished by another runner after all
            self._done_elsewhere(task, RunState(task.run_dir, task.key, "done", result=result))
        else:
            self.done += 1
            self.run.trained.append(task.key)
            self.run.states[task.key] = RunState(task.run_dir, task.key, "done", result=result)
            self.log(
                f"{task_label(task)}: test accuracy "
                f"{result['test_accuracy']:.2%}"
                + (
                    f", missing class {result['excluded_accuracy']:.2%}"
                    if result.get("excluded_accuracy") is not None
                    else ""
                )
            )
        self.record()

    # -- rank 0: the tables --------------------------------------------------------------
    def record(self) -> None:
        """Rebuild the tables from the finished runs, in plan order, holding the study's tables
        lock: every runner's rebuild sees every run finished before it, so the last one to
        write leaves them whole. Runs finished by other runners are read from their folders."""
        if not is_main_process():  # under torchrun, rank 0 alone writes
            return
        run, out = self.run, self.run.out
        with tables_lock(out):
            for task in run.plan.teachers:
                if ("task", task.key) in self.teacher_rows:
                    continue
                state = run_state(task.run_dir, task.key, "result.json")
                if state.status == "done":  # trained by another runner: its rows, read here
                    soft = teacher_soft_labels(
                        task.run_dir, "train", self.splits[0], device=self.device
                    )
                    self._teacher_rows(task, state.result, soft)
            for task in run.plan.students:
                if run.states[task.key].status != "done":
                    self._student_done(task)
            students = []
            for task in run.plan.students:
                state = run.states[task.key]
                if state.status != "done":
                    continue
                teacher = self.teacher_rows.get(task.teacher) if task.teacher else None
                row = student_row(self.study, task, state.result, teacher, out)
                row["device"] = task.cfg.device
                students.append(row)
            rows = [
                r for t in run.plan.teachers for r in self.teacher_rows.get(("task", t.key), [])
            ]
            write_results(out, rows, students)


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
    note: Log | None = None,
) -> StudyRun:
    """Run what is not done of `study` in `out`; returns what was planned, found and run.

    Any number of runners may run one study in one folder at the same time (processes, Slurm
    array tasks, machines sharing the folder): each claims the runs it trains, so that every
    run trains once, and each ends when the whole study is done. `note` receives what is not a
    finished run (a run taken over from a runner that stopped); default `log`."""
    out = Path(out)
    check_study_folder(out, study["name"])
    if dry_run:
        run, _ = prepare(study, out, data_dir=data_dir, device=device)
        return run
    device = str(resolve_device(device))
    t_start, started = time.perf_counter(), time.time()
    ctx = setup(device)
    try:
        on_main(ctx, lambda: _open_folder(out, study["name"]))  # rank 0 alone writes
        run, splits = prepare(study, out, data_dir=data_dir, device=device)
        if ctx.is_main:
            _write_study_files(out, study, source)
        runner = _Runner(run, study, splits, ctx, device, log=log, note=note or log, on_run=on_run)
        runner.loop()
        run.wall_time_s = time.perf_counter() - t_start
        if report and ctx.is_main:
            run.report = _write_report(out, study, source, data_dir, started)
    finally:
        ctx.close()
    return run


def _write_study_files(out: Path, study: dict, source: Path | None) -> None:
    """study.json and study.toml: the study as it ran (the same for every runner of it)."""
    write_json(out / "study.json", study)
    if source is not None and Path(source).resolve() != (out / "study.toml").resolve():
        write_bytes(out / "study.toml", Path(source).read_bytes())  # the file as it ran


REPORT_MARK = ".rbkd-report.json"  # {"tables": sha256 of the tables drawn, "time": when}


def _write_report(out: Path, study, source, data_dir, started: float) -> Path:
    """The report, under the tables lock. Where another runner of this study has drawn it from
    these very tables since this one started, that report stands: the runners of a Slurm array
    ending together draw it once."""
    # Here, not at the top: rbkd.study.report.load imports this module (a cycle).
    from rbkd.study.report import write_report
    from rbkd.study.report.write import REPORT_FILE

    with tables_lock(out):
        _write_study_files(out, study, source)  # this runner's study is the one drawn
        digest = hashlib.sha256()
        for name in ("study.json", "teachers.jsonl", "results.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                digest.update((out / name).read_bytes())
        tables = digest.hexdigest()
        try:
            mark = read_json_file(out / REPORT_MARK, "report mark")
        except (OSError, ValueError):
            mark = None
        path = out / "report" / REPORT_FILE
        if (
            isinstance(mark, dict)
            and mark.get("tables") == tables
            and isinstance(mark.get("time"), int | float)
            and mark["time"] >= started
            and path.is_file()
        ):
            return path
        path = write_report(out, data_dir=data_dir)
        write_json(out / REPORT_MARK, {"tables": tables, "time": time.time()})
        return path
