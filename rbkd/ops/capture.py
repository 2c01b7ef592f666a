"""capture_soft_labels: what a sparse soft-label store keeps of a teacher's logits (issue 16).

One call reads the teacher's logits [..., V] and returns its top-k ids and raw logits and, for each
temperature T_j of a grid, the full-vocabulary log-partition logz_j = log sum_v exp(z_v / T_j) and
the entropy H_j of softmax(z / T_j); optionally s ids sampled from softmax(z / sample_T) with their
counts (the unbiased estimator of Sparse Logit Sampling, Anshumann et al. 2025). With the kept raw
logits and logz_j, p_i(T_j) = exp(z_i / T_j - logz_j) of every kept id and the tail mass
1 - sum p_i are exact at every stored T_j: both come from the same values (the input's, upcast to
float32), so store topk_logits in the input's dtype.

Below is the pure-torch twin (no autograd: teachers are captured under no_grad), which a backend
without `capture_rows` runs. It reads the logits once for the top-k, once per temperature, and
once more to sample, in chunks of rows of at most CHUNK_ELEMENTS entries. The fused kernels (C++:
csrc/cpu/capture_cpu.cpp; Triton later) do it in one read: per row,
an online max and per-T running sums of exp(z / T_j - m / T_j) and (z / T_j) exp(...) (the
entropy's numerator), and a k-entry min-heap (CPU) or a per-block top-k merged across blocks (GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from rbkd.ops import validation as v
from rbkd.ops.dispatch import select_backend

__all__ = ["SoftLabelCapture", "capture_soft_labels"]

CHUNK_ELEMENTS = 1 << 21  # as sparse_twin: 8 MiB per float32 temporary


class SoftLabelCapture(NamedTuple):
    """capture_soft_labels's result; the leading shape [...] is the logits'."""

    topk_ids: Tensor  # [..., k] int32, by descending logit
    topk_logits: Tensor  # [..., k] the input's dtype: the raw logits at those ids
    logz: Tensor  # [..., J] float32: log sum_v exp(z_v / T_j)
    entropy: Tensor  # [..., J] float32: nats, of softmax(z / T_j)
    sample_ids: Tensor | None = None  # [..., s] int32: distinct sampled ids ascending, then -1
    sample_counts: Tensor | None = None  # [..., s] int32: their counts (sum s), then 0


def capture_soft_labels(
    logits: Tensor,
    k: int,
    temperatures: Sequence[float] | Tensor,
    *,
    samples: int = 0,
    sample_T: float = 1.0,
    generator: torch.Generator | None = None,
) -> SoftLabelCapture:
    """Top-k ids and logits, logz and entropy at each temperature, and optionally s samples.

    logits [..., V] (float32, float16 or bfloat16; a language model's [batch, seq, vocab] works
    as is); 1 <= k <= V; temperatures: a non-empty sequence or 1-D tensor of finite T > 0 (read
    on the host once). samples = s > 0 draws s ids per row with replacement from
    softmax(z / sample_T) (with `generator`, on the logits' device) and returns the distinct ones
    ascending with their counts, padded to s with id -1 and count 0. A row with NaN or +inf or no
    finite value gets NaN logz and entropy and no samples (ids -1, counts 0); its top-k are
    whatever torch.topk gives. RBKD_CHECKS=full makes such a row an error.
    """
    v.check_float_tensor("logits", logits)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits must have at least one id in the last dimension (V >= 1)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V = {vocab}], got {k!r}")
    temps = _temperatures(temperatures, logits.device)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an int >= 0, got {samples!r}")
    sample_T = v.check_temperature("sample_T", sample_T, 0, logits.device)
    if isinstance(sample_T, Tensor):
        raise TypeError("sample_T must be a float")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    lead = logits.shape[:-1]
    rows = logits.detach().reshape(-1, vocab)
    if v.host_value_checks(logits.device):
        v.check_finite_rows("logits", rows)
    with torch.no_grad():
        capture_rows = getattr(select_backend(rows.device), "capture_rows", _capture_rows)
        out = capture_rows(rows, k, temps, samples, sample_T, generator)
    return SoftLabelCapture(*(None if t is None else t.reshape(*lead, t.shape[-1]) for t in out))


def _temperatures(temperatures: object, device: torch.device) -> list[float]:
    if isinstance(temperatures, Tensor):
        if temperatures.dim() != 1:
            raise ValueError(
                f"temperatures must be a 1-D tensor or a sequence, got shape "
                f"{tuple(temperatures.shape)}"
            )
        values = temperatures.detach().double().cpu().tolist()
    elif isinstance(temperatures, (list, tuple)):
        values = list(temperatures)
    else:
        raise TypeError(
            f"temperatures must be a list, a tuple or a 1-D tensor of floats, got "
            f"{type(temperatures).__name__}"
        )
    if not values:
        raise ValueError("temperatures must hold at least one temperature")
    return [v.check_temperature(f"temperatures[{i}]", t, 0, device) for i, t in enumerate(values)]


def _capture_rows(x, k, temps, samples, sample_T, generator):
    n, vocab = x.shape
    j = len(temps)
    ids = torch.empty(n, k, dtype=torch.int32, device=x.device)
    vals = torch.empty(n, k, dtype=x.dtype, device=x.device)
    logz = torch.empty(n, j, dtype=torch.float32, device=x.device)
    entropy = torch.empty(n, j, dtype=torch.float32, device=x.device)
    s_ids = s_counts = None
    if samples:
        s_ids = torch.empty(n, samples, dtype=torch.int32, device=x.device)
        s_counts = torch.empty(n, samples, dtype=torch.int32, device=x.device)
    step = max(1, CHUNK_ELEMENTS // vocab)
    for r0 in range(0, n, step):
        part = slice(r0, min(n, r0 + step))
        z = x[part].float()
        bad = v.nonfinite_rows(z)
        top = z.topk(k, -1).indices
        ids[part] = top.int()
        vals[part] = x[part].gather(1, top)
        for i, T in enumerate(temps):
            lz, h = _logz_entropy(z, T)
            logz[part, i] = torch.where(bad, math.nan, lz)
            entropy[part, i] = torch.where(bad, math.nan, h)
        if samples:
            s_ids[part], s_counts[part] = _sample(z, bad, samples, sample_T, generator)
    return ids, vals, logz, entropy, s_ids, s_counts


def _logz_entropy(z: Tensor, T: float) -> tuple[Tensor, Tensor]:
    """log sum exp(z / T) and -sum p log p, p = softmax(z / T), per row (0 log 0 = 0)."""
    u = z / T
    lz = torch.logsumexp(u, -1)
    log_p = u - lz.unsqueeze(1)
    p = log_p.exp()
    h = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
    return lz, h


def _sample(z, bad, samples, sample_T, generator):
    """s draws per row from softmax(z / sample_T): distinct ids ascending and their counts, padded
    with -1 / 0; no host read (sort, cumsum and scatter: the run of equal draws is one entry)."""
    p = torch.softmax(z / sample_T, -1)
    p = torch.where(bad.unsqueeze(1), 1.0, p)  # stand-in: multinomial refuses NaN rows
    draws = torch.multinomial(p, samples, replacement=True, generator=generator).sort(1).values
    start = torch.ones_like(draws, dtype=torch.bool)
    start[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = start.long().cumsum(1) - 1
    ids = torch.full_like(draws, -1).scatter(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add(1, slot, torch.ones_like(draws))
    ids = torch.where(bad.unsqueeze(1), -1, ids)
    counts = torch.where(bad.unsqueeze(1), 0, counts)
    return ids.int(), counts.int()
