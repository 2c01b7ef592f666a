"""Train a teacher, once: a content-addressed run folder with its soft labels. The one
implementation of the verb: `rbkd train-teacher`, a study's teachers and `rbkd.train_teacher`.

The run's key hashes the data, the capacity and every training input that changes the numbers.
Asking again for a teacher that is done trains nothing; asking for one that was killed resumes it
from its last epoch checkpoint; the soft labels of both splits are (re)written from the final
weights whenever they are missing or do not belong to them.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from rbkd.config import TeacherSpec, TrainConfig
from rbkd.engine import CrossEntropy, fit
from rbkd.engine.distributed import main_folder_lock, on_main
from rbkd.engine.rundir import check_run_folder
from rbkd.io import write_json
from rbkd.models import build_model
from rbkd.provenance import recording, teacher_command
from rbkd.soft_label_file import (
    SPLITS,
    SoftLabelsError,
    read_teacher_soft_labels,
    soft_labels_from_model,
)
from rbkd.study.keys import data_fingerprint, teacher_dir_name, teacher_key
from rbkd.study.runstate import RunState, run_state
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


def split_limit(train, test) -> tuple[bool, int | None]:
    """(whether `train` and `test` are rbkd's own files as `--limit N` loads them, that N): a
    prefix of each split of a dataset rbkd read, from the same folder, cut at the same N."""
    from rbkd.data.registry import DATASETS

    if test is None or train.root is None or (train.split, test.split) != ("train", "test"):
        return False, None
    if train.name not in DATASETS or (test.name, test.root) != (train.name, train.root):
        return False, None
    a, b = len(train), len(test)
    if a == b:  # --limit a cuts both to a (or the files hold a rows each)
        return True, a
    # Cut at max(a, b), the shorter split must be its whole file.
    shorter = "test" if b < a else "train"
    return _split_size(train.name, shorter, str(train.root)) == min(a, b), max(a, b)


@functools.cache
def _split_size(name: str, split: str, root: str) -> int:
    from rbkd.data import load_dataset

    return len(load_dataset(name, split, root))


def model_identity(model, dataset: str, arch: str, seed: int):
    """(the model to train, what names it in the run's key). rbkd's own model `arch`, as built
    for `dataset` from `seed` (`model` None, or such a model untouched), is named by the key's
    inputs already: None. Any other module by its class, size and initial weights' SHA-256."""
    from rbkd.engine.runinfo import describe_model
    from rbkd.soft_label_file import state_dict_sha256

    if model is None:
        return build_model(dataset, arch, seed=seed), None
    if (getattr(model, "dataset", None), getattr(model, "arch", None)) == (dataset, arch):
        built = build_model(dataset, arch, seed=seed)
        if state_dict_sha256(model) == state_dict_sha256(built):
            return model, None
    return model, {**describe_model(model), "initial_state_sha256": state_dict_sha256(model)}


def repeat_record(invocation: dict | None, command: dict | None) -> dict | None:
    """config.json's record of how to repeat a run: the equivalent command (when the run has
    one), with what the caller records (the Python API's call and arguments) beside it."""
    if command is None:
        return invocation
    invocation = {k: v for k, v in (invocation or {}).items() if k != "unrepeatable"}
    return {**command, "made_by": invocation.get("api", "rbkd study run"), **invocation}


def train_teacher(
    spec: TeacherSpec,
    cfg: TrainConfig,
    *,
    out: Path | None = None,
    root: Path | None = Path("runs"),
    data_dir: Path | None = None,
    limit: int | None = None,
    splits=None,
    progress: bool = True,
    model=None,
    resume: bool | None = None,
    on_epoch=None,
    callbacks=(),
    extra: dict | None = None,
    invocation: dict | None = None,
) -> dict[str, Any]:
    """Train (or reuse, or resume) a teacher: the one implementation behind `rbkd
    train-teacher`, a study's teachers and `rbkd.train_teacher`. Returns its result: run_dir,
    key, metrics, soft-label paths, wall time, and `reused` (True when nothing was trained).

    `model`: a module of the user's own (default: rbkd's `spec.capacity`, built from the seed).
    Without `out`, and `root` None, nothing is written. `resume` None: content-addressed (a
    finished run with the same key is reused, a killed one resumed, another refused); True or
    False: fit's own rule (the Python API: resume=False refuses a folder holding a run).
    `invocation`: how to repeat the run (config.json's provenance), when no command line is
    recorded already; by default the equivalent `rbkd train-teacher` where there is one.
    `on_epoch` and `callbacks`: fit's (per-epoch hooks; a run reused as done calls neither)."""
    if model is None:
        spec.check()
    train, test = splits if splits is not None else load_splits(spec.dataset, data_dir, limit)
    if train.name != spec.dataset:
        raise ValueError(f"the data is {train.name}, the teacher is for {spec.dataset}")
    model, model_id = model_identity(model, spec.dataset, spec.capacity, cfg.seed)
    key = teacher_key(spec, cfg, data_fingerprint(train, test), model_id)
    if out is not None:
        run_dir = Path(out)
    elif root is not None and model_id is None:
        run_dir = Path(root) / teacher_dir_name(spec, cfg, key)
    else:
        run_dir = None
    rbkd_files, cut = split_limit(train, test)
    if model_id is None and rbkd_files:  # the same run as an `rbkd train-teacher` command
        command = teacher_command(spec, cfg, data_dir=train.root, limit=cut, out=run_dir)
        invocation = repeat_record(invocation, command)
    extra = {"command": "train-teacher", "capacity": spec.capacity, "limit": limit,
             "key": key, **(extra or {})}  # fmt: skip
    fit_args = dict(progress=progress, extra_config=extra, on_epoch=on_epoch, callbacks=callbacks)
    if run_dir is None:  # nothing written: the Python API without out=
        with recording(invocation):
            metrics = fit(model, train, test, cfg, CrossEntropy(), **fit_args)
        return {"key": key, "kind": "teacher", "metrics": metrics, "soft_labels": {},
                "run_dir": None, "reused": False}  # fmt: skip
    # Under torchrun every rank runs this; rank 0 alone locks the folder and writes in it, and
    # hands the others what it found and wrote, so that all take the same path.
    with main_folder_lock(run_dir, "teacher", cfg.device, claim=check_run_folder) as ctx:
        if resume is None:
            state, current = on_main(ctx, lambda: _state(run_dir, key))
        else:
            state, current = RunState(run_dir, key, "new"), False
        if state.status == "done" and current:
            # The recorded paths are relative to the folder the run was made from: name the
            # files under run_dir as given now (the same run asked for from another folder).
            files = {
                s: str(run_dir / f"soft_labels_{s}.safetensors")
                for s in state.result.get("soft_labels", {})
            }
            return {**state.result, "soft_labels": files, "run_dir": run_dir, "reused": True}
        t0 = time.perf_counter()
        with recording(invocation):
            metrics = fit(
                model,
                train,
                test,
                cfg,
                CrossEntropy(),
                run_dir=run_dir,
                # content-addressed: the key matched, so a checkpoint here is this very run's
                resume=True if resume is None else resume,
                **fit_args,
            )

        def finish() -> dict[str, Any]:
            files = {}
            for split, ds in zip(SPLITS, (train, test), strict=True):
                if ds is None:
                    continue
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
