"""Train a thesis teacher, once: a content-addressed run folder with its soft labels.

The run's key hashes the data, the capacity and every training input that changes the numbers.
Asking again for a teacher that is done trains nothing; asking for one that was killed resumes it
from its last epoch checkpoint; the soft labels of both splits are (re)written from the final
weights whenever they are missing or do not belong to them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rbkd.config import TeacherSpec, TrainConfig
from rbkd.engine import CrossEntropy, fit
from rbkd.engine.distributed import main_folder_lock, on_main
from rbkd.engine.rundir import check_run_folder
from rbkd.io import write_json
from rbkd.models import build_model
from rbkd.softlabels import (
    SPLITS,
    SoftLabelsError,
    read_teacher_soft_labels,
    soft_labels_from_model,
)
from rbkd.study.keys import data_fingerprint, teacher_dir_name, teacher_key
from rbkd.study.runstate import run_state
from rbkd.study.splits import load_splits

RESULT_FILE = "result.json"


def _soft_labels_current(run_dir: Path) -> bool:
    """Both soft-label files exist and were made from the final model.safetensors."""
    try:
        for split in SPLITS:
            read_teacher_soft_labels(run_dir, split)
    except (SoftLabelsError, OSError):
        return False
    return True


def _state(run_dir: Path, key: str):
    """(the run's state, whether its soft labels belong to its final weights)."""
    state = run_state(run_dir, key, RESULT_FILE)
    return state, state.status == "done" and _soft_labels_current(run_dir)


def train_teacher(
    spec: TeacherSpec,
    cfg: TrainConfig,
    *,
    out: Path | None = None,
    root: Path = Path("runs"),
    data_dir: Path | None = None,
    limit: int | None = None,
    splits=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse, or resume) the teacher; returns its result: run_dir, key, metrics,
    soft-label paths, wall time, and `reused` (True when nothing was trained)."""
    spec.check()
    train, test = splits if splits is not None else load_splits(spec.dataset, data_dir, limit)
    if train.name != spec.dataset:
        raise ValueError(f"the data is {train.name}, the teacher is for {spec.dataset}")
    key = teacher_key(spec, cfg, data_fingerprint(train, test))
    run_dir = Path(out) if out is not None else Path(root) / teacher_dir_name(spec, cfg, key)
    # Under torchrun every rank runs this; rank 0 alone locks the folder and writes in it, and
    # hands the others what it found and wrote, so that all take the same path.
    with main_folder_lock(run_dir, "teacher", cfg.device, claim=check_run_folder) as ctx:
        state, current = on_main(ctx, lambda: _state(run_dir, key))
        if state.status == "done" and current:
            # The recorded paths are relative to the folder the run was made from: name the
            # files under run_dir as given now (the same run asked for from another folder).
            files = {
                s: str(run_dir / f"soft_labels_{s}.safetensors")
                for s in state.result.get("soft_labels", {})
            }
            return {**state.result, "soft_labels": files, "run_dir": run_dir, "reused": True}
        t0 = time.perf_counter()
        model = build_model(spec.dataset, spec.capacity, seed=cfg.seed)
        extra = {
            "command": "train-teacher",
            "capacity": spec.capacity,
            "limit": limit,
            "key": key,
        }
        metrics = fit(
            model,
            train,
            test,
            cfg,
            CrossEntropy(),
            run_dir=run_dir,
            resume=True,  # the key matched: a checkpoint here is this very run's
            progress=progress,
            extra_config=extra,
        )

        def finish() -> dict[str, Any]:
            files = {}
            for split, ds in zip(SPLITS, (train, test), strict=True):
                files[split] = soft_labels_from_model(
                    model,
                    ds,
                    run_dir / f"soft_labels_{split}.safetensors",
                    teacher_run=run_dir,
                    split=split,
                    device=cfg.device,
                    batch_size=cfg.eval_batch_size,
                )
            result = {
                "key": key,
                "kind": "teacher",
                "dataset": spec.dataset,
                "capacity": spec.capacity,
                "train_config": cfg.result_inputs(),
                "limit": limit,
                "metrics": metrics,
                "epochs": metrics.get("epochs"),
                "soft_labels": {k: str(v) for k, v in files.items()},
                "wall_time_s": time.perf_counter() - t0,
                "resumed_from_epoch": state.epochs_done,
            }
            write_json(run_dir / RESULT_FILE, result)  # last: the mark of a finished run
            return result

        result = on_main(ctx, finish)
    return {**result, "run_dir": run_dir, "reused": False}
