"""The report being written: its Markdown lines, headings and figures, and the data the image
and model sections read."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbkd.study.report.load import StudyOutput
from rbkd.study.report.markdown import markdown_table, slug

DATASET_TITLES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}


@dataclass
class Report:
    study: StudyOutput
    out: Path
    fmt: str
    labels: Mapping[str, str]
    data_dir: Path | None
    lines: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    # what could not be drawn for want of an input (a teacher run, the dataset, matplotlib):
    # "section: what: why" lines that write_report also says on stderr
    omitted: list[str] = field(default_factory=list)
    _datasets: dict = field(default_factory=dict)

    # names and titles
    def seeds(self, experiment: str) -> int:
        """How many seeds each cell of `experiment` should have (its own list, else the study's)."""
        own = (self.study.experiments.get(experiment) or {}).get("seeds")
        return len(own) if isinstance(own, list) and own else self.study.seeds

    def name(self, teacher: str | None) -> str:
        return "label smoothing" if teacher is None else str(self.labels.get(teacher, teacher))

    @property
    def data_title(self) -> str:
        return DATASET_TITLES.get(self.study.dataset, self.study.dataset)

    # markdown
    def heading(self, title: str) -> None:
        self.sections.append(title)
        self.lines += [f"## {title}", ""]

    def text(self, *paragraphs: str) -> None:
        for p in paragraphs:
            self.lines += [p, ""]

    def skip(self, why: str) -> None:
        self.text(f"_Skipped: {why}._")

    def omit(self, what: str, why: str) -> None:
        """Leave `what` out because an input it needs is not here (not because the study has
        no such experiment): a line in report.md where it would have been, and one on stderr."""
        why = " ".join(str(why).split()).rstrip(".")
        self.skip(f"{what}: {why}")
        section = self.sections[-1] if self.sections else "report"
        self.omitted.append(f"{section}: {what}: {why}")

    def skipped(self, experiment: str, rows: Sequence, none_yet: str) -> bool:
        """Skip the section, saying why, when the study has no `experiment` and no rows of it, or
        no rows yet (`none_yet`); True when it did."""
        if self.study.experiments.get(experiment) is None and not rows:
            self.skip(f"the study has no {experiment} experiment")
            return True
        if not rows:
            self.skip(none_yet)
            return True
        return False

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> None:
        self.lines += [markdown_table(header, rows, align), ""]

    def figure(self, stem: str, draw: Callable[[Path], Any], caption: str) -> None:
        """Draw a figure into out/<stem>.<fmt> and link it (inline for PNG and SVG). Without
        matplotlib (the `plots` extra) the report keeps its tables and says which figure it left
        out, rather than failing at the end of a long study."""
        if not _have_matplotlib():
            why = "not drawn, matplotlib is not installed (pip install 'rbkd[plots]')"
            self.text(f"*{caption}: {why}.*")
            if f"every figure: {why}" not in self.omitted:  # one line for all of them
                self.omitted.append(f"every figure: {why}")
            return
        path = self.out / f"{slug(stem)}.{self.fmt}"
        draw(path)
        self.figures.append(path)
        link = path.name
        if self.fmt == "pdf":
            self.text(f"[{caption} (PDF)]({link})")
        else:
            self.text(f"![{caption}]({link})", f"*{caption}*")

    # data, for the two sections that look at images or models
    def dataset(self, split: str):
        if split not in self._datasets:
            from rbkd.data import load_dataset

            ds = load_dataset(self.study.dataset, split, self.data_dir)
            limit = self.study.spec.get("limit")
            if isinstance(limit, int) and 0 < limit < len(ds):
                import dataclasses

                ds = dataclasses.replace(ds, images=ds.images[:limit], labels=ds.labels[:limit])
            self._datasets[split] = ds
        return self._datasets[split]

    def run_dir(self, teacher: str) -> Path:
        row = self.study.teacher(teacher)
        if row is None or not row.get("run_dir"):
            raise ValueError(f"teachers.jsonl has no run folder for teacher {teacher!r}")
        path = Path(row["run_dir"])
        return path if path.is_absolute() else self.study.folder / path


@functools.cache
def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None
