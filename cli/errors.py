"""The error boundary of every command (`handle_errors`): a domain error is one readable line on
stderr and exit code 1, a programming error one line naming it as internal, Ctrl-C and SIGTERM
one line saying how to resume (cli/interrupts.py); the traceback only with RBKD_DEBUG=1."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rbkd.cli.consoles import err_console
from rbkd.cli.interrupts import has_resume_option, report_interrupt, sigterm_as_interrupt
from rbkd.cli.text import escape, one_line
from typer import _click as click
from typer._click.globals import get_current_context

DEBUG_VAR = "RBKD_DEBUG"


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


@contextlib.contextmanager
def _recorded(describe: Callable[[], dict] | None):
    """Runs written in the block record `describe()` as their invocation (rbkd.provenance)."""
    if describe is None:
        yield
        return
    from rbkd.provenance import push_invocation  # with rbkd.data: not on `rbkd --help`'s path

    pop = push_invocation(describe)
    try:
        yield
    finally:
        pop()


def handle_errors(fn: F) -> F:
    """Decorator for commands: the values of the options that have a rule (rbkd.config's
    OPTION_RULES) are checked first, a usage error (exit code 2) naming the flag or the --config
    file; domain errors become one line on stderr and exit code 1; programming errors one line
    naming them as internal; Ctrl-C and SIGTERM one line saying what is kept and how to resume."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Here, not at the top: cli/app.py imports this module, and `rbkd --help` is faster
        # without rbkd.config, which the checks read (every command's module loads it anyway).
        from rbkd.cli.usage import INVOCATION_META, check_command_options

        check_command_options()  # before anything is read or written
        ctx = get_current_context(silent=True)
        describe = ctx.meta.get(INVOCATION_META) if ctx is not None else None
        try:
            with sigterm_as_interrupt(), _recorded(describe):
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except KeyboardInterrupt as exc:
            if debug_enabled():
                raise
            raise typer.Exit(report_interrupt(exc, has_resume_option())) from None
        except Exception as exc:
            if debug_enabled():
                raise
            report_error(exc)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
