"""Speed of the sparse soft-label kernels on the CPU (issue 16, item 7), pytest-benchmark.

- sparse_kd_loss forward + backward at 1024 x 128256 float32, k = 32 and 128 (tail "bucket",
  kl, T = 1, alpha = 0.9 with labels: a language model's distillation step), against dense
  rbkd kd_loss at the same shape (it reads a full teacher row too) and against an eager PyTorch
  sparse loss (gather + logsumexp + autograd: the same bucket math as a user writes it).
  Goal: >= 1.5x dense rbkd and >= 10x eager.
- capture_soft_labels at 1024 x 128256 float32, k = 32, J = 8 temperatures, against its exp
  bound: J exps per element at this machine's exp throughput, measured in the same run by
  rbkd._C.exp_seconds_per_element (the kernel's own exp in a tight L1 loop, on the same thread
  count) just before and after the case, the faster of the two. Goal: >= 80% of the bound.
  Also the torch twin (use_backend("torch")) for scale.

extra_info: median_s, min_s, and the ratios against the other cases of the same shape (min over
min: the machine is shared, a busy moment cannot flatter). Nothing here asserts a speed.
RBKD_BENCH_THREADS=1 or 2 sets the thread count (bench/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import rbkd.ops
from rbkd.ops import use_backend

QUICK = os.environ.get("RBKD_BENCH_QUICK", "0").strip().lower() not in ("", "0", "false", "no")
N, V = (16, 128256) if QUICK else (1024, 128256)
T = 1.0
ALPHA = 0.9
TEMPS = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0]
CAPTURE_K = 32

_mins: dict[tuple, float] = {}  # (group, case) -> min seconds, for the ratios


def _native_built() -> bool:
    return "cpu" in rbkd.ops.available_backends()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(N, V, generator=g)).requires_grad_(True)
    t = 2 * torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    logz = torch.logsumexp(t / T, -1)
    return z, t, y, logz


def eager_sparse_loss(z, ids, topk, logz, y):
    """The bucket loss (k kept ids + the tail) as a user writes it in torch."""
    u = z / T
    lse = torch.logsumexp(u, -1, keepdim=True)
    log_p = u.gather(1, ids) - lse
    log_p_tail = torch.logsumexp(u.scatter(1, ids, float("-inf")), -1, keepdim=True) - lse
    log_q = topk / T - logz[:, None]
    q_tail = (1 - log_q.exp().sum(-1, keepdim=True)).clamp_min(2.0**-24)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1) + (q_tail * (q_tail.log() - log_p_tail))[:, 0]
    return ALPHA * T * T * kl.mean() + (1 - ALPHA) * F.cross_entropy(z, y)


def _record(benchmark, group: str, case: str, median: float | None, **info) -> None:
    stats = getattr(benchmark, "stats", None)
    low = float(stats.stats.min) if stats is not None and stats.stats is not None else None
    info.update(group=group, case=case, N=N, V=V, threads=torch.get_num_threads(), quick=QUICK)
    if median:
        info.update(median_s=median, min_s=low)
        _mins[(group, case)] = low
        for (g, other), t_other in _mins.items():
            if g == group and other != case:
                info[f"x_vs_{other}"] = t_other / low
    benchmark.extra_info.update(info)


LOSS_CASES = [("eager", 32), ("eager", 128), ("dense-rbkd", 0), ("rbkd", 32), ("rbkd", 128)]


@pytest.mark.parametrize(
    "backend,k", LOSS_CASES, ids=[f"{b}-k{k}" if k else b for b, k in LOSS_CASES]
)
def test_sparse_kd_loss_forward_backward(benchmark, bench_timer, data, backend, k):
    if backend != "eager" and not _native_built():
        pytest.skip("rbkd._C is not built: no C++ CPU kernels to time")
    z, t, y, logz = data
    ids = topk = None
    if k:
        topk, ids = t.topk(k, -1)
    if backend == "eager":

        def loss():
            return eager_sparse_loss(z, ids, topk, logz, y)
    elif backend == "dense-rbkd":

        def loss():
            return rbkd.ops.kd_loss(z, t, y, T=T, alpha=ALPHA)
    else:

        def loss():
            return rbkd.ops.sparse_kd_loss(z, ids, topk, y, logz=logz, T=T, alpha=ALPHA)

    def call() -> None:
        z.grad = None  # every round allocates its gradient, as a training step does
        loss().backward()

    benchmark.group = f"sparse_kd_loss cpu {N}x{V} float32"
    with use_backend("cpu") if backend != "eager" else use_backend("auto"):
        median = bench_timer(benchmark, call, torch.device("cpu"))
    case = f"{backend}-k{k}" if k else backend
    _record(benchmark, "loss", case, median, op="sparse_kd_loss", backend=backend, k=k)


def _exp_seconds() -> float:
    from rbkd import _C

    per_thread = (1 << 22) if QUICK else (1 << 26)
    return min(_C.exp_seconds_per_element(per_thread, torch.get_num_threads()) for _ in range(3))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_capture_soft_labels_8_temperatures(benchmark, bench_timer, data, backend):
    if not _native_built():
        pytest.skip("rbkd._C is not built: no C++ CPU kernels to time")
    x = data[1]
    before = _exp_seconds() if backend == "cpu" else None

    def call() -> None:
        rbkd.ops.capture_soft_labels(x, CAPTURE_K, TEMPS)

    benchmark.group = f"capture cpu {N}x{V} float32 k={CAPTURE_K} J={len(TEMPS)}"
    with use_backend(backend):
        median = bench_timer(benchmark, call, torch.device("cpu"))
    info = {"op": "capture_soft_labels", "backend": backend, "k": CAPTURE_K, "J": len(TEMPS)}
    if before is not None:
        exp_s = min(before, _exp_seconds())
        bound = N * V * len(TEMPS) * exp_s
        info.update(exp_ns=exp_s * 1e9, exp_bound_s=bound)
        stats = getattr(benchmark, "stats", None)
        if median and stats is not None and stats.stats is not None:
            info["fraction_of_exp_bound"] = bound / float(stats.stats.min)
    _record(benchmark, "capture", backend, median, **info)
