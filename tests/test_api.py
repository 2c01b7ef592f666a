"""The public Python API: rbkd.train_teacher / soft_labels / distill with your own models and data.

No attribute patching anywhere: plain nn.Sequential teachers and students, random tensors, NumPy
arrays and map-style Datasets. Numbers are checked against independent computations (the teacher
run by hand, one SGD step of the loss convention done in float64 by autograd).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import rbkd
from rbkd.data import ImageDataset
from rbkd.soft_label_file import read_soft_labels, read_teacher_soft_labels, state_dict_sha256

FEATURES, CLASSES = 12, 4


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 12 dimensions: learnable in an epoch or two."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(99)) * 3
    return centres[y] + torch.randn(n, FEATURES, generator=g), y


def mlp(out: int = CLASSES, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, out))


FAST = {"epochs": 2, "batch_size": 32, "lr": 0.01, "device": "cpu"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a call writes where it should not shows up here


def test_import_rbkd_does_not_import_torch():
    code = "import rbkd, sys; assert 'torch' not in sys.modules; print(rbkd.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == rbkd.__version__


def test_lazy_names_resolve_to_their_homes():
    import rbkd.config
    import rbkd.ops

    assert rbkd.kd_loss is rbkd.ops.kd_loss
    assert rbkd.soft_label_entropy is rbkd.ops.soft_label_entropy
    assert rbkd.temperature_softmax is rbkd.ops.temperature_softmax
    assert rbkd.TrainConfig is rbkd.config.TrainConfig
    assert rbkd.ImageDataset is ImageDataset
    assert set(rbkd.__all__) <= set(dir(rbkd))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rbkd.nope  # noqa: B018


def test_subpackages_are_attributes_after_a_bare_import():
    code = (
        "import rbkd, sys\n"
        "assert 'torch' not in sys.modules\n"
        "print(rbkd.engine.load_run.__module__, rbkd.models.SPECS is not None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["rbkd.engine.rundir", "True"]


def test_teacher_soft_labels_and_student_on_tensors(tmp_path):
    x, y = blobs(256, 0)
    xt, yt = blobs(128, 1)
    teacher = mlp()
    result = rbkd.train_teacher(teacher, (x, y), (xt, yt), **FAST)
    assert result.model is teacher
    assert result.epochs == 2 and [r["epoch"] for r in result.history] == [1, 2]
    assert result.test_accuracy == result.history[-1]["test_accuracy"] > 0.9
    assert len(result.per_class_accuracy) == CLASSES
    assert result.run_dir is None and result.files == {}
    assert result.config == rbkd.TrainConfig(epochs=2, batch_size=32, lr=0.01, device="cpu")

    soft = rbkd.soft_labels(teacher, (x, y))
    with torch.no_grad():
        expected = teacher.eval()(x)
    torch.testing.assert_close(soft.logits, expected)
    assert torch.equal(soft.labels, y) and torch.equal(soft.indices, torch.arange(256))

    student = nn.Sequential(nn.Linear(FEATURES, CLASSES))
    distilled = rbkd.distill(student, (x, y), (xt, yt), soft_labels=soft, **FAST)
    assert distilled.soft_labels is soft and distilled.model is student
    assert distilled.test_accuracy > 0.5  # chance is 0.25
    assert list(tmp_path.iterdir()) == []  # nothing written: no out= given


def test_distill_step_matches_the_loss_convention_by_hand():
    """One full-batch SGD step of rbkd.distill equals the README's formula done in float64."""
    x, y = blobs(64, 2)
    teacher = mlp(seed=3)
    student = nn.Sequential(nn.Linear(FEATURES, CLASSES))
    before = copy.deepcopy(student).double()
    cfg = rbkd.TrainConfig(epochs=1, batch_size=64, lr=0.5, optimizer="sgd", momentum=0.0)
    T, alpha = 4.0, 0.7
    rbkd.distill(student, (x, y), teacher=teacher, T=T, alpha=alpha, config=cfg, device="cpu")
    with torch.no_grad():
        t = teacher(x).double()
    z = before(x.double())
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(z / T, 1))).sum(1)
    loss = ((1 - alpha) * F.cross_entropy(z, y, reduction="none") + alpha * T**2 * kl).mean()
    loss.backward()
    for mine, ref in zip(student.parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(mine.detach().double(), ref - 0.5 * ref.grad, atol=1e-5, rtol=0)


def test_defaults_are_the_command_lines():
    x, y = blobs(64, 0)
    result = rbkd.distill(
        nn.Sequential(nn.Linear(FEATURES, CLASSES)), (x, y), teacher=mlp(), epochs=1
    )
    assert result.config == rbkd.TrainConfig(epochs=1)
    spec = rbkd.DistillSpec()
    assert (spec.T, spec.alpha, spec.t_squared) == (9.0, 0.99, True)


def test_numpy_input_trains_exactly_like_tensors():
    x, y = blobs(128, 4)
    a, b = mlp(seed=5), mlp(seed=5)
    ra = rbkd.train_teacher(a, (x, y), (x, y), **FAST)
    rb = rbkd.train_teacher(b, (x.double().numpy(), y.numpy().astype(np.int32)), (x, y), **FAST)
    assert ra.history[-1]["train_objective_loss"] == rb.history[-1]["train_objective_loss"]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


class GreyImages(torch.utils.data.Dataset):
    """A map-style dataset of NumPy uint8 [28, 28, 1] images (channels last, as PIL gives)."""

    classes = [f"c{k}" for k in range(10)]

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.y = np.arange(n) % 10
        self.x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_map_style_dataset_with_an_rbkd_model_name(tmp_path):
    ds = GreyImages(40)
    data = ImageDataset.from_dataset(ds)
    assert data.images.shape == (40, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.class_names == tuple(ds.classes)
    assert torch.equal(data.images[3, 0], torch.from_numpy(ds.x[3, :, :, 0]))
    torch.testing.assert_close(data.normalize(data.images[:2]), data.images[:2].float() / 255)

    result = rbkd.train_teacher("baseline", ds, epochs=1, device="cpu", out=tmp_path / "t")
    assert type(result.model).__name__ == "RBKDModel"
    assert result.test_accuracy is None and result.per_class_accuracy is None  # no test split
    assert result.train_objective_loss is not None and result.train_accuracy is not None
    model, config = rbkd.engine.load_run(tmp_path / "t")  # rbkd's own model: loadable
    assert (config["dataset"], config["arch"]) == ("fashion-mnist", "baseline")
    assert config["test_data"] is None
    read_teacher_soft_labels(tmp_path / "t", "train", data)  # tied to its model.safetensors

    tensors = torch.utils.data.TensorDataset(*blobs(64, 6))
    student = rbkd.distill(
        nn.Sequential(nn.Linear(FEATURES, CLASSES)), tensors, teacher=mlp(), epochs=1
    )
    assert student.epochs == 1


def test_soft_labels_from_a_plain_function():
    x, y = blobs(50, 7)
    w = torch.randn(FEATURES, CLASSES)

    def linear_teacher(batch):
        return batch @ w

    soft = rbkd.soft_labels(linear_teacher, (x, y), batch_size=16)
    torch.testing.assert_close(soft.logits, x @ w)
    assert soft.metadata["teacher_kind"] == "user callable"
    assert soft.teacher.startswith("user callable ") and "linear_teacher" in soft.teacher
    assert soft.teacher.endswith(", no state")
    torch.testing.assert_close(
        soft.probs(3.0), torch.softmax(x.double() @ w.double() / 3, 1).float()
    )


class OutputWithLogits(nn.Module):
    """A Hugging Face style model: its output object carries `.logits`."""

    def __init__(self):
        super().__init__()
        self.net = mlp(seed=6)

    def forward(self, x):
        return SimpleNamespace(logits=self.net(x), hidden_states=None)


def test_soft_labels_read_logits_fields_and_keep_an_image_datasets_split():
    x, y = blobs(30, 13)
    teacher = OutputWithLogits()
    data = ImageDataset.from_tensors(x, y, split="test")
    soft = rbkd.soft_labels(teacher, data)
    assert soft.split == "test"
    with torch.no_grad():
        torch.testing.assert_close(soft.logits, teacher.net(x))
    assert teacher.training  # put back in train mode after labelling in eval mode


def test_soft_labels_from_a_module_record_its_state(tmp_path):
    x, y = blobs(40, 8)
    teacher = mlp(seed=1)
    path = tmp_path / "soft.safetensors"
    soft = rbkd.soft_labels(teacher, (x, y), out=path)
    digest = state_dict_sha256(teacher)
    assert soft.path == path and soft.metadata["teacher_state_sha256"] == digest
    assert soft.metadata["teacher_kind"] == "user model"
    assert "torch.nn.modules.container.Sequential" in soft.teacher and digest in soft.teacher
    with torch.no_grad():
        teacher[0].weight[0, 0] += 1.0
    assert state_dict_sha256(teacher) != digest  # any weight change shows

    # The file reads back like any soft-label file, checks its data, and feeds distill.
    again = read_soft_labels(path, dataset=ImageDataset.from_tensors(x, y))
    torch.testing.assert_close(again.logits, soft.logits)
    wrong = ImageDataset.from_tensors(x, (y + 1) % CLASSES)
    with pytest.raises(ValueError, match="labels differ"):
        read_soft_labels(path, dataset=wrong)
    result = rbkd.distill(
        nn.Sequential(nn.Linear(FEATURES, CLASSES)), (x, y), soft_labels=path, epochs=1
    )
    assert torch.equal(result.soft_labels.logits, soft.logits)
    with pytest.raises(ValueError, match="labels differ"):
        rbkd.distill(mlp(), (x, (y + 1) % CLASSES), soft_labels=path, epochs=1)


def test_run_folder_only_when_asked_then_loadable_and_resumable(tmp_path):
    x, y = blobs(96, 9)
    teacher = mlp(seed=2)
    rbkd.distill(mlp(seed=4), (x, y), teacher=teacher, epochs=1, device="cpu")
    assert list(tmp_path.iterdir()) == []

    whole = rbkd.distill(mlp(seed=4), (x, y), (x, y), teacher=teacher, epochs=2, device="cpu")
    out = tmp_path / "s"
    rbkd.distill(mlp(seed=4), (x, y), (x, y), teacher=teacher, epochs=1, device="cpu", out=out)
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == {"class": "torch.nn.modules.container.Sequential", "parameters": 548}
    assert config["dataset"] is None and config["extra_config"]["api"] == "rbkd.distill"
    with pytest.raises(ValueError, match="already holds a run"):
        rbkd.distill(mlp(seed=4), (x, y), (x, y), teacher=teacher, epochs=2, out=out)
    resumed = rbkd.distill(
        mlp(seed=4), (x, y), (x, y), teacher=teacher, epochs=2, device="cpu", out=out, resume=True
    )
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    assert provenance["device"] == "cpu" and provenance["torch_threads"] >= 1
    assert [r["resumed_at_epoch"] for r in provenance["resumes"]] == [1]  # the start is kept
    assert resumed.files["model"] == out / "model.safetensors"
    weights = load_file(str(out / "model.safetensors"))
    fresh = mlp(seed=0)
    fresh.load_state_dict(weights)  # a user model loads into its own class
    for p, q in zip(fresh.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(p, q)  # resumed == uninterrupted
    with pytest.raises(ValueError, match=r"your own model \(torch.nn.modules.container.Sequential"):
        rbkd.engine.load_run(out)  # rbkd cannot rebuild it: says how to load it instead
    loaded, _ = rbkd.engine.load_run(out, model=mlp(seed=7))
    assert not loaded.training
    for p, q in zip(loaded.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="does not fit the model passed to load_run"):
        rbkd.engine.load_run(out, model=nn.Sequential(nn.Linear(FEATURES, CLASSES)))
    assert resumed.test_accuracy == whole.test_accuracy
    with pytest.raises(ValueError, match="cannot resume"):  # another student class
        rbkd.distill(
            nn.Sequential(nn.Linear(FEATURES, CLASSES)), (x, y), (x, y), teacher=teacher,
            epochs=3, device="cpu", out=out, resume=True,
        )  # fmt: skip


def test_engine_fit_takes_any_module():
    x, y = blobs(64, 10)
    data = ImageDataset.from_tensors(x, y)
    batch = data.images[:5]
    assert data.is_float and data.normalize(batch) is batch  # no copy, no rescaling
    assert torch.equal(data.normalize(data.images[:5]), x[:5])  # float features pass through
    metrics = rbkd.engine.fit(
        nn.Sequential(nn.Linear(FEATURES, CLASSES)),
        data,
        data,
        rbkd.TrainConfig(epochs=1, device="cpu"),
        rbkd.engine.CrossEntropy(),
        progress=False,
    )
    assert metrics["epochs"] == 1 and 0 <= metrics["test_accuracy"] <= 1


def test_teacher_with_more_outputs_than_seen_labels():
    x, y = blobs(40, 11)
    keep = y < 3  # class 3 never appears, the teacher still has 4 outputs
    result = rbkd.distill(mlp(), (x[keep], y[keep]), teacher=mlp(), epochs=1)
    assert result.soft_labels.num_classes == CLASSES


def _one_line_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("lengths", "10 inputs but 9 labels|shape \\[10\\]"),
        ("float_labels", "labels must be integer"),
        ("negative_labels", "labels must be >= 0"),
        ("labels_past_classes", "labels reach 3 but num_classes is 2"),
        ("teacher_shape", "must return float logits \\[10, num_classes\\]"),
        ("teacher_not_tensor", "it must return logits"),
        ("teacher_not_callable", "teacher must be an nn.Module or a function"),
        ("student_width", "has 3 outputs but the teacher's soft labels have 4 classes"),
        ("both_sources", "exactly one of teacher="),
        ("model_name", "is not an rbkd model"),
        ("zoo_shape", "pass your own nn.Module"),
        ("data_kind", "must be an ImageDataset, a pair"),
        ("temperature", "T = 500 is above 100, the largest temperature kd_loss computes"),
    ],
)
def test_bad_input_is_one_clear_line(case, match):
    x, y = blobs(10, 12)
    student = nn.Sequential(nn.Linear(FEATURES, CLASSES))
    calls = {
        "lengths": lambda: rbkd.soft_labels(mlp(), (x, y[:9])),
        "float_labels": lambda: rbkd.train_teacher(mlp(), (x, y.float()), epochs=1),
        "negative_labels": lambda: rbkd.train_teacher(mlp(), (x, y - 1), epochs=1),
        "labels_past_classes": lambda: rbkd.train_teacher(mlp(2), (x, y), num_classes=2),
        "teacher_shape": lambda: rbkd.soft_labels(lambda b: b.sum(1), (x, y)),
        "teacher_not_tensor": lambda: rbkd.soft_labels(lambda b: b.tolist(), (x, y)),
        "teacher_not_callable": lambda: rbkd.distill(student, (x, y), teacher=3, epochs=1),
        "student_width": lambda: rbkd.distill(mlp(3), (x, y), teacher=mlp(), epochs=1),
        "both_sources": lambda: rbkd.distill(student, (x, y), teacher=mlp(), soft_labels="f"),
        "model_name": lambda: rbkd.train_teacher("huge", (x, y), epochs=1),
        "zoo_shape": lambda: rbkd.train_teacher("small", (x, y), epochs=1),
        "data_kind": lambda: rbkd.train_teacher(mlp(), 42, epochs=1),
        "temperature": lambda: rbkd.distill(student, (x, y), teacher=mlp(), T=500),
    }
    _one_line_error(calls[case], match)


class LogitsOutput(nn.Module):
    """A model whose forward returns an object with `.logits`, as Hugging Face models do."""

    def __init__(self, seed: int):
        super().__init__()
        self.body = mlp(seed=seed)

    def forward(self, x):
        return SimpleNamespace(logits=self.body(x), hidden_states=None)


def test_models_returning_an_output_object_train_as_teacher_and_student():
    x, y = blobs(96, 12)
    plain = rbkd.distill(mlp(seed=5), (x, y), (x, y), teacher=mlp(seed=2), **FAST)
    wrapped = rbkd.distill(LogitsOutput(5), (x, y), (x, y), teacher=LogitsOutput(2), **FAST)
    assert wrapped.test_accuracy == plain.test_accuracy
    for p, q in zip(wrapped.model.body.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q)  # the same numbers as the plain modules, step for step
