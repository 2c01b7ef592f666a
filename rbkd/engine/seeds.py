"""Seeds derived from a run's seed: one well-mixed stream per (seed, epoch, purpose), drawn on
the CPU so that every device and rank sees the same numbers."""

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers such as (seed, epoch, stream): neighbouring seeds and
    epochs give unrelated streams (seed + epoch would make (1, 0) and (0, 1) collide)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def make_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from `parts`: draws are the same on every device and rank."""
    return torch.Generator().manual_seed(derive_seed(*parts))
