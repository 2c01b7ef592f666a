"""What a run folder written by the Python API records of the call that made it.

config.json's provenance "invocation": the function (`api`) and its arguments, each as JSON (a
model by its rbkd name or its class and state digest, data by what it is: rbkd's own files by
name, split, size and folder; anything else by its size and SHA-256). Where the run is one
`rbkd train-teacher` or `rbkd distill` would make (an rbkd model on rbkd's files), the same record
also holds that command (rbkd.study.teacher.repeat_record), which `rbkd rerun` repeats; where it
is not, `unrepeatable` says why, which `rbkd rerun` prints.
"""

from __future__ import annotations

import os
from typing import Any


def _model(value: Any) -> Any:
    from torch import nn

    from rbkd.soft_label_file import user_teacher_metadata

    if isinstance(value, str):
        return value
    if isinstance(value, nn.Module) and getattr(value, "arch", None):
        return {"rbkd_model": value.arch, "dataset": getattr(value, "dataset", None)}
    if callable(value):
        return user_teacher_metadata(value)["teacher"]
    return type(value).__name__


def _data(value: Any) -> Any:
    import hashlib

    if value is None:
        return None
    digest = hashlib.sha256()
    digest.update(value.images.contiguous().numpy().tobytes())
    digest.update(value.labels.contiguous().numpy().tobytes())
    record = {"name": value.name, "split": value.split, "size": len(value),
              "sha256": digest.hexdigest()}  # fmt: skip
    if value.root is not None:
        record["folder"] = os.path.abspath(value.root)
    return record


def _plain(value: Any) -> Any:
    import dataclasses

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.path.abspath(value)
    if dataclasses.is_dataclass(value) and hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    path = getattr(value, "path", None)  # a SoftLabels: its file, else its teacher
    if path is not None:
        return os.path.abspath(path)
    return getattr(value, "teacher", None) or type(value).__name__


def call_record(api: str, **arguments: Any) -> dict[str, Any]:
    """{"api", "arguments", "unrepeatable"}: the call, and why no command repeats it."""
    record: dict[str, Any] = {}
    for name, value in arguments.items():
        if name in ("model", "student", "teacher"):
            record[name] = None if value is None else _model(value)
        elif name in ("train", "test"):
            record[name] = _data(value)
        else:
            record[name] = _plain(value)
    return {
        "api": api,
        "arguments": record,
        "cwd": os.getcwd(),
        "unrepeatable": (
            f"it was made by {api} with a model of your own or on data that are not rbkd's "
            "dataset files (or with a teacher module, or without a test split), which rbkd "
            "cannot rebuild; repeat the call from Python (config.json's provenance.invocation "
            "records its arguments)"
        ),
    }
