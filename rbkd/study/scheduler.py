"""Which run a study's runner does next: each run claimed by one runner of the study
(rbkd.locking's claims, in `FOLDER/.rbkd-claims/`), in plan order, teachers first and a student
once its teacher is done; a run whose runner was killed is taken over by the next. After every
run the tables are rebuilt under the study's tables lock, so that they end as a single runner
leaves them. docs/studies.md, "Several runners".
"""

from __future__ import annotations

import time
from typing import Any

from rbkd.engine.distributed import is_main_process, on_main
from rbkd.locking import (
    CLAIMS_DIR,
    FolderBusyError,
    claim_lease_s,
    release_claim,
    tables_lock,
    try_claim,
)
from rbkd.study.cells import run_student, run_teacher
from rbkd.study.results import student_row, teacher_row, write_results
from rbkd.study.runstate import RunState, run_state
from rbkd.study.soft_label_source import teacher_soft_labels
from rbkd.study.study_runs import describe, task_kind, task_label


def _is_busy(error: BaseException) -> bool:
    """A run folder's flock held by another process (under torchrun the other ranks receive it
    as a RuntimeError with the same message): a claim taken over from a claimant that still
    writes, or a command outside the study. The run is tried again later."""
    return isinstance(error, FolderBusyError) or "in use by another rbkd process" in str(error)


FINISHED, WAIT = -1, -2  # what the scheduler hands every rank besides a task's index


class Scheduler:
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
        result = run_teacher(task, self.study, self.splits)
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
        result = run_student(task, self.run.plan, self.soft, self.splits)
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
