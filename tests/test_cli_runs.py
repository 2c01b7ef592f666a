"""The CLI end to end on the tiny IDX dataset: train a teacher once, then soft labels, every
flavour of distill, the analyses and the experiments."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from rbkd.cli.app import app
from safetensors import safe_open
from typer.testing import CliRunner

from rbkd.soft_label_file import read_soft_labels, sha256_file

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-progress"]


def invoke(*args: str, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=160)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="session")
def teacher(tiny_data_root, tmp_path_factory):
    """A small teacher trained for 1 epoch on the tiny dataset (once per session)."""
    out = tmp_path_factory.mktemp("runs") / "t1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        result = invoke("train-teacher", "--capacity", "small", "--out", out, *FAST)
    return out, result.output


def _report(run_dir) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    # report.json (written last) and config.json (written first) name the same run
    assert config["extra_config"]["key"] == report["key"]
    return report


def test_train_teacher_writes_run_and_both_soft_label_files(teacher, tiny_data):
    from rbkd.data import load_dataset

    run, output = teacher
    assert "small teacher on fashion-mnist" in output
    assert re.search(r"test accuracy\s+│\s+\d+\.\d\d%", output)
    assert "mean soft-label entropy, T=9" in output
    for name in ("model.safetensors", "config.json", "metrics.jsonl"):
        assert (run / name).exists()
    digest = sha256_file(run / "model.safetensors")
    for split, n in (("train", 200), ("test", 100)):
        path = run / f"soft_labels_{split}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            assert set(f.keys()) == {"logits", "labels", "indices"}
        assert meta["rbkd_format"] == "1" and meta["dataset"] == "fashion-mnist"
        assert meta["split"] == split and meta["num_classes"] == "10"
        assert meta["teacher"] == f"{run}@sha256:{digest}"
        ds = load_dataset("fashion-mnist", split)
        soft = read_soft_labels(path, dataset=ds)
        assert soft.logits.shape == (n, 10) and soft.logits.dtype == torch.float32
        assert torch.equal(soft.labels, ds.labels)
        assert torch.equal(soft.indices, torch.arange(n))


def test_soft_labels_command(teacher, tiny_data, tmp_path):
    run, _ = teacher
    out = tmp_path / "test.safetensors"
    result = invoke("soft-labels", "--teacher", run, "--split", "test", "--out", out)
    assert "100 x 10" in result.output and "fashion-mnist / test" in result.output
    soft = read_soft_labels(out)
    reference = read_soft_labels(run / "soft_labels_test.safetensors")
    torch.testing.assert_close(soft.logits, reference.logits)
    assert soft.teacher == reference.teacher


@pytest.mark.parametrize("source", ["teacher", "soft-labels"])
def test_distill_T9(teacher, tiny_data, tmp_path, source):
    run, _ = teacher
    arg = run if source == "teacher" else run / "soft_labels_train.safetensors"
    out = tmp_path / "s"
    result = invoke("distill", f"--{source}", arg, "--T", "9", "--out", out, *FAST)
    assert "general student on fashion-mnist" in result.output
    assert "at T=9" in result.output and "test accuracy per class" in result.output
    report = _report(out)
    assert report["T"] == 9.0 and report["transfer"]["size"] == 200
    assert len(report["per_class_accuracy"]) == 10
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert f"{report['test_accuracy']:.2%}" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["objective"]["name"] == "distillation" and config["objective"]["T"] == 9.0
    assert config["objective"]["alpha"] == 0.99


def test_distill_exclude_classes(teacher, tiny_data, tmp_path):
    run, _ = teacher
    out = tmp_path / "x"
    result = invoke(
        "distill",
        "--teacher",
        run,
        "--T",
        "9",
        "--exclude-class",
        "3",
        "--exclude-class",
        "5",
        "--out",
        out,
        *FAST,
    )
    report = _report(out)
    assert report["transfer"]["excluded_classes"] == [3, 5]
    assert report["transfer"]["size"] == 160  # 20 examples of each class
    assert report["transfer"]["per_class_counts"][3] == 0
    assert set(report["excluded_per_class"]) == {"3", "5"}
    expected = (report["per_class_accuracy"][3] + report["per_class_accuracy"][5]) / 2
    assert report["excluded_accuracy"] == pytest.approx(expected)  # 10 test examples each
    assert "accuracy on excluded class(es) 3, 5" in result.output
    assert "excluded" in result.output


@pytest.mark.parametrize("select", ["entropy", "random"])
def test_distill_per_class(teacher, tiny_data, tmp_path, select):
    from rbkd.analysis.transfer import select_transfer_set
    from rbkd.engine.objectives import tensor_sha256
    from rbkd.ops import soft_label_entropy

    run, _ = teacher
    out = tmp_path / select
    result = invoke(
        "distill",
        "--teacher",
        run,
        "--T",
        "9",
        "--per-class",
        "3",
        "--select",
        select,
        "--student",
        "baseline",
        "--seed",
        "4",
        "--out",
        out,
        *FAST,
    )
    assert f"30 examples: 3 per class ({select})" in result.output
    report = _report(out)
    assert report["transfer"]["per_class_counts"] == [3] * 10
    # the transfer set is exactly the one the selection rule gives
    soft = read_soft_labels(run / "soft_labels_train.safetensors")
    entropy = soft_label_entropy(soft.logits, 9.0)
    ts = select_transfer_set(
        soft.labels,
        num_classes=10,
        indices=soft.indices,
        per_class=3,
        select=select,
        entropy=entropy,
        seed=4,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["transfer_set"]["indices_sha256"] == tensor_sha256(ts.indices)
    if select == "entropy":  # the 3 chosen per class are that class's highest-entropy examples
        for k in range(10):
            rows = soft.labels == k
            top = entropy[rows].topk(3).values.min()
            chosen = entropy[torch.isin(soft.indices, ts.indices) & rows]
            assert chosen.min() >= top


def test_distill_label_smoothing(tiny_data, tmp_path):
    out = tmp_path / "ls"
    result = invoke("distill", "--label-smoothing", "0.2", "--out", out, *FAST)
    assert "label smoothing A=0.2" in result.output
    report = _report(out)
    assert report["source"] == {"kind": "label_smoothing", "A": 0.2}
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == {"name": "label_smoothing", "A": 0.2}


@pytest.mark.parametrize("noise", ["uniform:0.05", "normal:0.01"])
def test_distill_noise(teacher, tiny_data, tmp_path, noise):
    run, _ = teacher
    out = tmp_path / "n"
    result = invoke("distill", "--teacher", run, "--noise", noise, "--out", out, *FAST)
    assert f"noise {noise}" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["objective"]["noise"] == noise


def test_label_smoothing_with_noise(tiny_data, tmp_path):
    out = tmp_path / "lsn"
    invoke("distill", "--label-smoothing", "0.3", "--noise", "normal:0.01", "--out", out, *FAST)
    config = json.loads((out / "config.json").read_text())
    assert config["objective"]["noise"] == "normal:0.01" and config["objective"]["T"] == 1.0


def test_analyze_entropy_plot_and_json(teacher, tiny_data, tmp_path):
    from rbkd.analysis.entropy import label_smoothing_entropy
    from rbkd.ops import soft_label_entropy

    run, _ = teacher
    file = run / "soft_labels_train.safetensors"
    png, js = tmp_path / "e.png", tmp_path / "e.json"
    result = invoke(
        "analyze",
        "entropy",
        "--soft-labels",
        file,
        "--T",
        "1,3,9,20",
        "--per-class",
        "--label-smoothing-curve",
        "--plot",
        png,
        "--json",
        js,
    )
    assert "mean soft-label entropy (nats) vs temperature" in result.output
    assert "label smoothing reference" in result.output
    assert png.read_bytes().startswith(PNG)
    data = json.loads(js.read_text())
    table = data["sources"][str(file)]
    soft = read_soft_labels(file)
    expected = soft_label_entropy(soft.logits, [1.0, 3.0, 9.0, 20.0])
    assert data["temperatures"] == [1.0, 3.0, 9.0, 20.0]
    torch.testing.assert_close(
        torch.tensor(table["mean_entropy"], dtype=torch.float64),
        expected.mean(1).double(),
        atol=1e-5,
        rtol=1e-5,
    )
    for k in range(10):
        got = torch.tensor([row[k] for row in table["per_class_entropy"]], dtype=torch.float64)
        want = expected[:, soft.labels == k].mean(1).double()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert data["label_smoothing"]["0.5"] == pytest.approx(label_smoothing_entropy(0.5, 10))
    assert data["max_entropy"] == pytest.approx(math.log(10))
    assert f"{table['mean_entropy'][2]:.4f}" in result.output


def test_analyze_entropy_range_from_teacher(teacher, tiny_data):
    run, _ = teacher
    result = invoke("analyze", "entropy", "--teacher", run, "--T", "1:20")
    assert len(re.findall(r"^│\s+\d+ │", result.output, flags=re.M)) == 20


def test_analyze_projection(teacher, tiny_data, tmp_path):
    run, _ = teacher
    png, csv_path = tmp_path / "p.png", tmp_path / "p.csv"
    result = invoke(
        "analyze",
        "projection",
        "--teacher",
        run,
        "--classes",
        "0,2,4",
        "--per-class",
        "5",
        "--plot",
        png,
        "--csv",
        csv_path,
    )
    assert "spread" in result.output and "Pullover" in result.output
    assert png.read_bytes().startswith(PNG)
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["index", "label", "x", "y"] and len(rows) == 16
    assert {r[1] for r in rows[1:]} == {"0", "2", "4"}
    bad = invoke("analyze", "projection", "--teacher", run, "--classes", "0,2", ok=False)
    assert bad.exit_code == 1 and "need 3 distinct classes" in bad.output


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_experiment_missing_class(teacher, tiny_data, tmp_path):
    run, _ = teacher
    out = tmp_path / "mc"
    args = ["experiment", "missing-class", "--teacher", run, "--classes", "0,1", "--T", "3,9"]
    args += ["--label-smoothing", "0.5", "--student", "baseline", "--out", out, *FAST]
    result = invoke(*args)
    assert "student accuracy on the missing class" in result.output
    assert "t1 T=3" in result.output and "LS A=0.5" in result.output
    rows = _rows(out)
    cells = [(r["teacher"], r["missing_class"], r["T"], r["label_smoothing"]) for r in rows]
    assert cells == [
        ("t1", 0, 3.0, None),
        ("t1", 1, 3.0, None),
        ("t1", 0, 9.0, None),
        ("t1", 1, 9.0, None),
        (None, 0, None, 0.5),
        (None, 1, None, 0.5),
    ]
    for r in rows:  # the accuracy on the class it never saw is that class's test accuracy
        assert r["missing_class_accuracy"] == r["per_class_accuracy"][r["missing_class"]]
        assert r["transfer_size"] == 180 and r["missing_class_name"] in ("T-shirt/top", "Trouser")
    assert len(list(csv.reader((out / "results.csv").open()))) == 7
    assert (out / "report" / "report.md").is_file()
    # the same command again trains nothing; one more temperature runs only its own cells
    again = invoke(*args)
    assert "nothing to run" in again.output
    before = {r["key"]: r["test_accuracy"] for r in rows}
    more = invoke(*[a if a != "3,9" else "3,9,6" for a in args])
    assert "ran 2 of" in more.output or len(_rows(out)) == 8
    after = _rows(out)
    assert len(after) == 8
    assert all(before[r["key"]] == r["test_accuracy"] for r in after if r["key"] in before)


def test_experiment_transfer_set(teacher, tiny_data, tmp_path):
    run, _ = teacher
    out = tmp_path / "ts"
    result = invoke(
        "experiment",
        "transfer-set",
        "--teacher",
        run,
        "--per-class",
        "2,4",
        "--select",
        "random,entropy",
        "--student",
        "baseline",
        "--out",
        out,
        *FAST,
    )
    assert "student test accuracy vs examples per class" in result.output
    sizes = [(r["per_class"], r["select"], r["transfer_size"]) for r in _rows(out)]
    assert sizes == [
        (None, "all", 200),  # the full-data reference
        (2, "random", 20),  # in the order --select names them
        (4, "random", 40),
        (2, "entropy", 20),
        (4, "entropy", 40),
    ]


def test_experiment_batch_sweep(tiny_data, tmp_path):
    out = tmp_path / "bs"
    result = invoke(
        "experiment",
        "batch-sweep",
        "--capacity",
        "small",
        "--batch-sizes",
        "50,200",
        "--epochs",
        "1",
        "--limit",
        "100",
        "--student",
        "baseline",
        "--student-epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        out,
        "--no-progress",
    )
    assert "batch size sweep" in result.output
    teachers = [json.loads(x) for x in (out / "teachers.jsonl").read_text().splitlines()]
    assert [t["batch_size"] for t in teachers] == [50, 200]
    for t in teachers:
        assert t["role"] == "sweep" and t["name"] == f"small-b{t['batch_size']}-e1"
        assert all(0 < h <= math.log(10) + 1e-6 for h in t["mean_entropy"])
    rows = _rows(out)
    assert sorted(r["teacher"] for r in rows) == ["small-b200-e1", "small-b50-e1"]
    assert all(r["teacher_entropy_at_T"] is not None for r in rows)


def _examples() -> list[tuple[str, str]]:
    """(command path, example line) of every command, in the order a user would run them."""
    import typer.main
    from rbkd.cli.typer_app import walk_commands

    found = []
    for path, cmd in walk_commands(typer.main.get_command(app)):
        text = (cmd.help or "").replace("\b\n", "")  # click's "print as written" mark
        match = re.search(r"Example:\s*\n\s*(rbkd [^\n]+)", text)
        if match:
            found.append((" ".join(path) or "rbkd", match.group(1).strip()))
    return found


ORDER = [
    "rbkd",
    "train-teacher",
    "soft-labels",
    "distill",
    "analyze",
    "experiment",
    "study run",
    "study report",
    "models",
    "lm tokenize",
    "lm train-teacher",
    "lm soft-labels",
    "lm distill",
]


def test_every_help_example_really_works(tiny_data, tmp_path, monkeypatch):
    """Run each command's help example, in workflow order, in an empty folder."""
    import shlex
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parents[1] / "studies", tmp_path / "studies")
    monkeypatch.chdir(tmp_path)
    examples = _examples()
    mine = [e for e in examples if not e[0].startswith("data")]  # rbkd data: its own tests
    assert len(mine) >= 11, examples
    mine.sort(key=lambda e: next((i for i, p in enumerate(ORDER) if e[0].startswith(p)), 99))
    done = set()
    for path, line in mine:
        if line in done:  # the root help repeats train-teacher's example
            continue
        done.add(line)
        args = shlex.split(line)[1:]
        if path != "rbkd":
            assert " ".join(args).startswith(path), (path, line)
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{line}\n{result.output}{result.exception!r}"
    assert (tmp_path / "runs" / "t1" / "soft_labels_train.safetensors").exists()
    assert (tmp_path / "entropy.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("source", ["teacher", "soft-labels"])
def test_distill_with_limit_uses_the_rows_that_remain(teacher, tiny_data, tmp_path, source):
    run, _ = teacher
    arg = run if source == "teacher" else run / "soft_labels_train.safetensors"
    out = tmp_path / "lim"
    invoke("distill", f"--{source}", arg, "--limit", "50", "--out", out, *FAST)
    report = _report(out)
    assert report["transfer"]["size"] == 50
    config = json.loads((out / "config.json").read_text())
    assert config["train_data"]["size"] == 50 and config["test_data"]["size"] == 50
