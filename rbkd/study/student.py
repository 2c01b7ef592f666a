"""Distill a student, once: a content-addressed run folder with report.json. The one
implementation of the verb: `rbkd distill`, `rbkd experiment`, a study's students and
`rbkd.distill`.

The key hashes the data, the targets (the teacher's soft-label tensors, or label smoothing's A),
the student, the loss convention (the divergence only when it is not forward KL), the transfer set's definition and the training inputs. The
same distillation asked for again reuses the finished run; a killed one resumes from its epoch
checkpoint; a folder that holds another run is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from rbkd.analysis.entropy import entropy_at, label_smoothing_targets
from rbkd.analysis.transfer import check_classes, select_transfer_set
from rbkd.config import DEFAULT_DATASET, DistillSpec, TrainConfig
from rbkd.data.adapters import IGNORE_INDEX
from rbkd.engine import Distillation, LabelSmoothing, fit, read_config
from rbkd.engine.distributed import main_folder_lock, on_main, setup
from rbkd.engine.rundir import check_run_folder
from rbkd.io import write_json
from rbkd.provenance import distill_command, recording
from rbkd.study.keys import data_fingerprint, student_dir_name, student_key
from rbkd.study.runstate import RunState, run_state
from rbkd.study.soft_label_source import soft_labels_digest, source_dataset, train_soft_labels
from rbkd.study.splits import load_splits
from rbkd.study.teacher import model_identity, repeat_record, split_limit

REPORT_FILE = "report.json"


def _excluded_accuracy(per_class: list[float], test_labels: torch.Tensor, classes: list[int]):
    counts = torch.bincount(test_labels.long(), minlength=len(per_class)).tolist()
    num = sum(
        per_class[k] * counts[k] for k in classes if counts[k] and not math.isnan(per_class[k])
    )
    den = sum(counts[k] for k in classes if counts[k])
    return num / den if den else math.nan


def _objective(spec: DistillSpec, soft, train):
    c = train.num_classes
    if spec.label_smoothing is None:
        table = torch.zeros(len(train), c, dtype=torch.float32)
        table[soft.indices] = soft.logits
        return Distillation(
            table,
            T=spec.T,
            alpha=spec.alpha,
            t_squared=spec.t_squared,
            noise=spec.noise,
            loss=spec.loss,
        )
    if spec.noise is None:
        return LabelSmoothing(spec.label_smoothing)
    # LS targets as "logits" whose softmax at T=1 is the target: the noise is then the engine's
    # own (thesis eq. 4.4, second line)
    targets = label_smoothing_targets(train.labels, c, spec.label_smoothing)
    return Distillation(targets.log(), T=1.0, alpha=1.0, t_squared=False, noise=spec.noise)


def _transfer_set(spec: DistillSpec, soft, train, seed: int):
    excluded = check_classes(spec.exclude_classes, train.num_classes)
    if soft is not None:
        candidates, labels = soft.indices, soft.labels
        ranked = spec.per_class is not None and spec.select == "entropy"
        entropy = entropy_at(soft.logits, spec.T) if ranked else None
    else:
        candidates, labels, entropy = torch.arange(len(train)), train.labels, None
    return select_transfer_set(
        labels,
        num_classes=train.num_classes,
        indices=candidates,
        exclude_classes=excluded,
        per_class=spec.per_class,
        select=spec.select,
        entropy=entropy,
        seed=seed,
    )


def _without_labels(train):
    """The training split as the loop of an unlabelled distillation sees it: every label
    kd_loss's ignore_index, so that no loss, metric or check can read one. Called after the
    transfer set is chosen: --exclude-class and --per-class pick examples by their label first."""
    return dataclasses.replace(train, labels=torch.full_like(train.labels, IGNORE_INDEX))


def distill(
    spec: DistillSpec,
    cfg: TrainConfig,
    *,
    out: Path | None = None,
    root: Path | None = Path("runs"),
    progress: bool = True,
    splits=None,
    soft=None,
    source_id: dict | None = None,
    model=None,
    resume: bool | None = None,
    on_epoch=None,
    callbacks=(),
    extra: dict | None = None,
    invocation: dict | None = None,
) -> dict[str, Any]:
    """Distill (or reuse, or resume) a student: the one implementation behind `rbkd distill`,
    the `rbkd experiment` commands, a study's students and `rbkd.distill`. Returns its report
    (also in report.json), with `reused` True when nothing was trained.

    `splits` = (train, test) and `soft` (the train split's SoftLabels) may be passed by loops
    that distill many students from the same data and teacher, and by the Python API. `source_id`
    replaces the digest of the soft labels in the key: a study names a teacher by its own key, so
    that a student's key is known before its teacher has trained (and a dry run can say what is
    done). `model`: a module of the user's own (default: rbkd's `spec.student`). `out`, `root`,
    `resume`, `invocation`, `on_epoch` and `callbacks` as rbkd.study.teacher.train_teacher's.
    """
    own_model = model is not None and (getattr(model, "arch", None) != spec.student)
    spec.check(source_given=soft is not None, own_model=own_model)
    if spec.label_smoothing is not None:
        dataset = spec.dataset or DEFAULT_DATASET
    elif spec.teacher is not None or spec.soft_labels is not None:
        dataset = source_dataset(spec.teacher, spec.soft_labels)
        if spec.dataset is not None and spec.dataset != dataset:
            raise ValueError(
                f"--dataset {spec.dataset} does not match the teacher's dataset {dataset}"
            )
    else:  # soft labels handed over (the Python API): the data's own name
        dataset = splits[0].name
    if splits is None and spec.teacher is not None and spec.limit is None:
        spec = spec.replace(limit=teacher_limit(spec.teacher))  # the teacher's --limit N
    train, test = splits if splits is not None else load_splits(dataset, spec.data_dir, spec.limit)
    if train.name != dataset:
        raise ValueError(f"the training data is {train.name}, the soft labels are for {dataset}")

    if spec.label_smoothing is None and soft is None:
        soft = train_soft_labels(spec, train)
    if soft is not None:
        source = {
            "kind": "teacher",
            "teacher": soft.teacher,
            "soft_labels": str(soft.path) if soft.path else None,
        }
        source_digest = {"soft_labels": soft_labels_digest(soft)}
    else:
        source = {"kind": "label_smoothing", "A": spec.label_smoothing}
        source_digest = {"label_smoothing": spec.label_smoothing}

    fingerprint = data_fingerprint(train, test)
    model, model_id = model_identity(model, dataset, spec.student, cfg.seed)
    key = student_key(spec, cfg, fingerprint, source_id or source_digest, model_id)
    if out is not None:
        run_dir = Path(out)
    elif root is not None and model_id is None:
        run_dir = Path(root) / student_dir_name(spec, dataset, cfg, key)
    else:
        run_dir = None
    rbkd_files, cut = split_limit(train, test)
    named_source = spec.teacher is not None or soft is None or soft.path is not None
    if model_id is None and rbkd_files and named_source:  # the same run as `rbkd distill`
        command = distill_command(
            spec.replace(limit=cut),
            cfg,
            data_dir=train.root,
            out=run_dir,
            soft_labels=None if soft is None else soft.path,
        )
        invocation = repeat_record(invocation, command)
    # Under torchrun every rank runs this; rank 0 alone locks the folder and writes in it, and
    # hands the others what it found and wrote, so that all take the same path.
    lock = (
        main_folder_lock(run_dir, "distillation", cfg.device, claim=check_run_folder)
        if run_dir is not None
        else _no_folder(cfg.device)
    )
    with lock as ctx:
        if run_dir is not None and resume is None:
            state = on_main(ctx, lambda: run_state(run_dir, key, REPORT_FILE))
        else:
            state = RunState(run_dir, key, "new")
        if state.status == "done":
            return {**state.result, "run_dir": str(run_dir), "reused": True}
        t0 = time.perf_counter()
        transfer = _transfer_set(spec, soft, train, cfg.seed)
        excluded = transfer.excluded_classes
        transfer_info = {
            "size": len(transfer),
            "per_class_counts": transfer.per_class_counts,
            "excluded_classes": excluded,
            "per_class": spec.per_class,
            "select": spec.select if spec.per_class is not None else "all",
            "short_classes": transfer.short_classes,
            "candidates": int(len(soft)) if soft is not None else len(train),
            "split_size": len(train),
            # "unlabelled": the loop saw no label (the soft-label file's were checked against
            # the split, to know the file is this split's, and taught nothing)
            "labels": "unlabelled" if spec.unlabelled else "labelled",
        }
        extra = {
            "command": "distill",
            "key": key,
            "spec": spec.describe(),
            "source": source,
            "transfer": transfer_info,
            **(extra or {}),
        }
        with recording(invocation):
            metrics = fit(
                model,
                _without_labels(train) if spec.unlabelled else train,
                test,
                cfg,
                _objective(spec, soft, train),
                run_dir=run_dir,
                indices=transfer.indices,
                # content-addressed: the key matched, so a checkpoint here is this very run's
                resume=True if resume is None else resume,
                progress=progress,
                extra_config=extra,
                on_epoch=on_epoch,
                callbacks=callbacks,
            )
        per_class = [float(a) for a in metrics["per_class_accuracy"]]
        report = {
            "key": key,
            "run_dir": None if run_dir is None else str(run_dir),
            "dataset": dataset,
            "student": spec.student if model_id is None else model_id["class"],
            "T": None if spec.label_smoothing is not None else spec.T,
            "alpha": spec.alpha,
            "t_squared": spec.t_squared,
            "loss": spec.loss.describe() if spec.label_smoothing is None else None,
            "label_smoothing": spec.label_smoothing,
            "noise": spec.noise,
            "unlabelled": spec.unlabelled,
            "source": source,
            "transfer": transfer_info,
            "train_config": cfg.result_inputs(),
            "test_accuracy": float(metrics["test_accuracy"]),
            "per_class_accuracy": per_class,
            "class_names": list(getattr(train, "class_names", ())),
            "excluded_accuracy": _excluded_accuracy(per_class, test.labels, excluded)
            if excluded and test is not None
            else None,
            "excluded_per_class": {str(k): per_class[k] for k in excluded if per_class},
            "epochs": metrics.get("epochs"),
            "samples_per_s": metrics.get("samples_per_s"),
            "wall_time_s": time.perf_counter() - t0,
            "resumed_from_epoch": state.epochs_done,
            "metrics": metrics,
        }

        def finish() -> dict[str, Any]:
            write_json(run_dir / REPORT_FILE, report)  # last: the mark of a finished run
            return report

        if run_dir is not None:
            report = on_main(ctx, finish)  # rank 0's report, on every rank
    return {**report, "reused": False}


def teacher_limit(teacher: Path) -> int | None:
    """The --limit a teacher run was trained with (its config.json records it): a student of it
    is distilled on the same first N examples unless given a --limit of its own."""
    limit = (read_config(Path(teacher)).get("extra_config") or {}).get("limit")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


@contextlib.contextmanager
def _no_folder(device: str):
    """main_folder_lock's context for a run that writes no folder (the Python API, no out=)."""
    ctx = setup(device)
    try:
        yield ctx
    finally:
        ctx.close()
