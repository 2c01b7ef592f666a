"""bench/gpu.sh, the prepared GPU check: where there is no GPU it stops at once with one line,
having installed and written nothing; its parts parse their arguments and refuse a CPU clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


@no_gpu
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, RBKD_GPU_RESULTS=str(tmp_path / "results"))
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bench/gpu.sh: no CUDA device") and "NVIDIA GPU" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "results").exists()  # nothing written before the preflight passed


@no_gpu
@pytest.mark.parametrize("script", ["gpu_tune.py", "gpu_train.py"])
def test_gpu_parts_need_their_arguments(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "required" in proc.stderr


@no_gpu
def test_gpu_tune_refuses_a_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_tune.py"), "--json", str(tmp_path / "t.json"),
         "--md", str(tmp_path / "t.md")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 3 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "t.json").exists()


def test_report_appends_the_gpu_parts(tmp_path):
    """report.py --append: the tune, test and training sections follow the op tables."""
    import json

    bench = {
        "machine_info": {"rbkd": {"copy_gbps": {"cuda": 4000.0}, "gpu": "NVIDIA H200"}},
        "benchmarks": [
            {
                "stats": {"median": 1e-3, "min": 0.9e-3},
                "extra_info": {
                    "op": "kd_loss",
                    "backend": backend,
                    "device": "cuda",
                    "shape_tag": "vocab-32k",
                    "N": 16384,
                    "C": 32000,
                    "dtype": "bfloat16",
                    "bytes": 3 * 16384 * 32000 * 2,
                },
            }  # fmt: skip
            for backend in ("eager", "triton")
        ],
    }
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(bench))
    part = tmp_path / "tune.md"
    part.write_text("## Block-size sweep\n\nrow\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), str(src), "--name", "gpu-x",
         "--out-dir", str(tmp_path / "out"), "--append", str(part), "--note", "hello"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out" / "gpu-x.md").read_text()
    assert text.index("## Ops") < text.index("## Block-size sweep") and "- hello" in text
    assert "[cuda] kd_loss fwd+bwd >= 60% of copy bandwidth at C = 32000" in text
