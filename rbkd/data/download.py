"""`fetch`: download a dataset from its public mirrors, verify SHA-256, write atomically.

A download streams into a temporary file next to its final name and is renamed only once its
checksum (SHA-256, and the size and MD5 upstream publish) matches, so an interrupted or corrupted
download never leaves a file under the final name. CIFAR-10's tar.gz (the binary version: no
pickle) is checked member by member before anything is unpacked, then unpacked with tarfile's
"data" filter into a temporary folder whose files are fsynced before it is renamed into place.
A fetch that fails removes the folders it created: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from rbkd.data.errors import DatasetFetchError
from rbkd.data.locate import ENV_VAR, cache_dir, resolve_file
from rbkd.data.registry import DatasetInfo, RemoteFile, get_info
from rbkd.io import atomic_path, sha256_file

__all__ = ["CIFAR_FOLDER", "fetch", "sha256_file"]

CIFAR_FOLDER = "cifar-10-batches-bin"
_CHUNK = 1 << 20
_TIMEOUT_S = 30.0  # per socket operation, not for the whole file


def _manual_hint(info: DatasetInfo, dest: Path) -> str:
    names = ", ".join(remote.filename for remote in info.downloads)
    return f"download {names} by hand into {dest} (or a folder named in ${ENV_VAR})"


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int | None) -> Iterator:
    # stderr, so that stdout stays clean for whatever a script reads from it; and only on a
    # terminal: a bar redrawn into a log file is noise.
    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda advance: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda advance: progress.update(task, advance=advance)


def _download(url: str, remote: RemoteFile, target: Path, progress: bool) -> None:
    """Stream `url` into `target` atomically, verifying SHA-256, size and MD5 on the way."""
    digest, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "rbkd-data-fetch"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else remote.size
        with (
            atomic_path(target) as tmp,
            open(tmp, "wb") as handle,
            _progress_bar(progress, remote.filename, total) as advance,
        ):
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                if received > remote.size:  # never fill the disk from a hostile server
                    raise DatasetFetchError(
                        f"{url} sent more than the {remote.size:,} bytes {remote.filename} has; "
                        "nothing was written (a broken mirror or a changed file)"
                    )
                digest.update(chunk)
                md5.update(chunk)
                handle.write(chunk)
                advance(len(chunk))
            handle.flush()
            actual = digest.hexdigest()
            if actual != remote.sha256 or md5.hexdigest() != remote.md5:
                # Raising inside atomic_path removes the temporary file: nothing is left behind.
                raise DatasetFetchError(
                    f"checksum mismatch for {url}: expected SHA-256 {remote.sha256}, got {actual}; "
                    "nothing was written (a broken mirror or a changed file)"
                )


def _fetch_file(
    info: DatasetInfo, remote: RemoteFile, dest: Path, mirrors: tuple[str, ...], progress: bool
) -> Path:
    target = dest / remote.filename
    if target.is_file() and sha256_file(target) == remote.sha256:
        return target
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + remote.filename
        try:
            _download(url, remote, target, progress)
            return target
        except DatasetFetchError as exc:
            failures.append(str(exc))
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except urllib.error.URLError as exc:
            failures.append(f"{url}: {exc.reason}")
        except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
            failures.append(f"{url}: {exc}")
    offline = "" if any(f.startswith("checksum mismatch") for f in failures) else "offline? "
    raise DatasetFetchError(
        f"downloading {remote.filename} failed ({'; '.join(failures)}): "
        f"{offline}{_manual_hint(info, dest)}"
    )


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (parts and ":" in parts[0]):
        raise DatasetFetchError(f"refusing {archive}: member {name!r} has an absolute path")
    if ".." in parts or ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DatasetFetchError(f"refusing {archive}: member {name!r} points outside the folder")
    if not (member.isfile() or member.isdir()):
        raise DatasetFetchError(
            f"refusing {archive}: member {name!r} is a link or device, not a file or folder"
        )


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (before it is renamed into place, so that a
    crash cannot leave the final name holding empty or partial files)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name, os.O_RDONLY)
        for name in dirs:
            _fsync(Path(root) / name, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unpack_cifar(info: DatasetInfo, archive: Path, dest: Path) -> Path:
    final = dest / CIFAR_FOLDER
    scratch = Path(tempfile.mkdtemp(dir=dest, prefix=f".{CIFAR_FOLDER}.", suffix=".part"))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for member in members:  # every member checked before a single byte is written
                    _check_member(member, archive)
                # The "data" filter is the second line of defence (it also drops odd modes).
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                    tar.extractall(scratch, members=members, filter="data")
                else:
                    tar.extractall(scratch, members=members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            if isinstance(exc, DatasetFetchError):
                raise
            raise DatasetFetchError(
                f"cannot unpack {archive} ({exc}): delete it and fetch again"
            ) from exc
        unpacked = scratch / CIFAR_FOLDER
        missing = [name for name in info.files if resolve_file(unpacked, name) is None]
        if missing:
            raise DatasetFetchError(
                f"{archive} holds no {CIFAR_FOLDER}/ with {', '.join(missing)}: not CIFAR-10's "
                "binary archive (cifar-10-binary.tar.gz)"
            )
        _fsync_tree(unpacked)
        if final.exists():
            shutil.rmtree(final)
        os.replace(unpacked, final)
        _fsync(dest, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def fetch(
    name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download a dataset into `dest` (default: the cache folder, ~/.cache/rbkd/<name>) and
    return the folder that now holds its files, ready for `load_dataset(..., data_dir=...)`.

    Files already present with the right SHA-256 are not downloaded again. `base_url` replaces
    the public mirrors (a file's URL is base_url + "/" + its name). Errors are one-line
    `DatasetFetchError`s saying what failed and where to put the files by hand.
    """
    info = get_info(name)
    # The cache subfolder is the dataset's name, the first place `find_dataset` looks in a root
    # (CIFAR-10's archive then unpacks to cifar10/cifar-10-batches-bin/, also on the search path).
    dest = Path(dest).expanduser() if dest is not None else cache_dir() / info.name
    created = [p for p in (dest, *dest.parents) if not p.exists()]
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetFetchError(f"cannot create {dest}: {exc.strerror or exc}") from exc
    mirrors = (base_url,) if base_url else info.mirrors
    before = {p.name for p in dest.iterdir()}
    try:
        if info.format == "cifar":
            final = dest / CIFAR_FOLDER
            if final.is_dir() and all(resolve_file(final, n) is not None for n in info.files):
                return final
            (remote,) = info.downloads
            archive = _fetch_file(info, remote, dest, mirrors, progress)
            return _unpack_cifar(info, archive, dest)
        for remote in info.downloads:
            _fetch_file(info, remote, dest, mirrors, progress)
        return dest
    except BaseException:
        _remove_new(dest, before, created)
        raise


def _remove_new(dest: Path, before: set[str], created: list[Path]) -> None:
    """Undo a failed fetch: the files it downloaded and the folders it created (never a file
    or folder that was there before)."""
    with contextlib.suppress(OSError):
        for entry in dest.iterdir():
            if entry.name not in before and entry.is_file() and not entry.is_symlink():
                entry.unlink()
    for folder in created:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty
