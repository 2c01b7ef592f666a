"""The soft labels a distillation learns from: a teacher run's, or a file's, fitted to the data.

Fitting drops the rows past the end of a split cut with --limit. A file that covers only part
of the split is an error unless asked for (`allow_partial`): a 2,000-row file must not quietly
become a 2,000-example transfer set when the user meant the whole split.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from rbkd.config import DistillSpec
from rbkd.engine import load_run, predict_logits, read_config, resolve_device
from rbkd.soft_label_file import (
    TEST_FILE,
    TRAIN_FILE,
    SoftLabels,
    SoftLabelsError,
    check_matches_dataset,
    read_soft_labels,
    read_teacher_soft_labels,
    sha256_file,
    teacher_id,
)


def soft_labels_digest(soft: SoftLabels) -> str:
    """SHA-256 of what a student learns from: the logits and the rows they belong to (not the
    file's metadata, so rewriting the same soft labels keeps every student's key)."""
    digest = hashlib.sha256()
    for t in (soft.logits.float(), soft.indices.long()):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def source_dataset(teacher: Path | None, soft_labels: Path | None) -> str:
    """The dataset a teacher run or a soft-label file was made on."""
    if teacher is not None:
        return str(read_config(Path(teacher))["dataset"])
    if soft_labels is not None:
        return read_soft_labels(soft_labels).dataset
    raise ValueError("no teacher given")


def fit_to_dataset(soft: SoftLabels, dataset, *, allow_partial: bool = False) -> SoftLabels:
    """Drop the rows past the end of `dataset` (a split cut with --limit), check that the rest
    belongs to it, and refuse soft labels that miss some of its examples unless allowed."""
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
    covered = int(torch.unique(soft.indices).numel())
    if covered < len(dataset) and not allow_partial:
        raise SoftLabelsError(
            f"soft-label file {soft.path}: covers {covered} of the {len(dataset)} examples "
            f"of the {dataset.split} split; pass --limit {covered} if it holds the first "
            f"{covered}, or --allow-partial to distill on the rows it has"
        )
    return soft


def teacher_soft_labels(
    teacher: Path, split: str, dataset, *, device: str = "cpu", allow_partial: bool = False
) -> SoftLabels:
    """A teacher run's soft labels for `split`: its saved file (checked against the run's
    weights), or, for a run made without one, the logits computed now from model.safetensors."""
    teacher = Path(teacher)
    read_config(teacher)  # a clear error if this is not a run folder
    path = teacher / (TRAIN_FILE if split == "train" else TEST_FILE)
    if path.exists():  # checked against the run's weights: never stale or foreign labels
        soft = read_teacher_soft_labels(teacher, split)
        return fit_to_dataset(soft, dataset, allow_partial=allow_partial)
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


def train_soft_labels(spec: DistillSpec, train, *, device: str = "cpu") -> SoftLabels:
    """The train-split soft labels named by `spec` (--teacher RUN or --soft-labels FILE)."""
    if spec.teacher is not None:
        return teacher_soft_labels(
            spec.teacher, "train", train, device=device, allow_partial=spec.allow_partial
        )
    soft = read_soft_labels(spec.soft_labels)
    if soft.split != "train":
        raise SoftLabelsError(
            f"soft-label file {spec.soft_labels}: holds the {soft.split} split; distillation "
            "needs the train split (`rbkd soft-labels --teacher RUN --split train`)"
        )
    return fit_to_dataset(soft, train, allow_partial=spec.allow_partial)
