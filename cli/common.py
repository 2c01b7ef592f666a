"""What every command group shares: the Typer factory, option aliases (defined once), consoles,
list parsing, and the error boundary (one readable line and exit code 1; the traceback only with
RBKD_DEBUG=1)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEBUG_VAR = "RBKD_DEBUG"

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def new_app(**kwargs: Any) -> typer.Typer:
    """A Typer app with the house settings: -h/--help, no completion install, plain tracebacks."""
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(
        context_settings=CONTEXT_SETTINGS,
        add_completion=False,
        pretty_exceptions_enable=False,
        **kwargs,
    )


# ------------------------------------------------------------------ option aliases
DatasetOpt = Annotated[
    str, typer.Option("--dataset", help="Dataset: fashion-mnist, mnist or cifar10.")
]
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
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="adam or sgd.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed of initial weights, batch order, dropout and noise.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
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
StudentOpt = Annotated[str, typer.Option("--student", help="Student model: general or baseline.")]
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
    str,
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
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


# ------------------------------------------------------------------ parsing
def parse_int_list(text: str, what: str) -> list[int]:
    """ "5,10,50" -> [5, 10, 50]; ValueError naming the option otherwise."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"cannot read {what} {text!r}; write integers like 5,10,50") from None
    if not values:
        raise ValueError(f"{what} is empty; write integers like 5,10,50")
    return values


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


# ------------------------------------------------------------------ errors
class CLIError(Exception):
    """A problem to report as one line (exit code 1), raised by the command layer itself."""


F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_VAR, "").strip() not in ("", "0", "false", "no")


def error_line(exc: BaseException) -> str:
    """The one line a user reads for an exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CLIError, ValueError, LookupError, OSError, RuntimeError)):
        return text
    return f"{type(exc).__name__}: {text} (set {DEBUG_VAR}=1 for the traceback)"


def report_error(exc: BaseException) -> None:
    err_console.print(f"[bold red]Error:[/] {error_line(exc)}", soft_wrap=True, markup=True)


def handle_errors(fn: F) -> F:
    """Decorator for commands: domain errors become one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter, KeyboardInterrupt):
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            report_error(exc)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def escape(text: object) -> str:
    """Text for rich markup (paths and messages may hold [brackets])."""
    from rich.markup import escape as _escape

    return _escape(str(text))


def titled_table(title: str, **kwargs: Any) -> Table:
    """A rich Table at least as wide as its title, so the title never wraps mid-phrase."""
    from rich.text import Text

    kwargs.setdefault("min_width", min(len(Text.from_markup(title).plain) + 4, 100))
    return Table(title=title, **kwargs)
