"""Content addresses of runs: a hash of everything that determines a run's result.

A run's key is the SHA-256 of a canonical JSON of its inputs: the data (a fingerprint of the
exact images and labels used), the architecture, every hyperparameter that changes the numbers,
the seed, the teacher's key for a student, and NUMERICS_VERSION. Two runs with the same key would
compute the same thing, so the second is never run; changing any input gives a new key, so a
stale result is never reused. What does not change the numbers (the device, the evaluation batch
size, the output folder, the progress bar) is deliberately left out.

A teacher's key and a student's, and the folder names made from them, are here too, torch-free:
a study's plan (rbkd.study.plan) names every run, and what of it is done, before anything loads.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from rbkd.config import DistillSpec, TeacherSpec, TrainConfig

# Bump when a change to rbkd alters what a run with the same inputs computes (the loss, the
# initialisation, the batch order, the data pipeline): every cached run then reruns once.
NUMERICS_VERSION = 1

KEY_CHARS = 12  # of the hex digest, in folder names (48 bits: no collision in any real study)


def _canonical(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a run input must be finite, got {value}")
        # 9 and 9.0 are the same temperature: integral floats hash as integers
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def run_key(kind: str, inputs: dict[str, Any]) -> str:
    """Hex SHA-256 of (kind, NUMERICS_VERSION, inputs), order-independent in dict keys."""
    payload = {"kind": kind, "numerics": NUMERICS_VERSION, "inputs": _canonical(inputs)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(train, test) -> str:
    """SHA-256 of the exact examples a run sees: both splits' names, images and labels. A --limit
    cut, a different copy of the files or another dataset all give another fingerprint."""
    digest = hashlib.sha256()
    for split in (train, test):
        if split is None:  # no test split (the Python API's test=None)
            digest.update(b"no test split")
            continue
        digest.update(f"{split.name}/{split.split}/{len(split)}".encode())
        digest.update(split.images.contiguous().numpy().tobytes())
        digest.update(split.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------ teachers and students
def teacher_key(
    spec: TeacherSpec, cfg: TrainConfig, fingerprint: str, model: dict | None = None
) -> str:
    """`model`: a model of the user's own (the Python API): its class, size and initial weights'
    digest, which determine it as the capacity determines one of rbkd's."""
    inputs = {"data": fingerprint, "capacity": spec.capacity, **cfg.result_inputs()}
    if model is not None:
        inputs["model"] = model
    return run_key("teacher", inputs)


def teacher_dir_name(spec: TeacherSpec, cfg: TrainConfig, key: str) -> str:
    return (
        f"teacher-{spec.dataset}-{spec.capacity}-b{cfg.batch_size}-e{cfg.epochs}-s{cfg.seed}"
        f"-{key[:KEY_CHARS]}"
    )


def _fmt(x: float) -> str:
    return f"{x:g}"


def student_dir_name(spec: DistillSpec, dataset: str, cfg: TrainConfig, key: str) -> str:
    what = (
        f"ls{_fmt(spec.label_smoothing)}"
        if spec.label_smoothing is not None
        else f"T{_fmt(spec.T)}"
    )
    parts = [f"student-{dataset}-{spec.student}-{what}"]
    if spec.loss.slug():  # forward KL, the default, keeps the folder names it always had
        parts.append(spec.loss.slug())
    if spec.exclude_classes:
        parts.append("x" + "_".join(map(str, sorted(spec.exclude_classes))))
    if spec.per_class is not None:
        parts.append(f"{spec.select}{spec.per_class}")
    if spec.noise:
        parts.append(spec.noise.replace(":", ""))
    if spec.unlabelled:
        parts.append("unlabelled")
    parts.append(f"e{cfg.epochs}-s{cfg.seed}-{key[:KEY_CHARS]}")
    return "-".join(parts)


def student_key(
    spec: DistillSpec, cfg: TrainConfig, fingerprint: str, source: dict, model: dict | None = None
) -> str:
    inputs = {
        "data": fingerprint,
        "source": source,  # soft-label tensors' digests, or {"label_smoothing": A}
        "student": spec.student,
        "T": None if spec.label_smoothing is not None else spec.T,
        "alpha": spec.alpha,
        "t_squared": spec.t_squared,
        "exclude_classes": sorted(set(spec.exclude_classes)),
        "per_class": spec.per_class,
        "select": spec.select if spec.per_class is not None else "all",
        "noise": spec.noise,
        **cfg.result_inputs(),
    }
    # The divergence only when it is not forward KL: every run made before divergences existed
    # (and every default run since) keeps its key.
    loss = spec.loss.key_inputs() if spec.label_smoothing is None else {}
    if loss:
        inputs["loss"] = loss
    # Only when set, as the divergence: every labelled run keeps the key it always had. The
    # weights equal those of a labelled run at alpha 1, but the run records no train CE: another run.
    if spec.unlabelled:
        inputs["unlabelled"] = True
    if model is not None:  # a model of the user's own (see teacher_key)
        inputs["model"] = model
    return run_key("student", inputs)
