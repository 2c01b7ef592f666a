"""Studies that compare labelled with unlabelled transfer (issue 15), on the tiny dataset:
`transfer_labels` in [loss] or an experiment is a grid dimension; an unlabelled cell is pure
distillation (alpha 1, its loop sees no label), another run with its own key, a column of the
tables and its own curve in the report, and `rbkd rerun` repeats it."""

from __future__ import annotations

import json

import pytest
from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.study import load_study
from rbkd.study.plan import count_runs
from rbkd.study.results import read_jsonl
from rbkd.study.schema import StudyFileError

runner = CliRunner()

STUDY = """
[study]
name = "labels"
seeds = [0]

[loss]
T = [9]
alpha = 0.9

[student]
epochs = 1
batch_size = 50

[[teacher]]
name = "small"
capacity = "small"
epochs = 1
batch_size = 50

[experiments.temperature]
student = "baseline"
transfer_labels = ["labelled", "unlabelled"]

[experiments.missing_class]
classes = [1]
student = "baseline"
label_smoothing = [0.5]
transfer_labels = ["labelled", "unlabelled"]
"""


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=160)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def study_out(tiny_data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("labels")
    (folder / "labels.toml").write_text(STUDY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        result = invoke("study", "run", folder / "labels.toml", "--out", folder / "out",
                        "--device", "cpu", "--no-progress", "--json")  # fmt: skip
    return folder / "out", json.loads(result.stdout)


def test_a_grid_runs_labelled_and_unlabelled_students_as_different_runs(study_out):
    out, summary = study_out
    rows = read_jsonl(out / "results.jsonl")
    # temperature: 1 T x 2; missing class: (1 T x 2 + 1 label smoothing, run labelled only) x 1
    assert len(rows) == 5 and len({r["key"] for r in rows}) == 5
    unlabelled = [r for r in rows if r["transfer_labels"] == "unlabelled"]
    labelled = [r for r in rows if r["transfer_labels"] == "labelled"]
    assert len(unlabelled) == 2 and len(labelled) == 3
    assert {r["alpha"] for r in unlabelled} == {1.0}  # pure distillation, whatever [loss] says
    assert {r["alpha"] for r in labelled} == {0.9}
    assert all(r["teacher"] == "small" for r in unlabelled)  # label smoothing needs labels
    assert all("-unlabelled-" in r["run_dir"] for r in unlabelled)
    for r in unlabelled:
        report = json.loads((out / r["run_dir"] / "report.json").read_text())
        assert report["transfer"]["labels"] == "unlabelled"
        assert report["metrics"]["train_ce_loss"] is None  # the loop saw no label
    missing = next(r for r in unlabelled if r["experiments"] == ["missing_class"])
    assert missing["missing_class"] == 1 and missing["transfer_size"] == 180  # chosen by label
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "transfer_labels" in header
    # The report draws the unlabelled students as a loss of their own
    text = (out / "report" / "report.md").read_text()
    assert "kl, unlabelled" in text
    assert "students with unlabelled transfer: alpha = 1" in text


def test_plan_counts_and_keys(tmp_path, tiny_data):
    path = tmp_path / "labels.toml"
    path.write_text(STUDY)
    study = load_study(path)
    # temperature 1 T x 2 transfer labels; missing class 1 T x 2 + label smoothing once
    assert count_runs(study) == (1, 2 + 3)
    # Saying "labelled" keeps every key a study without the option had
    plain = STUDY.replace('transfer_labels = ["labelled", "unlabelled"]', "")
    said = STUDY.replace(
        'transfer_labels = ["labelled", "unlabelled"]', 'transfer_labels = "labelled"'
    )
    keys = []
    for i, text in enumerate((plain, said)):
        p = tmp_path / f"s{i}.toml"
        p.write_text(text)
        result = invoke("study", "run", p, "--out", tmp_path / f"o{i}", "--dry-run", "--json")
        keys.append(sorted(r["key"] for r in json.loads(result.stdout)["runs"]))
    assert keys[0] == keys[1] and len(keys[0]) == 4


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (('transfer_labels = ["labelled", "unlabelled"]', 'transfer_labels = ["none"]'),
         'experiments.temperature.transfer_labels: must be "labelled", "unlabelled" or a list'),
        (("alpha = 0.9", 'alpha = 0.9\ntransfer_labels = "unlabelled"\ndivergence = "dkd"'),
         "experiments.missing_class.transfer_labels: divergence dkd splits off"),
        (("alpha = 0.9", 'alpha = 0.9\ntransfer_labels = ["unlabelled", "unlabelled"]'),
         "loss.transfer_labels: must be"),
    ],
)  # fmt: skip
def test_bad_transfer_labels_are_one_line(tmp_path, change, says):
    path = tmp_path / "bad.toml"
    path.write_text(STUDY.replace(*change, 1))
    with pytest.raises(StudyFileError, match="^" + str(path).replace(".", r"\.")) as e:
        load_study(path)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_an_unlabelled_study_cell_reruns_to_the_same_weights(study_out, tiny_data, tmp_path):
    out, _ = study_out
    row = next(r for r in read_jsonl(out / "results.jsonl") if r["transfer_labels"] == "unlabelled")
    run_dir = out / row["run_dir"]
    invocation = json.loads((run_dir / "config.json").read_text())["provenance"]["invocation"]
    assert invocation["command"] == "distill" and invocation["options"]["unlabelled"] is True
    assert invocation["options"]["alpha"] == 1.0
    result = invoke("rerun", run_dir, "--out", tmp_path / "again", "--json", "--no-progress")
    comparison = json.loads(result.stdout)
    assert comparison["reproduced"] is True, comparison
