"""Content addresses of runs: a hash of everything that determines a run's result.

A run's key is the SHA-256 of a canonical JSON of its inputs: the data (a fingerprint of the
exact images and labels used), the architecture, every hyperparameter that changes the numbers,
the seed, the teacher's key for a student, and NUMERICS_VERSION. Two runs with the same key would
compute the same thing, so the second is never run; changing any input gives a new key, so a
stale result is never reused. What does not change the numbers (the device, the evaluation batch
size, the output folder, the progress bar) is deliberately left out.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

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
        digest.update(f"{split.name}/{split.split}/{len(split)}".encode())
        digest.update(split.images.contiguous().numpy().tobytes())
        digest.update(split.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()
