"""A checkout's kernels/ folder must not hide an installed top-level `kernels` (kernels/_shadow.py)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def installed_kernels_dist() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_import_kernels_from_the_root_gives_the_installed_package_when_there_is_one():
    where = Path(run_from_root("import kernels; print(kernels.__file__)"))
    ours = ROOT / "kernels" / "__init__.py"
    if installed_kernels_dist():
        assert where != ours and where.name == "__init__.py", where
    else:  # nothing to hand over to: the checkout's folder, importable without error
        assert where == ours


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_a_transformers_model_builds_from_the_checkout_root():
    code = (
        "from transformers import GPT2Config, GPT2LMHeadModel; "
        "m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)); "
        "print(sum(p.numel() for p in m.parameters()) > 0)"
    )
    assert run_from_root(code) == "True"


def test_rbkd_kernels_is_still_rbkds_own():
    out = run_from_root(
        "import rbkd.kernels as k; print(k.__name__, hasattr(k, 'TRITON_AVAILABLE'))"
    )
    assert out == "rbkd.kernels True"
