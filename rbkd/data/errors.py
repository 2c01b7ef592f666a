"""The data layer's errors. Each message is one line that says what failed and what to do next."""

from __future__ import annotations

__all__ = [
    "DATA_ERRORS",
    "DataError",
    "DatasetFetchError",
    "DatasetNotFoundError",
    "UnknownDatasetError",
]


class DataError(ValueError):
    """A dataset file is corrupt, truncated or not what its name says; the message names the file."""


class UnknownDatasetError(DataError):
    """A dataset name that is not in `rbkd.data.DATASETS`."""


class DatasetNotFoundError(FileNotFoundError):
    """No folder in the search path holds the dataset's files."""

    def __str__(self) -> str:  # FileNotFoundError would print "[Errno None] ..." otherwise
        return str(self.args[0]) if self.args else ""


class DatasetFetchError(OSError):
    """A download failed (offline, HTTP error, checksum mismatch, unsafe archive)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# What a command-line front end should turn into one line and exit code 1.
DATA_ERRORS: tuple[type[Exception], ...] = (DataError, DatasetNotFoundError, DatasetFetchError)
