"""Reading a study folder (study.json, teachers.jsonl, results.jsonl; docs/studies.md is the
contract) and the statistics over seeds that every table is made of."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbkd.io import read_json_file
from rbkd.study.results import read_jsonl


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None for one value, n) of the finite values."""
    xs = [float(v) for v in values if finite(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def group_key(v: Any) -> Any:
    """A grouping key for a value read from JSON: floats rounded (T = 9 and 9.0 are one)."""
    return round(float(v), 6) if finite(v) else v


@dataclass
class StudyOutput:
    """What a study folder holds, read once."""

    folder: Path
    spec: dict
    teachers: list[dict]
    results: list[dict]

    @property
    def dataset(self) -> str:
        return str(self.spec.get("dataset") or "")

    @property
    def experiments(self) -> dict:
        return self.spec.get("experiments") or {}

    @property
    def seeds(self) -> int:
        return len(self.spec.get("seeds") or [])

    @property
    def class_names(self) -> list[str]:
        for row in (*self.teachers, *self.results):
            if row.get("class_names"):
                return [str(n) for n in row["class_names"]]
        try:
            from rbkd.data.registry import get_info

            return list(get_info(self.dataset).class_names)
        except Exception:  # an unknown dataset: classes by number
            c = max(
                (len(r.get("per_class_accuracy") or []) for r in (*self.teachers, *self.results)),
                default=0,
            )
            return [str(k) for k in range(max(c, 2))]

    def teacher(self, name: str) -> dict | None:
        return next((t for t in self.teachers if t.get("name") == name), None)

    def rows(self, experiment: str) -> list[dict]:
        return [r for r in self.results if experiment in (r.get("experiments") or [])]


def read_study_output(study_dir: str | os.PathLike) -> StudyOutput:
    folder = Path(study_dir)
    path = folder / "study.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass the folder `rbkd study run` wrote (it holds study.json, "
            "teachers.jsonl and results.jsonl)"
        )
    spec = read_json_file(path, "study file")
    if not isinstance(spec, dict):
        raise ValueError(f"{path} does not hold a study (a JSON object); rerun `rbkd study run`")
    return StudyOutput(
        folder, spec, read_jsonl(folder / "teachers.jsonl"), read_jsonl(folder / "results.jsonl")
    )
