"""temperature_softmax and soft_label_entropy on every CPU-capable backend vs float64."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOLERANCES, assert_close, cpu_backends

import rbkd.ops as ops

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0, 10), (1, 1), (7, 2), (7, 10), (4096, 10), (7, 1000), (3, 32785)]
TEMPS = [1.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 20.0]


def logits(n, c, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * scale).to(dtype)


def entropy64(x, T):
    logp = torch.log_softmax(x.double() / T, -1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("log", [False, True])
def test_temperature_softmax_forward_and_backward(backend, dtype, n, c, log):
    x = logits(n, c, dtype, seed=c).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    expected = (torch.log_softmax if log else torch.softmax)(x64 / 2.5, -1)
    upstream = torch.randn(n, c, generator=torch.Generator().manual_seed(1))
    (expected * upstream.double()).sum().backward()
    with ops.use_backend(backend):
        out = ops.temperature_softmax(x, 2.5, log=log)
        (out.float() * upstream).sum().backward()
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected, atol * (10 if log else 1), rtol, f"{backend} softmax")
    gscale = float(x64.grad.abs().max()) if n else 1.0
    assert_close(x.grad, x64.grad, atol * max(gscale, 1.0) * 4, rtol * 4, f"{backend} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_keeps_leading_shape_and_handles_strides(backend):
    x = torch.randn(4, 6, 9).transpose(0, 1)  # non-contiguous leading dims
    with ops.use_backend(backend):
        out = ops.temperature_softmax(x, 3.0)
    assert_close(out, torch.softmax(x.double() / 3, -1), 1e-6, 1e-6, "3-D softmax")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_minus_inf_and_huge_logits(backend):
    x = torch.randn(5, 20)
    x[:, :4] = float("-inf")
    x[:, 7] = 1e4
    with ops.use_backend(backend):
        out = ops.temperature_softmax(x, 0.5)
        lout = ops.temperature_softmax(x, 0.5, log=True)
    assert_close(out, torch.softmax(x.double() / 0.5, -1), 1e-6, 1e-6, "softmax")
    assert_close(lout, torch.log_softmax(x.double() / 0.5, -1), 1e-3, 1e-6, "log_softmax")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", SHAPES)
def test_entropy_many_temperatures(backend, dtype, n, c):
    x = logits(n, c, dtype, seed=c)
    with ops.use_backend(backend):
        out = ops.soft_label_entropy(x, TEMPS)
    expected = torch.stack([entropy64(x, T) for T in TEMPS]) if n else torch.zeros(8, 0)
    atol, rtol = TOLERANCES[dtype]
    assert out.shape == (len(TEMPS), n) and out.dtype == torch.float32
    assert_close(out, expected, atol * max(1.0, math.log(max(c, 2))), rtol, f"{backend} entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_scalar_normalize_and_probs(backend):
    x = logits(50, 10, torch.float32)
    with ops.use_backend(backend):
        one = ops.soft_label_entropy(x, 9.0)
        norm = ops.soft_label_entropy(x, torch.tensor([9.0]), normalize=True)
        probs = ops.soft_label_entropy(torch.softmax(x / 9.0, -1), teacher_kind="probs")
    assert one.shape == (50,) and norm.shape == (1, 50)
    assert_close(one, entropy64(x, 9.0), 1e-5, 1e-5, "entropy")
    assert_close(norm[0], entropy64(x, 9.0) / math.log(10), 1e-5, 1e-5, "normalized")
    assert_close(probs, entropy64(x, 9.0), 1e-5, 1e-5, "probs entropy")
    uniform = torch.zeros(3, 10)
    with ops.use_backend(backend):
        assert_close(ops.soft_label_entropy(uniform, normalize=True), torch.ones(3), 1e-6, 0, "max")


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_single_class_is_zero(backend):
    with ops.use_backend(backend):
        out = ops.soft_label_entropy(torch.randn(4, 1), [1.0, 5.0], normalize=True)
    assert torch.equal(out, torch.zeros(2, 4))


def test_entropy_gradient_matches_autograd():
    x = torch.randn(6, 9, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    w = torch.randn(3, 6)
    (ops.soft_label_entropy(x, [1.0, 4.0, 9.0], normalize=True) * w).sum().backward()
    expected = torch.stack([entropy64(x64, T) for T in (1.0, 4.0, 9.0)]) / math.log(9)
    (expected * w.double()).sum().backward()
    assert_close(x.grad, x64.grad, 1e-5, 1e-4, "entropy grad")
