"""Issue 13, items 11, 14 and 15: every misuse of the Python API is one ValueError line naming the
argument, raised before any work (and before any run folder exists); a BatchNorm model whose last
batch would hold one row trains, skipping that row deterministically (resume included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import rbkd

N, FEATURES, CLASSES = 17, 8, 3


def data(n: int = N, features: int = FEATURES):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=g), torch.arange(n) % CLASSES


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, CLASSES))


def with_batchnorm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 4), nn.BatchNorm1d(4), nn.Linear(4, CLASSES))


def one_line(excinfo, *fragments: str) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


# ------------------------------------------------------------------ item 11 / 14: values
@pytest.mark.parametrize(
    ("keywords", "fragments"),
    [
        ({"epochs": 1.5}, ("epochs", "integer", "1.5")),
        ({"epochs": 0}, ("epochs must be >= 1", "got 0")),
        ({"seed": -1}, ("seed must be >= 0", "got -1")),
        ({"seed": True}, ("seed must be an integer",)),
        ({"batch_size": 2.5}, ("batch_size must be an integer",)),
        ({"batch_size": 0}, ("batch_size must be >= 1",)),
        ({"lr": float("nan")}, ("lr must be > 0",)),
        ({"lr": -1e-3}, ("lr must be > 0",)),
    ],
)
@pytest.mark.parametrize("call", ["train_teacher", "distill"])
def test_bad_values_are_one_line_before_any_run_folder(tmp_path, call, keywords, fragments):
    out = tmp_path / "r"
    with pytest.raises(ValueError) as excinfo:
        if call == "train_teacher":
            rbkd.train_teacher(linear(), data(), device="cpu", out=out, **keywords)
        else:
            rbkd.distill(linear(), data(), teacher=linear(1), device="cpu", out=out, **keywords)
    one_line(excinfo, *fragments)
    assert not out.exists()


def test_the_corrected_call_then_runs_into_the_same_folder(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="seed"):
        rbkd.train_teacher(linear(), data(), epochs=1, seed=-1, device="cpu", out=out)
    result = rbkd.train_teacher(linear(), data(), epochs=1, seed=1, device="cpu", out=out)
    assert result.epochs == 1 and (out / "model.safetensors").exists()


def test_epochs_zero_in_a_config_is_refused_too():
    config = rbkd.TrainConfig(epochs=0, device="cpu")  # the engine's own floor is 0
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        rbkd.train_teacher(linear(), data(), config=config)


def test_soft_labels_batch_size_is_checked():
    with pytest.raises(ValueError) as excinfo:
        rbkd.soft_labels(linear(), data(), batch_size=-2)
    one_line(excinfo, "batch_size must be >= 1")


# ------------------------------------------------------------------ item 14: models and splits
class NoParameters(nn.Module):
    def forward(self, x):
        return x[:, :CLASSES]


def frozen() -> nn.Module:
    return linear().requires_grad_(False)


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda: linear().double(), ("float64", "float32", "model.float()")),
        (lambda: linear().half(), ("float16", "float32", "model.float()")),
        (lambda: linear().to("meta"), ("meta device",)),
        (NoParameters, ("no parameters",)),
        (frozen, ("frozen", "requires_grad")),
    ],
    ids=["float64", "float16", "meta", "no-parameters", "frozen"],
)
@pytest.mark.parametrize("call", ["train_teacher", "distill"])
def test_models_rbkd_cannot_train_are_one_line(call, make, fragments):
    name = "model" if call == "train_teacher" else "student"
    with pytest.raises(ValueError) as excinfo:
        if call == "train_teacher":
            rbkd.train_teacher(make(), data(), epochs=1, device="cpu")
        else:
            rbkd.distill(make(), data(), teacher=linear(1), epochs=1, device="cpu")
    assert one_line(excinfo, *fragments).startswith(name) or name in str(excinfo.value)


def test_a_float64_or_float16_teacher_gives_float32_soft_labels():
    for dtype in (torch.float64, torch.float16):
        soft = rbkd.soft_labels(linear().to(dtype), data())
        assert soft.logits.dtype == torch.float32 and soft.logits.shape == (N, CLASSES)


def test_a_teacher_on_meta_is_one_line():
    with pytest.raises(ValueError) as excinfo:
        rbkd.soft_labels(linear().to("meta"), data())
    one_line(excinfo, "teacher", "meta device")


def test_a_test_split_of_another_width_is_one_line():
    x_test, y_test = data(5, FEATURES + 1)
    with pytest.raises(ValueError) as excinfo:
        rbkd.train_teacher(linear(), data(), (x_test, y_test), epochs=1, device="cpu")
    one_line(excinfo, "test", "train", str([FEATURES + 1]), str([FEATURES]))


# ------------------------------------------------------------------ item 15: which argument
@pytest.mark.parametrize("which", ["train", "test"])
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_forgotten_labels_name_the_argument(which, kind):
    x, y = data()
    bare = x.numpy() if kind == "numpy" else x
    train, test = (bare, (x, y)) if which == "train" else ((x, y), bare)
    with pytest.raises(ValueError) as excinfo:
        rbkd.train_teacher(linear(), train, test, epochs=1, device="cpu")
    text = one_line(excinfo, f"{which}=(x, y)")
    assert text.startswith(which)


def test_a_dataset_of_bare_rows_names_the_argument():
    x, y = data()
    with pytest.raises(ValueError) as excinfo:
        rbkd.train_teacher(linear(), (x, y), list(np.asarray(x)), epochs=1, device="cpu")
    one_line(excinfo, "test: ", "must be a pair (input, label)")


def test_a_student_with_too_many_outputs_is_blamed_on_the_student():
    torch.manual_seed(0)
    wide = nn.Linear(FEATURES, CLASSES + 2)
    with pytest.raises(ValueError) as excinfo:
        rbkd.distill(wide, data(), teacher=linear(1), epochs=1, device="cpu")
    text = one_line(excinfo, "student", f"{CLASSES + 2} outputs", f"{CLASSES} classes")
    assert "<memory>" not in text and "rbkd " not in text and "same dataset" not in text


# ------------------------------------------------------------------ item 14: BatchNorm
def test_batchnorm_skips_a_last_batch_of_one_row_deterministically(tmp_path):
    whole = rbkd.train_teacher(
        with_batchnorm(), data(), epochs=3, batch_size=16, device="cpu", out=tmp_path / "a"
    )
    assert len(whole.history) == 3 and all(
        np.isfinite(r["train_objective_loss"]) for r in whole.history
    )
    again = rbkd.train_teacher(with_batchnorm(), data(), epochs=3, batch_size=16, device="cpu")
    rbkd.train_teacher(
        with_batchnorm(), data(), epochs=1, batch_size=16, device="cpu", out=tmp_path / "b"
    )
    resumed = rbkd.train_teacher(
        with_batchnorm(),
        data(),
        epochs=3,
        batch_size=16,
        device="cpu",
        out=tmp_path / "b",
        resume=True,
    )
    for other in (again, resumed):
        pairs = zip(
            whole.model.state_dict().values(), other.model.state_dict().values(), strict=True
        )
        for a, b in pairs:
            assert torch.equal(a, b)


def test_batchnorm_with_batches_of_one_row_is_one_line():
    with pytest.raises(ValueError) as excinfo:
        rbkd.train_teacher(with_batchnorm(), data(), epochs=1, batch_size=1, device="cpu")
    one_line(excinfo, "batch_size is 1", "BatchNorm")


def test_batchnorm_on_images_keeps_its_last_row():
    """A BatchNorm2d sees H x W values per channel: a one-row batch trains, nothing is skipped
    (so rbkd's CIFAR-10 `large` teacher computes what it always did)."""
    from rbkd.engine.loop import _single_value_batchnorm

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    images = torch.randint(0, 255, (N, 6, 6), dtype=torch.uint8)
    ds = rbkd.ImageDataset.from_tensors(images, torch.arange(N) % CLASSES)
    conv(ds.normalize(ds.images[:2]))  # materialise the lazy layer
    assert not _single_value_batchnorm(conv, ds, 0)
    assert _single_value_batchnorm(with_batchnorm(), rbkd.ImageDataset.from_tensors(*data()), 0)
    result = rbkd.train_teacher(conv, ds, epochs=1, batch_size=16, device="cpu")
    assert result.epochs == 1
