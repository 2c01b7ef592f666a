"""Soft-label files: round trip, metadata, and every way a file can be wrong."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from rbkd.soft_label_file import (
    FORMAT_VERSION,
    SoftLabelsError,
    read_soft_labels,
    sha256_file,
    write_soft_labels,
)

N, C = 50, 10


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, generator=g) * 3
    labels = torch.randint(0, C, (N,), generator=g)
    indices = torch.arange(N, dtype=torch.int64)
    return logits, labels, indices


def _dataset(labels, name="fashion-mnist", split="train", num_classes=C):
    return SimpleNamespace(name=name, split=split, labels=labels, num_classes=num_classes)


@pytest.fixture
def soft_file(tmp_path):
    logits, labels, indices = _tensors()
    path = write_soft_labels(
        tmp_path / "soft.safetensors",
        logits,
        labels,
        indices,
        dataset="fashion-mnist",
        split="train",
        teacher_run="runs/t1",
        teacher_sha256="ab" * 32,
    )
    return path, logits, labels, indices


def test_round_trip(soft_file):
    path, logits, labels, indices = soft_file
    soft = read_soft_labels(path, dataset=_dataset(labels))
    assert torch.equal(soft.logits, logits)
    assert torch.equal(soft.labels, labels)
    assert torch.equal(soft.indices, indices)
    assert soft.logits.dtype == torch.float32 and soft.labels.dtype == torch.int64
    assert soft.metadata["rbkd_format"] == FORMAT_VERSION
    assert soft.dataset == "fashion-mnist" and soft.split == "train" and soft.num_classes == C
    assert soft.teacher == "runs/t1@sha256:" + "ab" * 32
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", soft.metadata["created"])
    assert torch.allclose(soft.probs(9.0), torch.softmax(logits / 9.0, dim=1), atol=1e-6)
    assert not list(path.parent.glob(".*.part"))  # no temporary file left behind


def test_subset_indices_and_dense_logits(tmp_path):
    logits, labels, _ = _tensors()
    indices = torch.arange(0, 2 * N, 2, dtype=torch.int64)
    full_labels = torch.zeros(2 * N, dtype=torch.int64)
    full_labels[indices] = labels
    path = write_soft_labels(
        tmp_path / "s.safetensors",
        logits,
        labels,
        indices,
        dataset="fashion-mnist",
        split="test",
        teacher_run="r",
        teacher_sha256="0" * 64,
    )
    soft = read_soft_labels(path, dataset=_dataset(full_labels, split="test"))
    dense = soft.dense_logits(2 * N)
    assert torch.equal(dense[indices], logits)
    assert torch.isnan(dense[1]).all()


def test_sha256_file(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_missing_file(tmp_path):
    with pytest.raises(SoftLabelsError, match=r"nope\.safetensors: no such file; write one"):
        read_soft_labels(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 100])
def test_truncated_or_garbage_file(soft_file, tmp_path, keep):
    path = soft_file[0]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(SoftLabelsError) as e:
        read_soft_labels(bad)
    msg = str(e.value)
    assert "bad.safetensors" in msg and "regenerate it" in msg and "\n" not in msg


def _rewrite(path, tmp_path, *, tensors=None, metadata=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    data = load_file(path)
    if tensors:
        data.update(tensors)
        data = {k: v for k, v in data.items() if v is not None}
    if metadata:
        meta.update(metadata)
        meta = {k: v for k, v in meta.items() if v is not None}
    out = tmp_path / "edited.safetensors"
    save_file(data, out, metadata=meta)
    return out


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ({"labels": None}, None, "missing tensor(s) labels"),
        ({"logits": torch.zeros(N, C, dtype=torch.float64)}, None, "logits must be float32"),
        ({"labels": torch.zeros(N, dtype=torch.int32)}, None, "labels must be int64"),
        ({"indices": torch.arange(N - 1)}, None, "indices must be int64 [50]"),
        ({"indices": torch.zeros(N, dtype=torch.int64)}, None, "indices must be distinct"),
        ({"labels": torch.full((N,), C)}, None, "labels outside [0, 10)"),
        (
            {"logits": torch.full((N, C), float("nan"))},
            None,
            "logits contain NaN or inf",
        ),
        (None, {"rbkd_format": "2"}, "format '2'"),
        (None, {"teacher": None}, "missing metadata teacher"),
        (None, {"num_classes": "3"}, "metadata says 3 classes"),
        (None, {"split": "val"}, "unknown split 'val'"),
    ],
)
def test_malformed_contents(soft_file, tmp_path, tensors, metadata, message):
    path = _rewrite(soft_file[0], tmp_path, tensors=tensors, metadata=metadata)
    with pytest.raises(SoftLabelsError) as e:
        read_soft_labels(path)
    assert message in str(e.value)
    assert "edited.safetensors" in str(e.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "mnist"}, "made for dataset 'fashion-mnist', not 'mnist'"),
        ({"num_classes": 100}, "has 10 classes, dataset 'fashion-mnist' has 100"),
        ({"split": "test"}, "made for the train split, not test"),
        ({"labels": "short"}, "indices reach 49"),
        ({"labels": "flipped"}, "labels differ from the dataset's at 1 row(s) (first: index 3"),
    ],
)
def test_mismatched_dataset(soft_file, change, message):
    path, _, labels, _ = soft_file
    kwargs = dict(change)
    if kwargs.get("labels") == "short":
        kwargs["labels"] = labels[:10]
    elif kwargs.get("labels") == "flipped":
        flipped = labels.clone()
        flipped[3] = (flipped[3] + 1) % C
        kwargs["labels"] = flipped
    ds = _dataset(kwargs.pop("labels", labels), **kwargs)
    with pytest.raises(SoftLabelsError) as e:
        read_soft_labels(path, dataset=ds)
    assert message in str(e.value)
    assert "rbkd soft-labels --teacher RUN" in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": torch.zeros(N, dtype=torch.int32)}, "labels must be int64"),
        ({"indices": torch.arange(N + 1)}, "indices must be int64 [50]"),
        ({"logits": torch.zeros(N)}, "logits must be [N, C]"),
        ({"split": "val"}, "split must be one of train, test"),
    ],
)
def test_write_checks_inputs(tmp_path, kwargs, message):
    logits, labels, indices = _tensors()
    args = {"logits": logits, "labels": labels, "indices": indices, "split": "train"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        write_soft_labels(
            tmp_path / "x.safetensors",
            dataset="fashion-mnist",
            teacher_run="r",
            teacher_sha256="0" * 64,
            **args,
        )
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ issue 9: hostile files
def test_a_fifo_or_dev_zero_is_an_error_naming_the_kind_never_a_hang(tmp_path):
    import os

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SoftLabelsError, match=r"fifo\.safetensors is a FIFO"):
        read_soft_labels(fifo)
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    with pytest.raises(SoftLabelsError, match=r"zero\.safetensors is a character device"):
        read_soft_labels(zero)


@pytest.mark.parametrize("size", [5000, 2_000_000])
def test_huge_metadata_is_refused_on_read(soft_file, tmp_path, size):
    from safetensors.torch import save

    path = soft_file[0]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["teacher"] = "x" * size
    bad = tmp_path / "big.safetensors"
    bad.write_bytes(save(load_file(path), metadata=meta))
    with pytest.raises(SoftLabelsError, match=r"big\.safetensors.*limit") as e:
        read_soft_labels(bad)
    assert len(str(e.value)) < 400


# ------------------------------------------------------------------ issue 9 #2: stale labels
def _teacher_run(tmp_path, name="t1", seed=0):
    run = tmp_path / name
    run.mkdir()
    save_file(
        {"w": torch.randn(3, generator=torch.Generator().manual_seed(seed))},
        run / "model.safetensors",
    )
    logits, labels, indices = _tensors(seed)
    write_soft_labels(
        run / "soft_labels_train.safetensors",
        logits,
        labels,
        indices,
        dataset="fashion-mnist",
        split="train",
        teacher_run=run,
        teacher_sha256=sha256_file(run / "model.safetensors"),
    )
    return run


def test_read_teacher_soft_labels_accepts_the_runs_own_labels(tmp_path):
    from rbkd.soft_label_file import read_teacher_soft_labels

    run = _teacher_run(tmp_path)
    soft = read_teacher_soft_labels(run, "train", _dataset(_tensors()[1]))
    assert len(soft) == N and soft.path == run / "soft_labels_train.safetensors"


def test_stale_soft_labels_are_refused(tmp_path):
    """A resumed train-teacher killed before it rewrote its soft labels: new weights, old
    labels."""
    from rbkd.soft_label_file import read_teacher_soft_labels

    run = _teacher_run(tmp_path)
    save_file({"w": torch.ones(3)}, run / "model.safetensors")  # the next epoch's weights
    with pytest.raises(SoftLabelsError) as e:
        read_teacher_soft_labels(run, "train")
    msg = str(e.value)
    assert "stale" in msg and f"rbkd soft-labels --teacher {run} --split train" in msg
    assert "\n" not in msg


def test_soft_labels_copied_from_another_run_are_refused(tmp_path):
    from rbkd.soft_label_file import read_teacher_soft_labels

    a, b = _teacher_run(tmp_path, "a", seed=0), _teacher_run(tmp_path, "b", seed=1)
    (a / "soft_labels_train.safetensors").write_bytes(
        (b / "soft_labels_train.safetensors").read_bytes()
    )
    with pytest.raises(SoftLabelsError, match="copied from another run"):
        read_teacher_soft_labels(a, "train")
    with pytest.raises(SoftLabelsError, match="no such file"):
        read_teacher_soft_labels(a, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        read_teacher_soft_labels(a, "validation")
