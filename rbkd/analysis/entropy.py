"""Soft-label entropy against temperature (thesis sections 4.4.1, 4.5, 5.2; figures 4.4, 5.1-5.4).

Entropy is Shannon's, in nats: H(p) = -sum_i p_i log p_i with p = softmax(logits / T). All
temperatures are computed in ONE call of `rbkd.ops.soft_label_entropy`, which returns [K, N].

Label-smoothing reference. The thesis plots the entropy of label-smoothed targets
y = (1 - A) * onehot + A / C against the smoothing factor A (figure 5.1), on its own axis, because
"it is hard to find a one-to-one correspondence between temperature and smoothing factor". Those
targets are probabilities, not logits, so they do not change with T. We therefore draw the LS
reference as horizontal lines on the entropy-vs-T plot, one per A (default 0.1, 0.3, 0.5, 0.7,
0.9): a teacher whose curve lies near an LS line carries about as much similarity information as
LS, which carries none (table 5.7). The JSON also holds the full entropy-vs-A table (figure 5.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rbkd.config import check_temperature  # noqa: F401  (re-exported: callers import it here)

DEFAULT_TEMPERATURES = (1.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 20.0)
DEFAULT_LS_FACTORS = (0.1, 0.3, 0.5, 0.7, 0.9)
# At most this many temperatures per analysis: a curve needs tens of points, and the count is
# checked before any list is built (`--T 1:1e9` once asked for a billion-element list).
MAX_TEMPERATURES = 1000
# entropy_table computes at most this many [K, N] elements at once (64 MB of float32), so 1000
# temperatures over 60,000 examples never need the 240 MB a single [K, N] call would.
_CHUNK_ELEMENTS = 1 << 24


class TooManyTemperatures(ValueError):
    """A temperature list or range with more than MAX_TEMPERATURES values."""


def _too_many(text: str, count: int) -> TooManyTemperatures:
    shown = text if len(text) <= 40 else text[:37] + "..."
    return TooManyTemperatures(
        f"--T {shown} asks for {count:,} temperatures, at most {MAX_TEMPERATURES} are allowed; "
        "use a coarser step (e.g. --T 1:20:0.5)"
    )


def parse_temperatures(text: str) -> list[float]:
    """Read temperatures: "1,3,6,9" -> [1, 3, 6, 9]; "1:20" -> 1, 2, ..., 20; "1:20:0.5" -> steps of 0.5.

    Every temperature must be finite and > 0, and there may be at most MAX_TEMPERATURES of
    them (ValueError otherwise, raised before a long list is built).
    """
    text = text.strip()
    if not text:
        raise ValueError("no temperature given; use e.g. --T 9, --T 1,3,9 or --T 1:20")
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 1.0
            if not step > 0 or stop < start:
                raise ValueError
            span = (stop - start) / step
            if not math.isfinite(span):
                raise ValueError
            count = int(math.floor(span + 1e-9)) + 1
            if count > MAX_TEMPERATURES:
                raise _too_many(text, count)
            temps = [round(start + i * step, 10) for i in range(count)]
        else:
            parts = text.split(",")
            if len(parts) > MAX_TEMPERATURES:
                raise _too_many(text, len(parts))
            temps = [float(p) for p in parts if p.strip()]
    except TooManyTemperatures:
        raise
    except ValueError:
        raise ValueError(
            f"cannot read temperatures {text!r}; write a list (1,3,9) or a range (1:20 or 1:20:0.5)"
        ) from None
    bad = [t for t in temps if not (math.isfinite(t) and t > 0)]
    if bad or not temps:
        raise ValueError(f"temperature T must be > 0, got {bad[0] if bad else text}")
    return temps


def entropy_matrix(logits: Tensor, temperatures: Sequence[float]) -> Tensor:
    """Entropy (nats) of softmax(logits / T) for every T: float32 [K, N], one rbkd.ops call."""
    from rbkd.ops import soft_label_entropy

    # A list (even of one temperature) always comes back as [K, N]; rbkd.ops checks each T.
    return soft_label_entropy(logits.float(), T=[float(t) for t in temperatures])


def entropy_at(logits: Tensor, T: float) -> Tensor:
    """Entropy (nats) of each row of softmax(logits / T): float32 [N]."""
    return entropy_matrix(logits, [T])[0]


@dataclass
class EntropyTable:
    """Mean soft-label entropy per temperature, overall and per class (rows: temperatures)."""

    temperatures: list[float]
    mean: list[float]  # [K] mean entropy over all examples
    per_class: list[list[float]]  # [K][C] mean entropy over the examples of each class
    class_counts: list[int]  # [C]
    num_classes: int
    max_entropy: float  # log C, the entropy of the uniform distribution

    def to_dict(self) -> dict:
        return {
            "unit": "nats",
            "temperatures": self.temperatures,
            "mean_entropy": self.mean,
            "per_class_entropy": self.per_class,
            "class_counts": self.class_counts,
            "num_classes": self.num_classes,
            "max_entropy": self.max_entropy,
        }


def entropy_table(
    logits: Tensor,
    labels: Tensor,
    temperatures: Sequence[float],
    *,
    num_classes: int | None = None,
    entropies: Tensor | None = None,
) -> EntropyTable:
    """Mean entropy at each T, overall and per class (by hard label). Classes without examples
    get NaN. `entropies` [K, N] may be passed when already computed."""
    c = int(num_classes or logits.shape[1])
    temps = [check_temperature(t) for t in temperatures]
    labels = labels.long()
    n = int(labels.numel())
    counts = torch.bincount(labels, minlength=c)[:c]
    sums = torch.zeros(len(temps), c, dtype=torch.float64)
    totals = torch.zeros(len(temps), dtype=torch.float64)
    # Chunked over temperatures: [chunk, N] at a time, reduced at once (see _CHUNK_ELEMENTS).
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for lo in range(0, len(temps), chunk):
        hi = min(lo + chunk, len(temps))
        h = entropy_matrix(logits, temps[lo:hi]) if entropies is None else entropies[lo:hi]
        h = h.double()
        sums[lo:hi].index_add_(1, labels, h)
        totals[lo:hi] = h.sum(dim=1)
    per_class = sums / counts.clamp(min=1).double()
    per_class[:, counts == 0] = float("nan")
    mean = totals / n if n else torch.full((len(temps),), float("nan"))
    return EntropyTable(
        temperatures=temps,
        mean=mean.tolist(),
        per_class=per_class.tolist(),
        class_counts=counts.tolist(),
        num_classes=c,
        max_entropy=math.log(c),
    )


def label_smoothing_targets(labels: Tensor, num_classes: int, A: float) -> Tensor:
    """Thesis eq. 3.2: (1 - A) * onehot + A / C, float32 [N, C]."""
    if not 0.0 <= A <= 1.0:
        raise ValueError(f"label smoothing A must be in [0, 1], got {A}")
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    return (1.0 - A) * onehot + A / num_classes


def label_smoothing_entropy(A: float, num_classes: int) -> float:
    """Entropy (nats) of the label-smoothed target (1 - A) * onehot + A / C; does not depend on T."""
    if not 0.0 <= A <= 1.0:
        raise ValueError(f"label smoothing A must be in [0, 1], got {A}")
    c = num_classes
    p_true = 1.0 - A + A / c
    p_other = A / c

    def term(p: float) -> float:
        return -p * math.log(p) if p > 0 else 0.0

    return term(p_true) + (c - 1) * term(p_other)


def label_smoothing_curve(
    num_classes: int, factors: Sequence[float] = DEFAULT_LS_FACTORS
) -> dict[str, float]:
    """{A: entropy} for the LS reference lines (keys formatted like "0.1")."""
    return {f"{a:g}": label_smoothing_entropy(a, num_classes) for a in factors}
