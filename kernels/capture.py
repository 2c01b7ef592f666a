"""capture_soft_labels on the GPU (issue 16): logz and entropy at J temperatures in one read per row.

    logz_j = log sum_v exp(z_v / T_j),   H_j = -sum_v p_v log p_v,  p = softmax(z / T_j)

The top-k is the simplest correct thing: torch.topk on the device gives the ids (ties as torch
breaks them, like the twin) and a gather their raw logits; a per-block top-k merged across blocks
in the kernel is not written (yet). The samples stay in torch (rbkd/ops/capture.py's _sample).

The kernel: one program per row, one pass in column blocks, with a [JPAD, BLOCK] tile of per-lane,
per-temperature running sums, all sharing the lane's running max m of the raw logits:

    D_j = sum exp(w),  A_j = sum exp(w) w,   w = (z - m) / T_j,   H_j = log D_j - A_j / D_j

With the online-softmax trick of _launch.online_lse_update, one exp per element and temperature:
e = exp(-|z - m| / T_j) is either the new element's term (z <= m) or the old sums' rescale (z > m,
the new element adding w = 0); A is rescaled with the shift, A' = (A - delta D) e, delta = (z - m) / T_j.
The lanes are combined once at the end with the row's max. (kernels/soft_label_entropy.py reads
the row twice, a max pass first, and measured the one-pass form there 2.6-7x slower on an H200;
that form rescaled and reduced the tile at every block, this one never reduces inside the loop. Not
yet measured on a GPU: bench/gpu.sh's capture case.)

The non-finite rule: a row with NaN or +inf or no finite value gets NaN logz and entropy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import NEG_FLT_MAX, device_guard, pick_block, pick_num_warps

# The [JPAD, BLOCK] tile holds 3 float32 sums per element: 4096 elements on 8 warps is 48 floats a
# thread (a guess in the range of the entropy kernel's tile; not tuned on a GPU).
MAX_TILE_CAPTURE = 4096
CAPTURE_COLS = 512  # tile elements per warp


@triton.jit
def _capture_kernel(
    x_ptr, x_row_stride, temps_ptr, J, logz_ptr, ent_ptr, V,
    JPAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    cols = tl.arange(0, BLOCK)
    js = tl.arange(0, JPAD)
    # Padding temperatures compute with T = 1 and are never stored.
    inv_t = 1.0 / tl.load(temps_ptr + js, mask=js < J, other=1.0)
    inv_t2 = inv_t[:, None]

    m = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d = tl.zeros([JPAD, BLOCK], tl.float32)
    a = tl.zeros([JPAD, BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        z = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        up = (z > m)[None, :]
        w = -tl.abs(z - m)[None, :] * inv_t2  # <= 0; -inf for a -inf element
        e = tl.exp(w)
        # z > m: the old sums shift by delta = -w (a lane's first value: d = a = 0, kept 0 even
        # where w is -inf against m = -FLT_MAX at a small T); else the element adds e and e w.
        a = tl.where(up, tl.where(d > 0.0, (a + w * d) * e, 0.0), a + tl.where(e > 0.0, e * w, 0.0))
        d = tl.where(up, d * e + 1.0, d + e)
        m = tl.maximum(m, z)

    M = tl.max(m, 0)
    w = (m - M)[None, :] * inv_t2
    f = tl.exp(w)
    live = d > 0.0
    D = tl.sum(d * f, 1)
    A = tl.sum(tl.where(live, (a + w * d) * f, 0.0), 1)
    # A finite max gives D >= 1; NaN entries make D NaN, +inf NaN through inf - inf, none finite 0.
    ok = D >= 1.0
    logz = tl.where(ok, M * inv_t + tl.log(D), float("nan"))
    ent = tl.where(ok, tl.log(D) - A / D, float("nan"))
    tl.store(logz_ptr + row * J + js, logz, mask=js < J)
    tl.store(ent_ptr + row * J + js, ent, mask=js < J)


def capture_logz_entropy(x: torch.Tensor, temps: list[float], block_size: int | None = None):
    """(logz [N, J], entropy [N, J]) float32 of x [N, V] (float32 / float16 / bfloat16, unit column
    stride) at the temperatures `temps` (finite, > 0, checked by the caller)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, vocab = x.shape
    j = len(temps)
    logz = torch.empty(n, j, dtype=torch.float32, device=x.device)
    entropy = torch.empty(n, j, dtype=torch.float32, device=x.device)
    if n == 0:
        return logz, entropy
    t = torch.tensor(temps, dtype=torch.float32).to(x.device, non_blocking=True)
    jpad = triton.next_power_of_2(j)
    block = pick_block(vocab, max(16, MAX_TILE_CAPTURE // jpad), block_size)
    with device_guard(x):
        _capture_kernel[(n,)](
            x, x.stride(0), t, j, logz, entropy, vocab, JPAD=jpad, BLOCK=block,
            num_warps=pick_num_warps(jpad * block, CAPTURE_COLS),
        )  # fmt: skip
    return logz, entropy


def capture_forward(x: torch.Tensor, k: int, temps: list[float], block_size: int | None = None):
    """(topk ids [N, k] int32 by descending logit, their raw logits [N, k] in x's dtype, logz
    [N, J], entropy [N, J]): torch.topk for the ids, the kernel for the rest."""
    top = x.topk(k, -1).indices  # on x's own values: the stored logits are exactly x's
    logz, entropy = capture_logz_entropy(x, temps, block_size)
    return top.int(), x.gather(1, top), logz, entropy
