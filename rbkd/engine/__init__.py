"""The training engine: one loop for teacher training and distillation (see docs/engine-api.md)."""

from rbkd.config import TrainConfig
from rbkd.engine.device import resolve_device
from rbkd.engine.evaluate import evaluate, penultimate_features, predict_logits
from rbkd.engine.loop import TrainingDiverged, fit
from rbkd.engine.objectives import CrossEntropy, Distillation, LabelSmoothing
from rbkd.engine.rundir import RunDirError, load_run, read_config, read_metrics

__all__ = [
    "CrossEntropy",
    "Distillation",
    "LabelSmoothing",
    "RunDirError",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "load_run",
    "penultimate_features",
    "predict_logits",
    "read_config",
    "read_metrics",
    "resolve_device",
]
