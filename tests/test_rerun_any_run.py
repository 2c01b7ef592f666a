"""`rbkd rerun` on every kind of run folder: a study's cells and the Python API's `out=` runs
repeat to the same weights and metrics as the CLI's own runs do (tests/test_config_files.py);
a run no command can repeat says why in one line."""

from __future__ import annotations

import json

import pytest
import torch
from rbkd.cli.app import app
from torch import nn
from typer.testing import CliRunner

import rbkd
from rbkd.data import load_dataset
from rbkd.study import load_study, run_study

runner = CliRunner()

STUDY = """
[study]
name = "cells"
seeds = [0]
limit = 120

[student]
epochs = 1
batch_size = 40

[[teacher]]
name = "small"
capacity = "small"
epochs = 1
batch_size = 40

[experiments.temperature]
T = [9]
student = "baseline"
"""


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=160)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def config_of(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def assert_reproduced(run_dir, again) -> None:
    result = invoke("rerun", run_dir, "--out", again, "--json", "--no-progress")
    comparison = json.loads(result.stdout)
    assert comparison["reproduced"] is True, comparison
    assert comparison["same"]["weights"] and comparison["same"]["metrics"]
    original = config_of(run_dir)["final_metrics"]
    repeat = config_of(again)["final_metrics"]
    assert repeat["test_accuracy"] == original["test_accuracy"]


@pytest.fixture(scope="module")
def study_out(tiny_data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    (folder / "cells.toml").write_text(STUDY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        study = load_study(folder / "cells.toml")
        run_study(study, folder / "out", device="cpu", log=lambda _: None, report=False)
    return folder / "out"


def test_a_study_teacher_cell_records_its_command_and_reruns_to_the_same_weights(
    study_out, tiny_data, tmp_path
):
    (teacher,) = (study_out / "teachers").iterdir()
    invocation = config_of(teacher)["provenance"]["invocation"]
    assert invocation["command"] == "train-teacher" and invocation["made_by"] == "rbkd study run"
    assert invocation["options"]["limit"] == 120 and invocation["options"]["capacity"] == "small"
    assert_reproduced(teacher, tmp_path / "teacher-again")


def test_a_study_student_cell_reruns_to_the_same_weights(study_out, tiny_data, tmp_path):
    (student,) = (study_out / "students").iterdir()
    invocation = config_of(student)["provenance"]["invocation"]
    assert invocation["command"] == "distill" and invocation["options"]["student"] == "baseline"
    (teacher,) = (study_out / "teachers").iterdir()
    assert invocation["options"]["teacher"] == str(teacher.resolve())
    assert_reproduced(student, tmp_path / "student-again")


def test_api_out_runs_of_rbkd_models_on_rbkd_files_rerun_to_the_same_weights(tiny_data, tmp_path):
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    fast = {"epochs": 1, "batch_size": 40, "device": "cpu"}
    teacher = rbkd.train_teacher("small", train, test, out=tmp_path / "t", **fast)
    invocation = config_of(tmp_path / "t")["provenance"]["invocation"]
    assert invocation["api"] == "rbkd.train_teacher" and invocation["command"] == "train-teacher"
    assert invocation["arguments"]["train"]["size"] == len(train)
    assert_reproduced(tmp_path / "t", tmp_path / "t-again")

    soft = teacher.files["soft_labels_train"]
    student = rbkd.distill(
        "baseline", train, test, soft_labels=soft, T=4, out=tmp_path / "s", **fast
    )
    assert student.test_accuracy is not None
    invocation = config_of(tmp_path / "s")["provenance"]["invocation"]
    assert invocation["command"] == "distill" and invocation["options"]["T"] == 4
    assert_reproduced(tmp_path / "s", tmp_path / "s-again")


def test_an_api_run_of_a_model_of_your_own_says_why_it_cannot_be_rerun(tmp_path):
    x, y = torch.randn(64, 6), torch.arange(64) % 3
    torch.manual_seed(0)
    rbkd.train_teacher(nn.Linear(6, 3), (x, y), epochs=1, device="cpu", out=tmp_path / "own")
    invocation = config_of(tmp_path / "own")["provenance"]["invocation"]
    assert invocation["api"] == "rbkd.train_teacher" and "command" not in invocation
    assert invocation["arguments"]["train"]["size"] == 64
    result = invoke("rerun", tmp_path / "own", ok=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "cannot be rerun" in lines[0] and "repeat the call from Python" in lines[0]


def test_a_command_that_fails_to_parse_leaves_no_invocation_behind(tmp_path):
    """A usage error after --config's callback ran used to leave that command's describer pushed,
    and every run the process wrote later (a study cell, an API run) recorded `distill`."""
    from rbkd.provenance import current_invocation

    config = tmp_path / "distill.toml"
    config.write_text("T = 4.0\n")
    result = invoke("distill", "--config", config, "--epochs", "many", ok=False)
    assert result.exit_code == 2
    assert current_invocation() is None
