"""A study file is checked whole before anything runs (issue 13): every value a run could fail on
later is one line naming the file and the key at `rbkd study run FILE --dry-run`, exit code 2 (a
usage error, as a bad --config file is), with nothing written; a huge grid is counted, not
expanded; equal noises are one run; a teacher trained elsewhere on fewer examples is refused at
plan time; `rbkd study report` never trusts a results.jsonl that disagrees with the run folders."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from helpers import shipped_studies
from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.study import load_study
from rbkd.study.plan import _student_specs, count_runs, make_plan
from rbkd.study.schema import MAX_NAME_CHARS

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

BASE = """
[study]
name = {name}
{study_extra}

[[teacher]]
name = {teacher}
capacity = "small"
epochs = 1
batch_size = 50
{teacher_extra}

[experiments.temperature]
T = [3]
"""


def study_text(name='"s"', teacher='"t"', study_extra="", teacher_extra="", extra=""):
    return (
        BASE.format(
            name=name, teacher=teacher, study_extra=study_extra, teacher_extra=teacher_extra
        )
        + extra
    )


def dry_run(tmp_path: Path, text: str, *args: str):
    path = tmp_path / "study.toml"
    path.write_text(text)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["study", "run", str(path), "--out", str(out), "--dry-run", "--device", "cpu", *args]
    )
    return result, out


def assert_refused(result, out: Path, *parts: str) -> str:
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line, line
    assert "study.toml: " in line, line
    for part in parts:
        assert part in line, line
    assert not out.exists()  # refused before anything was written
    return line


NAMES = [
    "../../escaped",
    "/abs/olute",
    "a/b",
    "",
    ".",
    "..",
    ".hidden",
    "-rf",
    "x" * (MAX_NAME_CHARS + 1),
    "x" * 250,
    "=HYPERLINK(1)",
    "a\u202eb",
    "a\nb",
    "a\x1b[2J",
    "tab\tname",
    "späte",
]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_unsafe_study_names_are_refused(tmp_path, name):
    result, out = dry_run(tmp_path, study_text(name=json.dumps(name)))
    assert_refused(result, out, "study.name")


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_unsafe_teacher_names_are_refused(tmp_path, name):
    result, out = dry_run(tmp_path, study_text(teacher=json.dumps(name)))
    line = assert_refused(result, out, "teacher[0].name")
    assert "\x1b" not in line and "\u202e" not in line


def test_safe_names_at_the_length_limit_pass(tiny_data, tmp_path):
    name = "a" * MAX_NAME_CHARS
    result, _ = dry_run(tmp_path, study_text(name=json.dumps(name), teacher=json.dumps(name)))
    assert result.exit_code == 0, result.output
    # the longest file name a report makes from a teacher name, and its atomic temporary
    longest = f".entropy_per_class_{name}.svg.abcdefgh.part"
    assert len(longest.encode()) < 255


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("[loss]\nT = [3, 150]\n", "loss.T"),
        ("[loss]\nT = [3]\n[experiments.noise]\nnoise = ['normal:0.1']\nT = [101]\n", "noise.T"),
    ],
)
def test_temperature_above_kd_loss_bound_is_refused_at_load(tmp_path, table, key):
    from rbkd.config import KD_MAX_TEMPERATURE

    result, out = dry_run(tmp_path, study_text(extra=table))
    assert_refused(result, out, key, f"above {KD_MAX_TEMPERATURE:g}")


@pytest.mark.parametrize(
    ("where", "text", "key"),
    [
        ("teacher", "seed = -1", "teacher[0].seed"),
        ("teacher", "seed = 9223372036854775808", "teacher[0].seed"),
        ("study", "seeds = [0, -1]", "study.seeds"),
        ("study", "limit = 9223372036854775808", "study.limit"),
        ("extra", "[experiments.batch_sweep]\nbatch_sizes = [50]\nseed = -3\n", "batch_sweep.seed"),
        ("extra", "[teacher_defaults]\nseed = -2\n", "teacher_defaults.seed"),
    ],
)
def test_out_of_range_integers_are_refused_at_load(tmp_path, where, text, key):
    kwargs = {"teacher": "teacher_extra", "study": "study_extra", "extra": "extra"}
    result, out = dry_run(tmp_path, study_text(**{kwargs[where]: text}))
    assert_refused(result, out, key)


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf", "0", "-1e-3"])
def test_batch_sweep_lr_must_be_finite_and_positive(tmp_path, lr):
    extra = f"[experiments.batch_sweep]\nbatch_sizes = [50]\nlr = {lr}\n"
    result, out = dry_run(tmp_path, study_text(extra=extra))
    assert_refused(result, out, "experiments.batch_sweep.lr")


def test_a_huge_grid_is_counted_without_expanding_it_and_refused(tmp_path):
    seeds = ", ".join(map(str, range(1000)))
    temps = ", ".join(str(t) for t in range(1, 101))
    text = study_text(
        study_extra=f"seeds = [{seeds}]",
        extra=f"[loss]\nT = [{temps}]\n[experiments.missing_class]\n",
    )
    start = time.perf_counter()
    result, out = dry_run(tmp_path, text)
    line = assert_refused(result, out, "study.max_runs", "1,001,001 runs", "10,000")
    assert time.perf_counter() - start < 30, "counted, not expanded"
    # the count is arithmetic and equals the expansion (before merging identical runs)
    path = tmp_path / "ok.toml"
    path.write_text(text.replace("[study]\n", "[study]\nmax_runs = 2000000\n", 1))
    start = time.perf_counter()
    study = load_study(path)
    assert time.perf_counter() - start < 10
    assert count_runs(study) == (1, 1_001_000), line


def test_max_runs_lets_a_large_grid_through_and_dry_run_prints_the_count_first(tiny_data, tmp_path):
    seeds = ", ".join(map(str, range(300)))
    text = study_text(study_extra=f"seeds = [{seeds}]\nmax_runs = 301")
    result, _ = dry_run(tmp_path, text)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("301 of 301 runs to do"), lines[0]
    assert len(lines) < 250 and "... and 101 more runs (101 to do)" in lines[-1]
    refused, out = dry_run(tmp_path, text.replace("max_runs = 301", "max_runs = 300"))
    assert_refused(refused, out, "study.max_runs", "301 runs")


@pytest.mark.parametrize("path", shipped_studies("image"), ids=lambda p: p.name)
def test_the_count_matches_the_expansion(path):
    study = load_study(path)
    teachers, students = count_runs(study)
    assert students == sum(len(cell[5]) for cell in _student_specs(study))
    plan = make_plan(study, Path("unused"), "0" * 64, "cpu")
    assert len(plan.teachers) <= teachers and len(plan.students) <= students


def test_equal_noise_spellings_are_one_run(tiny_data, tmp_path):
    extra = '[experiments.noise]\nnoise = ["normal:0.05", "normal:5e-2", " Normal:0.050"]\n'
    result, _ = dry_run(tmp_path, study_text(extra=extra))
    assert result.exit_code == 0, result.output
    # the teacher, its temperature student, one noise student (T = 9, the default)
    assert result.output.startswith("3 of 3 runs to do"), result.output
    assert result.output.count("noise normal:0.05") == 1
    path = tmp_path / "study.toml"
    assert load_study(path)["experiments"]["noise"]["noise"] == ["normal:0.05"]


@pytest.fixture(scope="module")
def short_teacher(tiny_data_root, tmp_path_factory):
    """A teacher trained by `rbkd train-teacher --limit 100` (the tiny train split has 200)."""
    folder = tmp_path_factory.mktemp("teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        args = ["train-teacher", "--capacity", "small", "--epochs", "1", "--batch-size", "50"]
        args += ["--limit", "100", "--device", "cpu", "--no-progress", "--out", str(folder / "t1")]
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return folder / "t1"


EXTERNAL = """
[study]
name = "ext"
{limit}

[[teacher]]
name = "t1"
run = "{run}"

[experiments.temperature]
T = [3]
"""


@pytest.mark.parametrize("limit", ["limit = 150", ""])
def test_an_external_teacher_trained_on_fewer_examples_is_refused_at_plan_time(
    short_teacher, tiny_data, tmp_path, limit
):
    result, out = dry_run(tmp_path, EXTERNAL.format(limit=limit, run=short_teacher))
    line = assert_refused(result, out, "teacher[0].run", "first 100 training examples")
    assert "limit = 100" in line and "[study]" in line and "--allow-partial" not in line
    ok, _ = dry_run(tmp_path, EXTERNAL.format(limit="limit = 100", run=short_teacher))
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("1 of 2 runs to do"), ok.output


FINISHED = """
[study]
name = "fin"

[[teacher]]
name = "t"
capacity = "small"
epochs = 1
batch_size = 50

[student]
epochs = 1
batch_size = 50

[experiments.temperature]
T = [3, 9]
student = "baseline"
"""


@pytest.fixture(scope="module")
def finished(tiny_data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    (folder / "fin.toml").write_text(FINISHED)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        args = ["study", "run", str(folder / "fin.toml"), "--out", str(folder / "out")]
        result = runner.invoke(app, [*args, "--device", "cpu", "--no-progress", "--no-report"])
    assert result.exit_code == 0, result.output
    return folder / "out"


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    return out


def _report(out: Path):
    return runner.invoke(app, ["study", "report", str(out), "--format", "svg"])


@pytest.mark.parametrize("damage", ["deleted", "bogus", "one-row", "empty"])
def test_report_rebuilds_a_results_file_that_disagrees_with_the_run_folders(
    finished, tiny_data, tmp_path, damage
):
    out = _copy(finished, tmp_path)
    results = out / "results.jsonl"
    good = results.read_text()
    rows = [json.loads(line) for line in good.splitlines()]
    assert len(rows) == 2
    if damage == "deleted":
        results.unlink()
    elif damage == "bogus":
        results.write_text(json.dumps({**rows[0], "key": "f" * 64, "test_accuracy": 1.0}) + "\n")
    elif damage == "one-row":
        results.write_text(json.dumps(rows[0]) + "\n")
    else:
        results.write_text("")
    result = _report(out)
    assert result.exit_code == 0, result.output
    assert "rebuilt the tables from the 2 finished student runs" in result.output
    assert results.read_text() == good  # written back, row for row as the study wrote it
    report = (out / "report" / "report.md").read_text()
    assert "0 students" not in report
    again = _report(out)  # now consistent: nothing to say
    assert again.exit_code == 0 and "rebuilt" not in again.output


def test_report_refuses_in_one_line_when_the_tables_cannot_be_rebuilt(
    finished, tmp_path, monkeypatch
):
    out = _copy(finished, tmp_path)
    (out / "results.jsonl").unlink()
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("RBKD_DATA", str(empty))  # the study's data is not here (or other data)
    result = runner.invoke(
        app, ["study", "report", str(out), "--data-dir", str(empty), "--format", "svg"]
    )
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and "results.jsonl is missing" in line and "rbkd study run" in line
    assert not (out / "results.jsonl").exists()


def test_experiment_teacher_names_from_folders_are_safe(tmp_path):
    from rbkd.study.experiments import _teachers
    from rbkd.study.schema import check_name

    runs = [tmp_path / "a b", tmp_path / "x" / "a b", tmp_path / ".hid", tmp_path / ("y" * 300)]
    names = [t["name"] for t in _teachers(runs)]
    assert len(set(names)) == len(names)
    assert all(check_name(n) is None for n in names), names
