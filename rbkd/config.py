"""Every run's configuration, and so every default, in one place (no torch import here).

`TrainConfig` is how a model is trained, `TeacherSpec` which teacher, `DistillSpec` what a
student learns from. The CLI, the study files and the Python API all take their defaults from
these dataclasses; nothing repeats a default value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

DATASETS = ("fashion-mnist", "mnist", "cifar10")
DEFAULT_DATASET = "fashion-mnist"  # the embedded default: Debian ships it
TEACHERS = ("small", "large")  # the thesis's teacher capacities (Appendix A)
STUDENTS = ("general", "baseline")  # the thesis's students (Appendix B, section 6.3.1)
SELECTIONS = ("entropy", "random")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    epochs: int = 10  # full passes over the training (transfer) set
    batch_size: int = 64  # GLOBAL batch: split across ranks under torchrun (the thesis's knob)
    lr: float = 1e-3  # learning rate
    optimizer: str = "adam"  # "adam" | "sgd"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # L2 penalty (coupled, as in torch.optim.Adam / SGD)
    seed: int = 0  # drives the initial weights, batch order, dropout masks and soft-label noise
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    eval_batch_size: int = 1024  # evaluation only; does not change any result

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")

    # The fields that change what a run computes (its content address); device and evaluation
    # batch size do not.
    RESULT_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "seed")

    def result_inputs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.RESULT_FIELDS}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)


@dataclass
class TeacherSpec:
    """Which teacher to train (how: a TrainConfig)."""

    dataset: str = DEFAULT_DATASET
    capacity: str = "small"

    def check(self) -> None:
        check_choice(self.dataset, DATASETS, "--dataset")
        check_choice(self.capacity, TEACHERS, "--capacity")


@dataclass
class DistillSpec:
    """Everything that defines one distillation run besides its TrainConfig."""

    teacher: Path | None = None  # teacher run folder
    soft_labels: Path | None = None  # or a soft-label file of the train split
    label_smoothing: float | None = None  # or no teacher: LS targets with this A
    dataset: str | None = None  # needed with label_smoothing; else checked against the source
    T: float = 9.0
    alpha: float = 0.99
    t_squared: bool = True
    student: str = "general"
    exclude_classes: list[int] = field(default_factory=list)
    per_class: int | None = None
    select: str = "entropy"
    noise: str | None = None
    data_dir: Path | None = None
    limit: int | None = None
    allow_partial: bool = False  # soft labels covering only part of the split are an error

    def check(self) -> None:
        """Reject bad combinations before any data is read (ValueError, one line)."""
        given = [
            n
            for n, v in (
                ("--teacher", self.teacher),
                ("--soft-labels", self.soft_labels),
                ("--label-smoothing", self.label_smoothing),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of --teacher RUN, --soft-labels FILE or --label-smoothing A"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        check_temperature(self.T)
        if self.label_smoothing is None:  # T is the distillation's; LS targets have none
            check_kd_temperature(self.T, "--T")
        check_alpha(self.alpha, "--alpha")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"--per-class must be >= 1, got {self.per_class}")
        if self.label_smoothing is not None:
            if not 0.0 < self.label_smoothing < 1.0:
                raise ValueError(
                    f"--label-smoothing A must be in (0, 1), got {self.label_smoothing}"
                )
            if self.per_class is not None and self.select == "entropy":
                raise ValueError(
                    "--select entropy ranks examples by a teacher's soft labels; with "
                    "--label-smoothing use --select random"
                )
        check_choice(self.student, STUDENTS, "--student")
        check_choice(self.select, SELECTIONS, "--select")
        if self.dataset is not None:
            check_choice(self.dataset, DATASETS, "--dataset")
        if self.noise is not None:
            from rbkd.engine.noise import parse_noise

            parse_noise(self.noise)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")

    def replace(self, **changes: Any) -> DistillSpec:
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_temperature(T: float) -> float:
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ValueError(f"temperature T must be finite, and T must be > 0, got {T}")
    return float(T)


# The largest T kd_loss accepts (rbkd.ops.validation says why: float32's KL loses digits as
# T^2 * 1e-7). Here, torch-free, so a distillation is refused before it opens a run folder.
KD_MAX_TEMPERATURE = 100.0


def check_kd_temperature(T: float, name: str = "T") -> float:
    """A temperature kd_loss can distill at: finite, > 0 and at most KD_MAX_TEMPERATURE."""
    T = check_temperature(T)
    if T > KD_MAX_TEMPERATURE:
        raise ValueError(
            f"{name} = {T:g} is above {KD_MAX_TEMPERATURE:g}, the largest temperature kd_loss "
            "computes accurately in float32; use a smaller T"
        )
    return T


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """The KL weight: a number in [0, 1]."""
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {alpha}")
    return float(alpha)
