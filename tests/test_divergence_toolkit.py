"""kd_loss's divergences through the whole toolkit (issue 14 item 4): `rbkd distill --divergence`,
`rbkd.distill(divergence=...)`, run keys, `rbkd rerun`, study files, the plan and the report, on
the tiny dataset. Forward KL, the default, keeps every key and table it had before.

Until the C++ and Triton kernels compute every divergence, the runs that train one here use the
torch backend (RBKD_BACKEND=torch); forward KL runs on the default backend."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.config import DIVERGENCES, DistillSpec, LossSpec, TrainConfig
from rbkd.study import load_study, run_study
from rbkd.study.keys import student_dir_name, student_key
from rbkd.study.plan import count_runs, make_plan
from rbkd.study.results import RESULT_COLUMNS, read_jsonl
from rbkd.study.schema import StudyFileError, parse_study

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FP, TEACHER = "f" * 64, {"teacher": "t" * 64}


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ keys


def test_the_toolkit_knows_every_divergence_of_kd_loss():
    from rbkd.ops.args import DIVERGENCES as OPS

    assert tuple(OPS) == DIVERGENCES
    assert LossSpec() == LossSpec(**{k: v for k, v in _kd_loss_defaults().items()})


def _kd_loss_defaults() -> dict:
    import inspect

    from rbkd.ops import kd_loss

    params = inspect.signature(kd_loss).parameters
    names = ("divergence", "beta", "skew", "dkd_alpha", "dkd_beta", "standardize")
    return {n: params[n].default for n in names}


# Recorded from the code before divergences existed: the keys and folders of default runs (and
# so docs/reproduction's results and every user's run folders) must never change.
PINNED_STUDENT_KEY = "94f1c7be02de1b9b5c8387745adda4d848e67759f11f51e1fc110e86de4aea63"
PINNED_LS_KEY = "795479b50f0639c351fb5ab04271efa467d941515012463a27c5a96884ce9351"
PINNED_PLAN = [
    ("20ba9b246b938485", "student-fashion-mnist-general-T9-x1-e1-s0-20ba9b246b93"),
    ("eb2d0e63b5a4c276", "student-fashion-mnist-general-ls0.1-x1-e1-s0-eb2d0e63b5a4"),
    ("60dd5eea3f82ef1d", "student-fashion-mnist-general-T9-uniform0.1-e1-s0-60dd5eea3f82"),
]
PIN_STUDY = {
    "study": {"name": "pin", "seeds": [0]},
    "loss": {"T": [9]},
    "student": {"epochs": 1},
    "teacher": [{"name": "small", "capacity": "small", "epochs": 1}],
    "experiments": {
        "missing_class": {"classes": [1], "label_smoothing": [0.1]},
        "noise": {"noise": ["uniform:0.1"]},
    },
}


def test_default_runs_keep_the_keys_and_folders_they_had():
    spec, cfg = DistillSpec(T=9.0, exclude_classes=[1]), TrainConfig()
    key = student_key(spec, cfg, FP, TEACHER)
    assert key == PINNED_STUDENT_KEY
    assert student_dir_name(spec, "fashion-mnist", cfg, key) == (
        "student-fashion-mnist-general-T9-x1-e10-s0-94f1c7be02de"
    )
    # the defaults spelt out, and options forward KL does not use, are still forward KL
    for loss in (LossSpec("kl", 0.5, 0.1, 1.0, 8.0, False), LossSpec(beta=0.3, dkd_beta=2)):
        assert student_key(spec.replace(loss=loss), cfg, FP, TEACHER) == PINNED_STUDENT_KEY
    ls = DistillSpec(label_smoothing=0.1)
    assert student_key(ls, cfg, FP, {"label_smoothing": 0.1}) == PINNED_LS_KEY
    plan = make_plan(parse_study(PIN_STUDY, Path("pin.toml")), Path("out"), FP, "cpu")
    assert [(t.key[:16], t.run_dir.name) for t in plan.students] == PINNED_PLAN


def test_another_divergence_is_another_run():
    spec, cfg = DistillSpec(T=9.0, exclude_classes=[1]), TrainConfig()
    losses = [
        LossSpec(divergence=d) for d in DIVERGENCES if d != "kl"
    ] + [  # an option the divergence uses, and standardize, change the run too
        LossSpec("jsd", beta=0.9),
        LossSpec("skew_kl", skew=0.3),
        LossSpec("dkd", dkd_alpha=2.0),
        LossSpec("dkd", dkd_beta=4.0),
        LossSpec(standardize=True),
    ]
    keys = {student_key(spec.replace(loss=loss), cfg, FP, TEACHER) for loss in losses}
    assert len(keys) == len(losses) and PINNED_STUDENT_KEY not in keys
    # ... an option it does not use does not
    tvd = spec.replace(loss=LossSpec("tvd"))
    assert student_key(tvd.replace(loss=LossSpec("tvd", beta=0.1)), cfg, FP, TEACHER) == (
        student_key(tvd, cfg, FP, TEACHER)
    )
    name = student_dir_name(spec.replace(loss=LossSpec("jsd", beta=0.9)), "mnist", cfg, "a" * 64)
    assert name == "student-mnist-general-T9-jsd-b0.9-x1-e10-s0-aaaaaaaaaaaa"


# ------------------------------------------------------------------ rbkd distill, rerun


@pytest.fixture(scope="module")
def teacher(tiny_data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("div")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        invoke(
            "train-teacher", "--capacity", "small", "--epochs", "1", "--batch-size", "50",
            "--device", "cpu", "--no-progress", "--out", folder / "t",
        )  # fmt: skip
    return folder / "t"


@pytest.fixture(scope="module")
def tvd_student(teacher, tiny_data_root):
    out = teacher.parent / "tvd"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        mp.setenv("RBKD_BACKEND", "torch")
        invoke(
            "distill", "--teacher", teacher, "--divergence", "tvd", "--exclude-class", "1",
            "--epochs", "1", "--batch-size", "50", "--limit", "120", "--device", "cpu",
            "--no-progress", "--out", out,
        )  # fmt: skip
    return out


def test_distill_trains_with_another_divergence_and_records_it(tvd_student):
    report = json.loads((tvd_student / "report.json").read_text())
    assert report["loss"] == {"divergence": "tvd", "standardize": False}
    assert report["transfer"]["excluded_classes"] == [1]
    config = json.loads((tvd_student / "config.json").read_text())
    assert config["objective"]["loss"] == {"divergence": "tvd", "standardize": False}
    assert config["extra_config"]["spec"]["loss"]["divergence"] == "tvd"
    options = config["provenance"]["invocation"]["options"]
    assert options["divergence"] == "tvd" and options["beta"] == 0.5


def test_the_default_divergence_records_what_it_always_did(teacher, tiny_data, tmp_path):
    out = tmp_path / "kl"
    invoke(
        "distill", "--teacher", teacher, "--epochs", "1", "--limit", "120", "--device", "cpu",
        "--no-progress", "--out", out,
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert "loss" not in config["objective"]  # an old killed run still resumes
    assert json.loads((out / "report.json").read_text())["loss"] == {
        "divergence": "kl",
        "standardize": False,
    }


def test_rerun_repeats_the_divergence(tvd_student, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RBKD_BACKEND", "torch")
    again = tmp_path / "tvd-again"
    result = invoke("rerun", tvd_student, "--out", again, "--no-progress")
    assert "reproduced: identical final metrics and weights" in result.output, result.output
    report = json.loads((again / "report.json").read_text())
    original = json.loads((tvd_student / "report.json").read_text())
    assert report["loss"] == original["loss"] and report["key"] == original["key"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--beta", "1.5"], ["--beta must be in [0, 1]", "1.5"]),
        (["--beta", "nan"], ["--beta"]),
        (["--skew", "1"], ["--skew must be in [0, 1)"]),
        (["--dkd-alpha", "-1"], ["--dkd-alpha must be >= 0"]),
        (["--dkd-beta", "inf"], ["--dkd-beta"]),
        (["--divergence", "kld"], ["--divergence", "'kld'", "reverse_kl"]),
        (["--divergence", "jsd", "--label-smoothing", "0.1"], ["--divergence jsd", "label-smooth"]),
        (["--standardize", "--noise", "uniform:0.1"], ["--standardize", "--noise"]),
    ],
)
def test_bad_divergence_options_are_one_line_usage_errors(args, fragments, tmp_path):
    source = [] if "--label-smoothing" in args else ["--teacher", tmp_path / "nowhere"]
    result = invoke("distill", *source, *args, "--out", tmp_path / "s", ok=False)
    one_line_error(result, *fragments)
    assert not (tmp_path / "s").exists()


def test_a_config_file_value_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('divergence = "jsd"\nbeta = 3\n')
    result = invoke("distill", "--teacher", tmp_path, "--config", path, ok=False)
    one_line_error(result, str(path), "--beta")


# ------------------------------------------------------------------ the Python API


def test_the_python_api_takes_the_divergence(monkeypatch):
    import rbkd

    monkeypatch.setenv("RBKD_BACKEND", "torch")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 12, generator=gen), torch.arange(64) % 4
    teacher = torch.nn.Linear(12, 4)
    results = {}
    for divergence in ("kl", "jsd", "dkd"):
        torch.manual_seed(0)
        student = torch.nn.Linear(12, 4)
        results[divergence] = rbkd.distill(
            student, (x, y), teacher=teacher, T=4, alpha=1.0, divergence=divergence, beta=0.2,
            epochs=1, batch_size=16, device="cpu",
        )  # fmt: skip
    weights = [r.model.weight.detach() for r in results.values()]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    with pytest.raises(ValueError, match=r"^beta must be in \[0, 1\], got 2"):
        rbkd.distill(torch.nn.Linear(12, 4), (x, y), teacher=teacher, divergence="jsd", beta=2)
    with pytest.raises(ValueError, match="^divergence must be one of kl, reverse_kl"):
        rbkd.distill(torch.nn.Linear(12, 4), (x, y), teacher=teacher, divergence="KL")


# ------------------------------------------------------------------ study files


STUDY = """
[study]
name = "div"
seeds = [0]

[loss]
T = [9]

[student]
epochs = 1
batch_size = 50

[[teacher]]
name = "small"
capacity = "small"
epochs = 1
batch_size = 50

[experiments.missing_class]
classes = [1]
label_smoothing = [0.5]
divergence = ["kl", "tvd", "dkd"]
"""


def test_a_divergence_list_plans_one_run_per_divergence(tmp_path):
    path = tmp_path / "div.toml"
    path.write_text(STUDY)
    study = load_study(path)
    plan = make_plan(study, tmp_path / "out", FP, "cpu")
    teacher_students = [t for t in plan.students if t.teacher is not None]
    assert [t.spec.loss.divergence for t in teacher_students] == ["kl", "tvd", "dkd"]
    assert len({t.key for t in plan.students}) == 4  # + one label smoothing, once
    assert count_runs(study) == (1, 4)
    # options a divergence does not use make no runs of their own; those it uses do
    grid = STUDY.replace('["kl", "tvd", "dkd"]', '["kl", "jsd"]\nbeta = [0.1, 0.9]')
    path.write_text(grid)
    study = load_study(path)
    plan = make_plan(study, tmp_path / "out", FP, "cpu")
    labels = [t.spec.loss.label() for t in plan.students if t.teacher is not None]
    assert labels == ["kl", "jsd (beta=0.1)", "jsd (beta=0.9)"]
    assert count_runs(study) == (1, len(plan.students))
    # [loss] sets every student experiment's list; an experiment's own list wins
    both = STUDY.replace("T = [9]", 'T = [9]\ndivergence = ["reverse_kl", "tvd"]')
    both += "\n[experiments.temperature]\nT = [9]\n"
    path.write_text(both)
    study = load_study(path)
    assert study["experiments"]["temperature"]["divergence"] == ["reverse_kl", "tvd"]
    assert study["experiments"]["missing_class"]["divergence"] == ["kl", "tvd", "dkd"]


def test_a_study_without_divergences_is_planned_as_before(tmp_path):
    path = tmp_path / "div.toml"
    path.write_text(STUDY.replace('divergence = ["kl", "tvd", "dkd"]\n', ""))
    plan = make_plan(load_study(path), tmp_path / "out", FP, "cpu")
    assert all(t.spec.loss == LossSpec() for t in plan.students)


@pytest.mark.parametrize(
    "edit, where, fragment",
    [
        (
            ('["kl", "tvd", "dkd"]', '["kl", "kld"]'),
            "experiments.missing_class.divergence",
            "'kld'",
        ),
        (
            ('["kl", "tvd", "dkd"]', '["kl", "kl"]'),
            "experiments.missing_class.divergence",
            "repeats",
        ),
        (('["kl", "tvd", "dkd"]', "[]"), "experiments.missing_class.divergence", "empty"),
        (('["kl", "tvd", "dkd"]', "3"), "experiments.missing_class.divergence", "one of"),
        (("T = [9]", "T = [9]\nbeta = 1.5"), "loss.beta", "[0, 1]"),
        (("T = [9]", "T = [9]\nskew = [0.1, 1.0]"), "loss.skew", "[0, 1)"),
        (("T = [9]", "T = [9]\ndkd_beta = -8"), "loss.dkd_beta", ">= 0"),
        (("T = [9]", "T = [9]\nstandardize = 1"), "loss.standardize", "true, false"),
        (("T = [9]", "T = [9]\ndivergance = 'tvd'"), "loss.divergance", "unknown key"),
        (
            ("label_smoothing = [0.5]", "label_smoothing = [0.5]\ndkd_alpha = 'one'"),
            "experiments.missing_class.dkd_alpha",
            "number",
        ),
        (
            (
                "T = [9]",
                "T = [9]\nstandardize = true\n[experiments.noise]\nnoise = ['uniform:0.1']",
            ),
            "loss.standardize",
            "noisy probabilities",
        ),
    ],
)
def test_bad_divergence_keys_name_the_file_and_the_key(edit, where, fragment, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(STUDY.replace(*edit))
    with pytest.raises(StudyFileError) as e:
        load_study(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {where}: ") and fragment in message, message
    assert "\n" not in message


def test_a_study_comparing_divergences_reports_one_table_each(tiny_data, tmp_path, monkeypatch):
    from rbkd.study.report import write_report

    monkeypatch.setenv("RBKD_BACKEND", "torch")
    path = tmp_path / "div.toml"
    path.write_text(STUDY.replace("[study]", "[study]\nlimit = 150", 1))
    out = tmp_path / "out"
    run = run_study(load_study(path), out, device="cpu", log=lambda _: None, report=False)
    assert len(run.trained) == 1 + 4
    rows = read_jsonl(out / "results.jsonl")
    assert sorted(str(r["divergence"]) for r in rows) == ["None", "dkd", "kl", "tvd"]
    dkd = next(r for r in rows if r["divergence"] == "dkd")
    assert (dkd["dkd_alpha"], dkd["dkd_beta"], dkd["beta"], dkd["standardize"]) == (
        1,
        8,
        None,
        False,
    )
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {"divergence", "beta", "skew", "dkd_alpha", "dkd_beta", "standardize"} <= set(
        RESULT_COLUMNS
    )
    assert sorted(r["divergence"] for r in table) == ["", "dkd", "kl", "tvd"]
    write_report(out)
    text = (out / "report" / "report.md").read_text()
    for divergence in ("kl", "tvd", "dkd (dkd_alpha=1, dkd_beta=8)"):
        title = f"teacher small, divergence {divergence}: accuracy (%) on the missing class"
        tables = [line for line in text.splitlines() if line.startswith("**") and title in line]
        assert len(tables) == 1, text
    assert "accuracy (%) on the missing class, per divergence" in text
    assert "label smoothing: accuracy (%) on the missing class" in text
    summary = text[text.index("## Results by experiment") :]
    assert "| teacher | T | divergence | label smoothing |" in summary


def test_the_shipped_divergence_study_plans_its_grid():
    path = ROOT / "studies" / "fashion-mnist-divergences.toml"
    study = load_study(path)
    quick = load_study(ROOT / "studies" / "fashion-mnist-quick.toml")
    mine = {t["name"]: t for t in study["teachers"]}
    theirs = {t["name"]: t for t in quick["teachers"]}
    assert mine == {n: theirs[n] for n in ("small", "large-b64")}  # the same teachers
    assert study["limit"] == quick["limit"] and study["student"] == quick["student"]
    assert count_runs(study) == (2, 10)
    plan = make_plan(study, Path("out"), FP, "cpu")
    divergences = [t.spec.loss.divergence for t in plan.students]
    assert divergences == ["kl", "reverse_kl", "jsd", "tvd", "dkd"] * 2
    assert {t.spec.T for t in plan.students} == {9.0} and all(
        t.spec.t_squared for t in plan.students
    )
