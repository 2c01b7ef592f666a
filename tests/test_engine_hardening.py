"""Engine hardening (issue 9): non-finite teachers, gradients and weights; the run-folder lock;
resume against the checkpoint's own configuration; one checkpoint file; metrics rebuilt; stale
temporaries removed."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_engine import CFG, TEST, TRAIN, assert_same_weights, weights

from rbkd.engine import (
    CrossEntropy,
    Distillation,
    RunDirError,
    TrainConfig,
    TrainingDiverged,
    fit,
    read_metrics,
)
from rbkd.engine.checkpoint import read_checkpoint_info
from rbkd.locking import FolderBusyError, folder_lock
from rbkd.models import build_model

ONE = {**CFG, "epochs": 1}


def _teacher(bad_row: int | None = None, value: float = math.nan) -> torch.Tensor:
    t = torch.randn(len(TRAIN), 10, generator=torch.Generator().manual_seed(3)) * 3
    if bad_row is not None:
        t[bad_row] = value
    return t


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_teacher_row_is_refused_before_training(value):
    model = build_model("mnist", "baseline", seed=0)
    before = weights(model)
    with pytest.raises(ValueError) as info:
        fit(model, TRAIN, TEST, TrainConfig(**ONE), Distillation(_teacher(17, value), 4.0, 1.0))
    message = str(info.value)
    assert "soft labels" in message and "row 17" in message and "rbkd soft-labels" in message
    assert "learning rate" not in message and "\n" not in message
    assert_same_weights(weights(model), before)


def test_non_finite_rows_outside_the_transfer_set_are_allowed():
    """dense_logits leaves rows a partial file does not cover NaN: they are never used."""
    model = build_model("mnist", "baseline", seed=0)
    rows = torch.arange(0, 200, 2)
    out = fit(
        model,
        TRAIN,
        TEST,
        TrainConfig(**ONE),
        Distillation(_teacher(1), 4.0, 1.0),
        indices=rows,
        progress=False,
    )
    assert out["epochs"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_temperature_is_refused():
    for T in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match="temperature T must be finite"):
            Distillation(_teacher(), T, 1.0)


class _NaNGradient(CrossEntropy):
    """CE plus a term that is 0 but whose gradient is NaN: a finite loss, non-finite gradients."""

    def __call__(self, logits, labels, index):
        x = logits[:, 0] - logits[:, 0].detach()
        return F.cross_entropy(logits.float(), labels, reduction="sum") + x.abs().sqrt().sum()


def test_non_finite_gradients_stop_the_run_before_the_update(tmp_path):
    model = build_model("mnist", "baseline", seed=0)
    before = weights(model)
    with pytest.raises(TrainingDiverged) as info:
        fit(model, TRAIN, TEST, TrainConfig(**ONE), _NaNGradient(), run_dir=tmp_path)
    message = str(info.value)
    assert "gradients became" in message and "before any update" in message
    assert "learning rate" not in message
    assert_same_weights(weights(model), before)
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_overflowing_weights_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    model = build_model("mnist", "baseline", seed=0)
    cfg = {**CFG, "epochs": 1, "optimizer": "sgd", "momentum": 0.0}
    fit(model, TRAIN, TEST, TrainConfig(**cfg), CrossEntropy(), run_dir=tmp_path, progress=False)
    saved = load_file(tmp_path / "checkpoint.safetensors")
    huge = {**cfg, "epochs": 2, "lr": 1e38}
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        fit(
            model,
            TRAIN,
            TEST,
            TrainConfig(**huge),
            CrossEntropy(),
            run_dir=tmp_path / "b",
            progress=False,
        )
    assert_same_weights(load_file(tmp_path / "checkpoint.safetensors"), saved)
    assert not (tmp_path / "b" / "checkpoint.safetensors").exists()


def test_nan_weights_are_refused_before_training():
    model = build_model("mnist", "baseline", seed=0)
    with torch.no_grad():
        next(model.parameters())[0] = math.nan
    with pytest.raises(TrainingDiverged, match="before any training step"):
        fit(model, TRAIN, TEST, TrainConfig(**ONE), CrossEntropy(), progress=False)


_HOLD_LOCK = """
import sys, time
from rbkd.locking import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = build_model("mnist", "baseline", seed=0)
        with pytest.raises(FolderBusyError, match=f"pid {holder.pid}"):
            fit(model, TRAIN, TEST, TrainConfig(**ONE), CrossEntropy(), run_dir=tmp_path)
        assert not (tmp_path / "config.json").exists(), "the refused run wrote into the folder"
    finally:
        holder.kill()  # SIGKILL: the kernel releases the flock
        holder.wait()
    model = build_model("mnist", "baseline", seed=0)
    out = fit(
        model, TRAIN, TEST, TrainConfig(**ONE), CrossEntropy(), run_dir=tmp_path, progress=False
    )
    assert out["epochs"] == 1


def _run(run_dir, epochs, resume=False, seed=CFG["seed"]):
    model = build_model("mnist", "baseline", seed=0)
    cfg = TrainConfig(**{**CFG, "epochs": epochs, "seed": seed})
    fit(model, TRAIN, TEST, cfg, CrossEntropy(), run_dir=run_dir, resume=resume, progress=False)
    return model


def test_resume_is_checked_against_the_checkpoint_not_config_json(tmp_path):
    """The issue's case: config.json says seed 0 (run A), the checkpoint was written by run B
    with seed 1. A resume with A's options must refuse B's checkpoint."""
    _run(tmp_path, 1, seed=1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["seed"] = 0
    config["train_config"]["seed"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match="seed was 1 \\(in the checkpoint\\), now 0"):
        _run(tmp_path, 2, resume=True, seed=0)
    assert read_checkpoint_info(tmp_path)["epoch"] == 1


def test_metrics_rows_are_rebuilt_from_the_checkpoint_on_resume(tmp_path):
    """A kill between the checkpoint and metrics.jsonl writes left the issue's run with epochs
    1 and 3 only; the checkpoint now carries every row."""
    _run(tmp_path, 2)
    rows = read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # epoch 2's row lost
    _run(tmp_path, 3, resume=True)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path)[1]["train_objective_loss"] == rows[1]["train_objective_loss"]


def test_resume_after_a_kill_between_checkpoint_and_metrics_gives_identical_weights(tmp_path):
    full = _run(tmp_path / "full", 3)
    _run(tmp_path / "cut", 2)
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    resumed = _run(tmp_path / "cut", 3, resume=True)
    assert_same_weights(weights(resumed), weights(full))


def test_stale_temporaries_are_removed_when_the_run_folder_is_opened(tmp_path):
    _run(tmp_path, 1)
    stale = [
        tmp_path / ".checkpoint.safetensors.a1b2c3d4.part",
        tmp_path / ".metrics.jsonl.zz9_x8y7.part",
        tmp_path / ".model.safetensors.abcdefgh.tmp",
    ]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    keep = [tmp_path / "notes.part", tmp_path / ".hidden"]
    for path in keep:
        path.write_text("mine")
    _run(tmp_path, 2, resume=True)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


def test_an_old_two_file_checkpoint_is_still_resumed(tmp_path):
    full = _run(tmp_path / "full", 2)
    _run(tmp_path / "old", 1)
    path = tmp_path / "old" / "checkpoint.safetensors"
    meta = read_checkpoint_info(tmp_path / "old")
    save_file(load_file(path), str(path), metadata={"epoch": "1", "format": "rbkd-checkpoint-1"})
    old = {"epoch": 1, "optimizer": meta["optimizer"], "seed": meta["seed"], "world_size": 1}
    (tmp_path / "old" / "checkpoint.json").write_text(json.dumps(old))
    resumed = _run(tmp_path / "old", 2, resume=True)
    assert_same_weights(weights(resumed), weights(full))
    assert not (tmp_path / "old" / "checkpoint.json").exists()


def test_a_fifo_checkpoint_is_an_error_not_a_hang(tmp_path):
    _run(tmp_path, 1)
    (tmp_path / "checkpoint.safetensors").unlink()
    os.mkfifo(tmp_path / "checkpoint.safetensors")
    with pytest.raises(RunDirError, match="checkpoint.safetensors is a FIFO"):
        _run(tmp_path, 2, resume=True)


class _NaNLoss(CrossEntropy):
    """A loss that is NaN from the first step: the inputs or the objective, never the lr."""

    def __call__(self, logits, labels, index):
        return super().__call__(logits, labels, index) * math.nan


def test_a_loss_that_is_nan_before_any_update_does_not_blame_the_learning_rate():
    model = build_model("mnist", "baseline", seed=0)
    with pytest.raises(TrainingDiverged) as info:
        fit(model, TRAIN, TEST, TrainConfig(**ONE), _NaNLoss(), progress=False)
    message = str(info.value)
    assert "before any update" in message and "learning rate" not in message
    assert "epoch 1, step 1/" in message


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_fifo_or_dev_zero_in_a_run_folder_is_an_error_naming_the_file(tmp_path, name, kind):
    from rbkd.engine import load_run

    _run(tmp_path, 1)
    path = tmp_path / name
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(ValueError) as info:
        load_run(tmp_path)
    message = str(info.value)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert f"{path} is {what}, not a regular file" in message and "\n" not in message


def test_an_oversized_config_json_is_refused(tmp_path):
    from rbkd.engine import read_config

    _run(tmp_path, 1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["extra_config"] = {"note": "x" * (9 << 20)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match="larger than 8 MiB"):
        read_config(tmp_path)


def test_oversized_model_metadata_is_refused(tmp_path):
    from rbkd.engine import load_run

    _run(tmp_path, 1)
    path = tmp_path / "model.safetensors"
    save_file(load_file(path), str(path), metadata={"arch": "baseline", "x": "y" * 100_000})
    with pytest.raises(RunDirError, match="metadata"):
        load_run(tmp_path)


def test_a_failure_under_the_lock_of_a_new_folder_leaves_nothing_behind(tmp_path):
    new, kept, used = tmp_path / "new", tmp_path / "kept", tmp_path / "used"
    kept.mkdir()
    for folder in (new, kept, used):
        with pytest.raises(ValueError), folder_lock(folder):
            if folder is used:
                (folder / "config.json").write_text("{}")  # work began: the folder stays
            raise ValueError("bad input found under the lock")
    assert not new.exists()  # made by the lock, nothing written: gone
    assert sorted(p.name for p in kept.iterdir()) == [".rbkd.lock"]  # the user's folder stays
    assert (used / "config.json").exists()
    with folder_lock(new):  # success keeps what the lock made
        pass
    assert new.is_dir()
