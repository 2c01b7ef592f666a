"""rbkd.data.fetch and `rbkd data ...`, against a loopback HTTP server: nothing leaves 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from rbkd.cli import data as data_cli
from typer.testing import CliRunner

import rbkd.data.locate as locate
from rbkd.data import (
    DATASETS,
    DatasetFetchError,
    fetch,
    find_dataset,
    load_dataset,
)


def _load_data_fixtures():
    if "data_fixtures" not in sys.modules:
        path = Path(__file__).with_name("data_fixtures.py")
        spec = importlib.util.spec_from_file_location("data_fixtures", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["data_fixtures"] = module
        spec.loader.exec_module(module)
    return sys.modules["data_fixtures"]


fx = _load_data_fixtures()


@pytest.fixture(autouse=True)
def isolated_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Path]:
    """Empty search roots, and no proxy between urllib and the loopback server."""
    roots = {name: tmp_path / "roots" / name for name in ("xdg", "home", "debian")}
    monkeypatch.delenv("RBKD_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(roots["xdg"]))
    monkeypatch.setenv("HOME", str(roots["home"]))
    monkeypatch.setattr(locate, "DEBIAN_DATASETS_ROOT", roots["debian"])
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    roots["cache"] = roots["xdg"] / "rbkd"
    return roots


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pin_checksums(monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, bytes]) -> None:
    """Make the registry expect exactly `files` (name -> bytes), as the real mirrors would."""
    info = DATASETS[name]
    downloads = tuple(
        dataclasses.replace(
            remote,
            sha256=_sha256(files[remote.filename]),
            md5=hashlib.md5(files[remote.filename]).hexdigest(),
            size=len(files[remote.filename]),
        )
        for remote in info.downloads
    )
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, downloads=downloads))


@pytest.fixture
def mnist_files(tmp_path: Path) -> tuple[dict[str, bytes], dict]:
    source = tmp_path / "source"
    arrays = fx.make_idx_dataset(source, n_train=11, n_test=4, gz=True)
    return {p.name: p.read_bytes() for p in source.iterdir()}, arrays


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------- IDX downloads


def test_fetch_mnist_verifies_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_files
) -> None:
    files, arrays = mnist_files
    _pin_checksums(monkeypatch, "mnist", files)
    dest = tmp_path / "downloads"
    with fx.loopback_server({f"/mirror/{n}": b for n, b in files.items()}) as (url, requests):
        folder = fetch("mnist", dest, base_url=url + "/mirror/", progress=False)
        assert folder == dest
        assert sorted(requests) == sorted(f"/mirror/{n}" for n in files)
        assert sorted(p.name for p in dest.iterdir()) == sorted(files)  # no temporary files
        # A second fetch finds verified files and downloads nothing.
        fetch("mnist", dest, base_url=url + "/mirror", progress=False)
        assert len(requests) == len(files)
    for split in ("train", "test"):
        ds = load_dataset("mnist", split, data_dir=dest)
        images, labels = arrays[split]
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert ds.labels.tolist() == labels.tolist()


def test_fetch_defaults_to_the_cache_folder_the_search_path_reads(
    monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path], mnist_files
) -> None:
    files, _ = mnist_files
    _pin_checksums(monkeypatch, "fashion-mnist", files)
    with fx.loopback_server({f"/{n}": b for n, b in files.items()}) as (url, _):
        folder = fetch("fashion-mnist", base_url=url, progress=True)  # the rich bar, on stderr
    assert folder == isolated_roots["cache"] / "fashion-mnist"
    assert find_dataset("fashion-mnist") == folder
    assert len(load_dataset("fashion-mnist", "test")) == 4


def test_checksum_mismatch_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_files
) -> None:
    files, _ = mnist_files
    _pin_checksums(monkeypatch, "mnist", files)
    tampered = dict(files)
    good = files["train-labels-idx1-ubyte.gz"]
    tampered["train-labels-idx1-ubyte.gz"] = good[:-1] + bytes([good[-1] ^ 0xFF])
    dest = tmp_path / "downloads"
    with (
        fx.loopback_server({f"/{n}": b for n, b in tampered.items()}) as (url, _),
        pytest.raises(DatasetFetchError) as info,
    ):
        fetch("mnist", dest, base_url=url, progress=False)
    message = str(info.value)
    assert "checksum mismatch" in message and "train-labels-idx1-ubyte.gz" in message, message
    assert DATASETS["mnist"].downloads[1].sha256 in message and "\n" not in message
    assert "train-labels-idx1-ubyte.gz" not in _leftovers(dest)
    assert all(not name.endswith(".part") for name in _leftovers(dest)), _leftovers(dest)


def test_a_bad_file_under_the_final_name_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_files
) -> None:
    files, _ = mnist_files
    _pin_checksums(monkeypatch, "mnist", files)
    dest = tmp_path / "downloads"
    dest.mkdir()
    (dest / "t10k-images-idx3-ubyte.gz").write_bytes(b"half a download")
    with fx.loopback_server({f"/{n}": b for n, b in files.items()}) as (url, _):
        fetch("mnist", dest, base_url=url, progress=False)
    assert (dest / "t10k-images-idx3-ubyte.gz").read_bytes() == files["t10k-images-idx3-ubyte.gz"]


def test_http_404_is_one_clear_line(tmp_path: Path) -> None:
    dest = tmp_path / "downloads"
    with (
        fx.loopback_server({}) as (url, requests),
        pytest.raises(DatasetFetchError) as info,
    ):
        fetch("mnist", dest, base_url=url, progress=False)
    message = str(info.value)
    assert requests == ["/train-images-idx3-ubyte.gz"]
    assert "HTTP 404" in message and f"{url}/train-images-idx3-ubyte.gz" in message, message
    assert f"by hand into {dest}" in message and "\n" not in message
    assert not dest.exists(), "a failed fetch leaves nothing behind, not even its folder"


@pytest.mark.parametrize("field", ["md5", "size"])
def test_md5_and_size_are_checked_as_well_as_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_files, field: str
) -> None:
    files, _ = mnist_files
    _pin_checksums(monkeypatch, "mnist", files)
    info = DATASETS["mnist"]
    first = info.downloads[0]
    wrong = {"md5": "0" * 32, "size": first.size - 1}[field]
    downloads = (dataclasses.replace(first, **{field: wrong}), *info.downloads[1:])
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(info, downloads=downloads))
    dest = tmp_path / "downloads"
    with (
        fx.loopback_server({f"/{n}": b for n, b in files.items()}) as (url, _),
        pytest.raises(DatasetFetchError) as raised,
    ):
        fetch("mnist", dest, base_url=url, progress=False)
    assert first.filename in str(raised.value) and "\n" not in str(raised.value)
    assert not dest.exists()


def test_offline_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DatasetFetchError) as info:
        fetch("cifar10", tmp_path / "d", base_url=f"http://127.0.0.1:{port}", progress=False)
    message = str(info.value)
    assert "cifar-10-binary.tar.gz" in message and "offline?" in message, message
    assert "\n" not in message and _leftovers(tmp_path / "d") == []


# ---------------------------------------------------------------- CIFAR-10 archive


def test_fetch_cifar10_unpacks_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = fx.make_cifar_folder(tmp_path / "source" / "cifar-10-batches-bin", per_batch=2)
    archive = fx.cifar_archive_bytes(tmp_path / "source" / "cifar-10-batches-bin")
    _pin_checksums(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
    dest = tmp_path / "downloads"
    with fx.loopback_server({"/cifar-10-binary.tar.gz": archive}) as (url, requests):
        folder = fetch("cifar10", dest, base_url=url, progress=False)
        assert folder == dest / "cifar-10-batches-bin"
        assert fetch("cifar10", dest, base_url=url, progress=False) == folder
        assert len(requests) == 1
    assert sorted(p.name for p in dest.iterdir()) == [
        "cifar-10-batches-bin",
        "cifar-10-binary.tar.gz",
    ]
    ds = load_dataset("cifar10", "train", data_dir=dest)
    assert torch.equal(ds.images, torch.from_numpy(arrays["train"][0]))
    assert ds.labels.tolist() == arrays["train"][1].tolist()


def test_cifar10_files_are_fsynced_before_the_folder_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import rbkd.data.download as download

    fx.make_cifar_folder(tmp_path / "source" / "cifar-10-batches-bin", per_batch=1)
    archive = fx.cifar_archive_bytes(tmp_path / "source" / "cifar-10-batches-bin")
    _pin_checksums(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
    events: list[str] = []
    real_fsync, real_replace = download._fsync, os.replace
    monkeypatch.setattr(
        download, "_fsync", lambda p, f: (events.append(Path(p).name), real_fsync(p, f))
    )
    monkeypatch.setattr(
        download.os,
        "replace",
        lambda a, b: (events.append(f"rename {Path(b).name}"), real_replace(a, b)),
    )
    with fx.loopback_server({"/cifar-10-binary.tar.gz": archive}) as (url, _):
        fetch("cifar10", tmp_path / "d", base_url=url, progress=False)
    rename = events.index("rename cifar-10-batches-bin")
    for name in fx.CIFAR_TRAIN_BATCHES + ("test_batch.bin",):
        assert name in events[:rename], events


def test_fetch_cifar10_into_the_cache_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    fx.make_cifar_folder(tmp_path / "source" / "cifar-10-batches-bin", per_batch=1)
    archive = fx.cifar_archive_bytes(tmp_path / "source" / "cifar-10-batches-bin")
    _pin_checksums(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
    with fx.loopback_server({"/cifar-10-binary.tar.gz": archive}) as (url, _):
        folder = fetch("cifar10", base_url=url, progress=False)
    assert folder == isolated_roots["cache"] / "cifar10" / "cifar-10-batches-bin"
    assert find_dataset("cifar10") == folder
    assert len(load_dataset("cifar10", "test")) == 1


@pytest.mark.parametrize(
    "evil_name, words",
    [
        ("../evil", "points outside"),
        ("cifar-10-batches-bin/../../evil", "points outside"),
        ("/ABSOLUTE/evil", "absolute path"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute"],
)
def test_unsafe_archive_members_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evil_name: str, words: str
) -> None:
    fx.make_cifar_folder(tmp_path / "source" / "cifar-10-batches-bin", per_batch=1)
    dest = tmp_path / "deep" / "downloads"
    evil_name = evil_name.replace("/ABSOLUTE", str(tmp_path / "abs"))
    archive = fx.cifar_archive_bytes(
        tmp_path / "source" / "cifar-10-batches-bin", evil={evil_name: b"pwned"}
    )
    _pin_checksums(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
    with (
        fx.loopback_server({"/cifar-10-binary.tar.gz": archive}) as (url, _),
        pytest.raises(DatasetFetchError) as info,
    ):
        fetch("cifar10", dest, base_url=url, progress=False)
    message = str(info.value)
    assert words in message and repr(evil_name) in message and "\n" not in message, message
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("evil"))
    assert written == [], f"the archive wrote {written}"
    # Nothing was unpacked, and the failed fetch removed what it had downloaded and created.
    assert not dest.exists() and not dest.parent.exists()


def test_archive_links_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    archive = buffer.getvalue()
    _pin_checksums(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
    with (
        fx.loopback_server({"/cifar-10-binary.tar.gz": archive}) as (url, _),
        pytest.raises(DatasetFetchError, match="is a link or device"),
    ):
        fetch("cifar10", tmp_path / "d", base_url=url, progress=False)
    assert not (tmp_path / "d" / "cifar-10-batches-bin").exists()


# ---------------------------------------------------------------- CLI


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps tables and help at the terminal width


def _cli() -> typer.Typer:
    """A throwaway root app, mounted the way cli/app.py mounts the real one."""
    root = typer.Typer()

    @root.callback()
    def main() -> None:
        """rbkd (test harness)."""

    root.add_typer(data_cli.app, name="data")
    return root


def test_cli_help_ends_with_examples() -> None:
    runner = CliRunner()
    result = runner.invoke(_cli(), ["data", "--help"])
    assert result.exit_code == 0 and "fetch" in result.output and "list" in result.output
    for command in ("fetch", "list"):
        result = runner.invoke(_cli(), ["data", command, "-h"])
        assert result.exit_code == 0, result.output
        assert "Example: rbkd data " in result.output


def test_cli_list_shows_found_and_missing(tmp_path: Path) -> None:
    fx.make_idx_dataset(tmp_path / "mnist")
    result = CliRunner().invoke(_cli(), ["data", "list", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if "│" in line[:3]}
    assert "not found" in lines["fashion-mnist"] and "not found" in lines["cifar10"]
    assert "not found" not in lines["mnist"] and "MB" in lines["mnist"]
    assert "60,000 / 10,000" in lines["fashion-mnist"]


def test_cli_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_files) -> None:
    files, _ = mnist_files
    _pin_checksums(monkeypatch, "mnist", files)
    dest = tmp_path / "out"
    runner = CliRunner()
    with fx.loopback_server({f"/{n}": b for n, b in files.items()}) as (url, _):
        args = ["data", "fetch", "mnist", "--dest", str(dest), "--base-url", url, "--no-progress"]
        result = runner.invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    assert "MNIST is in" in result.output and len(load_dataset("mnist", data_dir=dest)) == 11


def test_cli_fetch_errors_are_domain_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    with fx.loopback_server({}) as (url, _):
        args = ["data", "fetch", "mnist", "--dest", str(tmp_path), "--base-url", url]
        result = runner.invoke(_cli(), [*args, "--no-progress"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ")
    assert "HTTP 404" in lines[0] and "Traceback" not in result.output
    result = runner.invoke(_cli(), ["data", "fetch", "imagenet", "--dest", str(tmp_path)])
    # an unknown name is a usage error (exit code 2) listing the datasets
    assert result.exit_code == 2 and "'imagenet' is not one of 'fashion-mnist'" in result.output


def test_registry_is_left_alone_by_the_pins() -> None:
    # monkeypatch.setitem restored the real entries: the published checksums are in place.
    assert DATASETS["mnist"].downloads[0].sha256.startswith("440fcabf")
    assert np.all([len(r.sha256) == 64 for info in DATASETS.values() for r in info.downloads])
