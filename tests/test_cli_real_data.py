"""A short run on the real Fashion-MNIST (skipped where Debian's dataset-fashion-mnist files are
not installed): a small teacher for 1 epoch on the first 2,000 images of each split, then a
general student distilled from it at T=9. About a minute on 2 CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rbkd.cli.app import app
from typer.testing import CliRunner

REAL = Path("/usr/share/datasets")
pytestmark = pytest.mark.skipif(
    not (REAL / "fashion-mnist").is_dir(),
    reason="real Fashion-MNIST not installed (/usr/share/datasets/fashion-mnist)",
)
COMMON = ["--data-dir", str(REAL), "--limit", "2000", "--device", "cpu", "--no-progress"]


def test_real_fashion_mnist_teacher_then_student(tmp_path):
    runner = CliRunner()
    teacher, student = tmp_path / "t", tmp_path / "s"
    result = runner.invoke(
        app,
        [
            "train-teacher",
            "--capacity",
            "small",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--out",
            str(teacher),
            *COMMON,
        ],
    )
    assert result.exit_code == 0, result.output
    teacher_acc = json.loads((teacher / "config.json").read_text())["final_metrics"]
    assert teacher_acc["test_accuracy"] > 0.6, result.output

    result = runner.invoke(
        app,
        [
            "distill",
            "--teacher",
            str(teacher),
            "--T",
            "9",
            "--student",
            "general",
            "--epochs",
            "4",
            "--batch-size",
            "64",
            "--out",
            str(student),
            *COMMON,
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((student / "report.json").read_text())
    assert report["transfer"]["size"] == 2000
    assert report["test_accuracy"] > 0.6, result.output  # chance is 10%
