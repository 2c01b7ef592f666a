"""CIFAR-10 python batches, read without letting the pickle run any code.

Each batch is a protocol-2 pickle (written by Python 2's cPickle) of a dict
{b"batch_label": bytes, b"labels": [int], b"data": uint8 ndarray (N, 3072), b"filenames": [bytes]}.
A plain `pickle.load` would call whatever global the file names (os.system included), so
`_RestrictedUnpickler.find_class` hands out no real global at all. The handful of names a numpy
array's pickle needs (`_reconstruct`, `ndarray`, `dtype`, `_codecs.encode`) map to small local
stand-ins that only record their arguments; after loading, the records are checked and turned
into numpy arrays with `np.frombuffer`. Every other global is refused with `UnsafePickleError`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from rbkd.data.errors import DataError, UnsafePickleError

__all__ = ["CIFAR_IMAGE_BYTES", "read_cifar_batch", "safe_load_pickle"]

CIFAR_IMAGE_BYTES = 3 * 32 * 32
# Only plain numeric dtypes: an object dtype would make numpy unpickle arbitrary Python objects.
_ALLOWED_DTYPES = frozenset(
    f"{kind}{size}"
    for kind, sizes in (("u", "1248"), ("i", "1248"), ("f", "248"))
    for size in sizes
) | {"b1"}


def _text(value: object, what: str) -> str:
    if isinstance(value, bytes):  # Python 2 str, loaded with encoding="bytes"
        return value.decode("latin1")
    if isinstance(value, str):
        return value
    raise UnsafePickleError(f"{what} must be a string, got {type(value).__name__}")


class _Refuses:
    """Base for the stand-ins: BUILD (`__setstate__`) on them is refused unless overridden, so a
    pickle cannot set attributes on anything this module hands out."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError(f"refused to set state on {type(self).__name__}")


class _NdarrayMarker(_Refuses):
    """Stands for `numpy.ndarray` as the first argument of `_reconstruct`; not callable."""

    __slots__ = ()


class _DTypeRecord(_Refuses):
    __slots__ = ("code", "byteorder")

    def __init__(self, code: str) -> None:
        self.code = code
        self.byteorder = "|"

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 2:
            raise UnsafePickleError("dtype state must be a tuple (version, byteorder, ...)")
        byteorder = _text(state[1], "dtype byte order")
        if byteorder not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"unknown dtype byte order {byteorder!r}")
        self.byteorder = byteorder

    def to_numpy(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


class _ArrayRecord(_Refuses):
    __slots__ = ("shape", "dtype", "fortran", "data")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.dtype: _DTypeRecord | None = None
        self.fortran = False
        self.data = b""

    def __setstate__(self, state: object) -> None:
        # numpy writes (version, shape, dtype, is_fortran, rawdata); very old pickles lack version.
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("ndarray state must be a tuple of 4 or 5 items")
        shape, dtype, fortran, data = state[-4:]
        self._set(shape, dtype, fortran, data)

    def _set(self, shape: object, dtype: object, fortran: object, data: object) -> None:
        if not isinstance(shape, tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise UnsafePickleError(f"ndarray shape must be a tuple of sizes, got {shape!r}")
        if not isinstance(dtype, _DTypeRecord):
            raise UnsafePickleError(f"ndarray dtype must be a numpy dtype, got {type(dtype)}")
        if isinstance(data, bytearray):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise UnsafePickleError(f"ndarray data must be bytes, got {type(data).__name__}")
        expected = math.prod(shape) * np.dtype(dtype.code).itemsize
        if len(data) != expected:
            raise DataError(f"ndarray data holds {len(data)} bytes, its shape needs {expected}")
        self.shape, self.dtype, self.fortran, self.data = shape, dtype, bool(fortran), data

    def to_numpy(self) -> np.ndarray:
        if self.shape is None or self.dtype is None:
            raise UnsafePickleError("ndarray was created but never given its data")
        flat = np.frombuffer(self.data, dtype=self.dtype.to_numpy())
        return flat.reshape(self.shape, order="F" if self.fortran else "C")


class _Callable(_Refuses):
    __slots__ = ("_function",)

    def __init__(self, function: Any) -> None:
        self._function = function

    def __call__(self, *args: object) -> object:
        return self._function(*args)


def _make_dtype(code: object, align: object = False, copy: object = True) -> _DTypeRecord:
    text = _text(code, "dtype code")
    if text not in _ALLOWED_DTYPES:
        raise UnsafePickleError(f"refused numpy dtype {text!r}: only plain numeric dtypes load")
    return _DTypeRecord(text)


def _reconstruct(subtype: object, shape: object, typecode: object) -> _ArrayRecord:
    if not isinstance(subtype, _NdarrayMarker):
        raise UnsafePickleError("_reconstruct may only build a numpy.ndarray")
    return _ArrayRecord()


def _frombuffer(data: object, dtype: object, shape: object, order: object) -> _ArrayRecord:
    # numpy's pickle for protocol 5 (in-band buffers).
    record = _ArrayRecord()
    record._set(shape, dtype, _text(order, "array order") == "F", data)
    return record


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    # How Python 3 writes bytes under protocol 2: _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    if args:
        raise UnsafePickleError("bytes() is only allowed without arguments")
    return b""


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "dtype"): _make_dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("numpy", "ndarray"):
            return _NdarrayMarker()
        function = _ALLOWED_GLOBALS.get((module, name))
        if function is None:
            raise UnsafePickleError(
                f"{self._source}: refused to load the global {module}.{name}: a CIFAR batch "
                "holds only dicts, lists, bytes and numpy arrays, so this file is not one "
                "(or was tampered with); nothing in it was run"
            )
        return _Callable(function)  # a fresh wrapper per lookup: nothing shared to tamper with

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"{self._source}: refused a persistent id in the pickle")


def _materialise(value: object) -> object:
    """Turn the loaded records into numpy arrays, checking every container on the way."""
    if isinstance(value, _ArrayRecord):
        return value.to_numpy()
    if isinstance(value, dict):
        return {_materialise(k): _materialise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialise(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialise(v) for v in value)
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    raise UnsafePickleError(f"unexpected {type(value).__name__} in the pickle")


def safe_load_pickle(data: bytes, source: str = "<bytes>") -> object:
    """Unpickle dicts, lists, tuples, strings, bytes, numbers and numeric numpy arrays, running
    no code from the pickle. Anything else is a `DataError` (`UnsafePickleError` for a refused
    global) whose message starts with `source`."""
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(data), source).load()
        return _materialise(loaded)
    except UnsafePickleError as exc:
        message = str(exc)
        raise UnsafePickleError(
            message if message.startswith(source) else f"{source}: {message}"
        ) from None
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    except Exception as exc:  # anything a malformed pickle can raise: EOFError, TypeError, ...
        raise DataError(
            f"{source} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
            "delete it and fetch the dataset again"
        ) from exc


def read_cifar_batch(
    path: str | os.PathLike[str], num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch: images uint8 [N, 3, 32, 32] and labels int64 [N]."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    batch = safe_load_pickle(raw, str(path))
    if not isinstance(batch, dict):
        raise DataError(
            f"{path} is not a CIFAR batch: it holds a {type(batch).__name__}, not a dict"
        )
    entries = {_text(k, "key") if isinstance(k, bytes | str) else k: v for k, v in batch.items()}
    if "data" not in entries or "labels" not in entries:
        raise DataError(f"{path} is not a CIFAR-10 batch: it has no 'data' or no 'labels' entry")
    data, labels = entries["data"], entries["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape [N, {CIFAR_IMAGE_BYTES}]")
    if data.shape[1] != CIFAR_IMAGE_BYTES:
        raise DataError(
            f"{path}: 'data' rows hold {data.shape[1]} bytes, a 3x32x32 image needs "
            f"{CIFAR_IMAGE_BYTES}"
        )
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in labels
    ):
        raise DataError(f"{path}: 'labels' must be a list of integers")
    if len(labels) != data.shape[0]:
        raise DataError(f"{path} holds {data.shape[0]} images but {len(labels)} labels")
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {num_classes}), found {label_array.min()}.."
            f"{label_array.max()}"
        )
    # Each row is 1024 red, 1024 green, 1024 blue bytes, each plane row-major: that is C,H,W.
    # The copy owns writable memory (np.frombuffer's view of the pickle's bytes is read-only).
    images = data.reshape(-1, 3, 32, 32).copy()
    return images, label_array
