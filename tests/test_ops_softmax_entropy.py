"""temperature_softmax and soft_label_entropy on every CPU-capable backend against the float64
oracle, one table row per backend x dtype x shape x options."""

from __future__ import annotations

import math

import oracle
import pytest
import torch
from helpers import cpu_backends
from oracle import assert_close

import rbkd.ops as ops

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0, 10), (1, 1), (7, 2), (7, 10), (4096, 10), (7, 1000), (3, 32785)]
TEMPS = [1.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 20.0]


def logits(shape, dtype=torch.float32, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def transposed(x):  # [4, 6, 9] with non-contiguous leading dimensions
    return x.transpose(0, 1)


def masked_and_huge(x):
    x = x.clone()
    x[..., :4], x[..., 7] = -math.inf, 1e4
    return x


SOFTMAX_ROWS = [  # (shape, dtype, T, prep)
    *[(s, d, 2.5, None) for s in SHAPES for d in DTYPES],
    ((6, 4, 9), torch.float32, 3.0, transposed),
    ((5, 20), torch.float32, 0.5, masked_and_huge),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype,T,prep", SOFTMAX_ROWS, ids=str)
@pytest.mark.parametrize("log", [False, True])
def test_temperature_softmax(backend, shape, dtype, T, prep, log):
    x = logits(shape, dtype, seed=shape[-1])
    x = (prep(x) if prep else x).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    expected = oracle.softmax(x64, T, log)
    (torch.where(expected.isfinite(), expected, 0.0) * upstream.double()).sum().backward()
    with ops.use_backend(backend):
        out = ops.temperature_softmax(x, T, log=log)
        (torch.where(out.isfinite(), out, 0.0).float() * upstream).sum().backward()
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected, f"{backend} softmax", dtype, loose=10 if log else 1)
    assert_close(x.grad, x64.grad, f"{backend} grad", dtype, loose=4)


ENTROPY_ROWS = [  # (shape, dtype, T, options, prep)
    *[(s, d, TEMPS, {}, None) for s in SHAPES for d in DTYPES],
    ((50, 10), torch.float32, 9.0, {}, None),
    ((50, 10), torch.float32, torch.tensor([9.0]), {"normalize": True}, None),
    ((50, 10), torch.float32, 1.0, {"teacher_kind": "probs"}, lambda x: x.softmax(-1)),
    ((3, 10), torch.float32, 1.0, {"normalize": True}, lambda x: x * 0),  # uniform: exactly 1
    ((4, 1), torch.float32, [1.0, 5.0], {"normalize": True}, None),  # one class: exactly 0
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype,T,options,prep", ENTROPY_ROWS, ids=str)
def test_soft_label_entropy(backend, shape, dtype, T, options, prep):
    x = logits(shape, dtype, seed=shape[-1])
    x = prep(x) if prep else x
    with ops.use_backend(backend):
        out = ops.soft_label_entropy(x, T, **options)
    kind = options.get("teacher_kind", "logits")
    expected = oracle.entropy(x, T, kind, options.get("normalize", False))
    if isinstance(T, float):
        expected = expected[0]
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert_close(out, expected, f"{backend} entropy", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_matches_autograd(backend):
    x = logits((6, 9), torch.float32).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    w = torch.randn(3, 6)
    with ops.use_backend(backend):
        (ops.soft_label_entropy(x, [1.0, 4.0, 9.0], normalize=True) * w).sum().backward()
    (oracle.entropy(x64, [1.0, 4.0, 9.0], normalize=True) * w.double()).sum().backward()
    assert_close(x.grad, x64.grad, "entropy grad", loose=5)
