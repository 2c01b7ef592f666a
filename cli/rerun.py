"""`rbkd rerun RUN`: run a run again from the command its config.json records, into a new
folder, and compare the final metrics and weights with the original's: the reproducibility check.

Runs are content-addressed, so the same command into the same folder would only reuse the
finished run; a rerun therefore always trains into a folder of its own.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rbkd.cli.app import app as root_app
from rbkd.cli.consoles import console, err_console
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import ProgressOpt
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.text import escape
from rbkd.cli.typer_app import new_app
from typer import _click as click
from typer.main import get_command

from rbkd import provenance
from rbkd.io import check_regular_file

app = new_app()

# Options a rerun always sets itself: its own folder, and a fresh start (never --resume).
_SET_BY_RERUN = ("out", "resume")
# The exit code when the rerun ran but differs from the original (1: an error, 2: a usage error).
EXIT_NOT_REPRODUCED = 3


def check_finished(run_dir: Path) -> None:
    """The original's weights are there to compare with, before anything is trained again."""
    path = run_dir / "model.safetensors"
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} holds no finished run to compare a rerun with; finish "
            "it first (the same command again resumes it)"
        )
    check_regular_file(path, "model weights")


def recorded_invocation(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The invocation `config` (run_dir's config.json) records; a one-line error when none."""
    invocation = provenance.recorded_invocation(config)
    record = (config.get("provenance") or {}).get("invocation") or {}
    if invocation is None and isinstance(record, dict) and record.get("unrepeatable"):
        raise ValueError(f"{run_dir} cannot be rerun by `rbkd rerun`: {record['unrepeatable']}")
    if invocation is None:
        raise ValueError(
            f"{run_dir}/config.json records no command (the run was written by an older rbkd): "
            "run it again with its own options instead"
        )
    return invocation


def fresh_folder(folder: Path) -> Path:
    """FOLDER.rerun, else FOLDER.rerun-2, -3, ...: the first that does not exist yet."""
    base = folder.parent / f"{folder.name}.rerun"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _command_object(words: list[str]):
    """The click command of `rbkd WORDS` ("experiment missing-class" -> its command)."""
    command = get_command(root_app)
    for word in words:
        group = command if hasattr(command, "get_command") else None
        sub = group.get_command(click.Context(group), word) if group is not None else None
        if sub is None:
            raise ValueError(f"the recorded command `rbkd {' '.join(words)}` does not exist here")
        command = sub
    return command


def _command_params(words: list[str]) -> set[str]:
    return {p.name for p in _command_object(words).params if p.expose_value}


def options_to_argv(words: list[str], options: dict[str, Any]) -> list[str]:
    """The command line that gives a command exactly `options` (flags spelled out, lists
    repeated, None left to the default)."""
    command = _command_object(words)
    params = {p.name: p for p in command.params if p.expose_value}
    argv = list(words)
    for name, value in options.items():
        param = params.get(name)
        if param is None:
            raise ValueError(
                f"the recorded option {name!r} is not an option of `rbkd {' '.join(words)}` "
                "in this rbkd: the run was made by another version"
            )
        if value is None:
            continue
        flag = param.opts[0]
        if param.is_flag:
            if value:
                argv.append(flag)
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, str(item)]
    return argv


def _new_run_dir(run_dir: Path, invocation: dict, new_out: Path) -> Path:
    """Where the rerun's copy of `run_dir` lands: --out itself for train-teacher and distill;
    the same place inside --out for an experiment (its runs sit under teachers/, students/)."""
    if not invocation["command"].startswith("experiment"):
        return new_out
    relative = os.path.relpath(os.path.abspath(run_dir), invocation["options"].get("out") or "")
    if relative.startswith(".."):  # the results folder was moved: teachers/NAME or students/NAME
        relative = os.path.join(run_dir.parent.name, run_dir.name)
    return new_out / relative


def _number(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor bit for bit equal. (Not the files' SHA-256: safetensors writes the metadata
    in no fixed order, so equal weights may make different files.)"""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        names = fa.keys()
        if set(names) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in names)


def compare_runs(original: Path, repeat: Path) -> dict[str, Any]:
    """The two runs side by side: final metrics, per-class accuracy, weights (bit for bit), data
    files (SHA-256), device and threads; `reproduced` is True when all of it is identical."""
    from rbkd.engine import read_config
    from rbkd.engine.rundir import renamed_losses

    old, new = read_config(original), read_config(repeat)
    a, b = (renamed_losses(c.get("final_metrics") or {}) for c in (old, new))
    metrics = {}
    names = ("test_accuracy", "test_ce_loss", "train_accuracy", "train_objective_loss",
             "train_ce_loss", "epochs")  # fmt: skip
    for key in names:
        x, y = a.get(key), b.get(key)
        equal = x == y or (x is None and y is None)
        diff = None
        if not equal and isinstance(x, (int, float)) and isinstance(y, (int, float)):
            diff = y - x
        metrics[key] = {"original": x, "rerun": y, "equal": equal, "difference": diff}
    provenance = [c.get("provenance") or {} for c in (old, new)]
    files = [sorted(f["sha256"] for f in p.get("data_files", [])) for p in provenance]
    same = {
        "metrics": all(m["equal"] for m in metrics.values()),
        "per_class_accuracy": a.get("per_class_accuracy") == b.get("per_class_accuracy"),
        "weights": same_weights(original / "model.safetensors", repeat / "model.safetensors"),
        "data_files": files[0] == files[1],
    }
    return {
        "original": str(original),
        "rerun": str(repeat),
        "reproduced": all(same.values()),
        "same": same,
        "metrics": metrics,
        "device": [p.get("device") for p in provenance],
        "threads": [p.get("torch_threads") for p in provenance],
    }


def print_comparison(comparison: dict[str, Any]) -> None:
    table = titled_table("rerun against the original")
    for column in ("", "original", "rerun", "difference"):
        table.add_column(column, justify="left" if not column else "right")
    for key, m in comparison["metrics"].items():
        diff = "equal" if m["equal"] else "-"
        if m["difference"] is not None:
            diff = f"{m['difference']:+.3g}"
        table.add_row(key, _number(m["original"]), _number(m["rerun"]), diff)
    same = comparison["same"]
    table.add_row("per-class accuracy", "", "", "equal" if same["per_class_accuracy"] else "differ")
    table.add_row("weights", "", "", "identical" if same["weights"] else "differ")
    table.add_row("data files (SHA-256)", "", "", "identical" if same["data_files"] else "differ")
    devices, threads = comparison["device"], comparison["threads"]
    table.add_row("device", escape(devices[0] or "?"), escape(devices[1] or "?"), "")
    table.add_row("threads", _number(threads[0]), _number(threads[1]), "")
    print_table(table)
    if comparison["reproduced"]:
        console.print("reproduced: identical final metrics and weights")
    else:
        console.print("[bold yellow]not reproduced:[/] the rerun differs (see above)")


@app.command("rerun")
@handle_errors
def rerun(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder to repeat (its config.json records the command).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for the repeat (default: RUN.rerun, or RUN.rerun-2, ...: a new one; "
            "for a run of an experiment, beside the experiment's folder).",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="Device for the repeat (default: the one recorded)."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            metavar="<int>",
            help="CPU threads for the repeat (default: the count the run recorded, since the "
            "thread count can change a CPU run's last bits).",
        ),
    ] = None,
    progress: ProgressOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Run a run again from the command its config.json records, and compare the two.

    The repeat trains into a new folder; then final test and train accuracy and loss, per-class
    accuracy, the weights (bit for bit) and the data files read (SHA-256) are compared. A run
    of an experiment reruns the whole experiment.

    On the same machine, device and thread count, a rerun is expected to be identical.

    Exit code: 0 when the rerun reproduced the run, 3 when it ran but differs ("not
    reproduced"), 1 when it could not run (a run folder without its weights or its recorded
    command), 2 for a usage error.

    Example:

        rbkd rerun runs/t1 --out runs/t1-again
    """
    from rbkd.engine import read_config

    config = read_config(run_dir)
    invocation = recorded_invocation(run_dir, config)
    check_finished(run_dir)
    recorded_threads = config["provenance"].get("torch_threads")
    words = str(invocation["command"]).split()
    # An experiment's run sits inside its results folder: the rerun is a sibling of that folder.
    experiment = words[0] == "experiment" and invocation["options"].get("out")
    new_out = out if out is not None else fresh_folder(Path(experiment or run_dir))
    options = {k: v for k, v in invocation["options"].items() if k not in _SET_BY_RERUN}
    options["out"] = os.path.abspath(new_out)
    if device is not None:
        options["device"] = device
    if "progress" in options:
        options["progress"] = progress
    if "threads" in _command_params(words):
        options["threads"] = threads if threads is not None else recorded_threads
    argv = options_to_argv(words, options)
    err_console.print(f"rerunning {escape(run_dir)}: {escape(shlex.join(['rbkd', *argv]))}")
    # The repeated command's own report goes to stderr: stdout holds the comparison alone.
    with contextlib.redirect_stdout(sys.stderr):
        code = get_command(root_app).main(args=argv, prog_name="rbkd", standalone_mode=False)
    if code:
        raise typer.Exit(code)
    comparison = compare_runs(run_dir, _new_run_dir(run_dir, invocation, new_out))
    if as_json:
        print_json(comparison)
    else:
        print_comparison(comparison)
    if not comparison["reproduced"]:
        raise typer.Exit(EXIT_NOT_REPRODUCED)
