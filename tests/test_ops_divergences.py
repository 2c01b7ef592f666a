"""kd_loss's divergences (issue 14: reverse KL, generalised JSD, skew KL and skew reverse KL, TVD,
DKD, standardised logits) on every CPU-capable backend against the float64 oracle, loss and
gradient: one table row per backend x divergence x dtype x shape x options. A new divergence or
parameter value is a row of VARIANTS, a new option a row of OPTIONS."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import cpu_backends, kd_case, per_row
from oracle import check_kd

import rbkd.ops as ops

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 10), (3, 32785), (2, 3, 17)]
VARIANTS = {
    "kl": {},
    "reverse_kl": {"divergence": "reverse_kl"},
    "jsd": {"divergence": "jsd"},  # beta = 0.5
    "jsd beta=0.1": {"divergence": "jsd", "beta": 0.1},
    "jsd beta=0": {"divergence": "jsd", "beta": 0.0},  # forward KL
    "jsd beta=1": {"divergence": "jsd", "beta": 1.0},  # reverse KL
    "skew_kl": {"divergence": "skew_kl"},  # skew = 0.1
    "skew_kl 0": {"divergence": "skew_kl", "skew": 0.0},  # forward KL
    "skew_kl 0.9": {"divergence": "skew_kl", "skew": 0.9},
    "skew_reverse_kl": {"divergence": "skew_reverse_kl"},
    "skew_reverse_kl 0.5": {"divergence": "skew_reverse_kl", "skew": 0.5},
    "tvd": {"divergence": "tvd"},
    "dkd": {"divergence": "dkd"},  # dkd_alpha = 1, dkd_beta = 8
    "dkd 0.5/2": {"divergence": "dkd", "dkd_alpha": 0.5, "dkd_beta": 2.0},
}


def ignore_every_third(z, t, y):
    y.view(-1)[::3] = -1
    return z, t, y


def int32_labels(z, t, y):
    return z, t, y.int()


def masked_classes(z, t, y):
    """Classes 10..19 at -inf in student and teacher: masked classes, probability 0."""
    z[:, 10:20] = t[:, 10:20] = -math.inf
    return z, t, y % 10


def poisoned(z, t, y):
    """Row 0 a NaN teacher, row 1 a NaN student, row 2 +inf in the teacher: NaN rows; row 3 the
    same poison, but ignored: 0."""
    t[0, 1], z[1, 0], t[2, 3] = math.nan, math.nan, math.inf
    t[3, 0] = math.nan
    if y is not None:
        y[3] = -100
    return z, t, y


OPTIONS = {  # kd_loss's arguments and kd_case's (helpers.kd_case)
    "labels": {},
    "no labels": {"labels": False},
    "standardize": {"standardize": True},
    "standardize, no labels": {"standardize": True, "labels": False},
    "per-row T and alpha": {"T": per_row(1, 20), "alpha": per_row(0, 1)},
    "per-row T, standardize": {"T": per_row(0.5, 10), "standardize": True},
    "T=1, alpha=0.5": {"T": 1.0, "alpha": 0.5},
    "alpha=0": {"alpha": 0.0},
    "alpha=1": {"alpha": 1.0},
    "ignore_index=-1": {"ignore_index": -1, "prep": ignore_every_third},
    "int32 labels": {"prep": int32_labels},
    "t_squared=False, sum": {"t_squared": False, "reduction": "sum"},
    "none": {"reduction": "none"},
    "-inf classes": {"T": 2.0, "reduction": "none", "prep": masked_classes},
    "-inf classes, standardize": {"reduction": "none", "standardize": True, "prep": masked_classes},
    "NaN rows": {"reduction": "none", "prep": poisoned},
    "probs teacher": {"teacher_kind": "probs", "T": 2.0},
    "log_probs teacher": {"teacher_kind": "log_probs", "T": 2.0},
}


def _id(*parts):
    return "-".join(str(p).replace("torch.", "") for p in parts)


TABLE = [  # divergence x shape x dtype, with and without standardize (32785 classes: float32)
    pytest.param(v, s, d, {"standardize": std}, id=_id(v, s, d, "std" if std else "raw"))
    for v in VARIANTS
    for s in SHAPES
    for d in DTYPES
    for std in (False, True)
    if not (std and s[-1] > 1000 and d != torch.float32)
] + [  # divergence x options: the CPU row path (C = 37) in float32 and bfloat16, and its lane
    # path (C <= 32: 16 rows per SIMD tile; 21 rows leave the second tile part empty) in float32
    pytest.param(v, s, d, o, id=_id(v, name, s, d))
    for v in VARIANTS
    for name, o in OPTIONS.items()
    for s, d in (((13, 37), torch.float32), ((13, 37), torch.bfloat16), ((21, 10), torch.float32))
    if not (v.startswith("dkd") and o.get("labels") is False)  # an error: test_bad_arguments
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,shape,dtype,options", TABLE)
def test_divergence_matches_oracle(backend, variant, shape, dtype, options):
    z, t, y, kw = kd_case(shape, dtype, {**VARIANTS[variant], **options}, seed=sum(shape))
    check_kd(backend, z, t, y, **kw)


BAD_ARGUMENTS = [  # (kd_loss arguments, the argument the one-line error names)
    ({"divergence": "kl_div"}, "divergence"),
    ({"divergence": "jsd", "beta": -0.1}, "beta"),
    ({"divergence": "jsd", "beta": 1.5}, "beta"),
    ({"divergence": "jsd", "beta": math.nan}, "beta"),
    ({"divergence": "skew_kl", "skew": -0.1}, "skew"),
    ({"divergence": "skew_kl", "skew": 1.0}, "skew"),
    ({"divergence": "skew_reverse_kl", "skew": 1.0}, "skew"),
    ({"divergence": "dkd", "labels": None}, "labels"),
    ({"standardize": True, "teacher_kind": "probs"}, "standardize"),
    ({"standardize": True, "teacher_kind": "log_probs"}, "standardize"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS, ids=[b[1] for b in BAD_ARGUMENTS])
def test_bad_arguments(backend, kwargs, name):
    z, t, y, _ = kd_case((4, 6), seed=3)
    kwargs = {"labels": y, **kwargs}
    if kwargs.get("teacher_kind") in ("probs", "log_probs"):
        t = t.softmax(-1) if kwargs["teacher_kind"] == "probs" else t.log_softmax(-1)
    with ops.use_backend(backend), pytest.raises(ValueError, match=name) as err:
        ops.kd_loss(z, t, **kwargs)
    assert "\n" not in str(err.value), str(err.value)
