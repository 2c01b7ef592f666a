"""LMTrainConfig: how a language model is trained (torch-free: keys and the CLI read it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# The named GPT-2 sizes (rbkd.lm.train.models builds them); here, torch-free, so that a study
# file's sizes are checked without importing torch.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "teacher": {"n_layer": 6, "n_embd": 384, "n_head": 6},  # 13.9M at V = 8192
    "student": {"n_layer": 2, "n_embd": 192, "n_head": 3},  # 2.5M at V = 8192
    "tiny": {"n_layer": 1, "n_embd": 32, "n_head": 2},  # for tests and smoke runs
}


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class LMTrainConfig:
    steps: int = 1000  # optimizer steps (the cosine schedule ends at the last one)
    batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    micro_batch: int | None = None  # sequences per forward on one rank (None: all of its share)
    context: int = 256  # tokens per sequence
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50  # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.1  # AdamW's, on matrices only (not biases, norms or positions)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient 2-norm; 0 turns clipping off
    precision: str = "auto"  # autocast dtype; auto: bf16 on a GPU that has it, fp32 on the CPU
    seed: int = 0
    device: str = "auto"
    eval_every: int = 200  # steps between validation passes (and metrics rows)
    eval_tokens: int = 65536  # validation tokens scored per pass (0: the whole split)
    checkpoint_every: int = 100  # steps between checkpoints (also written at the end)

    # What changes the numbers a run computes (its content key). The device, the micro-batch
    # (accumulation gives the same gradient up to float rounding, as the engine's world size
    # does) and the checkpoint interval do not. `precision` enters resolved (runs.py).
    RESULT_FIELDS = ("steps", "batch_size", "context", "lr", "min_lr_ratio", "warmup_steps",
                     "weight_decay", "beta1", "beta2", "grad_clip", "seed", "eval_every",
                     "eval_tokens")  # fmt: skip

    def check(self) -> None:
        """One ValueError line for the first bad field."""
        for name in ("steps", "batch_size", "context", "eval_every", "checkpoint_every"):
            _positive_int(name, getattr(self, name))
        if self.micro_batch is not None:
            _positive_int("micro_batch", self.micro_batch)
        for name in ("warmup_steps", "eval_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not _finite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not _finite(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "grad_clip"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must be a finite number >= 0, got {getattr(self, name)!r}"
                )
        for name in ("beta1", "beta2"):
            if not _finite(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )

    def result_inputs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.RESULT_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMTrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown LMTrainConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
