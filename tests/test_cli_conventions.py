"""The CLI conventions users of torchdistill, Lightning and the Hugging Face CLIs expect:
`python -m rbkd`, shell completion, choices in --help, --progress/--threads on every long
command, --json that is only JSON, tables that never cut a number, a fast `rbkd --help` (no
torch import), and --plot / --data-dir / `data fetch` failing early and cleanly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rbkd.cli.app import app
from rbkd.cli.threads import apply_threads, default_threads, physical_cores
from typer.testing import CliRunner

import rbkd
from rbkd.soft_label_file import write_soft_labels

runner = CliRunner()
LONG_COMMANDS = [
    ["train-teacher"],
    ["distill"],
    ["experiment", "missing-class"],
    ["experiment", "transfer-set"],
    ["experiment", "batch-sweep"],
    ["study", "run"],
]
COMPUTE_COMMANDS = [
    *LONG_COMMANDS,
    ["soft-labels"],
    ["analyze", "entropy"],
    ["analyze", "projection"],
    ["analyze", "examples"],
]


def run_rbkd(*args: str, env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -m rbkd ARGS` in a fresh interpreter (stdout a pipe, not a terminal)."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['rbkd', *{list(args)!r}]\n"
    code += "runpy.run_module('rbkd', run_name='__main__')"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120
    )


@pytest.fixture
def wide_help(monkeypatch):
    """Typer draws --help at the terminal's width (80 under a test); 250 keeps each option on
    one line, so that a choice list is one string to look for."""
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 250)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


def soft_file(path: Path, rows: int = 20) -> Path:
    g = torch.Generator().manual_seed(0)
    return write_soft_labels(
        path,
        torch.randn(rows, 10, generator=g) * 3,
        torch.arange(rows) % 10,
        torch.arange(rows),
        dataset="fashion-mnist",
        split="train",
        teacher_run="runs/t1",
        teacher_sha256="0" * 64,
    )


# ------------------------------------------------------------------ python -m rbkd, fast help
@pytest.mark.parametrize("module", ["rbkd.cli.app", "rbkd"])
def test_importing_the_cli_loads_no_heavy_library(module):
    heavy = ("torch", "numpy", "matplotlib", "safetensors")
    code = f"import sys, {module}; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_root_help_and_version_import_no_command_module():
    """`rbkd --help` lists the commands from cli/app.py's COMMANDS without importing them, nor
    the --config reader or the option checks and rbkd.config they read (only the app, its error
    boundary and its help)."""
    code = (
        "import sys, contextlib, io\n"
        "from rbkd.cli.app import COMMANDS, main\n"
        "for args in (['--help'], ['--version']):\n"
        "    sys.argv = ['rbkd', *args]\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main()\n"
        "late = {f'rbkd.cli.{module}' for module, _ in COMMANDS.values()}\n"
        "late |= {'rbkd.cli.config_file', 'rbkd.cli.options', 'rbkd.cli.output'}\n"
        "late |= {'rbkd.cli.usage', 'rbkd.config'}\n"
        "print(sorted(late & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_every_commands_help_imports_no_torch():
    """Each command's module is imported for its own --help (`rbkd distill -h`): every one of
    them, loaded together, imports no torch, numpy or matplotlib (the work imports them)."""
    code = (
        "import sys\n"
        "from typer.main import get_command\n"
        "from rbkd.cli.app import app\n"
        "from rbkd.cli.typer_app import walk_commands\n"
        "paths = [' '.join(p) for p, _ in walk_commands(get_command(app)) if p]\n"
        "print(len(paths), [m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    count, heavy = proc.stdout.split(maxsplit=1)
    assert int(count) >= 20 and heavy.strip() == "[]", proc.stdout


def test_the_root_help_summaries_are_the_commands_own():
    from rbkd.cli.app import COMMANDS
    from rbkd.cli.typer_app import walk_commands
    from typer.main import get_command

    root = get_command(app)
    listed = {path[0]: cmd for path, cmd in walk_commands(root) if len(path) == 1}
    assert list(listed) == list(COMMANDS)
    for name, (_, summary) in COMMANDS.items():
        assert listed[name].get_short_help_str(1000) == summary, name
    for name, (_, summary) in COMMANDS.items():  # and --help lists them (cut to the width)
        help_text = runner.invoke(app, ["--help"], terminal_width=200).output
        assert f"{name}  " in help_text and summary[:40] in help_text


def test_python_m_rbkd_version():
    proc = subprocess.run(
        [sys.executable, "-m", "rbkd", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"rbkd {rbkd.__version__}"


def test_python_m_rbkd_help_names_the_program_rbkd():
    proc = subprocess.run([sys.executable, "-m", "rbkd", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: rbkd " in proc.stdout and "train-teacher" in proc.stdout


# ------------------------------------------------------------------ shell completion
def test_help_offers_completion():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_show_completion_prints_a_bash_script():
    proc = run_rbkd("--show-completion", "bash", env={"SHELL": "/bin/bash"})
    assert proc.returncode == 0, proc.stderr
    assert "_RBKD_COMPLETE=complete_bash" in proc.stdout
    assert "complete -o default -F _rbkd_completion rbkd" in proc.stdout


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("rbkd train-teacher --capacity ", 3, ["small", "large"]),
        ("rbkd study report x --format ", 5, ["png", "pdf", "svg"]),
        ("rbkd experim", 1, ["experiment"]),
        ("rbkd train-teacher --device ", 3, ["auto", "cpu", "cuda"]),
        ("rbkd study run s.toml --device c", 5, ["cpu", "cuda"]),
        ("rbkd distill --device a", 3, ["auto"]),
    ],
)
def test_bash_completion_completes_commands_and_choices(words, cword, expected):
    env = {"_RBKD_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    proc = run_rbkd(env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected


def test_completion_leaves_usage_errors_one_line():
    result = runner.invoke(app, ["--no-such-option"])
    assert result.exit_code == 2
    assert len(error_lines(result.output)) == 1 and "Usage:" not in result.output


# ------------------------------------------------------------------ choices
@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["train-teacher"], "<small|large>"),
        (["train-teacher"], "<fashion-mnist|mnist|cifar10>"),
        (["train-teacher"], "<adam|sgd>"),
        (["train-teacher"], "<auto|cpu|cuda|cuda:N>"),
        (["distill"], "<general|baseline>"),
        (["distill"], "<entropy|random>"),
        (["experiment", "batch-sweep"], "<small|large>"),
        (["soft-labels"], "<train|test>"),
        (["analyze", "examples"], "<train|test>"),
        (["study", "report"], "<png|pdf|svg>"),
        (["data", "fetch"], "<fashion-mnist|mnist|cifar10>"),
    ],
)
def test_help_shows_the_choices(wide_help, command, shown):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert shown in result.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train-teacher", "--capacity", "huge"], ["'--capacity'", "'small', 'large'"]),
        (["distill", "--student", "huge"], ["'--student'", "'general', 'baseline'"]),
        (["distill", "--select", "best"], ["'--select'", "'entropy', 'random'"]),
        (["train-teacher", "--optimizer", "lamb"], ["'--optimizer'", "'adam', 'sgd'"]),
        (["train-teacher", "--device", "gpu"], ["'--device'", "auto, cpu, cuda, cuda:N"]),
        (["data", "fetch", "imagenet"], ["'imagenet'", "'mnist'"]),
        (["analyze", "examples", "--teacher", "t", "--split", "valid"], ["'train', 'test'"]),
        (["soft-labels", "--teacher", "t", "--split", "valid"], ["'train', 'test'"]),
        (["study", "report", "x", "--format", "gif"], ["'--format'", "'png', 'pdf', 'svg'"]),
    ],
)
def test_a_bad_choice_is_a_one_line_usage_error(args, fragments):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output  # a usage error: refused before any work
    (line,) = error_lines(result.output)
    for fragment in fragments:
        assert fragment in line, line


# ------------------------------------------------------------------ progress and threads
@pytest.mark.parametrize("command", LONG_COMMANDS, ids=" ".join)
def test_every_long_command_has_progress_and_threads(wide_help, command):
    result = runner.invoke(app, [*command, "--help"])
    assert "--progress" in result.output and "--no-progress" in result.output
    assert "--threads" in result.output


@pytest.mark.parametrize("command", COMPUTE_COMMANDS, ids=" ".join)
def test_every_compute_command_has_threads(wide_help, command):
    result = runner.invoke(app, [*command, "--help"])
    assert "--threads" in result.output


@pytest.mark.parametrize("flag", ["--progress", "--no-progress"])
def test_epoch_lines_are_printed_with_and_without_progress(tiny_data, tmp_path, flag):
    args = ["distill", "--label-smoothing", "0.1", "--epochs", "2", "--batch-size", "50"]
    args += ["--device", "cpu", "--out", str(tmp_path / "s"), flag]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # the epoch lines are a log: stderr, so that stdout holds only the result
    # each line names the loss it reports: label smoothing's here
    assert "epoch 1/2: train LS loss" in result.stderr
    assert "epoch 2/2: train LS loss" in result.stderr
    assert "epoch 1/2" not in result.stdout
    # not a terminal: no bar is drawn (on stderr, where bars go), with or without --progress
    assert "━" not in result.stderr and "samples/s" in result.stderr


def test_threads_option_sets_torch_threads(tiny_data, tmp_path):
    before = torch.get_num_threads()
    try:
        args = ["distill", "--label-smoothing", "0.1", "--epochs", "1", "--threads", "1"]
        result = runner.invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "s")])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive():
    result = runner.invoke(app, ["distill", "--threads", "0"])
    assert result.exit_code == 2 and "--threads" in error_lines(result.output)[0]


def test_default_threads_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == physical_cores()
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_apply_threads_prefers_the_option_to_the_environment(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
        assert apply_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ --json
@pytest.mark.parametrize("command", [["models"], ["info"], ["data", "list"]], ids=" ".join)
def test_json_is_one_document_on_stdout(tiny_data, command):
    result = runner.invoke(app, [*command, "--json"])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the whole of stdout, nothing else


def test_models_json_pipes_into_json_tool():
    proc = run_rbkd("models", "--json")
    assert proc.returncode == 0, proc.stderr
    tool = subprocess.run(
        [sys.executable, "-m", "json.tool"], input=proc.stdout, capture_output=True, text=True
    )
    assert tool.returncode == 0, tool.stderr
    models = json.loads(proc.stdout)
    small = [m for m in models if (m["dataset"], m["arch"]) == ("fashion-mnist", "small")]
    assert small and small[0]["thesis_parameters"] == 1558538


def test_data_list_json_names_where_each_dataset_is(tiny_data):
    found = json.loads(runner.invoke(app, ["data", "list", "--json"]).stdout)
    where = {d["dataset"]: d["location"] for d in found["datasets"]}
    assert where["fashion-mnist"] == str(tiny_data / "fashion-mnist")
    assert str(tiny_data) in found["searched"]


def test_analyze_entropy_json_to_stdout(tiny_data, tmp_path):
    path = soft_file(tmp_path / "soft.safetensors")
    result = runner.invoke(
        app, ["analyze", "entropy", "--soft-labels", str(path), "--T", "1,9", "--json", "-"]
    )
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    assert numbers["temperatures"] == [1.0, 9.0] and numbers["unit"] == "nats"
    assert "mean soft-label entropy" in result.stderr  # the table went to stderr


# ------------------------------------------------------------------ tables never cut
def test_models_table_keeps_every_number_when_piped_narrow():
    proc = run_rbkd("models", env={"COLUMNS": "60"})
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    for m in json.loads(run_rbkd("models", "--json").stdout):
        assert f"{m['parameters']:,}" in proc.stdout
        assert f"{m['thesis_parameters']:,}" in proc.stdout


def test_data_list_keeps_the_path_when_piped_narrow(tiny_data):
    deep = tiny_data  # RBKD_DATA: a long pytest temporary path
    proc = run_rbkd("data", "list", env={"COLUMNS": "60", "RBKD_DATA": str(deep)})
    assert proc.returncode == 0, proc.stderr
    assert str(deep / "fashion-mnist") in proc.stdout and "…" not in proc.stdout


def test_per_class_entropy_table_keeps_every_number(tiny_data, tmp_path):
    path = soft_file(tmp_path / "soft.safetensors")
    numbers = json.loads(
        run_rbkd(
            "analyze", "entropy", "--soft-labels", str(path), "--T", "1:20", "--json", "-"
        ).stdout
    )
    proc = run_rbkd(
        "analyze",
        "entropy",
        "--soft-labels",
        str(path),
        "--T",
        "1:20",
        "--per-class",
        env={"COLUMNS": "60"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    per_class = numbers["sources"][str(path)]["per_class_entropy"]
    for row in per_class:
        for h in row:
            assert f"{h:.3f}" in proc.stdout


@pytest.mark.parametrize("columns", ["60", "100"])
def test_a_terminal_gets_every_number_whole(columns):
    env = {"COLUMNS": columns, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0"}
    proc = run_rbkd("models", env=env)  # a terminal, as far as rich can tell
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= int(columns)
    for m in json.loads(run_rbkd("models", "--json").stdout):
        assert f"{m['parameters']:,}" in text and f"{m['thesis_parameters']:,}" in text


# ------------------------------------------------------------------ --plot
@pytest.mark.parametrize(
    ("suffix", "signature"), [(".png", b"\x89PNG"), (".pdf", b"%PDF-"), (".svg", b"<?xml")]
)
def test_plot_format_follows_the_suffix(tiny_data, tmp_path, suffix, signature):
    path = soft_file(tmp_path / "soft.safetensors")
    plot = tmp_path / f"entropy{suffix}"
    args = ["analyze", "entropy", "--soft-labels", str(path), "--T", "1,9", "--plot", str(plot)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(signature)


@pytest.mark.parametrize(
    "command",
    [
        ["analyze", "entropy", "--soft-labels", "missing.safetensors"],
        ["analyze", "projection", "--teacher", "missing-run"],
        ["analyze", "examples", "--teacher", "missing-run"],
    ],
    ids=lambda c: c[1],
)
def test_unknown_plot_suffix_is_refused_before_any_work(tmp_path, command):
    result = runner.invoke(app, [*command, "--plot", str(tmp_path / "figure.gif")])
    assert result.exit_code == 2  # a usage error: a value wrong in what was typed
    (line,) = error_lines(result.output)
    assert "must end in .png, .pdf or .svg" in line  # not "missing...": checked first


def test_plot_without_matplotlib_is_one_line(tmp_path):
    proc = run_rbkd(
        "analyze",
        "entropy",
        "--soft-labels",
        "missing.safetensors",
        "--plot",
        str(tmp_path / "e.png"),
        prelude="import sys; sys.modules['matplotlib'] = None",
    )
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == [
        "Error: figures need matplotlib: pip install 'rbkd[plots]'"
    ], proc.stderr


# ------------------------------------------------------------------ data
def test_data_dir_without_the_dataset_names_what_was_looked_for(tmp_path):
    args = ["distill", "--label-smoothing", "0.1", "--data-dir", str(tmp_path), "--epochs", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "s")], terminal_width=400)
    assert result.exit_code == 1
    (line,) = error_lines(result.output)
    assert str(tmp_path) in line and "train-images-idx3-ubyte.gz" in line
    assert "rbkd data fetch fashion-mnist" in line


def test_failed_fetch_leaves_nothing_behind(tmp_path):
    dest = tmp_path / "new" / "mnist"
    # port 9 (discard) on the loopback: nothing listens, the connection is refused at once
    args = ["data", "fetch", "mnist", "--dest", str(dest), "--base-url", "http://127.0.0.1:9"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 1
    assert "offline?" in error_lines(result.output)[0]
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ --json on the long commands
FAST = ["--epochs", "1", "--batch-size", "50", "--device", "cpu", "--threads", "1"]


def test_train_teacher_and_soft_labels_json(tiny_data, tmp_path):
    run = tmp_path / "t"
    args = ["train-teacher", "--capacity", "small", "--limit", "100", "--out", str(run)]
    result = runner.invoke(app, [*args, *FAST, "--json"])
    assert result.exit_code == 0, result.output
    teacher = json.loads(result.stdout)
    assert teacher["run_dir"] == str(run) and set(teacher["mean_entropy_nats"]) == {"1", "9"}
    assert "epoch 1/1" in result.stderr  # the log went to stderr, not into the JSON

    out = tmp_path / "test.safetensors"
    args = ["soft-labels", "--teacher", str(run), "--split", "test", "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    soft = json.loads(result.stdout)
    assert soft["file"] == str(out) and soft["split"] == "test" and soft["num_classes"] == 10


def test_distill_json_is_its_report(tiny_data, tmp_path):
    args = ["distill", "--label-smoothing", "0.1", "--out", str(tmp_path / "s"), *FAST, "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    saved = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["test_accuracy"] == saved["test_accuracy"]
    assert len(report["per_class_accuracy"]) == 10


def test_experiment_json_holds_the_results_rows(tiny_data, tmp_path):
    args = ["experiment", "missing-class", "--label-smoothing", "0.5", "--classes", "0,1"]
    args += ["--limit", "100", "--out", str(tmp_path / "m"), "--no-progress", *FAST, "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert sorted(r["missing_class"] for r in rows) == [0, 1]
    assert "results:" in result.stderr  # the summary lines moved off stdout


def test_the_python_api_stays_quiet_without_progress(capsys, monkeypatch):
    from rbkd.engine import progress

    monkeypatch.setattr(progress, "_always_log", False)
    with progress.EpochProgress(False, 1) as bar:
        bar.log("epoch 1/1: quiet")
    assert "quiet" not in capsys.readouterr().err
    progress.print_epoch_lines()  # what every computing command does (start_compute)
    with progress.EpochProgress(False, 1) as bar:
        bar.log("epoch 1/1: printed")
    assert "epoch 1/1: printed" in capsys.readouterr().err


def test_the_rbkd_console_script_runs():
    script = Path(sys.executable).with_name("rbkd")
    if not script.is_file():
        pytest.skip(f"no console script next to {sys.executable} (not an installed environment)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: rbkd "), proc.stderr


def test_every_help_example_prints_on_one_line_however_narrow_the_terminal():
    """click rewraps help paragraphs to the terminal; an example broken over two lines would not
    paste into a shell, so indented paragraphs are printed as written."""
    from rbkd.cli.typer_app import walk_commands
    from typer.main import get_command

    examples = 0
    for path, command in walk_commands(get_command(app)):
        doc = command.callback.__doc__ if command.callback else None
        lines = [ln.strip() for ln in (doc or "").splitlines() if ln.strip().startswith("rbkd ")]
        if not lines:
            continue
        result = runner.invoke(app, [*path, "--help"], terminal_width=60)
        assert result.exit_code == 0, result.output
        printed = [out.strip() for out in result.output.splitlines()]
        for line in lines:
            examples += 1
            assert line in printed, f"`{' '.join(path)} --help` breaks its example {line!r}"
    assert examples >= 10  # the walk found the commands' examples
