"""Shared test helpers: the backends that run CPU tensors here, and the inputs of the op tables.
The float64 oracle, the tolerances and assert_close are in oracle.py."""

from __future__ import annotations

import os

import torch


def cpu_backends() -> list[str]:
    """Backends that run CPU tensors here: the reference, the C++ kernels, Triton when interpreted."""
    from rbkd.ops import available_backends

    names = [b for b in ("torch", "cpu") if b in available_backends()]
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in available_backends():
        names.append("triton")
    return names


def per_row(lo: float, hi: float):
    """A kd_loss T or alpha drawn per row in [lo, hi] (of the case's leading shape)."""
    return lambda lead, g: lo + (hi - lo) * torch.rand(lead, generator=g)


def kd_case(shape, dtype=torch.float32, options=None, *, seed=0):
    """(student, teacher, labels, kwargs) of one kd_loss table row. options: kd_loss's keyword
    arguments (T or alpha made by per_row are drawn here), and "labels": False for none, "scale"
    of the logits (3), "prep": a function (z, t, y) -> (z, t, y) applied last, in the dtype."""
    kw = dict(options or {})
    prep, scale, with_labels = kw.pop("prep", None), kw.pop("scale", 3.0), kw.pop("labels", True)
    g = torch.Generator().manual_seed(seed)
    *lead, c = shape
    z = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    kind = kw.get("teacher_kind", "logits")
    t = {"logits": t, "probs": t.softmax(-1), "log_probs": t.log_softmax(-1)}[kind]
    y = torch.randint(0, c, lead, generator=g) if with_labels else None
    for key in ("T", "alpha"):
        if callable(kw.get(key)):
            kw[key] = kw[key](lead, g)
    z, t = z.to(dtype), t.to(dtype)
    if prep is not None:
        z, t, y = prep(z, t, y)
    return z, t, y, kw


def shipped_studies(kind: str) -> list:
    """The studies/*.toml of one kind: "image" (the thesis's grids) or "lm" (language models)."""
    import tomllib
    from pathlib import Path

    from rbkd.study.lm_schema import is_lm_study

    root = Path(__file__).resolve().parents[1] / "studies"
    paths = sorted(root.glob("*.toml"))
    return [p for p in paths if is_lm_study(tomllib.loads(p.read_text())) == (kind == "lm")]
