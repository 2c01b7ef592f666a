"""Training throughput of rbkd.engine.fit against a plain PyTorch loop doing the same work.

Same model (same initial weights), data, batch size, optimizer (Adam, lr 1e-3), epochs and
per-epoch evaluation on the same held-out images; the plain loop is what one writes by hand: a
DataLoader over a TensorDataset of float images, F.cross_entropy or F.kl_div. One round is one
whole training run; samples/s = training samples x epochs / median seconds of a round.
Fashion-MNIST when it is installed (rbkd.data.load_dataset), synthetic 28 x 28 images otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

QUICK = os.environ.get("RBKD_BENCH_QUICK", "0").strip().lower() not in ("", "0", "false", "no")
DATASET = "fashion-mnist"
BATCH = 64  # the thesis's batch size (TrainConfig's default)
LR = 1e-3
T, ALPHA = 4.0, 0.9
N_TEST = 256  # evaluated after every epoch, on both sides (1000 cost the small teacher ~40%)

# (arch, objective, training samples, epochs, rounds). The small teacher runs ~60-200 samples/s
# on 2 cores, hence its short transfer set; the baseline student goes through all 60,000 images.
WORKLOADS = [
    ("baseline", "distillation", 60000, 1, 3),
    ("general", "distillation", 6000, 1, 2),
    ("small", "cross_entropy", 768, 1, 2),
]
if QUICK:
    WORKLOADS = [(arch, obj, max(64, n // 32), 1, 1) for arch, obj, n, _, _ in WORKLOADS]


def _modules():
    try:
        import rbkd.data
        import rbkd.engine
        import rbkd.models
    except ImportError as err:  # the engine, data and models land separately
        pytest.skip(f"rbkd training stack not importable yet: {err}")
    return rbkd.data, rbkd.engine, rbkd.models


@pytest.fixture(scope="module")
def datasets():
    """(train, small test split, source name). Fashion-MNIST if found, else synthetic images."""
    data, _, _ = _modules()
    try:
        train, test = data.load_dataset(DATASET, "train"), data.load_dataset(DATASET, "test")
        source = DATASET
    except data.DataError:
        gen = torch.Generator().manual_seed(0)

        def synthetic(split: str, n: int):
            return data.ImageDataset(
                name="synthetic",
                split=split,
                images=torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen),
                labels=torch.randint(0, 10, (n,), generator=gen),
                num_classes=10,
                class_names=tuple(str(k) for k in range(10)),
                mean=(0.5,),
                std=(0.25,),
            )

        train, test, source = synthetic("train", 60000), synthetic("test", N_TEST), "synthetic"
    test = dataclasses.replace(test, images=test.images[:N_TEST], labels=test.labels[:N_TEST])
    return train, test, source


def plain_loop(model, loader, test_x, test_y, epochs: int, distill: bool) -> float:
    """The hand-written baseline: DataLoader batches, F.kl_div / F.cross_entropy, Adam.
    Returns the seconds spent in training steps (evaluation excluded), as fit reports them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    train_s = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for batch in loader:
            x, y = batch[0], batch[1]
            z = model(x)
            if distill:
                log_ps = F.log_softmax(z / T, dim=-1)
                pt = F.softmax(batch[2] / T, dim=-1)
                kl = F.kl_div(log_ps, pt, reduction="batchmean") * (T * T)
                loss = ALPHA * kl + (1 - ALPHA) * F.cross_entropy(z, y)
            else:
                loss = F.cross_entropy(z, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_s += time.perf_counter() - start
        model.eval()
        with torch.no_grad():  # the engine scores the test set after every epoch: so does this
            logits = torch.cat([model(x) for x in test_x.split(1024)])
            F.cross_entropy(logits, test_y, reduction="sum").item()
            (logits.argmax(1) == test_y).sum().item()
    return train_s


def warm_up(model, x: torch.Tensor) -> None:
    """A few untimed steps so that one-time costs (thread pools, oneDNN primitives) stay out."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(2):
        F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.int64)).backward()
        optimizer.zero_grad(set_to_none=True)


def cases() -> list:
    params = []
    for arch, objective, n, epochs, rounds in WORKLOADS:
        for framework in ("plain", "rbkd.engine"):
            case_id = f"{arch}-{objective}-{n}x{epochs}-{framework}"
            params.append(pytest.param(arch, objective, n, epochs, rounds, framework, id=case_id))
    return params


@pytest.mark.parametrize("arch,objective,n,epochs,rounds,framework", cases())
def test_training_throughput(benchmark, datasets, arch, objective, n, epochs, rounds, framework):
    data, engine, models = _modules()
    train, test, source = datasets
    n = min(n, len(train))
    distill = objective == "distillation"
    # The teacher's logits only feed the loss: their values do not change the work done.
    teacher = 3 * torch.randn(
        len(train), train.num_classes, generator=torch.Generator().manual_seed(1)
    )
    warm_up(models.build_model(DATASET, arch, seed=0), train.normalize(train.images[:BATCH]))
    steps_only: list[float] = []  # samples/s of the training steps alone, per round

    if framework == "rbkd.engine":
        cfg = engine.TrainConfig(
            epochs=epochs, batch_size=BATCH, lr=LR, optimizer="adam", seed=0, device="cpu"
        )
        indices = torch.arange(n)

        def setup():
            model = models.build_model(DATASET, arch, seed=0)
            if distill:
                obj = engine.Distillation(teacher, T=T, alpha=ALPHA)
            else:
                obj = engine.CrossEntropy()
            return (model, obj), {}

        def run(model, obj):
            metrics = engine.fit(model, train, test, cfg, obj, indices=indices, progress=False)
            steps_only.append(metrics["samples_per_s"])

    else:
        images = train.normalize(train.images[:n])  # float images, as a plain loop keeps them
        tensors = (images, train.labels[:n]) + ((teacher[:n],) if distill else ())
        test_x, test_y = test.normalize(test.images), test.labels

        def setup():
            model = models.build_model(DATASET, arch, seed=0)
            loader = DataLoader(
                TensorDataset(*tensors),
                batch_size=BATCH,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
            )
            return (model, loader), {}

        def run(model, loader):
            seconds = plain_loop(model, loader, test_x, test_y, epochs, distill)
            steps_only.append(n * epochs / seconds)

    benchmark.group = f"training {arch} {objective}"
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        kind="training",
        framework=framework,
        dataset=source,
        arch=arch,
        objective=objective,
        n_train=n,
        epochs=epochs,
        batch_size=BATCH,
        samples=n * epochs,
        n_test=len(test),
        threads=torch.get_num_threads(),
        quick=QUICK,
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["samples_per_s"] = n * epochs / stats.stats.median
    if steps_only:  # training steps alone (fit's own samples_per_s; timed the same way here)
        benchmark.extra_info["steps_samples_per_s"] = statistics.median(steps_only)
