"""Where datasets are looked for, in order:

1. the explicit `data_dir` argument (`--data-dir`): when given, ONLY there (a typo in it must be
   an error naming what was looked for, never a silent fall-back to other data),
2. `$RBKD_DATA` (several folders may be given, separated by `os.pathsep`),
3. the user's cache folder, `$XDG_CACHE_HOME/rbkd` or `~/.cache/rbkd` (where `fetch` writes),
4. Debian's shared datasets folder, `/usr/share/datasets` (package dataset-fashion-mnist).

Within each root the dataset's own subfolders are tried first (`fashion-mnist/`, `mnist/`,
`cifar10/cifar-10-batches-bin/`, ...), then the root itself. The first folder that holds every
file of both splits wins; IDX files may be gzipped (`*.gz`) or not.
"""

from __future__ import annotations

import os
from pathlib import Path

from rbkd.data.errors import DatasetNotFoundError
from rbkd.data.registry import DatasetInfo, get_info

__all__ = [
    "DEBIAN_DATASETS_ROOT",
    "ENV_VAR",
    "cache_dir",
    "candidate_folders",
    "find_dataset",
    "locate_dataset",
    "resolve_file",
    "search_roots",
]

# Module-level so tests (and unusual installs) can point it elsewhere.
DEBIAN_DATASETS_ROOT = Path("/usr/share/datasets")
ENV_VAR = "RBKD_DATA"


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/rbkd`, or `~/.cache/rbkd` (the XDG spec ignores a relative value)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "rbkd"


def search_roots(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The roots searched, in order, without duplicates: `data_dir` alone when it is given."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    roots: list[Path] = []
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            roots.append(Path(entry.strip()).expanduser())
    roots.append(cache_dir())
    roots.append(Path(DEBIAN_DATASETS_ROOT))
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def candidate_folders(
    info: DatasetInfo, data_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Every folder that may hold the dataset, in search order."""
    return [
        root / sub if sub else root for root in search_roots(data_dir) for sub in info.folder_names
    ]


def resolve_file(folder: Path, filename: str) -> Path | None:
    """`folder/filename`, or its un-gzipped twin (`x.gz` -> `x`); None if neither is there.

    A FIFO or device under the name counts as there: the reader then refuses it with an error
    naming its kind, instead of the dataset being silently looked for elsewhere."""
    names = [filename]
    if filename.endswith(".gz"):
        names.append(filename[: -len(".gz")])
    for name in names:
        path = folder / name
        if path.is_file() or (path.exists() and not path.is_dir()):
            return path
    return None


def _missing_files(info: DatasetInfo, folder: Path) -> list[str]:
    return [name for name in info.files if resolve_file(folder, name) is None]


def locate_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Like `find_dataset`, but None instead of an error."""
    info = get_info(name)
    for folder in candidate_folders(info, data_dir):
        if folder.is_dir() and not _missing_files(info, folder):
            return folder
    return None


def find_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the dataset's files; `DatasetNotFoundError` (one line: where it looked
    and what to do) if no folder in the search path holds them all."""
    info = get_info(name)
    partial: tuple[Path, list[str]] | None = None
    for folder in candidate_folders(info, data_dir):
        if not folder.is_dir():
            continue
        missing = _missing_files(info, folder)
        if not missing:
            return folder
        if partial is None and len(missing) < len(info.files):
            partial = (folder, missing)
    subfolders = ", ".join(f"{sub}/" for sub in info.folder_names if sub)
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        state = "" if root.is_dir() else " (no such folder)"
        files = ", ".join(info.files)
        raise DatasetNotFoundError(
            f"{info.title} not found in --data-dir {root}{state}: looked in it and its "
            f"{subfolders} subfolders for {files}"
            + (f"; {partial[0]} lacks {', '.join(partial[1])}" if partial else "")
            + f": fix the path, run `rbkd data fetch {info.name} --dest {root}`, or leave out "
            f"--data-dir to search ${ENV_VAR}, the cache and /usr/share/datasets"
        )
    roots = ", ".join(str(root) for root in search_roots(data_dir))
    message = f"{info.title} not found (looked in: {roots}, and their {subfolders} subfolders)"
    if partial is not None:
        message += f"; {partial[0]} lacks {', '.join(partial[1])}"
    fetch_hint = f"run `rbkd data fetch {info.name}`"
    if info.debian_package:
        pkg = info.debian_package
        message += f": install Debian's {pkg} (apt-get install {pkg}) or {fetch_hint}"
    else:
        message += f": {fetch_hint}, or put its files in ${ENV_VAR}/{info.folder_names[0]}/"
    raise DatasetNotFoundError(message)
