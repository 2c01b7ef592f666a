"""The options the commands share, declared once (`Annotated` aliases: `--T`, `--device`, ...),
their choices (a `Literal` shows them in --help and completes them on tab), and the parsing of
the list-valued ones (`--classes 0,3,6`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rbkd.cli.usage import usage_errors

from rbkd.config import (  # no torch: every command's --help loads this module
    DATASETS,
    DIVERGENCES,
    OPTIMIZERS,
    SELECTIONS,
    STUDENTS,
    TEACHERS,
)

# ------------------------------------------------------------------ choices
# A Literal type makes Typer show the choices in --help (`<small|large>`) and turns a bad value
# into a one-line usage error that lists them, before any work starts.
Dataset = Literal[DATASETS]
Capacity = Literal[TEACHERS]
Student = Literal[STUDENTS]
Selection = Literal[SELECTIONS]
Optimizer = Literal[OPTIMIZERS]
Split = Literal["train", "test"]  # rbkd.soft_label_file.SPLITS (that module imports torch)
FigureFormat = Literal["png", "pdf", "svg"]
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# What tab completes after --device (rbkd.engine.device.resolve_device takes them), with the help
# zsh and fish show beside each; cuda:N is typed out. No torch here: completion runs on each tab.
DEVICE_CHOICES = (
    ("auto", "cuda when available, else cpu"),
    ("cpu", "the CPU"),
    ("cuda", "the current GPU (cuda:N for GPU N)"),
    *((("mps", "Apple's GPU"),) if sys.platform == "darwin" else ()),
)


def check_device(value: str | None) -> str | None:
    """--device: auto, cpu, cuda or cuda:N (mps on Apple machines); a usage error otherwise."""
    if value is not None and not DEVICE_PATTERN.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def complete_device(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of --device: the choices that start with what is typed."""
    return [(name, about) for name, about in DEVICE_CHOICES if name.startswith(incomplete)]


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
        autocompletion=complete_device,
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
TensorBoardOpt = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        metavar="DIR",
        help="Log each epoch's losses, accuracies, lr and samples/s to TensorBoard in DIR "
        "(needs `pip install tensorboard`).",
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
    with usage_errors():
        try:
            values = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"cannot read {what} {text!r}; write integers like 5,10,50") from None
        if not values:
            raise ValueError(f"{what} is empty; write integers like 5,10,50")
    return values
