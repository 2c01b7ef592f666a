"""Issue 15's command-line items on the tiny dataset: a student takes its teacher's --limit,
the history names its losses, unlabelled transfer sets, TensorBoard logging."""

from __future__ import annotations

import json

import pytest
from rbkd.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=160)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def report_of(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def limited_teacher(tiny_data_root, tmp_path_factory):
    """A teacher trained on the first 60 training examples (of 200)."""
    out = tmp_path_factory.mktemp("limit") / "t60"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        invoke("train-teacher", "--limit", 60, "--epochs", 1, "--batch-size", 30, "--device",
               "cpu", "--no-progress", "--out", out)  # fmt: skip
    return out


def test_distill_takes_the_teacher_runs_limit_unless_given_one(limited_teacher, tiny_data):
    base = ["distill", "--teacher", limited_teacher, "--epochs", 1, "--device", "cpu"]
    out = limited_teacher.parent / "s"
    invoke(*base, "--no-progress", "--out", out)
    report = report_of(out)
    assert report["transfer"]["size"] == 60 and report["transfer"]["split_size"] == 60
    assert json.loads((out / "config.json").read_text())["test_data"]["size"] == 60
    smaller = limited_teacher.parent / "s30"
    invoke(*base, "--limit", 30, "--no-progress", "--out", smaller)
    assert report_of(smaller)["transfer"]["size"] == 30  # told otherwise: its own
    larger = invoke(*base, "--limit", 100, "--out", limited_teacher.parent / "s100", ok=False)
    assert larger.exit_code == 1 and "covers 60 of the 100 examples" in larger.output


# ------------------------------------------------------------------ the losses' names
def test_history_names_the_objective_loss_and_the_cross_entropies():
    import torch
    import torch.nn.functional as F
    from torch import nn

    import rbkd

    torch.manual_seed(0)
    x, y = torch.randn(48, 5), torch.arange(48) % 3
    teacher_logits = torch.randn(48, 3) * 3
    student = nn.Linear(5, 3)
    with torch.no_grad():
        before = student(x)
    soft = rbkd.SoftLabels(teacher_logits, y.clone(), torch.arange(48), {"dataset": "user-data",
                           "split": "train", "num_classes": "3", "teacher": "t"})  # fmt: skip
    # One batch of every row, one epoch: the running means are the untrained model's values.
    result = rbkd.distill(student, (x, y), (x, y), soft_labels=soft, T=4.0, alpha=0.9,
                          epochs=1, batch_size=48, device="cpu")  # fmt: skip
    (row,) = result.history
    kd = rbkd.kd_loss(before, teacher_logits, y, T=4.0, alpha=0.9)
    assert row["train_objective_loss"] == pytest.approx(float(kd), rel=1e-5)
    assert row["train_ce_loss"] == pytest.approx(float(F.cross_entropy(before, y)), rel=1e-5)
    with torch.no_grad():
        after = F.cross_entropy(student(x), y)
    assert row["test_ce_loss"] == pytest.approx(float(after), rel=1e-5)
    assert "train_loss" not in row and "test_loss" not in row
    assert result.train_objective_loss == row["train_objective_loss"]
    assert result.train_ce_loss == row["train_ce_loss"]
    assert result.test_ce_loss == row["test_ce_loss"]


def test_metrics_written_under_the_old_names_read_back_under_the_new(tmp_path):
    from rbkd.engine import read_metrics

    old = {"epoch": 1, "train_loss": 2.59, "train_accuracy": 0.5, "test_loss": 0.218}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    (row,) = read_metrics(tmp_path)
    assert row == {"epoch": 1, "train_objective_loss": 2.59, "train_accuracy": 0.5,
                   "test_ce_loss": 0.218}  # fmt: skip


def test_rerun_compares_an_old_runs_losses_under_the_new_names(limited_teacher, tmp_path):
    from rbkd.cli.rerun import compare_runs

    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((limited_teacher / "config.json").read_text())
    final = config["final_metrics"]
    config["final_metrics"] = {"train_loss" if k == "train_objective_loss" else
                               "test_loss" if k == "test_ce_loss" else k: v
                               for k, v in final.items() if k != "train_ce_loss"}  # fmt: skip
    (old / "config.json").write_text(json.dumps(config))
    (old / "model.safetensors").write_bytes((limited_teacher / "model.safetensors").read_bytes())
    metrics = compare_runs(old, limited_teacher)["metrics"]
    assert metrics["test_ce_loss"]["equal"] and metrics["train_objective_loss"]["equal"]
    assert metrics["train_ce_loss"]["original"] is None  # an old run did not record it


# ------------------------------------------------------------------ unlabelled transfer sets
def _teacher_and_data():
    import torch
    from torch import nn

    torch.manual_seed(1)
    x, y = torch.randn(40, 5), torch.arange(40) % 3
    return nn.Linear(5, 3), x, y


@pytest.mark.parametrize("form", ["bare x", "(x, None)", "all -100"])
def test_distill_on_an_unlabelled_transfer_set_at_alpha_1(form):
    import torch
    from torch import nn

    import rbkd

    teacher, x, y = _teacher_and_data()
    train = {"bare x": x, "(x, None)": (x, None), "all -100": (x, torch.full_like(y, -100))}[form]
    torch.manual_seed(2)
    student = nn.Linear(5, 3)
    with torch.no_grad():
        before, t = student(x), teacher(x)
    result = rbkd.distill(student, train, (x, y), teacher=teacher, alpha=1.0, T=3.0, epochs=1,
                          batch_size=40, device="cpu")  # fmt: skip
    (row,) = result.history
    kd = rbkd.kd_loss(before, t, None, T=3.0)
    assert row["train_objective_loss"] == pytest.approx(float(kd), rel=1e-5)
    assert row["train_ce_loss"] is None or row["train_ce_loss"] != row["train_ce_loss"]  # NaN
    assert result.test_accuracy is not None


def test_partly_labelled_rows_take_the_kd_term_alone():
    import torch
    import torch.nn.functional as F
    from torch import nn

    import rbkd

    teacher, x, y = _teacher_and_data()
    partial = y.clone()
    partial[::3] = -100
    torch.manual_seed(2)
    student = nn.Linear(5, 3)
    with torch.no_grad():
        z, t = student(x).double(), teacher(x).double()
    result = rbkd.distill(student, (x, partial), teacher=teacher, alpha=0.6, T=2.0, epochs=1,
                          batch_size=40, device="cpu")  # fmt: skip
    # By hand in float64: labelled rows (1 - a) CE + a T^2 KL, unlabelled rows T^2 KL alone.
    p_t = F.softmax(t / 2.0, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(z / 2.0, 1))).sum(1) * 4.0
    ce = F.cross_entropy(z, partial.clamp(min=0), reduction="none")
    labelled = partial != -100
    per_row = torch.where(labelled, 0.4 * ce + 0.6 * kl, kl)
    (row,) = result.history
    assert row["train_objective_loss"] == pytest.approx(float(per_row.mean()), rel=1e-5)
    assert row["train_ce_loss"] == pytest.approx(float(ce[labelled].mean()), rel=1e-5)


def test_alpha_below_1_without_labels_is_one_line():
    from torch import nn

    import rbkd

    teacher, x, _ = _teacher_and_data()
    with pytest.raises(ValueError, match=r"^alpha = 0.9 < 1 .* use alpha=1 .* or give labels$"):
        rbkd.distill(nn.Linear(5, 3), x, teacher=teacher, alpha=0.9, epochs=1, device="cpu")
    with pytest.raises(ValueError, match="test has 40 unlabelled examples"):
        rbkd.distill(nn.Linear(5, 3), x, (x, None), teacher=teacher, alpha=1.0, device="cpu")
