"""kd_loss on every CPU-capable backend against the float64 oracle: loss and gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_close, cpu_backends, kd_oracle

import rbkd.ops as ops

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (0, 10),
    (1, 1),
    (1, 2),
    (7, 1),
    (7, 2),
    (7, 10),
    (1, 1000),
    (7, 1000),
    (4096, 10),
    (4096, 1000),
    (1, 32785),
    (7, 32785),
]


def make_inputs(n, c, dtype, teacher_kind, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, c, generator=g) * scale).to(dtype)
    t = torch.randn(n, c, generator=g) * scale
    if teacher_kind == "probs":
        teacher = torch.softmax(t, -1)
    elif teacher_kind == "log_probs":
        teacher = torch.log_softmax(t, -1)
    else:
        teacher = t
    labels = torch.randint(0, c, (n,), generator=g)
    return student, teacher.to(dtype), labels


def run_and_check(backend, student, teacher, labels, *, loss_tol=None, grad_tol=None, **kw):
    dtype = student.dtype
    atol, rtol = TOLERANCES[dtype]
    expected_loss, expected_grad = kd_oracle(student, teacher, labels, **kw)
    z = student.detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.kd_loss(z, teacher, labels, **kw)
        loss.sum().backward()
    assert loss.dtype == torch.float32
    assert z.grad.dtype == dtype
    scale = max(1.0, float(expected_loss.abs().max())) if expected_loss.numel() else 1.0
    assert_close(loss, expected_loss, *(loss_tol or (atol * scale, rtol)), f"{backend} loss")
    gscale = float(expected_grad.abs().max()) if expected_grad.numel() else 0.0
    assert_close(
        z.grad, expected_grad, *(grad_tol or (atol * max(gscale, 1e-12), rtol)), f"{backend} grad"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", SHAPES)
def test_kd_loss_matches_oracle(backend, dtype, n, c):
    student, teacher, labels = make_inputs(n, c, dtype, "logits", seed=n * 7 + c)
    run_and_check(
        backend,
        student,
        teacher,
        labels,
        T=4.0,
        alpha=0.9,
        teacher_kind="logits",
        t_squared=True,
        ignore_index=-100,
        reduction="mean",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_kind", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("t_squared", [True, False])
def test_teacher_kinds_and_reductions(backend, teacher_kind, reduction, t_squared):
    student, teacher, labels = make_inputs(33, 17, torch.float32, teacher_kind, seed=3)
    run_and_check(
        backend,
        student,
        teacher,
        labels,
        T=2.5,
        alpha=0.3,
        teacher_kind=teacher_kind,
        t_squared=t_squared,
        ignore_index=-100,
        reduction=reduction,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [1, 10, 1000])
def test_per_row_temperature_and_alpha(backend, dtype, c):
    n = 65
    student, teacher, labels = make_inputs(n, c, dtype, "logits", seed=c)
    g = torch.Generator().manual_seed(1)
    T = torch.rand(n, generator=g) * 19 + 1
    alpha = torch.rand(n, generator=g)
    run_and_check(
        backend,
        student,
        teacher,
        labels,
        T=T,
        alpha=alpha,
        teacher_kind="logits",
        t_squared=True,
        ignore_index=-100,
        reduction="mean",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [2, 10, 1000])
def test_pure_distillation_without_labels(backend, c):
    student, teacher, _ = make_inputs(20, c, torch.float32, "logits")
    run_and_check(
        backend,
        student,
        teacher,
        None,
        T=9.0,
        alpha=0.99,
        teacher_kind="logits",
        t_squared=False,
        ignore_index=-100,
        reduction="mean",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_rows_leave_the_mean(backend):
    student, teacher, labels = make_inputs(40, 10, torch.float32, "logits")
    labels[::3] = -1
    run_and_check(
        backend,
        student,
        teacher,
        labels,
        T=4.0,
        alpha=0.5,
        teacher_kind="logits",
        t_squared=True,
        ignore_index=-1,
        reduction="mean",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_gives_zero_not_nan(backend, reduction):
    student, teacher, _ = make_inputs(9, 10, torch.float32, "logits")
    labels = torch.full((9,), -100)
    z = student.clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.kd_loss(z, teacher, labels, reduction=reduction)
        loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(z.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(backend, dtype):
    student, teacher, labels = make_inputs(16, 300, dtype, "logits", scale=1.0)
    student[:, ::7] = 1e4
    teacher[:, ::5] = -1e4
    teacher[:, 3] = 1e4
    run_and_check(
        backend,
        student.to(dtype),
        teacher.to(dtype),
        labels,
        T=4.0,
        alpha=0.9,
        teacher_kind="logits",
        t_squared=True,
        ignore_index=-100,
        reduction="sum",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_kind", ["logits", "log_probs"])
def test_minus_inf_entries_are_masked_classes(backend, teacher_kind):
    """Classes at -inf in both student and teacher contribute exactly 0 (0 * log 0 = 0)."""
    student, teacher, labels = make_inputs(12, 50, torch.float32, "logits")
    if teacher_kind == "log_probs":
        teacher[:, 10:20] = float("-inf")
        teacher = torch.log_softmax(teacher, -1)
    else:
        teacher[:, 10:20] = float("-inf")
    student[:, 10:20] = float("-inf")
    labels = labels % 10
    expected, _ = kd_oracle(
        student,
        teacher,
        labels,
        T=3.0,
        alpha=0.7,
        teacher_kind=teacher_kind,
        t_squared=True,
        ignore_index=-100,
        reduction="none",
    )
    assert torch.isfinite(expected).all()
    run_and_check(
        backend,
        student,
        teacher,
        labels,
        T=3.0,
        alpha=0.7,
        teacher_kind=teacher_kind,
        t_squared=True,
        ignore_index=-100,
        reduction="none",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_probability_zero_is_fine(backend):
    student, _, labels = make_inputs(8, 10, torch.float32, "logits")
    teacher = torch.zeros(8, 10)
    teacher[torch.arange(8), labels] = 1.0
    run_and_check(
        backend,
        student,
        teacher,
        labels,
        T=1.0,
        alpha=1.0,
        teacher_kind="probs",
        t_squared=False,
        ignore_index=-100,
        reduction="mean",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    big_s = torch.randn(30, 40)
    big_t = torch.randn(40, 30).t()  # column-major teacher: the class dim is strided
    student, teacher = big_s[::2, 5:25], big_t[::2, 3:23]
    labels = torch.randint(0, 20, (15,))
    assert not student.is_contiguous() and not teacher.is_contiguous()
    run_and_check(
        backend,
        student,
        teacher,
        labels,
        T=2.0,
        alpha=0.6,
        teacher_kind="logits",
        t_squared=True,
        ignore_index=-100,
        reduction="mean",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_student_and_teacher_dtypes(backend):
    student, teacher, labels = make_inputs(10, 37, torch.bfloat16, "logits")
    teacher = teacher.float()
    run_and_check(
        backend,
        student,
        teacher,
        labels,
        T=4.0,
        alpha=0.9,
        teacher_kind="logits",
        t_squared=True,
        ignore_index=-100,
        reduction="mean",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_is_applied(backend):
    student, teacher, labels = make_inputs(10, 12, torch.float32, "logits")
    z1 = student.clone().requires_grad_(True)
    z2 = student.clone().requires_grad_(True)
    with ops.use_backend(backend):
        (3.0 * ops.kd_loss(z1, teacher, labels)).backward()
        ops.kd_loss(z2, teacher, labels).backward()
    assert_close(z1.grad, 3.0 * z2.grad, 1e-6, 1e-6, "scaled grad")
    z3 = student.clone().requires_grad_(True)
    w = torch.arange(10, dtype=torch.float32)
    with ops.use_backend(backend):
        (ops.kd_loss(z3, teacher, labels, reduction="none") * w).sum().backward()
    assert_close(z3.grad, z2.grad * 10 * w[:, None], 1e-5, 1e-5, "per-row grad")


def test_teacher_gets_no_gradient():
    student, teacher, labels = make_inputs(4, 6, torch.float32, "logits")
    teacher.requires_grad_(True)
    z = student.clone().requires_grad_(True)
    ops.kd_loss(z, teacher, labels).backward()
    assert teacher.grad is None and z.grad is not None


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 3, -100, 6, 1])
    T = torch.tensor([1.0, 2.0, 3.0, 0.5, 9.0], dtype=torch.float64)
    from rbkd.ops.backends.reference import kd_loss_rows

    assert torch.autograd.gradcheck(lambda x: kd_loss_rows(x, t, y, T, 0.7, 0, True, -100), (z,))
