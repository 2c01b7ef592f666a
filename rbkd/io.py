"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

The temporary file lives in the target's own folder, because `os.replace` is only atomic within
one file system. The data is fsynced before the rename and the folder after it, so that a crash
cannot leave the final name pointing at an empty or partial file.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_METADATA_BYTES",
    "DiskFullError",
    "NotOursError",
    "NotRegularFileError",
    "atomic_path",
    "atomic_write_bytes",
    "check_new_file",
    "check_regular_file",
    "claim_folder",
    "csv_cell",
    "jsonable",
    "read_bounded",
    "read_json_file",
    "read_safetensors_metadata",
    "remove_stale_temporaries",
    "safetensors_canonical",
    "sha256_file",
    "write_bytes",
    "write_csv",
    "write_json",
]

# Bounds on what a reader takes from a file before parsing it: a hostile or damaged file must
# give one clear error, not minutes of parsing or gigabytes of memory. Real files are far
# smaller: a run's config.json is a few KB, a soft-label header's metadata a few hundred bytes, a
# checkpoint's (optimizer state and per-epoch metrics) a few KB per hundred epochs.
MAX_JSON_BYTES = 8 << 20  # config.json, report.json, metrics.jsonl
MAX_METADATA_BYTES = 64 << 10  # safetensors __metadata__ of model and soft-label files
MAX_METADATA_VALUE = 4096  # one metadata string (a path is at most 4096 bytes on Linux)
MAX_HEADER_BYTES = 100 << 20  # the whole safetensors JSON header (safetensors' own limit)

# What the atomic writer leaves behind if the process dies between create and rename:
# ".<final name>.<mkstemp suffix>.part" (files) and CIFAR's ".cifar-10-...<suffix>.part" folders.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(part|tmp)$")


class DiskFullError(OSError):
    """A write failed for lack of space (ENOSPC, EDQUOT) or a file-size limit (EFBIG)."""

    def __str__(self) -> str:  # OSError would print "[Errno None] ..." otherwise
        return str(self.args[0]) if self.args else ""


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large"}
if hasattr(errno, "EDQUOT"):
    _DISK_FULL[errno.EDQUOT] = "disk quota exceeded"


def _disk_full_reason(exc: BaseException) -> str | None:
    """Why a write failed, when it is a full disk: OSError's errno, or the Rust writer's
    "(os error 28)" text (safetensors raises its own error type)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return _DISK_FULL[exc.errno]
    for code, reason in _DISK_FULL.items():
        if f"os error {code})" in str(exc):
            return reason
    return None


class NotRegularFileError(ValueError):
    """A path that rbkd reads is a FIFO, a device, a folder or a socket, not a regular file."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """`path` if it is a regular file (symlinks followed); FileNotFoundError or
    NotRegularFileError (one line naming the file and its kind) otherwise. Reading a FIFO would
    block forever and /dev/zero never ends, so nothing else is ever opened for reading."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(
            f"{what} {path} is {_kind(st.st_mode)}, not a regular file: replace it with the "
            "real file"
        )
    return path


def read_bounded(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (checked on the open descriptor,
    which is opened non-blocking so that a FIFO swapped in after the check cannot hang us)."""
    path = Path(path)
    check_regular_file(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(
            f"{what} {path} is larger than {limit >> 20} MiB, far more than rbkd ever writes: "
            "it is damaged or not an rbkd file"
        )
    return data


def read_json_file(path: str | os.PathLike[str], what: str = "file", limit: int = MAX_JSON_BYTES):
    """Parse a bounded, regular JSON file; ValueError (one line) when it is not valid JSON."""
    data = read_bounded(path, limit, what)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None


def read_safetensors_metadata(
    path: str | os.PathLike[str],
    what: str = "safetensors file",
    *,
    max_metadata: int = MAX_METADATA_BYTES,
    max_value: int = MAX_METADATA_VALUE,
) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header with bounds: the file must
    be regular, the header at most 100 MiB, the metadata at most `max_metadata` bytes and each
    value at most `max_value` characters. Call it before safe_open/load_file, which would read
    an unbounded header and hang on a FIFO. ValueError (one line) when a bound is broken."""
    path = check_regular_file(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{what} {path} is not a safetensors file (shorter than 8 bytes)")
        size = int.from_bytes(head, "little")
        if size > MAX_HEADER_BYTES:
            raise ValueError(
                f"{what} {path} declares a {size}-byte header (limit {MAX_HEADER_BYTES}): it is "
                "damaged or not a safetensors file"
            )
        raw = handle.read(size)
    if len(raw) < size:
        raise ValueError(f"{what} {path} is truncated (its header is incomplete)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} has an unreadable header ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{what} {path}: its metadata must map strings to strings")
    total = sum(len(k) + len(v) for k, v in meta.items())
    if total > max_metadata:
        raise ValueError(
            f"{what} {path} carries {total} bytes of metadata (limit {max_metadata}): "
            "it is damaged or not an rbkd file"
        )
    long = [k for k, v in meta.items() if len(v) > max_value and k not in _LONG_KEYS]
    if long:
        raise ValueError(
            f"{what} {path}: metadata {long[0]!r} is {len(meta[long[0]])} characters (limit "
            f"{max_value}): it is damaged or not an rbkd file"
        )
    return meta


# Metadata keys whose values are JSON documents rbkd writes itself (bounded by max_metadata).
_LONG_KEYS = frozenset({"rbkd_checkpoint"})


def safetensors_canonical(data: bytes) -> bytes:
    """The same safetensors file with its `__metadata__` keys sorted, so equal content gives equal
    bytes (and SHA-256) in every process.

    safetensors keeps the metadata in a Rust HashMap with a per-process random order, so two
    processes saving the same tensors and metadata write different headers: a shard's hash, which
    stores and caches compare, would then depend on which process wrote it. Offsets are relative
    to the end of the header, so only the header (padded to 8 bytes, as safetensors does) changes.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete what an atomic write killed before its rename left in `folder` (hidden `.part`
    files and folders with mkstemp's 8-character suffix); returns what was removed. Call it only
    while holding the folder's lock (`rbkd.locking.folder_lock`): then no write is in flight."""
    removed = []
    folder = Path(folder)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in folder.iterdir():
            if not _TEMPORARY.match(entry.name):
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
            except OSError:
                continue
    return removed


def _current_umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; Linux (>= 4.7)
    # shows it in /proc/self/status instead.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # Not every platform can open a folder (Windows) or fsync one; the rename still happened.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed to `path`.

    If the block raises, the temporary file is removed and `path` is left as it was.

    >>> with atomic_path("weights.safetensors") as tmp:
    ...     save_file(tensors, tmp)
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file 0600, and writers that replace the file (safetensors) keep
        # that: give the result the permissions a plain open() would, after the writer is done.
        os.chmod(tmp, 0o666 & ~_current_umask())
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        reason = _disk_full_reason(exc)
        if reason is not None:
            raise DiskFullError(
                f"cannot write {path}: {reason} (a full disk or a file-size limit); the previous "
                "version of the file is intact: free some space and rerun (a training run "
                "continues from its last checkpoint)"
            ) from exc
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file in the same folder, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    check_regular_file(path)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """NaN and inf become null (JSON has no spelling for them: the accuracy of a class with no
    examples is NaN); tensors, numpy values, tuples and paths become plain JSON values."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return jsonable(value.tolist())
    return value


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


# Ownership: rbkd writes only into a folder it created or recognises as its own, or into a new
# file. Anything else is refused with one line naming the path and what to do (README, "CLI
# conventions"); an explicit --force-style option is the only way past it.


class NotOursError(ValueError):
    """A path rbkd was asked to write holds something it did not write (or is not writable as
    asked: a folder where a file goes, a dangling link). The message names it and what to do."""


def _entry_kind(path: Path) -> str | None:
    """None when nothing is at `path` (not even a dangling link), else what is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link" if path.exists() else "a dangling symbolic link"
    if stat.S_ISREG(st.st_mode):
        return "a file"
    return _kind(st.st_mode)


def check_new_file(
    path: str | os.PathLike[str],
    what: str,
    *,
    owned: Any = None,
    force: bool = False,
    todo: str = "choose a new file name, or delete it first",
) -> Path:
    """`path` if rbkd may write the file `what` there: nothing is there yet, or a regular file
    that `owned(path)` recognises as rbkd's own (the same kind of file, of the same origin), or
    any regular file or link when `force`. A folder, a FIFO or a device is never replaced.
    Otherwise NotOursError, one line naming the path and saying `todo`."""
    path = Path(path)
    kind = _entry_kind(path)
    if kind is None:
        return path
    if kind not in ("a file", "a symbolic link", "a dangling symbolic link"):
        raise NotOursError(
            f"cannot write the {what} to {path}: it is {kind}; give the path of a file "
            f"(e.g. {path / 'NAME'})"
            if kind == "a folder"
            else f"cannot write the {what} to {path}: it is {kind}; give the path of a new file"
        )
    if force:
        return path
    if kind == "a file" and owned is not None:
        try:
            if owned(path):
                return path
        except NotOursError:  # rbkd's own kind of file, of another origin: the reason says so
            raise
        except (OSError, ValueError):
            pass
    held = "a file rbkd did not write" if kind == "a file" else kind
    raise NotOursError(f"{path} already exists and is {held}; rbkd does not replace it: {todo}")


def _ours_only(entries: list[Path]) -> list[Path]:
    """The entries of a folder that are not rbkd's lock file or a leftover temporary."""
    return [e for e in entries if e.name != ".rbkd.lock" and not _TEMPORARY.match(e.name)]


def claim_folder(
    folder: str | os.PathLike[str],
    what: str,
    *,
    recognise: Any,
    todo: str = "give a new or empty folder",
) -> bool:
    """Check that rbkd may write the `what` into `folder`: it does not exist yet (True: it is
    new), is empty (rbkd's lock file and leftover temporaries aside), or `recognise(folder)`
    says it is rbkd's own (False). `recognise` returns True, False, or raises NotOursError with
    its own reason (another study's folder, say). Anything else is NotOursError, one line naming
    the folder and one entry of it. Nothing is created or written here."""
    folder = Path(folder)
    kind = _entry_kind(folder)
    if kind is None:
        return True
    if kind != "a folder" and not (kind == "a symbolic link" and folder.is_dir()):
        raise NotOursError(
            f"cannot write the {what} into {folder}: it is {kind}, not a folder; {todo}"
        )
    if recognise(folder):
        return False
    entries = sorted(_ours_only(list(folder.iterdir())))
    if not entries:
        return False
    raise NotOursError(
        f"{folder} already holds files rbkd did not write (e.g. {entries[0].name}); rbkd writes "
        f"the {what} only into a folder of its own: {todo}"
    )


# What a spreadsheet reads as the start of a formula (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def csv_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula: a text starting with =, +, -, @, tab
    or CR gets a leading single quote (OWASP's CSV-injection advice). Numbers, and texts that
    are plain numbers ("-0.5"), are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.match(value):
        return "'" + value
    return value


def write_csv(path: str | os.PathLike, header: list[str], rows: Any) -> Path:
    """A CSV table with `header`, atomically (parent folders are created); floats in full
    precision, None and NaN as empty cells, every text cell neutralised by `csv_cell`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([csv_cell(str(h)) for h in header])
    for row in rows:
        writer.writerow(["" if v is None else csv_cell(v) for v in jsonable(list(row))])
    return write_bytes(path, buf.getvalue().encode())
