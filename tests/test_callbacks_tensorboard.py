"""Issue 15: per-epoch callbacks (`callbacks=[fn]`, `rbkd.StopTraining`) and TensorBoard logging
(`tensorboard=DIR`, `--tensorboard DIR`), with a fake SummaryWriter recording what is logged, the
one-line error without the tensorboard package, and the real writer where it is installed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from rbkd.cli.app import app
from torch import nn
from typer.testing import CliRunner

import rbkd
from rbkd.engine import callbacks as cb
from rbkd.engine.callbacks import MISSING_TENSORBOARD

FEATURES, CLASSES = 12, 4
FAST = {"batch_size": 32, "lr": 0.01, "device": "cpu"}
SCALARS = {"train_objective_loss", "train_ce_loss", "train_accuracy", "test_ce_loss",
           "test_accuracy", "samples_per_s", "epoch_time_s", "lr"}  # fmt: skip
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(99)) * 3
    return centres[y] + torch.randn(n, FEATURES, generator=g), y


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


class FakeWriter:
    """SummaryWriter's surface that TensorBoardLogger uses, recording every call."""

    made: list[FakeWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.flushes, self.closed = log_dir, [], 0, False
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        assert isinstance(value, float) and isinstance(step, int)
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_writer(monkeypatch):
    FakeWriter.made = []
    monkeypatch.setattr(cb, "require_tensorboard", lambda: FakeWriter)
    return FakeWriter


@pytest.fixture
def no_tensorboard(monkeypatch):
    """As if the tensorboard package were not installed (a None entry fails its import)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------ callbacks
def test_callbacks_see_every_epochs_row_with_lr():
    seen: list[dict] = []
    result = rbkd.train_teacher(
        mlp(), blobs(64, 0), blobs(32, 1), epochs=3, callbacks=[seen.append], **FAST
    )
    assert [r["epoch"] for r in seen] == [1, 2, 3]
    for record, row in zip(seen, result.history, strict=True):
        assert record["lr"] == 0.01
        assert {k: v for k, v in record.items() if k != "lr"} == row
    assert "lr" not in result.history[0]  # the metrics rows themselves are unchanged


def test_stop_training_ends_after_that_epoch_keeping_the_checkpoint(tmp_path):
    calls: list[int] = []

    def stop_at_two(record: dict) -> str:
        calls.append(record["epoch"])
        if record["epoch"] == 2:
            raise rbkd.StopTraining
        return "ignored"

    out = tmp_path / "run"
    result = rbkd.distill(mlp(1), blobs(64, 0), blobs(32, 1), teacher=mlp(2), epochs=5,
                          callbacks=[stop_at_two], out=out, **FAST)  # fmt: skip
    assert calls == [1, 2]
    assert result.epochs == 2 and len(result.history) == 2
    assert math.isfinite(result.test_accuracy)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()
    info = rbkd.engine.read_config(out)
    assert info["final_metrics"]["epochs"] == 2


def test_every_callback_sees_the_epoch_even_after_one_asks_to_stop():
    later: list[int] = []

    def stop(record):
        raise rbkd.StopTraining

    rbkd.train_teacher(mlp(), blobs(64, 0), epochs=4, callbacks=[stop, lambda r: later.append(r["epoch"])], **FAST)  # fmt: skip
    assert later == [1]


def test_another_exception_from_a_callback_ends_the_run_with_it():
    def boom(record):
        raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        rbkd.train_teacher(mlp(), blobs(64, 0), epochs=3, callbacks=[boom], **FAST)


def test_a_callback_that_is_not_a_function_is_one_line():
    with pytest.raises(ValueError, match=r"callbacks\[1\] is a int, not a function"):
        rbkd.train_teacher(mlp(), blobs(64, 0), epochs=1, callbacks=[print, 3], **FAST)


def test_callbacks_run_on_rank_0_only_and_every_rank_learns_of_a_stop():
    from rbkd.engine.loop import _stop_requested

    class Ctx:
        def __init__(self, rank: int):
            self.is_main, self.world_size, self.device = rank == 0, 2, torch.device("cpu")

        def all_reduce_sum(self, t):  # the other rank's vote: rank 0 stops
            return t + (0.0 if self.is_main else 1.0)

    calls: list[dict] = []

    def stop(record):
        calls.append(record)
        raise rbkd.StopTraining

    opt = torch.optim.SGD(mlp().parameters(), lr=0.5)
    assert _stop_requested([stop], {"epoch": 1}, opt, Ctx(rank=1)) is True
    assert calls == []  # rank 1 never calls them
    assert _stop_requested([stop], {"epoch": 1}, opt, Ctx(rank=0)) is True
    assert calls == [{"epoch": 1, "lr": 0.5}]


# ------------------------------------------------------------------ TensorBoard, Python API
def test_tensorboard_logs_each_epochs_scalars(fake_writer, tmp_path):
    result = rbkd.distill(mlp(1), blobs(64, 0), blobs(32, 1), teacher=mlp(2), epochs=2,
                          tensorboard=tmp_path / "tb", **FAST)  # fmt: skip
    (writer,) = fake_writer.made
    assert writer.log_dir == str(tmp_path / "tb") and writer.closed and writer.flushes == 2
    assert {tag for tag, _, _ in writer.scalars} == SCALARS
    for row in result.history:
        logged = {tag: v for tag, v, step in writer.scalars if step == row["epoch"]}
        assert logged == {**{k: row[k] for k in SCALARS - {"lr"}}, "lr": 0.01}


def test_tensorboard_leaves_out_nan_scalars(fake_writer, tmp_path):
    rbkd.train_teacher(mlp(), blobs(64, 0), epochs=1, tensorboard=tmp_path / "tb", **FAST)
    tags = {tag for tag, _, _ in fake_writer.made[0].scalars}
    assert tags == SCALARS - {"test_ce_loss", "test_accuracy"}  # no test split: NaN


def test_without_tensorboard_the_api_is_one_line_before_training(no_tensorboard, tmp_path):
    seen: list[dict] = []
    for call in (
        lambda: rbkd.train_teacher(mlp(), blobs(64, 0), epochs=1, callbacks=[seen.append],
                                   tensorboard=tmp_path / "tb", out=tmp_path / "t", **FAST),
        lambda: rbkd.distill(mlp(), blobs(64, 0), teacher=mlp(2), epochs=1,
                             callbacks=[seen.append], tensorboard=tmp_path / "tb",
                             out=tmp_path / "s", **FAST),
    ):  # fmt: skip
        with pytest.raises(ImportError) as caught:
            call()
        assert str(caught.value) == MISSING_TENSORBOARD
    assert "pip install tensorboard" in MISSING_TENSORBOARD
    assert seen == [] and not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the tensorboard package is not installed")
def test_the_real_summary_writer_writes_an_event_file(tmp_path):
    rbkd.train_teacher(mlp(), blobs(64, 0), blobs(32, 1), epochs=2,
                       tensorboard=tmp_path / "tb", **FAST)  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("test_accuracy")]
    assert steps == [1, 2] and "lr" in events.Tags()["scalars"]


# ------------------------------------------------------------------ TensorBoard, command line
def test_cli_tensorboard_on_train_teacher_and_distill(tiny_data, fake_writer, tmp_path):
    cli = CliRunner()
    teacher, student = tmp_path / "t", tmp_path / "s"
    common = ["--epochs", "2", "--batch-size", "30", "--device", "cpu", "--no-progress"]
    done = cli.invoke(app, ["train-teacher", "--limit", "60", *common, "--out", str(teacher),
                            "--tensorboard", str(tmp_path / "tb_t")])  # fmt: skip
    assert done.exit_code == 0, done.output + repr(done.exception)
    done = cli.invoke(app, ["distill", "--teacher", str(teacher), *common, "--out", str(student),
                            "--tensorboard", str(tmp_path / "tb_s")])  # fmt: skip
    assert done.exit_code == 0, done.output + repr(done.exception)
    for writer, run in zip(fake_writer.made, (teacher, student), strict=True):
        assert writer.closed and {tag for tag, _, _ in writer.scalars} == SCALARS
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged = [(v, s) for tag, v, s in writer.scalars if tag == "train_objective_loss"]
        assert logged == [(r["train_objective_loss"], r["epoch"]) for r in rows]
    assert [w.log_dir for w in fake_writer.made] == [str(tmp_path / "tb_t"), str(tmp_path / "tb_s")]


def test_cli_tensorboard_option_is_in_the_help():
    for command in ("train-teacher", "distill"):
        done = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        assert "--tensorboard" in done.output


@pytest.mark.parametrize("command", ["train-teacher", "distill"])
def test_cli_without_tensorboard_is_a_usage_error_before_training(command, tmp_path):
    """`rbkd <command> --tensorboard DIR` in a fresh interpreter where tensorboard cannot load."""
    source = ["--label-smoothing", "0.1"] if command == "distill" else []  # no teacher needed
    args = [command, *source, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"),
            "--tensorboard", str(tmp_path / "tb")]  # fmt: skip
    code = (
        "import sys, runpy; sys.modules['tensorboard'] = None\n"
        f"sys.argv = ['rbkd', *{args!r}]\nrunpy.run_module('rbkd', run_name='__main__')"
    )
    env = {**os.environ, "RBKD_DATA": str(tmp_path / "no-data")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    expected = f"Error: --tensorboard: {MISSING_TENSORBOARD} (see `rbkd {command} -h`)"
    assert errors == [expected], proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
