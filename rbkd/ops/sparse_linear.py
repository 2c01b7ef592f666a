"""sparse_kd_loss_from_hidden: sparse_kd_loss of the logits hidden @ weight.T + bias, computed in
chunks of rows so that the [N, V] logits never exist at once (issue 16, item 4).

Liger-Kernel's fused-linear-loss idea, written anew: for each chunk of rows the forward pass
computes the chunk's logits, its loss rows and their gradient (sparse_kd_loss_impl: the same op,
checks and backend as sparse_kd_loss), and at once folds that gradient into grad_hidden (the
chunk's rows) and grad_weight / grad_bias (sums over rows); the chunk's logits and gradient are
then dropped. With a scalar reduction ("mean", "sum") backward only scales those three by the
incoming gradient, which saves recomputing the logits. reduction="none" gets one incoming
gradient per row, known only in backward: there forward computes the loss rows alone and backward
recomputes each chunk's logits (one more matmul per chunk).

Memory beside hidden, weight and their gradients: one chunk's logits and gradient ([chunk_rows, V]
each, in the input dtype; a float32 grad_weight accumulator for half precision) and the op's own
fixed working set (sparse_twin.CHUNK_ELEMENTS), instead of [N, V] logits and their gradient.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rbkd.ops import validation as v
from rbkd.ops.args import KDOptions
from rbkd.ops.library import scale_saved_grad
from rbkd.ops.sparse import _check_values, impl_args, prepare, sparse_kd_loss, sparse_kd_loss_impl

__all__ = ["default_chunk_rows", "sparse_kd_loss_from_hidden"]

_NONE = v.REDUCTIONS["none"]
_TENSOR_ARGS = (0, 1, 2, 3, 4, 6, 11, 12)  # prepare()'s per-row tensors (ids ... sample_logz)
_OPTIONS = {
    name
    for name, p in inspect.signature(sparse_kd_loss).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


def default_chunk_rows(n: int, vocab: int, hidden: int) -> int:
    """Rows per chunk, a power of two: the larger of Liger's rule (chunk logits about as large as
    the hidden states, n H entries) and about 2^23 logits (32 MiB in float32). Each chunk reads
    the whole weight twice and writes grad_weight once, so small chunks are bound by that traffic:
    at N = 1024, V = 32000, H = 256 on this CPU, 16 rows took 2.0x the unchunked time and 256
    rows 0.95x. 256 rows at N = 8192, V = 32000, H = 256 and at V = 128256, H = 4096."""
    liger = math.ceil(n / math.ceil(vocab / max(hidden, 1)))
    budget = 1 << max(0, (2**23 // vocab).bit_length() - 1)  # a power of two <= 2^23 / V
    rows = max(1 << max(0, liger - 1).bit_length(), budget)
    return max(1, min(n, rows))


def sparse_kd_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    topk_ids: Tensor,
    topk_logits: Tensor,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    chunk_rows: int | None = None,
    **options,
) -> Tensor:
    """sparse_kd_loss(hidden @ weight.T + bias, topk_ids, topk_logits, labels, **options) without
    the [..., V] logits: hidden [..., H] (float32, float16 or bfloat16), weight [V, H] and bias [V]
    or None of its dtype and device; the gradient reaches hidden, weight and bias. options: every
    keyword of sparse_kd_loss (logz, T, alpha, tail, divergence, reduction, sample_counts, ...),
    with its meaning and checks. chunk_rows: rows per chunk (default: default_chunk_rows, Liger's
    rule). The result equals sparse_kd_loss on the full logits up to the rounding of the matmul's
    summation order; a NaN row of the loss makes grad_weight NaN, as autograd through F.linear
    would."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(
            f"sparse_kd_loss_from_hidden got an unexpected keyword argument {unknown[0]!r}"
        )
    v.check_float_tensor("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., H], the student's last hidden states")
    v.check_float_tensor("weight", weight)
    size = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != size or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be [V, H] = [V, {size}] (the output projection, V >= 1), got "
            f"{list(weight.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != hidden.dtype or t.device != hidden.device:
            raise ValueError(
                f"{name} is {str(t.dtype)[6:]} on {t.device} but hidden is "
                f"{str(hidden.dtype)[6:]} on {hidden.device}; they must match"
            )
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must be [V] = [{vocab}] or None, got {list(bias.shape)}")
    lead = hidden.shape[:-1]
    n = lead.numel()
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(n, vocab, size)
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    # A stand-in for the logits (their shape, dtype and device, no memory) for prepare's checks.
    standin = torch.empty((), dtype=hidden.dtype, device=hidden.device).expand(*lead, vocab)
    lead, vocab, args = prepare(standin, topk_ids, topk_logits, labels, **options)
    if v.host_value_checks(hidden.device):  # once over every row, so errors name global rows
        opts = KDOptions.decode(args[10])
        _check_values(standin.reshape(n, vocab), *args[:7], opts, args[9], args[11:])
    tensors = (hidden, weight, bias)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    loss = SparseKDLossFromHidden.apply(
        hidden.reshape(n, size), weight, bias, chunk_rows, args, need_grad
    )
    return loss.reshape(lead) if args[8] == _NONE else loss


def _mean_scale(args: tuple, n: int) -> float | Tensor:
    """The mean's 1 / (rows that count), a device tensor with labels (no host read)."""
    labels, ignore_index = args[3], KDOptions.decode(args[10]).ignore_index
    if labels is None:
        return 1.0 / max(n, 1)
    return (labels != ignore_index).sum().clamp_min(1).to(torch.float32).reciprocal()


def _chunk_args(args: tuple, rows: slice) -> tuple:
    out = list(args)
    for i in _TENSOR_ARGS:
        if out[i] is not None:
            out[i] = out[i][rows]
    out[8] = _NONE  # the op's per-row losses and unscaled per-row gradients
    return tuple(out)


def _run(hidden, weight, bias, chunk_rows, args, wants, scale):
    """(loss rows [N] float32, grad_hidden, grad_weight, grad_bias), each gradient None unless
    `wants` says so; scale: the gradient's factor, a float or tensor scalar, or [N] per row."""
    n = hidden.shape[0]
    need = any(wants)
    grad_h = torch.empty_like(hidden) if wants[0] else None
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if wants[1] else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if wants[2] else None
    losses = []
    for r0 in range(0, n, chunk_rows):
        rows = slice(r0, min(n, r0 + chunk_rows))
        h = hidden[rows]
        logits = F.linear(h, weight, bias)
        try:
            loss, grad = sparse_kd_loss_impl(*impl_args(logits, need, _chunk_args(args, rows)))
        except ValueError as e:  # a check on the chunk's logits (RBKD_CHECKS=full)
            raise ValueError(f"rows [{rows.start}, {rows.stop}): {e}") from None
        del logits
        losses.append(loss)
        if not need:
            continue
        if isinstance(scale, Tensor):  # the mean's count (a scalar) or backward's rows [N]
            grad.mul_((scale[rows].reshape(-1, 1) if scale.dim() else scale).to(grad.dtype))
        elif scale != 1.0:
            grad.mul_(scale)
        if grad_h is not None:
            grad_h[rows] = grad @ weight
        if grad_w is not None:  # in place: a [V, H] temporary per chunk cost 2x at 16 rows
            if grad_w.dtype == grad.dtype:
                grad_w.addmm_(grad.t(), h)
            else:  # half precision into the float32 accumulator
                grad_w.add_(grad.t() @ h)
        if grad_b is not None:
            grad_b.add_(grad.sum(0, dtype=acc))
        del grad
    loss = torch.cat(losses) if losses else hidden.new_zeros((0,), dtype=torch.float32)
    grad_w = None if grad_w is None else grad_w.to(weight.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return loss, grad_h, grad_w, grad_b


class SparseKDLossFromHidden(torch.autograd.Function):
    """The autograd path of sparse_kd_loss_from_hidden (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_rows, args, need_grad):
        n, red = hidden.shape[0], args[8]
        wants = tuple(
            bool(need_grad and t is not None and t.requires_grad) for t in (hidden, weight, bias)
        )
        scale = _mean_scale(args, n) if red == v.REDUCTIONS["mean"] else 1.0
        ctx.chunk_rows, ctx.args, ctx.wants, ctx.red = chunk_rows, args, wants, red
        if red == _NONE:  # per-row incoming gradients: backward recomputes
            rows, *_ = _run(hidden, weight, bias, chunk_rows, args, (False,) * 3, 1.0)
            ctx.save_for_backward(hidden, weight, bias)
            return rows
        rows, *grads = _run(hidden, weight, bias, chunk_rows, args, wants, scale)
        ctx.saved_grads = grads if any(wants) else None
        return rows.sum() * scale if red == v.REDUCTIONS["mean"] else rows.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        nones = (None,) * 3
        if ctx.red == _NONE:
            hidden, weight, bias = ctx.saved_tensors
            scale = grad_loss.to(torch.float32)
            _, *grads = _run(hidden, weight, bias, ctx.chunk_rows, ctx.args, ctx.wants, scale)
            return (*grads, *nones)
        grads = ctx.saved_grads
        if grads is None:
            raise RuntimeError(
                "sparse_kd_loss_from_hidden: a second backward through the same call is not "
                "supported (the first handed its gradients on); call it again"
            )
        ctx.saved_grads = None
        return (*(None if g is None else scale_saved_grad(g, grad_loss) for g in grads), *nones)
