"""A partial run's completed epochs come from its checkpoint, which is what fit resumes from:
a kill between the checkpoint write and the metrics line leaves metrics.jsonl one line short,
and result.json then reported the wrong `resumed_from_epoch` (issue 13, noticed under torchrun)."""

from __future__ import annotations

import json

from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.study.runstate import run_state


def test_epochs_done_is_the_checkpoints_not_the_metrics_lines(tiny_data, tmp_path):
    out = tmp_path / "t1"
    result = CliRunner().invoke(
        app,
        ["train-teacher", "--dataset", "fashion-mnist", "--capacity", "small", "--epochs", "2",
         "--batch-size", "50", "--limit", "100", "--device", "cpu", "--no-progress",
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    key = json.loads((out / "config.json").read_text())["extra_config"]["key"]
    (out / "result.json").unlink()  # the run as a kill after epoch 2's checkpoint leaves it
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    (out / "metrics.jsonl").write_text(lines[0] + "\n")  # the second line never written
    state = run_state(out, key, "result.json")
    assert state.status == "partial" and state.epochs_done == 2
    (out / "checkpoint.safetensors").unlink()  # no checkpoint: the metrics lines are all there is
    assert run_state(out, key, "result.json").epochs_done == 1
