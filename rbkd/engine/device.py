"""The device a run trains on: "auto" resolved once, and a GPU asked for but absent refused."""

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is an error, not a fallback,
    so that a run never silently trains 100x slower than asked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device
