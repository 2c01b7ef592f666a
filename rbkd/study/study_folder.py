"""A study's folder: whose it is (its marker), the study as it ran (study.json, study.toml), and
its report, drawn once however many runners of the study end together.

A study writes only into a new or empty folder or one of its own earlier runs; the marker
`.rbkd-study.json` names the study, written once among runners starting at the same time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from pathlib import Path

from rbkd.io import NotOursError, claim_folder, read_json_file, write_bytes, write_json
from rbkd.locking import tables_lock
from rbkd.study.report import write_report
from rbkd.study.report.write import REPORT_FILE

STUDY_MARKER = ".rbkd-study.json"  # {"study": name}: the study this folder belongs to


def _held_study(folder: Path) -> str | None:
    """The name of the study `folder` belongs to: its marker's, or (a folder written before
    markers existed) its study.json's; None when it holds neither."""
    for name, key in ((STUDY_MARKER, "study"), ("study.json", "name")):
        path = folder / name
        if path.exists() or path.is_symlink():
            try:
                held = read_json_file(path, "study record")
            except (OSError, ValueError):
                held = None
            if not isinstance(held, dict) or not isinstance(held.get(key), str):
                raise NotOursError(
                    f"{path} is not a study record rbkd wrote; rbkd does not write into "
                    f"{folder}: give the study another --out"
                )
            return held[key]
    return None


def check_study_folder(out: Path, name: str) -> bool:
    """Whether `out` may hold study `name` (True: it does not exist yet). A study writes only
    into a new or empty folder or one of its own earlier runs: a folder of the user's, or of
    another study, is refused with one line (NotOursError). Writes nothing."""

    def recognise(folder: Path) -> bool:
        held = _held_study(folder)
        if held is None:
            return False
        if held != name:
            raise NotOursError(
                f"{folder} holds the results of study {held!r}, not of {name!r}; two studies "
                f"never share a folder: give this one another --out (default: results/<name>)"
            )
        return True

    return claim_folder(
        out,
        f"results of study {name!r}",
        recognise=recognise,
        todo="give the study a new or empty --out (default: results/<study name>)",
    )


def open_study_folder(out: Path, name: str) -> None:
    """Make `out` the folder of study `name`, once, among any number of runners starting at
    the same time: the marker appears whole (linked into place, never overwritten), and the
    folder is checked again after it."""
    out.mkdir(parents=True, exist_ok=True)
    check_study_folder(out, name)  # again: another runner (or user) may have been at it
    marker = out / STUDY_MARKER
    if not (marker.exists() or marker.is_symlink()):
        tmp = out / f"{STUDY_MARKER}.{secrets.token_hex(4)}.tmp"
        write_json(tmp, {"study": name})
        try:
            os.link(tmp, marker)  # atomic, and fails where one is already there
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not marker.exists():
                os.replace(tmp, marker)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    check_study_folder(out, name)  # the marker that won names this study, or we stop here


def write_study_files(out: Path, study: dict, source: Path | None) -> None:
    """study.json and study.toml: the study as it ran (the same for every runner of it)."""
    write_json(out / "study.json", study)
    if source is not None and Path(source).resolve() != (out / "study.toml").resolve():
        write_bytes(out / "study.toml", Path(source).read_bytes())  # the file as it ran


REPORT_MARK = ".rbkd-report.json"  # {"tables": sha256 of the tables drawn, "time": when}


def write_report_once(out: Path, study, source, data_dir, started: float) -> Path:
    """The report, under the tables lock. Where another runner of this study has drawn it from
    these very tables since this one started, that report stands: the runners of a Slurm array
    ending together draw it once."""
    with tables_lock(out):
        write_study_files(out, study, source)  # this runner's study is the one drawn
        digest = hashlib.sha256()
        for name in ("study.json", "teachers.jsonl", "results.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                digest.update((out / name).read_bytes())
        tables = digest.hexdigest()
        try:
            mark = read_json_file(out / REPORT_MARK, "report mark")
        except (OSError, ValueError):
            mark = None
        path = out / "report" / REPORT_FILE
        if (
            isinstance(mark, dict)
            and mark.get("tables") == tables
            and isinstance(mark.get("time"), int | float)
            and mark["time"] >= started
            and path.is_file()
        ):
            return path
        path = write_report(out, data_dir=data_dir)
        write_json(out / REPORT_MARK, {"tables": tables, "time": time.time()})
        return path
