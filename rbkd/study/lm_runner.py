"""`run_lm_study`: run every cell of an LM study that is not done yet, then its tables and report.

rbkd.study.runner.run_study hands an LM study (`[study] kind = "lm"`) here. Cells run in the
plan's order (rbkd.study.lm_plan): teachers, their stores, then students seed by seed. After every
cell the tables are rebuilt from the finished cells' cell.json, so a study killed at any moment
keeps all it finished and the same command continues it (the cell cut off resumes from its last
checkpoint or shard). Several runners may share one study folder, as image studies' do
(docs/studies.md, "Several runners"): each cell is claimed by one runner (rbkd.locking's claims,
in `FOLDER/.rbkd-claims/`), a cell waits until the cells it reads are done, a cell whose runner
was killed is taken over after the lease, and the tables are rewritten under the tables lock from
every runner's finished cells. On a 2-core CPU two runners at --threads 1 finish the small
students' cells sooner than one at 2 threads.

The folder: study.json, study.toml, teachers.jsonl, stores.jsonl, results.jsonl (one row per
finished student), results.csv (one row per student and teacher: a hard-label student appears
under each teacher, with its KL to that teacher), teachers/, stores/, students/, report/.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbkd.io import write_bytes
from rbkd.locking import CLAIMS_DIR, claim_lease_s, release_claim, try_claim
from rbkd.study.lm_cells import cell_result, finish, run_store, run_student, run_teacher
from rbkd.study.lm_data import load_lm_data, resolved_precision
from rbkd.study.lm_plan import LMCell, make_lm_plan
from rbkd.study.runstate import RunState, _epochs_done

Log = Callable[[str], None]
CSV_COLUMNS = ("teacher", "mode", "T", "k", "seed", "val_ce_loss", "val_perplexity",
               "kl_to_teacher", "bytes_per_token", "capture_tokens_per_s",
               "distill_tokens_per_s", "wall_s", "train_tokens", "key", "folder")  # fmt: skip


@dataclass
class LMPlan:
    teachers: list[LMCell]  # teachers and stores: what the students need
    students: list[LMCell]


@dataclass
class LMStudyRun:
    """What `rbkd study run` reports: the same fields as an image study's StudyRun."""

    out: Path
    plan: LMPlan
    states: dict[str, RunState]
    trained: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # cells other runners of the study did
    wall_time_s: float = 0.0
    report: Path | None = None
    order: list[LMCell] = field(default_factory=list)  # the cells in running order (lm_plan)

    @property
    def cells(self) -> list[LMCell]:
        return self.order or self.plan.teachers + self.plan.students

    @property
    def todo(self) -> int:
        return sum(1 for s in self.states.values() if s.status != "done")

    def runs(self) -> list[dict[str, Any]]:
        rows = []
        for c in self.cells:
            state = self.states[c.key]
            status = "ran" if c.key in self.trained else state.status
            row = {"kind": c.kind, "key": c.key, "label": c.label(), "run_dir": str(c.folder),
                   "status": status}  # fmt: skip
            if status == "partial":
                row["epochs_done"] = state.epochs_done
            rows.append(row)
        return rows


def cell_state(cell: LMCell) -> RunState:
    result = cell_result(cell)
    if result is not None:
        return RunState(cell.folder, cell.key, "done", 0, result)
    run = cell.folder / "run"
    if (run / "config.json").is_file() or (cell.folder / "store" / "index.json").is_file():
        return RunState(cell.folder, cell.key, "partial", _epochs_done(run) if run.is_dir() else 0)
    return RunState(cell.folder, cell.key, "new")


def prepare_lm(study: dict, out: Path, device: str, progress: bool = False):
    data = load_lm_data(study, progress=progress)
    cells = make_lm_plan(study, out, data.identities(resolved_precision(device)), device)
    plan = LMPlan(
        [c for c in cells if c.kind != "student"], [c for c in cells if c.kind == "student"]
    )
    states = {c.key: cell_state(c) for c in cells}
    return LMStudyRun(Path(out), plan, states, order=cells), data


def run_lm_study(study: dict, out: Path, *, device: str = "auto", dry_run: bool = False,
                 log: Log = print, on_run: Callable[[str, int, int], None] | None = None,
                 report: bool = True, source: Path | None = None, progress: bool = False,
                 **_: Any) -> LMStudyRun:  # fmt: skip
    """Run what is not done of the LM study `study` in `out`; returns what was planned and run."""
    from rbkd.engine.device import resolve_device
    from rbkd.locking import tables_lock
    from rbkd.study.study_folder import check_study_folder, open_study_folder, write_study_files

    out = Path(out)
    check_study_folder(out, study["name"])
    if dry_run:
        return prepare_lm(study, out, device)[0]
    device = str(resolve_device(device))
    started = time.perf_counter()
    open_study_folder(out, study["name"])
    with tables_lock(out):  # one runner at a time prepares the data and the study's files
        run, data = prepare_lm(study, out, device, progress)
        write_study_files(out, study, source)
    by_key = {c.key: c for c in run.cells}
    teachers = {c.teacher: c for c in run.plan.teachers if c.kind == "teacher"}
    total = len(by_key)

    def run_cell(cell: LMCell) -> None:
        t0 = time.perf_counter()
        if cell.kind == "teacher":
            numbers = run_teacher(cell, study, data, device, progress)
        elif cell.kind == "store":
            numbers = run_store(cell, study, data, device, progress, by_key[cell.needs[0]])
        else:
            numbers = run_student(cell, study, data, device, progress, by_key, teachers)
        record = finish(cell, numbers)
        run.states[cell.key] = RunState(cell.folder, cell.key, "done", 0, record)
        run.trained.append(cell.key)
        with tables_lock(out):
            refresh_states(run)
            write_tables(out, run)
        log(f"done: {cell.label()} ({time.perf_counter() - t0:,.0f}s)")

    claim_cells(run, run_cell, on_run, total)
    with tables_lock(out):
        refresh_states(run)
        write_tables(out, run)
        run.wall_time_s = time.perf_counter() - started
        if report:
            from rbkd.study.report.lm_report import write_lm_report

            run.report = write_lm_report(out)
    return run


def refresh_states(run: LMStudyRun) -> None:
    """Cells other runners of the study finished since this one looked: done here too."""
    for c in run.cells:
        if run.states[c.key].status != "done":
            state = cell_state(c)
            if state.status == "done":
                run.states[c.key] = state
                if c.key not in run.trained and c.key not in run.elsewhere:
                    run.elsewhere.append(c.key)


def claim_cells(run: LMStudyRun, run_cell: Callable[[LMCell], None],
                on_run: Callable[[str, int, int], None] | None, total: int) -> None:  # fmt: skip
    """Run, in plan order, every cell not done whose inputs are done and that no other runner
    holds; return when every cell is done (waiting, a poll at a time, for those held elsewhere)."""
    claims = run.out / CLAIMS_DIR
    poll = min(1.0, claim_lease_s() / 10)
    while True:
        refresh_states(run)
        pending = [c for c in run.cells if run.states[c.key].status != "done"]
        if not pending:
            break
        ran = False
        for cell in pending:
            if any(run.states[k].status != "done" for k in cell.needs):
                continue  # its teacher or store is not done yet (another runner's, or later)
            claim = try_claim(claims / cell.key, f"LM {cell.kind} {cell.key[:12]}")
            if claim is None:
                continue
            try:
                if cell_state(cell).status == "done":  # finished elsewhere while we looked
                    continue
                if on_run is not None:
                    on_run(cell.label(), total - len(pending), total)
                run_cell(cell)
                ran = True
                break  # back to the plan's order: teachers and stores first
            finally:
                release_claim(claim)
        if not ran:
            if on_run is not None:
                on_run(f"waiting for {len(pending)} cell(s) other runners hold", total - len(pending), total)  # fmt: skip
            time.sleep(poll)
    if on_run is not None:
        on_run("done", total, total)


def _jsonl(rows: list[dict]) -> bytes:
    import json

    from rbkd.io import jsonable

    return "".join(json.dumps(jsonable(r), sort_keys=True) + "\n" for r in rows).encode()


def student_rows(students: list[dict], stores: list[dict]) -> list[dict]:
    """results.csv's rows: one per student and teacher (hard-label students under each)."""
    speed = {}
    for s in stores:
        speed[(s["teacher"], s["key"])] = s.get("capture_tokens_per_s")
    rows = []
    for r in students:
        for teacher, kl in sorted((r.get("kl_to_teacher") or {}).items()):
            rows.append({
                "teacher": teacher, "mode": r["mode"], "T": r["T"], "k": r["k"], "seed": r["seed"],
                "val_ce_loss": r["val_ce_loss"], "val_perplexity": r["val_perplexity"],
                "kl_to_teacher": kl["kl"], "bytes_per_token": r["bytes_per_token"],
                "capture_tokens_per_s": speed.get((teacher, r.get("store_key"))),
                "distill_tokens_per_s": r["distill_tokens_per_s"], "wall_s": r["wall_s"],
                "train_tokens": r["train_tokens"], "key": r["key"], "folder": r.get("folder"),
            })  # fmt: skip
    return rows


def write_tables(out: Path, run: LMStudyRun) -> None:
    """teachers.jsonl, stores.jsonl, results.jsonl and results.csv from the finished cells."""
    done = {k: s.result for k, s in run.states.items() if s.status == "done" and s.result}
    kinds: dict[str, list[dict]] = {"teacher": [], "store": [], "student": []}
    for c in run.cells:
        if c.key in done:
            row = {**done[c.key], "folder": str(c.folder.relative_to(out))}
            if c.kind == "student" and c.needs and c.inputs["mode"] not in ("online", "hard"):
                row["store_key"] = c.needs[0]
            kinds[c.kind].append(row)
    write_bytes(out / "teachers.jsonl", _jsonl(kinds["teacher"]))
    write_bytes(out / "stores.jsonl", _jsonl(kinds["store"]))
    write_bytes(out / "results.jsonl", _jsonl(kinds["student"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in student_rows(kinds["student"], kinds["store"]):
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    write_bytes(out / "results.csv", buf.getvalue().encode())
