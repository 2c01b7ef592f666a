"""Noise in soft labels (thesis section 4.8, eq. 4.4): y' = normalise(y + U).

The spec is "uniform:S" or "normal:S". `rbkd.engine.Distillation(noise=...)` draws it anew every
epoch with `add_noise`; the CLI and study files check specs with `rbkd.config.parse_noise` (a
string parser, torch-free) before a run starts.

    uniform:S   U ~ Uniform[0, S)          (non-negative: y + U stays a valid weight)
    normal:S    U ~ Normal(0, S^2)          then clamped at 0
    y' = (y + U) / sum(y + U)               rows sum to 1 again
"""

from __future__ import annotations

import torch
from torch import Tensor

from rbkd.config import parse_noise


def add_noise(probs: Tensor, spec: str, *, generator: torch.Generator | None = None) -> Tensor:
    """Add noise to probability rows and renormalise them; returns float32 [N, C]."""
    kind, scale = parse_noise(spec)
    p = probs.double()
    if kind == "uniform":
        noise = torch.rand(p.shape, generator=generator, dtype=torch.float64) * scale
    else:
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale
    noisy = (p + noise.to(p.device)).clamp_min(0.0)
    total = noisy.sum(dim=1, keepdim=True)
    # A row whose every entry was clamped to 0 falls back to the clean row.
    noisy = torch.where(total > 0, noisy / total.clamp_min(1e-300), p)
    return noisy.float()
