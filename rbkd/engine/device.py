"""Training configuration, the device to train on, and seed derivation."""

import numpy as np
import torch

from rbkd.config import TrainConfig

__all__ = ["TrainConfig", "derive_seed", "make_generator", "resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is an error, not a fallback,
    so that a run never silently trains 100x slower than asked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers such as (seed, epoch, stream): neighbouring seeds and
    epochs give unrelated streams (seed + epoch would make (1, 0) and (0, 1) collide)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def make_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from `parts`: draws are the same on every device and rank."""
    return torch.Generator().manual_seed(derive_seed(*parts))
