"""The `rbkd` command: every command group joined into one Typer app.

rbkd train-teacher | soft-labels | distill | analyze ... | experiment ... | models | info | data ...
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rbkd.cli import analyze, distill, experiments, info, models, rerun, softlabels, study, train
from rbkd.cli.common import console, debug_enabled, new_app, report_error

app = new_app(
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, pwsh)
    help="Response-based knowledge distillation: train teachers, distill students, and test "
    "the soft-label hypothesis (entropy vs T, missing classes, transfer sets, batch size).\n\n"
    "Start with a teacher; every command has its own example in its --help.\n\n"
    "Example:\n\n"
    "    rbkd train-teacher --capacity small --epochs 1 --batch-size 128 --limit 2000 "
    "--out runs/t1",
)

app.add_typer(train.app)
app.add_typer(softlabels.app)
app.add_typer(distill.app)
app.add_typer(analyze.app, name="analyze")
app.add_typer(experiments.app, name="experiment")
app.add_typer(study.app, name="study")
app.add_typer(models.app)
app.add_typer(info.app)
app.add_typer(rerun.app)

try:  # `rbkd data` lives in cli/data.py (the data layer's own commands)
    from rbkd.cli import data as _data
except ImportError:  # pragma: no cover - only in a checkout without it
    _data = None
if _data is not None and hasattr(_data, "app"):
    app.add_typer(_data.app, name="data")


def _version_callback(value: bool) -> None:
    if value:
        import rbkd

        console.print(f"rbkd {rbkd.__version__}")
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
        app(prog_name="rbkd")
    except Exception as exc:  # commands report their own errors; this catches the rest
        if debug_enabled():
            raise
        report_error(exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
