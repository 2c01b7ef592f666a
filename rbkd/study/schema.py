"""Study files: a TOML declaration of a whole study, read and checked before anything runs.

Every problem (an unknown key, a wrong type, an impossible value, a teacher name that does not
exist) is one `StudyFileError` line naming the file, the key and the reason. The schema with
examples is docs/studies.md; the checked study is a plain dict (saved as study.json).
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from rbkd.config import (
    DATASETS,
    DEFAULT_DATASET,
    DIVERGENCES,
    KD_MAX_TEMPERATURE,
    LOSS_OPTIONS,
    OPTIMIZERS,
    SELECTIONS,
    STUDENTS,
    TEACHERS,
    DistillSpec,
    LossSpec,
    TrainConfig,
    check_kd_temperature,
    parse_noise,
)
from rbkd.io import read_bounded

_TRAIN = TrainConfig()
_DISTILL = DistillSpec()
THESIS_T = (3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 20.0)  # the columns of tables 5.1-5.6
EXPERIMENTS = (  # in the order they are read: the others may name the batch sweep's teachers
    "batch_sweep",
    "missing_class",
    "transfer_set",
    "temperature",
    "noise",
    "entropy",
    "examples",
    "projection",
)


# Names (the study's, its teachers') become folder and file names ("results/<study>",
# "entropy_per_class_<teacher>.svg" and its ".<name>.XXXXXXXX.part" while written) and cells of
# report.md and results.csv: ASCII letters, digits, '-', '_' and '.', not starting with '.' or '-'
# (no path, no hidden file, no option, no control or bidi character, no spreadsheet formula), and
# short enough that every file name made from one stays far below the 255-byte limit.
MAX_NAME_CHARS = 100
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# Integers (seeds, sizes, counts) must fit the 64-bit integers that TOML, torch and JSON carry.
MAX_INT = 2**63 - 1
# The most runs a study may plan unless its [study] table raises `max_runs`: a typo in a grid
# (1000 seeds instead of 10) must be refused before it starts days of training.
DEFAULT_MAX_RUNS = 10_000
# Temperatures that a student distils at are bounded by kd_loss (rbkd.config).
KD_TEMPERATURE_EXPERIMENTS = ("missing_class", "transfer_set", "temperature", "noise")


class StudyFileError(ValueError):
    """A study file cannot be used; the message names the file, the key and the reason."""


class Study(dict):
    """A checked study: a plain dict (saved as study.json) that remembers the file it came from
    (`path`), so that problems found later, while planning, still name the file."""

    path: Path | None = None


def check_name(name: str, what: str = "name") -> str | None:
    """None when `name` is a safe study or teacher name, else the reason it is not."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long; the most is {MAX_NAME_CHARS}"
    if not _NAME.fullmatch(name):
        return (
            f"must be a plain name of ASCII letters, digits, '-', '_' and '.', not starting with "
            f"'.' or '-' (it names folders and files), got {name!r}"
        )
    return None


class _Reader:
    """Reads one table of the file, remembering the dotted key for messages."""

    def __init__(self, path: Path, table: dict, where: str):
        self.path, self.table, self.where = path, table, where

    def fail(self, key: str, reason: str) -> StudyFileError:
        dotted = f"{self.where}.{key}" if self.where else key
        return StudyFileError(f"{self.path}: {dotted}: {reason}")

    def known(self, *keys: str) -> None:
        unknown = sorted(set(self.table) - set(keys))
        if unknown:
            raise self.fail(unknown[0], f"unknown key; known keys here: {', '.join(keys)}")

    def get(self, key: str, kind: type | tuple, default: Any = None, required: bool = False):
        if key not in self.table:
            if required:
                raise self.fail(key, "missing (it is required)")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(key, f"must be {_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(key, f"must be {_names(kinds)}, got {type(value).__name__} {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise self.fail(key, f"{value} is out of range (at most {MAX_INT})")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {value}")
        return value

    def name(self, key: str) -> str:
        value = self.get(key, str, required=True)
        reason = check_name(value)
        if reason:
            raise self.fail(key, reason)
        return value

    def number_list(self, key: str, kind: type, default=None, *, low=None, positive=False):
        raw = self.table.get(key, default)
        if raw is None:
            return None
        values = raw if isinstance(raw, list) else [raw]
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self.fail(key, f"must be a {_names((kind,))} or a list of them, got {raw!r}")
            if kind is int and not (isinstance(v, int) or float(v).is_integer()):
                raise self.fail(key, f"must hold whole numbers, got {v!r}")
            if isinstance(v, int) and abs(v) > MAX_INT:
                raise self.fail(key, f"{v} is out of range (at most {MAX_INT})")
            v = kind(v)
            if not math.isfinite(v) or (positive and not v > 0) or (low is not None and v < low):
                bound = "> 0" if positive else f">= {low}"
                raise self.fail(key, f"every value must be {bound}, got {v!r}")
            out.append(v)
        if not out:
            raise self.fail(key, "must not be empty")
        if len(set(out)) != len(out):
            raise self.fail(key, f"repeats a value: {raw!r}")
        return out

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
        value = self.get(key, str, default)
        if value is not None and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def missing(self, key: str, hint: str = "it is required"):
        raise self.fail(key, f"missing ({hint})")

    def sub(self, key: str) -> _Reader | None:
        if key not in self.table:
            return None
        value = self.table[key]
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), got {type(value).__name__}")
        return _Reader(self.path, value, f"{self.where}.{key}" if self.where else key)


def _names(kinds: tuple) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    words.update({list: "a list", dict: "a table"})
    return " or ".join(words.get(k, k.__name__) for k in kinds)


def _train(r: _Reader, base: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, kind in (("epochs", int), ("batch_size", int), ("lr", float), ("seed", int)):
        value = r.get(key, kind)
        if value is not None:
            out[key] = value
    if "optimizer" in r.table:
        out["optimizer"] = r.choice("optimizer", OPTIMIZERS, None)
    if out["epochs"] < 1 or out["batch_size"] < 1:
        raise r.fail("epochs" if out["epochs"] < 1 else "batch_size", "must be >= 1")
    _check_lr(r, "lr", out["lr"])
    _check_seed(r, "seed", out["seed"])
    return out


def _check_lr(r: _Reader, key: str, lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise r.fail(key, f"must be a finite number > 0, got {lr}")


def _check_seed(r: _Reader, key: str, seed: int) -> None:
    if not 0 <= seed <= MAX_INT:
        raise r.fail(key, f"must be a whole number in 0..{MAX_INT}, got {seed}")


def _teacher(r: _Reader, defaults: dict) -> dict[str, Any]:
    name = r.name("name")
    if "run" in r.table:  # a teacher trained elsewhere: its run folder, used as it is
        r.known("name", "run")
        run = Path(r.get("run", str))
        return {"name": name, "run": str(run if run.is_absolute() else r.path.parent / run)}
    r.known("name", "capacity", "batch_size", "epochs", "lr", "optimizer", "seed", "run")
    return {
        "name": name,
        "capacity": r.choice("capacity", TEACHERS, None) or r.missing("capacity"),
        **_train(r, defaults),
    }


def _teacher_names(
    r: _Reader, known: list[str], own: list[str], key: str = "teachers"
) -> list[str]:
    """The experiment's teacher list, each a known name; default `own`, the study's own
    teachers (the batch sweep's are used only where named)."""
    names = r.get(key, list, None)
    if names is None:
        return list(own)
    for n in names:
        if n not in known:
            raise r.fail(key, f"no teacher named {n!r}; the study has {', '.join(known) or 'none'}")
    if not names:
        raise r.fail(key, "must not be empty")
    return names


def _temps(r: _Reader, key: str, default, *, kd: bool = False) -> list[float]:
    """Temperatures; `kd`: a student distils at them, so kd_loss's bound applies."""
    values = r.number_list(key, float, default, positive=True)
    if kd:
        for T in values:
            try:
                check_kd_temperature(T, "T")
            except ValueError as e:
                raise r.fail(key, f"{e} (at most {KD_MAX_TEMPERATURE:g})") from None
    return values


def _noise_specs(r: _Reader) -> list[str]:
    """The noise specs, each in one spelling ("normal:5e-2" is "normal:0.05"), each once: equal
    noises are one run, as equal temperatures are."""
    specs = r.get("noise", list, required=True)
    out: list[str] = []
    for spec in specs:
        if not isinstance(spec, str):
            raise r.fail("noise", f"must list strings like 'normal:0.05', got {spec!r}")
        try:
            kind, scale = parse_noise(spec)
        except ValueError as e:
            raise r.fail("noise", str(e)) from None
        text = repr(float(scale))
        text = text[:-2] if text.endswith(".0") else text
        canonical = f"{kind}:{text}"
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise r.fail("noise", "must not be empty")
    return out


def _smoothing(r: _Reader, key: str) -> list[float]:
    if r.table.get(key, []) == []:
        return []
    values = r.number_list(key, float, positive=True)
    bad = [a for a in values if not a < 1]
    if bad:
        raise r.fail(key, f"label-smoothing factors must be in (0, 1), got {bad[0]}")
    return values


def _classes(r: _Reader, num_classes: int) -> list[int]:
    raw = r.table.get("classes", "all")
    if raw == "all":
        return list(range(num_classes))
    classes = r.number_list("classes", int, low=0)
    bad = [k for k in classes if k >= num_classes]
    if bad:
        raise r.fail("classes", f"class {bad[0]} does not exist; classes are 0..{num_classes - 1}")
    return classes


def _bools(r: _Reader, key: str, default: bool) -> list[bool]:
    raw = r.table.get(key, default)
    values = raw if isinstance(raw, list) else [raw]
    if (
        not values
        or not all(isinstance(v, bool) for v in values)
        or len(set(values)) != len(values)
    ):
        raise r.fail(key, f"must be true, false or a list of both, got {raw!r}")
    return values


STUDENT_KEYS = ("seeds", "t_squared", "transfer_labels", *LOSS_OPTIONS)
# Whether a student's training loop sees the transfer set's labels: "unlabelled" is pure
# distillation (alpha 1, every label hidden; rbkd distill --unlabelled), a grid dimension.
TRANSFER_LABELS = ("labelled", "unlabelled")
_LOSS = LossSpec()


def _transfer_labels(r: _Reader, default: list[str]) -> list[str]:
    raw = r.table.get("transfer_labels", default)
    values = raw if isinstance(raw, list) else [raw]
    if (
        not values
        or not all(isinstance(v, str) and v in TRANSFER_LABELS for v in values)
        or len(set(values)) != len(values)
    ):
        raise r.fail(
            "transfer_labels",
            f'must be "labelled", "unlabelled" or a list of both, got {raw!r}',
        )
    return list(values)


def _divergences(r: _Reader, default: list[str]) -> list[str]:
    raw = r.table.get("divergence", default)
    values = raw if isinstance(raw, list) else [raw]
    for v in values:
        if not isinstance(v, str) or v not in DIVERGENCES:
            raise r.fail(
                "divergence",
                f"must be one of {', '.join(DIVERGENCES)} (or a list of them), got {v!r}",
            )
    if not values:
        raise r.fail("divergence", "must not be empty")
    if len(set(values)) != len(values):
        raise r.fail("divergence", f"repeats a value: {raw!r}")
    return list(values)


def _loss_options(r: _Reader, defaults: dict[str, list]) -> dict[str, list]:
    """The divergences and their options (each a value or a list: a grid dimension), checked
    as kd_loss checks them: beta in [0, 1], skew in [0, 1), the DKD weights >= 0."""
    out = {"divergence": _divergences(r, defaults["divergence"])}
    for key in ("beta", "skew", "dkd_alpha", "dkd_beta"):
        values = r.number_list(key, float, defaults[key], low=0)
        if key == "beta" and any(v > 1 for v in values):
            raise r.fail(key, f"jsd's beta must be in [0, 1], got {max(values)!r}")
        if key == "skew" and any(v >= 1 for v in values):
            raise r.fail(key, f"the skew lambda must be in [0, 1), got {max(values)!r}")
        out[key] = values
    out["standardize"] = _bools(r, "standardize", defaults["standardize"])
    return out


def _default_loss_options() -> dict[str, list]:
    return {k: [getattr(_LOSS, k)] for k in LOSS_OPTIONS}


def _seeds(r: _Reader, key: str, default: list[int]) -> list[int]:
    seeds = r.number_list(key, int, default, low=0)
    for seed in seeds:
        _check_seed(r, key, seed)
    return seeds


def _student_common(r: _Reader, study: dict) -> dict[str, Any]:
    """Keys every student experiment takes: its own seeds, t_squared values and divergences."""
    return {
        "seeds": _seeds(r, "seeds", study["seeds"]),
        "t_squared": _bools(r, "t_squared", study["loss"]["t_squared"]),
        "transfer_labels": _transfer_labels(r, study["loss"]["transfer_labels"]),
        **_loss_options(r, {k: study["loss"][k] for k in LOSS_OPTIONS}),
    }


def _experiment(name: str, r: _Reader, study: dict) -> dict[str, Any]:
    out = _experiment_grid(name, r, study)
    if name in ("missing_class", "transfer_set", "temperature", "noise"):
        out.update(_student_common(r, study))
    if name == "noise" and True in out["standardize"]:
        own = "standardize" in r.table
        where = r if own else _Reader(r.path, {}, "loss")
        raise where.fail(
            "standardize",
            "standardize z-scores the teacher's logits, but the noise experiment's targets are "
            "noisy probabilities"
            + ("" if own else "; set standardize = false in [experiments.noise]"),
        )
    if "unlabelled" in out.get("transfer_labels", ()) and "dkd" in out["divergence"]:
        own = "divergence" in r.table or "transfer_labels" in r.table
        where = r if own else _Reader(r.path, {}, "loss")
        raise where.fail(
            "transfer_labels",
            "divergence dkd splits off each example's target class, so it needs the labels "
            'that "unlabelled" hides; drop one of them',
        )
    return out


def sweep_names(sweep: dict) -> list[str]:
    """The names of the batch sweep's teachers: "{capacity}-b{batch}-e{epochs}"."""
    return [f"{sweep['capacity']}-b{b}-e{e}" for e in sweep["epochs"] for b in sweep["batch_sizes"]]


def _experiment_grid(name: str, r: _Reader, study: dict) -> dict[str, Any]:
    # experiments may name the study's teachers and the batch sweep's (parsed first)
    own = [t["name"] for t in study["teachers"]]
    teachers = list(own)
    if "batch_sweep" in study["experiments"]:
        teachers += [
            n for n in sweep_names(study["experiments"]["batch_sweep"]) if n not in teachers
        ]
    loss_T = study["loss"]["T"]
    student_epochs = study["student"]["epochs"]
    if name == "missing_class":
        r.known("teachers", "student", "classes", "T", "label_smoothing", "epochs", *STUDENT_KEYS)
        return {
            "teachers": _teacher_names(r, teachers, own),
            "student": r.choice("student", STUDENTS, "general"),
            "classes": _classes(r, 10),
            "T": _temps(r, "T", loss_T, kd=True),
            "label_smoothing": _smoothing(r, "label_smoothing"),
            "epochs": r.number_list("epochs", int, [student_epochs], low=1)[0],
        }
    if name == "transfer_set":
        r.known("teachers", "student", "per_class", "select", "T", "epochs", *STUDENT_KEYS)
        select = r.get("select", (list, str), ["entropy", "random"])
        select = [select] if isinstance(select, str) else select
        bad = [s for s in select if s not in SELECTIONS]
        if bad or not select:
            raise r.fail("select", f"must list {' and/or '.join(SELECTIONS)}, got {select!r}")
        return {
            "teachers": _teacher_names(r, teachers, own),
            "student": r.choice("student", STUDENTS, "general"),
            "per_class": r.number_list("per_class", int, [10, 50, 100], low=1),
            "select": select,
            "T": _temps(r, "T", [_DISTILL.T], kd=True),
            "epochs": r.number_list("epochs", int, [student_epochs], low=1)[0],
        }
    if name == "temperature":
        r.known("teachers", "student", "T", "epochs", *STUDENT_KEYS)
        return {
            "teachers": _teacher_names(r, teachers, own),
            "student": r.choice("student", STUDENTS, "baseline"),
            "T": _temps(r, "T", loss_T, kd=True),
            "epochs": r.number_list("epochs", int, [student_epochs], low=1)[0],
        }
    if name == "batch_sweep":
        r.known("capacity", "batch_sizes", "epochs", "lr", "optimizer", "seed", "T")
        base = _train(_Reader(r.path, {}, r.where), study["teacher_defaults"])
        lr, seed = r.get("lr", float, base["lr"]), r.get("seed", int, base["seed"])
        _check_lr(r, "lr", lr)
        _check_seed(r, "seed", seed)
        return {
            "capacity": r.choice("capacity", TEACHERS, "large"),
            "batch_sizes": r.number_list("batch_sizes", int, None, low=1)
            or r.missing("batch_sizes"),
            "epochs": r.number_list("epochs", int, [base["epochs"]], low=1),
            "lr": lr,
            "optimizer": r.choice("optimizer", OPTIMIZERS, base["optimizer"]),
            "seed": seed,
            "T": _temps(r, "T", [_DISTILL.T])[0],
        }
    if name == "noise":
        r.known("teachers", "student", "noise", "T", "label_smoothing", "epochs", *STUDENT_KEYS)
        return {
            "teachers": _teacher_names(r, teachers, own),
            "student": r.choice("student", STUDENTS, "general"),
            "noise": _noise_specs(r),
            "T": _temps(r, "T", [_DISTILL.T], kd=True),
            "label_smoothing": _smoothing(r, "label_smoothing"),
            "epochs": r.number_list("epochs", int, [student_epochs], low=1)[0],
        }
    if name == "entropy":
        r.known("T", "label_smoothing")
        return {
            "T": _temps(r, "T", [float(t) for t in range(1, 21)]),
            "label_smoothing": _smoothing(r, "label_smoothing") or [0.1, 0.3, 0.5, 0.7, 0.9],
        }
    if name == "examples":
        r.known("teachers", "T", "count")
        return {
            "teachers": _teacher_names(r, teachers, own),
            "T": _temps(r, "T", [_DISTILL.T])[0],
            "count": r.number_list("count", int, [10], low=1)[0],
        }
    r.known("teachers", "classes", "per_class")  # projection
    classes = r.number_list("classes", int, [0, 2, 4], low=0)
    if len(classes) != 3 or max(classes) >= 10:
        raise r.fail("classes", f"must name three classes in 0..9, got {classes}")
    return {
        "teachers": _teacher_names(r, teachers, own),
        "classes": classes,
        "per_class": r.number_list("per_class", int, [100], low=1)[0],
    }


def parse_study(data: dict, path: Path) -> dict[str, Any]:
    """Check a study's TOML content and return the normalised study (see docs/studies.md)."""
    from rbkd.study.lm_schema import is_lm_study, parse_lm_study  # here: it imports this module

    if is_lm_study(data):  # [study] kind = "lm": a language-model study (docs/studies.md)
        return parse_lm_study(data, path)
    top = _Reader(path, data, "")
    top.known("study", "loss", "student", "teacher_defaults", "teacher", "experiments")
    head = top.sub("study") or top.missing("study", "the [study] table names the study")
    head.known("name", "dataset", "description", "limit", "seeds", "max_runs")
    name = head.name("name")
    limit = head.get("limit", int)
    if limit is not None and limit < 1:
        raise head.fail("limit", f"must be >= 1, got {limit}")
    max_runs = head.get("max_runs", int, DEFAULT_MAX_RUNS)
    if max_runs < 1:
        raise head.fail("max_runs", f"must be >= 1, got {max_runs}")
    study = Study(
        name=name,
        dataset=head.choice("dataset", DATASETS, DEFAULT_DATASET),
        description=head.get("description", str, ""),
        limit=limit,
        seeds=_seeds(head, "seeds", [0]),
    )
    study.path = path
    loss = top.sub("loss") or _Reader(path, {}, "loss")
    loss.known("T", "alpha", "t_squared", "transfer_labels", *LOSS_OPTIONS)
    alpha = loss.get("alpha", float, _DISTILL.alpha)
    if not 0.0 <= alpha <= 1.0:
        raise loss.fail("alpha", f"must be in [0, 1], got {alpha}")
    study["loss"] = {
        "T": _temps(loss, "T", list(THESIS_T), kd=True),
        "alpha": alpha,
        "t_squared": loss.get("t_squared", bool, _DISTILL.t_squared),
        "transfer_labels": _transfer_labels(loss, ["labelled"]),
        **_loss_options(loss, _default_loss_options()),
    }
    base = {k: getattr(_TRAIN, k) for k in ("epochs", "batch_size", "lr", "optimizer", "seed")}
    student = top.sub("student") or _Reader(path, {}, "student")
    student.known("epochs", "batch_size", "lr", "optimizer")
    study["student"] = _train(student, base)
    tdefaults = top.sub("teacher_defaults") or _Reader(path, {}, "teacher_defaults")
    tdefaults.known("batch_size", "epochs", "lr", "optimizer", "seed")
    study["teacher_defaults"] = _train(tdefaults, base)
    raw_teachers = top.get("teacher", list, [])
    teachers = []
    for i, table in enumerate(raw_teachers):
        if not isinstance(table, dict):
            raise top.fail(f"teacher[{i}]", "must be a table ([[teacher]])")
        teachers.append(_teacher(_Reader(path, table, f"teacher[{i}]"), study["teacher_defaults"]))
    names = [t["name"] for t in teachers]
    dup = [n for n in names if names.count(n) > 1]
    if dup:
        raise top.fail("teacher", f"two teachers are named {dup[0]!r}; names must differ")
    study["teachers"] = teachers
    experiments = top.sub("experiments") or top.missing(
        "experiments", "declare at least one, e.g. [experiments.missing_class]"
    )
    experiments.known(*EXPERIMENTS)
    study["experiments"] = {}
    for name in EXPERIMENTS:
        r = experiments.sub(name)
        if r is not None:
            study["experiments"][name] = _experiment(name, r, study)
    if not study["experiments"]:
        raise experiments.fail(EXPERIMENTS[0], "no experiment declared")
    for name, e in study["experiments"].items():
        if "teachers" in e and not e["teachers"] and not e.get("label_smoothing"):
            raise top.fail("teacher", f"experiments.{name} needs at least one [[teacher]]")
    _check_size(study, head, max_runs)
    return study


def _check_size(study: dict, head: _Reader, max_runs: int) -> None:
    """Refuse a grid of more than `max_runs` runs, counted without expanding it."""
    # Here, not at the top: rbkd.study.plan imports this module (StudyFileError), a cycle.
    from rbkd.study.plan import count_runs

    teachers, students = count_runs(study)
    n = teachers + students
    if n > max_runs:
        default = " (the default)" if "max_runs" not in head.table else ""
        raise head.fail(
            "max_runs",
            f"the study plans {n:,} runs ({teachers:,} teacher and {students:,} student runs), more "
            f"than max_runs = {max_runs:,}{default}; shrink the grid (seeds, T, classes, "
            f"teachers) or set max_runs = {n} in [study] if you mean it",
        )


def load_study(path: str | Path) -> dict[str, Any]:
    """Read and check a study file (TOML); StudyFileError on any problem."""
    path = Path(path)
    if not path.exists():
        raise StudyFileError(f"{path}: no such study file (see studies/ for examples)")
    try:
        text = read_bounded(path, 1 << 20, "study file").decode()
    except ValueError as e:  # not a regular file, or over 1 MiB (a study is a few dozen lines)
        raise StudyFileError(str(e)) from None
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StudyFileError(f"{path}: not valid TOML ({e})") from None
    return parse_study(data, path)
