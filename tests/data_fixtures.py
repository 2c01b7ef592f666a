"""Tiny dataset files for the rbkd.data tests: IDX (gz and raw), CIFAR-10 binary batches,
tar.gz archives, and a loopback HTTP server. Nothing here touches the network.

Test files load this module by path (see `load_data_fixtures` in each), so it works whether or
not tests/ is on sys.path.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))


def idx_bytes(array: np.ndarray, magic: int | None = None, gz: bool = True) -> bytes:
    """An IDX file's bytes, written independently of rbkd.data.idx.write_idx (a second oracle)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    return gzip.compress(data, mtime=0) if gz else data


def make_idx_dataset(
    folder: Path, n_train: int = 12, n_test: int = 7, gz: bool = True, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four MNIST-style files (28x28, labels cycling 0..9) and return the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        images_name, labels_name = IDX_FILES[split]
        if not gz:
            images_name, labels_name = images_name[:-3], labels_name[:-3]
        (folder / images_name).write_bytes(idx_bytes(images, gz=gz))
        (folder / labels_name).write_bytes(idx_bytes(labels, gz=gz))
        arrays[split] = (images, labels)
    return arrays


def cifar_records_bytes(images: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 binary batch as the official files hold it, written independently of
    rbkd.data.cifar: per record 1 label byte, then 3072 pixel bytes (R, G, B planes)."""
    n = images.shape[0]
    pixels = np.ascontiguousarray(images, dtype=np.uint8).reshape(n, 3 * 32 * 32)
    return b"".join(bytes([labels[i]]) + pixels[i].tobytes() for i in range(n))


def make_cifar_folder(
    folder: Path, per_batch: int = 3, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write data_batch_1..5.bin and test_batch.bin (per_batch images each); return the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    start = 0
    for split, names in (("train", CIFAR_TRAIN_BATCHES), ("test", ("test_batch.bin",))):
        for name in names:
            images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
            labels = [(start + i) % 10 for i in range(per_batch)]
            start += per_batch
            (folder / name).write_bytes(cifar_records_bytes(images, labels))
            out[split].append((images, np.asarray(labels, dtype=np.int64)))
    return {
        split: (np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))
        for split, parts in out.items()
    }


def tar_gz_bytes(members: dict[str, bytes], evil: dict[str, bytes] | None = None) -> bytes:
    """A tar.gz holding `members` (name -> content); `evil` members are added verbatim, names
    such as "../evil" or "/tmp/evil" included (tarfile's writer does not stop them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in {**members, **(evil or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def cifar_archive_bytes(folder: Path, evil: dict[str, bytes] | None = None) -> bytes:
    """cifar-10-binary.tar.gz's layout: every file of `folder` under cifar-10-batches-bin/."""
    members = {f"cifar-10-batches-bin/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}
    return tar_gz_bytes(members, evil)


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@contextlib.contextmanager
def loopback_server(files: dict[str, bytes]) -> Iterator[tuple[str, list[str]]]:
    """Serve `files` (URL path -> bytes) on 127.0.0.1 at a free port, in a daemon thread.

    Yields (base URL, list of requested paths). Every socket has a timeout, and shutdown is
    bounded, so a hung client cannot hang the test session.
    """
    handler = type("Handler", (_Handler,), {"files": dict(files), "requests": [], "timeout": 10})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
