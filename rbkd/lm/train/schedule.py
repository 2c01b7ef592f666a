"""The learning rate at each optimizer step: linear warm-up, then a cosine down to a floor.

    step < W:       lr * (step + 1) / W
    W <= step < S:  lr_min + (lr - lr_min) * (1 + cos(pi * (step - W) / (S - W))) / 2

with S = steps, W = warmup_steps and lr_min = lr * min_lr_ratio (nanoGPT's and Hugging Face's
get_cosine_schedule_with_warmup's shape, ending at the floor rather than 0). The rate is a pure
function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    span = max(steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
