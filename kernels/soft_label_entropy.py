"""Shannon entropy (nats) of soft labels, for K temperatures in one pass over each row.

    kind 0 (logits): H_k = -sum_j p_j log p_j with p = softmax(x / T_k), for every T_k in temps
    kind 1 (probs):  rows taken as they are; temps (all 1) only set K, every row of out is the
                     same; 0 * log 0 = 0
    out[K, N] float32, divided by log(C) when normalize (0 when C == 1)

The entropy sweep over temperatures is the point of this op, and it is bound by exponentials
(K per element), not by memory. A program owns one row and a chunk of KC temperatures (the grid is
rows x chunks, a row's chunks next to each other so its re-reads hit L2). Pass 1 finds the row's
max m (no exponential); pass 2 accumulates, per lane and per temperature,

    D = sum exp(u_j),  B = sum exp(u_j) * u_j,  u_j = (x_j - m) / T,   H = log D - B / D

in a [KC, BLOCK] tile, reduced across lanes once at the end (B <= 0, so H is a sum of two
non-negative terms: no cancellation). Measured on an H200 (bench/results/gpu-h200-2026-12-04.md):
the one-pass form with a running max, which rescaled and reduced the tile at every block, ran
2.6-7x slower; so did padding K to a power of two (20 temperatures as 32).

The non-finite rule (README): a row with NaN or +inf or no finite value, a temperature that is
not finite and > 0, or (kind 1) a row whose mass is off 1 by more than probs_tol has entropy NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rbkd.ops.args import EntropyOptions

from ._launch import (
    ENTROPY_COLS,
    MAX_BLOCK_SOFTMAX,
    MAX_TILE_ENTROPY,
    NEG_FLT_MAX,
    device_guard,
    inv_log_classes,
    pick_block,
    pick_num_warps,
)

KIND_LOGITS, KIND_PROBS = 0, 1


@triton.jit
def _entropy_logits_kernel(
    x_ptr, x_row_stride, temps_ptr, K, n_chunks, out_ptr, N, C, inv_log_c,
    KC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One grid axis (the second is capped at 65535); a row's chunks are neighbours.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    chunk = pid % n_chunks
    x_row = x_ptr + row * x_row_stride
    cols = tl.arange(0, BLOCK)
    ks = chunk * KC + tl.arange(0, KC)
    kmask = ks < K
    # Padding temperatures compute with T = 1 and are never stored; bad ones too, then give NaN.
    temps = tl.load(temps_ptr + ks, mask=kmask, other=1.0)
    t_ok = (temps > 0.0) & (temps < float("inf"))
    inv_t = 1.0 / tl.where(t_ok, temps, 1.0)

    # Pass 1: the max is a property of x, shared by all temperatures (T > 0).
    m_lanes = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    for start in range(0, C, BLOCK):
        offs = start + cols
        x = tl.load(x_row + offs, mask=offs < C, other=float("-inf")).to(tl.float32)
        m_lanes = tl.maximum(m_lanes, x)
    m = tl.max(m_lanes, 0)

    # Pass 2: u <= 0 everywhere, so no rescaling and no cross-lane work inside the loop.
    D = tl.zeros([KC, BLOCK], tl.float32)
    B = tl.zeros([KC, BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        offs = start + cols
        x = tl.load(x_row + offs, mask=offs < C, other=float("-inf")).to(tl.float32)
        u = (x[None, :] - m) * inv_t[:, None]
        e = tl.exp(u)
        D += e
        # -inf entries: e = 0 and u = -inf; their term is 0, not 0 * inf.
        B += tl.where(e > 0.0, e * u, 0.0)
    D_row = tl.sum(D, 1)
    H = tl.log(D_row) - tl.sum(B, 1) / D_row
    # A finite max gives D >= 1 (the max adds exp(0)); NaN entries make D NaN, no finite entry
    # leaves it 0, and +inf makes it NaN through inf - inf.
    ok = (D_row >= 1.0) & t_ok
    H = tl.where(ok, H * inv_log_c, float("nan"))
    tl.store(out_ptr + ks.to(tl.int64) * N + row, H, mask=kmask)


@triton.jit
def _entropy_probs_kernel(
    x_ptr, x_row_stride, out_ptr, K, N, C, inv_log_c, probs_tol, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    mass = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        offs = start + cols
        p = tl.load(x_row + offs, mask=offs < C, other=0.0).to(tl.float32)
        acc += tl.where(p > 0.0, -p * tl.log(p), 0.0)
        mass += p
    ok = tl.abs(tl.sum(mass, 0) - 1.0) <= probs_tol  # NaN and inf fail it
    H = tl.where(ok, tl.sum(acc, 0) * inv_log_c, float("nan"))
    # The op's shape is [K, N] whatever the kind; K copies cost K scalar stores per row.
    out_k = out_ptr + row
    for _ in range(0, K):
        tl.store(out_k, H)
        out_k += N  # pointer arithmetic is 64-bit: K * N may pass 2^31


def temperature_chunk(K: int) -> int:
    """Temperatures per program: 4 (no padding for the usual 20, and a tile that stays in
    registers), fewer when K is smaller."""
    return min(4, triton.next_power_of_2(K))


def soft_label_entropy_forward(
    x: torch.Tensor,
    temps: torch.Tensor | None,
    opts: EntropyOptions,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Entropies of the rows of x ([N, C], unit column stride) as float32 [K, N]; opts: the op's
    options (rbkd.ops.args.EntropyOptions: kind, normalize, probs_tol).

    kind 0: x are logits and temps a float32 [K] tensor on x's device (K >= 1).
    kind 1: x are probabilities; only temps' length K is used (K = 1 when temps is None).
    """
    kind, normalize, probs_tol = opts.kind, opts.normalize, opts.probs_tol
    N, C = x.shape
    inv_log_c = inv_log_classes(C, normalize)
    if kind == KIND_PROBS:
        K = 1 if temps is None else temps.numel()
        out = torch.empty((K, N), dtype=torch.float32, device=x.device)
        if N == 0 or K == 0:
            return out
        if C == 0:
            return out.zero_()
        block = pick_block(C, MAX_BLOCK_SOFTMAX, block_size)
        with device_guard(x):
            _entropy_probs_kernel[(N,)](
                x, x.stride(0), out, K, N, C, inv_log_c, float(probs_tol),
                BLOCK=block, num_warps=pick_num_warps(block),
            )  # fmt: skip
        return out
    if kind != KIND_LOGITS:
        raise ValueError(f"kind must be 0 (logits) or 1 (probs), got {kind}")
    if temps is None:
        raise ValueError("temps (float32 [K] on x's device) is required for kind 0 (logits)")
    K = temps.numel()
    out = torch.empty((K, N), dtype=torch.float32, device=x.device)
    if N == 0 or K == 0:
        return out
    if C == 0:
        return out.zero_()
    kc = temperature_chunk(K)
    # The [KC, BLOCK] tile of exponentials bounds the block: more temperatures per program,
    # narrower blocks, same registers.
    block = pick_block(C, max(16, MAX_TILE_ENTROPY // kc), block_size)
    temps = temps.to(device=x.device, dtype=torch.float32).contiguous()
    with device_guard(x):
        n_chunks = triton.cdiv(K, kc)
        _entropy_logits_kernel[(n_chunks * N,)](
            x, x.stride(0), temps, K, n_chunks, out, N, C, inv_log_c,
            KC=kc, BLOCK=block, num_warps=num_warps or pick_num_warps(kc * block, ENTROPY_COLS),
        )  # fmt: skip
    return out
