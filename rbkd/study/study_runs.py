"""A study's runs as found: the plan with each run's state (done, partial, new), and each run
named in one line for the progress display, --dry-run and the log."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbkd.study.keys import data_fingerprint
from rbkd.study.plan import Plan, make_plan
from rbkd.study.runstate import RunState, run_state
from rbkd.study.splits import load_splits


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


def run_states(plan: Plan) -> dict[str, RunState]:
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
    if hasattr(task, "label"):  # a cell of a language-model study (rbkd.study.lm_plan) names itself
        return task.label()
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
    return StudyRun(Path(out), plan, run_states(plan)), splits
