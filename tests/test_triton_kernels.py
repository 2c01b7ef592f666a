"""Triton kernels (rbkd.kernels) against float64 torch math written out here.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors). Triton
reads that variable when a kernel is *decorated*, i.e. when rbkd.kernels is first imported, and
the variable would also leak into every test module that runs after this one (the triton backend
accepts CPU tensors under it). So this module never sets it in the pytest process: when the
kernels in this process are not interpreted, test_interpreter_suite re-runs this file in a child
`python -m pytest` with TRITON_INTERPRET=1 and asserts on its result, whatever imported triton
first. Run `TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py` to see the cases one by one.

GPU tests (realistic vocabularies, bf16) run in the parent process when CUDA is there.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rbkd.kernels as K
import torch

from rbkd.ops.args import EntropyOptions, KDOptions, SoftmaxOptions

ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")


def _interpreted() -> bool:
    if not K.TRITON_AVAILABLE:
        return False
    from rbkd.kernels import kd_loss
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kd_loss._kd_loss_fwd_kernel, InterpretedFunction)


IN_INTERPRETER = _interpreted()
HAS_GPU = torch.cuda.is_available() and not IN_INTERPRETER

interp = pytest.mark.skipif(
    not IN_INTERPRETER,
    reason="interpreter case: run by test_interpreter_suite in a TRITON_INTERPRET=1 subprocess",
)
# numpy warns on the -inf arithmetic the kernels do on purpose (masked lanes, -inf logits).
quiet = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
needs_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="needs a CUDA device (and TRITON_INTERPRET unset)"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) for tensors written in the input dtype; float32 outputs (losses, entropies) use
# FP32_TOL whatever the input dtype, since the reference reads the same rounded inputs.
TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
FP32_TOL = (2e-5, 2e-5)
# Mass tolerance of probs / log_probs rows (rbkd.ops.validation.PROBS_SUM_TOLERANCE).
PROBS_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-3}


def assert_close(actual, expected, tol, what):
    """Like torch.testing.assert_close against float64, reporting the first mismatches and
    NaN/inf disagreements by index."""
    atol, rtol = tol
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.double().cpu(), expected.double().cpu()
    same = (a == e) | (a.isnan() & e.isnan())  # inf == inf, NaN where NaN is expected
    close = same | ((a - e).abs() <= atol + rtol * e.abs())
    if bool(close.all()):
        return
    bad = (~close).nonzero().tolist()
    worst = ((a - e).abs().nan_to_num(nan=INF) * ~close).argmax().item()
    lines = [f"{what}: {len(bad)} of {a.numel()} mismatched (atol={atol}, rtol={rtol})"]
    for idx in bad[:8]:
        lines.append(
            f"  at {tuple(idx)}: got {a[tuple(idx)].item()!r}, expected {e[tuple(idx)].item()!r}"
        )
    lines.append(
        f"  worst |diff| at flat index {worst}: {a.flatten()[worst].item()!r} vs {e.flatten()[worst].item()!r}"
    )
    raise AssertionError("\n".join(lines))


def col(value, n):
    """A float or [N] tensor as a float64 [N, 1] column."""
    if isinstance(value, torch.Tensor):
        return value.double().reshape(-1, 1)
    return torch.full((n, 1), float(value), dtype=torch.float64)


def rows(n, c, dtype, scale=3.0, stride_pad=0, seed=0):
    """[n, c] random rows; stride_pad > 0 makes them a column slice of a wider tensor."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, c + stride_pad, generator=g, dtype=torch.float64) * scale
    return full.to(dtype)[:, :c]


def per_row_T(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 4 * torch.rand(n, generator=g)).float()


# ---- float64 references, written from csrc/README.md --------------------------------------------


def ref_softmax(x, T, log):
    z = x.double() / col(T, x.shape[0])
    return torch.log_softmax(z, -1) if log else torch.softmax(z, -1)


def ref_softmax_bwd(y, g, T, log):
    y, g, Tc = y.double(), g.double(), col(T, y.shape[0])
    if log:
        return (g - y.exp() * g.sum(-1, keepdim=True)) / Tc
    return y * (g - (g * y).sum(-1, keepdim=True)) / Tc


def ref_kd(z, t, labels, T, alpha, kind, t_squared, ignore_index, grad_scale):
    z, t = z.double(), t.double()
    n, c = z.shape
    Tc = col(T, n)
    log_ps = torch.log_softmax(z / Tc, -1)
    log_pt = [lambda: torch.log_softmax(t / Tc, -1), t.log, lambda: t][kind]()
    p_t = log_pt.exp()
    kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), 0.0).sum(-1)
    s = Tc[:, 0] ** 2 if t_squared else torch.ones(n, dtype=torch.float64)
    a = torch.ones(n, dtype=torch.float64) if labels is None else col(alpha, n)[:, 0]
    # A zero weight drops its term (no 0 * inf), as the kernel documents.
    loss = torch.where(a * s != 0, a * s * kl, 0.0)
    grad = (a * s)[:, None] / Tc * (log_ps.exp() - p_t)
    valid = torch.ones(n, dtype=torch.bool)
    if labels is not None:
        valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
        y = torch.where(valid, labels, 0)
        ce = torch.logsumexp(z, -1) - z.gather(1, y[:, None])[:, 0]
        loss = loss + torch.where(a != 1, (1 - a) * ce, 0.0)
        onehot = (
            torch.nn.functional.one_hot(y, c).double()
            if c
            else torch.zeros(n, 0, dtype=torch.float64)
        )
        grad = grad + (1 - a)[:, None] * (torch.softmax(z, -1) - onehot)
    gs = float(grad_scale) if not isinstance(grad_scale, torch.Tensor) else grad_scale.item()
    loss, grad = torch.where(valid, loss, 0.0), torch.where(valid[:, None], grad, 0.0) * gs
    if labels is not None:  # the non-finite rule: a label outside [0, C) makes the row NaN
        bad = (labels != ignore_index) & ~valid
        loss, grad = torch.where(bad, math.nan, loss), torch.where(bad[:, None], math.nan, grad)
    return loss, grad


def ref_entropy(x, temps, kind, normalize):
    x = x.double()
    n, c = x.shape
    if kind == 0:
        log_p = torch.log_softmax(x[None] / temps.double()[:, None, None], -1)
    else:
        log_p = x.log()[None].expand(len(temps), n, c)
    p = log_p.exp()
    h = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
    if normalize:
        h = h / math.log(c) if c > 1 else torch.zeros_like(h)
    return h


# ---- the subprocess driver and compile checks (parent process) ----------------------------------


@pytest.mark.skipif(IN_INTERPRETER, reason="already running interpreted: the cases run here")
@pytest.mark.skipif(
    not K.TRITON_AVAILABLE, reason=f"triton not importable: {K.TRITON_IMPORT_ERROR}"
)
def test_interpreter_suite():
    """This file's interpreted cases, and the properties and rules of test_ops_properties.py for
    the triton backend, in one TRITON_INTERPRET=1 child."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    files = [str(Path(__file__)), str(Path(__file__).with_name("test_ops_properties.py"))]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"interpreted kernel tests failed (rc={proc.returncode}):\n{out[-8000:]}"
    )
    assert " passed" in out and "failed" not in out, out[-4000:]


# Importing and running rbkd.ops without triton: tests/test_ops_gpu_path.py.


def _compile_variants():
    # Triton turns an int argument equal to 1 into a constexpr (C = 1, a row stride of 1), which
    # changes the code it compiles: those variants are listed too.
    b16, f32 = "*bf16", "*fp32"
    yield (
        "temperature_softmax",
        "_temperature_softmax_fwd_kernel",
        {"x_ptr": b16, "out_ptr": b16},
        [dict(T_ROWS=tr, LOG=lg, BLOCK=4096) for tr in (False, True) for lg in (False, True)]
        + [dict(T_ROWS=False, LOG=True, BLOCK=1, C=1, x_row_stride=1)],
    )
    yield (
        "temperature_softmax",
        "_temperature_softmax_bwd_kernel",
        {"y_ptr": b16, "g_ptr": b16, "gi_ptr": b16},
        [dict(T_ROWS=False, LOG=lg, BLOCK=4096) for lg in (False, True)],
    )
    flags = dict(T_ROWS=True, ALPHA_ROWS=True, T_SQUARED=True, GS_PTR=True, BLOCK=2048)
    yield (
        "kd_loss",
        "_kd_loss_fwd_kernel",
        {"s_ptr": b16, "t_ptr": f32, "labels_ptr": "*i64", "grad_ptr": b16},
        [
            dict(flags, TEACHER_KIND=k, HAS_LABELS=lab, NEED_GRAD=ng)
            for k in (0, 1, 2)
            for lab in (False, True)
            for ng in (False, True)
        ]
        + [
            dict(
                flags, TEACHER_KIND=0, HAS_LABELS=True, NEED_GRAD=True, BLOCK=1, C=1, ignore_index=1
            )
        ]
        + [  # scalars everywhere: alpha, s and grad_scale become Python floats in the kernel
            dict(
                flags,
                T_ROWS=False,
                ALPHA_ROWS=False,
                T_SQUARED=False,
                GS_PTR=False,
                TEACHER_KIND=k,
                HAS_LABELS=lab,
                NEED_GRAD=True,
            )
            for k in (0, 2)
            for lab in (False, True)
        ],
    )
    # The divergence kernel: every divergence with and without standardize (kl only with it),
    # the teacher kinds, no labels, no gradient, C = 1.
    dflags = dict(flags, TEACHER_KIND=0, HAS_LABELS=True, NEED_GRAD=True)
    yield (
        "kd_divergence",
        "_kd_div_fwd_kernel",
        {"s_ptr": b16, "t_ptr": b16, "labels_ptr": "*i64", "grad_ptr": b16},
        [
            dict(dflags, DIVERGENCE=d, STANDARDIZE=st)
            for d in range(7)
            for st in (False, True)
            if d or st
        ]
        + [
            dict(dflags, DIVERGENCE=d, STANDARDIZE=False, TEACHER_KIND=k)
            for d, k in ((6, 1), (4, 2))
        ]
        + [dict(dflags, DIVERGENCE=d, STANDARDIZE=False, HAS_LABELS=False) for d in (2, 5)]
        + [dict(dflags, DIVERGENCE=3, STANDARDIZE=True, NEED_GRAD=False)]
        + [dict(dflags, DIVERGENCE=6, STANDARDIZE=True, BLOCK=1, C=1, ignore_index=1)],
    )
    yield (
        "kd_loss",
        "_scale_rows_kernel",
        {"g_ptr": b16, "scale_ptr": f32},
        [dict(PER_ROW=pr, BLOCK=2048) for pr in (False, True)],
    )
    yield (
        "soft_label_entropy",
        "_entropy_logits_kernel",
        {"x_ptr": b16},
        [dict(KC=1, BLOCK=4096), dict(KC=4, BLOCK=1024)],
    )
    yield (
        "soft_label_entropy",
        "_entropy_probs_kernel",
        {"x_ptr": f32},
        [dict(BLOCK=4096), dict(BLOCK=1, C=1, K=1, N=1)],
    )


@pytest.mark.skipif(
    not K.TRITON_AVAILABLE, reason=f"triton not importable: {K.TRITON_IMPORT_ERROR}"
)
@pytest.mark.skipif(IN_INTERPRETER, reason="interpreted kernels cannot be compiled")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")
def test_kernels_compile_for_sm90_without_spills():
    """The interpreter accepts Python the compiler rejects; compile every variant for an H100
    (no GPU needed) and check, where cuobjdump is there, that no registers spill."""
    import importlib
    import shutil
    import tempfile

    pytest.importorskip("triton.backends.nvidia", reason="triton built without the CUDA backend")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    cuobjdump = str(cuobjdump) if cuobjdump.exists() else shutil.which("cuobjdump")
    scalars = {
        "C": "i32",
        "K": "i32",
        "N": "i32",
        "n_chunks": "i32",
        "ignore_index": "i64",
        "inv_log_c": "fp32",
    }
    for module, name, ptr_types, variants in _compile_variants():
        fn = getattr(importlib.import_module(f"rbkd.kernels.{module}"), name)
        for constexprs in variants:
            sig = {}
            for p in fn.params:
                if p.name in constexprs:
                    sig[p.name] = "constexpr"
                elif p.name.endswith("_ptr"):
                    sig[p.name] = ptr_types.get(p.name, "*fp32")
                elif p.name.endswith("_stride"):
                    sig[p.name] = "i32"
                else:
                    sig[p.name] = scalars.get(p.name, "fp32")
            warps = max(1, min(16, constexprs["BLOCK"] * constexprs.get("KC", 1) // 256))
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
            kernel = triton.compile(
                src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
            )
            if cuobjdump is None:
                continue
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run(
                    [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
                ).stdout
            assert "LOCAL:0" in usage, (
                f"{name} {constexprs}: registers spill to local memory:\n{usage}"
            )


# ---- interpreted cases (CPU tensors, TRITON_INTERPRET=1) ----------------------------------------
# C = 300 runs with a 64-column block and C = 37 with 16, so the online accumulation crosses
# several blocks and a ragged last one; the other C fit one block.
SHAPES_C = [(1, None), (2, None), (10, None), (37, 16), (300, 64)]


@interp
@quiet
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("N", [0, 1, 5])
@pytest.mark.parametrize("C,block", SHAPES_C)
def test_softmax_shapes(C, block, N, log):
    x = rows(N, C, torch.float32)
    T = 2.0 if N != 5 else per_row_T(N)
    y = K.temperature_softmax_forward(x, T, log, block_size=block)
    assert y.dtype == x.dtype and y.is_contiguous()
    assert_close(y, ref_softmax(x, T, log), TOL[torch.float32], "softmax forward")
    g = rows(N, C, torch.float32, scale=1.0, seed=3)
    gi = K.temperature_softmax_backward(y, g, T, log, block_size=block)
    # Also against autograd through the float64 forward, not only the closed form.
    xr = x.double().requires_grad_()
    ref_softmax(xr, T, log).backward(g.double())
    assert_close(gi, xr.grad, TOL[torch.float32], "softmax backward")


@interp
@quiet
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_dtypes_strides_extremes(dtype, log):
    N, C = 5, 300
    x = rows(N, C, dtype, stride_pad=7)  # row stride 307
    x[0, :3] = 1e4
    x[1, 5:9] = -1e4
    x[2, 10:20] = -INF
    T = per_row_T(N)
    y = K.temperature_softmax_forward(x, T, log, block_size=64)
    assert y.dtype == dtype
    assert_close(y, ref_softmax(x, T, log), TOL[dtype], f"softmax forward {dtype}")
    g = rows(N, C + 3, dtype, scale=1.0, seed=4)[:, 3:]
    gi = K.temperature_softmax_backward(y, g, T, log, block_size=64)
    assert gi.dtype == dtype
    ref = ref_softmax_bwd(y, g, T, log)
    assert_close(
        gi,
        ref,
        (TOL[dtype][0] * ref.abs().max().item(), TOL[dtype][1]),
        f"softmax backward {dtype}",
    )


def _teacher(kind, N, C, dtype, stride_pad=0, seed=2):
    t = rows(N, C, torch.float64, stride_pad=stride_pad, seed=seed)
    if kind == 1:
        t = torch.softmax(t, -1)
    elif kind == 2:
        t = torch.log_softmax(t, -1)
    return t.to(dtype)


def _check_kd(z, t, labels, T, alpha, kind, t_squared, ignore_index, grad_scale, block, dtype=None):
    dtype = dtype or z.dtype
    tol = PROBS_TOL[t.dtype]
    opts = KDOptions(kind, t_squared, ignore_index, tol)
    loss, grad = K.kd_loss_forward(z, t, labels, T, alpha, grad_scale, True, opts, block)
    ref_loss, ref_grad = ref_kd(z, t, labels, T, alpha, kind, t_squared, ignore_index, grad_scale)
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype and grad.is_contiguous()
    assert_close(loss, ref_loss, FP32_TOL, "kd loss")
    scale = max(ref_grad.nan_to_num().abs().max().item(), 1e-30) if ref_grad.numel() else 1.0
    assert_close(grad, ref_grad, (TOL[dtype][0] * scale, TOL[dtype][1]), "kd grad")
    loss2, none = K.kd_loss_forward(z, t, labels, T, alpha, grad_scale, False, opts, block)
    assert none is None
    assert_close(loss2, loss, (0.0, 0.0), "kd loss without grad")


@interp
@quiet
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("N", [0, 1, 5])
@pytest.mark.parametrize("C,block", SHAPES_C)
def test_kd_loss_shapes(C, block, N, kind, with_labels):
    z = rows(N, C, torch.float32)
    t = _teacher(kind, N, C, torch.float32)
    labels = None
    if with_labels:
        labels = torch.arange(N, dtype=torch.int64) % C
        if N == 5:
            labels[1] = -100
    per_row = N == 5  # per-row T and alpha on the biggest batch, scalars elsewhere
    T = per_row_T(N) if per_row else 2.0
    alpha = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0])[:N] if per_row else 0.5
    grad_scale = torch.tensor(0.25) if per_row else 1.0 / max(N, 1)
    _check_kd(z, t, labels, T, alpha, kind, per_row or C == 37, -100, grad_scale, block)


@interp
@quiet
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kd_loss_dtypes_strides_extremes(dtype, kind):
    N, C = 5, 300
    z = rows(N, C, dtype, stride_pad=5)  # student row stride 305
    z[0, :2] = 1e4
    z[1, 7:11] = -1e4
    z[3, 40:60] = -INF  # student -inf where the teacher has mass: KL = +inf on that row
    t = _teacher(kind, N, C, torch.float32, stride_pad=11)  # teacher float32, row stride 311
    if kind == 0:
        t[2, :] *= 3000  # a near one-hot teacher (+-1e4 logits)
        t[4, 100:140] = -INF  # teacher probability exactly 0 there
        t[3, 40:60] = -INF  # ...and both sides -inf on row 3: 0 * log 0 = 0, KL stays finite
    labels = torch.tensor([0, 8, 299, 50, 120])  # row 3: z_y = -inf, CE = +inf
    alpha = torch.tensor([0.5, 0.0, 0.7, 1.0, 0.2])  # alpha = 1 drops the infinite CE of row 3
    _check_kd(z, t, labels, per_row_T(N), alpha, kind, True, -100, torch.tensor(0.5), 64)
    _check_kd(z, t, None, 3.0, 1.0, kind, False, -100, 1.0, None)


@interp
@quiet
def test_kd_loss_ignored_and_out_of_range_labels():
    N, C = 5, 37
    z = rows(N, C, torch.bfloat16)
    t = _teacher(0, N, C, torch.bfloat16)
    # Out-of-range labels give NaN rows (the non-finite rule), never a read of z[y] out of
    # bounds; the ignored row stays 0.
    wild = torch.tensor([C, -1, 10**12, -(10**12), -100])
    loss, grad = K.kd_loss_forward(z, t, wild, 2.0, 0.5, 1.0, True, KDOptions(), block_size=16)
    assert loss[:4].isnan().all() and grad[:4].isnan().all()
    assert loss[4] == 0 and grad[4].eq(0).all()
    loss, grad = K.kd_loss_forward(z, t, wild.int(), 2.0, 0.5, 1.0, True, KDOptions())
    assert loss[:4].isnan().all() and loss[4] == 0, "int32 labels"
    every = torch.full((N,), 7)  # ignore_index other than -100: all rows ignored
    loss, grad = K.kd_loss_forward(z, t, every, 2.0, 0.5, 1.0, True, KDOptions(ignore_index=7))
    assert loss.eq(0).all() and grad.eq(0).all() and not grad.isnan().any()
    mixed = torch.tensor([3, 7, 36, 37, 0])
    _check_kd(z, t, mixed, per_row_T(N), 0.3, 0, False, 7, 1.0, 16)


@interp
@quiet
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("N", [0, 1, 5])
@pytest.mark.parametrize("C,block", SHAPES_C)
def test_entropy_logits_shapes(C, block, N, normalize):
    x = rows(N, C, torch.float32)
    temps = torch.tensor([0.5, 1.0, 4.0])  # K = 3: one padding temperature in the tile
    h = K.soft_label_entropy_forward(x, temps, EntropyOptions(0, normalize), block_size=block)
    assert h.dtype == torch.float32 and h.shape == (3, N)
    assert_close(h, ref_entropy(x, temps, 0, normalize), FP32_TOL, "entropy")


@interp
@quiet
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_dtypes_strides_extremes(dtype):
    N, C = 5, 300
    x = rows(N, C, dtype, stride_pad=9)
    x[0] *= 3000  # +-1e4 logits: near one-hot at T = 1, still spread at T = 1e4
    x[1, :150] = -INF
    x[2, 1:] = -INF  # a single finite logit: entropy exactly 0
    temps = torch.tensor([0.25, 1.0, 2.0, 10.0, 1e4])  # K = 5 pads to 8
    h = K.soft_label_entropy_forward(x, temps, EntropyOptions(0, True), block_size=32)
    assert_close(h, ref_entropy(x, temps, 0, True), FP32_TOL, f"entropy {dtype}")
    assert h[:, 2].eq(0).all()
    h1 = K.soft_label_entropy_forward(x, temps[:1], EntropyOptions())  # default block, K = 1
    assert_close(h1, ref_entropy(x, temps[:1], 0, False), FP32_TOL, f"entropy K=1 {dtype}")


@interp
@quiet
@pytest.mark.parametrize("C,block", SHAPES_C)
def test_entropy_probs(C, block):
    N = 5
    p = torch.softmax(rows(N, C, torch.float64), -1)
    p[0, : C // 2] = 0.0  # 0 * log 0 = 0
    p = (p / p.sum(-1, keepdim=True)).to(torch.float32)
    for normalize in (False, True):
        h = K.soft_label_entropy_forward(p, torch.ones(2), EntropyOptions(1, normalize), block)
        assert h.shape == (2, N)
        assert_close(h, ref_entropy(p, torch.ones(2), 1, normalize), FP32_TOL, "entropy of probs")
    assert K.soft_label_entropy_forward(p, None, EntropyOptions(1)).shape == (1, N)


@interp
@quiet
def test_backend_interface_matches_reference_backend():
    """The triton backend through the interface rbkd.ops dispatches to, against the project's
    pure-torch oracle (rbkd/ops/backends/torch_twin.py)."""
    from rbkd.ops.backends import torch_twin
    from rbkd.ops.backends import triton as backend

    assert backend.NAME == "triton" and backend.is_available()
    assert backend.supports(torch.device("cpu")) and backend.supports(torch.device("cuda"))
    N, C = 4, 53
    x = rows(N, C, torch.float32)
    for log in (False, True):
        y = backend.softmax_forward(x, SoftmaxOptions(2.0, log))
        assert_close(
            y,
            torch_twin.softmax_forward(x, SoftmaxOptions(2.0, log)),
            TOL[torch.float32],
            "backend softmax",
        )
        g = rows(N, C, torch.float32, seed=5)
        assert_close(
            backend.softmax_backward(y, g, SoftmaxOptions(2.0, log)),
            torch_twin.softmax_backward(y, g, SoftmaxOptions(2.0, log)),
            TOL[torch.float32],
            "backend softmax bwd",
        )
    t = _teacher(0, N, C, torch.float32)
    labels = torch.tensor([1, -100, 52, 0])
    args = (x, t, labels, per_row_T(N), 0.4, torch.tensor(0.25), True, KDOptions())
    (loss, grad), (rloss, rgrad) = backend.kd_loss_forward(*args), torch_twin.kd_loss_forward(*args)
    assert_close(loss, rloss, FP32_TOL, "backend kd loss")
    assert_close(grad, rgrad, TOL[torch.float32], "backend kd grad")
    temps = torch.tensor([1.0, 3.0])
    assert_close(
        backend.entropy_forward(x, temps, EntropyOptions(0, True)),
        torch_twin.entropy_forward(x, temps, EntropyOptions(0, True)),
        FP32_TOL,
        "backend entropy",
    )


# ---- divergences and standardize (kernels/kd_divergence.py) against the executable spec ---------
# rbkd/ops/backends/torch_twin.py run in float64 on the same (rounded) inputs is the spec here: it
# matches torch.autograd to 1e-15. Several situations share the rows of one launch, since every
# interpreted launch costs about a second.
DIV_NAMES = ["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "dkd"]


def _spec(z, t, labels, T, alpha, grad_scale, opts):
    from rbkd.ops.backends import torch_twin

    dbl = lambda v: v.double() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return torch_twin.kd_loss_forward(
        z.double(), t.double(), labels, dbl(T), dbl(alpha), dbl(grad_scale), True, opts
    )


def _check_div(z, t, labels, T, alpha, opts, block, grad_scale=0.5, loss_tol=FP32_TOL):
    loss, grad = K.kd_loss_forward(z, t, labels, T, alpha, grad_scale, True, opts, block)
    ref_loss, ref_grad = _spec(z, t, labels, T, alpha, grad_scale, opts)
    what = f"{DIV_NAMES[opts.divergence]} standardize={opts.standardize} {z.dtype}"
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype and grad.is_contiguous()
    assert_close(loss, ref_loss, loss_tol, f"{what}: loss")
    # Gradient rows are compared at the scale of their largest entry (rows differ by orders of
    # magnitude: per-row T, alpha, standardize's 1 / sigma).
    atol, rtol = TOL[z.dtype]
    scale = ref_grad.nan_to_num(posinf=0.0, neginf=0.0).abs().amax(1, keepdim=True)
    assert_close(grad, ref_grad, (atol * scale.clamp_min(1e-30), rtol), f"{what}: grad")
    return loss, grad


def _div_opts(div, standardize=False, kind=0, tol=1e-3, **kw):
    return KDOptions(
        kind, True, -100, tol, div, kw.pop("beta", 0.3), kw.pop("skew", 0.2),
        kw.pop("dkd_alpha", 1.0), kw.pop("dkd_beta", 8.0), standardize,
    )  # fmt: skip


def _div_rows(dtype, C=150):
    """Six rows: plain; ignored; a large mean (standardize's moments); alpha 0 (the KD term
    dropped); alpha 1 (CE dropped); a near one-hot teacher whose argmax is the label (dkd's p_y,
    q_y near 1)."""
    z = rows(6, C, dtype, stride_pad=3)
    t = rows(6, C, torch.float64, seed=2)
    big = 1e4 if dtype == torch.float32 else 100.0
    z[2] += big
    t[2] -= 0.3 * big
    t[5] *= 30
    t = t.to(dtype)
    labels = torch.tensor([0, -100, 7, C - 1, 40, int(t[5].float().argmax())])
    T = torch.tensor([0.7, 2.0, 1.5, 3.0, 4.0, 1.0])
    alpha = torch.tensor([0.5, 0.5, 0.8, 0.0, 1.0, 0.3])
    return z, t, labels, T, alpha


@interp
@quiet
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("div", range(7))
def test_kd_divergence_rows(div, standardize):
    """Every divergence with and without standardize, three blocks of 64 (the last ragged),
    per-row T and alpha, an ignored row; the dtype rotates with the divergence."""
    dtype = DTYPES[(div + standardize) % 3]
    z, t, labels, T, alpha = _div_rows(dtype)
    _check_div(z, t, labels, T, alpha, _div_opts(div, standardize), 64, torch.tensor(0.25))


@interp
@quiet
@pytest.mark.parametrize("div", range(1, 7))
def test_kd_divergence_teacher_kinds(div):
    """probs (float32, for a bf16 student) and log_probs (fp16) teachers; int32 labels and
    scalar T / alpha; no labels (every divergence but dkd)."""
    C = 100
    z = rows(4, C, torch.bfloat16)
    t = _teacher(1, 4, C, torch.float32)
    labels = torch.tensor([3, 99, -100, 0], dtype=torch.int32)
    _check_div(z, t, labels, 2.0, 0.6, _div_opts(div, kind=1), 64)
    z = rows(4, C, torch.float16, seed=4)
    t = _teacher(2, 4, C, torch.float16, seed=5)
    opts = _div_opts(div, kind=2, tol=PROBS_TOL[torch.float16])
    _check_div(z, t, None if div != 6 else labels.long(), 3.0, 1.0, opts, 64, grad_scale=1.0)


@interp
@quiet
@pytest.mark.parametrize("div,standardize", [(2, True), (6, True), (4, False)])
def test_kd_divergence_nonfinite_and_edges(div, standardize):
    """The non-finite rule (NaN student, +inf teacher, a row of -inf, label out of range, T and
    alpha out of range: NaN loss and gradient rows, nothing read for a bad label), an ignored
    row, a constant row (sigma = 0) and the loss without the gradient."""
    C = 37
    z = rows(8, C, torch.float32)
    t = rows(8, C, torch.float32, seed=2)
    z[0, 5] = math.nan
    t[1, 9] = INF
    z[2] = -INF
    z[7] = 1.25  # constant row: z' = 0
    labels = torch.tensor([1, 2, 3, C, 4, 5, -100, 6])
    T = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0, 2.0])
    alpha = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 1.5, 0.5, 0.5])
    opts = _div_opts(div, standardize)
    loss, grad = _check_div(z, t, labels, T, alpha, opts, 16)
    assert loss[:6].isnan().all() and grad[:6].isnan().all()
    assert loss[6] == 0 and grad[6].eq(0).all()
    assert loss[7].isfinite() and grad[7].isfinite().all()
    loss2, none = K.kd_loss_forward(z, t, labels, T, alpha, 0.5, False, opts, 16)
    assert none is None
    assert_close(loss2, loss, (0.0, 0.0), "loss without the gradient")


@interp
@quiet
def test_kd_divergence_special_values():
    """jsd's ends (beta 0 is kl, 1 reverse_kl), skew 0, zero dkd weights, C = 1 (a single class:
    every divergence 0, standardize's z' = 0), a -inf teacher entry under reverse_kl (infinite
    loss) and under standardize (a NaN row)."""
    z = rows(3, 10, torch.float32)
    t = rows(3, 10, torch.float32, seed=2)
    labels = torch.tensor([1, 9, 0])
    for beta, same in ((0.0, 0), (1.0, 1)):
        got, _ = _check_div(z, t, labels, 2.0, 0.5, _div_opts(2, beta=beta), None)
        want, _ = K.kd_loss_forward(z, t, labels, 2.0, 0.5, 1.0, False, _div_opts(same), None)
        assert_close(got, want, (0.0, 0.0), f"jsd beta={beta}")
    for div in (3, 4):
        _check_div(z, t, labels, 2.0, 0.5, _div_opts(div, skew=0.0), None)
    _check_div(z, t, labels, 2.0, 0.5, _div_opts(6, dkd_alpha=0.0, dkd_beta=2.0), None)
    _check_div(z, t, labels, 2.0, 0.5, _div_opts(6, True, dkd_alpha=3.0, dkd_beta=0.0), None)
    one = torch.tensor([0, 0, -100])
    for div, std in ((1, False), (5, True), (6, True), (0, True)):
        loss, grad = _check_div(z[:, :1], t[:, :1], one, 2.0, 0.5, _div_opts(div, std), None)
        assert loss.eq(0).all() and grad.eq(0).all()
    t[0, 3] = -INF
    loss, _ = _check_div(z, t, labels, 2.0, 0.5, _div_opts(1), None)
    assert loss[0] == INF
    # standardize of a row holding -inf: its mean is -inf, z' undefined. The kernel makes the
    # row NaN (loss and gradient); the reference's kl masks the NaN p_t terms to a loss of 0
    # beside a NaN gradient row, so only the other rows are compared there.
    loss, grad = K.kd_loss_forward(z, t, None, 2.0, 1.0, 1.0, True, _div_opts(0, True), None)
    assert loss[0].isnan() and grad[0].isnan().all()
    _check_div(z[1:], t[1:], None, 2.0, 1.0, _div_opts(0, True), None)


def test_backend_supports_cpu_only_when_interpreting(monkeypatch):
    from rbkd.ops.backends import triton as backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not backend.supports(torch.device("cpu"))
    assert backend.supports(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.supports(torch.device("cpu"))


# ---- realistic shapes on a GPU ------------------------------------------------------------------
# Each case is a function of the device and the shape, so the interpreter also runs it (on
# small C) and a GPU machine is not the first to execute the test code itself.


def _vocab_case(device, N, C, kind):
    g = torch.Generator(device=device).manual_seed(0)
    wide = torch.randn(N, C + 64, generator=g, device=device, dtype=torch.float32) * 4
    z = wide.to(torch.bfloat16)[:, :C]  # non-contiguous rows, as a slice of padded logits
    t = torch.randn(N, C, generator=g, device=device) * 4
    # kind 1: float32 teacher probabilities for a bf16 student; kind 0: bf16 logits.
    t = torch.softmax(t, -1) if kind == 1 else t.to(torch.bfloat16)
    labels = torch.randint(0, C, (N,), generator=g, device=device)
    labels[::7] = -100
    T = (0.5 + 4 * torch.rand(N, generator=g, device=device)).float()
    grad_scale = torch.tensor(1.0 / N, device=device)
    loss, grad = K.kd_loss_forward(z, t, labels, T, 0.5, grad_scale, True, KDOptions(kind))
    ref_loss, ref_grad = ref_kd(
        z.cpu(), t.cpu(), labels.cpu(), T.cpu(), 0.5, kind, True, -100, 1.0 / N
    )
    assert_close(loss, ref_loss, (1e-4, 1e-4), f"kd loss C={C}")
    assert_close(grad, ref_grad, (1e-2 * ref_grad.abs().max().item(), 1e-2), f"kd grad C={C}")


def _softmax_entropy_case(device, N, C, dtype):
    g = torch.Generator(device=device).manual_seed(1)
    x = (torch.randn(N, C, generator=g, device=device) * 4).to(dtype)
    for log in (False, True):
        y = K.temperature_softmax_forward(x, 2.0, log)
        assert_close(y, ref_softmax(x.cpu(), 2.0, log), TOL[dtype], f"softmax C={C}")
        go = torch.randn(N, C, generator=g, device=device).to(dtype)
        gi = K.temperature_softmax_backward(y, go, 2.0, log)
        ref = ref_softmax_bwd(y.cpu(), go.cpu(), 2.0, log)
        assert_close(
            gi, ref, (TOL[dtype][0] * ref.abs().max().item(), TOL[dtype][1]), f"softmax bwd C={C}"
        )
    temps = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], device=device)
    h = K.soft_label_entropy_forward(x, temps, EntropyOptions(0, True))
    assert_close(h, ref_entropy(x.cpu(), temps.cpu(), 0, True), (1e-5, 1e-4), f"entropy C={C}")


def _div_vocab_case(device, N, C, div, standardize):
    """A divergence at a language-model vocabulary: bf16 student rows sliced from padded logits,
    bf16 teacher logits, per-row T, a device grad_scale, every 7th row ignored; checked against
    the float64 spec on the CPU."""
    g = torch.Generator(device=device).manual_seed(div)
    wide = torch.randn(N, C + 64, generator=g, device=device, dtype=torch.float32) * 4
    z = wide.to(torch.bfloat16)[:, :C]
    t = (torch.randn(N, C, generator=g, device=device) * 4).to(torch.bfloat16)
    labels = torch.randint(0, C, (N,), generator=g, device=device)
    labels[::7] = -100
    T = (0.5 + 4 * torch.rand(N, generator=g, device=device)).float()
    gs = torch.tensor(1.0 / N, device=device)
    opts = _div_opts(div, standardize, beta=0.5)
    loss, grad = K.kd_loss_forward(z, t, labels, T, 0.5, gs, True, opts)
    ref_loss, ref_grad = _spec(z.cpu(), t.cpu(), labels.cpu(), T.cpu(), 0.5, gs.cpu(), opts)
    what = f"{DIV_NAMES[div]} standardize={standardize} C={C}"
    assert_close(loss, ref_loss, (1e-4, 1e-4), f"{what}: loss")
    scale = ref_grad.abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert_close(grad, ref_grad, (1e-2 * scale, 1e-2), f"{what}: grad")


@interp
@quiet
def test_realistic_cases_run_interpreted():
    _vocab_case("cpu", 8, 300, 0)
    _vocab_case("cpu", 8, 300, 1)
    _softmax_entropy_case("cpu", 3, 300, torch.bfloat16)
    _div_vocab_case("cpu", 3, 300, 6, True)
    _div_vocab_case("cpu", 3, 300, 2, False)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", [0, 1])
@pytest.mark.parametrize("C", [32000, 128256])
def test_gpu_kd_loss_vocab(C, kind):
    _vocab_case("cuda", 64, C, kind)


# Each divergence at both vocabularies; standardize for kl, jsd and dkd (its moments pass).
GPU_DIV_CASES = [(d, False) for d in range(1, 7)] + [(0, True), (2, True), (6, True)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "div,standardize", GPU_DIV_CASES, ids=[f"{DIV_NAMES[d]}{'-std' * s}" for d, s in GPU_DIV_CASES]
)
@pytest.mark.parametrize("C", [32000, 128256])
def test_gpu_kd_divergence_vocab(C, div, standardize):
    _div_vocab_case("cuda", 16, C, div, standardize)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "C,dtype", [(32000, torch.bfloat16), (128256, torch.bfloat16), (262144 + 17, torch.float32)]
)
def test_gpu_softmax_and_entropy(C, dtype):
    _softmax_entropy_case("cuda", 16, C, dtype)


@pytest.mark.gpu
@needs_gpu
def test_gpu_no_host_sync():
    """Per-row T, alpha and a device grad_scale: the launch must not synchronize (CUDA-graph and
    overlap friendly)."""
    N, C = 256, 32000
    z = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, C, (N,), device="cuda")
    T = torch.full((N,), 2.0, device="cuda")
    alpha = torch.full((N,), 0.5, device="cuda")
    gs = torch.tensor(1.0 / N, device="cuda")
    temps = torch.tensor([1.0, 4.0], device="cuda")
    run = lambda: (  # noqa: E731
        K.kd_loss_forward(z, t, labels, T, alpha, gs, True, KDOptions()),
        K.temperature_softmax_forward(z, T, False),
        K.soft_label_entropy_forward(z, temps, EntropyOptions(0, True)),
    )
    run()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_gpu
def test_gpu_rows_past_int32_offsets():
    """N * C > 2^31: row offsets must be 64-bit. Checks the last rows, which an int32 offset
    would send out of bounds or wrap to the start."""
    N, C = 16800, 128256  # 2.15e9 elements per tensor, 4.3 GB in bf16
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    z = torch.empty(N, C, device="cuda", dtype=torch.bfloat16).normal_()
    t = torch.empty(N, C, device="cuda", dtype=torch.bfloat16).normal_()
    loss, grad = K.kd_loss_forward(z, t, None, 2.0, 1.0, 1.0, True, KDOptions())
    tail = slice(N - 3, N)
    ref_loss, ref_grad = ref_kd(z[tail].cpu(), t[tail].cpu(), None, 2.0, 1.0, 0, True, -100, 1.0)
    assert_close(loss[tail], ref_loss, (1e-4, 1e-4), "kd loss, last rows")
    assert_close(
        grad[tail], ref_grad, (1e-2 * ref_grad.abs().max().item(), 1e-2), "kd grad, last rows"
    )
    del grad
    y = K.temperature_softmax_forward(z, 1.0, True)
    assert_close(
        y[tail],
        ref_softmax(z[tail].cpu(), 1.0, True),
        TOL[torch.bfloat16],
        "log_softmax, last rows",
    )
