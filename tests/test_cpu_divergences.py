"""The C++ CPU kernel's divergences and standardize (csrc/cpu: divergence_cpu.cpp, kd_tiles.cpp)
against the torch backend, which writes csrc/README.md's formulas out: rbkd.ops.kd_loss under
use_backend("cpu") vs use_backend("torch") on the same (dtype-rounded) inputs, loss and gradient
compared in float64.

Both layouts of the kernel are covered: C <= 32 runs rows as SIMD lanes, C > 32 one row per task
(C = 32785 spans several 512-element blocks). tests/test_ops_divergences.py checks every backend
against the independent float64 oracle; this file is the kernel's own, finer-grained table.
"""

from __future__ import annotations

import math

import pytest
import torch

cpu = pytest.importorskip("rbkd.ops.backends.cpu")
if not cpu.is_available():  # pragma: no cover - depends on the build
    pytest.skip("rbkd._C is not built", allow_module_level=True)
import rbkd.ops as ops  # noqa: E402
from rbkd import _C  # noqa: E402
from rbkd.ops import use_backend  # noqa: E402

DIVERGENCES = {
    "kl": {},  # only with standardize does plain KL come here
    "reverse_kl": {"divergence": "reverse_kl"},
    "jsd": {"divergence": "jsd", "beta": 0.3},
    "jsd beta=1": {"divergence": "jsd", "beta": 1.0},  # = reverse_kl
    "skew_kl": {"divergence": "skew_kl", "skew": 0.1},
    "skew_kl 0": {"divergence": "skew_kl", "skew": 0.0},  # = kl, through the mixture formula
    "skew_reverse_kl": {"divergence": "skew_reverse_kl", "skew": 0.4},
    "tvd": {"divergence": "tvd"},
    "dkd": {"divergence": "dkd", "dkd_alpha": 0.5, "dkd_beta": 2.0},
}
CS = [1, 2, 10, 33, 1000, 32785]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the larger of the value and the row's scale: float32 kernels differ from the torch
# twin by their exp/log (~1e-7) summed over C; float16/bfloat16 gradients are rounded on output.
# (Measured: up to 2.3e-5 at C = 32785, T = 1, where log p_s ~ -10 carries 1e-6 absolute; the
# torch twin's own float32 error against float64 is of the same size.)
GRAD_TOL = {torch.float32: 4e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOSS_TOL = 2e-5


def run(backend, z, t, y, T=4.0, alpha=0.9, upstream=None, **kw):
    z = z.detach().clone().requires_grad_(True)
    with use_backend(backend):
        loss = ops.kd_loss(z, t, y, T=T, alpha=alpha, reduction="none", **kw)
        up = torch.ones_like(loss) if upstream is None else upstream
        (loss * up).sum().backward()
    return loss.detach().double(), z.grad.double()


def assert_same(a, b, tol, what, floor=1e-2):
    """|a - b| <= tol * (|b| + scale), NaN where b is NaN; scale = max |b| (at least floor)."""
    assert a.shape == b.shape, what
    nan_a, nan_b = a.isnan(), b.isnan()
    assert bool((nan_a == nan_b).all()), f"{what}: NaN at {(nan_a != nan_b).nonzero()[:4].tolist()}"
    a, b = a[~nan_b], b[~nan_b]
    if a.numel() == 0:
        return
    scale = max(float(b.abs().max()), floor)
    err = (a - b).abs() / (b.abs() + scale)
    worst = int(err.argmax())
    assert float(err.max()) <= tol, (
        f"{what}: relative error {float(err.max()):.2e} > {tol:.0e} "
        f"(got {a[worst].item()!r}, torch {b[worst].item()!r})"
    )


def inputs(n, c, dtype, seed, kind="logits"):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = torch.randn(n, c, generator=g) * 3
    if kind == "probs":
        t = torch.softmax(t / 2, -1)
    elif kind == "log_probs":
        t = torch.log_softmax(t / 2, -1)
    y = torch.randint(0, c, (n,), generator=g)
    # A probs / log_probs teacher stays float32: rounded to float16 its mass leaves probs_tol.
    return z, t.to(dtype) if kind == "logits" else t, y


def compare(z, t, y, dtype, what, **kw):
    l1, g1 = run("cpu", z, t, y, **kw)
    l0, g0 = run("torch", z, t, y, **kw)
    # Losses are O(1) (T^2 D + CE); a zero loss (C = 1) is compared at that scale.
    assert_same(l1, l0, LOSS_TOL if dtype == torch.float32 else 4 * LOSS_TOL, f"{what}: loss", 1.0)
    assert_same(g1, g0, GRAD_TOL[dtype], f"{what}: grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_matches_torch_backend(div, c, dtype):
    n = 3 if c > 1000 else 37  # 37: two full 16-row tiles and a partial one
    opts = DIVERGENCES[div]
    z, t, y = inputs(n, c, dtype, seed=c)
    y[1] = -100  # ignored: loss 0, gradient 0
    T_rows = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 4 + 0.5
    a_rows = torch.rand(n, generator=torch.Generator().manual_seed(2))
    a_rows[0] = 1.0  # drops CE
    compare(z, t, y, dtype, f"{div} C={c} labels", **opts)
    compare(z, t, y, dtype, f"{div} C={c} per-row T, alpha", T=T_rows, alpha=a_rows, **opts)
    compare(z, t, y, dtype, f"{div} C={c} alpha=0 (CE only)", alpha=0.0, **opts)
    compare(z, t, y, dtype, f"{div} C={c} T=1, no T^2", T=1.0, t_squared=False, **opts)
    if div != "dkd":
        compare(z, t, None, dtype, f"{div} C={c} no labels", **opts)
    if c != 2:  # C = 2 z-scores to +-0.707 whatever the row: its gradient is rounding noise
        compare(z, t, y, dtype, f"{div} C={c} standardize", standardize=True, **opts)
        compare(z, t, y, dtype, f"{div} C={c} standardize, per-row T", T=T_rows,
                standardize=True, **opts)  # fmt: skip
    for kind in ("probs", "log_probs"):
        if div == "kl":
            continue
        zk, tk, yk = inputs(n, c, dtype, seed=c + 1, kind=kind)
        compare(zk, tk, yk, dtype, f"{div} C={c} teacher {kind}", teacher_kind=kind, **opts)


@pytest.mark.parametrize("c", [10, 1000])
@pytest.mark.parametrize("div", ["reverse_kl", "jsd", "skew_reverse_kl", "tvd", "dkd", "kl std"])
def test_nonfinite_rows_are_nan(div, c):
    """NaN or +inf in the student or the teacher, or no finite value: NaN loss and NaN gradient
    row; the same poison in an ignored row: 0."""
    opts = {"standardize": True} if div == "kl std" else {"divergence": div}
    z, t, y = inputs(8, c, torch.float32, seed=3)
    z[0, 1], t[1, 2], z[2, 0], t[3, 3] = math.nan, math.nan, math.inf, math.inf
    z[4] = -math.inf
    z[5, 0], y[5] = math.nan, -100
    loss, grad = run("cpu", z, t, y, **opts)
    for i in (0, 1, 2, 3, 4):
        assert math.isnan(loss[i]), (div, i, loss[i])
        assert bool(grad[i].isnan().all()), (div, i)
    assert loss[5] == 0 and bool((grad[5] == 0).all())
    assert math.isfinite(loss[6]) and math.isfinite(loss[7]) and bool(grad[7].isfinite().all())
    compare(z[7:], t[7:], y[7:], torch.float32, f"{div} finite row", **opts)


@pytest.mark.parametrize("c", [17, 100])
@pytest.mark.parametrize("div", [d for d in DIVERGENCES if d != "kl"])
def test_masked_classes_and_extreme_logits(div, c):
    """-inf at the same classes in student and teacher (probability 0: every 0 log 0 is 0), and
    logits far apart (probabilities that underflow float32; dkd's non-target renormalisation)."""
    opts = DIVERGENCES[div]
    z, t, y = inputs(20, c, torch.float32, seed=4)
    z[:, 5:9] = t[:, 5:9] = -math.inf
    y = y % 5
    compare(z, t, y, torch.float32, f"{div} masked", **opts)
    z2, t2, y2 = inputs(20, c, torch.float32, seed=5)
    t2[torch.arange(20), y2] += 600.0  # teacher all on the label
    z2 *= 50.0
    # log-ratios of hundreds: float32 itself is off by ~5e-5 here (the kernel 5.3e-5, the torch
    # twin 7.5e-5 against float64, reverse_kl), so the two are compared at 2e-4.
    l1, g1 = run("cpu", z2, t2, y2, T=2.0, **opts)
    l0, g0 = run("torch", z2, t2, y2, T=2.0, **opts)
    assert_same(l1, l0, LOSS_TOL, f"{div} extreme: loss", 1.0)
    assert_same(g1, g0, 2e-4, f"{div} extreme: grad")


def test_grad_scale_tensor_upstream_strides_int32_labels_and_no_grad():
    z, t, y = inputs(40, 66, torch.float32, seed=6)
    up = torch.rand(40)
    for c in (10, 66):  # lane and row paths; [:, :c] slices are row-strided
        zc, tc = z[:, :c], t[:, :c]
        yc = (y % c).int()
        for div in ("jsd", "dkd"):
            l1, g1 = run("cpu", zc, tc, yc, upstream=up, divergence=div)
            l0, g0 = run("torch", zc, tc, yc, upstream=up, divergence=div)
            assert_same(l1, l0, LOSS_TOL, f"{div} strided loss")
            assert_same(g1, g0, GRAD_TOL[torch.float32], f"{div} strided grad")
            with torch.no_grad(), use_backend("cpu"):
                l2 = ops.kd_loss(zc, tc, yc, reduction="none", divergence=div)
            assert_same(l2.double(), l0, LOSS_TOL, f"{div} no-grad loss")
    # reduction="mean" hands the kernel a grad_scale of 1 / N
    for red in ("mean", "sum"):
        zr = z.clone().requires_grad_(True)
        with use_backend("cpu"):
            ops.kd_loss(zr, t, y, reduction=red, divergence="tvd").backward()
        zt = z.clone().requires_grad_(True)
        with use_backend("torch"):
            ops.kd_loss(zt, t, y, reduction=red, divergence="tvd").backward()
        assert_same(zr.grad.double(), zt.grad.double(), GRAD_TOL[torch.float32], red)


def _kd_call(divergence=1, labels=True, y=None, **fields):
    z = torch.randn(4, 10)
    t = torch.randn(4, 10)
    y = torch.zeros(4, dtype=torch.int64) if y is None else y
    loss = torch.empty(4)
    grad = torch.empty(4, 10)
    o = _C.KdOptions()
    o.divergence = divergence
    for k, v in fields.items():
        setattr(o, k, v)
    _C.kd_loss_fwd(z.data_ptr(), 0, 10, t.data_ptr(), 0, 10, y.data_ptr() if labels else 0,
                   2.0, 0, 0.5, 0, 4, 10, loss.data_ptr(), grad.data_ptr(), 1.0, 0, o, 1)  # fmt: skip
    return loss, grad


def test_binding_serves_every_divergence_and_rejects_bad_options():
    for div in range(7):
        for std in (False, True):
            loss, grad = _kd_call(div, standardize=std)
            assert bool(loss.isfinite().all()) and bool(grad.isfinite().all()), (div, std)
    bad = [
        ({"divergence": 7}, "divergence 7"),
        ({"divergence": -1}, "divergence -1"),
        ({"divergence": 6, "labels": False}, "dkd needs them"),
        ({"beta": 1.5}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"skew": 1.0}, "skew"),
        ({"skew": -0.1}, "skew"),
        ({"dkd_alpha": math.inf}, "dkd_alpha"),
        ({"dkd_beta": math.nan}, "dkd_alpha and dkd_beta"),
        ({"standardize": True, "teacher_kind": 1}, "standardize needs teacher_kind 0"),
    ]
    # A label outside [0, C) (the Python layer refuses it; RBKD_CHECKS off skips that): NaN row,
    # z[y] never read; ignore_index: 0.
    for div in range(7):
        loss, grad = _kd_call(div, y=torch.tensor([10, -1, -100, 3]))
        assert bool(loss[:2].isnan().all()) and bool(grad[:2].isnan().all()), div
        assert loss[2] == 0 and bool((grad[2] == 0).all()), div
        assert math.isfinite(loss[3]), div
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            _kd_call(**fields)
