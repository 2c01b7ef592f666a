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

The parts, one idea each: rbkd.study.study_folder (whose folder, study.json, the report drawn
once), rbkd.study.study_runs (the plan with each run's state and its one-line name),
rbkd.study.scheduler (claiming the next run, rebuilding the tables) and rbkd.study.cells
(running one teacher or student).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rbkd.engine import resolve_device
from rbkd.engine.distributed import on_main, setup
from rbkd.study.scheduler import Scheduler
from rbkd.study.study_folder import (
    check_study_folder,
    open_study_folder,
    write_report_once,
    write_study_files,
)
from rbkd.study.study_runs import StudyRun, prepare

Log = Callable[[str], None]


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
    if study.get("kind") == "lm":  # a language-model study: its own cells (rbkd.study.lm_runner)
        from rbkd.study.lm_runner import run_lm_study

        return run_lm_study(study, out, device=device, dry_run=dry_run, log=log, on_run=on_run,
                            report=report, source=source)  # fmt: skip
    out = Path(out)
    check_study_folder(out, study["name"])
    if dry_run:
        run, _ = prepare(study, out, data_dir=data_dir, device=device)
        return run
    device = str(resolve_device(device))
    t_start, started = time.perf_counter(), time.time()
    ctx = setup(device)
    try:
        on_main(ctx, lambda: open_study_folder(out, study["name"]))  # rank 0 alone writes
        run, splits = prepare(study, out, data_dir=data_dir, device=device)
        if ctx.is_main:
            write_study_files(out, study, source)
        scheduler = Scheduler(
            run, study, splits, ctx, device, log=log, note=note or log, on_run=on_run
        )
        scheduler.loop()
        run.wall_time_s = time.perf_counter() - t_start
        if report and ctx.is_main:
            run.report = write_report_once(out, study, source, data_dir, started)
    finally:
        ctx.close()
    return run
