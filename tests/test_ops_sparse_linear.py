"""sparse_kd_loss_from_hidden (issue 16, item 4): the loss and the gradients of hidden, weight and
bias equal sparse_kd_loss's on the full logits (float32, autograd through F.linear) and the float64
oracle's chained through the projection, for every tail, odd row counts, labels, reductions and
leading shapes; no tensor of [N, V] entries is ever made; bad input is one line."""

from __future__ import annotations

import math

import oracle_sparse
import pytest
import torch
import torch.nn.functional as F
from helpers import per_row
from oracle import assert_close
from test_ops_sparse_kd import draw_samples
from torch.utils._python_dispatch import TorchDispatchMode

import rbkd.ops as ops
from rbkd.ops.sparse_linear import default_chunk_rows


def linear_case(lead, size, vocab, k, dtype=torch.float32, *, tail="bucket", options=None, seed=0):
    """(hidden, weight, bias, ids, topk, labels, kwargs): a teacher row per position, its top k
    (or k draws, tail='sampled') and logz; options: sparse_kd_loss's keywords, "labels": False,
    "bias": False."""
    kw = dict(options or {})
    with_labels, with_bias = kw.pop("labels", True), kw.pop("bias", True)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, size, generator=g).to(dtype)
    weight = (torch.randn(vocab, size, generator=g) / math.sqrt(size) * 3).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if with_bias else None
    t = torch.randn(*lead, vocab, generator=g) * 3
    y = torch.randint(0, vocab, lead, generator=g) if with_labels else None
    if y is not None:
        y.view(-1)[1::4] = kw.get("ignore_index", -100)
    for key in ("T", "alpha"):
        if callable(kw.get(key)):
            kw[key] = kw[key](tuple(lead), g)
    T = kw.get("T", 1.0)
    T_col = T.unsqueeze(-1) if isinstance(T, torch.Tensor) else T
    if tail == "sampled":
        ids, counts = draw_samples(t, k, 1.0, g)
        topk = t.gather(-1, ids.clamp(min=0).long()).masked_fill(ids < 0, 0)
        kw.update(sample_counts=counts, sample_T=1.0, sample_logz=torch.logsumexp(t, -1))
    else:
        topk, ids = t.topk(k, -1)
    if tail != "renormalize":
        kw["logz"] = torch.logsumexp(t / T_col, -1)
    return hidden, weight, bias, ids, topk.to(dtype), y, {"tail": tail, **kw}


def run_hidden(hidden, weight, bias, ids, topk, y, upstream=None, **kw):
    """(loss, grad_hidden, grad_weight, grad_bias) of sparse_kd_loss_from_hidden, loss.sum()
    (times `upstream` per row for reduction='none') backpropagated."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None
              for x in (hidden, weight, bias)]  # fmt: skip
    loss = ops.sparse_kd_loss_from_hidden(leaves[0], leaves[1], ids, topk, y, bias=leaves[2], **kw)
    (loss * upstream if upstream is not None else loss).sum().backward()
    return loss, *(None if x is None else x.grad for x in leaves)


def run_full(hidden, weight, bias, ids, topk, y, upstream=None, chunk_rows=None, **kw):
    """The same through sparse_kd_loss on the full logits F.linear(hidden, weight, bias)."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None
              for x in (hidden, weight, bias)]  # fmt: skip
    loss = ops.sparse_kd_loss(F.linear(*leaves), ids, topk, y, **kw)
    (loss * upstream if upstream is not None else loss).sum().backward()
    return loss, *(None if x is None else x.grad for x in leaves)


def run_oracle(hidden, weight, bias, ids, topk, y, upstream=None, chunk_rows=None, **kw):
    """The float64 oracle's loss and its logits gradient, chained through the projection."""
    h, w = hidden.double(), weight.double()
    logits = F.linear(h, w, None if bias is None else bias.double())
    loss, g = oracle_sparse.sparse_kd_loss(logits, ids, topk, y, **kw)
    if upstream is not None:
        g = g * upstream.double().unsqueeze(-1)
    g2 = g.reshape(-1, w.shape[0])
    return loss, g @ w, g2.t() @ h.reshape(-1, w.shape[1]), None if bias is None else g2.sum(0)


OPTIONS = {
    "mean": {},
    "sum, T=2": {"reduction": "sum", "T": 2.0},
    "none": {"reduction": "none", "T": 1.5},
    "no labels, no bias": {"labels": False, "bias": False},
    "per-row T and alpha": {"T": per_row(0.5, 4), "alpha": per_row(0, 1)},
    "ignore_index=-1": {"ignore_index": -1},
}
SHAPES = [((13,), 4), ((1,), 3), ((2, 5), 3), ((9,), 32), ((16,), None)]  # (lead, chunk_rows)


def _case_id(*parts):
    return "-".join(str(p) for p in parts)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "sampled"])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("lead,chunk", SHAPES, ids=[_case_id(*s) for s in SHAPES])
def test_matches_the_full_logits_and_the_oracle(tail, name, lead, chunk):
    options = OPTIONS[name]  # tail="sampled" gets sample_logz: any T works
    case = linear_case(lead, 8, 37, 6, tail=tail, options=options, seed=len(lead) + sum(lead))
    *tensors, kw = case
    upstream = None
    if kw.get("reduction") == "none":
        upstream = torch.rand(lead, generator=torch.Generator().manual_seed(3)) + 0.5
    got = run_hidden(*tensors, upstream, chunk_rows=chunk, **kw)
    full = run_full(*tensors, upstream, **kw)
    exact = run_oracle(*tensors, upstream, **kw)
    for what, a, b, c in zip(("loss", "hidden", "weight", "bias"), got, full, exact, strict=True):
        if c is None:
            assert a is None and b is None, what
            continue
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5, msg=f"{what} vs full logits")
        assert_close(a, c, f"{what} vs float64 oracle", floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_the_oracle(dtype):
    *tensors, kw = linear_case((11,), 16, 40, 5, dtype, options={"T": 2.0})
    got = run_hidden(*tensors, chunk_rows=3, **kw)
    exact = run_oracle(*tensors, **kw)
    for what, a, c in zip(("loss", "hidden", "weight", "bias"), got, exact, strict=True):
        assert a.dtype == (torch.float32 if what == "loss" else dtype), what
        assert_close(a, c, f"{what} {dtype}", dtype, floor=1e-3, loose=2.0)


def test_only_the_weight_learns():
    """A frozen hidden (no requires_grad): weight and bias still get theirs."""
    hidden, weight, bias, ids, topk, y, kw = linear_case((10,), 8, 30, 4)
    w = weight.clone().requires_grad_(True)
    ops.sparse_kd_loss_from_hidden(
        hidden, w, ids, topk, y, bias=bias, chunk_rows=3, **kw
    ).backward()
    _, _, grad_w, _ = run_full(hidden, weight, bias, ids, topk, y, **kw)
    torch.testing.assert_close(w.grad, grad_w, atol=2e-6, rtol=2e-5)


class LargestTensor(TorchDispatchMode):
    """Records the most entries any tensor an op returns holds in memory (its storage: an
    expanded stand-in of the logits' shape holds one)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_full_logits_never_exist(reduction):
    """N = 64 rows of V = 50 in chunks of 4: no tensor of the forward or backward pass holds
    N V = 3200 entries; the largest is the hidden states' or the weight's."""
    hidden, weight, bias, ids, topk, y, kw = linear_case((64,), 8, 50, 4)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    with LargestTensor() as seen:
        loss = ops.sparse_kd_loss_from_hidden(
            h, w, ids, topk, y, bias=bias, chunk_rows=4, reduction=reduction, **kw
        )
        loss.sum().backward()
    assert seen.most <= max(64 * 8, 50 * 8, 4 * 50), seen.most


def test_a_nan_row_is_nan_as_through_the_full_logits():
    hidden, weight, bias, ids, topk, y, kw = linear_case((9,), 8, 30, 4, options={"labels": False})
    topk[4, 1] = math.nan
    got = run_hidden(hidden, weight, bias, ids, topk, None, chunk_rows=2, reduction="none", **kw)
    full = run_full(hidden, weight, bias, ids, topk, None, reduction="none", **kw)
    for a, b in zip(got, full, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
    assert got[0][4].isnan() and not got[0][3].isnan() and got[2].isnan().all()


def test_no_rows():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    loss = ops.sparse_kd_loss_from_hidden(
        hidden, weight, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), logz=torch.zeros(0)
    )
    loss.backward()
    assert loss == 0 and hidden.grad.shape == (0, 8) and bool((weight.grad == 0).all())


def test_a_second_backward_is_a_clear_error():
    hidden, weight, bias, ids, topk, y, kw = linear_case((6,), 8, 30, 4)
    loss = ops.sparse_kd_loss_from_hidden(hidden.requires_grad_(True), weight, ids, topk, y, **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_default_chunk_rows():
    assert default_chunk_rows(8192, 32000, 256) == 256  # the bench's shape: 2^23 logits
    assert default_chunk_rows(8192, 128256, 4096) == 256  # Liger's H100 case: Liger's rule
    assert default_chunk_rows(65536, 128256, 4096) == 2048  # Liger's rule, n H entries
    assert default_chunk_rows(5, 10, 256) == 5 and default_chunk_rows(0, 10, 4) == 1


BAD = [  # (what to change, the error's type, a word it must hold)
    ("weight shape", ValueError, "weight"),
    ("weight dtype", ValueError, "weight"),
    ("bias shape", ValueError, "bias"),
    ("bias not a tensor", TypeError, "bias"),
    ("hidden int", TypeError, "hidden"),
    ("chunk_rows 0", ValueError, "chunk_rows"),
    ("unknown keyword", TypeError, "temperature"),
    ("ids shape", ValueError, "topk_ids"),
    ("id out of range, row 7", ValueError, "topk_ids\\[7, 0\\]"),
    ("logz missing", ValueError, "logz"),
]


def _bad_call(name):
    hidden, weight, bias, ids, topk, y, kw = linear_case((9,), 8, 30, 4)
    args = {"hidden": hidden, "weight": weight, "topk_ids": ids, "topk_logits": topk,
            "labels": y, "bias": bias, "chunk_rows": 2, **kw}  # fmt: skip
    bad_ids = ids.clone()
    bad_ids[7, 0] = 30
    change = {
        "weight shape": {"weight": weight[:, :5]},
        "weight dtype": {"weight": weight.half()},
        "bias shape": {"bias": bias[:3]},
        "bias not a tensor": {"bias": [0.0] * 30},
        "hidden int": {"hidden": hidden.long()},
        "chunk_rows 0": {"chunk_rows": 0},
        "unknown keyword": {"temperature": 2.0},
        "ids shape": {"topk_ids": ids[:3]},
        "id out of range, row 7": {"topk_ids": bad_ids},
        "logz missing": {"logz": None},
    }[name]
    return {**args, **change}


@pytest.mark.parametrize("name,error,word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_one_line_error(name, error, word):
    with pytest.raises(error, match=word) as err:
        ops.sparse_kd_loss_from_hidden(**_bad_call(name))
    assert "\n" not in str(err.value), str(err.value)


def test_full_checks_name_the_chunk_of_a_nan_row(monkeypatch):
    """RBKD_CHECKS=full: a NaN hidden state makes its logits NaN, an error naming its chunk."""
    monkeypatch.setenv("RBKD_CHECKS", "full")
    hidden, weight, bias, ids, topk, y, kw = linear_case((9,), 8, 30, 4)
    hidden[4, 0] = math.nan  # (rows 1 and 5 are ignore_index)
    with pytest.raises(ValueError, match=r"rows \[4, 6\): student_logits row 0") as err:
        ops.sparse_kd_loss_from_hidden(hidden, weight, ids, topk, y, chunk_rows=2, **kw)
    assert "\n" not in str(err.value)
