"""Launch heuristics and device-side helpers shared by the Triton ops of rbkd.kernels.

Every kernel here is memory bound: one program owns one row and walks it in column blocks of
BLOCK elements, so BLOCK bounds the registers a program needs whatever C is (C up to 256k and
beyond only adds loop iterations).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

# Online-softmax lanes start at -FLT_MAX rather than -inf: a -inf input then gives exp(-inf) = 0
# instead of the NaN of (-inf) - (-inf), so rows holding -inf entries need no extra branch.
NEG_FLT_MAX = tl.constexpr(-3.4028234663852886e38)

# A column block covers at most this many elements.  Measured on an H200 (bench/gpu_tune.py,
# bench/results/gpu-h200-2026-12-04*): the KD kernel runs fastest at 1024 columns and 8 warps
# (4 columns per thread; 2048 columns, the former register-budget choice, was 10-20% slower at
# 16384 x 32000 and 8192 x 128256 bf16), the softmax kernels at 4096 columns and 16 warps.
MAX_BLOCK_SOFTMAX = 4096
MAX_BLOCK_KD = 1024
KD_COLS = 128  # columns per warp: 1024 columns take 8 warps
# The entropy kernel holds [KC, BLOCK] tiles of exponentials; this caps the tile size, and
# ENTROPY_COLS (tile elements per warp) sets its warps. Bound by exponentials, not memory, it
# wants fewer threads per element than the streaming kernels.
MAX_TILE_ENTROPY = 1024  # 4 temperatures x 256 columns on 2 warps: best of the H200 sweep
ENTROPY_COLS = 512


def pick_block(C: int, max_block: int, override: int | None = None) -> int:
    """Column block: the row itself when it fits (one loop iteration), else `max_block`.

    `override` (a power of two) lets tests force several blocks on a small C to exercise the
    online accumulation across blocks.
    """
    if override is not None:
        if override < 1 or override & (override - 1):
            raise ValueError(f"block_size must be a power of two, got {override}")
        return override
    return min(triton.next_power_of_2(max(C, 1)), max_block)


def pick_num_warps(block: int, per_warp: int = 256) -> int:
    """Eight columns per thread: a bf16/fp16 thread then issues one 16-byte vector load per
    block and a float32 one two, the width the memory system serves best.  Capped at 16 warps so
    a program still fits twice per SM alongside its registers.  Small C (10 classes) gets one
    warp per row with idle lanes; such batches are a few MB and launch-latency bound, so packing
    several rows per program would not show."""
    return max(1, min(16, block // per_warp))


def row_param(value: float | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(pointer tensor, scalar, is_per_row) for a parameter given as float or float32 [N] tensor.

    When the value is a scalar the pointer argument is a dummy (`like`), never read: the kernel
    takes the branch chosen by the constexpr flag.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError("per-row parameters must be float32 [N] tensors, not 0-dim")
        return value, 1.0, True
    return like, float(value), False


def device_guard(t: torch.Tensor):
    """Triton launches on the *current* CUDA device; make that the tensor's one."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def inv_log_classes(C: int, normalize: bool) -> float:
    """Factor applied to entropies: 1/log(C) when normalizing, 0 for C == 1 (entropy 0 there)."""
    if not normalize:
        return 1.0
    return 1.0 / math.log(C) if C > 1 else 0.0


@triton.jit
def online_lse_update(m, d, x, scale):
    """One step of a per-lane online log-sum-exp of x * scale, with one exp per element.

    m: running max of x per lane (untempered), d: sum of exp((x_seen - m) * scale).  Only one of
    the two exponentials of the textbook update is not trivially 1: if x is the new max the old
    sum is rescaled by exp((m - x) * scale) and x adds 1, else x adds exp((x - m) * scale).
    """
    e = tl.exp(-tl.abs(x - m) * scale)
    d = tl.where(x > m, d * e + 1.0, d + e)
    return tl.maximum(m, x), d


@triton.jit
def lane_lse_combine(m, d, scale):
    """Fold the per-lane (max, sum) into the row's max M and sum D of exp((x - M) * scale).

    Untouched lanes hold (-FLT_MAX, 0) and contribute 0.
    """
    M = tl.max(m, 0)
    D = tl.sum(d * tl.exp((m - M) * scale), 0)
    return M, D
