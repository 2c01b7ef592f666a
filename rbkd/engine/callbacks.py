"""Per-epoch callbacks: `fit(callbacks=[fn])` calls fn(record) after each epoch on rank 0, and
`TensorBoardLogger`, the callback behind `--tensorboard DIR` and `tensorboard=DIR`.

A record is the epoch's metrics row (metrics.jsonl's) plus `lr`, the optimizer's learning rate
in that epoch. A callback's return value is ignored; raising `StopTraining` ends training
cleanly after that epoch (its checkpoint and metrics are written first, then the final weights,
as if the run had been given that many epochs). Any other exception ends the run with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from os import PathLike
from pathlib import Path
from typing import Any

EpochCallback = Callable[[dict], Any]

MISSING_TENSORBOARD = "TensorBoard logging needs the tensorboard package: pip install tensorboard"


class StopTraining(Exception):  # noqa: N818 (Lightning's and Keras's name for the same signal)
    """Raised by an epoch callback to end training after the epoch just trained, keeping its
    checkpoint: the run finishes with that many epochs (final weights, config.json, report)."""


def check_callbacks(callbacks: Iterable[EpochCallback] | None) -> list[EpochCallback]:
    """The callbacks as a list, each checked to be callable (one ValueError line otherwise)."""
    if callbacks is None:
        return []
    if callable(callbacks):  # a single function: accepted as a list of one
        return [callbacks]
    listed = list(callbacks)
    for i, fn in enumerate(listed):
        if not callable(fn):
            raise ValueError(
                f"callbacks[{i}] is a {type(fn).__name__}, not a function; pass functions "
                "taking the epoch's metrics dict"
            )
    return listed


def run_callbacks(callbacks: list[EpochCallback], record: dict) -> bool:
    """Call every callback with its own copy of `record`; True when one raised StopTraining (the
    others still see the epoch)."""
    stop = False
    for fn in callbacks:
        try:
            fn(dict(record))
        except StopTraining:
            stop = True
    return stop


def require_tensorboard():
    """torch.utils.tensorboard's SummaryWriter; without the tensorboard package, an ImportError
    of one line naming it (checked before anything trains)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package first thing
        raise ImportError(MISSING_TENSORBOARD) from None
    return SummaryWriter


class TensorBoardLogger:
    """An epoch callback writing each record's numbers as TensorBoard scalars under `log_dir`,
    at step = epoch: train_objective_loss, train_ce_loss, train_accuracy, test_ce_loss,
    test_accuracy, samples_per_s, epoch_time_s and lr (NaN ones, such as a missing test split's,
    are left out; per_class_accuracy too). The event file is opened at the first epoch (on rank
    0 alone, where callbacks run) and flushed after every one, so TensorBoard shows a run live."""

    def __init__(self, log_dir: str | PathLike):
        self.log_dir = Path(log_dir)
        self._writer_class = require_tensorboard()
        self._writer = None

    def __call__(self, record: dict) -> None:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir))
        step = int(record["epoch"])
        for name, value in record.items():
            if name == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
