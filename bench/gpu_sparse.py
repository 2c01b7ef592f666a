"""Sparse soft labels on a GPU (issue 16, item 7; run by bench/gpu.sh, step "sparse").

    python bench/gpu_sparse.py --json sparse.json --md sparse.md [--n 8192 --v 128256]

At N x V bf16 logits (a language model's 8192 tokens, Llama 3's vocabulary), T = 1, alpha = 0.9
with labels, forward + backward (the op's forward, which writes the gradient, and
loss.backward()), median of triton.testing.do_bench:

- sparse_kd_loss, tail "bucket", kl, k = 32 and 128, on the Triton backend (kernels/sparse_kd.py);
- rbkd's dense kd_loss at the same shape (it reads the teacher's full bf16 row);
- Liger-Kernel's dense KL (LigerKLDIVLoss on log_softmax / softmax, + LigerCrossEntropyLoss),
  where liger_kernel imports;
- capture_soft_labels at J = 8 temperatures, k = 32 (kernels/capture.py plus torch.topk), against
  the torch twin (use_backend("torch")) and against one read of the logits at copy bandwidth.

Before timing, each Triton case is checked against the torch twin on its first rows (the largest
difference is in the report); a case that fails is reported, not timed. Results are written after
every case: a run stopped at its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

T = 1.0
ALPHA = 0.9
KS = (32, 128)
TEMPS = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0]
CAPTURE_K = 32
CHECK_ROWS = 64


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, read + write bytes (as bench/gpu_tune.py)."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def fwd_bwd(loss_fn, z):
    def step():
        z.grad = None
        loss_fn(z).backward()

    return step


def sparse_case(z, ids, vals, logz, y, backend: str):
    import rbkd.ops

    def loss(x):
        with rbkd.ops.use_backend(backend):
            return rbkd.ops.sparse_kd_loss(x, ids, vals, y, logz=logz, T=T, alpha=ALPHA)

    return loss


def check_sparse(z, ids, vals, logz, y) -> float:
    """Largest |triton - twin| over the loss and the gradient of the first CHECK_ROWS rows."""
    part = slice(0, CHECK_ROWS)
    out = []
    for backend in ("triton", "torch"):
        x = z[part].detach().clone().requires_grad_(True)
        loss = sparse_case(x, ids[part], vals[part], logz[part], y[part], backend)(x)
        loss.backward()
        out.append((loss.detach().float(), x.grad.float()))
    (la, ga), (lb, gb) = out
    return max(float((la - lb).abs()), float((ga - gb).abs().max()))


def liger_loss():
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    kl_loss, ce_loss = LigerKLDIVLoss(reduction="batchmean"), LigerCrossEntropyLoss()
    return lambda z, t, y: (
        ALPHA * T * T * kl_loss(F.log_softmax(z / T, dim=-1), F.softmax(t / T, dim=-1))
        + (1 - ALPHA) * ce_loss(z, y)
    )


def run_cases(n: int, v: int, dtype, write, device: str = "cuda") -> list[dict]:
    import rbkd.ops

    g = torch.Generator(device=device).manual_seed(0)
    z = (2 * torch.randn(n, v, device=device, generator=g)).to(dtype).requires_grad_(True)
    t = (2 * torch.randn(n, v, device=device, generator=g)).to(dtype)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    logz = torch.logsumexp(t.float() / T, -1)
    rows: list[dict] = []
    read = n * v * z.element_size()

    def add(case, ms, **extra):
        rows.append({"case": case, "ms": ms, "N": n, "V": v, "dtype": str(dtype)[6:], **extra})
        print(f"{case}: {'-' if ms is None else f'{ms:.3f} ms'} {extra}", flush=True)
        write(rows)

    for k in KS:
        vals, ids = t.topk(k, -1)
        err = check_sparse(z, ids, vals, logz, y)
        ok = err < 5e-2  # bf16 gradients, float32 losses
        ms = bench_ms(fwd_bwd(sparse_case(z, ids, vals, logz, y, "triton"), z)) if ok else None
        add(f"sparse_kd_loss bucket k={k} (triton)", ms, max_diff_vs_twin=err,
            bytes=2 * read)  # fmt: skip
        del vals, ids
    ms = bench_ms(fwd_bwd(lambda x: rbkd.ops.kd_loss(x, t, y, T=T, alpha=ALPHA), z))
    add("dense kd_loss (rbkd triton)", ms, bytes=3 * read)
    try:
        liger = liger_loss()
    except ImportError as exc:
        add("dense KL (Liger-Kernel)", None, error=f"liger_kernel does not import: {exc}")
    else:
        add("dense KL (Liger-Kernel)", bench_ms(fwd_bwd(lambda x: liger(x, t, y), z)))
    t = None  # the dense teacher is not needed by capture
    z.grad = None
    torch.cuda.empty_cache()

    x = z.detach()
    caps = {}
    for backend in ("triton", "torch"):
        with rbkd.ops.use_backend(backend):
            caps[backend] = rbkd.ops.capture_soft_labels(x[:CHECK_ROWS], CAPTURE_K, TEMPS)
    a, b = caps["triton"], caps["torch"]
    err = max(float((a.logz - b.logz).abs().max()), float((a.entropy - b.entropy).abs().max()))
    for backend in ("triton", "torch"):
        with rbkd.ops.use_backend(backend):
            ms = bench_ms(lambda: rbkd.ops.capture_soft_labels(x, CAPTURE_K, TEMPS))
        add(f"capture J={len(TEMPS)} k={CAPTURE_K} ({backend})", ms, max_diff_vs_twin=err,
            bytes=read)  # fmt: skip
    return rows


def markdown(rows: list[dict], copy_gbps: float) -> str:
    by = {r["case"]: r for r in rows}
    dense = (by.get("dense kd_loss (rbkd triton)") or {}).get("ms")
    liger = (by.get("dense KL (Liger-Kernel)") or {}).get("ms")
    lines = [
        "## Sparse soft labels (bench/gpu_sparse.py)",
        "",
        f"Median of `triton.testing.do_bench`, fwd+bwd, T = {T}, alpha = {ALPHA} with labels; "
        f"copy bandwidth {copy_gbps:.0f} GB/s. GB/s over the minimum bytes (sparse: read the "
        "student, write its gradient; dense: and read the teacher; capture: read the logits).",
        "",
        "| case | N x V | ms | GB/s | x dense rbkd | x Liger | max diff vs twin |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        gbps = f"{r['bytes'] / (ms * 1e-3) / 1e9:.0f}" if ms and r.get("bytes") else "-"
        diff = f"{r['max_diff_vs_twin']:.2e}" if "max_diff_vs_twin" in r else "-"
        sparse = r["case"].startswith("sparse")
        lines.append(
            f"| {r['case']} | {r['N']} x {r['V']} {r['dtype']} | "
            f"{'-' if ms is None else f'{ms:.3f}'} | {gbps} | {_ratio(dense, ms, sparse)} | "
            f"{_ratio(liger, ms, sparse)} | {diff} |" + (f" {r['error']}" if "error" in r else "")
        )
    return "\n".join(lines) + "\n"


def _ratio(ref: float | None, ms: float | None, shown: bool) -> str:
    return f"{ref / ms:.2f}" if shown and ref and ms else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--v", type=int, default=128256)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sparse: no CUDA device; these cases need one", file=sys.stderr)
        return 3
    copy_gbps = copy_bandwidth()

    def write(rows):  # atomically: a run stopped mid-write leaves the previous version
        from rbkd.io import write_bytes, write_json

        write_json(args.json, {"copy_gbps": copy_gbps, "results": rows})
        write_bytes(args.md, markdown(rows, copy_gbps).encode())

    rows = run_cases(args.n, args.v, torch.bfloat16, write)
    return 1 if any(r["ms"] is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
