"""sparse_kd_loss: kd_loss against a teacher stored as its top-k (issue 16).

The public function checks its arguments and calls the op registered with torch.library
(`rbkd::sparse_kd_loss`, with a fake implementation so torch.compile traces it), whose autograd
path is SparseKDLoss, as kd_loss's is KDLoss. The implementation runs the backend's
`sparse_kd_forward` (CPU tensors: the C++ kernel, csrc/cpu/sparse_kd_cpu.cpp, for tail bucket and
renormalize) or, where the backend has none, the pure-torch twin (rbkd/ops/sparse_twin.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rbkd.ops import library
from rbkd.ops import validation as v
from rbkd.ops.args import KDOptions
from rbkd.ops.dispatch import select_backend
from rbkd.ops.sparse_sampled import check_sampled_values
from rbkd.ops.sparse_twin import TAIL_MODES, sparse_kd_forward

__all__ = ["TAIL_MODES", "sparse_kd_loss"]

_MEAN, _SUM, _NONE = v.REDUCTIONS["mean"], v.REDUCTIONS["sum"], v.REDUCTIONS["none"]
ID_DTYPES = (torch.int32, torch.int64)
# Divergences with probability 0 outside the teacher's k ids (tail="renormalize") where the
# student has mass: KL(p_s || q) is infinite there.
_REVERSE = ("reverse_kl",)


def sparse_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logits: Tensor,
    labels: Tensor | None = None,
    *,
    logz: Tensor | None = None,
    T: float | Tensor = 1.0,
    alpha: float | Tensor = 0.9,
    t_squared: bool = True,
    tail: str = "bucket",
    divergence: str = "kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    standardize: bool = False,
    sample_counts: Tensor | None = None,
    sample_T: float | None = None,
    sample_logz: Tensor | None = None,
) -> Tensor:
    """kd_loss of student logits [..., V] against a teacher known on k ids per row.

    topk_ids [..., k] (int32 or int64, distinct ids in [0, V)) and topk_logits [..., k] are the
    teacher's kept ids and raw logits (at T = 1); logz [...] or [..., 1] is the teacher's
    full-vocabulary log-partition log sum_v exp(z_v / T) at this T (rbkd.ops.capture_soft_labels
    gives it). Per row, with p_s = softmax(z / T) over all V ids:

        L = (1 - alpha) CE(z, y) + alpha s D(Q, P),  s = T**2 if t_squared else 1

    tail="bucket" (needs logz): Q and P on k + 1 buckets, the kept ids and the rest.
    Q_i = exp(t_i / T - logz), Q_tail = 1 - sum Q_i (at least 2**-24, float32's resolution of it;
    no tail when k = V, where this is kd_loss exactly); P_i = p_s[id_i], P_tail = 1 - sum P_i.
    tail="renormalize" (DistillKit's default, "ZERO"; logz unused): Q = softmax(t / T) over the k
    ids and 0 elsewhere, against the student's full p_s, i.e. the full-vocabulary divergence
    against the zero-padded teacher (DistillKit compares log q with the student's full-vocabulary
    log-softmax gathered at the ids: the same number for kl and jsd).
    tail="sampled" (Sparse Logit Sampling's unbiased estimator; divergence "kl" only): topk_ids
    are ids sampled from the teacher at sample_T (capture_soft_labels's sample_ids, -1 padding),
    topk_logits the teacher's raw logits at them, sample_counts [..., s] (int32 or int64) their
    counts (0 padding), logz the teacher's log-partition at T and sample_T the temperature they
    were drawn at (required: a wrong one biases silently). At T != sample_T (or a per-row T) the
    importance weights p_T / p_sample_T also need sample_logz, the log-partition at sample_T.
    D is then an estimate whose value and gradient are, in expectation over the draws, the exact
    KL(p_t || p_s) at T and its gradient (rbkd/ops/sparse_sampled.py).

    divergence: "kl", "reverse_kl", "jsd" (beta), "skew_kl", "skew_reverse_kl" (skew), "tvd", as
    kd_loss, on the buckets. Not defined here: "dkd" and standardize=True (they need the teacher's
    full row), with tail="renormalize" and k < V "reverse_kl", "jsd" at beta = 1 and
    "skew_reverse_kl" at skew = 0 (infinite: the student has mass where Q is 0), and with
    tail="sampled" every divergence but "kl". Everything else
    is kd_loss's convention: labels of the leading shape (None: pure distillation, alpha = 1),
    per-row T (at most 100) and alpha tensors, ignore_index rows counting nowhere, reductions,
    a float32 loss and a gradient to student_logits only. Non-finite rule as kd_loss's, where a
    counted row also gets NaN for an id out of range or repeated, a non-finite logz, or (bucket)
    a kept mass sum Q_i above 1 + the tolerance of topk_logits' dtype (1e-3 float32); for CPU
    tensors the ids, labels, T, alpha and that mass are checked on the host (a one-line
    ValueError), and RBKD_CHECKS=full makes NaN rows errors. No host sync on a GPU.
    """
    lead, vocab, args = prepare(
        student_logits, topk_ids, topk_logits, labels, logz=logz, T=T, alpha=alpha,
        t_squared=t_squared, tail=tail, divergence=divergence, beta=beta, skew=skew,
        ignore_index=ignore_index, reduction=reduction, standardize=standardize,
        sample_counts=sample_counts, sample_T=sample_T, sample_logz=sample_logz,
    )  # fmt: skip
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    student = student_logits.reshape(-1, vocab)
    loss = SparseKDLoss.apply(*impl_args(student, need_grad, args))
    return loss.reshape(lead) if args[8] == _NONE else loss


def impl_args(student: Tensor, need_grad: bool, args: tuple) -> tuple:
    """sparse_kd_loss_impl's arguments: student [N, V], need_grad and prepare()'s tuple."""
    return (student, *args[:10], need_grad, *args[10:])


def prepare(
    student_logits, topk_ids, topk_logits, labels=None, *, logz=None, T=1.0, alpha=0.9,
    t_squared=True, tail="bucket", divergence="kl", beta=0.5, skew=0.1, ignore_index=-100,
    reduction="mean", standardize=False, sample_counts=None, sample_T=None, sample_logz=None,
):  # fmt: skip
    """sparse_kd_loss's argument checks: (lead, V, the op's arguments but student and need_grad:
    ids, topk, logz, labels, T_rows, T, alpha_rows, alpha, reduction, tail, options, counts,
    sample_logz, sample_T), rows flattened. student_logits may be a stand-in of the logits' shape,
    dtype and device (sparse_kd_loss_from_hidden passes an expanded 0-d tensor)."""
    tail_code = v.check_choice("tail", tail, TAIL_MODES)
    sampled = tail == "sampled"
    lead, n, vocab, k = _check_inputs(student_logits, topk_ids, topk_logits, labels, sampled)
    red = v.check_choice("reduction", reduction, v.REDUCTIONS)
    device = student_logits.device
    T = v.check_temperature("T", _per_row(T, lead), n, device, v.KD_MAX_TEMPERATURE)
    alpha = v.check_alpha(_per_row(alpha, lead), n, device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    div = _check_divergence(divergence, beta, skew, standardize, tail, k < vocab, labels)
    bucket_or_sampled = tail != "renormalize"  # renormalize does not use logz
    logz = _check_logz("logz", logz, student_logits, lead, tail) if bucket_or_sampled else None
    counts, sample_logz, sample_T = _check_sampling(
        sampled, sample_counts, sample_T, sample_logz, T, topk_ids, student_logits, lead
    )
    opts = KDOptions(
        t_squared=bool(t_squared),
        ignore_index=ignore_index,
        probs_tol=v.probs_tolerance(topk_logits.dtype),
        **div,
    )
    T_rows, T_scalar = (T, 1.0) if isinstance(T, Tensor) else (None, T)
    a_rows, a_scalar = (alpha, 0.0) if isinstance(alpha, Tensor) else (None, alpha)
    args = (
        topk_ids.reshape(n, k),
        topk_logits.detach().reshape(n, k),
        None if logz is None else logz.detach().reshape(n),
        None if labels is None else labels.reshape(n),
        T_rows, T_scalar, a_rows, a_scalar, red, tail_code, opts.encode(),
        None if counts is None else counts.reshape(n, k),
        None if sample_logz is None else sample_logz.detach().reshape(n),
        sample_T,
    )  # fmt: skip
    return lead, vocab, args


def _per_row(value: object, lead: torch.Size) -> object:
    if isinstance(value, Tensor) and value.dim() > 1 and value.shape == lead:
        return value.reshape(-1)
    return value


def _check_inputs(student, ids, topk, labels, sampled):
    v.check_float_tensor("student_logits", student)
    lead, vocab = student.shape[:-1], student.shape[-1]
    if vocab == 0:
        raise ValueError("student_logits must have at least one id in the last dimension (V >= 1)")
    if not isinstance(ids, Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {str(ids.dtype)[6:]}")
    if ids.dim() != student.dim() or ids.shape[:-1] != lead:
        raise ValueError(
            f"topk_ids must have shape {[*lead, 'k']} (the logits' leading shape), got "
            f"{list(ids.shape)}"
        )
    k = ids.shape[-1]
    if sampled and k < 1:  # s draws may exceed V: their distinct ids are padded to s
        raise ValueError("topk_ids (the sampled ids) must hold at least one entry per row")
    if not sampled and not 1 <= k <= vocab:
        raise ValueError(f"topk_ids must keep 1 <= k <= V = {vocab} ids per row, got k = {k}")
    v.check_float_tensor("topk_logits", topk)
    if topk.shape != ids.shape:
        raise ValueError(
            f"topk_logits has shape {list(topk.shape)} but topk_ids has {list(ids.shape)}; "
            "they must match [..., k]"
        )
    for name, t in (("topk_ids", ids), ("topk_logits", topk)):
        if t.device != student.device:
            raise ValueError(f"{name} is on {t.device} but student_logits is on {student.device}")
    if labels is not None:
        v.check_kd_inputs(student, student, labels)  # labels: dtype, leading shape, device
    return lead, lead.numel(), vocab, k


def _check_logz(name, logz, student, lead, tail):
    if logz is None:
        raise ValueError(
            f"tail={tail!r} needs {name}, the teacher's full-vocabulary log-partition at "
            f"{'this T' if name == 'logz' else 'sample_T'} (rbkd.ops.capture_soft_labels gives "
            "it); without it use tail='renormalize'"
        )
    if not isinstance(logz, Tensor) or logz.dtype not in v.FLOAT_DTYPES:
        what = type(logz).__name__ if not isinstance(logz, Tensor) else str(logz.dtype)[6:]
        raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got {what}")
    if logz.shape not in (lead, (*lead, 1)):
        raise ValueError(
            f"{name} must have shape {list(lead)} or {[*lead, 1]} (one log-partition per row), "
            f"got {list(logz.shape)}"
        )
    if logz.device != student.device:
        raise ValueError(f"{name} is on {logz.device} but student_logits is on {student.device}")
    return logz


def _check_sampling(sampled, counts, sample_T, sample_logz, T, ids, student, lead):
    """(counts, sample_logz, sample_T as a float) for tail='sampled'; elsewhere none is given."""
    if not sampled:
        given = [n for n, x in (("sample_counts", counts), ("sample_T", sample_T),
                                ("sample_logz", sample_logz)) if x is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{given[0]} is only used with tail='sampled'; drop it or set the tail"
            )
        return None, None, 1.0
    if counts is None:
        raise ValueError(
            "tail='sampled' needs sample_counts, the count of each sampled id (0 for padding); "
            "rbkd.ops.capture_soft_labels(..., samples=s) gives sample_ids and sample_counts"
        )
    if not isinstance(counts, Tensor) or counts.dtype not in ID_DTYPES:
        what = type(counts).__name__ if not isinstance(counts, Tensor) else str(counts.dtype)[6:]
        raise TypeError(f"sample_counts must be an int32 or int64 tensor, got {what}")
    if counts.shape != ids.shape:
        raise ValueError(
            f"sample_counts has shape {list(counts.shape)} but topk_ids (the sampled ids) has "
            f"{list(ids.shape)}; they must match [..., s]"
        )
    if counts.device != student.device:
        raise ValueError(
            f"sample_counts is on {counts.device} but student_logits is on {student.device}"
        )
    if sample_T is None:
        raise ValueError(
            "tail='sampled' needs sample_T, the temperature the ids were drawn at "
            "(capture_soft_labels's sample_T): the estimator weighs them by p_T / p_sample_T"
        )
    if isinstance(sample_T, Tensor):
        raise TypeError("sample_T must be a float (one sampling temperature for every row)")
    sample_T = v.check_temperature("sample_T", sample_T, 0, student.device)
    if sample_logz is None and (isinstance(T, Tensor) or T != sample_T):
        raise ValueError(
            f"tail='sampled' at T={'per row' if isinstance(T, Tensor) else T} with ids drawn at "
            f"sample_T={sample_T} needs sample_logz (the teacher's logz at sample_T) for the "
            "importance weights p_T / p_sample_T; or distill at T = sample_T"
        )
    if sample_logz is not None:
        sample_logz = _check_logz("sample_logz", sample_logz, student, lead, "sampled")
    return counts, sample_logz, float(sample_T)


def _check_divergence(divergence, beta, skew, standardize, tail, has_tail, labels):
    if tail == "sampled" and divergence != "kl":
        raise ValueError(
            f"divergence={divergence!r} is not defined with tail='sampled': only kl (forward KL) "
            "is linear in the teacher's probabilities, which makes the sampled estimate unbiased; "
            "use divergence='kl', or tail='bucket' for the others"
        )
    if divergence == "dkd":
        raise ValueError(
            "divergence='dkd' is not defined on sparse soft labels: it renormalises the teacher "
            "over every class but the label, which needs its full row; use kd_loss with dense "
            "teacher logits, or another divergence"
        )
    if standardize is True:
        raise ValueError(
            "standardize=True is not defined on sparse soft labels: the z-score needs the mean "
            "and std of the teacher's full row; use kd_loss with dense teacher logits"
        )
    fields = v.check_divergence_options(
        divergence, beta, skew, 1.0, 8.0, standardize, "logits", labels
    )
    b, lam = fields["beta"], fields["skew"]
    reverse = (
        divergence in _REVERSE
        or (divergence == "jsd" and b == 1.0)
        or (divergence == "skew_reverse_kl" and lam == 0.0)
    )
    if tail == "renormalize" and has_tail and reverse:
        raise ValueError(
            f"divergence={divergence!r} (beta={b}, skew={lam}) is infinite with "
            "tail='renormalize': the teacher has probability 0 outside its k ids and the student "
            "does not; use tail='bucket' (with logz) or kl, jsd, skew_kl, skew_reverse_kl "
            "(skew > 0), tvd"
        )
    return {k: fields[k] for k in ("divergence", "beta", "skew")}


# ---- the registered op and its autograd path -----------------------------------------------------


def _check_values(student, ids, topk, logz, labels, T_rows, T, alpha_rows, opts, tail, sampling):
    """The host value checks (CPU tensors, or RBKD_CHECKS=full): one-line ValueErrors."""
    n, vocab = student.shape
    counted = None if labels is None else labels != opts.ignore_index
    if labels is not None:
        v.check_label_values(labels, vocab, opts.ignore_index)
    if T_rows is not None:
        v.check_temperature_values("T", T_rows, v.KD_MAX_TEMPERATURE)
    if alpha_rows is not None:
        v.check_alpha_values(alpha_rows)
    keep = torch.ones(n, dtype=torch.bool) if counted is None else counted.cpu()
    if tail == TAIL_MODES["sampled"]:
        counts, sample_logz, sample_T = sampling
        T_any = T_rows if T_rows is not None else T
        check_sampled_values(
            ids, counts, topk, logz, sample_logz, T_any, sample_T, vocab, keep, opts.probs_tol
        )
        v.check_finite_rows("student_logits", student, counted)
        return
    ids_c = ids.cpu()
    out = ((ids_c < 0) | (ids_c >= vocab)) & keep[:, None]
    if bool(out.any()):
        r, j = (int(x) for x in out.nonzero()[0])
        raise ValueError(f"topk_ids[{r}, {j}] = {int(ids_c[r, j])} is outside [0, {vocab})")
    ordered = ids_c.sort(1).values
    same = (ordered[:, 1:] == ordered[:, :-1]) & keep[:, None]
    if bool(same.any()):
        r, j = (int(x) for x in same.nonzero()[0])
        raise ValueError(
            f"topk_ids row {r} holds id {int(ordered[r, j])} twice: the k ids must be distinct"
        )
    if tail == TAIL_MODES["bucket"]:
        T_col = T_rows.reshape(-1, 1).float() if T_rows is not None else T
        t = topk.float() / T_col
        mass = torch.logsumexp(t - logz.float().reshape(-1, 1), -1)
        over = (mass > math.log1p(opts.probs_tol)) & keep.to(mass.device)
        over &= ~v.nonfinite_rows(topk) & logz.reshape(-1).isfinite()  # the NaN rule's rows
        if bool(over.any()):
            r = int(over.nonzero()[0, 0])
            raise ValueError(
                f"row {r}: the teacher's kept mass exp(logsumexp(topk_logits / T) - logz) is "
                f"{math.exp(float(mass[r])):.6g}, above 1: logz must be log sum_v exp(z_v / T) "
                "over the full vocabulary at this T"
            )
        v.check_finite_rows("logz", logz.reshape(-1, 1), counted)
    v.check_finite_rows("topk_logits", topk, counted)
    v.check_finite_rows("student_logits", student, counted)


def sparse_kd_loss_impl(
    student: Tensor,
    ids: Tensor,
    topk: Tensor,
    logz: Tensor | None,
    labels: Tensor | None,
    T_rows: Tensor | None,
    T: float,
    alpha_rows: Tensor | None,
    alpha: float,
    reduction: int,
    tail: int,
    need_grad: bool,
    options: str,
    counts: Tensor | None = None,
    sample_logz: Tensor | None = None,
    sample_T: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(loss, saved gradient of the reduced loss, empty when not needed), as kd_loss_impl.
    tail="sampled" reads counts, sample_logz and sample_T (the others ignore them)."""
    opts = KDOptions.decode(options)
    n, vocab = student.shape
    sampling = (counts, sample_logz, sample_T)
    if v.host_value_checks(student.device):
        _check_values(student, ids, topk, logz, labels, T_rows, T, alpha_rows, opts, tail, sampling)
    if T_rows is not None:
        T_rows = T_rows.to(torch.float32).contiguous()
    if alpha_rows is not None:
        alpha_rows = alpha_rows.to(torch.float32).contiguous()
    grad_scale: float | Tensor = 1.0
    if reduction == _MEAN:
        if labels is None:
            grad_scale = 1.0 / max(n, 1)
        else:  # a device tensor: no host read on a GPU
            count = (labels != opts.ignore_index).sum().clamp_min(1).to(torch.float32)
            grad_scale = count.reciprocal()
    forward = getattr(select_backend(student.device), "sparse_kd_forward", sparse_kd_forward)
    rows, grad = forward(
        student, ids, topk, logz, labels,
        T if T_rows is None else T_rows, alpha if alpha_rows is None else alpha_rows,
        grad_scale, need_grad, tail, opts, counts, sample_logz, sample_T,
    )  # fmt: skip
    if reduction == _NONE:
        loss = rows
    elif reduction == _SUM:
        loss = rows.sum()
    else:
        loss = rows.sum() * grad_scale
    return loss, (grad if grad is not None else student.new_empty((0,)))


sparse_kd_loss_op = torch.library.custom_op(
    "rbkd::sparse_kd_loss", sparse_kd_loss_impl, mutates_args=()
)


@sparse_kd_loss_op.register_fake
def _(student, ids, topk, logz, labels, T_rows, T, alpha_rows, alpha, reduction, tail, need_grad,
      options, counts=None, sample_logz=None, sample_T=1.0):  # fmt: skip
    n, vocab = student.shape
    loss_shape = (n,) if reduction == _NONE else ()
    grad = student.new_empty((n, vocab) if need_grad else (0,))
    return student.new_empty(loss_shape, dtype=torch.float32), grad


SparseKDLoss = library.saved_grad_function("sparse_kd_loss", sparse_kd_loss_op, sparse_kd_loss_impl)
