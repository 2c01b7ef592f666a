"""rbkd.data: IDX and CIFAR-10 binary readers (no pickle), the search path, normalisation,
atomic writes, and one check on the real Fashion-MNIST from Debian's package."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rbkd.data.locate as locate
from rbkd.data import (
    DATASETS,
    DEFAULT_DATASET,
    DataError,
    DatasetNotFoundError,
    ImageDataset,
    UnknownDatasetError,
    find_dataset,
    load_dataset,
)
from rbkd.data.cifar import read_cifar_binary, write_cifar_binary
from rbkd.data.idx import read_idx, write_idx
from rbkd.io import atomic_path, atomic_write_bytes


def _load_data_fixtures():
    if "data_fixtures" not in sys.modules:
        path = Path(__file__).with_name("data_fixtures.py")
        spec = importlib.util.spec_from_file_location("data_fixtures", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["data_fixtures"] = module
        spec.loader.exec_module(module)
    return sys.modules["data_fixtures"]


fx = _load_data_fixtures()

REAL_DEBIAN_ROOT = Path("/usr/share/datasets")


@pytest.fixture(autouse=True)
def isolated_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Path]:
    """Point every search root at an empty temporary folder: no test sees the machine's data."""
    roots = {name: tmp_path / "roots" / name for name in ("env", "xdg", "home", "debian")}
    monkeypatch.delenv("RBKD_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(roots["xdg"]))
    monkeypatch.setenv("HOME", str(roots["home"]))
    monkeypatch.setattr(locate, "DEBIAN_DATASETS_ROOT", roots["debian"])
    roots["cache"] = roots["xdg"] / "rbkd"
    return roots


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_dataset_round_trip(tmp_path: Path, name: str, gz: bool) -> None:
    arrays = fx.make_idx_dataset(tmp_path / name, n_train=13, n_test=5, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset(name, split, data_dir=tmp_path)
        images, labels = arrays[split]
        assert isinstance(ds, ImageDataset)
        assert (ds.name, ds.split, ds.num_classes, len(ds)) == (name, split, 10, len(labels))
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 1, 28, 28)
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(labels),)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
        assert ds.class_names == DATASETS[name].class_names and len(ds.class_names) == 10
        assert ds.root == tmp_path / name
        image, label = ds[3]
        assert image.shape == (1, 28, 28) and int(label) == 3


@pytest.mark.parametrize("suffix", [".gz", ""], ids=["gz", "raw"])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 28, 28), (2, 5, 4, 3)])
def test_write_idx_read_idx_round_trip(tmp_path: Path, shape: tuple[int, ...], suffix: str) -> None:
    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / f"a-idx{len(shape)}-ubyte{suffix}"
    write_idx(path, array)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if suffix else b"\x00\x00")
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape and np.array_equal(back, array)
    assert back.flags.writeable


def _corrupt(case: str, folder: Path) -> tuple[Path, str]:
    """Break one file of a tiny dataset in `folder`; return the broken file and a message bit."""
    images_gz, labels_gz = folder / fx.IDX_FILES["train"][0], folder / fx.IDX_FILES["train"][1]
    good_images = np.zeros((4, 28, 28), np.uint8)
    if case == "labels-magic":
        labels_gz.write_bytes(fx.idx_bytes(np.zeros((4, 28, 28), np.uint8)))  # an images file
        return labels_gz, "magic number 2051, expected 2049"
    if case == "not-idx":
        images_gz.write_bytes(fx.idx_bytes(good_images, magic=0x12345678))
        return images_gz, "not an IDX file"
    if case == "truncated-gzip":
        images_gz.write_bytes(images_gz.read_bytes()[:-30])
        return images_gz, "truncated gzip"
    if case == "corrupt-gzip":
        data = bytearray(images_gz.read_bytes())
        data[-8:-4] = bytes(b ^ 0xFF for b in data[-8:-4])  # break the CRC
        images_gz.write_bytes(bytes(data))
        return images_gz, "corrupt gzip"
    if case == "short-payload":
        images_gz.write_bytes(fx.idx_bytes(good_images, gz=False)[:-100])
        return images_gz, "truncated"
    if case == "long-payload":
        raw = fx.idx_bytes(good_images, gz=False) + b"\x00" * 5
        images_gz.write_bytes(raw)
        return images_gz, "too long"
    if case == "short-header":
        images_gz.write_bytes(b"\x00\x00\x08\x03\x00\x00")
        return images_gz, "IDX header"
    if case == "tiny-file":
        labels_gz.write_bytes(b"\x00\x00")
        return labels_gz, "not an IDX file"
    if case == "count-mismatch":
        labels_gz.write_bytes(fx.idx_bytes(np.zeros(3, np.uint8)))
        return labels_gz, "3 labels"
    if case == "label-range":
        labels_gz.write_bytes(fx.idx_bytes(np.array([0, 1, 10, 2], np.uint8)))
        images_gz.write_bytes(fx.idx_bytes(good_images))
        return labels_gz, "label 10"
    if case == "image-size":
        images_gz.write_bytes(fx.idx_bytes(np.zeros((4, 27, 28), np.uint8)))
        return images_gz, "27x28"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "labels-magic",
        "not-idx",
        "truncated-gzip",
        "corrupt-gzip",
        "short-payload",
        "long-payload",
        "short-header",
        "tiny-file",
        "count-mismatch",
        "label-range",
        "image-size",
    ],
)
def test_corrupt_idx_files_raise_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "mnist"
    fx.make_idx_dataset(folder, n_train=4, n_test=2, gz=True)
    broken, words = _corrupt(case, folder)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train", data_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(broken) in message, message
    assert words in message, message
    assert "\n" not in message


# ---------------------------------------------------------------- CIFAR


def test_cifar_round_trip(tmp_path: Path) -> None:
    arrays = fx.make_cifar_folder(tmp_path / "cifar-10-batches-bin", per_batch=3)
    for split, n in (("train", 15), ("test", 3)):
        ds = load_dataset("cifar10", split, data_dir=tmp_path)
        images, labels = arrays[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (n, 3, 32, 32)
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
        assert torch.equal(ds.images, torch.from_numpy(images))
        assert ds.class_names[0] == "airplane" and ds.num_classes == 10
        assert ds.images.is_contiguous()


def test_cifar_record_layout_is_label_then_rgb_planes(tmp_path: Path) -> None:
    """One hand-made record: label 7, then 1024 red, 1024 green, 1024 blue bytes."""
    record = bytes([7]) + bytes([1]) * 1024 + bytes([2]) * 1024 + bytes([3]) * 1024
    path = tmp_path / "one.bin"
    path.write_bytes(record * 2)
    images, labels = read_cifar_binary(path)
    assert labels.tolist() == [7, 7] and labels.dtype == np.int64
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert [int(images[0, c].min()) for c in range(3)] == [1, 2, 3]
    assert [int(images[0, c].max()) for c in range(3)] == [1, 2, 3]
    images[0, 0, 0, 0] = 9  # a copy that owns writable memory
    write_cifar_binary(tmp_path / "again.bin", *read_cifar_binary(path))
    assert (tmp_path / "again.bin").read_bytes() == record * 2


def test_no_pickle_is_read_for_cifar(tmp_path: Path) -> None:
    """The issue's 410-byte pickle of shared list references expanded to 3.5 GB. rbkd reads no
    pickle at all now: a folder of python batches is simply not CIFAR-10's binary version."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    bomb = [[]]
    for _ in range(40):
        bomb = [bomb] * 10
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": bomb, b"labels": [0]}, protocol=2))
        (folder / f"{name}.bin").write_bytes(pickle.dumps({b"labels": bomb}, protocol=2))
    with pytest.raises(DataError, match="not a whole number of 3073-byte CIFAR-10 records"):
        load_dataset("cifar10", "train", data_dir=folder)
    source = Path(importlib.util.find_spec("rbkd.data.cifar").origin).read_text()
    assert "import pickle" not in source and "Unpickler" not in source


@pytest.mark.parametrize(
    "case, words",
    [
        ("truncated", "not a whole number of 3073-byte"),
        ("empty", "is 0 bytes"),
        ("range", "labels must lie in [0, 10), found 10"),
        ("fifo", "is a FIFO"),
        ("dev-zero", "is a character device"),
        ("folder", "is a folder"),
    ],
)
def test_corrupt_cifar_batches_raise_data_error_naming_the_file(
    tmp_path: Path, case: str, words: str
) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    fx.make_cifar_folder(folder, per_batch=2)
    path = folder / "data_batch_3.bin"
    good = fx.cifar_records_bytes(np.zeros((2, 3, 32, 32), np.uint8), [1, 2])
    path.unlink()
    if case == "fifo":
        os.mkfifo(path)
    elif case == "dev-zero":
        path.symlink_to("/dev/zero")
    elif case == "folder":
        path.mkdir()
    else:
        path.write_bytes(
            {
                "truncated": good[:-1],
                "empty": b"",
                "range": fx.cifar_records_bytes(np.zeros((2, 3, 32, 32), np.uint8), [1, 10]),
            }[case]
        )
    with pytest.raises((DataError, DatasetNotFoundError)) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    if case == "folder":  # a folder is not a file: the dataset is incomplete
        assert "lacks data_batch_3.bin" in message, message
    else:
        assert str(path) in message and words in message, message


def test_too_many_cifar_records_are_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with open(path, "wb") as handle:  # sparse: no disk space used
        handle.truncate(3073 * 60_001)
    with pytest.raises(DataError, match="60,001 records"):
        read_cifar_binary(path)


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("name, channels", [("fashion-mnist", 1), ("mnist", 1), ("cifar10", 3)])
def test_normalize_per_channel_and_per_batch(name: str, channels: int) -> None:
    info = DATASETS[name]
    n = 5
    h, w = info.image_shape[1:]
    images = torch.randint(0, 256, (n, channels, h, w), dtype=torch.uint8)
    ds = ImageDataset(
        name, "train", images, torch.zeros(n, dtype=torch.int64), 10, info.class_names,
        mean=info.mean, std=info.std,
    )  # fmt: skip
    batch = ds.images[1:4]
    out = ds.normalize(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape and out.device == batch.device
    mean = torch.tensor(info.mean, dtype=torch.float64).view(channels, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float64).view(channels, 1, 1)
    expected = (batch.double() / 255 - mean) / std
    err = (out.double() - expected).abs()
    assert err.max() < 1e-5, (
        f"max error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    )
    assert torch.equal(ds.normalize(batch[0]), out[0])  # one [C, H, W] image
    assert ds.images.dtype == torch.uint8  # the dataset itself is never converted


def test_normalize_rejects_wrong_input() -> None:
    ds = ImageDataset(
        "mnist", "test", torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
        torch.zeros(2, dtype=torch.int64), 10, DATASETS["mnist"].class_names,
        mean=(0.1307,), std=(0.3081,),
    )  # fmt: skip
    with pytest.raises(TypeError, match="uint8"):
        ds.normalize(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="channels|\\[N, 1, H, W\\]"):
        ds.normalize(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_normalize_on_gpu() -> None:
    ds = ImageDataset(
        "cifar10", "test", torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        torch.zeros(4, dtype=torch.int64), 10, DATASETS["cifar10"].class_names,
        mean=DATASETS["cifar10"].mean, std=DATASETS["cifar10"].std,
    )  # fmt: skip
    out = ds.normalize(ds.images.cuda())
    assert out.is_cuda and torch.allclose(out.cpu(), ds.normalize(ds.images), atol=1e-6)


# ---------------------------------------------------------------- search order


def test_search_order_data_dir_env_cache_debian(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    explicit = tmp_path / "explicit"
    fx.make_idx_dataset(explicit / "fashion-mnist", n_train=1)
    fx.make_idx_dataset(isolated_roots["env"], n_train=2)  # files in the root itself
    fx.make_idx_dataset(isolated_roots["cache"] / "fashion-mnist", n_train=3)
    fx.make_idx_dataset(isolated_roots["debian"] / "fashion-mnist", n_train=4)
    monkeypatch.setenv("RBKD_DATA", str(isolated_roots["env"]))

    assert find_dataset("fashion-mnist", explicit) == explicit / "fashion-mnist"
    assert len(load_dataset("fashion-mnist", data_dir=explicit)) == 1
    assert find_dataset("fashion-mnist") == isolated_roots["env"]
    assert len(load_dataset("fashion-mnist")) == 2
    monkeypatch.delenv("RBKD_DATA")
    assert find_dataset("fashion-mnist") == isolated_roots["cache"] / "fashion-mnist"
    assert len(load_dataset("fashion-mnist")) == 3
    (isolated_roots["cache"] / "fashion-mnist" / fx.IDX_FILES["test"][1]).unlink()
    assert find_dataset("fashion-mnist") == isolated_roots["debian"] / "fashion-mnist"
    assert len(load_dataset("fashion-mnist")) == 4
    # A data_dir that lacks the dataset is an error naming what was looked for (issue 9 #16:
    # it used to fall through to the rest of the search path and train on other data).
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        find_dataset("fashion-mnist", tmp_path / "empty")
    message = str(info.value)
    assert message.startswith(f"Fashion-MNIST not found in --data-dir {tmp_path / 'empty'}: ")
    assert "train-images-idx3-ubyte.gz" in message and "fashion-mnist/" in message
    assert str(isolated_roots["debian"]) not in message and "\n" not in message
    with pytest.raises(DatasetNotFoundError, match="typo \\(no such folder\\)"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "typo")


def test_cache_dir_defaults_to_home_without_xdg(
    monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME")
    folder = isolated_roots["home"] / ".cache" / "rbkd" / "mnist"
    fx.make_idx_dataset(folder)
    assert find_dataset("mnist") == folder
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert find_dataset("mnist") == folder


def test_rbkd_data_may_list_several_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx.make_idx_dataset(tmp_path / "b" / "mnist")
    monkeypatch.setenv("RBKD_DATA", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert find_dataset("mnist") == tmp_path / "b" / "mnist"


@pytest.mark.parametrize(
    "layout", ["cifar10/cifar-10-batches-bin", "cifar-10-batches-bin", "cifar10", ""]
)
def test_cifar_folder_layouts(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / layout if layout else tmp_path
    fx.make_cifar_folder(folder, per_batch=1)
    assert find_dataset("cifar10", tmp_path) == folder


def test_not_found_is_one_clear_line(
    tmp_path: Path, isolated_roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBKD_DATA", str(isolated_roots["env"]))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message
    assert message.startswith("Fashion-MNIST not found (looked in: ")
    for root in (isolated_roots["env"], isolated_roots["cache"]):
        assert str(root) in message
    assert str(isolated_roots["debian"]) in message
    assert message.index(str(isolated_roots["env"])) < message.index(str(isolated_roots["cache"]))
    assert message.index(str(isolated_roots["cache"])) < message.index(
        str(isolated_roots["debian"])
    )
    assert (
        "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)" in message
    )
    assert message.endswith("or run `rbkd data fetch fashion-mnist`")

    with pytest.raises(DatasetNotFoundError, match="rbkd data fetch cifar10"):
        find_dataset("cifar10")


def test_partial_copy_is_reported(tmp_path: Path) -> None:
    fx.make_idx_dataset(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks t10k-images-idx3-ubyte.gz"):
        find_dataset("mnist", tmp_path)


def test_unknown_names_and_splits(tmp_path: Path) -> None:
    with pytest.raises(UnknownDatasetError, match="choose one of fashion-mnist, mnist, cifar10"):
        load_dataset("imagenet")
    fx.make_idx_dataset(tmp_path / "fashion-mnist")
    assert load_dataset("Fashion_MNIST", data_dir=tmp_path).name == "fashion-mnist"
    with pytest.raises(ValueError, match="split must be one of train, test"):
        load_dataset("fashion-mnist", "val", data_dir=tmp_path)


# ---------------------------------------------------------------- registry


def test_registry_contract() -> None:
    assert DEFAULT_DATASET == "fashion-mnist" and list(DATASETS) == [
        "fashion-mnist",
        "mnist",
        "cifar10",
    ]
    for name, info in DATASETS.items():
        channels = info.image_shape[0]
        assert info.name == name and info.num_classes == len(info.class_names) == 10
        assert len(info.mean) == len(info.std) == channels
        assert all(0 < s < 1 for s in info.std) and all(0 < m < 1 for m in info.mean)
        for remote in info.downloads:
            # lowercase hex of the right length: what hashlib's hexdigest() is compared with
            assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256), (remote.filename, remote.sha256)
            assert re.fullmatch(r"[0-9a-f]{32}", remote.md5), (remote.filename, remote.md5)
            assert remote.size > 0
        digests = [r.sha256 for r in info.downloads]
        assert len(set(digests)) == len(digests), f"{name}: two files share a SHA-256"
        assert info.mirrors and all(m.startswith(("https://", "http://")) for m in info.mirrors)
    assert DATASETS["mnist"].mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert "fashion-mnist" in DATASETS["fashion-mnist"].mirrors[0]
    assert DATASETS["cifar10"].mirrors[0] == "https://www.cs.toronto.edu/~kriz/"
    cifar = DATASETS["cifar10"].downloads[0]
    assert cifar.filename == "cifar-10-binary.tar.gz" and cifar.size == 170_052_171
    assert cifar.md5 == "c32a1d4ab5d03f1284b67883e8d87530"


# ---------------------------------------------------------------- rbkd.io


def test_atomic_write_bytes(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_atomic_path_failure_keeps_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the block succeeds
    assert target.read_bytes() == b"new"


# ---------------------------------------------------------------- the real thing


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_DEBIAN_ROOT / "fashion-mnist").is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)",
)
def test_real_fashion_mnist_from_debian(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locate, "DEBIAN_DATASETS_ROOT", REAL_DEBIAN_ROOT)
    assert find_dataset("fashion-mnist") == REAL_DEBIAN_ROOT / "fashion-mnist"
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.images.shape == (60_000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.num_classes == 10 and train.class_names[9] == "Ankle boot"
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    # The registry's normalisation constants are this split's statistics (from a histogram:
    # no float copy of the 47 MB of pixels).
    counts = torch.bincount(train.images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    assert abs(mean.item() - train.mean[0]) < 1e-3 and abs(std.item() - train.std[0]) < 1e-3
