"""The README's table of loss conventions, checked: each toolkit's formula, written out in float64
from its own definition, equals rbkd's kd_loss with the parameters the table maps it to."""

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_backends

import rbkd.ops as ops

N, C = 37, 11


@pytest.fixture(autouse=True, params=cpu_backends())
def backend(request):
    """Every row holds on every backend that runs here."""
    with ops.use_backend(request.param):
        yield request.param


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


# ---- the divergences (issue 14), each against its peer's formula as the peer's code computes it ---

B, S, V = 3, 5, 13  # a language model's [batch, seq, vocab]


@pytest.fixture
def lm_batch():
    g = torch.Generator().manual_seed(11)
    student = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[1, 3:] = -100  # padding
    return student, teacher, labels


def _grad(fn, student):
    x = student.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def _rbkd_grad(student, teacher, labels, **kw):
    return _grad(lambda x: ops.kd_loss(x, teacher.float(), labels, **kw), student.float())


def trl_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                        reduction="batchmean"):  # fmt: skip
    """TRL's GKDTrainer.generalized_jsd_loss: logits / T, no T**2; beta 0 and 1 special-cased as
    forward and reverse KL; the mixture in log space with logsumexp; -100 labels masked."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t),
                         teacher_log_probs + torch.log(beta_t)]), dim=0)  # fmt: skip
        kl_teacher = F.kl_div(
            mixture_log_probs, teacher_log_probs, reduction="none", log_target=True
        )
        kl_student = F.kl_div(
            mixture_log_probs, student_log_probs, reduction="none", log_target=True
        )
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / jsd.size(0)
    return jsd.sum() if reduction == "sum" else jsd


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_trl_generalized_jsd(lm_batch, beta, T):
    """TRL's batchmean over the unmasked tokens is rbkd's mean with labels (alpha=1: the labels
    only mask; no CE), t_squared=False; without labels TRL divides a [B, S, V] sum by B, i.e.
    rbkd's sum / B (its mean times S)."""
    student, teacher, labels = lm_batch
    kw = {"T": T, "alpha": 1.0, "t_squared": False, "divergence": "jsd", "beta": beta}
    theirs = trl_generalized_jsd(student, teacher, labels, beta=beta, temperature=T)
    torch.testing.assert_close(_rbkd(student, teacher, labels, **kw), theirs, rtol=1e-5, atol=1e-6)
    unlabelled = trl_generalized_jsd(student, teacher, None, beta=beta, temperature=T)
    ours = _rbkd(student, teacher, None, reduction="sum", **kw) / B
    torch.testing.assert_close(ours, unlabelled, rtol=1e-5, atol=1e-6)
    per_token = trl_generalized_jsd(student, teacher, None, beta, T, reduction="none").sum(-1)
    ours = _rbkd(student, teacher, None, reduction="none", **kw)
    torch.testing.assert_close(ours, per_token, rtol=1e-5, atol=1e-6)
    g_theirs = _grad(lambda x: trl_generalized_jsd(x, teacher, labels, beta, T), student)
    g_ours = _rbkd_grad(student, teacher, labels, **kw)
    torch.testing.assert_close(g_ours.double(), g_theirs, rtol=1e-4, atol=1e-6)


def _distillm_mean(x, labels):
    mask = (labels != -100).int()
    return -torch.sum(x.view(-1) * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def distillm_skewed_forward_kl(logits, teacher_logits, labels, lam=0.1):
    """DistiLLM's skewed_forward_kl (distillm/losses.py): -sum p_t log(lam p_t + (1-lam) p_s),
    a cross-entropy (it drops sum p_t log p_t), at T = 1, mean over unmasked tokens."""
    teacher_probs = F.softmax(teacher_logits, dim=-1)
    student_probs = F.softmax(logits, dim=-1)
    mixed_logprobs = torch.log(lam * teacher_probs + (1 - lam) * student_probs)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    return _distillm_mean(torch.sum(prod_probs, dim=-1), labels)


def distillm_skewed_reverse_kl(logits, teacher_logits, labels, lam=0.1):
    """DistiLLM's skewed_reverse_kl: sum p_s log p_s - sum p_s log((1-lam) p_t + lam p_s)."""
    teacher_probs = F.softmax(teacher_logits, dim=-1)
    student_probs = F.softmax(logits, dim=-1)
    mixed_logprobs = torch.log((1 - lam) * teacher_probs + lam * student_probs)
    student_logprobs = F.log_softmax(logits, dim=-1)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    return _distillm_mean(torch.sum(prod_probs, dim=-1), labels)


def distillm_reverse_kl(logits, teacher_logits, labels):
    """DistiLLM's reverse_kl: sum p_s log p_s - sum p_s log p_t (MiniLLM's divergence)."""
    student_probs = F.softmax(logits, dim=-1)
    student_logprobs = F.log_softmax(logits, dim=-1)
    teacher_logprobs = F.log_softmax(teacher_logits, dim=-1)
    inf_mask = torch.isinf(teacher_logits) | torch.isinf(logits)
    prod_probs = torch.masked_fill(student_probs * teacher_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    return _distillm_mean(torch.sum(prod_probs, dim=-1), labels)


def _teacher_entropy(teacher, labels, T=1.0):
    """Mean over unmasked tokens of H(p_t): what a soft cross-entropy adds to the KL."""
    logp = F.log_softmax(teacher / T, dim=-1)
    return -_distillm_mean(-(logp.exp() * logp).sum(-1), labels)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5])
def test_distillm_skew_kl_and_skew_reverse_kl(lm_batch, lam):
    """DistiLLM's lambda is rbkd's skew, at T = 1 (they use none), alpha=1 (their labels only
    mask). Their skew KL is a cross-entropy: it exceeds rbkd's KL by the teacher's entropy, a
    constant (the same gradient); their skew reverse KL is rbkd's exactly."""
    student, teacher, labels = lm_batch
    kw = {"T": 1.0, "alpha": 1.0, "skew": lam}
    theirs = distillm_skewed_forward_kl(student, teacher, labels, lam)
    ours = _rbkd(student, teacher, labels, divergence="skew_kl", **kw)
    torch.testing.assert_close(
        ours + _teacher_entropy(teacher, labels), theirs, rtol=1e-5, atol=1e-5
    )
    g_theirs = _grad(lambda x: distillm_skewed_forward_kl(x, teacher, labels, lam), student)
    g_ours = _rbkd_grad(student, teacher, labels, divergence="skew_kl", **kw)
    torch.testing.assert_close(g_ours.double(), g_theirs, rtol=1e-4, atol=1e-6)
    theirs = distillm_skewed_reverse_kl(student, teacher, labels, lam)
    ours = _rbkd(student, teacher, labels, divergence="skew_reverse_kl", **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    g_theirs = _grad(lambda x: distillm_skewed_reverse_kl(x, teacher, labels, lam), student)
    g_ours = _rbkd_grad(student, teacher, labels, divergence="skew_reverse_kl", **kw)
    torch.testing.assert_close(g_ours.double(), g_theirs, rtol=1e-4, atol=1e-6)


def test_distillm_reverse_kl(lm_batch):
    student, teacher, labels = lm_batch
    theirs = distillm_reverse_kl(student, teacher, labels)
    ours = _rbkd(student, teacher, labels, T=1.0, alpha=1.0, divergence="reverse_kl")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def torchtune_forward_kl(student_logits, teacher_logits, labels, ignore_index=-100):
    """torchtune's ForwardKLLoss (ported from DistiLLM): -sum p_t log p_s, a soft cross-entropy,
    no temperature, mean over the unmasked tokens."""
    teacher_prob = F.softmax(teacher_logits, dim=-1)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 0.9, 1.0])
def test_torchtune_kd_recipe(lm_batch, kd_ratio):
    """torchtune's KD recipe: (1 - kd_ratio) * CE + kd_ratio * ForwardKLLoss. kd_ratio is rbkd's
    alpha at T = 1 (t_squared then changes nothing); their KL term is a soft cross-entropy, so
    theirs = rbkd + kd_ratio * H(p_t), the same gradient."""
    student, teacher, labels = lm_batch

    def theirs_fn(x):
        ce = F.cross_entropy(x.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
        return (1 - kd_ratio) * ce + kd_ratio * torchtune_forward_kl(x, teacher, labels)

    kw = {"T": 1.0, "alpha": kd_ratio}
    ours = _rbkd(student, teacher, labels, **kw) + kd_ratio * _teacher_entropy(teacher, labels)
    torch.testing.assert_close(ours, theirs_fn(student), rtol=1e-5, atol=1e-5)
    g_ours = _rbkd_grad(student, teacher, labels, **kw)
    torch.testing.assert_close(g_ours.double(), _grad(theirs_fn, student), rtol=1e-4, atol=1e-6)


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (mdistiller/distillers/DKD.py): TCKD on [p_target, p_rest] and NCKD
    on softmax(logits / T - 1000 * gt_mask), both summed KLs times T**2 over the batch size."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t):
        t1, t2 = (t * gt_mask).sum(dim=1, keepdims=True), (t * other_mask).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
    n = target.shape[0]
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / n
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
    return alpha * tckd + beta * nckd * temperature**2 / n


@pytest.mark.parametrize(("ce_weight", "kd_weight", "a", "b", "T"),
                         [(1.0, 1.0, 1.0, 8.0, 4.0), (1.0, 0.25, 1.0, 8.0, 4.0),
                          (0.5, 1.0, 2.0, 1.0, 1.0)])  # fmt: skip
def test_mdistiller_dkd(batch, ce_weight, kd_weight, a, b, T):
    """mdistiller's DKD distiller: CE_WEIGHT * CE + w * dkd_loss (w = min(epoch / warmup, 1),
    the kd_weight here). rbkd: dkd_alpha = ALPHA, dkd_beta = BETA, T**2 as theirs (t_squared),
    alpha = w / (CE_WEIGHT + w), the loss times CE_WEIGHT + w."""
    student, teacher, labels = batch

    def theirs_fn(x):
        dkd = mdistiller_dkd(x, teacher, labels, a, b, T)
        return ce_weight * F.cross_entropy(x, labels) + kd_weight * dkd

    scale = ce_weight + kd_weight
    kw = {"T": T, "alpha": kd_weight / scale, "divergence": "dkd", "dkd_alpha": a, "dkd_beta": b}
    ours = scale * _rbkd(student, teacher, labels, **kw)
    torch.testing.assert_close(ours, theirs_fn(student), rtol=1e-5, atol=1e-6)
    g_ours = scale * _rbkd_grad(student, teacher, labels, **kw)
    torch.testing.assert_close(g_ours.double(), _grad(theirs_fn, student), rtol=1e-4, atol=1e-6)


def distillkit_dense_tvd(logits, target_logits, mask, temperature):
    """DistillKit's TVDLoss on dense teacher logits (distillkit/lossfuncs/tvd.py, dense_tvd):
    0.5 * sum |p_t - p_s| at T per token, masked sum, times T**2 over the unmasked count."""
    student_probs = torch.softmax(logits / temperature, dim=-1)
    teacher_probs = torch.softmax(target_logits / temperature, dim=-1)
    tvd = 0.5 * torch.sum(torch.abs(teacher_probs - student_probs), dim=-1) * mask
    return torch.sum(tvd) * temperature**2 / mask.float().sum()


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_distillkit_tvd(lm_batch, T):
    """DistillKit's TVD is plain 0.5 * sum |p_t - p_s|, times T**2: rbkd's tvd with t_squared,
    alpha=1, the mask as ignore_index labels."""
    student, teacher, labels = lm_batch
    mask = labels != -100
    kw = {"T": T, "alpha": 1.0, "divergence": "tvd", "t_squared": True}
    theirs = distillkit_dense_tvd(student, teacher, mask, T)
    torch.testing.assert_close(_rbkd(student, teacher, labels, **kw), theirs, rtol=1e-5, atol=1e-6)
    g_theirs = _grad(lambda x: distillkit_dense_tvd(x, teacher, mask, T), student)
    g_ours = _rbkd_grad(student, teacher, labels, **kw)
    torch.testing.assert_close(g_ours.double(), g_theirs, rtol=1e-4, atol=1e-6)


def logit_standardization_kd(logits_student_in, logits_teacher_in, temperature):
    """Sun et al. 2024 (logit-standardization-KD, distillers/KD.py): z-score both rows
    ((x - mean) / (1e-7 + std), torch's unbiased std), then KL at T times T**2, mean over rows."""

    def normalize(logit):
        mean, stdv = logit.mean(dim=-1, keepdims=True), logit.std(dim=-1, keepdims=True)
        return (logit - mean) / (1e-7 + stdv)

    log_pred_student = F.log_softmax(normalize(logits_student_in) / temperature, dim=1)
    pred_teacher = F.softmax(normalize(logits_teacher_in) / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature**2


def test_logit_standardization(batch):
    """Their KD distiller: CE_WEIGHT * CE(raw logits) + KD_WEIGHT * kd_loss(standardised):
    rbkd's standardize=True (the CE keeps the raw logits), alpha = KD_WEIGHT / (sum), times sum."""
    student, teacher, labels = batch
    ce_weight, kd_weight, T = 0.1, 9.0, 2.0

    def theirs_fn(x):
        kd = logit_standardization_kd(x, teacher, T)
        return ce_weight * F.cross_entropy(x, labels) + kd_weight * kd

    scale = ce_weight + kd_weight
    kw = {"T": T, "alpha": kd_weight / scale, "standardize": True}
    torch.testing.assert_close(scale * _rbkd(student, teacher, labels, **kw), theirs_fn(student),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    g_ours = scale * _rbkd_grad(student, teacher, labels, **kw)
    torch.testing.assert_close(g_ours.double(), _grad(theirs_fn, student), rtol=1e-4, atol=1e-5)
