"""The C++ CPU kernels of sparse_kd_loss and capture_soft_labels (csrc/cpu/sparse_kd_cpu.cpp,
capture_cpu.cpp) against the float64 oracle (tests/oracle_sparse.py): the block edges of their
row loops, the tail cases the kernel treats on its own (a tail that underflows, an empty one),
the three CE paths (T = 1, an integer T, any other T), the non-finite rule inside the kernel (what
the host checks stop before it), the entry points' own argument checks, and capture's top-k order
(equal logits: the lower id first), its online max across blocks, and its samples (the twin's
sampler, so the same draws). The op-level table of test_ops_sparse_kd.py runs on the automatic
backend, which is this kernel for CPU tensors; here it runs once more on the torch twin, so the
twin keeps its own check against the oracle."""

from __future__ import annotations

import math

import oracle_sparse
import pytest
import test_ops_sparse_kd as sparse_table
import torch
from oracle import assert_close

import rbkd.ops as ops
from rbkd.ops import capture as capture_twin
from rbkd.ops import sparse_twin
from rbkd.ops.args import DIVERGENCES, KDOptions

pytestmark = pytest.mark.skipif(
    "cpu" not in ops.available_backends(), reason="rbkd._C (the C++ CPU kernels) is not built"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_sparse(backend, z, ids, topk, y, **kw):
    """test_ops_sparse_kd's check (the oracle's tolerances), or, where the float32 gradient is
    ill-conditioned (tvd's kd-only gradient p_j (1/2 - H) with H near 1/2 cancels), an error at
    most twice the torch twin's own against the same float64 oracle."""
    try:
        sparse_table.check_sparse(backend, z, ids, topk, y, **kw)
    except AssertionError:
        _, grad = sparse_table.run_op(backend, z, ids, topk, y, **kw)
        _, twin_grad = sparse_table.run_op("torch", z, ids, topk, y, **kw)
        loss, exp_grad = oracle_sparse.sparse_kd_loss(z, ids, topk, y, **kw)
        ours = float((grad.double() - exp_grad).abs().nan_to_num(0).max())
        twins = float((twin_grad.double() - exp_grad).abs().nan_to_num(0).max())
        assert ours <= 2 * twins, f"{backend}: gradient error {ours:.3g}, the twin's {twins:.3g}"


@pytest.mark.parametrize("tail,variant,shape,k,dtype,options", sparse_table.TABLE)
def test_the_torch_twin_still_matches_the_oracle(tail, variant, shape, k, dtype, options):
    z, ids, topk, y, kw = sparse_table.sparse_case(
        shape, k, dtype, {**sparse_table.VARIANTS[variant], **options}, seed=sum(shape) + k
    )
    check_sparse("torch", z, ids, topk, y, tail=tail, **kw)


# Around the kernel's blocks of 1024 columns, with kept ids on both sides of each edge.
EDGE_SHAPES = [(3, 1023), (3, 1024), (2, 1025), (2, 2049)]
EDGE_IDS = [0, 1, 1022, 1023, 1024, 2047, 2048]


def _edge_case(shape, dtype, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, v = shape
    z = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = (torch.randn(shape, generator=g) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[0] = 1023 % v  # a label at an edge, kept in row 0 (below)
    fixed = sorted({i % v for i in EDGE_IDS} | {v - 1})
    rest = [j for j in torch.randperm(v, generator=g).tolist() if j not in fixed][:5]
    ids = torch.tensor([fixed + rest] * n)
    topk = t.gather(1, ids)
    logz = torch.logsumexp(t.float() / T, -1)
    return z, ids, topk, y, logz


@pytest.mark.parametrize("T", [1.0, 2.5, 4.0], ids=["T=1", "T=2.5", "T=4"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_block_edges_and_ce_paths(shape, dtype, divergence, T):
    """T = 1 shares the CE exps, T = 4 takes them as powers, T = 2.5 computes its own."""
    z, ids, topk, y, logz = _edge_case(shape, dtype, T, seed=shape[1])
    for tail in ("bucket", "renormalize"):
        if tail == "renormalize" and divergence == "reverse_kl":
            continue
        kw = {"T": T, "divergence": divergence, "alpha": 0.6, "tail": tail}
        if tail == "bucket":
            kw["logz"] = logz
        check_sparse("cpu", z, ids, topk, y, **kw)
        check_sparse("cpu", z, ids, topk, None, **kw)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "skew_reverse_kl", "tvd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_student_tail_that_underflows_is_exact(dtype, divergence):
    """Kept logits 60 above the rest at T = 0.5: the tail's mass is ~1e-52, below what the
    row-max-shifted exps hold (the kernel's exact-tail path, with the tail's own max)."""
    g = torch.Generator().manual_seed(1)
    n, v, k = 4, 3000, 6
    z = torch.randn(n, v, generator=g)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    z.scatter_(1, ids, 60.0 + torch.randn(n, k, generator=g))
    z = z.to(dtype)
    t = torch.randn(n, v, generator=g) * 3
    topk = t.gather(1, ids)
    logz = torch.logsumexp(t / 0.5, -1)
    y = ids[:, 0].clone()
    y[1] = (ids[1, 0] + 1) % v  # a tail label too
    for labels in (y, None):
        check_sparse("cpu", z, ids, topk, labels, logz=logz, T=0.5, divergence=divergence)


def test_an_empty_student_tail():
    """Every id outside the kept ones at -inf: P_tail = 0, nothing to spread over the tail."""
    g = torch.Generator().manual_seed(2)
    z = torch.full((3, 2500), -math.inf)
    ids = torch.tensor([[5, 1500, 2499]] * 3)
    z.scatter_(1, ids, torch.randn(3, 3, generator=g))
    t = torch.randn(3, 2500, generator=g)
    for div in ("kl", "jsd", "tvd"):
        check_sparse("cpu", z, ids, t.gather(1, ids), ids[:, 1].clone(),
                     logz=torch.logsumexp(t, -1), divergence=div)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_temperatures_mix_the_ce_paths(dtype):
    """Per-row T: shared (1), powers (2, 4, 32) and own (2.5, 0.7) CE exps in one call."""
    T = torch.tensor([1.0, 2.0, 2.5, 4.0, 0.7, 32.0])
    z, ids, topk, y, kw = sparse_table.sparse_case((6, 1500), 9, dtype, {"T": T}, seed=3)
    check_sparse("cpu", z, ids, topk, y, alpha=torch.linspace(0, 1, 6), **kw)


@pytest.mark.parametrize("divergence", ["reverse_kl", "skew_reverse_kl", "kl"])
def test_a_zero_alpha_row_drops_an_infinite_divergence(divergence):
    """A row with alpha = 0 is CE alone even where its divergence is infinite (reverse_kl against
    a kept teacher logit of -inf): its gradient is the CE's, not 0 * inf = NaN."""
    z, ids, topk, y, kw = sparse_table.sparse_case((4, 700), 6, torch.float32, {"T": 1.5}, seed=4)
    topk = topk.clone()
    topk[1, -1] = -math.inf
    alpha = torch.tensor([0.5, 0.0, 0.9, 0.0])
    kw = {**kw, "divergence": divergence, "skew": 0.0, "t_squared": False}
    _, grad = sparse_table.run_op("cpu", z, ids, topk, y, alpha=alpha, **kw)
    _, twin = sparse_table.run_op("torch", z, ids, topk, y, alpha=alpha, **kw)
    assert bool(grad[1].isfinite().all()) and bool(grad[3].isfinite().all())
    assert_close(grad[[1, 3]], twin[[1, 3]], "alpha = 0 rows")


def test_a_float64_student_runs_the_twin():
    """The public op takes float32 / float16 / bfloat16; the backend itself hands float64 (and
    any other tail mode) to the twin rather than failing."""
    z, ids, topk, y, kw = sparse_table.sparse_case((5, 40), 4, seed=4)
    got = _native(z.double(), ids, topk, kw["logz"], y)
    exp = sparse_twin.sparse_kd_forward(z.double(), ids, topk, kw["logz"], y, 1.0, 0.5, 1.0, True,
                                        0, KDOptions())  # fmt: skip
    assert got[1].dtype == torch.float64
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


def _native(z, ids, topk, logz, labels, tail=0, opts=None, T=1.0, need_grad=True):
    from rbkd.ops.backends import cpu

    return cpu.sparse_kd_forward(z, ids, topk, logz, labels, T, 0.5, 1.0, need_grad, tail,
                                 opts or KDOptions())  # fmt: skip


def test_the_kernel_makes_bad_rows_nan_as_the_twin_does():
    """Rows the host checks would refuse before the kernel (ids out of range or repeated, a kept
    mass above 1, a label out of range), and rows the NaN rule covers (NaN, +inf, all -inf,
    NaN logz), called on the backend directly: NaN rows as the twin's, the rest equal."""
    g = torch.Generator().manual_seed(5)
    n, v, k = 10, 1300, 4
    z = torch.randn(n, v, generator=g) * 2
    t = torch.randn(n, v, generator=g) * 2
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    topk = t.gather(1, ids)
    logz = torch.logsumexp(t, -1)
    y = torch.randint(0, v, (n,), generator=g)
    ids[0, 1] = v  # out of range
    ids[1, 2] = ids[1, 0]  # repeated
    logz[2] = topk[2].max() - 1.0  # kept mass above 1
    y[3] = v  # label out of range
    z[4, 1100] = math.nan  # in the second block
    z[5, 7] = math.inf
    z[6] = -math.inf
    logz[7] = math.nan
    y[8] = -100  # ignored: 0, even with poison
    z[8, 0] = math.nan
    for tail in (0, 1):
        loss, grad = _native(z, ids, topk, logz, y, tail)
        exp_loss, exp_grad = sparse_twin.sparse_kd_forward(
            z, ids, topk, logz, y, 1.0, 0.5, 1.0, True, tail, KDOptions()
        )
        nan_rows = [0, 1, 3, 4, 5, 6] + ([2, 7] if tail == 0 else [])
        assert loss[nan_rows].isnan().all() and grad[nan_rows].isnan().all(), loss
        assert loss[8] == 0 and (grad[8] == 0).all()
        assert_close(loss, exp_loss, f"tail {tail} loss")
        assert_close(grad, exp_grad, f"tail {tail} grad", floor=1e-12)


def test_loss_only_calls_write_no_gradient():
    z, ids, topk, y, kw = sparse_table.sparse_case((4, 2000), 7, seed=6)
    loss, grad = _native(z, ids, topk, kw["logz"], y, need_grad=False)
    assert grad is None
    exp = oracle_sparse.sparse_kd_loss(z, ids, topk, y, logz=kw["logz"], alpha=0.5,
                                       reduction="none")[0]  # fmt: skip
    assert_close(loss, exp, "loss")


def _entry_args(**change):
    z = torch.randn(2, 8)
    ids = torch.tensor([[0, 1], [2, 3]])
    topk = torch.randn(2, 2)
    logz = torch.full((2,), 5.0)
    loss = torch.empty(2)
    from rbkd import _C

    opts = _C.KdOptions()
    for name, value in change.pop("options", {}).items():
        setattr(opts, name, value)
    args = dict(student=z.data_ptr(), s_dtype=0, s_row_stride=8, ids=ids.data_ptr(),
                ids_int64=True, topk=topk.data_ptr(), logz=logz.data_ptr(), labels=0, T=1.0,
                T_rows=0, alpha=1.0, alpha_rows=0, N=2, V=8, k=2, tail=0,
                loss=loss.data_ptr(), grad=0, grad_scale=1.0, grad_scale_ptr=0, options=opts,
                num_threads=1)  # fmt: skip
    args.update(change)
    return _C, args, (z, ids, topk, logz, loss)


@pytest.mark.parametrize(
    "change,word",
    [
        ({"s_dtype": 3}, "s_dtype"),
        ({"tail": 2}, "tail"),
        ({"k": 9}, "k must be"),
        ({"k": 0}, "k must be"),
        ({"logz": 0}, "logz"),
        ({"T": 0.0}, "T"),
        ({"alpha": math.nan}, "alpha"),
        ({"num_threads": 0}, "num_threads"),
        ({"options": {"divergence": DIVERGENCES["dkd"]}}, "dkd"),
        ({"N": -1}, "N"),
    ],
    ids=lambda x: str(x) if isinstance(x, str) else None,
)
def test_the_sparse_entry_point_checks_its_arguments(change, word):
    lib, args, _keep = _entry_args(**change)
    with pytest.raises(ValueError, match=word) as err:
        lib.sparse_kd_loss_fwd(**args)
    assert "\n" not in str(err.value) and str(err.value).startswith("sparse_kd_loss_fwd: ")


def test_the_sparse_entry_point_runs_with_good_arguments():
    lib, args, keep = _entry_args()  # keep: the tensors behind the pointers, alive
    lib.sparse_kd_loss_fwd(**args)
    assert keep[-1].isfinite().all()


# ---- capture_soft_labels ----------------------------------------------------------------------

CAPTURE_SHAPES = [
    ((3, 1), 1),
    ((5, 1023), 7),
    ((4, 1025), 1025),
    ((2, 3000), 64),
    ((2, 2, 2049), 3),
]
GRID = [0.3, 1.0, 2.0, 4.5, 20.0]
# A grid of halvings takes the kernel's one-exp chain (exp(x / T_max) squared per level): the
# stores' grid, in an order that is not the chain's.
CHAIN = [2.0, 0.5, 4.0, 1.0]
GRIDS = {"grid": GRID, "chain": CHAIN}


def _capture(x, k, temps):
    with ops.use_backend("cpu"):
        return ops.capture_soft_labels(x, k, temps)


def _expected_order(x: torch.Tensor, k: int) -> torch.Tensor:
    """Descending logit, equal logits by ascending id: a stable sort of the negated row."""
    return torch.sort(-x.double(), dim=-1, stable=True).indices[..., :k].int()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k", CAPTURE_SHAPES, ids=str)
def test_capture_matches_the_oracle(shape, k, dtype, grid):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    got = _capture(x, k, GRIDS[grid])
    exp = oracle_sparse.capture(x, k, GRIDS[grid])
    assert torch.equal(got.topk_ids, _expected_order(x, k))
    assert got.topk_logits.dtype == dtype
    assert torch.equal(got.topk_logits.double(), exp["topk_logits"])
    assert_close(got.logz, exp["logz"], "logz", floor=1.0)
    assert_close(got.entropy, exp["entropy"], "entropy", floor=1.0)


def test_equal_logits_rank_by_ascending_id():
    """bfloat16 rows of few distinct values, ties across block edges; and a constant row."""
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 4, (3, 2600), generator=g).to(torch.bfloat16)
    x[2] = 1.0
    got = _capture(x, 40, [1.0])
    assert torch.equal(got.topk_ids, _expected_order(x, 40))
    assert got.topk_ids[2].tolist() == list(range(40))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("direction", ["rising", "falling", "spike late"])
def test_the_running_max_across_blocks(direction, grid):
    """A max that rises in every block (each block rescales the sums), one that falls, and one
    far above the rest in the last block, at logits of magnitude 1000."""
    v = 5000
    ramp = torch.linspace(-1000.0, 1000.0, v)
    x = torch.stack([ramp if direction != "falling" else ramp.flip(0)] * 2)
    if direction == "spike late":
        x = torch.randn(2, v) * 3
        x[:, v - 3] = 1000.0
    got = _capture(x, 5, GRIDS[grid])
    exp = oracle_sparse.capture(x, 5, GRIDS[grid])
    assert_close(got.logz, exp["logz"], "logz", floor=1.0)
    assert_close(got.entropy, exp["entropy"], "entropy", floor=1.0)
    assert torch.equal(got.topk_ids, _expected_order(x, 5))


@pytest.mark.parametrize("temps", [[1.0, 3.0], [1.0, 2.0]], ids=["grid", "chain"])
def test_capture_nonfinite_rows_are_nan(temps):
    x = torch.randn(5, 2100)
    x[0, 1500], x[1, 3], x[2] = math.nan, math.inf, -math.inf
    x[3, :1800] = -math.inf  # masked ids: probability 0, the row is fine
    got = _capture(x, 4, temps)
    assert got.logz[:3].isnan().all() and got.entropy[:3].isnan().all()
    exp = oracle_sparse.capture(x[3:], 4, temps)
    assert_close(got.logz[3:], exp["logz"], "logz")
    assert_close(got.entropy[3:], exp["entropy"], "entropy")


def test_capture_samples_are_the_twins_draws():
    x = torch.randn(6, 1500)
    x[2, 4] = math.nan
    got = _capture_rows_native(x, 3, [1.0, 2.0], samples=16)
    exp = capture_twin._capture_rows(x, 3, [1.0, 2.0], 16, 1.5, torch.Generator().manual_seed(8))
    assert torch.equal(got[4], exp[4]) and torch.equal(got[5], exp[5])
    assert (got[4][2] == -1).all()


def _capture_rows_native(x, k, temps, samples):
    from rbkd.ops.backends import cpu

    return cpu.capture_rows(x, k, temps, samples, 1.5, torch.Generator().manual_seed(8))


@pytest.mark.parametrize(
    "change,word",
    [({"k": 0}, "k must be"), ({"J": 0}, "J"), ({"temps_value": 0.0}, "temps"),
     ({"dtype": 7}, "dtype"), ({"topk_ids": 0}, "topk_ids")],
    ids=["k", "J", "temps", "dtype", "topk_ids"],
)  # fmt: skip
def test_the_capture_entry_point_checks_its_arguments(change, word):
    from rbkd import _C

    x = torch.randn(2, 8)
    temps = torch.tensor([change.pop("temps_value", 1.0)])
    out = [torch.empty(2, 3, dtype=torch.int32), torch.empty(2, 3), torch.empty(2, 1),
           torch.empty(2, 1)]  # fmt: skip
    args = dict(x=x.data_ptr(), dtype=0, x_row_stride=8, N=2, V=8, k=3, temps=temps.data_ptr(),
                J=1, topk_ids=out[0].data_ptr(), topk_logits=out[1].data_ptr(),
                logz=out[2].data_ptr(), entropy=out[3].data_ptr(), num_threads=1)  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=word) as err:
        _C.capture_soft_labels_fwd(**args)
    assert "\n" not in str(err.value)


def test_exp_yardstick_is_positive():
    from rbkd import _C

    assert 0 < _C.exp_seconds_per_element(1 << 12, 1) < 1e-6


@pytest.mark.parametrize("layout", ["one run holds the k best", "ties at the bound", "spread"])
def test_the_top_k_pre_pass_keeps_the_exact_order(layout):
    """Rows small enough for the kernel's pre-pass (the k-th largest run maximum bounds what is
    offered): the k best all in one run of 64, maxima tied across runs at the bound, and values
    spread at random; ids and values must be the stable descending order's."""
    v, k = 4096, 40
    g = torch.Generator().manual_seed(11)
    if layout == "one run holds the k best":
        x = torch.randn(2, v, generator=g) - 10.0
        x[:, 320:360] = torch.arange(40, dtype=torch.float32)
    elif layout == "ties at the bound":
        x = torch.randint(0, 3, (2, v), generator=g).float()
    else:
        x = torch.randn(2, v, generator=g) * 3
    got = _capture(x, k, [1.0])
    assert torch.equal(got.topk_ids, _expected_order(x, k))
    assert torch.equal(got.topk_logits, x.gather(-1, _expected_order(x, k).long()))
