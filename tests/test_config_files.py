"""--config FILE, the provenance config.json records, and `rbkd rerun`, on the tiny dataset."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from rbkd.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()
TRAINING_COMMANDS = [
    ["train-teacher"],
    ["soft-labels"],
    ["distill"],
    ["experiment", "missing-class"],
    ["experiment", "transfer-set"],
    ["experiment", "batch-sweep"],
]
TEACHER_TOML = """\
# a small teacher, briefly
capacity = "small"
epochs = 1
batch-size = 64          # '-' or '_', as the option is spelled
device = "cpu"
progress = false
"""


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=160)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def config_of(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def teacher(tiny_data_root, tmp_path_factory):
    """A teacher trained from a TOML file, with --batch-size 32 on the command line winning."""
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "teacher.toml").write_text(TEACHER_TOML)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        mp.chdir(folder)
        invoke("train-teacher", "--config", "teacher.toml", "--batch-size", "32", "--out", "t1")
    return folder / "t1"


@pytest.fixture(scope="module")
def student(teacher, tiny_data_root):
    """A student distilled from the teacher, its options in a JSON file."""
    path = teacher.parent / "student.json"
    options = {"teacher": str(teacher), "T": 9, "per_class": 5, "epochs": 1}
    path.write_text(json.dumps({**options, "device": "cpu", "progress": False}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        invoke("distill", "--config", path, "--batch-size", "16", "--out", teacher.parent / "s1")
    return teacher.parent / "s1"


@pytest.mark.parametrize("command", TRAINING_COMMANDS, ids=" ".join)
def test_every_training_command_takes_a_config_file(command):
    assert "--config" in invoke(*command, "-h").output


def test_toml_file_sets_options_and_the_command_line_wins(teacher):
    cfg = config_of(teacher)
    assert cfg["arch"] == "small"
    assert cfg["train_config"]["epochs"] == 1  # from the file
    assert cfg["train_config"]["batch_size"] == 32  # the flag beat the file's 64
    options = cfg["provenance"]["invocation"]["options"]
    assert options["batch_size"] == 32 and options["capacity"] == "small"


def test_json_file_sets_options_of_distill(student):
    report = json.loads((student / "report.json").read_text())
    assert report["T"] == 9 and report["transfer"]["per_class"] == 5
    assert report["train_config"]["batch_size"] == 16 and report["train_config"]["epochs"] == 1


def test_config_json_records_the_provenance(teacher, tiny_data_root):
    record = config_of(teacher)["provenance"]
    invocation = record["invocation"]
    argv = ["rbkd", "train-teacher", "--config", "teacher.toml", "--batch-size", "32"]
    assert invocation["argv"] == [*argv, "--out", "t1"]
    assert invocation["shell"] == " ".join(invocation["argv"])
    assert invocation["command"] == "train-teacher"
    assert invocation["cwd"] == str(teacher.parent)
    assert invocation["options"]["out"] == str(teacher)  # absolute: works from any folder
    toml = (teacher.parent / "teacher.toml").read_bytes()
    assert invocation["config_file"]["sha256"] == hashlib.sha256(toml).hexdigest()
    import rbkd

    assert record["rbkd_version"] == rbkd.__version__
    assert record["device"] == "cpu" and record["dtype"] == "float32"  # what ran, not "auto"
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["host"] and record["platform"] and record["python"]
    if "git" in record:  # only when rbkd runs from a git checkout
        assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"])
        assert isinstance(record["git"]["dirty"], bool)
    files = {f["path"]: f for f in record["data_files"]}
    expected = sorted((tiny_data_root / "fashion-mnist").glob("*.gz"))
    assert sorted(files) == [str(p) for p in expected]
    for path in expected:
        data = path.read_bytes()
        assert files[str(path)]["sha256"] == hashlib.sha256(data).hexdigest()
        assert files[str(path)]["size"] == len(data)


def test_student_records_the_provenance_too(student):
    record = config_of(student)["provenance"]
    assert record["invocation"]["command"] == "distill"
    assert record["invocation"]["options"]["per_class"] == 5
    assert record["device"] == "cpu" and len(record["data_files"]) == 4


def test_provenance_leaves_the_key_alone(teacher, tiny_data, tmp_path, monkeypatch):
    """The same options from another folder, in another order, with --device auto: the finished
    run is reused (the key holds none of argv, cwd, device or threads)."""
    key = config_of(teacher)["extra_config"]["key"]
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "train-teacher", "--device", "auto", "--out", teacher, "--no-progress",
        "--batch-size", "32", "--epochs", "1", "--capacity", "small",
    )  # fmt: skip
    assert "nothing to do" in result.output
    assert config_of(teacher)["extra_config"]["key"] == key


def test_a_runs_config_json_is_a_config_file(teacher, tiny_data):
    """config.json fed back: the options it recorded, so the same run (reused)."""
    result = invoke("train-teacher", "--config", teacher / "config.json")
    assert "nothing to do" in result.output


@pytest.mark.parametrize(
    "text,suffix,fragments",
    [
        (
            "epochs = 1\ncolour = 3\n",
            ".toml",
            ["unknown key 'colour'", "`rbkd train-teacher` takes", "--batch-size", "--json"],
        ),
        ("epochs = 1.5\n", ".toml", ["epochs must be an integer, got 1.5"]),
        ('{"epochs": "many"}', ".json", ["epochs must be an integer, got 'many'"]),
        ('{"progress": "yes"}', ".json", ["progress must be true or false"]),
        ("epochs = \n", ".toml", ["cannot read it", "fix the file"]),
        ("[1, 2]", ".json", ["must hold a table of options"]),
        ("epochs: 1", ".yaml", ["unknown format .yaml", "name it .toml or .json"]),
        (None, ".toml", ["no such file"]),
        ("#" * (2 << 20), ".toml", ["larger than"]),
    ],
    ids=["unknown-key", "float-for-int", "string-for-int", "string-for-bool", "syntax",
         "not-a-table", "suffix", "missing", "oversized"],
)  # fmt: skip
def test_bad_config_files_are_one_line_errors(tmp_path, text, suffix, fragments):
    path = tmp_path / f"options{suffix}"
    if text is not None:
        path.write_text(text)
    result = invoke("train-teacher", "--config", path, ok=False)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: --config ") and str(path) in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "as-json" not in lines[0] and "as_json" not in lines[0]  # the parameter's own name


def _context(*words: str):
    """The click context of `rbkd WORDS`, as a command's --config callback sees it."""
    from typer import _click as click
    from typer.main import get_command

    ctx = click.Context(get_command(app), info_name="rbkd")
    for word in words:
        ctx = click.Context(ctx.command.get_command(ctx, word), info_name=word, parent=ctx)
    return ctx


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("json = true\n", {"as_json": True}),  # as typed: --json
        ("t-squared = false\nT = 3\n", {"t_squared": False, "T": 3.0}),  # --t-squared, --T
        ("as_json = true\n", {"as_json": True}),  # as a run's config.json records it
    ],
    ids=["option-name", "flag-and-case", "recorded-name"],
)
def test_config_keys_are_the_options_as_typed(tmp_path, text, expected):
    from rbkd.cli.config_file import options_from_file

    path = tmp_path / "options.toml"
    path.write_text(text)
    assert options_from_file(_context("distill"), path) == expected


def test_one_option_under_two_keys_is_refused(tmp_path):
    from rbkd.cli.config_file import options_from_file
    from typer import _click as click

    path = tmp_path / "options.toml"
    path.write_text("json = true\nas-json = false\n")
    with pytest.raises(click.exceptions.UsageError, match="'json' and 'as-json' are the same"):
        options_from_file(_context("distill"), path)


def test_a_choice_outside_its_list_is_an_error_naming_the_choices(tmp_path):
    from typing import Literal

    from rbkd.cli.config_file import _check_value
    from typer import _click as click

    choice = Literal["small", "large"]
    assert _check_value(tmp_path, "capacity", choice, "small") == "small"
    with pytest.raises(click.exceptions.UsageError, match="one of small, large, got 'huge'"):
        _check_value(tmp_path, "capacity", choice, "huge")


def test_another_commands_config_json_is_refused(student):
    result = invoke("train-teacher", "--config", student / "config.json", ok=False)
    assert result.exit_code == 2
    assert "records options of `rbkd distill`, not `rbkd train-teacher`" in result.output


def test_a_directory_is_not_a_config_file(tmp_path):
    (tmp_path / "d.toml").mkdir()
    result = invoke("train-teacher", "--config", tmp_path / "d.toml", ok=False)
    assert result.exit_code == 2 and "d.toml" in result.output and "directory" in result.output


def test_rerun_reproduces_a_teacher(teacher, tiny_data):
    result = invoke("rerun", teacher, "--no-progress")
    assert "reproduced: identical final metrics and weights" in result.output, result.output
    again = teacher.parent / "t1.rerun"
    timing = {"train_time_s", "samples_per_s"}  # the only numbers allowed to differ
    a, b = (config_of(r)["final_metrics"] for r in (teacher, again))
    assert {k: v for k, v in a.items() if k not in timing} == {
        k: v for k, v in b.items() if k not in timing
    }
    assert config_of(again)["extra_config"]["key"] == config_of(teacher)["extra_config"]["key"]
    assert config_of(again)["provenance"]["invocation"]["options"]["out"] == str(again)


def test_rerun_reproduces_a_distillation(student, tiny_data, tmp_path):
    result = invoke("rerun", student, "--out", tmp_path / "s1-again", "--no-progress")
    assert "reproduced: identical final metrics and weights" in result.output, result.output
    assert (tmp_path / "s1-again" / "report.json").exists()


def test_rerun_of_a_folder_without_a_record_is_one_line(teacher, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    config = config_of(teacher)
    del config["provenance"]  # as an older rbkd, or the Python API, wrote it
    (old / "config.json").write_text(json.dumps(config))
    result = invoke("rerun", old, ok=False)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "records no command" in lines[0], result.output


def test_rerun_of_an_experiments_run_repeats_the_experiment_beside_it(teacher, tiny_data):
    out = teacher.parent / "missing"
    options = "classes = [0]\nT = [9]\nepochs = 1\nbatch-size = 32\nprogress = false\n"
    (teacher.parent / "missing.toml").write_text(options + 'device = "cpu"\n')
    invoke("experiment", "missing-class", "--teacher", teacher, "--config",
           teacher.parent / "missing.toml", "--out", out)  # fmt: skip
    (run,) = (out / "students").iterdir()
    result = invoke("rerun", run, "--no-progress")
    assert "reproduced: identical final metrics and weights" in result.output, result.output
    assert (teacher.parent / "missing.rerun" / "students" / run.name / "report.json").exists()


def test_rerun_uses_the_recorded_threads_and_prints_one_json_document(student, tiny_data, tmp_path):
    import torch

    recorded = config_of(student)["provenance"]["torch_threads"]
    before = torch.get_num_threads()
    try:
        result = invoke("rerun", student, "--out", tmp_path / "again", "--json", "--no-progress")
        comparison = json.loads(result.stdout)  # the repeated command's own lines: stderr
        assert comparison["reproduced"] is True and all(comparison["same"].values())
        assert comparison["threads"] == [recorded, recorded]
        assert comparison["metrics"]["test_accuracy"]["equal"] is True
        assert comparison["rerun"] == str(tmp_path / "again")

        other = 2 if recorded == 1 else 1
        result = invoke(
            "rerun", student, "--out", tmp_path / "b", "--threads", other, "--json", ok=False
        )
        assert result.exit_code in (0, 3), result.output  # 3: another thread count may differ
        assert json.loads(result.stdout)["threads"] == [recorded, other]
        assert config_of(tmp_path / "b")["provenance"]["torch_threads"] == other
    finally:
        torch.set_num_threads(before)
