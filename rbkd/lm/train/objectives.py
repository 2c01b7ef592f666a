"""What a language model learns from, per token: hard labels, a teacher online, or a store.

An objective takes the logits [b, C, V], the inputs and labels [b, C] and the windows' first
stream positions [b], and returns (the loss summed over the counted tokens, the summed
next-token cross-entropy for the metrics); the loop divides by the global batch's token count.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class HardLabels:
    """Next-token cross-entropy (the teacher's loss, and the hard-labels-only student's)."""

    name = "CE"

    def to(self, device) -> HardLabels:
        return self

    def describe(self) -> dict[str, Any]:
        return {"kind": "hard_labels"}

    def __call__(self, logits: Tensor, inputs: Tensor, labels: Tensor, starts: Tensor):
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum")  # fmt: skip
        return ce, ce.detach()


class OnlineTeacher:
    """Dense KD (rbkd.ops.kd_loss) against a teacher's full logits, computed in the loop."""

    name = "KD"

    def __init__(self, teacher: torch.nn.Module, *, T: float, alpha: float, identity: dict):
        self.teacher, self.T, self.alpha, self.identity = teacher.eval(), T, alpha, identity
        self.autocast = contextlib.nullcontext  # the loop's autocast, for the teacher's forward
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def to(self, device) -> OnlineTeacher:
        self.teacher.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        return {"kind": "online_teacher", "teacher": self.identity, "T": self.T,
                "alpha": self.alpha}  # fmt: skip

    def __call__(self, logits, inputs, labels, starts):
        from rbkd.ops import kd_loss

        with torch.no_grad(), self.autocast():
            teacher = self.teacher(input_ids=inputs).logits.float()
        loss = kd_loss(logits, teacher, labels, T=self.T, alpha=self.alpha,
                       ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
        return loss, _ce(logits, labels)


class StoredTeacher:
    """Sparse KD (rbkd.ops.sparse_kd_loss) against a store's top-k rows at the batch's positions."""

    name = "sparse KD"

    def __init__(self, rows, *, T: float, alpha: float, tail: str, identity: dict):
        self.rows, self.T, self.alpha, self.tail, self.identity = rows, T, alpha, tail, identity

    def to(self, device) -> StoredTeacher:
        return self

    def describe(self) -> dict[str, Any]:
        return {"kind": "store", "store": self.identity, "T": self.T, "k": self.rows.k,
                "tail": self.tail, "alpha": self.alpha}  # fmt: skip

    def __call__(self, logits, inputs, labels, starts):
        from rbkd.ops import sparse_kd_loss

        context = inputs.shape[1]
        rows = self.rows.batch(starts, context, inputs)
        device = logits.device
        if self.tail == "sampled":  # Sparse Logit Sampling's unbiased estimator
            loss = sparse_kd_loss(
                logits,
                rows["sample_ids"].to(device),
                rows["sample_logits"].to(device),
                labels,
                logz=rows["logz"].to(device),
                T=self.T,
                alpha=self.alpha,
                tail="sampled",
                sample_counts=rows["sample_counts"].to(device),
                sample_T=self.rows.sample_T,
                sample_logz=rows["sample_logz"].to(device) if "sample_logz" in rows else None,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            return loss, _ce(logits, labels)
        loss = sparse_kd_loss(
            logits,
            rows["topk_ids"].to(device),
            rows["topk_logits"].to(device),
            labels,
            logz=rows["logz"].to(device) if self.tail == "bucket" else None,
            T=self.T,
            alpha=self.alpha,
            tail=self.tail,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, _ce(logits, labels)


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(logits.detach().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
