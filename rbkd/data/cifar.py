"""CIFAR-10 from its official binary archive (cifar-10-binary.tar.gz): no pickle at all.

Each of data_batch_1.bin .. data_batch_5.bin and test_batch.bin is a plain sequence of records,
1 label byte followed by 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each plane row-major:
that is C, H, W), 10,000 records per file (https://www.cs.toronto.edu/~kriz/cifar.html).

The python version of the archive stores the same bytes as pickles. rbkd used to read those with
a restricted unpickler; it ran no code, but a 410-byte pickle of shared list references could
still expand to gigabytes. A fixed-size record format has nothing to exploit: the file size is
checked against the record size and a bound before anything is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rbkd.data.errors import DataError
from rbkd.io import NotRegularFileError, check_regular_file, write_bytes

__all__ = [
    "CIFAR_IMAGE_BYTES",
    "CIFAR_RECORD_BYTES",
    "MAX_CIFAR_RECORDS",
    "read_cifar_binary",
    "write_cifar_binary",
]

CIFAR_IMAGE_BYTES = 3 * 32 * 32
CIFAR_RECORD_BYTES = 1 + CIFAR_IMAGE_BYTES
# Official files hold 10,000 records (30,730,000 bytes); allow a whole split in one file, no more.
MAX_CIFAR_RECORDS = 60_000


def read_cifar_binary(
    path: str | os.PathLike[str], num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: images uint8 [N, 3, 32, 32] and labels int64 [N].

    Every problem is a `DataError` whose one line names the file and what to do."""
    path = Path(path)
    fetch = "delete it and run `rbkd data fetch cifar10`"
    try:
        check_regular_file(path, "CIFAR-10 batch")
        size = path.stat().st_size
    except NotRegularFileError as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size == 0 or size % CIFAR_RECORD_BYTES:
        raise DataError(
            f"{path} is {size} bytes, not a whole number of {CIFAR_RECORD_BYTES}-byte CIFAR-10 "
            f"records (truncated, or not the binary version); {fetch}"
        )
    count = size // CIFAR_RECORD_BYTES
    if count > MAX_CIFAR_RECORDS:
        raise DataError(
            f"{path} holds {count:,} records, more than the {MAX_CIFAR_RECORDS:,} of all of "
            f"CIFAR-10; {fetch}"
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(size + 1)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) != size:  # the file changed under us
        raise DataError(f"{path} changed size while it was read; {fetch}")
    records = np.frombuffer(data, dtype=np.uint8).reshape(count, CIFAR_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if int(labels.max()) >= num_classes:
        raise DataError(
            f"{path}: labels must lie in [0, {num_classes}), found {int(labels.max())} (not "
            f"CIFAR-10, e.g. CIFAR-100's layout?); {fetch}"
        )
    # The copy owns writable memory (a view of the bytes object would be read-only).
    images = records[:, 1:].reshape(count, 3, 32, 32).copy()
    return images, labels


def write_cifar_binary(path: str | os.PathLike[str], images: np.ndarray, labels) -> None:
    """Write records in the official layout (for tests and converted copies), atomically."""
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1, CIFAR_IMAGE_BYTES)
    labels = np.asarray(labels, dtype=np.uint8).reshape(-1, 1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    write_bytes(path, np.concatenate([labels, images], axis=1).tobytes())
