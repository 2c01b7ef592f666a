"""Training configuration, the device to train on, and seed derivation."""

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch


@dataclass
class TrainConfig:
    epochs: int = 10  # full passes over the training (transfer) set
    batch_size: int = 64  # GLOBAL batch: split across ranks under torchrun (the thesis's knob)
    lr: float = 1e-3  # learning rate
    optimizer: str = "adam"  # "adam" | "sgd"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # L2 penalty (coupled, as in torch.optim.Adam / SGD)
    seed: int = 0  # drives batch order, dropout masks and soft-label noise; not the model init
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    eval_batch_size: int = 1024  # evaluation only; does not change any result

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)


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
