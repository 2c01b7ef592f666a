"""Studies end to end on the tiny dataset: a declared study runs once, reruns train nothing,
extensions run only the new cells, a killed study continues to the same numbers, and the
shipped study files are valid. Several runners of one study: tests/test_study_runners.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import shipped_studies
from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.study import load_study, run_study
from rbkd.study.results import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

MINI = """
[study]
name = "mini"
seeds = [0]

[loss]
T = [3, 9]

[student]
epochs = 2
batch_size = 50

[[teacher]]
name = "small"
capacity = "small"
epochs = 1
batch_size = 50

[experiments.missing_class]
classes = [1]
student = "baseline"
label_smoothing = [0.5]

[experiments.temperature]
T = [9]

[experiments.batch_sweep]
capacity = "small"
batch_sizes = [50, 100]
epochs = [1]
"""


def write_study(folder: Path, text: str = MINI) -> Path:
    path = folder / "mini.toml"
    path.write_text(text)
    return path


def quiet_run(path: Path, out: Path, **kwargs):
    return run_study(
        load_study(path), out, device="cpu", log=lambda _: None, report=False, **kwargs
    )


def accuracies(out: Path) -> dict[str, float]:
    return {r["key"]: r["test_accuracy"] for r in read_jsonl(out / "results.jsonl")}


@pytest.fixture(scope="module")
def clean(tiny_data_root, tmp_path_factory):
    """The mini study run once, uninterrupted: the reference every other run must match."""
    folder = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        run = quiet_run(write_study(folder), folder / "out")
    return folder / "out", run


def test_study_runs_every_cell_once_and_a_rerun_trains_nothing(clean, tiny_data, tmp_path):
    out, run = clean
    # one shared teacher: the study's "small" is also the sweep's batch-50 cell
    assert [t.names for t in run.plan.teachers] == [["small", "small-b50-e1"], ["small-b100-e1"]]
    assert len(run.trained) == len(run.plan.teachers) + len(run.plan.students)
    rows = read_jsonl(out / "results.jsonl")
    # missing class: 2 T (teacher) + 1 A (label smoothing); temperature: 1
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    assert {tuple(r["experiments"]) for r in rows} == {("missing_class",), ("temperature",)}
    teachers = read_jsonl(out / "teachers.jsonl")
    assert [t["name"] for t in teachers] == ["small", "small-b50-e1", "small-b100-e1"]
    assert teachers[0]["key"] == teachers[1]["key"] != teachers[2]["key"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["study", "dataset", "key", "experiments"]
    assert "acc_Trouser" in header and "missing_class_accuracy" in header
    # headers are identifiers (pandas' df.acc_T_shirt_top, R, SQL): no '/', '-' or space
    assert [h for h in header if not h.isidentifier()] == []
    assert {"acc_T_shirt_top", "acc_Ankle_boot"} <= set(header)
    again = quiet_run(out.parent / "mini.toml", out)
    assert again.trained == [] and accuracies(out) == {r["key"]: r["test_accuracy"] for r in rows}


def test_adding_a_temperature_runs_only_the_new_cells(clean, tiny_data, tmp_path):
    import shutil

    src, _ = clean
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = accuracies(out)
    path = write_study(tmp_path, MINI.replace("T = [3, 9]", "T = [3, 6, 9]", 1))
    planned = quiet_run(path, out, dry_run=True)
    todo = [
        t
        for t in planned.plan.teachers + planned.plan.students
        if planned.states[t.key].status != "done"
    ]
    assert [(t.spec.T, t.spec.exclude_classes) for t in todo] == [(6.0, [1])]
    result = runner.invoke(
        app, ["study", "run", str(path), "--out", str(out), "--dry-run", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "1 of 7 runs to do" in result.output and "[to run] missing_class" in result.output
    run = quiet_run(path, out)
    assert len(run.trained) == 1
    after = accuracies(out)
    assert len(after) == len(before) + 1
    assert all(after[k] == v for k, v in before.items())


def test_accuracy_columns_are_identifiers_even_for_odd_class_names():
    from rbkd.study.results import accuracy_columns

    assert accuracy_columns(["T-shirt/top", "Ankle boot", "-neg", "3"]) == [
        "acc_T_shirt_top",
        "acc_Ankle_boot",
        "acc_neg",
        "acc_3",
    ]
    # a name with nothing left, or two names that would share a header: the class indices
    assert accuracy_columns(["cat", "?!"]) == ["acc_0", "acc_1"]
    assert accuracy_columns(["a b", "a-b", "c"]) == ["acc_0", "acc_1", "acc_2"]


def test_study_run_json_says_what_ran(clean, tiny_data, tmp_path):
    """`rbkd study run --json`: one document on stdout (what would run with --dry-run, what
    ran without), the summary lines on stderr."""
    import shutil

    src, _ = clean
    out = tmp_path / "out"
    shutil.copytree(src, out)
    path = write_study(tmp_path, MINI.replace("T = [3, 9]", "T = [3, 6, 9]", 1))
    args = ["study", "run", str(path), "--out", str(out), "--device", "cpu", "--no-progress"]
    args += ["--no-report", "--json"]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["study"] == "mini" and plan["dry_run"] is True
    assert (plan["total"], plan["ran"], plan["to_do"]) == (7, 0, 1)
    new = [r for r in plan["runs"] if r["status"] != "done"]
    assert len(new) == 1 and new[0]["status"] == "new" and new[0]["kind"] == "student"
    assert "T=6" in new[0]["label"] and "files" not in plan
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ran = json.loads(result.stdout)  # the whole of stdout
    assert ran["dry_run"] is False and (ran["total"], ran["ran"], ran["to_do"]) == (7, 1, 0)
    assert [r["key"] for r in ran["runs"] if r["status"] == "ran"] == [new[0]["key"]]
    assert {r["status"] for r in ran["runs"]} == {"ran", "done"}
    assert ran["files"]["results_csv"] == str(out / "results.csv")
    assert ran["files"]["report"] is None and ran["wall_time_s"] > 0
    assert "ran 1 of 7 runs" in result.stderr


def test_killed_study_continues_to_the_same_numbers(clean, tiny_data, tmp_path):
    reference, _ = clean
    path = write_study(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rbkd.cli.app", "study", "run", str(path), "--out", str(out)]
    cmd += ["--device", "cpu", "--no-progress", "--no-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("students/*/report.json"))) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    rows = read_jsonl(out / "results.jsonl") if (out / "results.jsonl").exists() else []
    for r in rows:  # every row is a finished run: no half row, nothing marked done that is not
        assert (out / r["run_dir"] / "report.json").is_file()
    run = quiet_run(path, out)
    assert len(run.trained) < len(run.plan.teachers) + len(run.plan.students)
    assert accuracies(out) == accuracies(reference)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[study]\nname='x'\nbogus=1\n[experiments.entropy]\n", "x.toml: study.bogus: unknown key"),
        (
            "[study]\nname='x'\n[loss]\nT=[3,-1]\n[experiments.entropy]\n",
            "loss.T: every value must be > 0",
        ),
        (
            "[study]\nname='x'\n[loss]\nalpha='high'\n[experiments.entropy]\n",
            "loss.alpha: must be a number",
        ),
        (
            "[study]\nname='x'\n[[teacher]]\nname='t'\ncapacity='huge'\n[experiments.entropy]\n",
            "teacher[0].capacity: must be one of small, large",
        ),
        (
            "[study]\nname='x'\n[[teacher]]\nname='t'\ncapacity='small'\nepochs=0\n[experiments.entropy]\n",
            "teacher[0].epochs: must be >= 1",
        ),
        (
            "[study]\nname='x'\n[[teacher]]\nname='t'\ncapacity='small'\n[experiments.missing_class]\nteachers=['u']\n",
            "experiments.missing_class.teachers: no teacher named 'u'; the study has t",
        ),
        (
            "[study]\nname='x'\n[experiments.missing_class]\n",
            "experiments.missing_class needs at least one [[teacher]]",
        ),
        (
            "[study]\nname='x'\n[[teacher]]\nname='t'\ncapacity='small'\n[experiments.missing_class]\nclasses=[10]\n",
            "classes: class 10 does not exist",
        ),
        (
            "[study]\nname='x'\n[experiments.batch_sweep]\nepochs=[2]\n",
            "experiments.batch_sweep.batch_sizes: missing",
        ),
        (
            "[study]\nname='x'\n[experiments.noise]\nnoise=['gauss:1']\n",
            "experiments.noise.noise: cannot read noise 'gauss:1'",
        ),
        ("[study]\nname='x'\n[experiments.wat]\n", "experiments.wat: unknown key"),
        ("[study]\nname='x'\n", "experiments: missing"),
        ("[study\nname='x'\n", "not valid TOML"),
    ],
)
def test_bad_study_files_are_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text)
    result = runner.invoke(app, ["study", "run", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2  # a usage error, as a bad --config file is
    line = result.output.strip()
    assert "\n" not in line and message in line, line
    assert not (tmp_path / "o").exists()  # refused before anything ran


@pytest.mark.parametrize("path", shipped_studies("image"), ids=lambda p: p.name)
def test_shipped_studies_are_valid_and_plan_their_thesis_grids(path):
    from rbkd.study.plan import make_plan

    study = load_study(path)
    plan = make_plan(study, Path("/nonexistent"), "0" * 64, "cpu")
    names = {n for t in plan.teachers for n in t.names}
    keys = [t.key for t in plan.teachers + plan.students]
    assert len(keys) == len(set(keys))
    if "divergences" in path.name:  # one experiment under five divergences (its own tests:
        return  # tests/test_divergence_toolkit.py)
    assert {"small", "large-b4096"} <= names
    assert {"missing_class", "transfer_set", "temperature", "batch_sweep"} <= set(
        study["experiments"]
    )
    if "full" in path.name:
        assert study["loss"]["T"] == [3, 6, 9, 12, 15, 18, 20]
        assert study["experiments"]["missing_class"]["classes"] == list(range(10))
        assert study["experiments"]["batch_sweep"]["batch_sizes"][0] == 16
        assert study["experiments"]["batch_sweep"]["batch_sizes"][-1] == 8192


def test_quick_study_dry_run_on_generated_data(tiny_data, tmp_path):
    result = runner.invoke(
        app,
        ["study", "run", str(ROOT / "studies/fashion-mnist-quick.toml"), "--limit", "300"]
        + ["--out", str(tmp_path / "q"), "--dry-run", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    study = load_study(ROOT / "studies/fashion-mnist-quick.toml")
    n = len(study["teachers"]) + 2  # the batch sweep adds its two 3-epoch teachers
    lines = [line for line in result.output.splitlines() if line.startswith("[")]
    assert sum(line.startswith("[to run] teacher") for line in lines) == n
    assert f"{len(lines)} of {len(lines)} runs to do" in result.output


def test_distill_rerun_reuses_and_another_run_is_not_overwritten(clean, tiny_data, tmp_path):
    out, run = clean
    teacher = run.plan.teachers[0].run_dir
    args = ["distill", "--teacher", str(teacher), "--T", "9", "--student", "baseline"]
    args += ["--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "s")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "already done" in second.output
    assert json.loads((tmp_path / "s" / "report.json").read_text()) == report
    other = runner.invoke(app, [a if a != "9" else "3" for a in args])
    assert other.exit_code == 1 and "already holds run" in other.output
    assert json.loads((tmp_path / "s" / "report.json").read_text()) == report


def test_partial_soft_labels_are_an_error_unless_allowed(clean, tiny_data, tmp_path):
    from rbkd.soft_label_file import read_soft_labels, write_soft_labels

    _, run = clean
    teacher = run.plan.teachers[0].run_dir
    full = read_soft_labels(teacher / "soft_labels_train.safetensors")
    part = tmp_path / "part.safetensors"
    write_soft_labels(
        part,
        full.logits[:50],
        full.labels[:50],
        full.indices[:50],
        dataset="fashion-mnist",
        split="train",
        teacher_run=teacher,
        teacher_sha256="0" * 64,
    )
    base = ["distill", "--soft-labels", str(part), "--epochs", "1", "--device", "cpu"]
    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1
    assert "covers 50 of the 200 examples" in refused.output and "--allow-partial" in refused.output
    allowed = runner.invoke(
        app, [*base, "--allow-partial", "--out", str(tmp_path / "b"), "--no-progress"]
    )
    assert allowed.exit_code == 0, allowed.output
    assert "the 50 of 200 examples the soft labels cover" in allowed.output
    assert json.loads((tmp_path / "b" / "report.json").read_text())["transfer"]["size"] == 50
    limited = runner.invoke(
        app, [*base, "--limit", "50", "--out", str(tmp_path / "c"), "--no-progress"]
    )
    assert limited.exit_code == 0, limited.output


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_study_report_command_writes_the_figures(clean, tmp_path):
    out, _ = clean
    result = runner.invoke(
        app,
        [
            "study",
            "report",
            str(out),
            "--format",
            "svg",
            "--label",
            "small=Small teacher",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Small teacher" in text and ".svg" in text
    svgs = list((tmp_path / "r").glob("*.svg"))
    assert svgs and all(p.read_bytes().lstrip().startswith((b"<?xml", b"<svg")) for p in svgs)
    bad = runner.invoke(app, ["study", "report", str(out), "--format", "gif"])
    assert bad.exit_code == 2 and "'gif' is not one of 'png', 'pdf', 'svg'" in bad.output
