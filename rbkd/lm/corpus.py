"""A text corpus for language models: a folder of text files, split by file, with a content hash.

The default corpus, `pydocs`, is the Python 3.11 documentation's reStructuredText sources (Debian's
python3.11-doc: /usr/share/doc/python3.11/html/_sources, 497 `*.rst.txt` files, about 11 MB of
prose and code written outside this project). It is looked for, in order, in

1. the folder given (`corpus_dir`, `--corpus DIR`): when given, ONLY there (any text folder),
2. `$RBKD_DATA/pydocs/` (each folder of `$RBKD_DATA`, as for the image datasets),
3. the cache folder's `pydocs/` (`$XDG_CACHE_HOME/rbkd/pydocs`, `~/.cache/rbkd/pydocs`),
4. Debian's `/usr/share/doc/python3.11/html/_sources`.

A corpus is every regular file under its folder whose name ends in `.txt` (so `.rst.txt`), `.md` or
`.rst`, hidden files and folders skipped, in the sorted order of their relative paths (POSIX
separators). Files are read as UTF-8, an undecodable byte replaced by U+FFFD (the hash is over the
bytes, so it still tells two corpora apart).

The split is by file and fixed: a file is in `validation` when the first 8 hex digits of the SHA-256
of its relative path, as an integer, are 0 modulo 20 (about 5% of the files), else in `train`. It
depends on nothing but the path, so adding a file never moves another. When that rule leaves a
corpus of two or more files without a validation file, the file with the smallest such hash is
the validation split. `pydocs` splits 475 / 22 files by this rule.

The corpus SHA-256 is over the files in order: for each, its relative path in UTF-8, a NUL byte,
its size as 8 little-endian bytes, then its bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rbkd.data.errors import DatasetNotFoundError
from rbkd.data.locate import ENV_VAR, cache_dir

__all__ = [
    "CORPUS_NAME",
    "DEBIAN_PACKAGE",
    "DEBIAN_PYDOCS",
    "SPLITS",
    "SUFFIXES",
    "Corpus",
    "CorpusError",
    "corpus_folders",
    "file_split",
    "find_corpus",
    "load_corpus",
    "locate_corpus",
]

CORPUS_NAME = "pydocs"
DEBIAN_PACKAGE = "python3.11-doc"
# Module-level so tests (and unusual installs) can point it elsewhere.
DEBIAN_PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")
SPLITS = ("train", "validation")
SUFFIXES = (".txt", ".md", ".rst")
VALIDATION_MODULUS = 20  # 1 file in 20 (5%) is in validation


class CorpusError(DatasetNotFoundError):
    """A corpus that is missing or empty (one line: where, and what to do)."""


def corpus_folders() -> list[Path]:
    """Where the default corpus is looked for, in order (without --corpus)."""
    roots = [Path(e.strip()).expanduser() for e in os.environ.get(ENV_VAR, "").split(os.pathsep)]
    folders = [root / CORPUS_NAME for root in roots if str(root) not in ("", ".")]
    folders += [cache_dir() / CORPUS_NAME, Path(DEBIAN_PYDOCS)]
    return list(dict.fromkeys(folders))


def _text_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the corpus's files, sorted; hidden names skipped."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.name.endswith(SUFFIXES) and path.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def locate_corpus(corpus_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Like `find_corpus`, but None instead of an error."""
    try:
        return find_corpus(corpus_dir)
    except CorpusError:
        return None


def find_corpus(corpus_dir: str | os.PathLike[str] | None = None) -> Path:
    """The corpus folder: `corpus_dir` when given (it must hold text files), else the first of
    `corpus_folders()` holding any; CorpusError (one line) otherwise."""
    if corpus_dir is not None:
        folder = Path(corpus_dir).expanduser()
        if not folder.is_dir():
            raise CorpusError(f"--corpus {folder} is not a folder: give a folder of text files")
        if not _text_files(folder):
            raise CorpusError(
                f"corpus {folder} is empty: it holds no {', '.join('*' + s for s in SUFFIXES)} "
                "files; give a folder of text files"
            )
        return folder
    for folder in corpus_folders():
        if folder.is_dir() and _text_files(folder):
            return folder
    where = ", ".join(str(f) for f in corpus_folders())
    raise CorpusError(
        f"the {CORPUS_NAME} corpus (Python 3.11 documentation sources) was not found (looked in "
        f"{where}): install Debian's {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}), or "
        "give a folder of text files with --corpus DIR"
    )


def file_split(relative_path: str) -> str:
    """`validation` or `train`, from the SHA-256 of the relative path (the module's rule)."""
    return "validation" if _path_hash(relative_path) % VALIDATION_MODULUS == 0 else "train"


def _path_hash(relative_path: str) -> int:
    return int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class Corpus:
    """A corpus folder, its files (relative POSIX paths, sorted), their split and the SHA-256."""

    root: Path
    files: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]
    sha256: str
    num_bytes: int

    @property
    def name(self) -> str:
        return CORPUS_NAME if self.root == Path(DEBIAN_PYDOCS) else self.root.name

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        """(relative path, text) of each file of the split, in order, one file in memory at
        a time."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        for rel in self.splits[split]:
            yield rel, (self.root / rel).read_bytes().decode("utf-8", errors="replace")

    def split_bytes(self, split: str) -> int:
        return sum((self.root / rel).stat().st_size for rel in self.splits[split])


def _split(files: list[str]) -> dict[str, tuple[str, ...]]:
    validation = [f for f in files if file_split(f) == "validation"]
    if not validation and len(files) >= 2:
        validation = [min(files, key=_path_hash)]
    chosen = set(validation)
    return {
        "train": tuple(f for f in files if f not in chosen),
        "validation": tuple(validation),
    }


def load_corpus(corpus_dir: str | os.PathLike[str] | None = None) -> Corpus:
    """Find the corpus (`find_corpus`), list and split its files and hash them (one pass, one
    file in memory at a time: 11 MB of pydocs take about 0.1 s)."""
    root = find_corpus(corpus_dir)
    files = _text_files(root)
    digest = hashlib.sha256()
    total = 0
    for rel in files:
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
        total += len(data)
    if total == 0:
        raise CorpusError(f"corpus {root} is empty: its text files hold no bytes")
    return Corpus(root, tuple(files), _split(files), digest.hexdigest(), total)
