"""rbkd.analysis.examples and `rbkd analyze examples`: the top-entropy training images per class,
checked against a brute-force float64 computation, on a tiny teacher run made with rbkd's API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.analysis.examples import (
    plot_top_entropy_examples,
    teacher_examples,
    top_entropy_examples,
)
from rbkd.analysis.plots import PNG_SIGNATURE, SIGNATURES
from rbkd.soft_label_file import read_soft_labels

runner = CliRunner()


def make_teacher_run(out: Path, *, capacity: str = "small", seed: int = 0, epochs: int = 1) -> Path:
    """A real teacher run folder (model.safetensors, config.json, both soft-label files), trained
    briefly on the tiny dataset that $RBKD_DATA points at, through rbkd's own API."""
    from rbkd.data import load_dataset
    from rbkd.engine import CrossEntropy, TrainConfig, fit
    from rbkd.models import build_model
    from rbkd.soft_label_file import soft_labels_from_model

    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    model = build_model("fashion-mnist", capacity, seed=seed)
    cfg = TrainConfig(epochs=epochs, batch_size=50, seed=seed, device="cpu")
    fit(model, train, test, cfg, CrossEntropy(), run_dir=out, progress=False)
    for split, ds in (("train", train), ("test", test)):
        soft_labels_from_model(
            model, ds, out / f"soft_labels_{split}.safetensors", teacher_run=out, split=split
        )
    return out


@pytest.fixture(scope="module")
def teacher_run(tiny_data_root, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        return make_teacher_run(tmp_path_factory.mktemp("teacher") / "small")


# ------------------------------------------------------------------ the selection
def brute_force(logits, labels, indices, T, count, num_classes):
    """float64 entropy of every row, then per class a full sort by (-entropy, dataset index)."""
    p = torch.softmax(logits.double() / T, dim=1)
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    out = []
    for k in range(num_classes):
        rows = [i for i in range(len(labels)) if int(labels[i]) == k]
        rows.sort(key=lambda i: (-float(h[i]), int(indices[i])))
        out.append([int(indices[i]) for i in rows[:count]])
    return out, h


@pytest.mark.parametrize(("T", "count"), [(1.0, 1), (3.0, 5), (9.0, 7), (20.0, 50)])
def test_top_entropy_matches_float64_brute_force(T, count):
    g = torch.Generator().manual_seed(int(T))
    n, c = 120, 6
    logits = torch.randn(n, c, generator=g) * 4
    labels = torch.randint(0, c, (n,), generator=g)
    labels[:c] = torch.arange(c)  # every class present
    indices = torch.randperm(1000, generator=g)[:n]  # dataset indices, not positions
    expected, h = brute_force(logits, labels, indices, T, count, c)
    got = top_entropy_examples(logits, labels, indices, T, count)
    # The kernel's entropy is float32: where it picks a different row than float64, the two rows'
    # float64 entropies must be equal to rounding (a near-tie), never genuinely different.
    h_of = {int(i): float(h[r]) for r, i in enumerate(indices)}
    for k in range(c):
        assert len(got[k]) == len(expected[k])
        for a, b in zip(got[k], expected[k], strict=True):
            assert a == b or abs(h_of[a] - h_of[b]) < 2e-6, (k, got[k], expected[k])
    assert [len(r) for r in got] == [min(count, int((labels == k).sum())) for k in range(c)]


def test_ties_go_to_the_lower_dataset_index_and_missing_classes_are_empty():
    logits = torch.zeros(4, 3)  # four identical rows: equal entropy
    labels = torch.tensor([0, 0, 0, 1])
    indices = torch.tensor([30, 10, 20, 5])
    got = top_entropy_examples(logits, labels, indices, 2.0, 2)
    assert got == [[10, 20], [5], []]
    assert top_entropy_examples(logits, labels, indices, 2.0, 2, num_classes=4)[3] == []


@pytest.mark.parametrize(
    ("T", "count", "message"),
    [
        (0.0, 3, "T must be > 0, got 0.0"),
        (-1.0, 3, "T must be > 0"),
        (math.nan, 3, "T must be > 0"),
        (9.0, 0, "count must be an integer >= 1"),
        (9.0, 2.5, "count must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(T, count, message):
    with pytest.raises(ValueError, match=message) as err:
        top_entropy_examples(torch.zeros(2, 3), torch.zeros(2), torch.arange(2), T, count)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ a real teacher run
def test_teacher_examples_use_the_runs_soft_labels(teacher_run, tiny_data):
    soft = read_soft_labels(teacher_run / "soft_labels_train.safetensors")
    found = teacher_examples(teacher_run, 9.0, 4)
    assert found.indices == top_entropy_examples(soft.logits, soft.labels, soft.indices, 9.0, 4)
    assert len(found.indices) == 10 and all(len(r) == 4 for r in found.indices)
    for k, (idx, hs) in enumerate(zip(found.indices, found.entropies, strict=True)):
        assert all(int(found.dataset.labels[i]) == k for i in idx)
        assert hs == sorted(hs, reverse=True)
    limited = teacher_examples(teacher_run, 9.0, 4, limit=50)
    assert all(i < 50 for row in limited.indices for i in row)
    assert sum(len(r) for r in limited.indices) <= 40


def test_plot_grid_in_each_format(teacher_run, tiny_data, tmp_path):
    found = teacher_examples(teacher_run, 3.0, 2, limit=60)
    for fmt in ("png", "svg"):
        path = plot_top_entropy_examples(tmp_path / f"ex.{fmt}", found)
        assert path.read_bytes().startswith(SIGNATURES[fmt])


# ------------------------------------------------------------------ the command
def test_cli_examples_table_and_plot(teacher_run, tiny_data, tmp_path):
    plot = tmp_path / "examples.png"
    result = runner.invoke(
        app,
        ["analyze", "examples", "--teacher", str(teacher_run), "--T", "9", "--count", "3"]
        + ["--plot", str(plot), "--limit", "100", "--data-dir", str(tiny_data)],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "top 3 highest-entropy train examples per class at T=9" in result.output
    assert "Trouser" in result.output and "Ankle boot" in result.output
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    found = teacher_examples(teacher_run, 9.0, 3, limit=100)
    assert ", ".join(map(str, found.indices[1])) in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--T", "0"], "T must be > 0"),
        (["--T", "-3"], "T must be > 0"),
        (["--count", "0"], "--count must be >= 1, got 0"),
        (["--plot", "examples.jpg"], "must end in .png, .pdf or .svg"),
    ],
)
def test_cli_examples_bad_input_is_one_line(teacher_run, tiny_data, tmp_path, args, fragment):
    result = runner.invoke(
        app, ["analyze", "examples", "--teacher", str(teacher_run), *args], terminal_width=200
    )
    assert result.exit_code == 2, result.output  # a usage error (README, the command line)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (Path.cwd() / "examples.jpg").exists()


def test_cli_examples_not_a_run_folder(tmp_path, tiny_data):
    result = runner.invoke(app, ["analyze", "examples", "--teacher", str(tmp_path)])
    assert result.exit_code == 1
    assert "is not a run directory" in result.output
