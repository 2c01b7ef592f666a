"""`rbkd distill --unlabelled` on the tiny dataset: pure distillation on a transfer set whose
labels the training loop never sees (issue 15). alpha is 1 unless the user gives another, which
is one line; what needs labels (label smoothing, dkd) is refused; an unlabelled run is another
run than a labelled one (its own key and folder) and `rbkd rerun` repeats it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rbkd.cli.app import app
from safetensors.torch import load_file
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=160)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def read(run_dir, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


@pytest.fixture(scope="module")
def teacher(tiny_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("unlabelled") / "t"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        invoke("train-teacher", "--epochs", 1, "--batch-size", 50, "--device", "cpu",
               "--no-progress", "--out", out)  # fmt: skip
    return out


def distill(teacher, out, *extra, ok: bool = True):
    return invoke("distill", "--teacher", teacher, "--student", "baseline", "--epochs", 1,
                  "--batch-size", 50, "--device", "cpu", "--no-progress", "--out", out, *extra,
                  ok=ok)  # fmt: skip


@pytest.fixture(scope="module")
def unlabelled_run(teacher, tiny_data_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        result = distill(teacher, teacher.parent / "u", "--unlabelled")
    return teacher.parent / "u", result.output


def test_unlabelled_distills_at_alpha_1_and_the_loop_sees_no_label(unlabelled_run):
    out, output = unlabelled_run
    report = read(out, "report.json")
    assert report["alpha"] == 1.0 and report["unlabelled"] is True
    assert report["transfer"]["labels"] == "unlabelled"
    assert report["transfer"]["size"] == 200  # the whole split: nothing chosen by label
    # No label reached the loop: the cross-entropy on the hard labels and the train accuracy
    # have no labelled row to be computed on (a labelled run records numbers there).
    row = report["metrics"]
    assert row["train_ce_loss"] is None and row["train_accuracy"] is None
    assert math.isfinite(row["train_objective_loss"]) and report["test_accuracy"] > 0
    assert "labels" in output and "none used (--unlabelled" in output
    assert "epoch 1/" in output and "acc nan" not in output  # no train accuracy to print


def test_an_unlabelled_run_is_another_run_than_a_labelled_one_at_alpha_1(
    unlabelled_run, teacher, tiny_data
):
    out, _ = unlabelled_run
    labelled = teacher.parent / "l1"
    distill(teacher, labelled, "--alpha", 1)
    mine, theirs = read(out, "report.json"), read(labelled, "report.json")
    assert mine["key"] != theirs["key"]
    assert theirs["transfer"]["labels"] == "labelled" and theirs["unlabelled"] is False
    assert math.isfinite(theirs["metrics"]["train_ce_loss"])
    # At alpha 1 forward KL reads no label either: the same weights, which shows that hiding
    # the labels changes nothing else (data order, soft labels, initialisation).
    a, b = load_file(out / "model.safetensors"), load_file(labelled / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The same --unlabelled command again, --alpha 1 spelt out, is the same run: reused.
    again = distill(teacher, out, "--unlabelled", "--alpha", 1, "--json")
    assert json.loads(again.stdout)["reused"] is True


def test_unlabelled_with_another_alpha_is_one_line_and_writes_nothing(teacher, tiny_data):
    out = teacher.parent / "bad-alpha"
    result = distill(teacher, out, "--unlabelled", "--alpha", 0.9, ok=False)
    assert result.exit_code == 2
    assert "--unlabelled distills on the teacher's soft labels alone" in result.output
    assert "must be 1, got 0.9" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_unlabelled_alpha_from_a_config_file_names_the_file(teacher, tiny_data, tmp_path):
    config = tmp_path / "distill.toml"
    config.write_text("alpha = 0.5\n")
    result = distill(teacher, tmp_path / "s", "--unlabelled", "--config", config, ok=False)
    assert result.exit_code == 2
    assert f"--config {config}" in " ".join(result.output.split()).replace("│", "")
    assert "must be 1, got 0.5" in result.output


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--divergence", "dkd"], "--divergence dkd splits off each example's target class"),
        (["--label-smoothing", "0.1"], "--label-smoothing trains on smoothed hard labels"),
    ],
)
def test_what_needs_labels_is_refused_with_unlabelled(teacher, tiny_data, extra, says):
    args = ["distill", "--unlabelled", "--epochs", 1, "--device", "cpu", "--out"]
    args += [teacher.parent / "refused", *extra]
    if "--label-smoothing" not in extra:
        args += ["--teacher", teacher]
    result = invoke(*args, ok=False)
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split()).replace("│ ", "")
    assert not (teacher.parent / "refused").exists()


def test_unlabelled_missing_class_chooses_by_label_then_hides_them(teacher, tiny_data):
    out = teacher.parent / "x3"
    distill(teacher, out, "--unlabelled", "--exclude-class", 3)
    report = read(out, "report.json")
    transfer = report["transfer"]
    assert transfer["excluded_classes"] == [3] and transfer["per_class_counts"][3] == 0
    assert transfer["labels"] == "unlabelled"
    assert transfer["size"] == 200 - 20  # the tiny split has 20 examples per class
    assert report["excluded_accuracy"] is not None
    fewer = teacher.parent / "entropy5"
    distill(teacher, fewer, "--unlabelled", "--per-class", 5, "--select", "entropy")
    transfer = read(fewer, "report.json")["transfer"]
    assert transfer["per_class_counts"] == [5] * 10 and transfer["labels"] == "unlabelled"


def test_rerun_repeats_an_unlabelled_run(unlabelled_run, tiny_data, tmp_path):
    out, _ = unlabelled_run
    invocation = read(out, "config.json")["provenance"]["invocation"]
    assert invocation["options"]["unlabelled"] is True
    result = invoke("rerun", out, "--out", tmp_path / "again", "--json", "--no-progress")
    comparison = json.loads(result.stdout)
    assert comparison["reproduced"] is True, comparison
    assert read(tmp_path / "again", "report.json")["key"] == read(out, "report.json")["key"]


def test_soft_labels_of_labelled_data_teach_the_same_data_unlabelled():
    """A soft-label file records each row's label; an unlabelled transfer set has none to check
    them against, so its rows are not refused (the labels are not used), while a labelled row
    that contradicts the file still is."""
    from torch import nn

    import rbkd

    torch.manual_seed(1)
    x, y = torch.randn(40, 5), torch.arange(40) % 3
    soft = rbkd.soft_labels(nn.Linear(5, 3), (x, y))
    result = rbkd.distill(nn.Linear(5, 3), x, (x, y), soft_labels=soft, alpha=1.0, epochs=1,
                          device="cpu")  # fmt: skip
    assert math.isnan(result.history[0]["train_ce_loss"])  # no labelled row to score
    wrong = y.clone()
    wrong[7] = (wrong[7] + 1) % 3
    with pytest.raises(ValueError, match=r"labels differ .* at 1 row\(s\) \(first: index 7"):
        rbkd.distill(nn.Linear(5, 3), (x, wrong), soft_labels=soft, epochs=1, device="cpu")
