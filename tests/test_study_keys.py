"""Run keys change when, and only when, something that determines the run changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rbkd.config import DistillSpec, TeacherSpec, TrainConfig
from rbkd.study import keys
from rbkd.study.keys import student_key, teacher_key

FP = "f" * 64
SOURCE = {"teacher": "a" * 64}


def test_teacher_key_ignores_what_does_not_change_the_numbers():
    base = teacher_key(TeacherSpec(), TrainConfig(), FP)
    same = TrainConfig(device="cuda:3", eval_batch_size=17)
    assert teacher_key(TeacherSpec(), same, FP) == base
    # 9 and 9.0, 1e-3 and 0.001: the same inputs, the same key
    assert teacher_key(TeacherSpec(), TrainConfig(lr=0.001), FP) == base


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": 11},
        {"batch_size": 4096},
        {"lr": 2e-3},
        {"optimizer": "sgd"},
        {"momentum": 0.5},
        {"weight_decay": 1e-4},
        {"seed": 1},
    ],
    ids=lambda c: next(iter(c)),
)
def test_teacher_key_changes_with_every_training_input(change):
    base = teacher_key(TeacherSpec(), TrainConfig(), FP)
    assert teacher_key(TeacherSpec(), TrainConfig(**change), FP) != base


def test_teacher_key_changes_with_capacity_data_and_numerics(monkeypatch):
    base = teacher_key(TeacherSpec(), TrainConfig(), FP)
    assert teacher_key(TeacherSpec(capacity="large"), TrainConfig(), FP) != base
    assert teacher_key(TeacherSpec(), TrainConfig(), "e" * 64) != base
    monkeypatch.setattr(keys, "NUMERICS_VERSION", keys.NUMERICS_VERSION + 1)
    assert teacher_key(TeacherSpec(), TrainConfig(), FP) != base


@pytest.mark.parametrize(
    "change",
    [
        {"T": 3.0},
        {"alpha": 0.5},
        {"t_squared": False},
        {"student": "baseline"},
        {"exclude_classes": [1]},
        {"per_class": 10},
        {"noise": "normal:0.05"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_student_key_changes_with_every_distillation_input(change):
    base = student_key(DistillSpec(), TrainConfig(), FP, SOURCE)
    assert student_key(DistillSpec(**change), TrainConfig(), FP, SOURCE) != base


def test_student_key_changes_with_source_data_and_training():
    spec, cfg = DistillSpec(), TrainConfig()
    base = student_key(spec, cfg, FP, SOURCE)
    assert student_key(spec, cfg, FP, {"teacher": "b" * 64}) != base
    assert student_key(spec, cfg, FP, {"label_smoothing": 0.5}) != base
    assert student_key(spec, cfg, "e" * 64, SOURCE) != base
    assert student_key(spec, TrainConfig(seed=1), FP, SOURCE) != base
    assert student_key(spec, TrainConfig(epochs=3), FP, SOURCE) != base


def test_student_key_ignores_paths_device_and_order():
    spec = DistillSpec(exclude_classes=[3, 1], data_dir="/somewhere", limit=None)
    cfg = TrainConfig(device="cpu")
    same = dataclasses.replace(spec, exclude_classes=[1, 3, 3], teacher="runs/elsewhere")
    base = student_key(spec, cfg, FP, SOURCE)
    assert student_key(same, TrainConfig(device="cuda"), FP, SOURCE) == base
    # the selection rule only matters when a per-class size is given
    assert student_key(dataclasses.replace(spec, select="random"), cfg, FP, SOURCE) == base
    with_n = dataclasses.replace(spec, per_class=5)
    assert student_key(with_n, cfg, FP, SOURCE) != student_key(
        dataclasses.replace(with_n, select="random"), cfg, FP, SOURCE
    )


def _split(name="fashion-mnist", split="train", n=6):
    from rbkd.data.dataset import ImageDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(n, dtype=torch.int64) % 10
    names = tuple(str(k) for k in range(10))
    return ImageDataset(name, split, images, labels, 10, names)


def test_data_fingerprint_sees_one_pixel_one_label_and_the_cut():
    train, test = _split(), _split(split="test")
    base = keys.data_fingerprint(train, test)
    assert keys.data_fingerprint(_split(), _split(split="test")) == base
    pixel = dataclasses.replace(train, images=train.images.clone())
    pixel.images[2, 0, 5, 5] ^= 1
    assert keys.data_fingerprint(pixel, test) != base
    label = dataclasses.replace(train, labels=train.labels.clone())
    label.labels[0] = 9
    assert keys.data_fingerprint(label, test) != base
    cut = dataclasses.replace(train, images=train.images[:5], labels=train.labels[:5])
    assert keys.data_fingerprint(cut, test) != base
    assert keys.data_fingerprint(_split(name="mnist"), test) != base


def test_run_key_refuses_non_finite_inputs():
    with pytest.raises(ValueError, match="finite"):
        keys.run_key("teacher", {"lr": float("nan")})
