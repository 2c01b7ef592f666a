"""Every run's configuration, and so every default, in one place (no torch import here:
tests/test_config_checks.py checks it, since the command line and study files read this module).

`TrainConfig` is how a model is trained, `TeacherSpec` which teacher, `DistillSpec` what a
student learns from. The CLI, the study files and the Python API all take their defaults from
these dataclasses; nothing repeats a default value.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rbkd.ops.args import DIVERGENCES as _DIVERGENCE_CODES
from rbkd.ops.args import KD_MAX_TEMPERATURE

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
        # The engine's own floor: epochs=0 evaluates an untrained model (tests, tools). What a
        # user asks for (the CLI, the API, a study) is checked by check_options: epochs >= 1.
        self.epochs = check_epochs(self.epochs, "epochs", minimum=0)
        for name in ("batch_size", "seed", "eval_batch_size"):
            setattr(self, name, OPTION_RULES[name](getattr(self, name), name))
        for name in ("lr", "momentum", "weight_decay"):  # checked, kept as given (the run key)
            OPTION_RULES[name](getattr(self, name), name)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not isinstance(self.device, str):
            raise ValueError(
                f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}"
            )

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


# kd_loss's divergences (the names of rbkd.ops.args.DIVERGENCES) and the options each one uses.
DIVERGENCES = tuple(_DIVERGENCE_CODES)
DIVERGENCE_OPTIONS = {
    "jsd": ("beta",),
    "skew_kl": ("skew",),
    "skew_reverse_kl": ("skew",),
    "dkd": ("dkd_alpha", "dkd_beta"),
}
LOSS_OPTIONS = ("divergence", "beta", "skew", "dkd_alpha", "dkd_beta", "standardize")


@dataclass(frozen=True)
class LossSpec:
    """Which divergence the distillation term computes (rbkd.ops.kd_loss's `divergence`, `beta`,
    `skew`, `dkd_alpha`, `dkd_beta`, `standardize`; the defaults are kd_loss's: forward KL)."""

    divergence: str = "kl"
    beta: float = 0.5  # jsd: the teacher's weight in the mixture, in [0, 1]
    skew: float = 0.1  # skew_kl / skew_reverse_kl: lambda, in [0, 1)
    dkd_alpha: float = 1.0  # dkd: weight of the target-class term, >= 0
    dkd_beta: float = 8.0  # dkd: weight of the non-target term, >= 0
    standardize: bool = False  # z-score student and teacher logits before dividing by T

    def check(self, spell: Callable[[str], str] = lambda n: "--" + n.replace("_", "-")) -> None:
        """One ValueError line naming the option (`spell` turns a field into its name)."""
        check_choice(self.divergence, DIVERGENCES, spell("divergence"))
        check_unit(self.beta, spell("beta"))
        check_unit(self.skew, spell("skew"), closed=False)
        check_number(self.dkd_alpha, spell("dkd_alpha"))
        check_number(self.dkd_beta, spell("dkd_beta"))
        if not isinstance(self.standardize, bool):
            raise ValueError(
                f"{spell('standardize')} must be true or false, got {self.standardize!r}"
            )

    def used(self) -> LossSpec:
        """The same loss with the options its divergence ignores put back to their defaults
        (a kl run given beta=0.3 computes what kl computes)."""
        keep = set(DIVERGENCE_OPTIONS.get(self.divergence, ())) | {"divergence", "standardize"}
        default = LossSpec()
        return LossSpec(**{k: getattr(self if k in keep else default, k) for k in LOSS_OPTIONS})

    def is_default(self) -> bool:
        return self.used() == LossSpec()

    def key_inputs(self) -> dict[str, Any]:
        """What a run key adds for this loss: the used options that differ from the defaults
        ({} for forward KL, so that every run made before divergences existed keeps its key)."""
        used, default = self.used(), LossSpec()
        out = {k: getattr(used, k) for k in LOSS_OPTIONS if getattr(used, k) != getattr(default, k)}
        if out:
            out["divergence"] = used.divergence
        return out

    def kd_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of rbkd.ops.kd_loss."""
        return asdict(self)

    def describe(self) -> dict[str, Any]:
        """The divergence and the options it uses (what config.json and report.json record)."""
        used = self.used()
        names = ("divergence", *DIVERGENCE_OPTIONS.get(used.divergence, ()), "standardize")
        return {k: getattr(used, k) for k in names}

    def label(self) -> str:
        """'kl', 'jsd (beta=0.5)', 'dkd (dkd_alpha=1, dkd_beta=8), standardized': for titles."""
        used = self.used()
        opts = ", ".join(
            f"{k}={getattr(used, k):g}" for k in DIVERGENCE_OPTIONS.get(used.divergence, ())
        )
        text = f"{used.divergence} ({opts})" if opts else used.divergence
        return text + (", standardized" if used.standardize else "")

    def slug(self) -> str:
        """A folder-name part: '' for the default, else 'tvd', 'jsd-b0.9', 'dkd-a1-b8-std'."""
        if self.is_default():
            return ""
        used, short = self.used(), {"beta": "b", "skew": "l", "dkd_alpha": "a", "dkd_beta": "b"}
        parts = [used.divergence.replace("_", "")]
        default = LossSpec()
        parts += [
            f"{short[k]}{getattr(used, k):g}"
            for k in DIVERGENCE_OPTIONS.get(used.divergence, ())
            if getattr(used, k) != getattr(default, k)
        ]
        return "-".join(parts + (["std"] if used.standardize else []))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LossSpec:
        """From describe()'s record (None or {} is the default loss)."""
        return cls(**{k: v for k, v in (d or {}).items() if k in LOSS_OPTIONS})


def check_unit(value: Any, name: str, closed: bool = True) -> float:
    """A number in [0, 1] ([0, 1) when not `closed`)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and 0.0 <= value <= 1.0 and (closed or value < 1.0)):
        raise ValueError(f"{name} must be in [0, {'1]' if closed else '1)'}, got {value}")
    return float(value)


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
    loss: LossSpec = field(default_factory=LossSpec)  # the divergence (default: forward KL)
    # Pure distillation: the training loop never sees a label (each becomes kd_loss's
    # ignore_index), so alpha must be 1; --exclude-class / --per-class still choose by label.
    unlabelled: bool = False

    def check(self, *, source_given: bool = False, own_model: bool = False) -> None:
        """Reject bad combinations before any data is read (ValueError, one line).
        `source_given`: the soft labels are handed over (a study, the Python API), so naming
        their teacher run or file is optional; `own_model`: the student is the user's module."""
        given = [
            n
            for n, v in (
                ("--teacher", self.teacher),
                ("--soft-labels", self.soft_labels),
                ("--label-smoothing", self.label_smoothing),
            )
            if v is not None
        ]
        if len(given) != 1 and not (source_given and not given):
            raise ValueError(
                "give exactly one of --teacher RUN, --soft-labels FILE or --label-smoothing A"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        check_temperature(self.T)
        if self.label_smoothing is None:  # T is the distillation's; LS targets have none
            check_kd_temperature(self.T, "--T")
        check_alpha(self.alpha, "--alpha")
        self.check_loss()
        check_per_class(self.per_class, "--per-class")
        if self.label_smoothing is not None:
            check_label_smoothing(self.label_smoothing, "--label-smoothing")
            if self.per_class is not None and self.select == "entropy":
                raise ValueError(
                    "--select entropy ranks examples by a teacher's soft labels; with "
                    "--label-smoothing use --select random"
                )
        if not own_model:
            check_choice(self.student, STUDENTS, "--student")
        check_choice(self.select, SELECTIONS, "--select")
        if self.dataset is not None:
            check_choice(self.dataset, DATASETS, "--dataset")
        if self.noise is not None:
            parse_noise(self.noise)
        check_limit(self.limit, "--limit")
        if self.unlabelled:
            self.check_unlabelled()

    def check_unlabelled(self) -> None:
        """What an unlabelled transfer set cannot do: a CE term (alpha < 1), label smoothing
        (smoothed hard labels) and dkd (it splits off the target class)."""
        if self.alpha != 1:
            raise ValueError(
                f"--unlabelled distills on the teacher's soft labels alone, so --alpha (the soft "
                f"term's weight) must be 1, got {self.alpha:g}; drop --alpha or pass --alpha 1"
            )
        if self.label_smoothing is not None:
            raise ValueError(
                "--label-smoothing trains on smoothed hard labels, which --unlabelled hides; "
                "give a --teacher or --soft-labels instead"
            )
        if self.loss.divergence == "dkd":
            raise ValueError(
                "--divergence dkd splits off each example's target class, so it needs the "
                "labels that --unlabelled hides; choose another --divergence"
            )

    def check_loss(self, spell: Callable[[str], str] | None = None) -> None:
        """The divergence and its options (kd_loss's rules, before any data is read)."""
        spell = spell or (lambda n: "--" + n.replace("_", "-"))
        if not isinstance(self.loss, LossSpec):
            raise ValueError(f"loss must be an rbkd.config.LossSpec, got {self.loss!r}")
        self.loss.check(spell)
        if self.label_smoothing is not None and not self.loss.is_default():
            raise ValueError(
                f"{spell('divergence')} {self.loss.label()} applies to a teacher's soft labels; "
                "--label-smoothing trains on smoothed targets with forward KL only"
            )
        if self.noise is not None and self.loss.standardize:
            raise ValueError(
                f"{spell('standardize')} z-scores the teacher's logits, but --noise turns them "
                "into noisy probabilities; use one or the other"
            )

    def replace(self, **changes: Any) -> DistillSpec:
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_temperature(T: float, name: str = "T") -> float:
    ok = isinstance(T, numbers.Real) and not isinstance(T, bool)
    if not (ok and math.isfinite(T) and T > 0):
        raise ValueError(f"temperature {name} must be finite, and {name} must be > 0, got {T}")
    return float(T)


def check_kd_temperature(T: float, name: str = "T") -> float:
    """A temperature kd_loss can distill at: finite, > 0 and at most KD_MAX_TEMPERATURE (kd_loss's
    own limit, rbkd.ops.args: checked here so that a distillation is refused before it opens a
    run folder)."""
    T = check_temperature(T, name)
    if T > KD_MAX_TEMPERATURE:
        raise ValueError(
            f"{name} = {T:.15g} is above {KD_MAX_TEMPERATURE:g}, the largest temperature kd_loss "
            "computes accurately in float32; use a smaller T"
        )
    return T


# Noise in soft labels (thesis section 4.8): the spec a distillation is given; the engine draws
# it (rbkd.engine.noise.add_noise).
NOISE_KINDS = ("uniform", "normal")


def parse_noise(spec: str) -> tuple[str, float]:
    """Read a noise spec: "uniform:0.1" -> ("uniform", 0.1). ValueError with the accepted form otherwise."""
    kind, sep, value = spec.partition(":")
    kind = kind.strip().lower()
    try:
        scale = float(value)
    except ValueError:
        scale = float("nan")
    if kind not in NOISE_KINDS or not sep or not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"cannot read noise {spec!r}; write uniform:S or normal:S with a scale S > 0, "
            "e.g. uniform:0.1 or normal:0.01"
        )
    return kind, scale


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """The KL weight: a number in [0, 1]."""
    ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if not (ok and 0.0 <= alpha <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {alpha}")
    return float(alpha)


# ------------------------------------------------------------------ one rule per value
# Each rule takes the value and the name to blame (`--seed` on the command line, `seed` in the
# Python API, `FILE: seed` for a config file), returns the value as it is used, and raises one
# ValueError line otherwise. OPTION_RULES maps an option's name to its rule, for every caller.
MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence both take it


def _given(value: Any) -> str:
    return (
        f"{type(value).__name__} {value!r}" if not isinstance(value, (int, float)) else repr(value)
    )


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool, not 1.5) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {_given(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_number(value: Any, name: str, *, positive: bool = False) -> float:
    """A finite real number, > 0 when `positive`, else >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_given(value)}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def check_epochs(value: Any, name: str = "epochs", minimum: int = 1) -> int:
    return check_int(value, name, minimum)


def check_batch_size(value: Any, name: str = "batch_size") -> int:
    return check_int(value, name, 1)


def check_seed(value: Any, name: str = "seed") -> int:
    return check_int(value, name, 0, MAX_SEED)


def check_lr(value: Any, name: str = "lr") -> float:
    return check_number(value, name, positive=True)


def check_limit(value: Any, name: str = "limit") -> int | None:
    return None if value is None else check_int(value, name, 1)


def check_per_class(value: Any, name: str = "per_class") -> int | None:
    return None if value is None else check_int(value, name, 1)


def check_label_smoothing(value: Any, name: str = "label_smoothing") -> float | None:
    """The label-smoothing weight A of (1-A)*onehot + A/C: in (0, 1)."""
    if value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and 0.0 < value < 1.0):
        raise ValueError(f"{name} A must be in (0, 1), got {value}")
    return float(value)


OPTION_RULES: dict[str, Callable[[Any, str], Any]] = {
    "epochs": check_epochs,
    "batch_size": check_batch_size,
    "eval_batch_size": check_batch_size,
    "lr": check_lr,
    "momentum": check_number,
    "weight_decay": check_number,
    "seed": check_seed,
    "limit": check_limit,
    "per_class": check_per_class,
    "label_smoothing": check_label_smoothing,
    "alpha": check_alpha,
    "T": check_temperature,
}


def check_options(values: dict[str, Any], spell: Callable[[str], str] = str) -> dict[str, Any]:
    """`values` ({option name: value}) with every value that has a rule checked; `spell` turns
    an option's name into what the message blames (`lambda n: "--" + n.replace("_", "-")`)."""
    return {k: OPTION_RULES[k](v, spell(k)) if k in OPTION_RULES else v for k, v in values.items()}
