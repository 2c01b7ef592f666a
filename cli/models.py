"""`rbkd models`: the thesis's teachers and students with their parameter counts."""

from __future__ import annotations

from typing import Annotated

import typer
from rbkd.cli.errors import handle_errors
from rbkd.cli.output import JsonOpt, print_json, print_table
from rbkd.cli.text import escape
from rbkd.cli.typer_app import new_app
from rich import box
from rich.table import Table

# From the specs alone: torch is not imported (tests/test_models.py checks the numbers against
# the built models).
from rbkd.models.specs import SPECS, spec_summary

app = new_app()


@app.command("models")
@handle_errors
def models(
    layers: Annotated[
        bool, typer.Option("--layers", help="Also describe each model's layers.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List every model (dataset x arch) with our parameter count next to the thesis's.

    Teachers are `small` and `large` (thesis Appendix A), students `general` and `baseline`
    (Appendix B).

    Example:

        rbkd models
    """
    found = [
        _Row(dataset, arch, spec, spec_summary(dataset, arch))
        for (dataset, arch), spec in SPECS.items()
    ]
    if as_json:
        print_json([_as_dict(m, layers) for m in found])
        return
    table = Table(
        title="rbkd models",
        caption="c/d/dr/bn: conv, dense, dropout and batch-norm layers",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    for col in ("dataset", "arch", "role"):
        table.add_column(col, no_wrap=True)
    for col in ("parameters", "thesis", "diff", "c/d/dr/bn"):
        table.add_column(col, justify="right", no_wrap=True)
    if layers:
        table.add_column("layers")
    for m in found:
        table.add_row(
            m.dataset,
            m.arch,
            m.role,
            f"{m.parameters:,}",
            f"{m.thesis_parameters:,}",
            f"{m.relative_error:+.1%}",
            f"{m.conv}/{m.dense}/{m.dropout}/{m.bn}",
            *([escape(m.description)] if layers else []),
        )
    print_table(table)


def _as_dict(model, layers: bool) -> dict:
    row = {
        "dataset": model.dataset,
        "arch": model.arch,
        "role": model.role,
        "parameters": model.parameters,
        "thesis_parameters": model.thesis_parameters,
        "relative_error": model.relative_error,
        "layers": {
            "conv": model.conv,
            "dense": model.dense,
            "dropout": model.dropout,
            "bn": model.bn,
        },
    }
    if layers:
        row["description"] = model.description
    return row


class _Row:
    """One model as the table and the JSON show it."""

    def __init__(self, dataset: str, arch: str, spec, summary: dict):
        self.dataset, self.arch, self.role = dataset, arch, spec.role
        self.parameters, self.thesis_parameters = summary["parameters"], spec.thesis_parameters
        self.conv, self.dense, self.dropout, self.bn = (
            summary[k] for k in ("conv", "dense", "dropout", "bn")
        )
        self.description = spec.doc
        self.relative_error = (self.parameters - self.thesis_parameters) / self.thesis_parameters
