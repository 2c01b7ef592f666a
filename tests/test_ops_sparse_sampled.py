"""tail="sampled" of sparse_kd_loss (issue 16): the estimate is unbiased, checked statistically
against the exact dense kd_loss over many seeded draws; padding is ignored; bad input is one line.
The oracle table (every dtype, shape and option) is in test_ops_sparse_kd.py.

What is unbiased (rbkd/ops/sparse_sampled.py): per row, over the draws, the expectation of the
loss and of its gradient w.r.t. the student logits equal kd_loss's ("kl") with the teacher's full
row, at T, whether or not T is the sampling temperature."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from helpers import per_row
from oracle import assert_close
from test_ops_sparse_kd import draw_samples, run_op, sampled_case

import rbkd.ops as ops

# The statistical test's family-wise false-alarm rate: each comparison is held to Z standard
# errors, Z the Bonferroni quantile for FAMILY_ALPHA over all of a test's comparisons.
FAMILY_ALPHA = 1e-6
N, V, S, R = 3, 10, 8, 4000  # rows, vocabulary, draws per row, independent repetitions


def _z_bound(comparisons: int) -> float:
    return NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * comparisons))


def _excess(samples, exact):
    """(|mean - exact| - Z se) per entry, se the standard error of the mean over the R draws
    (dim 0), with a float32 rounding floor of 1e-6 of the largest |exact|; all <= 0 passes."""
    samples, exact = samples.detach().double(), exact.detach().double()
    se = samples.std(0) / math.sqrt(samples.shape[0])
    floor = 1e-6 * max(1.0, float(exact.abs().max()))
    return (samples.mean(0) - exact).abs() - _z_bound(exact.numel()) * se - floor, se


def _dense_kd(z, t, y, **kw):
    """kd_loss per row with the teacher's full row, and the gradient of its sum."""
    zz = z.clone().requires_grad_(True)
    loss = ops.kd_loss(zz, t, y, reduction="none", **kw)
    loss.sum().backward()
    return loss, zz.grad


def _estimates(T, sample_T, labels, *, claimed_sample_T=None, seed=7):
    """(per-row losses [R, N], gradients [R, N, V]) of R independent draws, and kd_loss's exact
    (loss [N], gradient [N, V]) with the teacher's full row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(N, V, generator=g) * 2
    z = torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g) if labels else None
    kw = {"T": T, "alpha": 0.5}
    exact, exact_grad = _dense_kd(z, t, y, **kw)
    teacher = t.expand(R, N, V)
    ids, counts = draw_samples(teacher, S, sample_T, g)
    at = teacher.gather(-1, ids.clamp(min=0).long())
    claimed = sample_T if claimed_sample_T is None else claimed_sample_T
    extra = {} if T == claimed else {"sample_logz": torch.logsumexp(teacher / claimed, -1)}
    loss, grad = run_op(
        "auto", z.expand(R, N, V), ids, at, None if y is None else y.expand(R, N),
        tail="sampled", sample_counts=counts, sample_T=claimed,
        logz=torch.logsumexp(teacher / T, -1), reduction="none", **kw, **extra,
    )  # fmt: skip
    return loss, grad, exact, exact_grad


@pytest.mark.parametrize(
    "T,sample_T,labels",
    [(1.0, 1.0, False), (2.0, 1.0, False), (0.5, 1.0, True), (1.0, 2.0, True)],
    ids=["T=sample_T=1", "T=2 sample_T=1", "T=0.5 sample_T=1 labels", "T=1 sample_T=2 labels"],
)
def test_the_estimate_is_unbiased(T, sample_T, labels):
    """Over R = 4000 seeded draws of S = 8 ids per row, the mean loss and mean gradient are the
    exact dense kd_loss's within Z standard errors of the mean (Z from the sample variance and a
    1e-6 family-wise rate, about 5.8), and that bound is tight enough to matter: at most 5% of
    the largest exact gradient entry."""
    loss, grad, exact, exact_grad = _estimates(T, sample_T, labels)
    for what, est, ref in (("loss", loss, exact), ("grad", grad, exact_grad)):
        excess, se = _excess(est, ref)
        worst = int(excess.argmax())
        assert bool((excess <= 0).all()), (
            f"{what}: mean over {R} draws is off by {float(excess.flatten()[worst]):.3g} beyond "
            f"Z se at entry {worst} (se {float(se.flatten()[worst]):.3g})"
        )
    _, se = _excess(grad, exact_grad)
    assert _z_bound(exact_grad.numel()) * float(se.max()) < 0.05 * float(exact_grad.abs().max())


def test_the_same_statistic_rejects_a_biased_estimate():
    """Its power: draws made at sample_T = 1 but declared as drawn at T = 2 (no importance
    weights) estimate the wrong teacher, and the test above sees it."""
    _, grad, _, exact_grad = _estimates(2.0, 1.0, False, claimed_sample_T=2.0)
    excess, _ = _excess(grad, exact_grad)
    assert bool((excess > 0).any())


def test_at_sample_T_the_weights_are_one():
    """At T = sample_T, sample_logz = logz makes every weight 1: the same loss as without it, and
    each row's KL gradient sums to 0 (sum p_hat = 1 exactly)."""
    z, ids, at, y, kw = sampled_case((9, 30), 12, options={"T": 2.0, "labels": False})
    base, grad = run_op("auto", z, ids, at, None, **kw)
    weighted, grad2 = run_op("auto", z, ids, at, None, sample_logz=kw["logz"], **kw)
    assert_close(weighted, base, "loss")
    assert_close(grad2, grad, "grad", floor=1e-12)
    assert float(grad.sum(-1).abs().max()) < 1e-6


def test_padding_and_order_do_not_matter():
    """Entries in another order, with padding (any logit there, NaN too) between and after
    them: the same loss and gradient."""
    z, ids, at, y, kw = sampled_case((6, 25), 7, options={"T": 2.0, "sample_T": 1.0})
    counts = kw.pop("sample_counts")
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    pad = torch.full((6, 5), -1, dtype=ids.dtype)
    ids2 = torch.cat([ids[:, perm], pad], 1)
    counts2 = torch.cat([counts[:, perm], torch.zeros_like(pad)], 1)
    at2 = torch.cat([at[:, perm], torch.full((6, 5), math.nan)], 1)
    one = run_op("auto", z, ids, at, y, sample_counts=counts, **kw)
    two = run_op("auto", z, ids2, at2, y, sample_counts=counts2, **kw)
    torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-6)


def test_the_gpu_code_path_reads_no_values_on_the_host(monkeypatch):
    from test_ops_gpu_path import NoHostReads

    from rbkd.ops import validation

    monkeypatch.setattr(validation, "host_reads_are_free", lambda device: False)
    for opts in ({}, {"T": per_row(1, 3), "alpha": per_row(0, 1)}, {"labels": False}):
        z, ids, at, y, kw = sampled_case((5, 2, 12), 6, options=opts)
        zz = z.requires_grad_(True)
        with NoHostReads():
            ops.sparse_kd_loss(zz, ids, at, y, **kw).backward()
        assert zz.grad is not None


def test_opcheck_and_compile():
    from rbkd.ops import sparse as sparse_mod
    from rbkd.ops.args import KDOptions

    z, ids, at, y, kw = sampled_case((6, 10), 4, options={"T": 2.0, "sample_T": 1.0})
    args = (z, ids, at, kw["logz"], y, None, 2.0, None, 0.5, 2, 2, True, KDOptions().encode(),
            kw["sample_counts"], kw["sample_logz"], 1.0)  # fmt: skip
    torch.library.opcheck(sparse_mod.sparse_kd_loss_op, args)

    model = torch.nn.Linear(4, 10)
    x = torch.randn(6, 4)

    def step(x):
        return ops.sparse_kd_loss(model(x), ids, at, y, **kw)

    torch.compile(step, fullgraph=True)(x).backward()
    grad_c = model.weight.grad.clone()
    model.zero_grad()
    step(x).backward()
    torch.testing.assert_close(grad_c, model.weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("where", ["drawn", "padding"])
def test_full_checks_and_a_nan_logit(monkeypatch, where):
    """RBKD_CHECKS=full: a NaN teacher logit at a drawn id is an error; at padding it is not
    read at all."""
    monkeypatch.setenv("RBKD_CHECKS", "full")
    z, ids, at, y, kw = sampled_case((4, 12), 6)
    pad = (ids[1] < 0).nonzero()
    if where == "drawn":
        at[1, 0] = math.nan
        with pytest.raises(ValueError, match="not finite") as err:
            ops.sparse_kd_loss(z, ids, at, y, **kw)
        assert "\n" not in str(err.value)
    else:
        assert len(pad), "the case must have padding in row 1"
        at[1, int(pad[0])] = math.nan
        assert torch.isfinite(ops.sparse_kd_loss(z, ids, at, y, **kw))


BAD = [  # (what to change, the error's type, a word it must hold)
    ("counts missing", ValueError, "sample_counts"),
    ("counts float", TypeError, "sample_counts"),
    ("counts shape", ValueError, "sample_counts"),
    ("sample_T missing", ValueError, "sample_T"),
    ("sample_T tensor", TypeError, "sample_T"),
    ("sample_logz missing", ValueError, "sample_logz"),
    ("sample_logz shape", ValueError, "sample_logz"),
    ("logz missing", ValueError, "logz"),
    ("jsd", ValueError, "kl"),
    ("reverse_kl", ValueError, "kl"),
    ("sample_counts with bucket", ValueError, "sampled"),
    ("sample_T with renormalize", ValueError, "sampled"),
    ("padding with a count", ValueError, "padding"),
    ("negative count", ValueError, "count"),
    ("id out of range", ValueError, "entry"),
    ("id twice", ValueError, "twice"),
    ("no draw", ValueError, "no draw"),
    ("logz too small", ValueError, "above 1"),
    ("sample_logz too small", ValueError, "above 1"),
]


def _bad_call(name):
    z, ids, at, y, kw = sampled_case((4, 12), 3, options={"T": 2.0, "sample_T": 1.0})
    args = {"student_logits": z, "topk_ids": ids, "topk_logits": at, "labels": y, **kw}
    c = kw["sample_counts"]
    ids2, c2 = ids.clone(), c.clone()
    if name == "padding with a count":
        ids2[0, -1], c2[0, -1] = -1, 2
    elif name == "negative count":
        c2[0, 0] = -1
    elif name == "id out of range":
        ids2[0, 0] = 12
    elif name == "id twice":
        ids2[0], c2[0] = torch.tensor([3, 3, -1]), torch.tensor([1, 2, 0])
    elif name == "no draw":
        ids2[0], c2[0] = -1, 0
    change = {
        "counts missing": {"sample_counts": None},
        "counts float": {"sample_counts": c.float()},
        "counts shape": {"sample_counts": c[:, :2]},
        "sample_T missing": {"sample_T": None},
        "sample_T tensor": {"sample_T": torch.ones(4)},
        "sample_logz missing": {"sample_logz": None},
        "sample_logz shape": {"sample_logz": kw["sample_logz"][:2]},
        "logz missing": {"logz": None},
        "jsd": {"divergence": "jsd"},
        "reverse_kl": {"divergence": "reverse_kl"},
        "sample_counts with bucket": {"tail": "bucket", "sample_T": None, "sample_logz": None},
        "sample_T with renormalize": {
            "tail": "renormalize",
            "sample_counts": None,
            "sample_logz": None,
        },  # fmt: skip
        "logz too small": {"logz": kw["logz"] - 3.0},
        "sample_logz too small": {"sample_logz": kw["sample_logz"] - 3.0},
    }.get(name, {"topk_ids": ids2, "sample_counts": c2})
    return {**args, **change}


@pytest.mark.parametrize("name,error,word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_one_line_error(name, error, word):
    with pytest.raises(error, match=word) as err:
        ops.sparse_kd_loss(**_bad_call(name))
    assert "\n" not in str(err.value), str(err.value)
