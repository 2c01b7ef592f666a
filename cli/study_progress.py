"""Running a study from the command line: one progress bar over its runs (on a terminal, with
--progress), a line per finished run (always; both on stderr), and on Ctrl-C or SIGTERM one line
saying what is kept and how to continue. Shared by `rbkd study run` and the `rbkd experiment`
commands."""

from __future__ import annotations

from pathlib import Path

import typer
from rbkd.cli.consoles import console as _console
from rbkd.cli.consoles import err_console
from rbkd.cli.text import escape
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_with_progress(
    study: dict,
    out: Path,
    *,
    data_dir: Path | None,
    device: str,
    progress: bool,
    report: bool,
    source: Path | None = None,
    summary: Console | None = None,
):
    """`rbkd.study.runner.run_study` with a progress bar; prints what ran (on `summary`, stdout
    by default; stderr when stdout is kept for --json); returns its StudyRun."""
    # Here, not at the top: the runner imports torch, and the commands' modules import this one.
    from rbkd.study.runner import run_study

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=not (progress and err_console.is_terminal),  # no bar redrawn into a log file
    )
    task_id = bar.add_task("preparing", total=None)
    finished: list[str] = []  # one line per run finished in this session

    def on_run(label: str, done: int, total: int) -> None:
        bar.update(task_id, description=escape(label[:100]), completed=done, total=total or 1)

    def log(line: str) -> None:
        finished.append(line)
        bar.console.print(escape(line), soft_wrap=True)

    def note(line: str) -> None:  # not a finished run (a run taken over from another runner)
        bar.console.print(escape(line), soft_wrap=True)

    try:
        with bar:
            result = run_study(
                study,
                out,
                data_dir=data_dir,
                device=device,
                log=log,
                note=note,
                on_run=on_run,
                report=report,
                source=source,
            )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every finished run is kept
        err_console.print(
            f"[bold yellow]Stopped:[/] {len(finished)} run(s) finished in this session are kept "
            f"in {escape(out)}; run the same command again to continue where it stopped",
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    console = summary or _console
    n = len(result.plan.teachers) + len(result.plan.students)
    ran, elsewhere = len(result.trained), len(result.elsewhere)
    if elsewhere:  # other runners of the study shared it
        before = n - ran - elsewhere
        console.print(
            f"ran {ran} of {n} runs in {duration(result.wall_time_s)}; other runners of the "
            f"study ran {elsewhere}"
            + (f", the other {before} were already done" if before else ""),
            soft_wrap=True,
        )
    elif ran:
        console.print(
            f"ran {ran} of {n} runs in {duration(result.wall_time_s)}; "
            f"the other {n - ran} were already done",
            soft_wrap=True,
        )
    else:
        console.print(
            f"nothing to run: all {n} runs of {escape(study['name'])} are done in {escape(out)}",
            soft_wrap=True,
        )
    console.print(
        f"results: {escape(out / 'results.csv')} (and results.jsonl, teachers.jsonl)",
        soft_wrap=True,
    )
    if result.report is not None:
        console.print(f"report: {escape(result.report)}", soft_wrap=True)
    return result
