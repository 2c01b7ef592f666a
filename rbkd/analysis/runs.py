"""The two runs every experiment is made of: train a teacher, distill a student.

Thin glue over `rbkd.data`, `rbkd.models`, `rbkd.engine` and `rbkd.softlabels`, shared by the
CLI commands and the experiment loops so that both do exactly the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rbkd.analysis.entropy import check_temperature, entropy_at, label_smoothing_targets
from rbkd.analysis.files import write_json
from rbkd.analysis.transfer import SELECTIONS, TransferSet, check_classes, select_transfer_set
from rbkd.engine.noise import parse_noise
from rbkd.softlabels import (
    TEST_FILE,
    TRAIN_FILE,
    SoftLabels,
    SoftLabelsError,
    check_matches_dataset,
    read_soft_labels,
    sha256_file,
    soft_labels_from_model,
    teacher_id,
)

TEACHERS = ("small", "large")
STUDENTS = ("general", "baseline")
REPORT_FILE = "report.json"


# ------------------------------------------------------------------ data and folders
def limit_dataset(dataset, limit: int | None):
    """The first `limit` examples of a split. A prefix keeps every index equal to its index in
    the full split, so soft labels made on it still match the full split."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return dataclasses.replace(
        dataset, images=dataset.images[:limit], labels=dataset.labels[:limit]
    )


def load_splits(dataset: str, data_dir: Path | None = None, limit: int | None = None):
    """(train, test) ImageDatasets, each cut to its first `limit` examples when given."""
    from rbkd.data import load_dataset

    train = load_dataset(dataset, "train", data_dir)
    test = load_dataset(dataset, "test", data_dir)
    return limit_dataset(train, limit), limit_dataset(test, limit)


def unique_dir(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... : the first name not taken yet."""
    if not base.exists():
        return base
    i = 2
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


def _fmt(x: float) -> str:
    return f"{x:g}"


# ------------------------------------------------------------------ teacher
def train_teacher(
    *,
    dataset: str,
    capacity: str,
    cfg,
    out: Path | None = None,
    data_dir: Path | None = None,
    limit: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a thesis teacher on hard labels (`rbkd.engine.fit` + CrossEntropy) and write the
    soft labels of both splits into its run folder. Returns the final metrics and paths."""
    from rbkd.engine import CrossEntropy, fit
    from rbkd.models import build_model

    if capacity not in TEACHERS:
        raise ValueError(f"--capacity must be one of {', '.join(TEACHERS)}, got {capacity!r}")
    train, test = load_splits(dataset, data_dir, limit)
    if out is None:
        base = Path("runs") / (
            f"teacher-{dataset}-{capacity}-b{cfg.batch_size}-e{cfg.epochs}-s{cfg.seed}"
        )
        out = base if resume else unique_dir(base)
    model = build_model(dataset, capacity, seed=cfg.seed)
    extra = {"command": "train-teacher", "capacity": capacity, "limit": limit}
    metrics = fit(
        model,
        train,
        test,
        cfg,
        CrossEntropy(),
        run_dir=out,
        resume=resume,
        progress=progress,
        extra_config=extra,
    )
    files = {}
    for split, ds, name in (("train", train, TRAIN_FILE), ("test", test, TEST_FILE)):
        files[split] = soft_labels_from_model(
            model,
            ds,
            out / name,
            teacher_run=out,
            split=split,
            device=cfg.device,
            batch_size=cfg.eval_batch_size,
        )
    return {"run_dir": out, "metrics": metrics, "soft_labels": files}


def teacher_soft_labels(teacher: Path, split: str, dataset, *, device: str = "cpu") -> SoftLabels:
    """A teacher run's soft labels for `split`: its saved file, or (for a run made without one)
    the logits computed now from model.safetensors."""
    from rbkd.engine import load_run, predict_logits, read_config, resolve_device

    teacher = Path(teacher)
    read_config(teacher)  # a clear error if this is not a run folder
    path = teacher / (TRAIN_FILE if split == "train" else TEST_FILE)
    if path.exists():
        return fit_to_dataset(read_soft_labels(path), dataset)
    model, _ = load_run(teacher)
    logits = predict_logits(model, dataset, device=resolve_device(device))
    labels = dataset.labels.clone()
    meta = {
        "dataset": dataset.name,
        "split": split,
        "num_classes": str(dataset.num_classes),
        "teacher": teacher_id(teacher, sha256_file(teacher / "model.safetensors")),
    }
    return SoftLabels(logits.float(), labels, torch.arange(len(labels)), meta, None)


def fit_to_dataset(soft: SoftLabels, dataset) -> SoftLabels:
    """Drop the rows past the end of `dataset` (a split cut with --limit), then check that the
    rest belongs to it (`check_matches_dataset`)."""
    keep = soft.indices < len(dataset)
    if not bool(keep.all()):
        soft = dataclasses.replace(
            soft, logits=soft.logits[keep], labels=soft.labels[keep], indices=soft.indices[keep]
        )
    if len(soft) == 0:
        raise SoftLabelsError(
            f"soft-label file {soft.path}: none of its rows fall in the first {len(dataset)} "
            "examples of the split; use a larger --limit"
        )
    check_matches_dataset(soft, dataset)
    return soft


def source_dataset(teacher: Path | None, soft_labels: Path | None) -> str:
    """The dataset a teacher run or a soft-label file was made on."""
    if teacher is not None:
        from rbkd.engine import read_config

        return str(read_config(Path(teacher))["dataset"])
    if soft_labels is not None:
        return read_soft_labels(soft_labels).dataset
    raise ValueError("no teacher given")


# ------------------------------------------------------------------ distillation
@dataclass
class DistillSpec:
    """Everything that defines one distillation run (besides the TrainConfig)."""

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
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
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
        if self.student not in STUDENTS:
            raise ValueError(
                f"--student must be one of {', '.join(STUDENTS)}, got {self.student!r}"
            )
        if self.select not in SELECTIONS:
            raise ValueError(
                f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}"
            )
        if self.noise is not None:
            parse_noise(self.noise)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def default_student_dir(spec: DistillSpec, dataset: str, cfg) -> Path:
    if spec.label_smoothing is not None:
        what = f"ls{_fmt(spec.label_smoothing)}"
    else:
        what = f"T{_fmt(spec.T)}"
    parts = [f"student-{dataset}-{spec.student}-{what}"]
    if spec.exclude_classes:
        parts.append("x" + "_".join(map(str, sorted(spec.exclude_classes))))
    if spec.per_class is not None:
        parts.append(f"{spec.select}{spec.per_class}")
    if spec.noise:
        parts.append(spec.noise.replace(":", ""))
    parts.append(f"e{cfg.epochs}-s{cfg.seed}")
    return unique_dir(Path("runs") / "-".join(parts))


def _excluded_accuracy(per_class: list[float], test_labels: torch.Tensor, classes: list[int]):
    counts = torch.bincount(test_labels.long(), minlength=len(per_class)).tolist()
    num = sum(
        per_class[k] * counts[k] for k in classes if counts[k] and not math.isnan(per_class[k])
    )
    den = sum(counts[k] for k in classes if counts[k])
    return num / den if den else math.nan


def distill(
    spec: DistillSpec,
    cfg,
    *,
    out: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    splits=None,
) -> dict[str, Any]:
    """Distill a student (or train it with LS) on the chosen transfer set; write its run folder
    with report.json (also merged into config.json as "report"); return that report.

    `splits` = (train, test) may be passed by loops that distill many students on the same data.
    """
    from rbkd.engine import Distillation, LabelSmoothing, fit
    from rbkd.models import build_model

    spec.check()
    if spec.label_smoothing is not None:
        dataset = spec.dataset or "fashion-mnist"
    else:
        dataset = source_dataset(spec.teacher, spec.soft_labels)
        if spec.dataset is not None and spec.dataset != dataset:
            raise ValueError(
                f"--dataset {spec.dataset} does not match the teacher's dataset {dataset}"
            )
    train, test = splits if splits is not None else load_splits(dataset, spec.data_dir, spec.limit)
    if train.name != dataset:
        raise ValueError(f"the training data is {train.name}, the soft labels are for {dataset}")
    c = train.num_classes
    excluded = check_classes(spec.exclude_classes, c)

    # The soft labels, aligned with the training split.
    soft: SoftLabels | None = None
    if spec.teacher is not None:
        soft = teacher_soft_labels(spec.teacher, "train", train, device=cfg.device)
    elif spec.soft_labels is not None:
        soft = read_soft_labels(spec.soft_labels)
        if soft.split != "train":
            raise SoftLabelsError(
                f"soft-label file {spec.soft_labels}: holds the {soft.split} split; distillation "
                "needs the train split (`rbkd soft-labels --teacher RUN --split train`)"
            )
        soft = fit_to_dataset(soft, train)

    if soft is not None:
        candidates, labels = soft.indices, soft.labels
        entropy = (
            entropy_at(soft.logits, spec.T)
            if spec.per_class is not None and spec.select == "entropy"
            else None
        )
    else:
        candidates, labels, entropy = torch.arange(len(train)), train.labels, None
    transfer: TransferSet = select_transfer_set(
        labels,
        num_classes=c,
        indices=candidates,
        exclude_classes=excluded,
        per_class=spec.per_class,
        select=spec.select,
        entropy=entropy,
        seed=cfg.seed,
    )

    if spec.label_smoothing is not None:
        A = spec.label_smoothing
        if spec.noise is None:
            objective = LabelSmoothing(A)
        else:  # LS targets as "logits" whose softmax at T=1 is the target: noise is then the
            # engine's own (thesis eq. 4.4, second line)
            targets = label_smoothing_targets(train.labels, c, A)
            objective = Distillation(
                targets.log(), T=1.0, alpha=1.0, t_squared=False, noise=spec.noise
            )
        source = {"kind": "label_smoothing", "A": A}
    else:
        table = torch.zeros(len(train), c, dtype=torch.float32)
        table[soft.indices] = soft.logits
        objective = Distillation(
            table, T=spec.T, alpha=spec.alpha, t_squared=spec.t_squared, noise=spec.noise
        )
        source = {
            "kind": "teacher",
            "teacher": soft.teacher,
            "soft_labels": str(soft.path) if soft.path else None,
            "soft_labels_sha256": sha256_file(soft.path) if soft.path else None,
        }

    if out is None:
        out = default_student_dir(spec, dataset, cfg)
    transfer_info = {
        "size": len(transfer),
        "per_class_counts": transfer.per_class_counts,
        "excluded_classes": excluded,
        "per_class": spec.per_class,
        "select": spec.select if spec.per_class is not None else "all",
        "short_classes": transfer.short_classes,
    }
    extra = {
        "command": "distill",
        "spec": spec.describe(),
        "source": source,
        "transfer": transfer_info,
    }
    model = build_model(dataset, spec.student, seed=cfg.seed)
    metrics = fit(
        model,
        train,
        test,
        cfg,
        objective,
        run_dir=out,
        indices=transfer.indices,
        resume=resume,
        progress=progress,
        extra_config=extra,
    )
    per_class = [float(a) for a in metrics["per_class_accuracy"]]
    report = {
        "run_dir": str(out),
        "dataset": dataset,
        "student": spec.student,
        "T": None if spec.label_smoothing is not None else spec.T,
        "label_smoothing": spec.label_smoothing,
        "noise": spec.noise,
        "source": source,
        "transfer": transfer_info,
        "test_accuracy": float(metrics["test_accuracy"]),
        "per_class_accuracy": per_class,
        "class_names": list(getattr(train, "class_names", ())),
        "excluded_accuracy": _excluded_accuracy(per_class, test.labels, excluded)
        if excluded
        else None,
        "excluded_per_class": {str(k): per_class[k] for k in excluded},
        "epochs": metrics.get("epochs"),
    }
    write_json(out / REPORT_FILE, report)
    config_path = out / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        config["report"] = report
        write_json(config_path, config)
    return report
