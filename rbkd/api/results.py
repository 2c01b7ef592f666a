"""RunResult: what `rbkd.train_teacher` and `rbkd.distill` return."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _number(value: Any) -> float | None:
    """A metric as a float, None where it is NaN (no test split, nothing trained)."""
    return None if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class RunResult:
    """One training run's outcome. Without a test split, the test fields are None and
    `train_loss` / `train_accuracy` (running means over the last epoch's batches, in train mode)
    are the only scores. `train_objective_loss` is what the run minimised (a student's: the
    KD loss, T**2-scaled by default; a teacher's: the cross-entropy), `train_ce_loss` and
    `test_ce_loss` the cross-entropy on the hard labels."""

    # The trained nn.Module (trained in place: the very object passed in, or the one built).
    model: Any = field(repr=False)
    test_accuracy: float | None  # final, on the test split; None without one
    per_class_accuracy: tuple[float, ...] | None  # C values (NaN: no test example of the class)
    test_ce_loss: float | None  # mean cross-entropy on the test split
    train_objective_loss: float | None  # last epoch's mean training loss (the objective's)
    train_ce_loss: float | None  # last epoch's mean cross-entropy on the training labels
    train_accuracy: float | None
    epochs: int  # completed epochs (resumed ones included)
    history: tuple[dict, ...]  # one metrics row per epoch: epoch, train_objective_loss, ...
    config: Any  # the TrainConfig the run used (defaults filled in)
    # distill: the train split's SoftLabels the student learnt from.
    soft_labels: Any = field(default=None, repr=False)
    run_dir: Path | None = None  # only when asked for (out=)
    files: dict[str, Path] = field(default_factory=dict)  # name -> path of what was written

    @classmethod
    def from_fit(cls, model, metrics: dict, history: list[dict], cfg, **more) -> RunResult:
        per_class = metrics.get("per_class_accuracy") or None
        return cls(
            model=model,
            test_accuracy=_number(metrics["test_accuracy"]),
            per_class_accuracy=tuple(map(float, per_class)) if per_class else None,
            test_ce_loss=_number(metrics["test_ce_loss"]),
            train_objective_loss=_number(metrics["train_objective_loss"]),
            train_ce_loss=_number(metrics.get("train_ce_loss")),
            train_accuracy=_number(metrics["train_accuracy"]),
            epochs=int(metrics["epochs"]),
            history=tuple(history),
            config=cfg,
            **more,
        )


def run_files(run_dir: Path | None) -> dict[str, Path]:
    """The files a run folder holds now, by name (model, config, metrics, checkpoint, ...)."""
    if run_dir is None:
        return {}
    names = {
        "model": "model.safetensors",
        "config": "config.json",
        "metrics": "metrics.jsonl",
        "checkpoint": "checkpoint.safetensors",
        "soft_labels_train": "soft_labels_train.safetensors",
        "soft_labels_test": "soft_labels_test.safetensors",
    }
    return {k: run_dir / v for k, v in names.items() if (run_dir / v).exists()}
