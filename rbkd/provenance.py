"""Where a run came from: the command, the code, the machine and the data files it read.

config.json's "provenance" field, written by `fit`. None of it is part of a run's key
(rbkd.study.keys): the device, the thread count, the command line and the commit do not change
what a run computes, so the same run asked for in another way is still reused. Nothing here is
compared when a run resumes (rbkd.engine.runinfo.check_resumable).

Torch is imported inside the functions that need it, so the command line can import this module
for free.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import rbkd
from rbkd.data.locate import resolve_file
from rbkd.data.registry import get_info
from rbkd.io import sha256_file

GIT_TIMEOUT_S = 2.0  # a hung network filesystem must not hold up a training run

# The command lines running now (the CLI pushes one for the span of each command, innermost
# last): functions, so the options are read when a run starts, after click has resolved them all.
invocation_describers: list[Callable[[], dict[str, Any]]] = []


def push_invocation(describe: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    """Until the returned function is called, every run written records `describe()` as its
    invocation (innermost first: a command run by `rbkd rerun` records its own)."""
    invocation_describers.append(describe)
    return lambda: (
        invocation_describers.remove(describe) if describe in invocation_describers else None
    )


def recorded_invocation(config: Any) -> dict[str, Any] | None:
    """The invocation a run's config.json records ({"command", "options", ...}), or None when it
    records none (written by the Python API, by `rbkd study run` or by an older rbkd)."""
    provenance = config.get("provenance") if isinstance(config, dict) else None
    invocation = provenance.get("invocation") if isinstance(provenance, dict) else None
    if isinstance(invocation, dict) and isinstance(invocation.get("options"), dict):
        return invocation
    return None


def current_invocation() -> dict[str, Any] | None:
    """The invocation being recorded (the innermost), or None outside the command line."""
    return invocation_describers[-1]() if invocation_describers else None


# ------------------------------------------------------------------ code
@cache
def git_state() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout rbkd runs from, or None (an installed wheel, no
    git, a timeout). Cached: the checkout does not change under a running process."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # Untracked files are left out: they are not rbkd's code (runs/, results/, notes).
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


# ------------------------------------------------------------------ data files
_digests: dict[tuple[str, int, int], str] = {}


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """{"path", "size", "sha256"} of a file. Digests are cached by (path, size, mtime), so the
    ten runs of an experiment hash Fashion-MNIST's 30 MB once."""
    path = Path(os.path.abspath(path))
    st = path.stat()
    cache_key = (str(path), st.st_size, st.st_mtime_ns)
    if cache_key not in _digests:
        _digests[cache_key] = sha256_file(path)
    return {"path": str(path), "size": st.st_size, "sha256": _digests[cache_key]}


def dataset_files(dataset: Any) -> list[dict[str, Any]]:
    """The files one split was read from (an ImageDataset knows its folder); [] for data that
    did not come from rbkd's dataset files."""
    root, name, split = (getattr(dataset, a, None) for a in ("root", "name", "split"))
    if root is None or name is None or split is None:
        return []
    try:
        names = get_info(name).split_files[split]
    except (KeyError, ValueError, LookupError):
        return []
    paths = [resolve_file(Path(root), n) for n in names]
    return [{"split": split, **file_record(p)} for p in paths if p is not None]


# ------------------------------------------------------------------ machine
def device_name(device: Any) -> str:
    """ "cpu", or "cuda:0 (NVIDIA H200)": the device a run actually used, never "auto"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def machine() -> dict[str, Any]:
    import torch

    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------ all of it
def run_provenance(device: Any, model: Any, datasets: tuple = ()) -> dict[str, Any]:
    """config.json's "provenance": rbkd's version and commit, the device and dtype used, the
    machine, the data files with their SHA-256, and the command line when there is one."""
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    dtype = str(params[0].dtype).removeprefix("torch.") if params else None
    files: list[dict[str, Any]] = []
    for dataset in datasets:
        for record in dataset_files(dataset):
            if record not in files:  # train and test may share a file (CIFAR's are separate)
                files.append(record)
    record = {
        "rbkd_version": rbkd.__version__,
        "device": device_name(device),
        "dtype": dtype,
        **machine(),
        "data_files": files,
    }
    git = git_state()
    if git is not None:
        record["git"] = git
    invocation = current_invocation()
    if invocation is not None:
        record["invocation"] = invocation
    return record


# ------------------------------------------------------------------ how to repeat a run
@contextlib.contextmanager
def recording(invocation: dict[str, Any] | None) -> Iterator[None]:
    """Record `invocation` for the runs written in the block, unless a command line is already
    recorded (a command's own record wins: `rbkd experiment` runs repeat the experiment)."""
    if invocation is None or current_invocation() is not None:
        yield
        return
    pop = push_invocation(lambda: invocation)
    try:
        yield
    finally:
        pop()


def _path(value: Any) -> str | None:
    return None if value is None else os.path.abspath(value)


def _train_options(cfg: Any) -> dict[str, Any] | None:
    """The TrainConfig as the training commands' options; None when it holds a value no option
    sets (momentum, weight decay or the evaluation batch size changed through the Python API)."""
    from rbkd.config import TrainConfig

    default = TrainConfig()
    if any(getattr(cfg, k) != getattr(default, k) for k in _NO_OPTION):
        return None
    return {
        k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "optimizer", "seed", "device")
    }


_NO_OPTION = ("momentum", "weight_decay", "eval_batch_size")


def teacher_command(spec: Any, cfg: Any, *, data_dir: Any, limit: int | None, out: Any):
    """The `rbkd train-teacher` invocation that makes the same teacher (a study cell's, or an
    rbkd model trained through the Python API on rbkd's files); None when there is none."""
    options = _train_options(cfg)
    if options is None:
        return None
    options.update(
        dataset=spec.dataset,
        capacity=spec.capacity,
        data_dir=_path(data_dir),
        limit=limit,
        out=_path(out),
        progress=False,
    )
    return {"command": "train-teacher", "options": options, "cwd": os.getcwd()}


def distill_command(spec: Any, cfg: Any, *, data_dir: Any, out: Any, soft_labels: Any = None):
    """The `rbkd distill` invocation that makes the same student (a study cell's, or an rbkd
    student distilled through the Python API on rbkd's files); None when there is none.
    `soft_labels`: the file the student learnt from, when the spec names no teacher run."""
    options = _train_options(cfg)
    if options is None:
        return None
    loss = spec.loss
    options.update(
        teacher=_path(spec.teacher),
        soft_labels=_path(spec.soft_labels if soft_labels is None else soft_labels),
        label_smoothing=spec.label_smoothing,
        dataset=spec.dataset,
        T=spec.T,
        alpha=spec.alpha,
        t_squared=spec.t_squared,
        divergence=loss.divergence,
        beta=loss.beta,
        skew=loss.skew,
        dkd_alpha=loss.dkd_alpha,
        dkd_beta=loss.dkd_beta,
        standardize=loss.standardize,
        student=spec.student,
        exclude_class=list(spec.exclude_classes),
        per_class=spec.per_class,
        select=spec.select,
        noise=spec.noise,
        data_dir=_path(data_dir),
        limit=spec.limit,
        allow_partial=spec.allow_partial,
        unlabelled=spec.unlabelled,
        out=_path(out),
        progress=False,
    )
    if options["teacher"] is not None:
        options["soft_labels"] = None
    return {"command": "distill", "options": options, "cwd": os.getcwd()}
