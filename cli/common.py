"""What every command group shares: the Typer factory, option aliases (defined once), consoles,
list parsing, and the error boundary (one readable line and exit code 1; the traceback only with
RBKD_DEBUG=1)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer import _click as click
from typer.core import TyperGroup

from rbkd.config import (  # no torch here: `rbkd --help` must stay fast
    DATASETS,
    DIVERGENCES,
    OPTIMIZERS,
    SELECTIONS,
    STUDENTS,
    TEACHERS,
    check_choice,  # noqa: F401  (re-exported for the commands)
)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEBUG_VAR = "RBKD_DEBUG"

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


# The arguments of this invocation (for the resume command printed after an interrupt).
_invocation: list[str] = []


def keep_examples_whole(command: Any) -> None:
    """Mark every indented paragraph of every help (the examples) with click's "\b", which
    prints a paragraph as written: click rewraps the others to the terminal, and a command
    broken across two lines would not paste into a shell."""
    text = getattr(command, "help", None)
    if text and "\n    " in text:
        paragraphs = text.split("\n\n")
        command.help = "\n\n".join(
            "\b\n" + p if p.startswith("    ") and not p.startswith("\b") else p for p in paragraphs
        )
    for sub in getattr(command, "commands", {}).values():
        keep_examples_whole(sub)


def walk_commands(command: Any, path: tuple[str, ...] = ()):
    """(path, command) for `command` and every command below it, loading lazy ones (the root's
    commands are imported on first lookup: cli/app.py)."""
    yield path, command
    if hasattr(command, "list_commands"):  # a group (Typer's click has no Group class)
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                yield from walk_commands(sub, (*path, name))


class OneLineGroup(TyperGroup):
    """A Typer group whose usage errors (`--T abc`, an unknown option, `--epochs 1.5`) are one
    line on stderr and exit code 2, instead of click's usage text and a framed box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        _invocation[:] = list(sys.argv[1:] if args is None else args)
        keep_examples_whole(self)
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.exceptions.ClickException as exc:
            if not standalone_mode:
                raise
            if isinstance(exc, click.exceptions.NoArgsIsHelpError):
                # the help is the message (Typer's rich mode has printed it already: empty)
                if exc.format_message():
                    click.echo(exc.format_message())
            else:
                report_usage_error(exc)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            err_console.print("[bold red]Error:[/] aborted (end of input)", soft_wrap=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def report_usage_error(exc: Any) -> None:
    """One line for a click usage error: what is wrong, and where the help is."""
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "rbkd"
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    hint = f" (see `{path} -h`)" if isinstance(exc, click.exceptions.UsageError) else ""
    err_console.print(
        f"[bold red]Error:[/] {escape(one_line(message))}{escape(hint)}",
        soft_wrap=True,
        markup=True,
    )


def new_app(**kwargs: Any) -> typer.Typer:
    """A Typer app with the house settings: -h/--help, plain tracebacks, one-line usage errors.
    Only the root app (cli/app.py) passes add_completion=True: the completion options belong to
    `rbkd` itself, not to each group."""
    kwargs.setdefault("no_args_is_help", True)
    kwargs.setdefault("cls", OneLineGroup)
    kwargs.setdefault("add_completion", False)
    # click's plain help: 0.2 s faster than Typer's rich panels (`rbkd --help` is typed often),
    # reflows paragraphs to the terminal, and shows choices as `--capacity <small|large>`.
    kwargs.setdefault("rich_markup_mode", None)
    return typer.Typer(context_settings=CONTEXT_SETTINGS, pretty_exceptions_enable=False, **kwargs)


# ------------------------------------------------------------------ choices
# A Literal type makes Typer show the choices in --help (`<small|large>`) and turns a bad value
# into a one-line usage error that lists them, before any work starts.
Dataset = Literal[DATASETS]
Capacity = Literal[TEACHERS]
Student = Literal[STUDENTS]
Selection = Literal[SELECTIONS]
Optimizer = Literal[OPTIMIZERS]
Split = Literal["train", "test"]  # rbkd.softlabels.SPLITS (that module imports torch)
FigureFormat = Literal["png", "pdf", "svg"]
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(value: str | None) -> str | None:
    """--device: auto, cpu, cuda or cuda:N (mps on Apple machines); a usage error otherwise."""
    if value is not None and not DEVICE_PATTERN.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


# ------------------------------------------------------------------ option aliases
DatasetOpt = Annotated[Dataset, typer.Option("--dataset", help="Dataset.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder holding the dataset files (default: $RBKD_DATA, then the usual places).",
    ),
]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Passes over the training set.")]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", help="Global batch size (the thesis's chapter-6 knob).")
]
LrOpt = Annotated[float, typer.Option("--lr", help="Learning rate.")]
OptimizerOpt = Annotated[Optimizer, typer.Option("--optimizer", help="Optimizer.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed of initial weights, batch order, dropout and noise.")
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="<auto|cpu|cuda|cuda:N>",
        callback=check_device,
        help="Device (auto: cuda when available).",
    ),
]
OutDirOpt = Annotated[
    Path | None, typer.Option("--out", help="Run folder to write (default: under runs/).")
]
TeacherOpt = Annotated[
    Path | None, typer.Option("--teacher", help="Teacher run folder (from train-teacher).")
]
SoftLabelsOpt = Annotated[
    Path | None,
    typer.Option("--soft-labels", help="Soft-label file (.safetensors from soft-labels)."),
]
# Repeatable sources, one curve each (analyze entropy, experiment transfer-set).
TeachersOpt = Annotated[
    list[Path] | None,
    typer.Option("--teacher", help="Teacher run folder (repeatable: one curve each)."),
]
SoftLabelFilesOpt = Annotated[
    list[Path] | None,
    typer.Option("--soft-labels", help="Soft-label file (repeatable: one curve each)."),
]
TOpt = Annotated[float, typer.Option("--T", help="Distillation temperature T (> 0).")]
TListOpt = Annotated[
    str, typer.Option("--T", help="Temperatures: a list (1,3,9) or a range (1:20, 1:20:0.5).")
]
AlphaOpt = Annotated[
    float,
    typer.Option(
        "--alpha", help="Weight of the soft-label term; 1 - alpha goes to CE on hard labels."
    ),
]
TSquaredOpt = Annotated[
    bool,
    typer.Option("--t-squared/--no-t-squared", help="Scale the soft term by T^2 (Hinton et al.)."),
]
Divergence = Literal[DIVERGENCES]
DivergenceOpt = Annotated[
    Divergence,
    typer.Option(
        "--divergence",
        help="The soft-label term's divergence (rbkd.ops.kd_loss): kl (forward, Hinton), "
        "reverse_kl, jsd (with --beta), skew_kl / skew_reverse_kl (with --skew), tvd, dkd (with "
        "--dkd-alpha, --dkd-beta).",
    ),
]
BetaOpt = Annotated[
    float, typer.Option("--beta", help="jsd: the teacher's weight in the mixture, in [0, 1].")
]
SkewOpt = Annotated[
    float, typer.Option("--skew", help="skew_kl / skew_reverse_kl: the skew lambda, in [0, 1).")
]
DkdAlphaOpt = Annotated[
    float, typer.Option("--dkd-alpha", help="dkd: weight of the target-class term (>= 0).")
]
DkdBetaOpt = Annotated[
    float, typer.Option("--dkd-beta", help="dkd: weight of the non-target-class term (>= 0).")
]
StandardizeOpt = Annotated[
    bool,
    typer.Option(
        "--standardize/--no-standardize",
        help="z-score student and teacher logits per row before dividing by T (Sun et al. 2024).",
    ),
]
StudentOpt = Annotated[Student, typer.Option("--student", help="Student model.")]
ExcludeClassOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--exclude-class",
        help="Drop every example of class K from the transfer set (repeatable); its test "
        "accuracy is reported (the missing-class test, thesis 4.4).",
    ),
]
PerClassOpt = Annotated[
    int | None, typer.Option("--per-class", help="Transfer set of N examples per class.")
]
SelectOpt = Annotated[
    Selection,
    typer.Option(
        "--select", help="With --per-class: entropy (N highest entropy at T) or random (seeded)."
    ),
]
LabelSmoothingOpt = Annotated[
    float | None,
    typer.Option(
        "--label-smoothing",
        help="Train on (1-A)*onehot + A/C instead of a teacher (the LS baseline; 0 < A < 1).",
    ),
]
NoiseOpt = Annotated[
    str | None,
    typer.Option(
        "--noise", help="uniform:S or normal:S added to the soft labels each epoch (thesis 4.8)."
    ),
]
LimitOpt = Annotated[
    int | None,
    typer.Option(
        "--limit",
        help="Use only the first N examples of each split (quick trials; indices stay those "
        "of the full split).",
    ),
]
ProgressOpt = Annotated[
    bool,
    typer.Option(
        "--progress/--no-progress",
        help="Live progress bars on a terminal (--no-progress: none; the per-epoch lines stay).",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        metavar="<int>",
        help="CPU threads for torch and rbkd's kernels (default: $OMP_NUM_THREADS when set, "
        "else the physical cores).",
    ),
]


# ------------------------------------------------------------------ parsing
def parse_int_list(text: str, what: str) -> list[int]:
    """ "5,10,50" -> [5, 10, 50]; a usage error (exit code 2) naming the option otherwise."""
    from rbkd.cli.config_file import usage_errors

    with usage_errors():
        try:
            values = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"cannot read {what} {text!r}; write integers like 5,10,50") from None
        if not values:
            raise ValueError(f"{what} is empty; write integers like 5,10,50")
    return values


# ------------------------------------------------------------------ errors
class CLIError(Exception):
    """A problem to report as one line (exit code 1), raised by the command layer itself."""


F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_VAR, "").strip() not in ("", "0", "false", "no")


# Programming errors: a bug in rbkd, not a problem with the user's input. KeyError and IndexError
# are LookupErrors, so they are tested before the domain errors.
INTERNAL_ERRORS = (KeyError, IndexError, AttributeError, TypeError, NameError, AssertionError)
# ImportError: a missing optional extra or a broken install, which the message names.
DOMAIN_ERRORS = (CLIError, ValueError, LookupError, OSError, RuntimeError, ImportError)
MAX_ERROR_CHARS = 2000  # a message quoting a hostile file never floods the terminal


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 20] + " ... (truncated)"


def error_line(exc: BaseException) -> str:
    """The one line a user reads for an exception (not yet escaped for the terminal)."""
    text = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, DOMAIN_ERRORS) and not isinstance(exc, INTERNAL_ERRORS):
        return text
    return (
        f"internal error {type(exc).__name__}: {text} (a bug in rbkd; set {DEBUG_VAR}=1 for "
        "the traceback and report it)"
    )


def report_error(exc: BaseException) -> None:
    err_console.print(f"[bold red]Error:[/] {escape(error_line(exc))}", soft_wrap=True, markup=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run stops the way Ctrl-C stops it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


# Commands whose interrupted run continues with the same command plus `--resume`.
RESUMABLE_COMMANDS = ("train-teacher", "distill")


def resume_command(run_dir: Path, args: Sequence[str] | None = None, flag: bool = True) -> str:
    """This invocation with `--out RUN` (any --out it had replaced) and, when the command has
    the option (`flag`), `--resume`: the exact command that continues the interrupted run."""
    args = list(_invocation if args is None else args)
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


def _has_resume_option() -> bool:
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    params = getattr(getattr(ctx, "command", None), "params", [])
    return any("--resume" in getattr(p, "opts", ()) for p in params)


def report_interrupt(exc: KeyboardInterrupt, resume_flag: bool = True) -> int:
    """One line after Ctrl-C or SIGTERM: what is kept and the exact command to resume. Returns
    the exit code (130 for SIGINT, 143 for SIGTERM, as a shell reports them)."""
    from rbkd.engine.loop import last_run_dir

    name, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
    run_dir = last_run_dir()
    command = next((a for a in _invocation if not a.startswith("-")), "")
    if run_dir is None:
        line = f"interrupted ({name}) before a run folder was opened: nothing was written"
    else:
        from rbkd.engine.checkpoint import has_checkpoint, read_checkpoint_info

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


def handle_errors(fn: F) -> F:
    """Decorator for commands: the values of the options that have a rule (rbkd.config's
    OPTION_RULES) are checked first, a usage error (exit code 2) naming the flag or the --config
    file; domain errors become one line on stderr and exit code 1; programming errors one line
    naming them as internal; Ctrl-C and SIGTERM one line saying what is kept and how to resume."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rbkd.cli.config_file import check_command_options

        check_command_options()  # before anything is read or written
        previous = None
        with contextlib.suppress(ValueError):  # signal.signal works in the main thread only
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except KeyboardInterrupt as exc:
            if debug_enabled():
                raise
            raise typer.Exit(report_interrupt(exc, _has_resume_option())) from None
        except Exception as exc:
            if debug_enabled():
                raise
            report_error(exc)
            raise typer.Exit(1) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


# C0 and C1 control characters, DEL, and the Unicode bidi/format controls that can reorder or
# hide text (Trojan Source): none belongs in a one-line message, all can fool a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def sanitize(text: object) -> str:
    """`text` with every control character shown as an escape (ESC -> \\x1b, newline -> \\n):
    file metadata and paths are untrusted and must not drive the terminal."""

    def visible(match: re.Match) -> str:
        char = match.group()
        return repr(char)[1:-1] if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _CONTROL.sub(visible, str(text))


def escape(text: object) -> str:
    """Untrusted text made safe to print: control characters escaped (`sanitize`), rich markup
    ([brackets] in paths and messages) escaped."""
    from rich.markup import escape as _escape

    return _escape(sanitize(text))


def titled_table(title: str, **kwargs: Any) -> Table:
    """A rich Table at least as wide as its title, so the title never wraps mid-phrase."""
    from rich.text import Text

    kwargs.setdefault("min_width", min(len(Text.from_markup(title).plain) + 4, 100))
    return Table(title=title, **kwargs)


# ------------------------------------------------------------------ threads
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's vector units, so a
    second torch thread on one rarely helps): distinct (physical id, core id) pairs of
    /proc/cpuinfo among the CPUs in our affinity mask; else the CPUs we may use."""
    try:
        allowed: set[int] | None = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = None
    cores: set[tuple[str, str]] = set()
    with contextlib.suppress(OSError):
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (line.partition(":") for line in block.splitlines())
            )
            if "core id" not in fields or "processor" not in fields:
                continue
            if allowed is None or int(fields["processor"]) in allowed:
                cores.add((fields.get("physical id", "0"), fields["core id"]))
    if cores:
        return len(cores)
    return len(allowed) if allowed else os.cpu_count() or 1


def default_threads() -> int:
    """The thread count when --threads is not given: $OMP_NUM_THREADS if the user set it (a
    positive integer), else the physical cores."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else physical_cores()


def start_compute(threads: int | None) -> int:
    """What every computing command does before its work: check the values of its options that
    have a rule (rbkd.config.OPTION_RULES; a usage error, exit code 2, naming the flag or the
    --config file), set the threads (`apply_threads`) and print each epoch's line even with
    --no-progress, which only drops the live bars."""
    from rbkd.cli.config_file import check_command_options

    from rbkd.engine.progress import print_epoch_lines

    check_command_options()
    print_epoch_lines()
    return apply_threads(threads)


def apply_threads(n: int | None) -> int:
    """Set torch's intra-op threads (which rbkd's CPU kernels follow too) before any work:
    --threads N, else $OMP_NUM_THREADS, else the physical cores. Returns the count used."""
    import torch

    n = default_threads() if n is None else n
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    # The inter-op pool can be sized once per process, before it first runs; rbkd queues no
    # inter-op work, so a pool that already exists (a second command in one process) is fine.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    return n
