"""Temperature softmax / log-softmax over the last dimension, forward and backward.

    forward:  y = softmax(x / T) or log_softmax(x / T), float32 math, y in x's dtype
    backward: softmax      grad_in = y * (g - sum(g * y)) / T
              log_softmax  grad_in = (g - exp(y) * sum(g)) / T

One program per row, two passes over the row in column blocks: the first builds the row's
normalizer with an online (running-max, rescaled-sum) accumulation, the second writes. The second
read of a row mostly hits L2, since rows are at most a few hundred KB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    MAX_BLOCK_SOFTMAX,
    NEG_FLT_MAX,
    device_guard,
    lane_lse_combine,
    online_lse_update,
    pick_block,
    pick_num_warps,
    row_param,
)


@triton.jit
def _temperature_softmax_fwd_kernel(
    x_ptr,
    x_row_stride,
    out_ptr,
    C,
    T_ptr,
    T_scalar,
    T_ROWS: tl.constexpr,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 row offsets: N * C passes 2^31 at realistic LLM shapes (8192 x 256k).
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * C
    cols = tl.arange(0, BLOCK)
    inv_t = 1.0 / tl.load(T_ptr + row) if T_ROWS else 1.0 / T_scalar

    m = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        offs = start + cols
        x = tl.load(x_row + offs, mask=offs < C, other=float("-inf")).to(tl.float32)
        m, d = online_lse_update(m, d, x, inv_t)
    M, D = lane_lse_combine(m, d, inv_t)
    log_d = tl.log(D)

    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        y = (x - M) * inv_t - log_d
        if not LOG:
            y = tl.exp(y)
        tl.store(out_row + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _temperature_softmax_bwd_kernel(
    y_ptr,
    g_ptr,
    g_row_stride,
    gi_ptr,
    C,
    T_ptr,
    T_scalar,
    T_ROWS: tl.constexpr,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * C
    g_row = g_ptr + row * g_row_stride
    gi_row = gi_ptr + row * C
    cols = tl.arange(0, BLOCK)
    inv_t = 1.0 / tl.load(T_ptr + row) if T_ROWS else 1.0 / T_scalar

    # First pass: the row reduction, sum(g * y) for softmax, sum(g) for log_softmax.
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        g = tl.load(g_row + offs, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            acc += g
        else:
            y = tl.load(y_row + offs, mask=mask, other=0.0).to(tl.float32)
            acc += g * y
    total = tl.sum(acc, 0)

    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        g = tl.load(g_row + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + offs, mask=mask, other=0.0).to(tl.float32)
        gi = (g - tl.exp(y) * total) * inv_t if LOG else y * (g - total) * inv_t
        tl.store(gi_row + offs, gi.to(gi_ptr.dtype.element_ty), mask=mask)


def temperature_softmax_forward(
    x: torch.Tensor,
    T: float | torch.Tensor,
    log: bool,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """softmax(x / T) (or log_softmax) over the last dim of a 2-D x with unit column stride.

    T: float, or float32 [N] per-row temperatures on x's device. Returns a contiguous [N, C]
    tensor in x's dtype.
    """
    N, C = x.shape
    out = torch.empty((N, C), dtype=x.dtype, device=x.device)
    if N == 0 or C == 0:
        return out
    T_ptr, T_scalar, T_rows = row_param(T, x)
    block = pick_block(C, MAX_BLOCK_SOFTMAX, block_size)
    with device_guard(x):
        _temperature_softmax_fwd_kernel[(N,)](
            x, x.stride(0), out, C, T_ptr, T_scalar,
            T_ROWS=T_rows, LOG=bool(log), BLOCK=block,
            num_warps=num_warps or pick_num_warps(block),
        )  # fmt: skip
    return out


def temperature_softmax_backward(
    y: torch.Tensor,
    grad: torch.Tensor,
    T: float | torch.Tensor,
    log: bool,
    block_size: int | None = None,
) -> torch.Tensor:
    """Gradient wrt x of temperature_softmax_forward, given its contiguous output y and the
    upstream gradient (any row stride). Returns a contiguous [N, C] tensor in y's dtype."""
    N, C = y.shape
    y = y.contiguous()  # no-op for the forward's own output
    grad_in = torch.empty((N, C), dtype=y.dtype, device=y.device)
    if N == 0 or C == 0:
        return grad_in
    T_ptr, T_scalar, T_rows = row_param(T, y)
    block = pick_block(C, MAX_BLOCK_SOFTMAX, block_size)
    with device_guard(y):
        _temperature_softmax_bwd_kernel[(N,)](
            y, grad, grad.stride(0), grad_in, C, T_ptr, T_scalar,
            T_ROWS=T_rows, LOG=bool(log), BLOCK=block, num_warps=pick_num_warps(block),
        )  # fmt: skip
    return grad_in
