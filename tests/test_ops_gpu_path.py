"""The GPU path of the ops: no host synchronisation, and Triton as an optional dependency.

A GPU test runs every public op with torch.cuda.set_sync_debug_mode("error") (skipped without a
GPU). On this CPU-only machine two tests stand in for it: the code path CUDA tensors take (value
checks off, as validation.host_value_checks says for them) runs under a dispatch mode that fails on
every data-dependent host read (`.item()`, `bool(t)`, `float(t)`, `nonzero`, ...), and the ops run
under torch.compile(fullgraph=True) with the checks at their default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

import rbkd.ops as ops
from rbkd.ops import validation

ROOT = Path(__file__).resolve().parents[1]

# aten ops that read tensor values on the host: each is a device-to-host sync on a GPU.
HOST_READS = {
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::equal",
    "aten::allclose",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
}


class NoHostReads(TorchDispatchMode):
    """Fails on any op in HOST_READS, also inside rbkd's registered ops: a mode is switched off
    while it handles an op, so for those it runs the op's Python implementation under itself."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_READS:
            raise AssertionError(f"host read {name} on the GPU path")
        if name.startswith("rbkd::"):
            impl = _maybe_get_opdef(name)._init_fn
            with self:
                return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _every_option_cases(n=12, c=10):
    """(kwargs, teacher) covering labels, ignore_index, per-row T and alpha, the teacher kinds
    and every reduction."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, c, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    labels[::4] = -100
    T_rows = 0.5 + 4 * torch.rand(n, generator=g)
    a_rows = torch.rand(n, generator=g)
    for reduction in ("mean", "sum", "none"):
        yield {"labels": labels, "T": 3.0, "alpha": 0.7, "reduction": reduction}, t
        yield {"labels": labels.int(), "T": T_rows, "alpha": a_rows, "reduction": reduction}, t
        yield {"labels": None, "T": T_rows, "reduction": reduction}, t
        probs = torch.softmax(t, -1)
        yield {"labels": labels, "teacher_kind": "probs", "reduction": reduction}, probs
        yield {"labels": labels, "teacher_kind": "log_probs", "reduction": reduction}, probs.log()


def _gpu_path_calls(device):
    """[(label, call)]: every public op with every option, inputs already on `device` (a copy
    from the host inside the check would be the test's own synchronisation, not the op's)."""
    n, c = 12, 10
    g = torch.Generator(device=device).manual_seed(1)
    calls = []
    for i, (kwargs, teacher) in enumerate(_every_option_cases(n, c)):
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        z = torch.randn(n, c, generator=g, device=device).requires_grad_(True)
        teacher, labels = teacher.to(device), kwargs.pop("labels")

        def kd_calls(z=z, teacher=teacher, labels=labels, kwargs=kwargs):
            loss = ops.kd_loss(z, teacher, labels, **kwargs)
            loss.sum().backward() if loss.dim() else loss.backward()
            with torch.no_grad():
                ops.kd_loss(z, teacher, labels, **kwargs)
            (ops.kd_loss(z, teacher, labels, **kwargs) * 0.5).sum().backward()

        shown = {k: type(v).__name__ if torch.is_tensor(v) else v for k, v in kwargs.items()}
        calls.append((f"kd_loss case {i} {shown}", kd_calls))
    x = torch.randn(3, 4, c, generator=g, device=device).requires_grad_(True)
    x2 = x.detach() * 2
    calls.append(("kd_loss [..., C]", lambda: ops.kd_loss(x, x2, None, T=2.0).backward()))
    for log in (False, True):
        calls.append(
            (f"temperature_softmax log={log}",
             lambda log=log: ops.temperature_softmax(x, 2.0, log=log).sum().backward())
        )  # fmt: skip
    logits = torch.randn(n, c, generator=g, device=device).requires_grad_(True)
    temps = torch.tensor([1.0, 2.0], device=device)
    probs = torch.softmax(logits.detach(), -1)
    calls += [
        ("soft_label_entropy list temps",
         lambda: ops.soft_label_entropy(logits, [1.0, 4.0, 9.0], normalize=True).sum().backward()),
        ("soft_label_entropy tensor temps",
         lambda: ops.soft_label_entropy(logits, temps).sum().backward()),
        ("soft_label_entropy probs",
         lambda: ops.soft_label_entropy(probs, teacher_kind="probs")),
    ]  # fmt: skip
    return calls


def _run_all(device, backend):
    with ops.use_backend(backend):
        for _, call in _gpu_path_calls(device):
            call()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_gpu_code_path_reads_no_values_on_the_host(monkeypatch, backend):
    """With the value checks as CUDA tensors get them (off), no op reads a tensor value."""
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} not built")
    monkeypatch.setattr(validation, "host_reads_are_free", lambda device: False)
    calls = _gpu_path_calls("cpu")
    with NoHostReads(), ops.use_backend(backend):
        for _, call in calls:
            call()


def test_the_dispatch_mode_does_catch_host_reads():
    """The check above could pass vacuously; here it must fail."""
    z = torch.randn(4, 3)
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        float(z.sum())
    labels = torch.tensor([0, 5, 1, 2])  # a value check on CPU tensors reads labels
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        ops.kd_loss(z, z, labels)


def test_ops_compile_fullgraph_with_default_checks():
    """No graph break (so no data-dependent Python) in the public ops under torch.compile, with
    [..., C] logits, int32 labels, an ignored row and per-row T; compiled and eager agree."""
    n, c = 8, 10
    g = torch.Generator().manual_seed(2)
    model = torch.nn.Linear(6, c)
    x = torch.randn(2, n, 6, generator=g)
    teacher = torch.randn(2, n, c, generator=g)
    labels = torch.randint(0, c, (2, n), generator=g, dtype=torch.int32)
    labels[0, 0] = -100
    T_rows = 1 + torch.rand(2, n, generator=g)

    def step(x):
        logits = model(x)
        kd = ops.kd_loss(logits, teacher, labels, T=T_rows, alpha=0.5)
        kd_rows = ops.kd_loss(logits, teacher, None, T=4.0, reduction="none")
        h = ops.soft_label_entropy(logits[0], [1.0, 4.0])
        soft = ops.temperature_softmax(logits, 2.0, log=True)
        return kd + kd_rows.mean() + 0.1 * h.mean() - 0.01 * soft.mean()

    loss_c = torch.compile(step, fullgraph=True)(x)  # fullgraph: a graph break is an error
    loss_c.backward()
    grad_c = model.weight.grad.clone()
    model.zero_grad()
    loss_e = step(x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_c, model.weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted triton")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_ops_do_not_synchronise(backend):
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} not available")
    _run_all("cuda", backend)  # compile the kernels outside the check
    calls = _gpu_path_calls("cuda")
    torch.cuda.synchronize()
    synced = []
    with ops.use_backend(backend):
        for label, call in calls:
            torch.cuda.set_sync_debug_mode("error")
            try:
                call()
            except RuntimeError as err:
                if "synchronizing" not in str(err):
                    raise
                synced.append(label)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert not synced, f"these calls synchronised: {synced}"


# ---- Triton is optional -----------------------------------------------------------------------

_BLOCK_TRITON = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def test_ops_work_without_triton():
    """A CPU install without the gpu extra: rbkd.ops imports, runs and never needs triton."""
    code = (
        _BLOCK_TRITON
        + """
import torch, rbkd.ops as ops, rbkd.kernels as k
from rbkd.ops.backends import triton as backend
assert not k.TRITON_AVAILABLE and "No module named" in k.TRITON_IMPORT_ERROR
assert not backend.is_available() and "triton" not in ops.available_backends()
z = torch.randn(5, 7, requires_grad=True)
ops.kd_loss(z, torch.randn(5, 7), torch.arange(5), T=3.0).backward()
assert z.grad is not None and torch.isfinite(z.grad).all()
ops.soft_label_entropy(z.detach(), [1.0, 2.0]); ops.temperature_softmax(z, 2.0)
assert "triton" not in sys.modules
print("ok")
"""
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_triton_is_only_in_the_gpu_extra():
    """pip install rbkd does not pull triton; rbkd[gpu] does (the metadata pip resolves from)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.lower().startswith("triton") for dep in project["dependencies"])
    assert any(dep.startswith("triton") for dep in project["optional-dependencies"]["gpu"])
