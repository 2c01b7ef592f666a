"""kd_loss on every CPU-capable backend against the float64 oracle (loss and gradient), one table
row per backend x dtype x shape x options; then its autograd semantics (upstream gradients,
retain_graph, no-grad calls) and shape errors. Divergences: test_ops_divergences.py."""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_backends, kd_case, per_row
from oracle import DIVERGENCES, assert_close, check_kd
from oracle import kd_loss as kd_oracle

import rbkd.ops as ops

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0, 10), (1, 1), (1, 2), (7, 1), (7, 2), (7, 10), (1, 1000), (7, 1000), (4096, 10),
          (4096, 1000), (1, 32785), (7, 32785), (2, 5, 17)]  # fmt: skip
INF = float("inf")


def ignore_every_third(z, t, y):
    y.view(-1)[::3] = -1
    return z, t, y


def ignore_all(z, t, y):
    return z, t, torch.full_like(y, -100)


def extreme(z, t, y):
    z[:, ::7], t[:, ::5], t[:, 3] = 1e4, -1e4, 1e4
    return z, t, y


def masked_classes(z, t, y):
    """Classes 10..19 at -inf in student and teacher: they contribute exactly 0."""
    z[:, 10:20] = t[:, 10:20] = -INF
    return z, t, y % 10


def masked_log_probs(z, t, y):
    z, t, y = masked_classes(z, t, y)
    return z, t.log_softmax(-1), y


def one_hot_probs(z, t, y):
    return z, torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype), y


def strided(z, t, y):
    """A row-sliced student and a column-major teacher: neither is contiguous."""
    wide_t = torch.randn(z.shape[1] + 10, 2 * z.shape[0]).t()
    return torch.cat([z, z], 1)[::1, ::2], wide_t[::2, 3 : 3 + z.shape[1]], y


def padded_rows(z, t, y):
    """Rows with unit column stride but a row stride past C (3 and 5 floats of padding): the
    CPU tile kernels' 8 x 8 transposes read and write such rows (C >= 8, 16-row tiles)."""
    return (
        torch.cat([z, z[:, :3]], 1)[:, : z.shape[1]],
        torch.cat([t, t[:, :5]], 1)[:, : t.shape[1]],
        y,
    )


def float_teacher(z, t, y):
    return z, t.float(), y


def int32_padding(z, t, y):
    y = y.int()
    y[1, 3:] = -100
    return z, t, y


ROWS = [  # (name, shape, dtype, options: kd_loss's arguments and kd_case's)
    *[("defaults", s, d, {}) for s in SHAPES for d in DTYPES],
    *[(f"{k} {r} t_squared={t2}", (33, 17), torch.float32,
       {"T": 2.5, "alpha": 0.3, "teacher_kind": k, "reduction": r, "t_squared": t2})
      for k in ("logits", "probs", "log_probs") for r in ("mean", "sum", "none")
      for t2 in (True, False)],
    *[("per-row T and alpha", (65, c), d, {"T": per_row(1, 20), "alpha": per_row(0, 1)})
      for c in (1, 10, 1000) for d in DTYPES],
    *[("no labels", (20, c), torch.float32,
       {"labels": False, "T": 9.0, "alpha": 0.99, "t_squared": False}) for c in (2, 10, 1000)],
    ("ignore_index=-1", (40, 10), torch.float32,
     {"ignore_index": -1, "alpha": 0.5, "prep": ignore_every_third}),
    *[(f"every row ignored {r}", (9, 10), torch.float32, {"reduction": r, "prep": ignore_all})
      for r in ("mean", "sum", "none")],
    *[("logits of 1e4", (16, 300), d, {"reduction": "sum", "scale": 1.0, "prep": extreme})
      for d in DTYPES],
    ("-inf classes", (12, 50), torch.float32,
     {"T": 3.0, "alpha": 0.7, "reduction": "none", "prep": masked_classes}),
    ("-inf classes log_probs", (12, 50), torch.float32,
     {"T": 3.0, "alpha": 0.7, "reduction": "none", "teacher_kind": "log_probs",
      "prep": masked_log_probs}),
    ("one-hot probs teacher", (8, 10), torch.float32,
     {"T": 1.0, "alpha": 1.0, "teacher_kind": "probs", "t_squared": False,
      "prep": one_hot_probs}),
    ("non-contiguous", (15, 20), torch.float32, {"T": 2.0, "alpha": 0.6, "prep": strided}),
    *[("padded rows", (45, c), torch.float32, {"T": 2.0, "alpha": 0.6, "prep": padded_rows})
      for c in (8, 10, 31)],
    ("bf16 student, f32 teacher", (10, 37), torch.bfloat16, {"prep": float_teacher}),
    *[(f"[b, s, C] int32 labels {r}", (2, 5, 17), torch.float32,
       {"T": per_row(1, 4), "alpha": 0.6, "reduction": r, "prep": int32_padding})
      for r in ("mean", "none")],
]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,shape,dtype,options",
    ROWS,
    ids=[f"{r[0]}-{r[1]}-{r[2]}".replace("torch.", "") for r in ROWS],
)
def test_kd_loss_matches_oracle(backend, name, shape, dtype, options):
    z, t, y, kw = kd_case(shape, dtype, options, seed=sum(shape))
    check_kd(backend, z, t, y, **kw)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_oracle_gradient_is_the_formulas(divergence):
    """The oracle's autograd gradient against finite differences (per-row T, an ignored row)."""
    z, t, y, kw = kd_case((5, 7), torch.float64, {"T": per_row(0.5, 9)}, seed=1)
    y[2] = -100
    loss = lambda x: kd_oracle(x, t, y, alpha=0.7, divergence=divergence, graph=True, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(loss, (z.requires_grad_(True),))


# ---- autograd: one KDLoss node ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,upstream", [("mean", 3.5), ("sum", 1.0), ("none", "weights")])
def test_upstream_gradient_is_applied(backend, reduction, upstream):
    """grad_loss != 1 (a scaled loss, as under AMP) and reduction='none' with a weight per row."""
    z0, t, y, _ = kd_case((8, 10), seed=2)
    w = torch.linspace(0.0, 2.0, 8) if upstream == "weights" else torch.tensor(upstream)
    z = z0.clone().requires_grad_(True)
    with ops.use_backend(backend):
        (ops.kd_loss(z, t, y, T=2.0, alpha=0.5, reduction=reduction) * w).sum().backward()
    _, expected = kd_oracle(z0, t, y, T=2.0, alpha=0.5, reduction=reduction)
    assert_close(z.grad, expected * (w[:, None] if w.dim() else w), "scaled grad", floor=1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_keeps_the_rest_of_the_graph(backend):
    """backward(retain_graph=True) through kd_loss gives the right gradient, and the other parts
    of the retained graph can run backward again."""
    z0, t, y, _ = kd_case((6, 10), seed=0)
    w = torch.ones((), requires_grad=True)
    z = z0.clone().requires_grad_(True)
    with ops.use_backend(backend):
        kd = ops.kd_loss(z * w, t, y, T=3.0, alpha=0.7)
    other = (z * w).pow(2).mean()
    (kd + other).backward(retain_graph=True)
    _, expected = kd_oracle(z0, t, y, T=3.0, alpha=0.7)
    assert_close(z.grad, expected + 2 * z0 / z0.numel(), "grad after retain_graph", floor=1e-30)
    z.grad = None
    other.backward()  # the retained part of the graph still works
    assert_close(z.grad, 2 * z0 / z0.numel(), "second backward of the other term", floor=1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("retain", [False, True])
def test_second_backward_through_one_call_is_a_clear_error(backend, retain):
    z0, t, y, _ = kd_case((6, 10))
    z = z0.clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.kd_loss(z, t, y)
    loss.backward(retain_graph=retain)
    first = z.grad.clone()
    with pytest.raises(RuntimeError, match="kd_loss: a second backward .* call kd_loss again"):
        loss.backward()
    assert torch.equal(z.grad, first), "a failed second backward must not touch .grad"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_calls_and_no_teacher_gradient(backend):
    z0, t, y, _ = kd_case((6, 10))
    z = z0.clone().requires_grad_(True)
    with ops.use_backend(backend):
        with torch.no_grad():
            loss = ops.kd_loss(z, t, y, reduction="none")
        plain = ops.kd_loss(z0, t, y, reduction="none")  # a student without requires_grad
        with torch.inference_mode():
            inf = ops.kd_loss(z0, t, y, reduction="none")
        teacher = t.clone().requires_grad_(True)
        ops.kd_loss(z, teacher, y).backward()
    assert not loss.requires_grad and loss.grad_fn is None and not plain.requires_grad
    expected, _ = kd_oracle(z0, t, y, reduction="none")
    for got in (loss, plain, inf):
        assert_close(got, expected, "no-grad loss")
    assert teacher.grad is None and z.grad is not None


def test_shape_errors_for_lm_inputs():
    z = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"labels must have shape \[2, 5\]"):
        ops.kd_loss(z, z, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="one value per row"):
        ops.kd_loss(z, z, None, T=torch.ones(2, 4))
