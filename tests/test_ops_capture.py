"""capture_soft_labels (issue 16) against its float64 oracle (tests/oracle_sparse.py): top-k,
logz and entropy per temperature over dtypes and odd shapes; the samples' counts and their
distribution; what it captures makes sparse_kd_loss equal kd_loss at k = V; bad input is a
one-line error."""

from __future__ import annotations

import math

import oracle_sparse
import pytest
import torch
from oracle import assert_close

import rbkd.ops as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [((1, 1), 1), ((7, 10), 3), ((3, 32785), 64), ((2, 3, 17), 17), ((0, 5), 2)]
TEMPS = [[1.0], [0.5, 1.0, 4.0, 9.0], [4.0, 2.0, 1.0, 0.5]]  # the last: the C++ one-exp chain


def _logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("temps", TEMPS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k", SHAPES, ids=str)
def test_capture_matches_oracle(shape, k, dtype, temps):
    x = _logits(shape, dtype, seed=sum(shape))
    got = ops.capture_soft_labels(x, k, temps)
    exp = oracle_sparse.capture(x, k, temps)
    lead = shape[:-1]
    assert got.topk_ids.dtype == torch.int32 and got.topk_ids.shape == (*lead, k)
    assert got.topk_logits.dtype == dtype and got.topk_logits.shape == (*lead, k)
    assert got.logz.dtype == got.entropy.dtype == torch.float32
    assert got.logz.shape == got.entropy.shape == (*lead, len(temps))
    assert got.sample_ids is None and got.sample_counts is None
    # Ties (bfloat16 has many) may order ids differently: the values must be the oracle's, the ids
    # distinct and pointing at them.
    assert torch.equal(got.topk_logits.double(), exp["topk_logits"])
    assert torch.equal(x.gather(-1, got.topk_ids.long()), got.topk_logits)
    if x.numel():
        ordered = got.topk_ids.sort(-1).values
        assert bool((ordered[..., 1:] != ordered[..., :-1]).all())
    assert_close(got.logz, exp["logz"], "logz", floor=1.0)
    assert_close(got.entropy, exp["entropy"], "entropy", floor=1.0)


def test_kept_probabilities_and_tail_are_exact_at_every_T():
    """exp(topk / T_j - logz_j) and 1 - their sum: the teacher's p_i(T_j) and tail mass."""
    x = _logits((5, 300), torch.bfloat16, seed=4)
    temps = [0.7, 1.0, 3.0]
    cap = ops.capture_soft_labels(x, 16, temps)
    for j, T in enumerate(temps):
        p_full = torch.softmax(x.double() / T, -1)
        p_kept = torch.exp(cap.topk_logits.double() / T - cap.logz[:, j : j + 1].double())
        torch.testing.assert_close(p_kept, p_full.gather(1, cap.topk_ids.long()), rtol=2e-6, atol=0)
        tail = 1 - p_kept.sum(-1)
        torch.testing.assert_close(tail, 1 - p_full.gather(1, cap.topk_ids.long()).sum(-1),
                                   rtol=0, atol=1e-6)  # fmt: skip


def test_capture_then_sparse_kd_loss_at_k_equal_V_is_kd_loss():
    t = _logits((4, 6, 50), torch.float32, seed=5)
    z = _logits((4, 6, 50), torch.float32, seed=6).requires_grad_(True)
    cap = ops.capture_soft_labels(t, 50, [1.0, 2.0])
    for j, T in enumerate((1.0, 2.0)):
        loss = ops.sparse_kd_loss(z, cap.topk_ids, cap.topk_logits, logz=cap.logz[..., j], T=T)
        ref = ops.kd_loss(z, t, T=T)
        assert_close(loss, ref, f"T={T}")


def test_nonfinite_rows_get_nan_and_no_samples():
    x = _logits((4, 9), torch.float32)
    x[0, 2], x[1, 0], x[2] = math.nan, math.inf, -math.inf
    cap = ops.capture_soft_labels(x, 2, [1.0, 2.0], samples=5)
    assert cap.logz[:3].isnan().all() and cap.entropy[:3].isnan().all()
    assert cap.logz[3].isfinite().all()
    assert (cap.sample_ids[:3] == -1).all() and (cap.sample_counts[:3] == 0).all()
    assert int(cap.sample_counts[3].sum()) == 5


def test_masked_ids_have_probability_zero():
    x = _logits((3, 12), torch.float32)
    x[:, 5:] = -math.inf
    cap = ops.capture_soft_labels(x, 3, [1.0, 5.0], samples=50)
    exp = oracle_sparse.capture(x, 3, [1.0, 5.0])
    assert_close(cap.logz, exp["logz"], "logz")
    assert_close(cap.entropy, exp["entropy"], "entropy")
    kept = cap.sample_ids[cap.sample_counts > 0]
    assert bool((kept < 5).all())


@pytest.mark.parametrize("shape,s", [((3, 1), 4), ((5, 7), 1), ((2, 4, 40), 64), ((6, 1000), 7)])
def test_samples_are_distinct_ids_with_counts(shape, s):
    x = _logits(shape, torch.float32, seed=s)
    g = torch.Generator().manual_seed(11)
    cap = ops.capture_soft_labels(x, 1, [1.0], samples=s, generator=g)
    ids, counts = cap.sample_ids, cap.sample_counts
    assert ids.dtype == counts.dtype == torch.int32 and ids.shape == (*shape[:-1], s)
    assert bool((counts.sum(-1) == s).all())
    used = counts > 0
    assert bool(((ids >= 0) & (ids < shape[-1]) == used).all())  # padding is -1 / 0, at the end
    assert bool((used[..., 1:] <= used[..., :-1]).all())
    big = torch.where(used, ids, shape[-1] + torch.arange(s))  # distinct and ascending
    assert bool((big[..., 1:] > big[..., :-1]).all())
    again = ops.capture_soft_labels(
        x, 1, [1.0], samples=s, generator=torch.Generator().manual_seed(11)
    )
    assert torch.equal(again.sample_ids, ids) and torch.equal(again.sample_counts, counts)


@pytest.mark.parametrize("sample_T", [1.0, 3.0])
def test_sample_frequencies_follow_the_tempered_teacher(sample_T):
    """20000 draws from 5 ids: each frequency within 5 standard deviations of p(sample_T)."""
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    s = 20000
    cap = ops.capture_soft_labels(x, 1, [1.0], samples=s, sample_T=sample_T,
                                  generator=torch.Generator().manual_seed(3))  # fmt: skip
    freq = torch.zeros(5, dtype=torch.float64)
    used = cap.sample_counts[0] > 0
    freq[cap.sample_ids[0][used].long()] = cap.sample_counts[0][used].double() / s
    p = torch.softmax(x[0].double() / sample_T, -1)
    sigma = (p * (1 - p) / s).sqrt()
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-12).all()), (freq, p)


BAD = [
    ({"logits": torch.zeros(3, 4, dtype=torch.int64)}, TypeError, "logits"),
    ({"logits": torch.zeros(3, 0)}, ValueError, "logits"),
    ({"k": 0}, ValueError, "k"),
    ({"k": 5}, ValueError, "k"),
    ({"k": 2.0}, ValueError, "k"),
    ({"temperatures": []}, ValueError, "temperatures"),
    ({"temperatures": [1.0, 0.0]}, ValueError, "temperatures"),
    ({"temperatures": [math.inf]}, ValueError, "temperatures"),
    ({"temperatures": torch.ones(2, 2)}, ValueError, "temperatures"),
    ({"temperatures": 2.0}, TypeError, "temperatures"),
    ({"samples": -1}, ValueError, "samples"),
    ({"sample_T": -1.0}, ValueError, "sample_T"),
    ({"generator": 3}, TypeError, "generator"),
]


@pytest.mark.parametrize("change,error,word", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_a_one_line_error(change, error, word):
    args = {"logits": torch.randn(3, 4), "k": 2, "temperatures": [1.0], **change}
    logits, k, temps = args.pop("logits"), args.pop("k"), args.pop("temperatures")
    with pytest.raises(error, match=word) as err:
        ops.capture_soft_labels(logits, k, temps, **args)
    assert "\n" not in str(err.value), str(err.value)


def test_rows_run_in_chunks(monkeypatch):
    x = _logits((9, 100), torch.float32)
    one = ops.capture_soft_labels(
        x, 4, [1.0, 2.0], samples=8, generator=torch.Generator().manual_seed(0)
    )
    monkeypatch.setattr("rbkd.ops.capture.CHUNK_ELEMENTS", 200)
    many = ops.capture_soft_labels(x, 4, [1.0, 2.0])
    for a, b in zip(one[:4], many[:4], strict=True):
        assert torch.equal(a, b)
