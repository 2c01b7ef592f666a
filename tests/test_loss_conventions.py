"""The README's table of loss conventions, checked: each toolkit's formula, written out in float64
from its own definition, equals rbkd's kd_loss with the parameters the table maps it to."""

import pytest
import torch
import torch.nn.functional as F

import rbkd.ops as ops

N, C = 37, 11


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(7)
    student = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, C, (N,), generator=g)
    return student, teacher, labels


def _kl(student, teacher, T):
    """KL(p_t || p_s) at temperature T, mean over rows (torch's reduction='batchmean')."""
    log_ps = F.log_softmax(student / T, dim=1)
    pt = F.softmax(teacher / T, dim=1)
    return F.kl_div(log_ps, pt, reduction="batchmean")


def _rbkd(student, teacher, labels, **kw):
    return ops.kd_loss(student.float(), teacher.float(), labels, **kw).double()


def test_thesis_eq_3_5(batch):
    student, teacher, labels = batch
    a_kd, T = 0.99, 9.0
    theirs = (1 - a_kd) * F.cross_entropy(student, labels) + a_kd * _kl(student, teacher, T)
    ours = _rbkd(student, teacher, labels, T=T, alpha=a_kd, t_squared=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("alpha", "beta"), [(0.1, None), (0.5, 0.5), (0.3, 2.0)])
def test_torchdistill_kdloss(batch, alpha, beta):
    student, teacher, labels = batch
    T = 4.0
    beta = 1 - alpha if beta is None else beta
    theirs = alpha * F.cross_entropy(student, labels) + beta * T**2 * _kl(student, teacher, T)
    scale = alpha + beta
    ours = scale * _rbkd(student, teacher, labels, T=T, alpha=beta / scale, t_squared=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_torchdistill_without_targets_has_no_t_squared(batch):
    student, teacher, _ = batch
    T = 3.0
    theirs = _kl(student, teacher, T)  # torchdistill's soft_loss alone when targets is None
    ours = _rbkd(student, teacher, None, T=T)
    torch.testing.assert_close(ours, T**2 * theirs, rtol=1e-5, atol=1e-6)


def test_keras_distiller_example(batch):
    student, teacher, labels = batch
    keras_alpha, T = 0.1, 10.0
    theirs = keras_alpha * F.cross_entropy(student, labels) + (1 - keras_alpha) * T**2 * _kl(
        student, teacher, T
    )
    ours = _rbkd(student, teacher, labels, T=T, alpha=1 - keras_alpha, t_squared=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_hinton_soft_cross_entropy_differs_by_a_constant(batch):
    """Hinton's soft term is H(p_t, p_s) = KL + H(p_t): the same gradient, a constant offset."""
    student, teacher, labels = batch
    T, w_soft, w_hard = 20.0, 1.0, 0.1
    student = student.clone().requires_grad_(True)
    pt = F.softmax(teacher / T, dim=1)
    soft_ce = -(pt * F.log_softmax(student / T, dim=1)).sum(1).mean()
    theirs = w_soft * T**2 * soft_ce + w_hard * F.cross_entropy(student, labels)
    (g_theirs,) = torch.autograd.grad(theirs, student)

    s32 = student.detach().float().requires_grad_(True)
    scale = w_soft + w_hard
    ours = scale * ops.kd_loss(s32, teacher.float(), labels, T=T, alpha=w_soft / scale)
    (g_ours,) = torch.autograd.grad(ours, s32)
    torch.testing.assert_close(g_ours.double(), g_theirs, rtol=1e-4, atol=1e-6)
    teacher_entropy = -(pt * pt.log()).sum(1).mean()
    offset = w_soft * T**2 * teacher_entropy
    torch.testing.assert_close(ours.double() + offset, theirs.detach(), rtol=1e-5, atol=1e-4)
