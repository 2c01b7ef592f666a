"""Fault injection (issue 9): a crash at every atomic write of a teacher run, a distillation and
soft-label writing, then a resume; a full disk; SIGINT and SIGTERM to a CLI run, then a resume.

Every atomic write in rbkd goes through `rbkd.io.atomic_path`. The fault wraps it and, at the
N-th call, "kills the process" either before the write starts or after the temporary file is
written and fsynced but before the rename, leaving the temporary behind exactly as a kill -9
would. `Crash` is a BaseException, so no `except Exception` in rbkd can swallow it. After the
crash the run is resumed without faults and must end with the weights, metrics and soft labels
of an uninterrupted run, with no temporary file left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import tiny

import rbkd.engine.checkpoint
import rbkd.engine.rundir
import rbkd.io
from rbkd.engine import CrossEntropy, Distillation, TrainConfig, fit, read_metrics
from rbkd.io import DiskFullError, atomic_write_bytes
from rbkd.models import build_model
from rbkd.soft_label_file import read_teacher_soft_labels, soft_labels_from_model

TRAIN, TEST = tiny(64), tiny(32, "test", seed=1)
CFG = TrainConfig(epochs=2, batch_size=32, lr=2e-3, seed=7, device="cpu", eval_batch_size=64)
MODES = ("before-write", "before-rename")


class Crash(BaseException):
    """The process dies here (a kill -9 in-process: nothing below may catch it)."""


@contextlib.contextmanager
def faults(monkeypatch, at: int | None, mode: str = "before-rename"):
    """Count atomic writes; crash at the `at`-th one (None: never). Yields the counter."""
    real = rbkd.io.atomic_path
    calls = [0]

    @contextlib.contextmanager
    def faulty(path):
        calls[0] += 1
        if calls[0] != at:
            with real(path) as tmp:
                yield tmp
            return
        if mode == "before-write":
            raise Crash(f"write {calls[0]}: {path}")
        path = Path(path)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        yield Path(name)  # the writer fills the temporary, then the process dies before rename
        raise Crash(f"rename {calls[0]}: {path}")

    with monkeypatch.context() as m:
        for module in (rbkd.io, rbkd.engine.checkpoint, rbkd.engine.rundir):
            m.setattr(module, "atomic_path", faulty)
        yield calls


def teacher_run(run_dir: Path) -> None:
    """What `train-teacher` does: fit on hard labels, then both splits' soft labels."""
    model = build_model("mnist", "baseline", seed=0)
    fit(model, TRAIN, TEST, CFG, CrossEntropy(), run_dir=run_dir, resume=True, progress=False)
    for split, ds in (("train", TRAIN), ("test", TEST)):
        path = run_dir / f"soft_labels_{split}.safetensors"
        soft_labels_from_model(model, ds, path, teacher_run=run_dir, split=split)


TEACHER = torch.randn(len(TRAIN), 10, generator=torch.Generator().manual_seed(3)) * 3


def distill_run(run_dir: Path) -> None:
    """A distillation through rbkd.engine.fit; the noise makes the RNG replay matter."""
    model = build_model("mnist", "baseline", seed=0)
    objective = Distillation(TEACHER, 4.0, 0.7, noise="normal:0.05")
    fit(model, TRAIN, TEST, CFG, objective, run_dir=run_dir, resume=True, progress=False)


def _state(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    for row in rows:  # timings differ between runs; everything else must not
        row.pop("samples_per_s"), row.pop("epoch_time_s")
    return {"weights": load_file(run_dir / "model.safetensors"), "metrics": rows}


def _check_crash_and_resume(tmp_path, monkeypatch, run, reference, total, soft_labels):
    for mode in MODES:
        for n in range(1, total + 1):
            run_dir = tmp_path / f"{mode}-{n}"
            with faults(monkeypatch, n, mode), pytest.raises(Crash):
                run(run_dir)
            run(run_dir)  # resume, no faults
            got = _state(run_dir)
            where = f"crash {mode} write {n} of {total}"
            assert got["metrics"] == reference["metrics"], where
            for key, value in reference["weights"].items():
                assert torch.equal(got["weights"][key], value), f"{where}: {key} differs"
            left = [p.name for p in run_dir.iterdir() if p.name.endswith((".part", ".tmp"))]
            assert not left, f"{where}: temporaries left: {left}"
            if soft_labels:
                for split in ("train", "test"):
                    soft = read_teacher_soft_labels(run_dir, split)  # hash matches the weights
                    assert torch.equal(soft.logits, reference[split]), f"{where}: {split}"


def test_a_crash_at_any_write_of_a_teacher_run_then_resume_loses_nothing(tmp_path, monkeypatch):
    ref_dir = tmp_path / "reference"
    with faults(monkeypatch, None) as calls:
        teacher_run(ref_dir)
    total = calls[0]
    assert total >= 2 * CFG.epochs + 5  # config, per epoch 2, model, config, 2 soft labels
    reference = _state(ref_dir)
    for split in ("train", "test"):
        reference[split] = read_teacher_soft_labels(ref_dir, split).logits
    _check_crash_and_resume(tmp_path, monkeypatch, teacher_run, reference, total, True)


def test_a_crash_at_any_write_of_a_distillation_then_resume_loses_nothing(tmp_path, monkeypatch):
    ref_dir = tmp_path / "reference"
    with faults(monkeypatch, None) as calls:
        distill_run(ref_dir)
    reference = _state(ref_dir)
    _check_crash_and_resume(tmp_path, monkeypatch, distill_run, reference, calls[0], False)


# ------------------------------------------------------------------ full disk
def test_a_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    atomic_write_bytes(target, b"old")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(rbkd.io.os, "fsync", no_space)
        with pytest.raises(DiskFullError) as info:
            atomic_write_bytes(target, b"new")
    message = str(info.value)
    assert str(target) in message and "no space left on device" in message
    assert "free some space" in message and "\n" not in message
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["file.json"]


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill

    return apply


def _rbkd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from rbkd.cli.app import main; main()", *args]


def _env(data_root: Path) -> dict:
    return {**os.environ, "RBKD_DATA": str(data_root), "PYTHONDONTWRITEBYTECODE": "1"}


DISTILL = [
    "distill",
    "--label-smoothing",
    "0.1",
    "--dataset",
    "fashion-mnist",
    "--student",
    "baseline",
    "--device",
    "cpu",
    "--no-progress",
]


def test_a_file_size_limit_gives_one_clear_line(tmp_path, tiny_data_root):
    """RLIMIT_FSIZE stands for a full disk: the first write past 64 KB (the checkpoint) fails."""
    out = tmp_path / "run"
    result = subprocess.run(
        _rbkd(*DISTILL, "--epochs", "1", "--out", str(out)),
        env=_env(tiny_data_root),
        preexec_fn=_limit_file_size(64 << 10),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("epoch ")]  # the log, not the error
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write "), result.stderr
    assert "file too large" in lines[0] and "Traceback" not in result.stderr
    if out.exists():
        assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]


# ------------------------------------------------------------------ signals
def _sigint_default() -> None:
    """In the child, before exec: SIGINT back to its default. A suite started in the background
    (`cmd &` without job control) hands its children SIGINT ignored, and Python then never
    installs its KeyboardInterrupt handler: the run would finish instead of stopping, as a
    background job should. A terminal's Ctrl-C reaches a process with the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigterm_and_sigint_print_the_resume_command_and_the_resumed_runs_match(
    tmp_path, tiny_data, monkeypatch
):
    """Two CLI processes, stopped after their first checkpoint, one by SIGTERM and one by SIGINT
    (what Ctrl-C sends). Each prints one line with the exact command that resumes it; that
    command (run in-process, like the uninterrupted reference, to spare two interpreter starts)
    ends with the reference's weights and metrics."""
    from rbkd.cli.app import app
    from typer.testing import CliRunner

    args = [*DISTILL, "--epochs", "6", "--batch-size", "4", "--limit", "40"]
    env = _env(tiny_data)
    procs = {
        name: subprocess.Popen(
            _rbkd(*args, "--out", str(tmp_path / name)),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_sigint_default,
        )
        for name in ("SIGTERM", "SIGINT")
    }
    signals = {
        "SIGTERM": (signal.SIGTERM, 143, "SIGTERM"),
        "SIGINT": (signal.SIGINT, 130, "Ctrl-C"),
    }
    waiting = dict(signals)
    deadline = time.monotonic() + 300
    while waiting:  # each run is stopped as soon as its first checkpoint is there
        for name in list(waiting):
            if (tmp_path / name / "checkpoint.safetensors").exists():
                procs[name].send_signal(waiting.pop(name)[0])
            else:
                assert procs[name].poll() is None, procs[name].communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    commands = {}
    for name, (_, code, shown) in signals.items():
        run, proc = tmp_path / name, procs[name]
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == code, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("epoch ")]  # the epoch log
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        assert lines[0].startswith(f"Stopped: interrupted ({shown}): the checkpoint of epoch ")
        assert f"is kept in {run}; resume with: rbkd distill " in lines[0], lines[0]
        commands[name] = shlex.split(lines[0].split("resume with: ", 1)[1])
        assert commands[name][-2:] == ["--out", str(run)]
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "reference")])
    assert result.exit_code == 0, result.output
    for name, command in commands.items():
        result = runner.invoke(app, command[1:])
        assert result.exit_code == 0, result.output
        _same(tmp_path / name, tmp_path / "reference")


def _same(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after the resume"
    assert _state(a)["metrics"] == _state(b)["metrics"]
    return True
