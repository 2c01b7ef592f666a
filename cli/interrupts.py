"""Ctrl-C and SIGTERM: a run stops the same way for both, and one line says what is kept and the
exact command that resumes it (exit code 130 or 143, as a shell reports the signals)."""

from __future__ import annotations

import contextlib
import shlex
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rbkd.cli.consoles import err_console
from rbkd.cli.text import escape
from rbkd.cli.typer_app import command_args
from typer._click.globals import get_current_context

# Commands whose interrupted run continues with the same command plus `--resume`.
RESUMABLE_COMMANDS = ("train-teacher", "distill")


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run stops the way Ctrl-C stops it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (a KeyboardInterrupt); the previous handler
    comes back after it. Outside the main thread, where signal handlers cannot be set, a no-op."""
    previous = None
    with contextlib.suppress(ValueError):  # signal.signal works in the main thread only
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def resume_command(run_dir: Path, args: Sequence[str] | None = None, flag: bool = True) -> str:
    """This invocation with `--out RUN` (any --out it had replaced) and, when the command has
    the option (`flag`), `--resume`: the exact command that continues the interrupted run."""
    args = list(command_args if args is None else args)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        if arg.startswith("--out=") or arg == "--resume":
            continue
        kept.append(arg)
    return shlex.join(["rbkd", *kept, "--out", str(run_dir), *(["--resume"] if flag else [])])


def has_resume_option() -> bool:
    """Whether the running command takes --resume."""
    ctx = get_current_context(silent=True)
    params = getattr(getattr(ctx, "command", None), "params", [])
    return any("--resume" in getattr(p, "opts", ()) for p in params)


def report_interrupt(exc: KeyboardInterrupt, resume_flag: bool = True) -> int:
    """One line after Ctrl-C or SIGTERM: what is kept and the exact command to resume. Returns
    the exit code (130 for SIGINT, 143 for SIGTERM, as a shell reports them)."""
    # Here, not at the top: rbkd.engine imports torch, and `rbkd --help` loads this module.
    from rbkd.engine.checkpoint import has_checkpoint, read_checkpoint_info
    from rbkd.engine.loop import last_run_dir

    name, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
    run_dir = last_run_dir()
    command = next((a for a in command_args if not a.startswith("-")), "")
    if run_dir is None:
        line = f"interrupted ({name}) before a run folder was opened: nothing was written"
    else:
        try:
            epoch = read_checkpoint_info(run_dir)["epoch"] if has_checkpoint(run_dir) else 0
        except (OSError, ValueError):
            epoch = 0
        kept = (
            f"the checkpoint of epoch {epoch} is kept in {run_dir}"
            if epoch
            else f"no epoch had completed, {run_dir} holds no checkpoint yet"
        )
        if command in RESUMABLE_COMMANDS:
            again = resume_command(run_dir, flag=resume_flag)
            line = f"interrupted ({name}): {kept}; resume with: {again}"
        else:
            line = f"interrupted ({name}): {kept}"
    err_console.print(f"[bold yellow]Stopped:[/] {escape(line)}", soft_wrap=True, markup=True)
    return code
