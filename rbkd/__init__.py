"""rbkd: response-based knowledge distillation.

Fused kernels for the temperature softmax, the KD loss and soft-label entropy (`rbkd.ops`), a training
engine for teachers and students (`rbkd.engine`), soft labels stored as safetensors
(`rbkd.soft_label_file`) and the `rbkd` command line (`rbkd.cli`).

The Python API, for your own models and data (docs/engine-api.md, README "Using rbkd from Python"):

    rbkd.train_teacher(model, train, test=None, **hyper_parameters) -> rbkd.RunResult
    rbkd.soft_labels(teacher, data) -> rbkd.SoftLabels
    rbkd.distill(student, train, test=None, teacher=... | soft_labels=..., T=9, alpha=0.99)
    rbkd.kd_loss, rbkd.soft_label_entropy, rbkd.temperature_softmax (rbkd.ops)
    callbacks=[fn] and tensorboard=DIR on both trainers; raise rbkd.StopTraining in fn to stop

Everything here is imported on first use: `import rbkd` does not import torch, so the command
line starts fast.
"""

from rbkd._lazy import lazy_names

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first used (PEP 562).
_LAZY = {
    "train_teacher": "rbkd.api",
    "soft_labels": "rbkd.api",
    "distill": "rbkd.api",
    "RunResult": "rbkd.api",
    "StopTraining": "rbkd.engine.callbacks",
    "SoftLabels": "rbkd.soft_label_file",
    "ImageDataset": "rbkd.data.dataset",
    "TrainConfig": "rbkd.config",
    "DistillSpec": "rbkd.config",
    "kd_loss": "rbkd.ops",
    "soft_label_entropy": "rbkd.ops",
    "temperature_softmax": "rbkd.ops",
}

# Subpackages reachable as attributes after a bare `import rbkd` (rbkd.engine.load_run(...)).
_SUBMODULES = ("analysis", "config", "data", "engine", "models", "ops", "soft_label_file", "study")

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY, _SUBMODULES)
