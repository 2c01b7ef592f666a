"""The public Python API: `rbkd.train_teacher`, `rbkd.soft_labels`, `rbkd.distill`.

Bring your own teacher, student and data: any nn.Module (or an rbkd model name such as "small"
or "general"), data as an ImageDataset, a pair (x, y) of tensors or NumPy arrays (uint8 images
or float features of any shape), or a map-style Dataset of (x, y). Every default is the command
line's (rbkd.config: TrainConfig, DistillSpec). Nothing is written to disk unless asked (`out=`).

    teacher = rbkd.train_teacher(my_teacher, (x, y), (x_test, y_test), epochs=5).model
    result = rbkd.distill(my_student, (x, y), (x_test, y_test), teacher=teacher, T=9)
    result.test_accuracy, result.history, result.soft_labels.probs(T=9)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rbkd.api.inputs import (
    as_dataset,
    as_model,
    as_splits,
    check_trainable,
    eval_batch_size,
    teacher_device,
    train_config,
    with_classes,
)
from rbkd.api.record import call_record
from rbkd.api.results import RunResult, run_files
from rbkd.config import DistillSpec, TeacherSpec, TrainConfig, check_alpha, check_kd_temperature
from rbkd.engine.callbacks import StopTraining, TensorBoardLogger, check_callbacks

__all__ = ["RunResult", "StopTraining", "distill", "soft_labels", "train_teacher"]

PathLike = str | os.PathLike


def _checked_model(
    model: Any, train, test, cfg: TrainConfig, fixed: bool, what: str, classes: int | None = None
):
    """(module, train, test): the model built or taken as is, on cfg's device, and the splits
    widened to its number of outputs when their class count was only inferred from labels.
    `classes`: the number of outputs it must have (the teacher's, for a student)."""
    from rbkd.engine import predict_logits, resolve_device

    net = as_model(model, train, cfg.seed, what)
    check_trainable(net, what)
    device = resolve_device(cfg.device)
    net.to(device)
    # Two rows through the model before training: a wrong output width is one clear line here,
    # not an index error deep inside the loss.
    probe = dataclasses.replace(train, images=train.images[:2], labels=train.labels[:2])
    width = predict_logits(net, probe, device=device, batch_size=2).shape[1]
    if classes is not None and width != classes:
        raise ValueError(
            f"{what} {type(net).__name__} has {width} outputs but the teacher's soft labels have "
            f"{classes} classes; give the {what} one output (logit) per class"
        )
    train = _fit_classes(train, width, fixed, f"{what} {type(net).__name__}")
    test = _fit_classes(test, width, fixed, f"{what} {type(net).__name__}")
    return net, train, test


def _fit_classes(data, width: int, fixed: bool, who: str):
    if data is None or data.num_classes == width:
        return data
    if fixed or width < data.num_classes:
        raise ValueError(
            f"{who} has {width} outputs but the data has {data.num_classes} classes; give it "
            f"one output (logit) per class"
        )
    return with_classes(data, width, fixed=False)


def _epoch_callbacks(callbacks, tensorboard) -> tuple[list, TensorBoardLogger | None]:
    """(fit's callbacks, the TensorBoard logger to close after the run): checked before any
    work, so a missing tensorboard package is one ImportError line before anything trains."""
    hooks = check_callbacks(callbacks)
    logger = TensorBoardLogger(tensorboard) if tensorboard is not None else None
    # The logger first: the epoch's scalars are written even when a callback of yours raises.
    return ([logger] if logger is not None else []) + hooks, logger


def _history(run_dir: Path | None, trained: list[dict]) -> list[dict]:
    """The metrics rows of every epoch: a resumed run's earlier ones are in its folder only."""
    from rbkd.engine import read_metrics

    return read_metrics(run_dir) if run_dir is not None else trained


def train_teacher(
    model: Any,
    train: Any,
    test: Any | None = None,
    *,
    config: TrainConfig | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    device: str | None = None,
    num_classes: int | None = None,
    out: PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
    callbacks: Iterable[Callable[[dict], Any]] | None = None,
    tensorboard: PathLike | None = None,
) -> RunResult:
    """Train `model` on `train`'s hard labels (cross-entropy), scoring it on `test` each epoch.

    `model`: an nn.Module (trained in place) or an rbkd teacher name ("small", "large") built
    for the data from `seed`. Hyper-parameters: `config` and/or the keywords (defaults:
    rbkd.TrainConfig). With `out`, writes a run folder like `rbkd train-teacher --out`: weights,
    config.json, metrics.jsonl, an epoch checkpoint (`resume=True` continues it) and both splits'
    soft labels.

    `callbacks`: functions called after each epoch (on rank 0 under torchrun) with its metrics
    row plus `lr`; their return value is ignored, and raising `rbkd.StopTraining` ends training
    after that epoch, keeping its checkpoint. `tensorboard`: a folder to log each epoch's
    scalars to (torch.utils.tensorboard; needs `pip install tensorboard`)."""
    hooks, logger = _epoch_callbacks(callbacks, tensorboard)
    cfg = train_config(
        config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device
    )
    train_ds, test_ds, fixed = as_splits(train, test, num_classes)
    net, train_ds, test_ds = _checked_model(model, train_ds, test_ds, cfg, fixed, "model")
    from rbkd.study.teacher import train_teacher as run_teacher

    record = call_record("rbkd.train_teacher", model=model, train=train_ds, test=test_ds,
                         config=cfg, num_classes=num_classes, out=out, resume=resume)  # fmt: skip
    spec = TeacherSpec(dataset=train_ds.name, capacity=getattr(net, "arch", None) or "own")
    trained: list[dict] = []
    try:
        result = run_teacher(
            spec,
            cfg,
            out=out,
            root=None,
            splits=(train_ds, test_ds),
            progress=progress,
            model=net,
            resume=resume,
            on_epoch=trained.append,
            callbacks=hooks,
            extra={"api": "rbkd.train_teacher"},
            invocation=record,
        )
    finally:
        if logger is not None:
            logger.close()
    run_dir = Path(out) if out is not None else None
    history = _history(run_dir, trained)
    return RunResult.from_fit(
        net, result["metrics"], history, cfg, run_dir=run_dir, files=run_files(run_dir)
    )


def _rows(n: int):
    import torch

    return torch.arange(n, dtype=torch.int64)


def soft_labels(
    teacher: Any,
    data: Any,
    *,
    split: str | None = None,
    num_classes: int | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    out: PathLike | None = None,
):
    """The teacher's logits for every example of `data`, as `rbkd.soft_label_file.SoftLabels`
    (`.logits` [N, C], `.labels`, `.indices`, `.probs(T)`, `.metadata`).

    `teacher`: an nn.Module (run in eval mode, without gradients, on its own device unless
    `device` is given) or any function mapping a batch to logits [batch, C]. The metadata names
    it ("user model <class> (state-dict sha256 ...)" or "user callable <name>, no state"). With
    `out`, also written as a safetensors file that `rbkd.distill(soft_labels=out)` and the CLI
    read back (checked against their data). `split` ("train" or "test") defaults to an
    ImageDataset's own, else "train"."""
    if split is None:
        split = data.split if isinstance(data, _image_dataset()) else "train"
    soft, _ = _soft_labels(teacher, data, split, num_classes, device, batch_size, out)
    return soft


def _soft_labels(teacher, data, split, num_classes, device, batch_size, out, fixed=None):
    """(SoftLabels, the data as an ImageDataset with the teacher's number of classes)."""
    from rbkd.engine import predict_logits
    from rbkd.soft_label_file import (
        SoftLabels,
        read_soft_labels,
        soft_labels_metadata,
        user_teacher_metadata,
        write_soft_labels,
    )

    if fixed is None:
        fixed = num_classes is not None or isinstance(data, _image_dataset())
    dataset = as_dataset(data, split=split, num_classes=num_classes)
    batch = eval_batch_size(batch_size)
    logits = predict_logits(
        teacher, dataset, device=teacher_device(teacher, device), batch_size=batch
    )
    dataset = _fit_classes(dataset, logits.shape[1], fixed, "the teacher")
    who = user_teacher_metadata(teacher)
    rows = _rows(len(dataset))
    if out is None:
        meta = soft_labels_metadata(dataset.name, split, logits.shape[1], who)
        return SoftLabels(logits, dataset.labels.clone(), rows, meta), dataset
    path = write_soft_labels(
        out, logits, dataset.labels, rows, dataset=dataset.name, split=split, teacher=who
    )
    return read_soft_labels(path, dataset=dataset), dataset


def _image_dataset():
    from rbkd.data.dataset import ImageDataset

    return ImageDataset


def distill(
    student: Any,
    train: Any,
    test: Any | None = None,
    *,
    teacher: Any | None = None,
    soft_labels: Any | None = None,
    T: float | None = None,
    alpha: float | None = None,
    t_squared: bool | None = None,
    divergence: str | None = None,
    beta: float | None = None,
    skew: float | None = None,
    dkd_alpha: float | None = None,
    dkd_beta: float | None = None,
    standardize: bool | None = None,
    config: TrainConfig | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    device: str | None = None,
    num_classes: int | None = None,
    out: PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
    callbacks: Iterable[Callable[[dict], Any]] | None = None,
    tensorboard: PathLike | None = None,
) -> RunResult:
    """Train `student` on `train` against a teacher's soft labels at temperature T (the loss of
    README's "The loss convention": `(1 - alpha) * CE + alpha * s * KL` at T).

    The teacher is given once: `teacher` (an nn.Module or a function of a batch, run over
    `train` now) or `soft_labels` (a SoftLabels, or the path of a soft-label file, covering
    every training example; checked against `train`'s labels). `student`: an nn.Module
    (trained in place) or an rbkd student name ("general", "baseline"). T, alpha and t_squared
    default to rbkd.DistillSpec's (T=9, alpha=0.99, t_squared=True), the rest to TrainConfig's.
    `divergence` ("kl", the default, "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd",
    "dkd") and its options `beta`, `skew`, `dkd_alpha`, `dkd_beta`, `standardize` are
    rbkd.ops.kd_loss's (defaults: rbkd.config.LossSpec's).
    `result.soft_labels` holds the soft labels learnt from. `callbacks` and `tensorboard` as
    rbkd.train_teacher's."""

    spec = DistillSpec()
    T = check_kd_temperature(spec.T if T is None else T)
    alpha = check_alpha(spec.alpha if alpha is None else alpha)
    t_squared = spec.t_squared if t_squared is None else bool(t_squared)
    given = {"divergence": divergence, "beta": beta, "skew": skew, "dkd_alpha": dkd_alpha,
             "dkd_beta": dkd_beta, "standardize": standardize}  # fmt: skip
    loss = dataclasses.replace(spec.loss, **{k: v for k, v in given.items() if v is not None})
    loss.check(str)  # one line naming the keyword
    if (teacher is None) == (soft_labels is None):
        raise ValueError("give exactly one of teacher= (a model or function) or soft_labels=")
    hooks, logger = _epoch_callbacks(callbacks, tensorboard)
    cfg = train_config(
        config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device
    )
    train_ds, test_ds, fixed = as_splits(train, test, num_classes, unlabelled=True)
    soft, train_ds = _teacher_soft_labels(teacher, soft_labels, train_ds, fixed, cfg)
    test_ds = _fit_classes(test_ds, soft.num_classes, fixed, "the teacher")
    net, train_ds, test_ds = _checked_model(
        student, train_ds, test_ds, cfg, fixed, "student", classes=soft.num_classes
    )
    from rbkd.study.student import distill as run_distill

    record = call_record("rbkd.distill", student=student, train=train_ds, test=test_ds,
                         teacher=teacher, soft_labels=soft_labels, T=T, alpha=alpha,
                         t_squared=t_squared, loss=loss.describe(), config=cfg,
                         num_classes=num_classes, out=out, resume=resume)  # fmt: skip
    spec = DistillSpec(T=T, alpha=alpha, t_squared=t_squared, loss=loss,
                       student=getattr(net, "arch", None) or "own")  # fmt: skip
    trained: list[dict] = []
    try:
        report = run_distill(
            spec,
            cfg,
            out=out,
            root=None,
            progress=progress,
            splits=(train_ds, test_ds),
            soft=soft,
            model=net,
            resume=resume,
            on_epoch=trained.append,
            callbacks=hooks,
            extra={
                "api": "rbkd.distill",
                "teacher": soft.teacher,
                "soft_labels": str(soft.path) if soft.path else None,
            },  # fmt: skip
            invocation=record,
        )
    finally:
        if logger is not None:
            logger.close()
    run_dir = Path(out) if out is not None else None
    return RunResult.from_fit(
        net,
        report["metrics"],
        _history(run_dir, trained),
        cfg,
        soft_labels=soft,
        run_dir=run_dir,
        files=run_files(run_dir),
    )


def _teacher_soft_labels(teacher, soft, train, fixed: bool, cfg: TrainConfig):
    """(the train split's SoftLabels, train with the teacher's classes), checked to cover every
    training example with its own label."""
    from rbkd.soft_label_file import SoftLabels, check_matches_dataset, read_soft_labels

    if teacher is not None:
        device = None if cfg.device == "auto" else cfg.device
        return _soft_labels(teacher, train, "train", None, device, cfg.eval_batch_size, None, fixed)
    if isinstance(soft, (str, os.PathLike)):
        soft = read_soft_labels(soft)
    if not isinstance(soft, SoftLabels):
        raise ValueError(
            f"soft_labels must be an rbkd SoftLabels or a file path, got {type(soft).__name__}"
        )
    train = _fit_classes(train, soft.num_classes, fixed, "the soft labels")
    check_matches_dataset(soft, train)
    covered = int(soft.indices.unique().numel())
    if covered != len(train):
        raise ValueError(
            f"the soft labels cover {covered} of the {len(train)} training examples; make them "
            "from the same training data (rbkd.soft_labels(teacher, train))"
        )
    return soft, train
