"""kd_loss's one autograd path (KDLoss): backward semantics, no-grad calls, LM-shaped inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cpu_backends, kd_oracle

import rbkd.ops as ops

BACKENDS = cpu_backends()


def _inputs(n=6, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    t = torch.randn(n, c, generator=g) * 2
    y = torch.randint(0, c, (n,), generator=g)
    return z, t, y


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_keeps_the_rest_of_the_graph(backend):
    """backward(retain_graph=True) through kd_loss gives the right gradient, and the other parts
    of the retained graph can run backward again."""
    z0, t, y = _inputs()
    w = torch.ones((), requires_grad=True)
    z = z0.clone().requires_grad_(True)
    with ops.use_backend(backend):
        kd = ops.kd_loss(z * w, t, y, T=3.0, alpha=0.7)
    other = (z * w).pow(2).mean()
    (kd + other).backward(retain_graph=True)
    _, expected = kd_oracle(
        z0, t, y, T=3.0, alpha=0.7, teacher_kind="logits", t_squared=True, ignore_index=-100,
        reduction="mean",
    )  # fmt: skip
    assert_close(z.grad, expected + 2 * z0 / z0.numel(), 1e-6, 1e-5, "grad after retain_graph")
    z.grad = None
    other.backward()  # the retained part of the graph still works
    assert_close(z.grad, 2 * z0 / z0.numel(), 1e-6, 1e-5, "second backward of the other term")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("retain", [False, True])
def test_second_backward_through_one_call_is_a_clear_error(backend, retain):
    z0, t, y = _inputs()
    z = z0.clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.kd_loss(z, t, y)
    loss.backward(retain_graph=retain)
    first = z.grad.clone()
    with pytest.raises(RuntimeError, match="kd_loss: a second backward .* call kd_loss again"):
        loss.backward()
    assert torch.equal(z.grad, first), "a failed second backward must not touch .grad"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_calls(backend):
    z0, t, y = _inputs()
    z = z0.clone().requires_grad_(True)
    with ops.use_backend(backend):
        with torch.no_grad():
            loss = ops.kd_loss(z, t, y, reduction="none")
        plain = ops.kd_loss(z0, t, y, reduction="none")  # a student without requires_grad
        with torch.inference_mode():
            inf = ops.kd_loss(z0, t, y, reduction="none")
    assert not loss.requires_grad and loss.grad_fn is None and not plain.requires_grad
    expected, _ = kd_oracle(
        z0, t, y, T=4.0, alpha=0.9, teacher_kind="logits", t_squared=True, ignore_index=-100,
        reduction="none",
    )  # fmt: skip
    for got in (loss, plain, inf):
        assert_close(got, expected, 1e-5, 1e-5, "no-grad loss")
    assert z.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_scales_and_per_row_gradients(backend):
    """grad_loss != 1 (a scaled loss, as under AMP) and reduction='none' with a weight per row."""
    z0, t, y = _inputs(n=8)
    weights = torch.linspace(0.0, 2.0, 8)
    _, g_rows = kd_oracle(
        z0, t, y, T=2.0, alpha=0.5, teacher_kind="logits", t_squared=True, ignore_index=-100,
        reduction="none",
    )  # fmt: skip
    for reduction, upstream in (("mean", 3.5), ("sum", 1.0), ("none", weights)):
        z = z0.clone().requires_grad_(True)
        with ops.use_backend(backend):
            loss = ops.kd_loss(z, t, y, T=2.0, alpha=0.5, reduction=reduction)
        (loss * upstream).sum().backward()
        if reduction == "none":
            _, expected = kd_oracle(
                z0, t, y, T=2.0, alpha=0.5, teacher_kind="logits", t_squared=True,
                ignore_index=-100, reduction="none",
            )  # fmt: skip
            # kd_oracle backpropagates loss.sum(): rescale its per-row gradient by the weights.
            expected = expected * weights[:, None]
        else:
            _, expected = kd_oracle(
                z0, t, y, T=2.0, alpha=0.5, teacher_kind="logits", t_squared=True,
                ignore_index=-100, reduction=reduction,
            )  # fmt: skip
            expected = expected * upstream
        assert_close(z.grad, expected, 1e-6, 1e-5, f"grad with upstream ({reduction})")
    assert g_rows.shape == z0.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_shapes_and_int32_labels(backend):
    """[batch, seq, C] logits are rows; labels [batch, seq] int32 with padding; per-row T of the
    leading shape; the mean runs over every non-ignored position."""
    g = torch.Generator().manual_seed(3)
    b, s, c = 2, 5, 17
    z0 = torch.randn(b, s, c, generator=g) * 2
    t = torch.randn(b, s, c, generator=g) * 2
    y = torch.randint(0, c, (b, s), generator=g, dtype=torch.int32)
    y[1, 3:] = -100  # padding
    T = 1 + 3 * torch.rand(b, s, generator=g)
    z = z0.clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.kd_loss(z, t, y, T=T, alpha=0.6)
        rows = ops.kd_loss(z0, t, y, T=T, alpha=0.6, reduction="none")
    loss.backward()
    exp_loss, exp_grad = kd_oracle(
        z0.reshape(-1, c), t.reshape(-1, c), y.reshape(-1).long(), T=T.reshape(-1), alpha=0.6,
        teacher_kind="logits", t_squared=True, ignore_index=-100, reduction="mean",
    )  # fmt: skip
    assert loss.shape == () and rows.shape == (b, s)
    assert_close(loss, exp_loss, 1e-5, 1e-5, "LM loss")
    assert_close(z.grad, exp_grad.reshape(b, s, c), 1e-6, 1e-5, "LM grad")
    assert rows[1, 3:].eq(0).all()


def test_shape_errors_for_lm_inputs():
    z = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"labels must have shape \[2, 5\]"):
        ops.kd_loss(z, z, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="one value per row"):
        ops.kd_loss(z, z, None, T=torch.ones(2, 4))
