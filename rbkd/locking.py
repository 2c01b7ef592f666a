"""One writer per folder: an advisory lock that dies with its process.

`folder_lock(path)` takes an exclusive `flock` on `path/.rbkd.lock`. The kernel drops the lock when
the holder exits, however it exits (kill -9 included), so a stale lock never needs cleaning up: the
lock file stays behind, unlocked, and the next writer simply takes it. The file holds the holder's
pid and command line, only to tell a second writer who is in the way.

The lock is re-entrant within one process (a study that locks its folder may run `fit` on a run
folder under it, and `fit` may lock that run folder again): flock locks belong to an open file
description, so a second `open` in the same process would otherwise deadlock with itself.

Work shared by several processes on several machines (the runs of one study) is divided by
claims instead (`try_claim`, `release_claim`, `tables_lock`, below): files made with
O_CREAT|O_EXCL on a shared filesystem, kept alive by a heartbeat, taken over when their claimant
is gone. flock is not relied on across machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
import socket
import sys
import threading
import time
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


# ---------------------------------------------------------------------------------------------
# Claims: one owner per piece of work, among processes on any number of machines.
#
# A study shared by several runners (local processes, Slurm array tasks, machines on one shared
# filesystem) cannot rely on flock: NFS and cluster filesystems implement it partly or not at
# all. A claim is a small file made with O_CREAT|O_EXCL, which NFS (v3 and later), Lustre,
# GPFS and BeeGFS perform atomically on the server: of several creators exactly one succeeds.
# The file holds its claimant's host, pid and a random token. While the work runs, a heartbeat
# thread rewrites it in place every lease / 8 seconds (a beat counter and the time), so that a
# claimant that died, or a machine that went away, can be told from one that is still working:
#
# - on the same machine (same host name, boot and pid namespace) a claimant whose process is
#   gone (or is a zombie, or is another process that reused the pid) is stale at once;
# - a claim from another machine is stale once its content has not changed for a whole lease,
#   timed on the observer's own monotonic clock (clocks of different machines never compared).
#
# A stale claim is renamed aside (rename is atomic: of several takers one wins), checked to be
# the very bytes judged stale (a claimant that came back to life keeps its claim), and claimed
# anew. A claimant that finds its file gone or holding another token has lost the claim.
# ---------------------------------------------------------------------------------------------

CLAIMS_DIR = ".rbkd-claims"  # in a study folder: a claim per run being trained, and "tables"
CLAIM_LEASE_S = 120.0  # a claim whose heartbeat stops for this long is another runner's to take
LEASE_ENV = "RBKD_CLAIM_LEASE_S"
_CLAIM_BYTES = 1024  # a claim file's fixed size: a heartbeat rewrites it in place, never shorter

_claims: dict[str, Claim] = {}  # path -> a claim this process holds
_seen: dict[str, tuple[bytes, float]] = {}  # path -> (content, monotonic time it was first seen)
_beating: list[threading.Thread] = []
_wake = threading.Event()  # a new claim: beat now, at the lease of the moment


def claim_lease_s() -> float:
    """The lease in seconds: $RBKD_CLAIM_LEASE_S when set to a number > 0, else 120."""
    try:
        value = float(os.environ.get(LEASE_ENV, ""))
    except ValueError:
        return CLAIM_LEASE_S
    return value if value > 0 and value == value and value != float("inf") else CLAIM_LEASE_S


class Claim:
    """A claim this process holds: `path`, its `token`; `lost` once another runner took it
    (its heartbeat stopped for a lease); `took_over` the stale claimant's record it replaced."""

    def __init__(self, path: Path, token: str, what: str, took_over: dict | None = None):
        self.path, self.token, self.what = path, token, what
        self.beat = 0
        self.lost = False
        self.took_over = took_over


def _read_first_line(path: str) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4096).decode(errors="replace").strip()
    return ""


@functools.cache
def _machine() -> str:
    """This machine, as a same-machine claimant sees it: host name, boot and pid namespace (two
    containers with one host name do not share pids)."""
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}|{boot}|{pidns}"


def _process_start(pid: int) -> str | None:
    """The process's start time (clock ticks after boot) and state, from /proc; None where there
    is no /proc. A pid reused by a new process has another start time."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _process_gone(pid: int, start: str | None) -> bool:
    """Whether `pid` on this machine is not the claimant any more: no such process, a zombie,
    or another process under the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: alive
    stat = _read_first_line(f"/proc/{pid}/stat")
    if stat and stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return True
    return start is not None and _process_start(pid) not in (None, start)


def _content(claim: Claim) -> bytes:
    record = {
        "what": claim.what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "machine": _machine(),
        "start": _process_start(os.getpid()),
        "token": claim.token,
        "beat": claim.beat,
        "time": round(time.time(), 3),
        "command": " ".join(sys.argv)[:300],
    }
    data = json.dumps(record, ensure_ascii=True)
    if len(data) >= _CLAIM_BYTES:
        record["command"] = ""
        data = json.dumps(record, ensure_ascii=True)
    return data.encode().ljust(_CLAIM_BYTES - 1) + b"\n"


def _parse(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None  # being written, or not a claim: judged by whether it changes
    return record if isinstance(record, dict) else None


def _read(path: Path) -> bytes | None:
    """The claim file's content, opened afresh (NFS's close-to-open: the server's bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.pread(fd, _CLAIM_BYTES, 0)
    finally:
        os.close(fd)


def claim_holder(path: str | os.PathLike[str]) -> dict | None:
    """The record of whoever holds the claim at `path` (host, pid, time, ...); None if none."""
    raw = _read(Path(path))
    return None if raw is None else _parse(raw) or {}


def _stale(path: Path, raw: bytes) -> bool:
    record = _parse(raw)
    if record is not None and record.get("machine") == _machine():
        pid = record.get("pid")
        if isinstance(pid, int):
            if pid == os.getpid():
                return str(path) not in _claims  # a predecessor that had our pid
            return _process_gone(pid, record.get("start"))
    now = time.monotonic()
    seen = _seen.get(str(path))
    if seen is None or seen[0] != raw:
        _seen[str(path)] = (raw, now)  # a beat (or a first look): the lease starts again
        return False
    return now - seen[1] >= claim_lease_s()


def _take_aside(path: Path, raw: bytes) -> bool:
    """Move the stale claim `raw` out of the way; False when it turned out to be alive."""
    aside = path.with_name(f"{path.name}.stale-{secrets.token_hex(6)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # released or taken meanwhile: try to claim it
    moved = _read(aside)
    alive = moved is not None and moved != raw  # it beat after we judged it: put it back
    if alive:
        with contextlib.suppress(OSError):
            os.link(aside, path)  # fails if someone claimed it anew meanwhile: theirs, then
    with contextlib.suppress(OSError):
        os.unlink(aside)
    _seen.pop(str(path), None)
    return not alive


def _create(path: Path, what: str, took_over: dict | None) -> Claim | None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return None
    claim = Claim(path, secrets.token_hex(16), what, took_over)
    try:
        os.write(fd, _content(claim))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    with _guard:
        _claims[str(path)] = claim
        if not _beating:
            thread = threading.Thread(target=_heartbeat, name="rbkd-claims", daemon=True)
            _beating.append(thread)
            thread.start()
    _wake.set()
    return claim


def try_claim(path: str | os.PathLike[str], what: str = "run") -> Claim | None:
    """Claim `path` (a file, its folder is created): the Claim, or None when a live claimant
    holds it. A stale claim (see above) is taken over; the new Claim's `took_over` says whose."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        claim = _create(path, what, None)
        if claim is not None:
            return claim
        raw = _read(path)
        if raw is None:
            continue  # released between the two calls
        if not _stale(path, raw) or not _take_aside(path, raw):
            return None
        claim = _create(path, what, _parse(raw) or {})
        if claim is not None:
            return claim
    return None


def _beat(claim: Claim) -> None:
    try:
        fd = os.open(claim.path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        claim.lost = True
        return
    try:
        record = _parse(os.pread(fd, _CLAIM_BYTES, 0))
        if record is None or record.get("token") != claim.token:
            claim.lost = True
            return
        claim.beat += 1
        os.pwrite(fd, _content(claim), 0)
    finally:
        os.close(fd)


def _heartbeat() -> None:
    while True:
        _wake.wait(max(0.05, claim_lease_s() / 8))
        _wake.clear()
        with _guard:
            held = list(_claims.values())
        for claim in held:
            with contextlib.suppress(OSError):
                _beat(claim)
            if claim.lost:
                with _guard:
                    if _claims.get(str(claim.path)) is claim:
                        del _claims[str(claim.path)]


def release_claim(claim: Claim) -> None:
    """Give the claim up: its file goes, unless another runner took it over meanwhile."""
    with _guard:
        if _claims.get(str(claim.path)) is claim:
            del _claims[str(claim.path)]
    raw = _read(claim.path)
    if raw is not None and (_parse(raw) or {}).get("token") == claim.token:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claim.path)


_tables_depth: dict[str, tuple[Claim, int]] = {}


@contextlib.contextmanager
def tables_lock(folder: str | os.PathLike[str], timeout: float | None = None) -> Iterator[None]:
    """Hold the claim on a study folder's tables (`FOLDER/.rbkd-claims/tables`) for the block,
    waiting for it: the runners of one study, on any machines, rewrite results.jsonl and the
    report one at a time. Re-entrant within a process. FolderBusyError after `timeout` s."""
    path = Path(folder) / CLAIMS_DIR / "tables"
    key = str(path)
    with _guard:
        held = _tables_depth.get(key)
        if held is not None:
            _tables_depth[key] = (held[0], held[1] + 1)
    if held is None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (claim := try_claim(path, "tables")) is None:
            if deadline is not None and time.monotonic() > deadline:
                holder = claim_holder(path) or {}
                raise FolderBusyError(
                    f"{folder}: another rbkd process (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}) is writing the study's tables; try again"
                )
            time.sleep(0.02)
        with _guard:
            _tables_depth[key] = (claim, 1)
    try:
        yield
    finally:
        with _guard:
            claim, depth = _tables_depth[key]
            if depth > 1:
                _tables_depth[key] = (claim, depth - 1)
            else:
                del _tables_depth[key]
        if depth == 1:
            release_claim(claim)
