"""The CUDA extension rbkd._C_cuda: built wherever nvcc is, for sm_80 and sm_90, with the four
entry points of csrc/README.md. Without a GPU only the build is checked; with one, the kernels are
compared with the CPU kernels (which the float64 tests in test_backend_cpu.py pin down).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ENTRY_POINTS = (
    "temperature_softmax_fwd",
    "temperature_softmax_bwd",
    "kd_loss_fwd",
    "soft_label_entropy_fwd",
)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


pytestmark = pytest.mark.skipif(
    _nvcc() is None, reason="no nvcc: rbkd._C_cuda is not built without a CUDA compiler"
)


def _extension_path() -> Path:
    spec = importlib.util.find_spec("rbkd._C_cuda")
    assert spec is not None and spec.origin, (
        "nvcc is installed but rbkd._C_cuda is not in the installed package: reinstall with "
        "`pip install --no-build-isolation -e .` and look for 'rbkd: building the CUDA extension'"
    )
    path = Path(spec.origin)
    assert path.is_file(), f"rbkd._C_cuda points at {path}, which does not exist"
    return path


def test_extension_is_installed_with_the_entry_points():
    path = _extension_path()
    try:
        module = importlib.import_module("rbkd._C_cuda")
    except ImportError as err:  # no CUDA driver library on this machine: the file is enough
        assert "libcuda" in str(err), f"rbkd._C_cuda failed to import: {err}"
        assert path.stat().st_size > 0
        return
    missing = [name for name in ENTRY_POINTS if not hasattr(module, name)]
    assert not missing, f"rbkd._C_cuda lacks {missing}"


def test_extension_holds_sm80_and_sm90_code():
    path = _extension_path()
    cuobjdump = shutil.which("cuobjdump") or str(Path(_nvcc()).with_name("cuobjdump"))
    if Path(cuobjdump).exists():
        listing = subprocess.run(
            [cuobjdump, "--list-elf", str(path)], capture_output=True, text=True
        ).stdout
    else:  # toolkits without cuobjdump: the fatbinary keeps each cubin's "-arch sm_XX" options
        listing = path.read_bytes().decode("latin-1")
    for arch in ("sm_80", "sm_90"):
        assert arch in listing, f"no {arch} code in {path}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a GPU-less machine")
def test_launch_without_gpu_is_a_runtime_error_naming_the_op():
    try:
        module = importlib.import_module("rbkd._C_cuda")
    except ImportError:
        pytest.skip("rbkd._C_cuda does not import here (no CUDA driver library)")
    with pytest.raises(ValueError, match="kd_loss_fwd: s_dtype code 3 is not one of"):
        module.kd_loss_fwd(
            1, 3, 1, 1, 0, 1, 0, 0, -100, 1.0, 0, 0.5, 0, True, 1, 1, 1, 0, 1.0, 0, 0
        )
    module.temperature_softmax_fwd(0, 0, 4, 0, 0, 4, 1.0, False, 0)  # N = 0 launches nothing
    x = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="temperature_softmax_fwd: CUDA error"):
        module.temperature_softmax_fwd(x.data_ptr(), 0, 4, x.data_ptr(), 2, 4, 1.0, False, 0)


# ---- on a GPU: the CUDA kernels agree with the CPU kernels ------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("c", [1, 10, 17, 1000, 1028, 32785])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_matches_cpu(c, dtype):
    from rbkd.ops.backends import cpu, cuda

    g = torch.Generator().manual_seed(c)
    n = 37
    z = (torch.randn(n, 2 * c, generator=g) * 3).to(dtype)[:, :c]
    t = (torch.randn(n, c, generator=g) * 3).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[0], labels[1] = -100, c + 3
    T = 0.5 + 4 * torch.rand(n, generator=g)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    for kind, teacher in (
        (0, t),
        (1, t.float().softmax(-1).to(dtype)),
        (2, t.float().log_softmax(-1).to(dtype)),
    ):
        args = (labels, T, 0.3, kind, True, -100, 0.5, True)
        l_cpu, g_cpu = cpu.kd_loss_forward(z, teacher, *args)
        dev_args = (labels.cuda(), T.cuda(), 0.3, kind, True, -100, torch.tensor(0.5).cuda(), True)
        l_gpu, g_gpu = cuda.kd_loss_forward(z.cuda(), teacher.cuda(), *dev_args)
        torch.testing.assert_close(l_gpu.cpu(), l_cpu, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g_gpu.cpu().float(), g_cpu.float(), **tol)
    for log in (False, True):
        y_cpu = cpu.softmax_forward(z, 2.0, log)
        y_gpu = cuda.softmax_forward(z.cuda(), 2.0, log)
        torch.testing.assert_close(y_gpu.cpu().float(), y_cpu.float(), **tol)
        go = torch.randn(n, c, generator=g).to(dtype)
        b_cpu = cpu.softmax_backward(y_cpu, go, 2.0, log)
        b_gpu = cuda.softmax_backward(y_cpu.cuda(), go.cuda(), 2.0, log)
        torch.testing.assert_close(b_gpu.cpu().float(), b_cpu.float(), **tol)
    temps = torch.tensor([0.5, 1.0, 4.0])
    e_cpu = cpu.entropy_forward(z, temps, 0, True)
    e_gpu = cuda.entropy_forward(z.cuda(), temps.cuda(), 0, True)
    torch.testing.assert_close(e_gpu.cpu(), e_cpu, atol=1e-4, rtol=1e-4)
