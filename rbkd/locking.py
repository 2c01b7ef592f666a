"""One writer per folder: an advisory lock that dies with its process.

`folder_lock(path)` takes an exclusive `flock` on `path/.rbkd.lock`. The kernel drops the lock when
the holder exits, however it exits (kill -9 included), so a stale lock never needs cleaning up: the
lock file stays behind, unlocked, and the next writer simply takes it. The file holds the holder's
pid and command line, only to tell a second writer who is in the way.

The lock is re-entrant within one process (a study that locks its folder may run `fit` on a run
folder under it, and `fit` may lock that run folder again): flock locks belong to an open file
description, so a second `open` in the same process would otherwise deadlock with itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".rbkd.lock"

_held: dict[str, tuple[int, int]] = {}  # real path -> (fd, depth)
_guard = threading.Lock()


class FolderBusyError(RuntimeError):
    """Another process is writing to the folder."""


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if text:
            return f" ({text.splitlines()[0][:200]})"
    return ""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "run") -> Iterator[Path]:
    """Hold the folder's lock for the block (the folder is created). Raises FolderBusyError at
    once, naming the holder, when another process has it: two writers never share a folder."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise FolderBusyError(
                    f"{folder} is in use by another rbkd process{holder}: wait for it to finish, "
                    f"or give this {what} another folder"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            stamp = f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode(errors="replace")
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp, 0)
            _held[key] = (fd, 1)
    failed = True
    try:
        yield folder
        failed = False
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                if failed and created:
                    _forget_empty(folder)
                os.close(fd)  # closing the last descriptor releases the flock


def _forget_empty(folder: Path) -> None:
    """A folder this lock created, for work that failed before writing anything in it (bad
    input found under the lock), goes again: a refused command leaves nothing behind. Anything
    else in it, or a writer that opened the lock file meanwhile, keeps it."""
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()
            folder.rmdir()
