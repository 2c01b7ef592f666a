"""The CPU kernels (rbkd._C through rbkd.ops.backends.cpu) against float64 torch math written here.

Inputs are rounded to the tested dtype first and the float64 oracle reads the
same rounded values; outputs written in float16/bfloat16 get that dtype's tolerance, float32
outputs (losses, entropies) a float32 one whatever the input dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

cpu = pytest.importorskip("rbkd.ops.backends.cpu")
if not cpu.is_available():  # pragma: no cover - depends on the build
    pytest.skip("rbkd._C is not built", allow_module_level=True)
from rbkd import _C  # noqa: E402
from rbkd.ops.args import EntropyOptions, KDOptions, SoftmaxOptions  # noqa: E402
from rbkd.ops.validation import probs_tolerance  # noqa: E402

INF = float("inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) for outputs stored in the input dtype.
TOL = {torch.float32: (1e-6, 2e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1e-2)}
LOSS_TOL = (2e-5, 2e-5)  # float32 outputs
CS = [1, 2, 10, 17, 1000, 32785]
NS = [0, 1, 7, 300]


def assert_close(actual, expected, tol, what):
    """actual vs the float64 oracle; on failure name the first mismatched indices (NaN/inf too)."""
    atol, rtol = tol
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.double(), expected.double()
    same = (a == e) | (a.isnan() & e.isnan())
    close = same | ((a - e).abs() <= atol + rtol * e.abs())
    if bool(close.all()):
        return
    bad = (~close).nonzero().tolist()
    lines = [f"{what}: {len(bad)} of {a.numel()} mismatched (atol={atol}, rtol={rtol})"]
    for idx in bad[:6]:
        lines.append(f"  first mismatch at {tuple(idx)}: got {a[tuple(idx)].item()!r}, "
                     f"expected {e[tuple(idx)].item()!r}")  # fmt: skip
    raise AssertionError("\n".join(lines))


def rand_rows(n, c, dtype, scale=3.0, seed=0, strided=False):
    """[n, c] rows in dtype; strided makes them the [:, :c] slice of an [n, 2c] tensor."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(n, 2 * c if strided else c, generator=g) * scale).to(dtype)
    return full[:, :c]


def col(value, n):
    if isinstance(value, torch.Tensor):
        return value.double().reshape(-1, 1)
    return torch.full((n, 1), float(value), dtype=torch.float64)


# ---- float64 oracles, from csrc/README.md ----------------------------------------------------------


def oracle_kd(z, t, labels, T, alpha, kind, t_squared, ignore_index, grad_scale):
    z, t = z.double(), t.double()
    n, c = z.shape
    Tc = col(T, n)
    log_ps = torch.log_softmax(z / Tc, -1)
    if kind == 0:
        log_pt = torch.log_softmax(t / Tc, -1)
        pt = log_pt.exp()
    elif kind == 1:
        pt, log_pt = t, t.log()
    else:
        pt, log_pt = t.exp(), t
    kl = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    s = (Tc * Tc).reshape(-1) if t_squared else torch.ones(n, dtype=torch.float64)
    if labels is None:
        a = torch.ones(n, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
        loss = s * kl
        onehot = torch.zeros_like(z)
        ce_coef = torch.zeros(n, dtype=torch.float64)
    else:
        a = col(alpha, n).reshape(-1)
        valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = torch.logsumexp(z, -1) - z.gather(1, safe[:, None]).squeeze(1)
        ce_part = torch.where(1 - a > 0, (1 - a) * ce, torch.zeros_like(ce))
        kl_part = torch.where(a > 0, a * s * kl, torch.zeros_like(kl))
        loss = ce_part + kl_part
        onehot = torch.nn.functional.one_hot(safe, c).double() if c > 0 else torch.zeros_like(z)
        ce_coef = 1 - a
    grad = ce_coef[:, None] * (torch.softmax(z, -1) - onehot) + (a * s)[:, None] / Tc * (
        log_ps.exp() - pt
    )
    grad = torch.where(valid[:, None], grad, torch.zeros_like(grad)) * grad_scale
    return torch.where(valid, loss, torch.zeros_like(loss)), grad


def oracle_entropy(x, temps, kind, normalize):
    x = x.double()
    n, c = x.shape
    out = []
    for T in temps.tolist():
        log_p = torch.log_softmax(x / T, -1) if kind == 0 else x.log()
        p = log_p.exp()
        out.append(-torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1))
    h = torch.stack(out) if out else torch.zeros(0, n, dtype=torch.float64)
    if normalize:
        h = h / math.log(c) if c > 1 else torch.zeros_like(h)
    return h


def teacher_of(kind, c, n, dtype, seed, strided=False, T=2.0):
    t = rand_rows(n, c, torch.float32, seed=seed, strided=strided)
    if kind == 1:
        t = torch.softmax(t / T, -1)
    elif kind == 2:
        t = torch.log_softmax(t / T, -1)
    return t.to(dtype)


def run_kd(z, t, labels, T, alpha, kind, t_squared=True, ignore_index=-100, grad_scale=0.5):
    opts = KDOptions(kind, t_squared, ignore_index, probs_tolerance(t.dtype))
    loss, grad = cpu.kd_loss_forward(z, t, labels, T, alpha, grad_scale, True, opts)
    ref_loss, ref_grad = oracle_kd(
        z, t, labels, T, alpha, kind, t_squared, ignore_index, grad_scale
    )
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype and grad.is_contiguous()
    return loss, grad, ref_loss, ref_grad


def loss_tol(ref_loss):
    """float32 tolerance, scaled to the loss magnitudes (a KL of 1e4 has a float32 ulp of 1e-3)."""
    scale = max(1.0, ref_loss.abs().max().item()) if ref_loss.numel() else 1.0
    return (LOSS_TOL[0] * scale, LOSS_TOL[1])


def grad_tol(dtype, ref_grad):
    atol, rtol = TOL[dtype]
    scale = ref_grad.abs().max().item() if ref_grad.numel() else 1.0
    return (atol * max(scale, 1e-3) * 2, rtol)


SHAPES = [(n, c) for n in NS for c in CS if not (n == 300 and c == 32785)]


# ---- kd_loss_fwd ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["logits", "probs", "log_probs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", SHAPES)
def test_kd_loss_and_grad(n, c, dtype, kind):
    z = rand_rows(n, c, dtype, seed=c + n)
    t = teacher_of(kind, c, n, dtype, seed=c + n + 1)
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, c, (n,), generator=g)
    if n > 2:
        labels[1] = -100  # ignored row
    # Per-row T and alpha on some shapes, scalars on the others.
    per_row = (n + c) % 2 == 0
    T = (0.5 + 4 * torch.rand(n, generator=g)) if per_row else 3.0
    alpha = torch.rand(n, generator=g) if per_row else 0.7
    loss, grad, ref_loss, ref_grad = run_kd(z, t, labels, T, alpha, kind)
    assert_close(loss, ref_loss, loss_tol(ref_loss), f"loss n={n} c={c}")
    assert_close(grad, ref_grad, grad_tol(dtype, ref_grad), f"grad n={n} c={c}")


@pytest.mark.parametrize("c", [1000, 1537])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kd_integer_temperatures(c, dtype):
    """Integer T: the CE exps are powers of the tempered ones (scalar T and per-row T that mixes
    integer and non-integer values, including T = 1 and T beyond the powering range)."""
    n = 12
    z = rand_rows(n, c, dtype, scale=6.0, seed=7)
    t = rand_rows(n, c, dtype, scale=6.0, seed=8)
    labels = torch.arange(n) * 37 % c
    labels[3] = -100
    rows = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0, 20.0, 32.0, 33.0, 2.5, 0.5, 7.0, 16.0])
    for T in (2.0, 4.0, 9.0, 20.0, rows):
        loss, grad, ref_loss, ref_grad = run_kd(z, t, labels, T, 0.6, 0)
        assert_close(loss, ref_loss, loss_tol(ref_loss), f"loss T={T}")
        assert_close(grad, ref_grad, grad_tol(dtype, ref_grad), f"grad T={T}")


@pytest.mark.parametrize("c", [10, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kd_pure_distillation_no_labels(c, dtype):
    z, t = rand_rows(33, c, dtype, seed=3), rand_rows(33, c, dtype, seed=4)
    for t_squared in (True, False):
        loss, grad, ref_loss, ref_grad = run_kd(z, t, None, 4.0, 0.3, 0, t_squared=t_squared)
        assert_close(loss, ref_loss, loss_tol(ref_loss), "loss")
        assert_close(grad, ref_grad, grad_tol(dtype, ref_grad), "grad")


@pytest.mark.parametrize("c", [10, 1000])
def test_kd_strided_rows(c):
    z = rand_rows(40, c, torch.float32, seed=5, strided=True)
    t = rand_rows(40, c, torch.float32, seed=6, strided=True)
    assert z.stride(0) == 2 * c and t.stride(0) == 2 * c
    labels = torch.arange(40) % c
    loss, grad, ref_loss, ref_grad = run_kd(z, t, labels, 2.0, 0.5, 0)
    assert_close(loss, ref_loss, loss_tol(ref_loss), "loss")
    assert_close(grad, ref_grad, grad_tol(torch.float32, ref_grad), "grad")


@pytest.mark.parametrize("c", [10, 17, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kd_large_logits(c, dtype):
    """Logits of +-1e4: nothing overflows, the KL of far-apart rows stays finite and accurate."""
    g = torch.Generator().manual_seed(c)
    z = (torch.randint(0, 2, (20, c), generator=g).float() * 2e4 - 1e4).to(dtype)
    t = (torch.randint(0, 2, (20, c), generator=g).float() * 2e4 - 1e4).to(dtype)
    labels = torch.arange(20) % c
    loss, grad, ref_loss, ref_grad = run_kd(z, t, labels, 1.0, 0.5, 0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
    assert_close(loss, ref_loss, loss_tol(ref_loss), "loss")
    assert_close(grad, ref_grad, grad_tol(dtype, ref_grad), "grad")


@pytest.mark.parametrize("c", [10, 17, 1000])
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["logits", "probs", "log_probs"])
def test_kd_minus_inf_at_same_positions(c, kind):
    """-inf in student and teacher at the same classes: 0 * log 0 = 0, no NaN anywhere."""
    z = rand_rows(19, c, torch.float32, seed=7).clone()
    t = rand_rows(19, c, torch.float32, seed=8).clone()
    mask = torch.zeros(19, c, dtype=torch.bool)
    mask[:, ::3] = True
    mask[:, 1] = False  # keep a finite class in every row, for the label too
    z[mask] = -INF
    t[mask] = -INF
    if kind == 1:
        t = torch.softmax(t, -1)  # exact zeros there
    elif kind == 2:
        t = torch.log_softmax(t, -1)  # -inf there
    labels = torch.full((19,), 1)
    loss, grad, ref_loss, ref_grad = run_kd(z, t, labels, 2.0, 0.5, kind)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[mask] == 0).all()
    assert_close(loss, ref_loss, loss_tol(ref_loss), "loss")
    assert_close(grad, ref_grad, grad_tol(torch.float32, ref_grad), "grad")


@pytest.mark.parametrize("c", [10, 1000])
def test_kd_ignored_and_out_of_range_labels(c):
    z, t = rand_rows(50, c, torch.float32, seed=9), rand_rows(50, c, torch.float32, seed=10)
    labels = torch.full((50,), -100)
    loss, grad, _, _ = run_kd(z, t, labels, 2.0, 0.5, 0)
    assert (loss == 0).all() and (grad == 0).all(), "all rows ignored"
    # Labels outside [0, C) that are not ignore_index follow the non-finite rule: NaN loss and
    # NaN gradient row (and z[y] is never read); the other rows are unaffected.
    labels = torch.tensor([c, c + 5, -1, -7, 2**40, 0] * 8 + [1, -100])
    loss, grad, ref_loss, ref_grad = run_kd(z, t, labels, 2.0, 0.5, 0)
    bad = ((labels < 0) | (labels >= c)) & (labels != -100)
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    assert loss[-1] == 0 and (grad[-1] == 0).all()
    good = ~bad
    assert_close(loss[good], ref_loss[good], loss_tol(ref_loss[good]), "loss")
    assert_close(grad[good], ref_grad[good], grad_tol(torch.float32, ref_grad[good]), "grad")


def test_kd_no_grad_and_tensor_grad_scale():
    z, t = rand_rows(9, 30, torch.float32, seed=11), rand_rows(9, 30, torch.float32, seed=12)
    labels = torch.arange(9)
    loss, grad = cpu.kd_loss_forward(z, t, labels, 2.0, 0.5, 1.0, False, KDOptions())
    assert grad is None
    ref_loss, ref_grad = oracle_kd(z, t, labels, 2.0, 0.5, 0, True, -100, 0.25)
    assert_close(loss, ref_loss, loss_tol(ref_loss), "loss")
    _, grad = cpu.kd_loss_forward(z, t, labels, 2.0, 0.5, torch.tensor(0.25), True, KDOptions())
    assert_close(grad, ref_grad, grad_tol(torch.float32, ref_grad), "grad")


# ---- temperature softmax -------------------------------------------------------------------------


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", SHAPES)
def test_softmax_fwd_bwd(n, c, dtype, log):
    x = rand_rows(n, c, dtype, seed=n * 7 + c, strided=c % 2 == 1)
    y = cpu.softmax_forward(x, SoftmaxOptions(2.5, log))
    atol, rtol = TOL[dtype]
    ref = torch.softmax(x.double() / 2.5, -1)
    if log:
        ref = torch.log_softmax(x.double() / 2.5, -1)
        atol = atol * 8  # log-probabilities of up to ~30 in magnitude
    assert_close(y, ref, (atol, rtol), "forward")
    g = rand_rows(n, c, dtype, scale=1.0, seed=1, strided=True)
    grad_in = cpu.softmax_backward(y, g, SoftmaxOptions(2.5, log))
    yd, gd = y.double(), g.double()
    if log:
        ref_bwd = (gd - yd.exp() * gd.sum(-1, keepdim=True)) / 2.5
    else:
        ref_bwd = yd * (gd - (gd * yd).sum(-1, keepdim=True)) / 2.5
    scale = max(1.0, ref_bwd.abs().max().item()) if ref_bwd.numel() else 1.0
    assert_close(grad_in, ref_bwd, (TOL[dtype][0] * scale * 4, TOL[dtype][1]), "backward")


def test_softmax_extreme_and_minus_inf():
    x = torch.tensor([[1e4, -1e4, 0.0, -INF], [-INF, 3.0, -INF, 3.0]])
    assert_close(
        cpu.softmax_forward(x, SoftmaxOptions(1.0, False)),
        torch.softmax(x.double(), -1),
        (0, 1e-6),
        "sm",
    )
    assert_close(
        cpu.softmax_forward(x, SoftmaxOptions(1.0, True)),
        torch.log_softmax(x.double(), -1),
        (0, 1e-6),
        "lsm",
    )


# ---- soft_label_entropy --------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", SHAPES)
def test_entropy_logits(n, c, dtype, normalize):
    x = rand_rows(n, c, dtype, seed=n + 3 * c, strided=True)
    temps = torch.tensor([0.5, 1.0, 4.0, 20.0])
    out = cpu.entropy_forward(x, temps, EntropyOptions(0, normalize))
    ref = oracle_entropy(x, temps, 0, normalize)
    scale = max(1.0, math.log(max(c, 1)))
    assert_close(out, ref, (LOSS_TOL[0] * scale, 1e-4), "entropy")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("c", CS)
def test_entropy_probs(c, normalize):
    x = torch.softmax(rand_rows(30, c, torch.float32, seed=c), -1)
    if c > 1:
        x[:, 0] = 0.0  # an exact zero: 0 * log 0 = 0
        x = x / x.sum(-1, keepdim=True)
    out = cpu.entropy_forward(
        x, torch.ones(1), EntropyOptions(1, normalize, probs_tolerance(x.dtype))
    )
    ref = oracle_entropy(x, torch.ones(1), 1, normalize)
    assert_close(out, ref, (LOSS_TOL[0] * max(1.0, math.log(c)), 1e-4), "entropy")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [3, 10, 17, 32, 33, 256, 257])
def test_entropy_small_c_tail_rows_and_minus_inf(c, dtype):
    """Small C (rows as SIMD lanes, tiles of 16) and the first large-C size: N = 16k + 5 so the last
    tile is partial, -inf entries (p = 0 contributes 0), a row with a single finite entry (H = 0),
    a NaN row and an all -inf row (both NaN, as in the large-C path)."""
    n = 16 * 4 + 5
    x = rand_rows(n, c, torch.float32, seed=7 * c, strided=True).clone()
    x[1::3, 0] = -INF
    x[2::5, c // 2] = -INF
    x[6, 1:] = -INF
    x[n - 1, :] = -INF  # in the tail tile
    x[n - 2, c - 1] = float("nan")
    x = x.to(dtype)
    temps = torch.tensor([0.5, 1.0, 3.0, 20.0])
    for normalize in (False, True):
        out = cpu.entropy_forward(x, temps, EntropyOptions(0, normalize))
        ref = oracle_entropy(x, temps, 0, normalize)
        ref[:, n - 2 :] = float("nan")  # the oracle's p > 0 test would turn a NaN row into 0
        assert_close(out, ref, (LOSS_TOL[0] * max(1.0, math.log(c)), 1e-4), "entropy")
        assert bool((out[:, 6] == 0).all())
    p = torch.softmax(rand_rows(n, c, torch.float32, seed=c), -1)
    p[::2, 0] = 0.0
    p = (p / p.sum(-1, keepdim=True)).to(dtype)
    for normalize in (False, True):
        out = cpu.entropy_forward(
            p, torch.ones(3), EntropyOptions(1, normalize, probs_tolerance(dtype))
        )
        ref = oracle_entropy(p, torch.ones(1), 1, normalize)
        assert out.shape == (3, n)
        for k in range(3):
            assert_close(
                out[k : k + 1], ref, (LOSS_TOL[0] * max(1.0, math.log(c)), 1e-4), "entropy"
            )


def test_entropy_one_read_for_many_temperatures():
    """K temperatures give K rows of output, each equal to a K = 1 call."""
    x = rand_rows(64, 100, torch.float32, seed=2)
    temps = torch.linspace(0.5, 20, 20)
    out = cpu.entropy_forward(x, temps, EntropyOptions())
    for k in (0, 7, 19):
        assert torch.equal(out[k], cpu.entropy_forward(x, temps[k : k + 1], EntropyOptions())[0])


# ---- the binding boundary --------------------------------------------------------------------------


def test_bindings_reject_bad_arguments():
    x = torch.zeros(2, 3)
    out = torch.empty(2, 3)
    with pytest.raises(ValueError, match=r"x_dtype code 7 is not one of 0 \(float32\)"):
        _C.temperature_softmax_fwd(x.data_ptr(), 7, 3, out.data_ptr(), 2, 3, 1.0, False, 1)
    with pytest.raises(ValueError, match="C must be >= 0"):
        _C.temperature_softmax_fwd(x.data_ptr(), 0, 3, out.data_ptr(), 2, -3, 1.0, False, 1)
    with pytest.raises(ValueError, match="out is a null pointer"):
        _C.temperature_softmax_fwd(x.data_ptr(), 0, 3, 0, 2, 3, 1.0, False, 1)
    with pytest.raises(ValueError, match="T must be a positive finite temperature"):
        _C.temperature_softmax_fwd(x.data_ptr(), 0, 3, out.data_ptr(), 2, 3, 0.0, False, 1)
    with pytest.raises(ValueError, match="num_threads"):
        _C.temperature_softmax_fwd(x.data_ptr(), 0, 3, out.data_ptr(), 2, 3, 1.0, False, 0)
    loss = torch.empty(2)

    def kd(**fields):
        opts = _C.KdOptions()
        for name, value in fields.items():
            setattr(opts, name, value)
        _C.kd_loss_fwd(x.data_ptr(), 0, 3, x.data_ptr(), 0, 3, 0, 1.0, 0, 0.5, 0, 2, 3,
                       loss.data_ptr(), 0, 1.0, 0, opts, 1)  # fmt: skip

    for fields, message in [
        ({"teacher_kind": 5}, "teacher_kind 5 is not one of"),
        ({"probs_tol": -1.0}, "probs_tol must be >= 0"),
        ({"divergence": 7}, "divergence 7 is not a code"),
        ({"beta": 1.5}, "beta must be in"),
        ({"skew": 1.0}, "skew must be in"),
        ({"divergence": 6}, "labels \\(dkd needs them\\) is a null pointer"),
        ({"standardize": True, "teacher_kind": 1}, "standardize needs teacher_kind 0"),
    ]:
        with pytest.raises(ValueError, match=f"kd_loss_fwd: {message}"):
            kd(**fields)
    with pytest.raises(ValueError, match="soft_label_entropy_fwd: temps is a null pointer"):
        _C.soft_label_entropy_fwd(x.data_ptr(), 0, 3, 0, 2, 2, 3, out.data_ptr(),
                                  _C.EntropyOptions(), 1)  # fmt: skip
    # N = 0 touches no memory, so null pointers are fine there.
    _C.temperature_softmax_fwd(0, 0, 3, 0, 0, 3, 1.0, False, 1)


def test_backend_interface():
    assert cpu.NAME == "cpu" and cpu.is_available()
    assert cpu.supports(torch.device("cpu")) and not cpu.supports(torch.device("meta"))


def test_scratch_allocation_failure_is_a_memory_error():
    """aligned_alloc of the per-thread row scratch is checked: a failure is a MemoryError naming
    the op, not a write through a null pointer. Provoked in a child under RLIMIT_AS: one row of
    2^27 bfloat16 classes (the inputs are untouched zero pages) needs 2.7 GB of float32 scratch."""
    import subprocess
    import sys

    code = """
import resource, torch
from rbkd.ops.args import KDOptions
from rbkd.ops.backends import cpu
c = 2**27
z = torch.zeros(1, c, dtype=torch.bfloat16)
t = torch.zeros(1, c, dtype=torch.bfloat16)
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))
try:
    cpu.kd_loss_forward(z, t, None, 2.0, 1.0, 1.0, False, KDOptions())
except MemoryError as e:
    print("MemoryError:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "MemoryError: kd_loss_fwd: could not allocate" in proc.stdout, (
        proc.stdout + proc.stderr[-2000:]
    )
