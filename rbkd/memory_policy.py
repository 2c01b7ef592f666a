"""Keep freed memory in the process for reuse, so that a training step does not fault fresh pages.

glibc serves every allocation above its mmap threshold (32 MB at most) with a fresh mapping and
unmaps it on free. A training step allocates its large tensors anew each time (a language
model's [tokens, vocabulary] logits and their gradient, a loss's [N, V] gradient): every page of
them is faulted in and zeroed by the kernel, every step, before any work is done on it. With
mmap off and trimming off, freed blocks stay in the heap and the next step reuses them.

Measured on the 2-core CPU machine (docs/lm-training.md, bench/results/cpu-sparse-2026-12-05c.md):
the 2.5M-parameter GPT-2 student of bench/lm_train_speed.py trains at 7,265 tokens/s (median of
three runs) with this policy against 5,337 with glibc's defaults; dense kd_loss forward +
backward at 1024 x 128256 with a fresh gradient each call takes 118 ms against 141 (fastest of
20 interleaved rounds): the difference is page faults.

The cost: the process keeps its peak heap until it exits (nothing freed goes back to the system;
that student's run peaked at 1.85 GB resident against 1.41 GB).
That is what a training process wants, and what a library must not impose: the `rbkd` command
calls keep_freed_memory() at start; a Python program calls it itself if it wants the same.
RBKD_MALLOC=system leaves glibc's defaults (to measure the difference, or on a shared machine).
"""

from __future__ import annotations

import ctypes
import os
import platform

POLICIES = ("keep", "system")
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def malloc_policy(variable: str = "RBKD_MALLOC", default: str = "keep") -> str:
    """The policy an environment variable asks for: "keep" (keep freed memory) or "system"
    (glibc's defaults). RBKD_MALLOC, the command's, defaults to "keep"; the benchmarks read
    RBKD_BENCH_MALLOC with "system" as the default."""
    policy = (os.environ.get(variable) or default).strip().lower()
    if policy not in POLICIES:
        raise ValueError(
            f"{variable} must be 'keep' or 'system', got {policy!r}; unset it for the default"
        )
    return policy


def keep_freed_memory() -> bool:
    """Turn glibc's mmap and heap trimming off for this process; True where it took effect.

    Does nothing (False) under RBKD_MALLOC=system, off Linux or without glibc. Only allocations
    made after the call are served from the heap; call it before the first large tensor."""
    global _applied
    if malloc_policy() == "system":
        return False
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Trimming first: with mmap off and trimming on, a freed block at the heap's top would still
    # be handed back. mallopt returns 1 on success.
    _applied = mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
    return _applied


def describe() -> str:
    """One line for `rbkd info`: what this process does with freed memory."""
    if _applied:
        return "kept for reuse (RBKD_MALLOC=keep)"
    policy = malloc_policy()
    if policy == "system":
        return "glibc's defaults (RBKD_MALLOC=system)"
    return "glibc's defaults (keep_freed_memory() not called, or no glibc here)"
