"""Engine: one loop for CE / KD / LS, determinism, resume, run directory, divergence, evaluation."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rbkd.engine import (
    CrossEntropy,
    Distillation,
    LabelSmoothing,
    RunDirError,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    fit,
    load_run,
    penultimate_features,
    predict_logits,
)
from rbkd.engine.checkpoint import read_checkpoint_info
from rbkd.models import build_model


@dataclass
class TinyDataset:
    """Same fields as rbkd.data.ImageDataset: class k is a bright 7x7 block at spot k, plus noise."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int = 10
    class_names: tuple = tuple(str(k) for k in range(10))

    def normalize(self, batch):
        return (batch.float() / 255 - 0.2) / 0.3

    def __len__(self):
        return len(self.labels)


def tiny(n: int, split: str = "train", seed: int = 0) -> TinyDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 80, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, c = 7 * (k // 4), 7 * (k % 4)
        images[i, 0, r : r + 7, c : c + 7] += 150
    return TinyDataset("tiny", split, images, labels)


TRAIN, TEST = tiny(200), tiny(100, "test", seed=1)
CFG = dict(epochs=3, batch_size=32, lr=2e-3, seed=7, device="cpu")


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max()}"


def test_fit_learns_and_writes_the_run_directory(tmp_path):
    model = build_model("mnist", "general", seed=0)
    out = fit(
        model,
        TRAIN,
        TEST,
        TrainConfig(**CFG),
        CrossEntropy(),
        run_dir=tmp_path,
        progress=False,
        extra_config={"note": "test"},
    )
    assert out["test_accuracy"] > 0.5 and out["epochs"] == 3
    assert len(out["per_class_accuracy"]) == 10 and out["samples_per_s"] > 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "model.safetensors",
        "checkpoint.safetensors",
    } <= names
    assert "checkpoint.json" not in names, "the checkpoint is one file"
    assert not [n for n in names if n.endswith(".part")], "temporary files left behind"
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["dataset"], config["arch"], config["seed"]) == ("mnist", "general", 7)
    assert config["objective"] == {"name": "cross_entropy"}
    assert config["train_config"]["batch_size"] == 32 and config["extra_config"] == {"note": "test"}
    assert {"torch", "rbkd", "python"} <= set(config["versions"])
    assert config["final_metrics"]["test_accuracy"] == out["test_accuracy"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    loaded, cfg = load_run(tmp_path)
    assert_same_weights(weights(loaded), weights(model))
    assert cfg["final_metrics"]["epochs"] == 3 and not loaded.training


def test_two_runs_with_one_seed_end_with_identical_weights():
    a, b = (build_model("mnist", "general", seed=0) for _ in range(2))
    for m in (a, b):
        fit(m, TRAIN, TEST, TrainConfig(**CFG), CrossEntropy(), progress=False)
    assert_same_weights(weights(a), weights(b))
    c = build_model("mnist", "general", seed=0)
    fit(c, TRAIN, TEST, TrainConfig(**{**CFG, "seed": 8}), CrossEntropy(), progress=False)
    assert not torch.equal(c.head.weight, a.head.weight), "seed must change the batch order"


def _teacher_logits():
    return torch.randn(len(TRAIN), 10, generator=torch.Generator().manual_seed(3)) * 3


@pytest.mark.parametrize(
    "arch,optimizer,objective",
    [
        ("general", "sgd", lambda: CrossEntropy()),
        # dropout (mnist large) + Adam state + per-epoch noise: all must be replayed on resume
        ("large", "adam", lambda: Distillation(_teacher_logits(), 4.0, 0.7, noise="normal:0.05")),
    ],
)
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, arch, optimizer, objective):
    cfg = {**CFG, "optimizer": optimizer, "lr": 1e-3}
    full = build_model("mnist", arch, seed=0)
    fit(full, TRAIN, TEST, TrainConfig(**cfg), objective(), run_dir=tmp_path / "a", progress=False)
    part = build_model("mnist", arch, seed=0)
    fit(
        part,
        TRAIN,
        TEST,
        TrainConfig(**{**cfg, "epochs": 1}),
        objective(),
        run_dir=tmp_path / "b",
        progress=False,
    )
    resumed = build_model("mnist", arch, seed=123)  # different init: the checkpoint must win
    out = fit(
        resumed,
        TRAIN,
        TEST,
        TrainConfig(**cfg),
        objective(),
        run_dir=tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert_same_weights(weights(resumed), weights(full))
    assert out["epochs"] == 3
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert_same_weights(
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )


def test_resume_refuses_changed_hyperparameters_and_fresh_runs_refuse_old_dirs(tmp_path):
    model = build_model("mnist", "baseline", seed=0)
    fit(
        model,
        TRAIN,
        TEST,
        TrainConfig(**{**CFG, "epochs": 1}),
        CrossEntropy(),
        run_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(RunDirError, match="train_config.lr"):
        fit(
            model,
            TRAIN,
            TEST,
            TrainConfig(**{**CFG, "lr": 0.5}),
            CrossEntropy(),
            run_dir=tmp_path,
            resume=True,
            progress=False,
        )
    with pytest.raises(RunDirError, match="resume=True"):
        fit(
            model, TRAIN, TEST, TrainConfig(**CFG), CrossEntropy(), run_dir=tmp_path, progress=False
        )


class NaNAfter(CrossEntropy):
    def __init__(self, good_steps):
        self.calls, self.good_steps = 0, good_steps

    def __call__(self, logits, labels, index):
        self.calls += 1
        loss = super().__call__(logits, labels, index)
        return loss * float("nan") if self.calls > self.good_steps else loss


def test_non_finite_loss_stops_before_the_update():
    model = build_model("mnist", "general", seed=0)
    before = weights(model)
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1/7") as info:
        fit(model, TRAIN, TEST, TrainConfig(**CFG), NaNAfter(0), progress=False)
    assert isinstance(info.value, ValueError)
    assert_same_weights(weights(model), before)
    assert all(torch.isfinite(v).all() for v in weights(model).values())


def test_evaluate_per_class_and_inference_helpers():
    model = build_model("mnist", "general", seed=0)
    first_five = torch.nonzero(TEST.labels < 5).flatten()
    out = evaluate(model, TEST, device="cpu", batch_size=7, indices=first_five)
    assert out["count"] == len(first_five)
    pcs = out["per_class_accuracy"]
    assert all(0 <= a <= 1 for a in pcs[:5]) and all(a != a for a in pcs[5:])  # NaN: absent
    logits = predict_logits(model, TEST, device="cpu", batch_size=7)
    with torch.no_grad():
        expected = model.eval()(TEST.normalize(TEST.images))
    torch.testing.assert_close(logits, expected)
    assert out["accuracy"] == pytest.approx(
        (logits[first_five].argmax(1) == TEST.labels[first_five]).float().mean().item()
    )
    feats = penultimate_features(model, TEST, device="cpu", batch_size=64, indices=first_five)
    assert feats.shape == (len(first_five), model.feature_dim)


def _grad(objective, logits, labels, index):
    z = logits.clone().requires_grad_(True)
    objective(z, labels, index).backward()
    return z.grad


def test_objectives_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(6, 10, generator=g), torch.randn(len(TRAIN), 10, generator=g)
    y, idx = torch.randint(0, 10, (6,), generator=g), torch.tensor([5, 0, 199, 3, 3, 42])
    # LS: the gradient of CE against (1 - A) onehot + A / C
    expected = _grad(
        lambda a, b, _: F.cross_entropy(a, b, label_smoothing=0.2, reduction="sum"), z, y, idx
    )
    torch.testing.assert_close(_grad(LabelSmoothing(0.2), z, y, idx), expected)
    # KD: (1 - a) CE + a T^2 KL(p_t || p_s), summed over rows; teacher rows picked by index
    T, a = 4.0, 0.7
    kd = Distillation(t, T, a)
    p_t = torch.softmax(t[idx] / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(z / T, 1))).sum()
    manual = (1 - a) * F.cross_entropy(z, y, reduction="sum") + a * T * T * kl
    torch.testing.assert_close(kd(z, y, idx), manual)
    with pytest.raises(ValueError, match="same dataset"):
        Distillation(t[:10], T, a).validate(TRAIN)


def test_distillation_noise_is_seeded_and_redrawn_every_epoch():
    t = torch.randn(len(TRAIN), 10)
    a, b = (
        Distillation(t, 2.0, 1.0, noise="uniform:0.1"),
        Distillation(t, 2.0, 1.0, noise="uniform:0.1"),
    )
    a.start_epoch(0, seed=1)
    b.start_epoch(0, seed=1)
    torch.testing.assert_close(a._targets, b._targets, rtol=0, atol=0)
    torch.testing.assert_close(a._targets.sum(1), torch.ones(len(TRAIN)))
    first = a._targets.clone()
    a.start_epoch(1, seed=1)
    assert not torch.equal(first, a._targets)
    with pytest.raises(ValueError, match="uniform:0.1"):
        Distillation(t, 2.0, 1.0, noise="gauss:1")


def test_heavy_normal_noise_never_leaves_an_all_zero_target_row():
    """With normal:S large, some rows have every entry clamped to 0; they keep the clean row
    instead of becoming zeros, which kd_loss would refuse as probabilities mid-run."""
    t = torch.zeros(4000, 10)  # uniform teacher: p = 0.1, so P(row all clamped) ~ 0.5^10
    d = Distillation(t, 1.0, 1.0, noise="normal:5")
    d.start_epoch(0, seed=0)
    sums = d._targets.sum(1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert torch.isfinite(d._targets).all() and (d._targets >= 0).all()


def test_transfer_set_restricts_training(tmp_path):
    model = build_model("mnist", "baseline", seed=0)
    subset = torch.arange(0, 200, 4)  # 50 rows
    out = fit(
        model,
        TRAIN,
        TEST,
        TrainConfig(**CFG),
        CrossEntropy(),
        indices=subset,
        run_dir=tmp_path,
        progress=False,
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["transfer_set"]["size"] == 50 and out["epochs"] == 3
    with pytest.raises(ValueError, match=r"\[0, 200\)"):
        fit(
            model,
            TRAIN,
            TEST,
            TrainConfig(**CFG),
            CrossEntropy(),
            indices=torch.tensor([200]),
            progress=False,
        )


def test_load_run_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(tmp_path)
    model = build_model("mnist", "baseline", seed=0)
    fit(
        model,
        TRAIN,
        TEST,
        TrainConfig(**{**CFG, "epochs": 1}),
        CrossEntropy(),
        run_dir=tmp_path,
        progress=False,
    )
    weights_file = tmp_path / "model.safetensors"
    good = weights_file.read_bytes()
    weights_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(RunDirError, match="model.safetensors.*corrupt"):
        load_run(tmp_path)
    weights_file.unlink()
    with pytest.raises(FileNotFoundError, match="resume"):
        load_run(tmp_path)
    weights_file.write_bytes(good)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "arch": "general"}))
    with pytest.raises(RunDirError, match="different runs"):
        load_run(tmp_path)
    save_file({"head.weight": torch.zeros(3, 3)}, str(weights_file))  # no metadata, wrong tensors
    with pytest.raises(RunDirError, match="does not match the mnist/general architecture"):
        load_run(tmp_path)


def test_progress_bar_checkpoint_contents_and_caller_rng(tmp_path, capsys):
    model = build_model("mnist", "baseline", seed=0)
    state = torch.get_rng_state()
    fit(
        model,
        TRAIN,
        TEST,
        TrainConfig(**{**CFG, "epochs": 1}),
        CrossEntropy(),
        run_dir=tmp_path,
        progress=True,
    )
    fit(
        model,
        TRAIN,
        TEST,
        TrainConfig(**{**CFG, "epochs": 2}),
        CrossEntropy(),
        run_dir=tmp_path,
        resume=True,
        progress=True,
    )
    assert torch.equal(torch.get_rng_state(), state), "fit must not consume the caller's RNG"
    assert "epoch 2/2" in capsys.readouterr().err
    tensors = load_file(tmp_path / "checkpoint.safetensors")
    assert tensors["rng.cpu"].dtype == torch.uint8
    assert {"model.head.weight", "optimizer.0.exp_avg", "optimizer.0.step"} <= set(tensors)
    meta = read_checkpoint_info(tmp_path)
    assert meta["epoch"] == 2 and meta["optimizer"]["param_groups"][0]["lr"] == CFG["lr"]
    assert meta["seed"] == CFG["seed"] and meta["config"]["seed"] == CFG["seed"]
    assert [r["epoch"] for r in meta["metrics"]] == [1, 2]
