"""Issue 15's command-line items on the tiny dataset: a student takes its teacher's --limit,
the history names its losses, unlabelled transfer sets, TensorBoard logging."""

from __future__ import annotations

import json

import pytest
from rbkd.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=160)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def report_of(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def limited_teacher(tiny_data_root, tmp_path_factory):
    """A teacher trained on the first 60 training examples (of 200)."""
    out = tmp_path_factory.mktemp("limit") / "t60"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        invoke("train-teacher", "--limit", 60, "--epochs", 1, "--batch-size", 30, "--device",
               "cpu", "--no-progress", "--out", out)  # fmt: skip
    return out


def test_distill_takes_the_teacher_runs_limit_unless_given_one(limited_teacher, tiny_data):
    base = ["distill", "--teacher", limited_teacher, "--epochs", 1, "--device", "cpu"]
    out = limited_teacher.parent / "s"
    invoke(*base, "--no-progress", "--out", out)
    report = report_of(out)
    assert report["transfer"]["size"] == 60 and report["transfer"]["split_size"] == 60
    assert json.loads((out / "config.json").read_text())["test_data"]["size"] == 60
    smaller = limited_teacher.parent / "s30"
    invoke(*base, "--limit", 30, "--no-progress", "--out", smaller)
    assert report_of(smaller)["transfer"]["size"] == 30  # told otherwise: its own
    larger = invoke(*base, "--limit", 100, "--out", limited_teacher.parent / "s100", ok=False)
    assert larger.exit_code == 1 and "covers 60 of the 100 examples" in larger.output
