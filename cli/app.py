"""The `rbkd` command: every command group joined into one Typer app.

rbkd train-teacher | soft-labels | distill | analyze ... | experiment ... | models | info | data ...
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Any

import typer
from rbkd.cli.errors import debug_enabled, report_error
from rbkd.cli.typer_app import OneLineGroup, keep_examples_whole, new_app
from typer import _click as click
from typer.main import get_command

import rbkd
from rbkd.memory_policy import keep_freed_memory

# Every command: its module (imported only when the command runs, or its own help is asked
# for) and the one-line summary `rbkd --help` lists. The summaries are the commands' own first
# lines (tests/test_cli_conventions.py checks they agree), kept here so that `rbkd --help`
# imports no command module: that is what keeps it under 0.3 s.
COMMANDS: dict[str, tuple[str, str]] = {
    "train-teacher": (
        "train",
        "Train a teacher on hard labels (cross-entropy) and write its run folder.",
    ),
    "soft-labels": (
        "write_soft_labels",
        "Run a teacher over a dataset split and save its logits as a soft-label file.",
    ),
    "distill": (
        "distill",
        "Distill a student from a teacher's soft labels at temperature T (loss: rbkd.ops.kd_loss).",
    ),
    "analyze": ("analyze", "Analyse soft labels and representations (thesis sections 4.5-4.7)."),
    "experiment": (
        "experiments",
        "Run the thesis's experiments: grids of distillations with result tables.",
    ),
    "study": ("study", "Run a declared study (docs/studies.md) and write its report."),
    "models": (
        "models",
        "List every model (dataset x arch) with our parameter count next to the thesis's.",
    ),
    "info": (
        "info",
        "Show versions, kernel backends, devices and threads (paste it into bug reports).",
    ),
    "rerun": (
        "rerun",
        "Run a run again from the command its config.json records, and compare the two.",
    ),
    "data": ("data", "Find, list and fetch the datasets (fashion-mnist, mnist, cifar10)."),
    "lm": (
        "lm",
        "Language models: tokenise a corpus, train a teacher, capture its sparse soft labels, distill.",
    ),
}


class LazyCommands(OneLineGroup):
    """The root group: a command's module is imported, and its Typer app turned into a click
    command, the first time the command is looked up, not before."""

    _loaded: dict[str, click.Command]

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        loaded = self.__dict__.setdefault("_loaded", {})
        if name not in loaded:
            module = importlib.import_module(f"rbkd.cli.{COMMANDS[name][0]}")
            command = get_command(module.app)
            command.name = name
            keep_examples_whole(command)
            loaded[name] = command
        return loaded[name]

    def format_commands(self, ctx: click.Context, formatter: Any) -> None:
        """The command list from COMMANDS' summaries, without importing any command."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [
            (name, click.utils.make_default_short_help(summary, limit))
            for name, (_, summary) in COMMANDS.items()
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = new_app(
    cls=LazyCommands,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, pwsh)
    help="Response-based knowledge distillation: train teachers, distill students, and test "
    "the soft-label hypothesis (entropy vs T, missing classes, transfer sets, batch size).\n\n"
    "Start with a teacher; every command has its own example in its --help.\n\n"
    "Example:\n\n"
    "    rbkd train-teacher --capacity small --epochs 1 --batch-size 128 --limit 2000 "
    "--out runs/t1",
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"rbkd {rbkd.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version_callback, help="Print the version."
        ),
    ] = False,
) -> None:
    """Response-based knowledge distillation (the thesis's experiments as commands)."""


def main() -> None:
    """Console-script entry point: the last line of defence for errors outside a command."""
    try:
        keep_freed_memory()  # before the first large tensor (rbkd/memory_policy.py says why)
        app(prog_name="rbkd")
    except Exception as exc:  # commands report their own errors; this catches the rest
        if debug_enabled():
            raise
        report_error(exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
