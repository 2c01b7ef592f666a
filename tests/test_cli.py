"""The CLI without training: help, version, models, info, and the errors a user can make."""

from __future__ import annotations

import re

import pytest
import torch
from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.softlabels import write_soft_labels

runner = CliRunner()

COMMANDS = [
    [],
    ["train-teacher"],
    ["soft-labels"],
    ["distill"],
    ["analyze"],
    ["analyze", "entropy"],
    ["analyze", "projection"],
    ["experiment"],
    ["experiment", "missing-class"],
    ["experiment", "transfer-set"],
    ["experiment", "batch-sweep"],
    ["models"],
    ["info"],
]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "rbkd")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(command, flag):
    result = runner.invoke(app, [*command, flag])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c not in (["analyze"], ["experiment"])], ids=" ".join
)
def test_help_ends_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    text = re.sub(r"[│╭╮╰╯─]", " ", result.output)
    examples = re.findall(r"Example:\s+(rbkd [^\n]+)", text)
    assert examples, result.output
    assert examples[-1].split()[1 : 1 + len(command)] == command or not command


def test_version():
    import rbkd

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"rbkd {rbkd.__version__}"


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "Usage:" in result.output
    for name in ("train-teacher", "distill", "analyze", "experiment", "models", "info", "data"):
        assert name in result.output


def test_models_table():
    result = runner.invoke(app, ["models"], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "fashion-mnist" in result.output and "teacher" in result.output
    assert "1,558,538" in result.output  # the thesis's small Fashion-MNIST teacher


def test_info():
    import torch as _torch

    result = runner.invoke(app, ["info"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for key in ("rbkd", "torch", "triton", "python", "backends built", "devices", "torch threads"):
        assert key in result.output
    assert _torch.__version__ in result.output


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("T", ["0", "-1", "nan"])
def test_distill_rejects_bad_temperature(tiny_data, T):
    result = runner.invoke(app, ["distill", "--label-smoothing", "0.1", "--T", T])
    assert_one_line_error(result, "T must be > 0")


@pytest.mark.parametrize("T", ["0", "1,-3", "0:5"])
def test_analyze_entropy_rejects_bad_temperature(tmp_path, T):
    result = runner.invoke(
        app, ["analyze", "entropy", "--soft-labels", str(tmp_path / "x"), "--T", T]
    )
    assert_one_line_error(result, "T must be > 0")


def test_missing_soft_label_file(tmp_path, tiny_data):
    missing = tmp_path / "nope.safetensors"
    for args in (
        ["distill", "--soft-labels", str(missing), "--T", "9"],
        ["analyze", "entropy", "--soft-labels", str(missing)],
    ):
        result = runner.invoke(app, args)
        assert_one_line_error(result, "nope.safetensors", "no such file")


def test_corrupt_soft_label_file(tmp_path, tiny_data):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for args in (
        ["distill", "--soft-labels", str(bad)],
        ["analyze", "entropy", "--soft-labels", str(bad)],
    ):
        result = runner.invoke(app, args)
        assert_one_line_error(result, "bad.safetensors", "not a readable safetensors file")


def test_mismatched_soft_label_file(tmp_path, tiny_data):
    from rbkd.data import load_dataset

    train = load_dataset("fashion-mnist", "train")
    wrong = (train.labels + 1) % 10
    path = write_soft_labels(
        tmp_path / "other.safetensors",
        torch.randn(len(wrong), 10),
        wrong,
        torch.arange(len(wrong)),
        dataset="fashion-mnist",
        split="train",
        teacher_run="elsewhere",
        teacher_sha256="0" * 64,
    )
    result = runner.invoke(app, ["distill", "--soft-labels", str(path), "--epochs", "1"])
    assert_one_line_error(result, "other.safetensors", "labels differ from the dataset's")

    test_split = write_soft_labels(
        tmp_path / "test.safetensors",
        torch.randn(len(wrong), 10),
        wrong,
        torch.arange(len(wrong)),
        dataset="fashion-mnist",
        split="test",
        teacher_run="elsewhere",
        teacher_sha256="0" * 64,
    )
    result = runner.invoke(app, ["distill", "--soft-labels", str(test_split)])
    assert_one_line_error(result, "holds the test split; distillation needs the train split")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --teacher RUN, --soft-labels FILE or --label-smoothing A"),
        (["--label-smoothing", "0.1", "--teacher", "runs/x"], "(got --teacher and"),
        (["--label-smoothing", "1.5"], "--label-smoothing A must be in (0, 1)"),
        (["--label-smoothing", "0.1", "--alpha", "2"], "--alpha must be in [0, 1]"),
        (["--label-smoothing", "0.1", "--noise", "gauss:1"], "write uniform:S or normal:S"),
        (["--label-smoothing", "0.1", "--student", "huge"], "--student must be one of"),
        (["--label-smoothing", "0.1", "--per-class", "0"], "--per-class must be >= 1"),
        (["--label-smoothing", "0.1", "--per-class", "5"], "with --label-smoothing use"),
        (["--label-smoothing", "0.1", "--exclude-class", "12"], "class 12 does not exist"),
    ],
)
def test_distill_bad_options(tiny_data, tmp_path, args, message):
    result = runner.invoke(app, ["distill", *args, "--epochs", "1", "--out", str(tmp_path / "r")])
    assert_one_line_error(result, message)


def test_teacher_that_is_not_a_run(tmp_path, tiny_data):
    result = runner.invoke(app, ["distill", "--teacher", str(tmp_path), "--T", "9"])
    assert_one_line_error(result, "is not a run directory")


def test_dataset_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("RBKD_DATA", str(tmp_path))
    result = runner.invoke(
        app,
        [
            "distill",
            "--label-smoothing",
            "0.1",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert len(error_lines(result.output)) == 1


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RBKD_DEBUG", "1")
    result = runner.invoke(app, ["analyze", "entropy", "--soft-labels", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "SoftLabelsError"
