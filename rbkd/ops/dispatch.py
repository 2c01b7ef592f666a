"""Choosing a backend, once, at the op boundary, from the tensors' device.

`RBKD_BACKEND=auto|torch|cpu|triton` or `with use_backend(name):` names one. Auto sends CUDA
tensors to Triton (the pure-torch reference when Triton is not installed) and CPU tensors to the
C++ CPU kernels; the pure-torch reference serves only when no compiled backend can. A backend that was
named but cannot serve the tensors is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

BACKEND_NAMES = ("torch", "cpu", "triton")
_MODULES = {
    name: f"rbkd.ops.backends.{'torch_twin' if name == 'torch' else name}" for name in BACKEND_NAMES
}
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("rbkd_backend", default=None)


class BackendError(RuntimeError):
    """A named backend cannot serve the tensors it was given."""


@functools.cache  # what is built does not change while the process runs
def _module(name: str) -> ModuleType | None:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError:
        return None
    return module if module.is_available() else None


def available_backends() -> list[str]:
    """Names of the backends that are built and importable in this process."""
    return [name for name in BACKEND_NAMES if _module(name) is not None]


def requested_backend() -> str:
    name = _override.get() or os.environ.get("RBKD_BACKEND", "auto") or "auto"
    name = name.strip().lower()
    if name != "auto" and name not in BACKEND_NAMES:
        raise BackendError(
            f"unknown backend {name!r}: choose one of auto, {', '.join(BACKEND_NAMES)} "
            "(RBKD_BACKEND or rbkd.ops.use_backend)"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops in this block on backend `name` ('auto' restores the automatic choice)."""
    token = _override.set(name)
    try:
        requested_backend()  # validate the name now, not at the first op
        yield
    finally:
        _override.reset(token)


def select_backend(device: torch.device) -> ModuleType:
    name = requested_backend()
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            module = _module(candidate)
            if module is not None and module.supports(device):
                return module
        raise BackendError(f"no rbkd backend can serve {device.type} tensors")
    module = _module(name)
    if module is None:
        raise BackendError(
            f"backend {name!r} is not available in this build (available: "
            f"{', '.join(available_backends())}); unset RBKD_BACKEND or pick another"
        )
    if not module.supports(device):
        raise BackendError(
            f"backend {name!r} cannot run on {device.type} tensors; move the tensors or pick "
            "another backend (RBKD_BACKEND=auto chooses by device)"
        )
    return module
