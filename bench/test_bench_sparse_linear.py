"""sparse_kd_loss_from_hidden against sparse_kd_loss on the full logits (issue 16, item 4):
forward + backward time (pytest-benchmark) and peak resident memory (extra_info), CPU, float32,
N = 8192 rows, V = 32000, H = 256, k = 32, tail="bucket", labels, T = 1; no bias (an LM head).

    full     loss = sparse_kd_loss(F.linear(hidden, weight), ids, topk, labels, logz=logz)
    chunked  loss = sparse_kd_loss_from_hidden(hidden, weight, ids, topk, labels, logz=logz)
             (default_chunk_rows: 256 rows of 32000 per chunk)

Peak memory: tracemalloc does not see torch's allocations, so each variant runs once in its own
process (`python bench/test_bench_sparse_linear.py VARIANT N V H K THREADS`), which builds its
inputs, hands freed heap back to the kernel (glibc's malloc_trim, else the step would reuse the
teacher's freed pages unseen), resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs), runs forward + backward once and prints VmHWM and the VmRSS before the
step: `step_peak_mib` is what the step added at its peak. Without /proc (not Linux) the memory
fields are absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

QUICK = os.environ.get("RBKD_BENCH_QUICK", "0").strip().lower() not in ("", "0", "false", "no")
N, V, H, K = (512 if QUICK else 8192), 32000, 256, 32  # quick: a smoke run, not a measurement
VARIANTS = ("full", "chunked")


def make_inputs(n, v, h, k, seed=0):
    """hidden [n, h] and weight [v, h] (leaves wanting gradients), the teacher's top-k ids and
    logits, logz, labels; the teacher's rows drawn in chunks, so no [n, v] tensor is made here."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_(True)
    ids, topk, logz = [], [], []
    for r0 in range(0, n, 256):
        t = torch.randn(min(256, n - r0), v, generator=g) * 3
        vals, idx = t.topk(k, -1)
        ids.append(idx)
        topk.append(vals)
        logz.append(torch.logsumexp(t, -1))
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, torch.cat(ids), torch.cat(topk), torch.cat(logz), labels


def step(variant, hidden, weight, ids, topk, logz, labels):
    """One forward + backward of `variant`; the gradients land in hidden.grad and weight.grad."""
    import rbkd.ops as ops

    hidden.grad = weight.grad = None
    if variant == "full":
        loss = ops.sparse_kd_loss(F.linear(hidden, weight), ids, topk, labels, logz=logz)
    else:
        loss = ops.sparse_kd_loss_from_hidden(hidden, weight, ids, topk, labels, logz=logz)
    loss.backward()
    return loss


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory(variant: str, n: int, v: int, h: int, k: int) -> dict:
    """Run `variant` once in a fresh process; its memory report (empty where /proc is missing)."""
    if not Path("/proc/self/clear_refs").exists():
        return {}
    cmd = [sys.executable, __file__, variant, str(n), str(v), str(h), str(k),
           str(torch.get_num_threads())]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_sparse_linear(benchmark, bench_timer, variant):
    memory = peak_memory(variant, N, V, H, K)
    inputs = make_inputs(N, V, H, K)
    bench_timer(benchmark, lambda: step(variant, *inputs), torch.device("cpu"))
    benchmark.extra_info.update(
        kind="sparse_linear", variant=variant, N=N, V=V, H=H, k=K, dtype="float32",
        device="cpu", logits_mib=N * V * 4 / 2**20, **memory,
    )  # fmt: skip


def _main(variant, n, v, h, k, threads):
    torch.set_num_threads(threads)
    import rbkd.ops  # noqa: F401  (imports and their memory before the measured step)

    inputs = make_inputs(n, v, h, k)
    step(variant, *make_inputs(8, 64, 8, 4))  # warm the code paths up, tiny
    with contextlib.suppress(OSError):  # not glibc: the figure may then undercount
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    step(variant, *inputs)
    peak = _status_kib("VmHWM")
    print(json.dumps({"rss_before_mib": before / 1024, "vmhwm_mib": peak / 1024,
                      "step_peak_mib": (peak - before) / 1024}))  # fmt: skip


if __name__ == "__main__":
    name, *numbers = sys.argv[1:]
    _main(name, *(int(x) for x in numbers))
