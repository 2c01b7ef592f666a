"""The CLI without training: help, version, models, info, and the errors a user can make."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.soft_label_file import write_soft_labels

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


def assert_one_line_error(result, *fragments: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
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


def test_info_json_keys_are_identifiers():
    """`rbkd info --json | jq .torch_threads`: no key with a space in it."""
    import json

    import torch as _torch

    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert [k for k in found if not k.isidentifier()] == []
    assert found["torch"] == _torch.__version__
    assert found["torch_threads"] == str(_torch.get_num_threads())
    assert {"backends_built", "backend_cpu", "cpu_cores", "rbkd_backend"} <= set(found)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("T", ["0", "-1", "nan"])
def test_distill_rejects_bad_temperature(tiny_data, T):
    result = runner.invoke(app, ["distill", "--label-smoothing", "0.1", "--T", T])
    assert_one_line_error(result, "T must be > 0", exit_code=2)  # a usage error


@pytest.mark.parametrize("T", ["0", "1,-3", "0:5"])
def test_analyze_entropy_rejects_bad_temperature(tmp_path, T):
    result = runner.invoke(
        app, ["analyze", "entropy", "--soft-labels", str(tmp_path / "x"), "--T", T]
    )
    assert_one_line_error(result, "T must be > 0", exit_code=2)  # a usage error


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
        assert_one_line_error(result, "bad.safetensors", "regenerate it")


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
        (["--label-smoothing", "0.1", "--per-class", "0"], "--per-class must be >= 1"),
        (["--label-smoothing", "0.1", "--per-class", "5"], "with --label-smoothing use"),
        (["--label-smoothing", "0.1", "--exclude-class", "12"], "class 12 does not exist"),
        (["--teacher", "runs/x", "--T", "150"], "--T = 150 is above 100, the largest temperature"),
    ],
)
def test_distill_bad_options(tiny_data, tmp_path, args, message):
    result = runner.invoke(app, ["distill", *args, "--epochs", "1", "--out", str(tmp_path / "r")])
    # a usage error (exit code 2), but for a class the dataset turns out not to have
    assert_one_line_error(result, message, exit_code=1 if "does not exist" in message else 2)
    assert not (tmp_path / "r").exists()  # refused before any run folder is made


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


# ------------------------------------------------------------------ issue 9
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["distill", "--T", "abc"], "'--T'"),
        (["train-teacher", "--epochs", "1.5"], "'--epochs'"),
        (["train-teacher", "--no-such-option"], "No such option: --no-such-option"),
        (["analyze", "entropy", "--T"], "--T"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, fragment):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and fragment in lines[0] and " -h`)" in lines[0]
    assert not re.search(r"[│╭╮╰╯]", result.output)


def test_programming_errors_are_reported_as_internal_with_the_debug_hint():
    from rbkd.cli.errors import handle_errors
    from rbkd.cli.typer_app import new_app

    demo = new_app()

    @demo.command("boom")
    @handle_errors
    def boom(kind: str = "key") -> None:
        errors = {"key": KeyError("x"), "index": IndexError("list index out of range")}
        errors |= {"attr": AttributeError("'NoneType' has no attribute 'y'"), "type": TypeError()}
        errors |= {"value": ValueError("--T must be > 0")}
        raise errors[kind]

    @demo.command("other")
    def other() -> None:  # a second command, so that `boom` is a subcommand
        pass

    for kind, name in (("key", "KeyError"), ("index", "IndexError"), ("attr", "AttributeError")):
        result = runner.invoke(demo, ["boom", "--kind", kind])
        assert_one_line_error(result, f"internal error {name}", "RBKD_DEBUG=1")
    result = runner.invoke(demo, ["boom", "--kind", "type"])
    assert_one_line_error(result, "internal error TypeError")
    result = runner.invoke(demo, ["boom", "--kind", "value"])
    assert_one_line_error(result, "--T must be > 0")
    assert "internal" not in result.output and "RBKD_DEBUG" not in result.output


def test_untrusted_text_is_escaped_before_printing(tmp_path, monkeypatch):
    """Terminal escapes in a file name or in file metadata must reach the terminal as visible
    text, never as control sequences; rich markup in them must not be interpreted."""
    from rbkd.cli.text import escape

    hostile = "\x1b]0;pwned\x07\x1b[2J[bold red]x[/]\u202e\r\n"
    shown = escape(hostile)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u202e]", shown)
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in shown and "\\u202e" in shown
    monkeypatch.chdir(tmp_path)  # a short relative path fits in the table's column title
    name = Path("soft\x1b[31m[red]evil.safetensors")
    _soft_file(name, teacher="runs/\x1b[2Jt1")
    args = ["analyze", "entropy", "--soft-labels", str(name), "--T", "1,9"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\\x1b[31m[red]evil" in result.output
    missing = tmp_path / "gone\x1b[2J.safetensors"
    result = runner.invoke(app, ["analyze", "entropy", "--soft-labels", str(missing)])
    assert_one_line_error(result, "gone\\x1b[2J.safetensors")
    assert "\x1b" not in result.output


def test_analyze_entropy_accepts_limit(tmp_path):
    path = tmp_path / "s.safetensors"
    _soft_file(path)
    full = runner.invoke(app, ["analyze", "entropy", "--soft-labels", str(path), "--T", "3"])
    cut = runner.invoke(
        app, ["analyze", "entropy", "--soft-labels", str(path), "--T", "3", "--limit", "5"]
    )
    assert full.exit_code == 0 and cut.exit_code == 0, cut.output
    assert full.output != cut.output
    result = runner.invoke(app, ["analyze", "entropy", "--soft-labels", str(path), "--limit", "0"])
    assert_one_line_error(result, "--limit must be >= 1", exit_code=2)


def test_analyze_projection_accepts_limit():
    result = runner.invoke(app, ["analyze", "projection", "--help"])
    assert "--limit" in result.output


@pytest.mark.parametrize("spec", ["1:1e9", "1:1000:0.01", ",".join(["1"] * 5000)])
def test_temperature_ranges_are_bounded(tmp_path, spec):
    path = tmp_path / "s.safetensors"
    _soft_file(path)
    result = runner.invoke(app, ["analyze", "entropy", "--soft-labels", str(path), "--T", spec])
    assert_one_line_error(result, "temperatures, at most 1000 are allowed", exit_code=2)


def _soft_file(path, teacher="runs/t1"):
    g = torch.Generator().manual_seed(0)
    write_soft_labels(
        path,
        torch.randn(20, 10, generator=g) * 3,
        torch.arange(20) % 10,
        torch.arange(20),
        dataset="fashion-mnist",
        split="train",
        teacher_run=teacher,
        teacher_sha256="ab" * 32,
    )
    return path
