"""The house Typer app: `new_app` (-h/--help, click's plain help, one-line usage errors) for every
command group, the group class that gives it those errors, and its help formatting.

`command_args` holds the arguments after `rbkd` of the command running now: what config.json
records (cli/config_file.py) and what the resume line after an interrupt repeats
(cli/interrupts.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from rbkd.cli.consoles import err_console
from rbkd.cli.text import escape, one_line
from typer import _click as click
from typer.core import TyperGroup

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# The arguments of this invocation, after `rbkd` (set as the root group starts).
command_args: list[str] = []


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
        command_args[:] = list(sys.argv[1:] if args is None else args)
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
