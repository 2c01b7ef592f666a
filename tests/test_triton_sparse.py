"""The Triton sparse_kd_loss and capture kernels (issue 16) against tests/oracle_sparse.py's float64
oracle.

As tests/test_triton_kernels.py: without a GPU the kernels run under Triton's interpreter on CPU
tensors, in a TRITON_INTERPRET=1 child that test_interpreter_suite starts (the variable must be set
before triton is imported and would leak into later modules). The cases go through the public ops
with `use_backend("triton")`, so the backend's dispatch is tested too; V = 37 and 77 run with a
16-column block, so the online sums cross several blocks and a ragged last one. Run
`TRITON_INTERPRET=1 pytest tests/test_triton_sparse.py` to see the cases one by one.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import oracle_sparse as oracle
import pytest
import rbkd.kernels as K
import torch
from test_triton_kernels import IN_INTERPRETER, assert_close

from rbkd.ops import capture_soft_labels, kd_loss, sparse_kd_loss, use_backend
from rbkd.ops.args import KDOptions

ROOT = Path(__file__).resolve().parents[1]
interp = pytest.mark.skipif(
    not IN_INTERPRETER,
    reason="interpreter case: run by test_interpreter_suite in a TRITON_INTERPRET=1 subprocess",
)
quiet = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
LOSS_TOL = (2e-5, 2e-5)  # float32 losses against float64 on the same (rounded) inputs
GRAD_TOL = {torch.float32: (2e-6, 2e-5), torch.bfloat16: (1e-2, 1e-2)}
N, V, KEEP, BLOCK = 6, 37, 6, 16


@pytest.fixture
def small_blocks(monkeypatch):
    """A 16-column block for every launch of the sparse and capture kernels."""
    from rbkd.kernels import capture, sparse_kd

    for module in (capture, sparse_kd):
        monkeypatch.setattr(module, "pick_block", lambda c, m, override=None: BLOCK)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the parent of the interpreted run")
@pytest.mark.skipif(not K.TRITON_AVAILABLE, reason=f"triton: {K.TRITON_IMPORT_ERROR}")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreted sparse tests failed:\n{out[-8000:]}"
    assert " passed" in out and "failed" not in out, out[-4000:]


def teacher(seed: int = 0, n: int = N, v: int = V, k: int = KEEP, T=2.0):
    """(ids, topk logits, logz at T) of a random teacher: its top-k, exact log-partitions."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g) * 3
    vals, ids = t.topk(k, -1)
    T_col = T.reshape(-1, 1) if isinstance(T, torch.Tensor) else T
    return ids, vals, torch.logsumexp(t.double() / T_col, -1).float(), t


def student(dtype, seed: int = 1, n: int = N, v: int = V):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 2).to(dtype)


def check(z, ids, vals, labels, what, **kw):
    """Loss (reduction none and mean) and gradient through the triton backend vs the oracle."""
    for reduction in ("none", "mean"):
        zz = z.clone().requires_grad_(True)
        with use_backend("triton"):
            loss = sparse_kd_loss(zz, ids, vals, labels, reduction=reduction, **kw)
        loss.sum().backward()
        want, want_grad = oracle.sparse_kd_loss(z, ids, vals, labels, reduction=reduction, **kw)
        assert_close(loss.detach(), want, LOSS_TOL, f"{what} loss ({reduction})")
        assert_close(zz.grad, want_grad, GRAD_TOL[z.dtype], f"{what} grad ({reduction})")


@interp
@quiet
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_kl_against_oracle(tail, dtype):
    """Labels with an ignored row, per-row T and alpha, a NaN row, a row whose student mass sits
    on the kept ids (a tail of ~e^-60, summed directly) and a -inf entry."""
    T = torch.tensor([0.5, 1.0, 2.0, 3.5, 1.0, 7.0])
    ids, vals, logz, _ = teacher(T=T)
    z = student(dtype)
    z[2, 5] = math.nan
    z[3] = z[3].float().masked_fill(torch.ones(V, dtype=torch.bool).scatter(0, ids[3], False), -30)
    z[3, ids[3]] = 30.0
    z[4, 0] = -math.inf
    labels = torch.tensor([3, -100, 7, int(ids[3, 0]), 36, 0])
    alpha = torch.tensor([0.9, 0.5, 0.7, 1.0, 0.0, 0.3])
    check(z, ids.int(), vals, labels, f"{tail} {dtype}", logz=logz, T=T, alpha=alpha, tail=tail)
    # A scalar T = 1: the kernel's CE term shares the student's normalizer (T_ONE).
    ids, vals, logz, _ = teacher(T=1.0)
    check(z, ids, vals, labels, f"{tail} {dtype} T=1", logz=logz, T=1.0, alpha=alpha, tail=tail)


@interp
@quiet
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(
    "divergence,beta,skew",
    [("reverse_kl", 0.5, 0.1), ("jsd", 0.3, 0.1), ("skew_kl", 0.5, 0.2),
     ("skew_reverse_kl", 0.5, 0.2), ("tvd", 0.5, 0.1)],
)  # fmt: skip
def test_sparse_divergences_bucket(divergence, beta, skew):
    """Without labels, and with labels where alpha = 0 drops a divergence made infinite by a kept
    id whose teacher logit is -inf (q = 0: reverse_kl's p log(p / q))."""
    ids, vals, logz, _ = teacher(seed=2, T=1.5)
    z = student(torch.float32, seed=3)
    kw = dict(logz=logz, T=1.5, divergence=divergence, beta=beta, skew=skew, t_squared=False)
    check(z, ids, vals, None, divergence, **kw)
    vals[2, -1] = -math.inf
    labels = torch.tensor([0, 5, 9, -100, 36, 2])
    alpha = torch.tensor([0.5, 1.0, 0.0, 0.5, 0.2, 0.9])
    zz = z.clone().requires_grad_(True)
    with use_backend("triton"):
        loss = sparse_kd_loss(zz, ids, vals, labels, alpha=alpha, reduction="none", **kw)
    loss.sum().backward()
    want, want_grad = oracle.sparse_kd_loss(z, ids, vals, labels, alpha=alpha, reduction="none",
                                            **kw)  # fmt: skip
    assert_close(loss.detach(), want, LOSS_TOL, f"{divergence} with labels: loss")
    # Row 2 (alpha = 0) is the CE gradient alone; the oracle's autograd takes 0 * inf there.
    rest = [0, 1, 3, 4, 5]
    assert_close(zz.grad[rest], want_grad[rest], GRAD_TOL[z.dtype], f"{divergence}: grad")
    ce = torch.softmax(z[2].double(), -1) - torch.nn.functional.one_hot(labels[2], V)
    assert_close(zz.grad[2], ce, GRAD_TOL[z.dtype], f"{divergence}: alpha = 0 row's grad")


@interp
@quiet
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_full_vocabulary_equals_kd_loss(dtype):
    """k = V with the exact logz: no tail bucket, kd_loss's number and gradient."""
    T = torch.tensor([0.7, 1.0, 2.0, 4.0, 1.3, 2.5])
    ids, vals, logz, t = teacher(k=V, T=T)
    z = student(dtype, seed=4)
    labels = torch.tensor([1, 2, -100, 4, 5, 36])
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    with use_backend("triton"):
        a = sparse_kd_loss(za, ids, vals, labels, logz=logz, T=T, reduction="none")
    b = kd_loss(zb, t, labels, T=T, reduction="none")
    a.sum().backward()
    b.sum().backward()
    assert_close(a.detach(), b.detach().double(), (2e-5, 1e-5), "k = V loss vs kd_loss")
    assert_close(za.grad, zb.grad.double(), GRAD_TOL[dtype], "k = V grad vs kd_loss")


@interp
@quiet
def test_sparse_kernel_rows_the_host_checks_would_refuse():
    """Called directly (the op refuses these on the host for CPU tensors; on a GPU only the kernel
    sees them): a repeated id, an id out of range, a kept mass above 1 and a NaN logz give NaN rows;
    the others are the oracle's. No gradient asked: none is returned."""
    ids, vals, logz, _ = teacher(seed=5, T=1.0)
    z = student(torch.float32, seed=6)
    ids[1, 2] = ids[1, 0]
    ids[2, 0] = V
    logz[3] = logz[3] - 5.0
    logz[4] = math.nan
    opts = KDOptions(probs_tol=1e-3)
    loss, grad = K.sparse_kd_forward(z, ids, vals, logz, None, 1.0, 1.0, 1.0, False, 0, opts)
    assert grad is None
    assert loss[1:5].isnan().all(), loss
    keep = [0, 5]
    want, _ = oracle.sparse_kd_loss(z[keep], ids[keep], vals[keep], logz=logz[keep], T=1.0,
                                    reduction="none")  # fmt: skip
    assert_close(loss[keep], want, LOSS_TOL, "well-formed rows")


@interp
@quiet
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_against_oracle(dtype):
    """Top-k, logz and entropy at five temperatures (one tiny: logz ~ 1e3) vs float64; NaN, +inf
    and all -inf rows NaN; the samples as the CPU twin draws them from the same generator."""
    from rbkd.ops import capture

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 77, generator=g) * 4).to(dtype)
    x[1, 3], x[2], x[4, 5] = math.nan, -math.inf, math.inf
    x[3, :50] = -math.inf
    temps = [0.5, 1.0, 2.0, 7.0, 0.05]
    with use_backend("triton"):
        out = capture_soft_labels(
            x, 5, temps, samples=4, generator=torch.Generator().manual_seed(1)
        )
    bad = torch.tensor([False, True, True, False, True, False])
    want = oracle.capture(x, 5, temps)
    good = ~bad
    assert out.logz[bad].isnan().all() and out.entropy[bad].isnan().all()
    assert_close(out.logz[good], want["logz"][good], (2e-5, 2e-6), f"logz {dtype}")
    assert_close(out.entropy[good], want["entropy"][good], (2e-5, 2e-5), f"entropy {dtype}")
    assert torch.equal(out.topk_logits[good].double(), want["topk_logits"][good])
    assert out.topk_ids.dtype == torch.int32 and out.topk_logits.dtype == dtype
    twin = capture._capture_rows(x, 5, temps, 4, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(out.sample_ids, twin[4]) and torch.equal(out.sample_counts, twin[5])


@pytest.mark.skipif(not K.TRITON_AVAILABLE, reason=f"triton: {K.TRITON_IMPORT_ERROR}")
@pytest.mark.skipif(IN_INTERPRETER, reason="interpreted kernels cannot be compiled")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")
def test_sparse_kernels_compile_for_sm90():
    """The interpreter accepts Python the compiler rejects: compile the variants the benchmark
    runs (and the no-tail, no-label, no-gradient ones) for an H100, no GPU needed, and check (where
    cuobjdump is there) that no registers spill."""
    pytest.importorskip("triton.backends.nvidia", reason="triton built without the CUDA backend")
    import triton
    from rbkd.kernels import capture, sparse_kd
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    cuobjdump = str(cuobjdump) if cuobjdump.exists() else shutil.which("cuobjdump")
    scalars = {"V": "i32", "k": "i32", "J": "i32", "ignore_index": "i64"}
    ptrs = {"s_ptr": "*bf16", "grad_ptr": "*bf16", "sid_ptr": "*i64", "bnd_ptr": "*i32",
            "pre_bad_ptr": "*i8", "labels_ptr": "*i64", "x_ptr": "*bf16"}  # fmt: skip
    flags = dict(T_ROWS=False, ALPHA_ROWS=False, T_SQUARED=True, GS_PTR=True, BLOCK=1024, KPAD=128)
    variants = [
        (
            sparse_kd._sparse_kd_fwd_kernel,
            dict(flags, DIVERGENCE=d, HAS_TAIL=tl_, HAS_LABELS=lab, NEED_GRAD=ng, T_ONE=one),
        )  # fmt: skip
        for d, tl_, lab, ng, one in (
            (0, True, True, True, True),  # the benchmark's: T = 1
            (0, True, True, True, False),
            (0, False, False, True, False),
            (2, True, True, False, False),
            (5, True, False, True, True),
        )  # fmt: skip
    ] + [(capture._capture_kernel, dict(JPAD=8, BLOCK=512))]
    for fn, constexprs in variants:
        sig = {}
        for p in fn.params:
            if p.name in constexprs:
                sig[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                sig[p.name] = ptrs.get(p.name, "*fp32")
            elif p.name.endswith("_stride"):
                sig[p.name] = "i32"
            else:
                sig[p.name] = scalars.get(p.name, "fp32")
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        if cuobjdump is None:
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
            ).stdout
        assert "LOCAL:0" in usage, f"{fn.__name__} {constexprs}: registers spill:\n{usage}"


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or IN_INTERPRETER, reason="needs a CUDA device (no interpreter)"
)
@pytest.mark.parametrize("k", [32, 128])
def test_sparse_on_gpu_at_a_real_vocabulary(k):
    """64 x 128256 bf16 with labels and per-row T: the kernel's loss and gradient against the
    float64 oracle (on the CPU), the shape the benchmark runs at."""
    n, v = 64, 128256
    g = torch.Generator().manual_seed(k)
    t = torch.randn(n, v, generator=g) * 3
    T = torch.rand(n, generator=g) * 3 + 0.5
    vals, ids = t.topk(k, -1)
    logz = torch.logsumexp(t.double() / T[:, None], -1).float()
    z = (torch.randn(n, v, generator=g) * 2).bfloat16()
    y = torch.randint(0, v, (n,), generator=g)
    y[3] = -100
    zc = z.cuda().requires_grad_(True)
    with use_backend("triton"):
        loss = sparse_kd_loss(zc, ids.cuda(), vals.cuda(), y.cuda(), logz=logz.cuda(), T=T.cuda(),
                              reduction="none")  # fmt: skip
    loss.sum().backward()
    want, want_grad = oracle.sparse_kd_loss(z, ids, vals, y, logz=logz, T=T, reduction="none")
    assert_close(loss.detach(), want, (1e-4, 1e-4), f"k={k} loss")
    assert_close(zc.grad, want_grad, GRAD_TOL[torch.bfloat16], f"k={k} grad")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_sparse_bench_needs_arguments_and_a_gpu(tmp_path):
    script = str(ROOT / "bench" / "gpu_sparse.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "required" in proc.stderr
    out = [str(tmp_path / "s.json"), str(tmp_path / "s.md")]
    proc = subprocess.run(
        [sys.executable, script, "--json", out[0], "--md", out[1]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3 and "no CUDA device" in proc.stderr
    assert not any(Path(p).exists() for p in out)
