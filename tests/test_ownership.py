"""rbkd writes only into a folder it created or recognises as its own, or into a new file
(issue 13, "Data loss" and item 14's out= cases, item 17's spreadsheet formulas).

Every refusal is one line naming the path, exits 1 from the CLI (a domain error, like the other
usage errors handle_errors reports), and leaves what was there untouched. Replacing rbkd's own
file of the same origin (a rerun, regenerated soft labels, a redrawn figure) still works, and an
explicit --force replaces a foreign soft-label target.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from rbkd.cli.app import app
from typer.testing import CliRunner

import rbkd
from rbkd.data import load_dataset
from rbkd.study.results import RESULT_COLUMNS, write_results

runner = CliRunner()

STUDY = """
[study]
name = "{name}"
seeds = [0]

[loss]
T = [3]

[student]
epochs = 1
batch_size = 50

[[teacher]]
name = "small"
capacity = "small"
epochs = 1
batch_size = 50

[experiments.temperature]
T = [3]
"""


def one_line_error(result, *names: str) -> str:
    """The CLI's refusal: exit 1, one line on stderr naming every one of `names`."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def study_file(folder: Path, name: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name))
    return path


def run_study_cli(path: Path, out: Path):
    args = ["study", "run", str(path), "--out", str(out), "--limit", "100", "--device", "cpu"]
    return runner.invoke(app, [*args, "--no-report", "--no-progress"])


@pytest.fixture(scope="module")
def teacher_run(tiny_data_root, tmp_path_factory) -> Path:
    """A finished teacher run folder, trained through the CLI on 100 tiny examples."""
    out = tmp_path_factory.mktemp("teacher") / "t1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        result = runner.invoke(
            app,
            [
                "train-teacher",
                "--dataset",
                "fashion-mnist",
                "--capacity",
                "small",
                "--epochs",
                "1",
                "--batch-size",
                "50",
                "--limit",
                "100",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ],
        )
    assert result.exit_code == 0, result.output
    return out


# -- studies -------------------------------------------------------------------------------------


def test_a_study_never_writes_into_a_folder_of_the_users(tiny_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my own table\n")
    (mine / "study.toml").write_text("# my notes\n")
    result = run_study_cli(study_file(tmp_path, "own"), mine)
    one_line_error(result, str(mine), "results.csv")
    assert (mine / "results.csv").read_text() == "my own table\n"
    assert (mine / "study.toml").read_text() == "# my notes\n"
    assert sorted(p.name for p in mine.iterdir()) == ["results.csv", "study.toml"]  # no lock
    # --dry-run says the same, before anything
    dry = runner.invoke(app, ["study", "run", str(tmp_path / "own.toml"), "--out", str(mine)])
    one_line_error(dry, str(mine))


def test_two_studies_never_share_a_folder_and_the_same_study_resumes(tiny_data, tmp_path):
    out = tmp_path / "shared"
    first = run_study_cli(study_file(tmp_path, "first"), out)
    assert first.exit_code == 0, first.output
    table = (out / "results.csv").read_bytes()
    second = run_study_cli(study_file(tmp_path, "second"), out)
    line = one_line_error(second, str(out), "'first'", "'second'")
    assert "--out" in line
    assert (out / "results.csv").read_bytes() == table
    assert "first" in (out / "study.toml").read_text()
    again = run_study_cli(tmp_path / "first.toml", out)  # the same study: it continues
    assert again.exit_code == 0, again.output
    assert (out / "results.csv").read_bytes() == table


def test_a_study_folder_written_before_markers_is_recognised_by_its_study_json(tiny_data, tmp_path):
    import json

    out = tmp_path / "old"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"name": "other"}))
    result = run_study_cli(study_file(tmp_path, "mine"), out)
    one_line_error(result, str(out), "'other'")


def test_a_study_out_that_is_a_file_is_one_line(tiny_data, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("draft\n")
    one_line_error(run_study_cli(study_file(tmp_path, "s"), out), str(out))
    assert out.read_text() == "draft\n"


# -- soft labels ---------------------------------------------------------------------------------


def soft_labels_cli(teacher: Path, out: Path, *extra: str):
    args = ["soft-labels", "--teacher", str(teacher), "--limit", "30", "--device", "cpu"]
    return runner.invoke(app, [*args, "--out", str(out), *extra])


def test_soft_labels_never_replace_a_file_of_the_users(teacher_run, tiny_data, tmp_path):
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("draft\n")
    line = one_line_error(soft_labels_cli(teacher_run, thesis), str(thesis))
    assert "--force" in line
    assert thesis.read_text() == "draft\n"
    assert not list(tmp_path.glob(".*"))  # no temporary, no lock left beside it
    forced = soft_labels_cli(teacher_run, thesis, "--force")
    assert forced.exit_code == 0, forced.output
    assert rbkd.soft_label_file.read_soft_labels(thesis).teacher.startswith(str(teacher_run))


def test_soft_labels_replace_their_own_file_but_not_another_splits(
    teacher_run, tiny_data, tmp_path
):
    path = tmp_path / "t1.safetensors"
    assert soft_labels_cli(teacher_run, path).exit_code == 0
    again = soft_labels_cli(teacher_run, path)  # regenerated: the same teacher, split, dataset
    assert again.exit_code == 0, again.output
    before = path.read_bytes()
    other = soft_labels_cli(teacher_run, path, "--split", "test")
    one_line_error(other, str(path))
    assert path.read_bytes() == before


def test_soft_labels_out_a_folder_or_a_dangling_link_is_one_line(teacher_run, tiny_data, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    line = one_line_error(soft_labels_cli(teacher_run, folder), str(folder))
    assert ".part" not in line and "Errno" not in line
    assert list(folder.iterdir()) == []
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    one_line_error(soft_labels_cli(teacher_run, link), str(link))
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(28 * 28, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_the_api_soft_labels_refuse_a_foreign_file_and_a_folder(tiny_data, tmp_path):
    data = load_dataset("fashion-mnist", "train")
    torch.manual_seed(0)
    model = Linear()
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("draft\n")
    with pytest.raises(ValueError, match="thesis.txt") as info:
        rbkd.soft_labels(model, data, out=thesis)
    assert "\n" not in str(info.value)
    assert thesis.read_text() == "draft\n"
    with pytest.raises(ValueError) as info:
        rbkd.soft_labels(model, data, out=tmp_path)
    assert str(tmp_path) in str(info.value) and ".part" not in str(info.value)
    # a file of the same model is the user's own regenerated labels: replaced
    path = tmp_path / "soft.safetensors"
    rbkd.soft_labels(model, data, out=path)
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # trained further
    soft = rbkd.soft_labels(model, data, out=path)
    assert soft.path == path


# -- run folders (item 14) -----------------------------------------------------------------------


@pytest.mark.parametrize("what", ["file", "dangling link", "folder of the user's"])
def test_a_run_out_that_rbkd_cannot_own_is_one_line(what, tiny_data, tmp_path):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("draft\n")
    elif what == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.mkdir()
        (out / "config.json").write_text('{"my": "settings"}\n')
    data = load_dataset("fashion-mnist", "train")
    with pytest.raises(ValueError) as info:
        rbkd.train_teacher(Linear(), data, epochs=1, batch_size=50, device="cpu", out=out)
    message = str(info.value)
    assert str(out) in message and "\n" not in message and "Errno" not in message
    if what == "file":
        assert out.read_text() == "draft\n"
    elif what == "dangling link":
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == ["config.json"]
        assert (out / "config.json").read_text() == '{"my": "settings"}\n'


@pytest.mark.parametrize("command", ["train-teacher", "distill"])
@pytest.mark.parametrize("what", ["dangling link", "folder of the user's"])
def test_the_cli_never_writes_a_run_into_what_rbkd_cannot_own(
    command, what, teacher_run, tiny_data, tmp_path
):
    out = tmp_path / "out"
    if what == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    args = (
        ["--capacity", "small"] if command == "train-teacher" else ["--teacher", str(teacher_run)]
    )
    result = runner.invoke(
        app,
        [command, *args, "--epochs", "1", "--limit", "100", "--device", "cpu", "--no-progress",
         "--out", str(out)],
    )  # fmt: skip
    line = one_line_error(result, str(out))
    assert "Errno" not in line
    if what == "dangling link":
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_run_folder_of_rbkd_still_resumes(tiny_data, tmp_path):
    data = load_dataset("fashion-mnist", "train")
    out = tmp_path / "run"
    torch.manual_seed(0)
    rbkd.train_teacher(Linear(), data, epochs=1, batch_size=100, device="cpu", out=out)
    (out / "notes.txt").write_text("mine, beside rbkd's files\n")  # allowed: the folder is rbkd's
    torch.manual_seed(0)
    result = rbkd.train_teacher(
        Linear(), data, epochs=2, batch_size=100, device="cpu", out=out, resume=True
    )
    assert result.run_dir == out


# -- reports and figures -------------------------------------------------------------------------


def test_a_figure_never_replaces_a_file_of_the_users(teacher_run, tiny_data, tmp_path):
    soft = teacher_run / "soft_labels_train.safetensors"
    mine = tmp_path / "figure.png"
    mine.write_bytes(b"my own figure")
    args = ["analyze", "entropy", "--soft-labels", str(soft), "--T", "1,3"]
    one_line_error(runner.invoke(app, [*args, "--plot", str(mine)]), str(mine))
    assert mine.read_bytes() == b"my own figure"
    drawn = tmp_path / "drawn.png"
    for _ in range(2):  # rbkd's own figure is redrawn in place
        result = runner.invoke(app, [*args, "--plot", str(drawn)])
        assert result.exit_code == 0, result.output


def test_a_report_never_writes_into_a_folder_of_the_users(tiny_data, tmp_path):
    out = tmp_path / "study"
    assert run_study_cli(study_file(tmp_path, "r"), out).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# my report\n")
    result = runner.invoke(app, ["study", "report", str(out), "--out", str(mine)])
    one_line_error(result, str(mine), "report.md")
    assert (mine / "report.md").read_text() == "# my report\n"
    fresh = tmp_path / "fresh"
    for _ in range(2):  # a new folder, then the same report folder again
        result = runner.invoke(app, ["study", "report", str(out), "--out", str(fresh)])
        assert result.exit_code == 0, result.output


# -- spreadsheet formulas (item 17) --------------------------------------------------------------


def test_results_csv_cells_never_start_a_formula_but_numbers_stay_numbers(tmp_path):
    row = {c: None for c in RESULT_COLUMNS}
    row.update(
        study="s",
        experiments=["temperature"],
        teacher="=HYPERLINK(1)",
        student="+cmd|' /C calc'!A0",
        noise="@SUM(1)",
        select="\tx",
        run_dir="-students/x",
        T=-0.5,
        alpha="-0.5",
        test_accuracy=0.25,
        per_class_accuracy=[-0.5],
        class_names=["-neg"],
    )
    write_results(tmp_path, [], [row])
    with open(tmp_path / "results.csv", newline="") as handle:
        header, cells = list(csv.reader(handle))
    values = dict(zip(header, cells, strict=True))
    assert values["teacher"] == "'=HYPERLINK(1)"
    assert values["student"] == "'+cmd|' /C calc'!A0"
    assert values["noise"] == "'@SUM(1)" and values["select"] == "'\tx"
    assert values["run_dir"] == "'-students/x"
    assert values["T"] == "-0.5" and values["alpha"] == "-0.5" and values["test_accuracy"] == "0.25"
    assert values["acc_neg"] == "-0.5"
    assert not any(c.startswith(("=", "+", "@", "\t", "\r")) for c in [*header, *cells])


def test_no_temporaries_are_left_by_a_refusal(teacher_run, tiny_data, tmp_path):
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("draft\n")
    soft_labels_cli(teacher_run, thesis)
    assert sorted(os.listdir(tmp_path)) == ["thesis.txt"]


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_analysis_outputs_never_replace_a_file_of_the_users(kind, teacher_run, tiny_data, tmp_path):
    """analyze --json / --csv: a new file, or rbkd's own result of the same shape; else refused."""
    out = tmp_path / f"numbers.{kind}"
    if kind == "json":
        args = ["analyze", "entropy", "--teacher", str(teacher_run), "--T", "1,4", "--json"]
    else:
        args = ["analyze", "projection", "--teacher", str(teacher_run), "--classes", "0,1,2",
                "--csv"]  # fmt: skip
    first = runner.invoke(app, [*args, str(out)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, [*args, str(out)])  # its own file: replaced
    assert again.exit_code == 0, again.output
    out.write_text("my notes, = not rbkd's\n")
    refused = runner.invoke(app, [*args, str(out)])
    assert refused.exit_code != 0 and str(out) in refused.stderr
    assert out.read_text() == "my notes, = not rbkd's\n"
