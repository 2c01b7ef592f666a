"""`--tensorboard DIR` (rbkd train-teacher, rbkd distill): the epoch callback that logs to it."""

from __future__ import annotations

from pathlib import Path


def epoch_callbacks(tensorboard: Path | None) -> tuple[list, object | None]:
    """(fit's callbacks, the logger to close after the run). Without the tensorboard package, a
    ValueError of one line naming it (the caller makes it a usage error, before any training)."""
    if tensorboard is None:
        return [], None
    from rbkd.engine.callbacks import TensorBoardLogger

    try:
        logger = TensorBoardLogger(tensorboard)
    except ImportError as e:
        raise ValueError(f"--tensorboard: {e}") from None
    return [logger], logger


def close_logger(logger) -> None:
    if logger is not None:
        logger.close()
