"""Property-based tests (hypothesis) of the three ops on every backend that runs here, against the
float64 reference, and the rules the README states: the non-finite rule, the T bound of kd_loss
and the validation of probs / log_probs teachers.

Backends: torch and cpu in the pytest process; triton when this file runs under
TRITON_INTERPRET=1 (tests/test_triton_kernels.py::test_interpreter_suite runs it so, then only
for triton, since the interpreter must be chosen before triton is imported).
"""

from __future__ import annotations

import math
import os

import oracle
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_close, check_kd

import rbkd.ops as ops

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = (
    ["triton"] if INTERPRETED else [b for b in ("torch", "cpu") if b in ops.available_backends()]
)
if INTERPRETED and "triton" not in ops.available_backends():  # pragma: no cover
    BACKENDS = []
KINDS = {"logits": 0, "probs": 1, "log_probs": 2}
NAN, INF = math.nan, math.inf
# Small example counts keep the suite fast on 2 cores; derandomized so CI sees the same cases.
PROPERTY = settings(
    max_examples=5 if INTERPRETED else 15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
needs_backends = pytest.mark.skipif(not BACKENDS, reason="no backend runs here")


# ---- inputs -----------------------------------------------------------------------------------


DIVERGENCE_ARGS = st.one_of(
    st.sampled_from([{"divergence": d} for d in ("reverse_kl", "tvd")]),
    st.builds(lambda b: {"divergence": "jsd", "beta": b}, st.sampled_from([0.0, 0.3, 1.0])),
    st.builds(lambda d, s: {"divergence": d, "skew": s},
              st.sampled_from(["skew_kl", "skew_reverse_kl"]), st.floats(0.0, 0.95)),
    st.builds(lambda a, b: {"divergence": "dkd", "dkd_alpha": a, "dkd_beta": b},
              st.floats(0.0, 2.0), st.floats(0.0, 10.0)),
)  # fmt: skip


@st.composite
def kd_cases(draw, divergences=False):
    """A kd_loss call: shapes with N = 0 and C = 1, strided rows, three dtypes, logits up to
    1e4, -inf entries, per-row or scalar T and alpha, labels with ignored rows (or all ignored),
    the three teacher kinds, every reduction and a few rows poisoned with NaN / inf. With
    divergences: one of them (standardized or not), and no masked classes (reverse KL is inf)."""
    div = dict(draw(DIVERGENCE_ARGS)) if divergences else {}
    n = draw(st.sampled_from([0, 1, 2, 5, 17, 20]))
    c = draw(st.sampled_from([1, 2, 3, 10, 33, 100, 300]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    kind = draw(st.sampled_from(list(KINDS)))
    scale = draw(st.sampled_from([1.0, 5.0, 100.0, 1e4]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    pad = draw(st.sampled_from([0, 3]))  # > 0: rows are a column slice of a wider tensor
    z = (torch.randn(n, c + pad, generator=g, dtype=torch.float64) * scale)[:, :c]
    t = torch.randn(n, c, generator=g, dtype=torch.float64) * min(scale, 20.0)
    if c > 1 and n > 0 and not divergences and draw(st.booleans()):  # masked classes: -inf
        t[torch.rand(n, c, generator=g) < 0.2] = -INF
        t[:, 0] = 0.0  # keep a finite entry per row
    if kind != "logits":  # with divergences no probability 0, where reverse KL is inf
        t = torch.softmax(t, -1) * (0.99 if divergences else 1) + (0.01 / c if divergences else 0)
        t = t.log() if kind == "log_probs" else t
    labels = None
    if draw(st.booleans()) or div.get("divergence") == "dkd":
        labels = torch.randint(0, c, (n,), generator=g)
        ignored = draw(st.sampled_from(["none", "some", "all"]))
        if ignored == "some":
            labels[torch.rand(n, generator=g) < 0.3] = -100
        elif ignored == "all":
            labels[:] = -100
        if draw(st.booleans()):
            labels = labels.int()
    if draw(st.booleans()):
        T = draw(st.floats(0.25, 100.0))
    else:
        T = (0.25 + 99.75 * torch.rand(n, generator=g) ** 3).float()
    alpha = draw(st.floats(0.0, 1.0)) if draw(st.booleans()) else torch.rand(n, generator=g)
    poison = draw(st.sampled_from(["none", "teacher_nan", "teacher_inf", "student_nan"]))
    if n > 0 and poison != "none":
        row = draw(st.integers(0, n - 1))
        if poison == "teacher_nan":
            t[row, draw(st.integers(0, c - 1))] = NAN
        elif poison == "teacher_inf":
            t[row, draw(st.integers(0, c - 1))] = INF
        else:
            z[row, 0] = NAN
    if kind == "logits" and n > 0 and draw(st.booleans()):
        t[draw(st.integers(0, n - 1))] = -INF  # no finite teacher logit
    if divergences and kind == "logits" and draw(st.booleans()):
        div["standardize"] = True
    return {
        "div": div,
        "z": z.to(dtype),
        "t": t.to(dtype),
        "labels": labels,
        "T": T,
        "alpha": alpha,
        "teacher_kind": kind,
        "t_squared": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }


def _grad_unit(case):
    """The size of a gradient row's terms: max(1, s / T) over the rows, over the mean's count."""
    T, n = case["T"], case["z"].shape[0]
    T = T if isinstance(T, torch.Tensor) else torch.full((max(n, 1),), T)
    s_over_T = T if case["t_squared"] else 1 / T
    count = n if case["labels"] is None else int((case["labels"] != -100).sum())
    mean = case["reduction"] == "mean"
    return float(s_over_T.max().clamp(min=1.0)) / (max(count, 1) if mean else 1) if n else 0.0


def _kw(case):
    kw = {k: case[k] for k in ("T", "alpha", "teacher_kind", "t_squared", "reduction")}
    return {**kw, **case["div"]}


# ---- properties ---------------------------------------------------------------------------------


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=kd_cases())
def test_kd_loss_property(backend, case):
    check_kd(backend, case["z"], case["t"], case["labels"], loose=2.0, **_kw(case))


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=kd_cases(divergences=True))
def test_kd_loss_divergence_property(backend, case):
    z, t, y = case["z"], case["t"], case["labels"]
    check_kd(backend, z, t, y, loose=2.0, grad_floor=_grad_unit(case), **_kw(case))


@st.composite
def entropy_cases(draw):
    n = draw(st.sampled_from([0, 1, 3, 17]))
    c = draw(st.sampled_from([1, 2, 10, 33, 257, 300]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    kind = draw(st.sampled_from(["logits", "probs"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    pad = draw(st.sampled_from([0, 5]))
    x = (torch.randn(n, c + pad, generator=g, dtype=torch.float64) * 4)[:, :c]
    if kind == "probs":
        x = torch.softmax(x, -1)
        temps = [1.0] * draw(st.integers(1, 3))
    else:
        x = x * draw(st.sampled_from([1.0, 100.0, 1e4]))
        temps = draw(st.lists(st.floats(0.25, 1e4), min_size=1, max_size=4))
    if n > 0 and draw(st.booleans()):
        row = draw(st.integers(0, n - 1))
        x[row, draw(st.integers(0, c - 1))] = draw(st.sampled_from([NAN, INF]))
    if kind == "logits" and n > 0 and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = -INF
    return x.to(dtype), temps, kind, draw(st.booleans())


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=entropy_cases())
def test_soft_label_entropy_property(backend, case):
    x, temps, kind, normalize = case
    with ops.use_backend(backend):
        h = ops.soft_label_entropy(x, temps, teacher_kind=kind, normalize=normalize)
    exp = oracle.entropy(x, temps, kind, normalize)
    assert h.shape == (len(temps), x.shape[0]) and h.dtype == torch.float32
    assert_close(h, exp, f"{backend} entropy", loose=2.5)


@st.composite
def softmax_cases(draw):
    shape = draw(st.sampled_from([(0, 5), (1, 1), (3, 7), (2, 3, 33), (4, 300)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 50.0]))
    if draw(st.booleans()) and x.numel():  # strided rows: a transposed-back copy
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    return x.to(dtype), draw(st.floats(0.25, 50.0)), draw(st.booleans())


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=softmax_cases())
def test_temperature_softmax_property(backend, case):
    x, T, log = case
    xx = x.clone().requires_grad_(True)
    with ops.use_backend(backend):
        y = ops.temperature_softmax(xx, T, log=log)
    g = torch.Generator().manual_seed(0)
    up = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (y.double() * up).sum().backward()
    x64 = x.double().requires_grad_(True)
    y64 = oracle.softmax(x64, T, log)
    (y64 * up).sum().backward()
    assert_close(y, y64, f"{backend} softmax", x.dtype)
    # The gradient is formed from the stored y (rounded to the dtype), so its error is relative to
    # the size of the terms |g| / T, not to the (possibly tiny) result.
    gscale = float(up.abs().max()) / T if x64.numel() else 1.0
    assert_close(xx.grad, x64.grad, f"{backend} grad", x.dtype, floor=gscale, loose=4)


# ---- the non-finite rule, case by case -----------------------------------------------------------

POISONS = {
    "teacher NaN": ("logits", lambda z, t: t.__setitem__((1, 2), NAN)),
    "teacher +inf": ("logits", lambda z, t: t.__setitem__((1, 2), INF)),
    "teacher all -inf": ("logits", lambda z, t: t.__setitem__(1, -INF)),
    "log_probs NaN": ("log_probs", lambda z, t: t.__setitem__((1, 0), NAN)),
    "probs +inf": ("probs", lambda z, t: t.__setitem__((1, 0), INF)),
    "student NaN": ("logits", lambda z, t: z.__setitem__((1, 3), NAN)),
}


def _poisoned(kind, poison, c, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, c, generator=g) * 3
    t = torch.randn(4, c, generator=g) * 3
    t = {"logits": t, "probs": torch.softmax(t, -1), "log_probs": torch.log_softmax(t, -1)}[kind]
    poison(z, t)
    return z.to(dtype), t.to(dtype), torch.tensor([0, 1, 2, -100])


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [10, 300])
@pytest.mark.parametrize("what", list(POISONS))
def test_non_finite_rows_give_nan_rows_on_every_backend(backend, c, what):
    kind, poison = POISONS[what]
    z, t, labels = _poisoned(kind, poison, c)
    zz = z.clone().requires_grad_(True)
    with ops.use_backend(backend):
        rows = ops.kd_loss(zz, t, labels, T=2.0, alpha=0.5, teacher_kind=kind, reduction="none")
        rows.sum().backward()
        mean = ops.kd_loss(z, t, labels, T=2.0, teacher_kind=kind)
        t_ignored = t.clone()
        labels_ignored = labels.clone()
        labels_ignored[1] = -100  # the same row, ignored: never read, 0
        fine = ops.kd_loss(z, t_ignored, labels_ignored, T=2.0, teacher_kind=kind)
    assert rows[1].isnan() and zz.grad[1].isnan().all(), f"{what}: row 1 must be NaN"
    assert rows[[0, 2]].isfinite().all() and zz.grad[[0, 2]].isfinite().all()
    assert rows[3] == 0 and zz.grad[3].eq(0).all()
    assert mean.isnan(), "the reduced loss carries the NaN"
    assert fine.isfinite(), "an ignored row is never read"
    if kind == "logits" and what.startswith("teacher"):
        with ops.use_backend(backend):
            h = ops.soft_label_entropy(t, [1.0, 3.0])
        assert h[:, 1].isnan().all() and h[:, [0, 2, 3]].isfinite().all()


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
def test_checks_full_turns_the_nan_rule_into_errors(monkeypatch, backend):
    monkeypatch.setenv("RBKD_CHECKS", "full")
    for what, (kind, poison) in POISONS.items():
        z, t, labels = _poisoned(kind, poison, 10)
        with ops.use_backend(backend), pytest.raises(ValueError) as err:
            ops.kd_loss(z, t, labels, teacher_kind=kind)
        message = str(err.value)
        assert "\n" not in message and "row 1" in message and "NaN" in message, (what, message)
    z, t, labels = _poisoned("logits", POISONS["teacher all -inf"][1], 10)
    with ops.use_backend(backend), pytest.raises(ValueError, match="logits row 1 holds NaN"):
        ops.soft_label_entropy(t, 2.0)
    monkeypatch.setenv("RBKD_CHECKS", "some")
    with pytest.raises(ValueError, match="RBKD_CHECKS must be 'default' or 'full'"):
        ops.kd_loss(z, z, labels)


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_teacher_is_validated(backend):
    """Raw logits passed as log-probabilities are an error, as probabilities that do not sum
    to 1 are (issue 9, #6); real log-probabilities pass, with -inf for impossible classes."""
    g = torch.Generator().manual_seed(5)
    z, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g) * 3
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"log-probabilities \(log-sum-exp 0\): row 0"):
            ops.kd_loss(z, t, teacher_kind="log_probs")
        lp = torch.log_softmax(t, -1)
        lp[2, 3] = -INF
        lp[2] = torch.log_softmax(lp[2], -1)
        assert ops.kd_loss(z, lp, teacher_kind="log_probs").isfinite()


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_bad_values_give_nan_rows(monkeypatch, backend):
    """Where values are not checked on the host (CUDA tensors by default), a label out of range,
    a per-row T or alpha out of range and a probs / log_probs row off mass 1 give NaN rows."""
    from rbkd.ops import validation

    monkeypatch.setattr(validation, "host_reads_are_free", lambda device: False)
    g = torch.Generator().manual_seed(6)
    z, t = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    labels = torch.tensor([0, 12, 3, -100, -7, 5])
    T = torch.tensor([2.0, 2.0, 0.0, 2.0, 2.0, 101.0])
    alpha = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 1.5])
    with ops.use_backend(backend):
        rows = ops.kd_loss(z, t, labels, T=T, alpha=alpha, reduction="none")
        assert rows.isnan().tolist() == [False, True, True, False, True, True]
        assert rows[3] == 0
        for kind, bad_teacher in (("probs", torch.softmax(t, -1) * 1.5), ("log_probs", t)):
            rows = ops.kd_loss(z, bad_teacher, None, teacher_kind=kind, reduction="none")
            assert rows.isnan().all(), kind
        h = ops.soft_label_entropy(torch.softmax(t, -1) * 1.5, teacher_kind="probs")
        assert h.isnan().all()


@needs_backends
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_temperatures(backend):
    """Issue 9, #12: T = 1e6 gave 6500 where float64 gives 6.83, and T >= 1e20 gave NaN. Above
    KD_MAX_TEMPERATURE = 100 kd_loss refuses T; at 100 it is accurate; entropy takes any T."""
    g = torch.Generator().manual_seed(7)
    z, t = torch.randn(64, 1000, generator=g) * 3, torch.randn(64, 1000, generator=g) * 3
    y = torch.randint(0, 1000, (64,), generator=g)
    with ops.use_backend(backend):
        for T in (1e6, 1e20, 1e30, 100.001):
            with pytest.raises(ValueError, match="the largest temperature kd_loss computes"):
                ops.kd_loss(z, t, y, T=T)
        with pytest.raises(
            ValueError, match=r"T\[0\] = 1000000.0: temperatures must be in \(0, 100\]"
        ):
            ops.kd_loss(z, t, y, T=torch.full((64,), 1e6))
        loss = ops.kd_loss(z, t, y, T=100.0, alpha=0.9)
        h = ops.soft_label_entropy(t, [1e6, 1e30])
    expected, _ = oracle.kd_loss(z, t, y, T=100.0, alpha=0.9)
    assert abs(float(loss) - float(expected)) <= 2e-4 * abs(float(expected))
    assert_close(h, torch.full_like(h, math.log(1000)), "entropy at huge T", loose=5)
