"""`rbkd study run FILE` and `rbkd study report DIR`: whole studies, declared in a TOML file."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rbkd.cli.consoles import console, err_console
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import DataDirOpt, DeviceOpt, FigureFormat, LimitOpt, ProgressOpt, ThreadsOpt
from rbkd.cli.output import JsonOpt, print_json
from rbkd.cli.study_progress import run_with_progress
from rbkd.cli.text import escape
from rbkd.cli.threads import start_compute
from rbkd.cli.typer_app import new_app
from typer import _click as click
from typer._click.globals import get_current_context

from rbkd.config import TrainConfig
from rbkd.study.schema import StudyFileError, load_study

app = new_app(help="Run a declared study (docs/studies.md) and write its report.")

FORMATS = ("png", "pdf", "svg")
DRY_RUN_LINES = 200  # a --dry-run lists this many runs, then counts the rest


def study_file_errors_are_usage_errors(fn):
    """A study file that cannot be used is a usage error (exit code 2, one line naming the file
    and the key), as a --config file that cannot be used is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudyFileError as e:
            raise click.exceptions.UsageError(
                str(e), ctx=get_current_context(silent=True)
            ) from None

    return wrapper


def _labels(items: list[str] | None) -> dict[str, str]:
    labels = {}
    for item in items or []:
        name, sep, label = item.partition("=")
        if not sep or not name.strip() or not label.strip():
            raise ValueError(
                f"cannot read --label {item!r}; write NAME=LEGEND, e.g. small='Small teacher'"
            )
        labels[name.strip()] = label.strip()
    return labels


@app.command("run")
@handle_errors
@study_file_errors_are_usage_errors
def run(
    file: Annotated[
        Path, typer.Argument(help="The study file (TOML), e.g. studies/fashion-mnist-quick.toml.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Study folder (default: results/<study name>)."),
    ] = None,
    limit: LimitOpt = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = TrainConfig().device,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="List every run and whether it is done; run nothing."),
    ] = False,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write the report at the end.")
    ] = True,
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every run of a study that is not done yet, then write results.csv and the report.

    Runs are content-addressed: a teacher used by ten experiments trains once, running the
    same file again trains nothing, adding a temperature, class, seed or teacher runs only the
    new cells, and a killed study continues where it stopped (the run that was cut off resumes
    from its last epoch). Several runners may share one study and --out (processes, Slurm
    array tasks, machines on a shared filesystem): each run is claimed by one of them, trains
    once, and is taken over when its runner is killed (docs/studies.md, "Several runners").
    --limit N uses the first N examples of each split (it overrides the file's limit).
    --json prints what ran (or, with --dry-run, what would) as one JSON document: the counts,
    the files written and every run with its status.

    Example:

        rbkd study run studies/fashion-mnist-quick.toml --limit 300 --out results/quick-300
    """
    # Here, not at the top: the runner imports torch (`rbkd study run -h` does not).
    from rbkd.study.runner import run_study
    from rbkd.study.study_runs import describe

    study = load_study(file)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        study["limit"] = limit
    out = out or Path("results") / study["name"]
    if dry_run:
        plan = run_study(study, out, data_dir=data_dir, device=device, dry_run=True)
        if as_json:
            print_json(run_summary(study, out, plan, dry_run=True))
            return
        tasks = plan.plan.teachers + plan.plan.students
        todo = sum(plan.states[t.key].status != "done" for t in tasks)
        console.print(  # the count first: the list may be long
            f"{todo} of {len(tasks)} runs to do in {escape(out)} (dry run: nothing ran)",
            soft_wrap=True,
        )
        for task in tasks[:DRY_RUN_LINES]:
            console.print(escape(describe(task, plan.states[task.key])), soft_wrap=True)
        rest = tasks[DRY_RUN_LINES:]
        if rest:
            left = sum(plan.states[t.key].status != "done" for t in rest)
            console.print(f"... and {len(rest)} more runs ({left} to do)", soft_wrap=True)
        return

    start_compute(threads)
    result = run_with_progress(
        study,
        out,
        data_dir=data_dir,
        device=device,
        progress=progress,
        report=report,
        source=file,
        summary=err_console if as_json else None,  # --json: stdout holds the JSON only
    )
    if as_json:
        print_json(run_summary(study, out, result, dry_run=False))


def run_summary(study: dict, out: Path, result, *, dry_run: bool) -> dict:
    """`rbkd study run --json`: the counts, the files written (none in a dry run) and every
    run with its status: "ran" (trained now), "done", "partial" (resumes after epochs_done) or
    "new"; in a dry run, what a real run would do."""
    runs = result.runs()
    summary = {
        "study": study["name"],
        "out": str(out),
        "dry_run": dry_run,
        "total": len(runs),
        "ran": sum(r["status"] == "ran" for r in runs),
        "ran_elsewhere": 0 if dry_run else len(result.elsewhere),  # by other runners, meanwhile
        "to_do": sum(r["status"] not in ("ran", "done") for r in runs),
    }
    if not dry_run:
        summary["wall_time_s"] = result.wall_time_s
        summary["files"] = {
            "results_csv": str(out / "results.csv"),
            "results_jsonl": str(out / "results.jsonl"),
            "teachers_jsonl": str(out / "teachers.jsonl"),
            "report": None if result.report is None else str(result.report),
        }
    summary["runs"] = runs
    return summary


@app.command("report")
@handle_errors
def report_cmd(
    folder: Annotated[Path, typer.Argument(help="A study folder written by `rbkd study run`.")],
    fmt: Annotated[FigureFormat, typer.Option("--format", help="Figure format.")] = "png",
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="Legend name of a teacher: NAME=LEGEND (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default: FOLDER/report).")
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Write the study's tables and figures (report.md with PNG, PDF or SVG figures) from its
    results: the thesis's missing-class tables, entropy curves, transfer-set curves, batch-size
    and epoch sweeps, accuracy against T, high-entropy examples and projections.

    Example:

        rbkd study report results/quick-300 --format svg --label small="small teacher"
    """
    # Here, not at the top: the report imports torch (`rbkd study report -h` does not).
    from rbkd.study.report import write_report
    from rbkd.study.report.load import read_study_output

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (folder / "study.json").is_file():
        raise ValueError(f"{folder} holds no study.json: pass a folder written by `rbkd study run`")
    from rbkd.study.report.lm_report import is_lm_study_folder

    if not is_lm_study_folder(folder):  # an LM study's report reads its tables alone
        read_study_output(folder, data_dir=data_dir)  # tables checked against the run folders
    path = write_report(folder, out=out, fmt=fmt, labels=_labels(label), data_dir=data_dir)
    console.print(f"report: {escape(path)}", soft_wrap=True)
