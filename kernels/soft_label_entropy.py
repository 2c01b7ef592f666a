"""Shannon entropy (nats) of soft labels, for K temperatures in one pass over each row.

    kind 0 (logits): H_k = -sum_j p_j log p_j with p = softmax(x / T_k), for every T_k in temps
    kind 1 (probs):  rows taken as they are; temps (all 1) only set K, every row of out is the
                     same; 0 * log 0 = 0
    out[K, N] float32, divided by log(C) when normalize (0 when C == 1)

The entropy sweep over temperatures is the point of this op, so a row is read once for all K:
each column block is loaded once and expanded into a [K_PAD, BLOCK] tile of exponentials.
Per temperature the program carries an online pair (D, B) relative to the running max m of x:

    D = sum exp(u_j),  B = sum exp(u_j) * u_j,  u_j = (x_j - m) / T,   H = log D - B / D

(B <= 0, so H is a sum of two non-negative terms: no cancellation). When the max moves from m
to m' every u shifts by c = (m - m') / T: D <- e^c D, B <- e^c (B + c D).

The non-finite rule (README): a row with NaN or +inf or no finite value, a temperature that is
not finite and > 0, or (kind 1) a row whose mass is off 1 by more than probs_tol has entropy NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
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
    x_ptr, x_row_stride, temps_ptr, K, out_ptr, N, C, inv_log_c,
    K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    cols = tl.arange(0, BLOCK)
    ks = tl.arange(0, K_PAD)
    kmask = ks < K
    # Padding temperatures compute with T = 1 and are never stored; bad ones too, then give NaN.
    temps = tl.load(temps_ptr + ks, mask=kmask, other=1.0)
    t_ok = (temps > 0.0) & (temps < float("inf"))
    inv_t = 1.0 / tl.where(t_ok, temps, 1.0)

    # The max is a property of x, shared by all temperatures (T > 0); a scalar per row.
    m = tl.full([], NEG_FLT_MAX, tl.float32)
    D = tl.zeros([K_PAD], tl.float32)
    B = tl.zeros([K_PAD], tl.float32)
    for start in range(0, C, BLOCK):
        offs = start + cols
        x = tl.load(x_row + offs, mask=offs < C, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        c = (m - m_new) * inv_t
        e_c = tl.exp(c)
        # e_c == 0: the old terms vanish (and c * D could be 0 * inf on the first block).
        B = tl.where(e_c > 0.0, e_c * (B + c * D), 0.0)
        D = e_c * D
        u = (x[None, :] - m_new) * inv_t[:, None]
        e = tl.exp(u)
        D += tl.sum(e, 1)
        # -inf entries: e = 0 and u = -inf; their term is 0, not 0 * inf.
        B += tl.sum(tl.where(e > 0.0, e * u, 0.0), 1)
        m = m_new
    H = tl.log(D) - B / D
    # A finite max gives D >= 1; NaN entries make D NaN, no finite entry leaves it 0, and +inf
    # makes D NaN through inf - inf.
    ok = (D >= 1.0) & t_ok
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


def soft_label_entropy_forward(
    x: torch.Tensor,
    temps: torch.Tensor | None,
    kind: int,
    normalize: bool,
    probs_tol: float = 1e-3,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Entropies of the rows of x ([N, C], unit column stride) as float32 [K, N].

    kind 0: x are logits and temps a float32 [K] tensor on x's device (K >= 1).
    kind 1: x are probabilities; only temps' length K is used (K = 1 when temps is None).
    """
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
    k_pad = triton.next_power_of_2(K)
    # The [K_PAD, BLOCK] tile of exponentials bounds the block: more temperatures, narrower
    # blocks, same registers. At least 16 columns keeps the loads vectorized.
    block = pick_block(C, max(16, MAX_TILE_ENTROPY // k_pad), block_size)
    temps = temps.to(device=x.device, dtype=torch.float32).contiguous()
    with device_guard(x):
        _entropy_logits_kernel[(N,)](
            x, x.stride(0), temps, K, out, N, C, inv_log_c,
            K_PAD=k_pad, BLOCK=block, num_warps=num_warps or pick_num_warps(k_pad * block),
        )  # fmt: skip
    return out
