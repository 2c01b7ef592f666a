"""sparse_kd_loss (issue 16) against its float64 oracle (tests/oracle_sparse.py), loss and gradient:
one table row per tail x divergence x dtype x shape, and per tail x divergence x option; with
k = V and the exact logz, the bucket loss is kd_loss on every CPU backend; bad input is a one-line
error; the registered op passes opcheck and traces under torch.compile."""

from __future__ import annotations

import math

import oracle_sparse
import pytest
import torch
from helpers import cpu_backends, per_row
from oracle import assert_close

import rbkd.ops as ops
from rbkd.ops import sparse as sparse_mod
from rbkd.ops.args import KDOptions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [((1, 1), 1), ((7, 10), 3), ((7, 10), 10), ((3, 32785), 64), ((2, 3, 17), 5)]
VARIANTS = {
    "kl": {},
    "reverse_kl": {"divergence": "reverse_kl"},
    "jsd": {"divergence": "jsd"},
    "jsd beta=0.1": {"divergence": "jsd", "beta": 0.1},
    "jsd beta=0": {"divergence": "jsd", "beta": 0.0},
    "jsd beta=1": {"divergence": "jsd", "beta": 1.0},
    "skew_kl": {"divergence": "skew_kl"},
    "skew_kl 0.9": {"divergence": "skew_kl", "skew": 0.9},
    "skew_reverse_kl": {"divergence": "skew_reverse_kl"},
    "skew_reverse_kl 0": {"divergence": "skew_reverse_kl", "skew": 0.0},
    "tvd": {"divergence": "tvd"},
}
REVERSE = ("reverse_kl", "jsd beta=1", "skew_reverse_kl 0")  # infinite with renormalize, k < V


def sparse_case(shape, k, dtype=torch.float32, options=None, *, seed=0):
    """(student, topk_ids, topk_logits, labels, kwargs): a teacher's full row drawn in `dtype`,
    its top k kept, logz from the same values at the case's T (per row or not). options:
    sparse_kd_loss's keyword arguments, and "labels": False, "scale" (3), "prep" (a function of
    the case's tuple, applied last)."""
    kw = dict(options or {})
    prep, scale, with_labels = kw.pop("prep", None), kw.pop("scale", 3.0), kw.pop("labels", True)
    g = torch.Generator().manual_seed(seed)
    *lead, v = shape
    z = (torch.randn(shape, generator=g) * scale).to(dtype)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    y = torch.randint(0, v, lead, generator=g) if with_labels else None
    for key in ("T", "alpha"):
        if callable(kw.get(key)):
            kw[key] = kw[key](lead, g)
    T = kw.get("T", 1.0)
    T_col = T.unsqueeze(-1) if isinstance(T, torch.Tensor) else T
    vals, ids = t.float().topk(k, -1)
    kw.setdefault("logz", torch.logsumexp(t.float() / T_col, -1))
    case = (z, ids, vals.to(dtype), y, kw)
    return prep(*case) if prep is not None else case


def run_op(backend, z, ids, topk, y, **kw):
    zz = z.detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.sparse_kd_loss(zz, ids, topk, y, **kw)
    if zz.numel():
        loss.sum().backward()
    return loss, zz.grad if zz.grad is not None else torch.zeros_like(zz)


def check_sparse(backend, z, ids, topk, y, **kw):
    loss, grad = run_op(backend, z, ids, topk, y, **kw)
    exp_loss, exp_grad = oracle_sparse.sparse_kd_loss(z, ids, topk, y, **kw)
    what = f"{backend} {kw.get('tail', 'bucket')} {z.dtype} {tuple(z.shape)} k={ids.shape[-1]}"
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype, what
    T = kw.get("T", 1.0)
    t_max = float(T.max()) if isinstance(T, torch.Tensor) else T
    assert_close(loss, exp_loss, f"{what} loss", loose=max(1.0, t_max**2 / 2000))
    tiny = max(1e-12, torch.finfo(z.dtype).tiny)
    assert_close(grad, exp_grad, f"{what} grad", z.dtype, floor=tiny)


def ignore_every_third(z, ids, topk, y, kw):
    y.view(-1)[::3] = -1
    return z, ids, topk, y, kw


def int32_everything(z, ids, topk, y, kw):
    return z, ids.int(), topk, None if y is None else y.int(), kw


def logz_column(z, ids, topk, y, kw):
    return z, ids, topk, y, {**kw, "logz": kw["logz"].unsqueeze(-1)}


def poisoned(z, ids, topk, y, kw):
    """Rows 0..3 NaN rows (NaN student, NaN kept logit, +inf kept logit, NaN logz), row 4 the same
    poison but ignored: 0."""
    z[0, 1], topk[1, 0], topk[2, 1] = math.nan, math.nan, math.inf
    kw["logz"][3] = math.nan
    z[4, 0] = math.nan
    y[4] = -100
    return z, ids, topk, y, kw


def masked_student(z, ids, topk, y, kw):
    """Every student logit outside ids 0..9 at -inf but one per row: a tiny, finite tail."""
    z[:, 10:] = -math.inf
    z[:, -1] = z[:, :10].float().min(-1).values.to(z.dtype) - 30
    return z, ids, topk, y % 10, kw


OPTIONS = {
    "labels": {},
    "no labels": {"labels": False},
    "per-row T and alpha": {"T": per_row(0.5, 8), "alpha": per_row(0, 1)},
    "T=4, alpha=0.5": {"T": 4.0, "alpha": 0.5},
    "alpha=0": {"alpha": 0.0},
    "alpha=1": {"alpha": 1.0},
    "ignore_index=-1": {"ignore_index": -1, "prep": ignore_every_third},
    "int32 ids and labels": {"prep": int32_everything},
    "logz [..., 1]": {"prep": logz_column},
    "t_squared=False, sum": {"t_squared": False, "reduction": "sum"},
    "none": {"reduction": "none", "T": 2.0},
    "NaN rows": {"reduction": "none", "prep": poisoned},
    "tiny student tail": {"reduction": "none", "prep": masked_student},
    "large logits": {"scale": 12.0, "T": 1.0},
}


def _id(*parts):
    return "-".join(str(p).replace("torch.", "") for p in parts)


def _defined(tail, variant, k, v):
    return not (tail == "renormalize" and variant in REVERSE and k < v)


TABLE = [
    pytest.param(tail, var, shape, k, d, {}, id=_id(tail, var, shape, k, d))
    for tail in ("bucket", "renormalize")
    for var in VARIANTS
    for shape, k in SHAPES
    for d in DTYPES
    if _defined(tail, var, k, shape[-1]) and not (shape[-1] > 1000 and d != torch.float32)
] + [
    pytest.param(tail, var, shape, k, d, o, id=_id(tail, var, name, d))
    for tail in ("bucket", "renormalize")
    for var in VARIANTS
    for name, o in OPTIONS.items()
    for shape, k, d in (((13, 37), 6, torch.float32), ((13, 37), 6, torch.bfloat16))
    if _defined(tail, var, k, shape[-1])
]


@pytest.mark.parametrize("tail,variant,shape,k,dtype,options", TABLE)
def test_sparse_kd_loss_matches_oracle(tail, variant, shape, k, dtype, options):
    z, ids, topk, y, kw = sparse_case(
        shape, k, dtype, {**VARIANTS[variant], **options}, seed=sum(shape) + k
    )
    check_sparse("auto", z, ids, topk, y, tail=tail, **kw)


def draw_samples(t, s, sample_T, g):
    """(ids, counts) [..., s] int32 in capture_soft_labels's format, drawn here (the plain way:
    multinomial, then a bincount per row): s draws from softmax(t / sample_T), the distinct ids
    ascending with their counts, padded with -1 and 0."""
    v = t.shape[-1]
    rows = torch.softmax(t.float().reshape(-1, v) / sample_T, -1)
    draws = torch.multinomial(rows, s, replacement=True, generator=g)
    ids = torch.full(draws.shape, -1, dtype=torch.int32)
    counts = torch.zeros(draws.shape, dtype=torch.int32)
    for r in range(draws.shape[0]):
        hist = torch.bincount(draws[r], minlength=v)
        seen = hist.nonzero()[:, 0]
        ids[r, : len(seen)], counts[r, : len(seen)] = seen.int(), hist[seen].int()
    return ids.reshape(*t.shape[:-1], s), counts.reshape(*t.shape[:-1], s)


def sampled_case(shape, s, dtype=torch.float32, options=None, *, seed=0):
    """(student, sample_ids, sample_logits, labels, kwargs) of tail='sampled': a teacher's full
    row drawn in `dtype`, s draws from it at sample_T (capture_soft_labels, seeded), its logits
    at the drawn ids (padding 0), logz at T and, when T is not sample_T, sample_logz. options as
    sparse_case's, with "sample_T" (default: T)."""
    kw = dict(options or {})
    prep, scale, with_labels = kw.pop("prep", None), kw.pop("scale", 3.0), kw.pop("labels", True)
    g = torch.Generator().manual_seed(seed)
    *lead, v = shape
    z = (torch.randn(shape, generator=g) * scale).to(dtype)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    y = torch.randint(0, v, lead, generator=g) if with_labels else None
    for key in ("T", "alpha"):
        if callable(kw.get(key)):
            kw[key] = kw[key](lead, g)
    T = kw.get("T", 1.0)
    sample_T = kw.setdefault("sample_T", T if not isinstance(T, torch.Tensor) else 1.0)
    ids, counts = draw_samples(t, s, sample_T, g)
    at = t.gather(-1, ids.clamp(min=0).long()).masked_fill(ids < 0, 0)
    T_col = T.unsqueeze(-1) if isinstance(T, torch.Tensor) else T
    kw["logz"] = torch.logsumexp(t.float() / T_col, -1)
    if isinstance(T, torch.Tensor) or T != sample_T:
        kw["sample_logz"] = torch.logsumexp(t.float() / sample_T, -1)
    kw.update(tail="sampled", sample_counts=counts)
    case = (z, ids, at, y, kw)
    return prep(*case) if prep is not None else case


def poisoned_sampled(z, ids, at, y, kw):
    """Row 0 a NaN student, row 1 a NaN logit at a drawn id, row 2 a NaN logz, row 3 a NaN logit
    at padding (harmless: finite), row 4 the poison of row 0 but ignored (0)."""
    z[0, 1] = math.nan
    at[1, 0] = math.nan
    kw["logz"][2] = math.nan
    ids[3, -1], kw["sample_counts"][3, -1], at[3, -1] = -1, 0, math.nan
    z[4, 0], y[4] = math.nan, -100
    return z, ids, at, y, kw


def int32_counts(z, ids, at, y, kw):
    return z, ids, at, y, {**kw, "sample_counts": kw["sample_counts"].long()}


SAMPLED_SHAPES = [((1, 1), 1), ((7, 10), 3), ((7, 10), 40), ((3, 32785), 64), ((2, 3, 17), 5)]
SAMPLED_OPTIONS = {
    "T = sample_T": {},
    "T=2 sample_T=1": {"T": 2.0, "sample_T": 1.0},
    "T=0.5 sample_T=1": {"T": 0.5, "sample_T": 1.0},
    "T=1 sample_T=4": {"T": 1.0, "sample_T": 4.0},
    "per-row T and alpha": {"T": per_row(0.5, 8), "alpha": per_row(0, 1)},
    "no labels": {"labels": False},
    "alpha=0": {"alpha": 0.0},
    "ignore_index=-1": {"ignore_index": -1, "prep": ignore_every_third},
    "int32 ids and labels, int64 counts": {"prep": lambda *c: int32_counts(*int32_everything(*c))},
    "logz [..., 1]": {"prep": logz_column},
    "t_squared=False, sum": {"t_squared": False, "reduction": "sum", "T": 3.0},
    "none": {"reduction": "none", "T": 2.0, "sample_T": 1.0},
    "NaN rows": {"reduction": "none", "prep": poisoned_sampled},
    "large logits": {"scale": 12.0},
}
SAMPLED_TABLE = [
    pytest.param(shape, s, d, {}, id=_id("sampled", shape, s, d))
    for shape, s in SAMPLED_SHAPES
    for d in DTYPES
    if not (shape[-1] > 1000 and d != torch.float32)
] + [
    pytest.param((13, 37), 9, d, o, id=_id("sampled", name, d))
    for name, o in SAMPLED_OPTIONS.items()
    for d in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("shape,s,dtype,options", SAMPLED_TABLE)
def test_sampled_matches_oracle(shape, s, dtype, options):
    """tail='sampled' (forward KL only) against the float64 oracle's dense p_hat, for the very
    draws the case made: loss and gradient."""
    z, ids, at, y, kw = sampled_case(shape, s, dtype, options, seed=sum(shape) + s)
    check_sparse("auto", z, ids, at, y, **kw)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", [(1, 1), (9, 10), (4, 37), (2, 3, 1000)], ids=str)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_all_ids_bucket_is_kd_loss(backend, variant, shape, T):
    """k = V and the exact logz: no tail, and the bucket loss is kd_loss's to float32 precision,
    loss and gradient, with and without labels (kd_loss on `backend`, and sparse_kd_loss there
    too: it runs its torch twin on every backend)."""
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    z, t = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    ids = t.argsort(-1, descending=True)
    logz = torch.logsumexp(t / T, -1)
    for labels in (None, y):
        kw = {"T": T, **VARIANTS[variant]}
        loss, grad = run_op(backend, z, ids, t.gather(-1, ids), labels, logz=logz, **kw)
        with ops.use_backend(backend):
            zz = z.clone().requires_grad_(True)
            ref = ops.kd_loss(zz, t, labels, **kw)
            ref.backward()
        assert_close(loss, ref, f"{backend} {variant} loss")
        assert_close(grad, zz.grad, f"{backend} {variant} grad", floor=1e-12)
        for tail in ("renormalize",):  # renormalised over all V ids: the same distribution
            loss2, _ = run_op(backend, z, ids, t.gather(-1, ids), labels, tail=tail, **kw)
            assert_close(loss2, ref, f"{backend} {variant} {tail} loss")


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in REVERSE])
def test_renormalize_is_kd_loss_against_the_zero_padded_teacher(variant):
    """tail='renormalize' is kd_loss with a probs teacher: softmax over the k ids, 0 elsewhere."""
    z, ids, topk, y, kw = sparse_case((11, 40), 7, options={"T": 2.0, **VARIANTS[variant]})
    kw.pop("logz")
    q = torch.zeros(11, 40).scatter(1, ids, torch.softmax(topk / 2.0, -1))
    loss, grad = run_op("auto", z, ids, topk, y, tail="renormalize", **kw)
    zz = z.clone().requires_grad_(True)
    ref = ops.kd_loss(zz, q, y, teacher_kind="probs", **kw)
    ref.backward()
    assert_close(loss, ref, "loss")
    assert_close(grad, zz.grad, "grad", floor=1e-12)


def test_a_teacher_tail_below_float32_resolution_gives_no_nan():
    """A teacher holding almost all its mass on the k ids: its tail rounds to 0, and is taken
    as 2**-24; every divergence stays finite, loss and gradient."""
    z, ids, topk, y, kw = sparse_case((6, 50), 4, options={"labels": False})
    topk = topk + 40.0  # the kept ids dwarf the others ...
    t_rest = torch.full((6, 50), -1e4).scatter(1, ids, topk)
    kw["logz"] = torch.logsumexp(t_rest, -1)  # ... and logsumexp(topk) - logz rounds to 0
    for variant, opts in VARIANTS.items():
        loss, grad = run_op("auto", z, ids, topk, None, logz=kw["logz"], **opts)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), variant
        exp_loss, exp_grad = oracle_sparse.sparse_kd_loss(
            z, ids, topk, None, logz=kw["logz"], **opts
        )
        assert_close(loss, exp_loss, f"{variant} loss")
        assert_close(grad, exp_grad, f"{variant} grad", floor=1e-12)


def test_the_gpu_code_path_reads_no_values_on_the_host(monkeypatch):
    from test_ops_gpu_path import NoHostReads

    from rbkd.ops import validation

    monkeypatch.setattr(validation, "host_reads_are_free", lambda device: False)
    for tail in ("bucket", "renormalize"):
        for opts in ({}, {"T": per_row(1, 3), "alpha": per_row(0, 1)}, {"labels": False}):
            z, ids, topk, y, kw = sparse_case((5, 2, 12), 4, options=opts)
            zz = z.requires_grad_(True)
            with NoHostReads():
                ops.sparse_kd_loss(zz, ids, topk, y, tail=tail, **kw).backward()
            assert zz.grad is not None


BAD = [  # (what to change, the error's type, a word it must hold)
    ("ids out of range", ValueError, "outside"),
    ("negative id", ValueError, "outside"),
    ("repeated id", ValueError, "twice"),
    ("logz missing", ValueError, "logz"),
    ("logz shape", ValueError, "logz"),
    ("logz int", TypeError, "logz"),
    ("logz too small", ValueError, "kept mass"),
    ("ids float", TypeError, "topk_ids"),
    ("ids shape", ValueError, "topk_ids"),
    ("k > V", ValueError, "k"),
    ("topk shape", ValueError, "topk_logits"),
    ("labels shape", ValueError, "labels"),
    ("label out of range", ValueError, "labels"),
    ("dkd", ValueError, "dkd"),
    ("standardize", ValueError, "standardize"),
    ("reverse_kl renormalize", ValueError, "renormalize"),
    ("tail", ValueError, "tail"),
    ("T", ValueError, "T"),
    ("alpha", ValueError, "alpha"),
    ("T rows", ValueError, "T"),
    ("beta", ValueError, "beta"),
]


def _bad_call(name):
    z, ids, topk, y, kw = sparse_case((4, 12), 3)
    args = {"student_logits": z, "topk_ids": ids, "topk_logits": topk, "labels": y, **kw}
    change = {
        "ids out of range": {"topk_ids": ids.clone().fill_(3).scatter(1, ids[:, :1] * 0, 12)},
        "negative id": {"topk_ids": torch.tensor([[0, 1, -2]] * 4)},
        "repeated id": {"topk_ids": torch.tensor([[0, 1, 1]] * 4)},
        "logz missing": {"logz": None},
        "logz shape": {"logz": kw["logz"][:2]},
        "logz int": {"logz": kw["logz"].long()},
        "logz too small": {"logz": kw["logz"] - 1.0},
        "ids float": {"topk_ids": ids.float()},
        "ids shape": {"topk_ids": ids[:2]},
        "k > V": {
            "topk_ids": torch.zeros(4, 13, dtype=torch.long),
            "topk_logits": torch.zeros(4, 13),
        },  # fmt: skip
        "topk shape": {"topk_logits": topk[:, :2]},
        "labels shape": {"labels": y[:2]},
        "label out of range": {"labels": y.clone().fill_(12)},
        "dkd": {"divergence": "dkd"},
        "standardize": {"standardize": True},
        "reverse_kl renormalize": {"divergence": "reverse_kl", "tail": "renormalize"},
        "tail": {"tail": "zero"},
        "T": {"T": 0.0},
        "alpha": {"alpha": 1.5},
        "T rows": {"T": torch.tensor([1.0, 2.0, -1.0, 1.0])},
        "beta": {"divergence": "jsd", "beta": 2.0},
    }[name]
    return {**args, **change}


@pytest.mark.parametrize("name,error,word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_one_line_error(name, error, word):
    args = _bad_call(name)
    with pytest.raises(error, match=word) as err:
        ops.sparse_kd_loss(**args)
    assert "\n" not in str(err.value), str(err.value)


def test_opcheck_and_compile():
    z, ids, topk, y, kw = sparse_case((6, 10), 3)
    for tail, logz in ((0, kw["logz"]), (1, None)):
        for labels, T_rows in ((y, None), (None, None if tail == 0 else torch.rand(6) + 0.5)):
            args = (z, ids, topk, logz, labels, T_rows, 1.0, None, 0.5, 2, tail, True,
                    KDOptions(divergence=2).encode())  # fmt: skip
            torch.library.opcheck(sparse_mod.sparse_kd_loss_op, args)

    model = torch.nn.Linear(4, 10)
    x = torch.randn(6, 4)

    def step(x):
        return ops.sparse_kd_loss(model(x), ids, topk, y, logz=kw["logz"], divergence="jsd")

    loss_c = torch.compile(step, fullgraph=True)(x)
    loss_c.backward()
    grad_c = model.weight.grad.clone()
    model.zero_grad()
    step(x).backward()
    torch.testing.assert_close(grad_c, model.weight.grad, atol=1e-6, rtol=1e-5)


def test_memory_stays_in_chunks(monkeypatch):
    """Rows run in chunks (here 2 rows at a time): the result is the same as one chunk."""
    z, ids, topk, y, kw = sparse_case((9, 100), 5, options={"T": per_row(1, 3)})
    one = run_op("auto", z, ids, topk, y, **kw)
    monkeypatch.setattr("rbkd.ops.sparse_twin.CHUNK_ELEMENTS", 200)
    many = run_op("auto", z, ids, topk, y, **kw)
    torch.testing.assert_close(one, many, atol=0, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows(reduction):
    z = torch.zeros(0, 5, requires_grad=True)
    ids, topk, logz = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0)
    loss = ops.sparse_kd_loss(z, ids, topk, torch.zeros(0, dtype=torch.long), logz=logz,
                              reduction=reduction)  # fmt: skip
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert z.grad.shape == (0, 5)


@pytest.mark.parametrize("where", ["student_logits", "topk_logits", "logz"])
def test_full_checks_make_nan_rows_errors(monkeypatch, where):
    """RBKD_CHECKS=full: a counted row that would be NaN is an error; an ignored one is not."""
    monkeypatch.setenv("RBKD_CHECKS", "full")
    z, ids, topk, y, kw = sparse_case((5, 12), 3)
    {"student_logits": z, "topk_logits": topk, "logz": kw["logz"]}[where][1] = math.nan
    with pytest.raises(ValueError, match=where) as err:
        ops.sparse_kd_loss(z, ids, topk, y, **kw)
    assert "\n" not in str(err.value)
    y[1] = -100
    assert torch.isfinite(ops.sparse_kd_loss(z, ids, topk, y, **kw))
