"""The reproduction report of a study: the thesis's tables and figures from a study's output folder.

`write_report(study_dir)` reads the folder `rbkd study run` writes (study.json, teachers.jsonl,
results.jsonl and the teacher run folders; docs/.study-output-draft.md is the contract) and writes
`report/report.md` with Markdown tables and the figures next to it:

- missing-class tables, classes x T per teacher (thesis tables 5.1-5.6) and classes x A for label
  smoothing (table 5.7), as Markdown and as annotated heatmaps;
- soft-label entropy against T with the label-smoothing band and ln C (figures 5.1-5.4), per
  class per teacher, and the entropy form of the hypothesis (figures 5.15 / 6.8);
- transfer-set curves, entropy-selected against random, seeds as error bands, with the full-data
  student as reference (figures 5.5, 5.8, 6.6);
- teacher entropy against batch size and against epochs (figures 6.2-6.4);
- student accuracy against T per teacher (figure 6.5);
- the top highest-entropy training images per class (figures 5.6-5.13) and penultimate-layer
  projections side by side (figures 5.14 / 6.7): these two read the teacher runs and the dataset;
- the noise baseline and a summary table per experiment.

A section whose experiment or rows are missing is skipped with a line saying why, so a report can
be written at any moment of a running study. Accuracies are shown in percent; with several seeds a
cell is mean ± sample standard deviation (n - 1) over the seeds.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbkd.analysis.entropy import DEFAULT_LS_FACTORS, label_smoothing_entropy
from rbkd.io import write_bytes

REPORT_FILE = "report.md"
MANIFEST_FILE = ".report-figures.json"  # what the last report wrote (see _forget_old_figures)
FORMATS = ("png", "pdf", "svg")
EXPERIMENT_ORDER = (
    "missing_class",
    "transfer_set",
    "temperature",
    "batch_sweep",
    "noise",
    "entropy",
    "examples",
    "projection",
)
DATASET_TITLES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}
DASH = "–"


# ------------------------------------------------------------------ reading the folder
def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] when it does not exist yet); ValueError naming the line
    for a row that is not a JSON object."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {n} is not valid JSON ({e.msg}); rerun `rbkd study run` on the "
                "folder to rebuild it"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n} is not a JSON object")
        rows.append(row)
    return rows


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None for one value, n) of the finite values."""
    xs = [float(v) for v in values if _finite(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def format_cell(
    values: Iterable[Any], *, scale: float = 100.0, digits: int = 1, seeds: int = 0
) -> str:
    """ "91.9" for one value, "91.9 ± 1.2" for several (sample std), "–" for none; " (n=2)" is
    added when fewer values than the study's `seeds` are there yet."""
    m, s, n = mean_std(values)
    if m is None:
        return DASH
    text = f"{m * scale:.{digits}f}"
    if s is not None:
        text += f" ± {s * scale:.{digits}f}"
    if seeds > 1 and n < seeds:
        text += f" (n={n})"
    return text


def _key(v: Any) -> Any:
    """A grouping key for a value read from JSON: floats rounded (T = 9 and 9.0 are one)."""
    return round(float(v), 6) if _finite(v) else v


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if _finite(v) else DASH if v is None else str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub Markdown table; `align` per column: "l" or "r" (default: first left, rest right)."""
    header = [_md_escape(h) for h in header]
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); rerun `rbkd study run`") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} does not hold a study (a JSON object); rerun `rbkd study run`")
    return StudyOutput(
        folder, spec, read_jsonl(folder / "teachers.jsonl"), read_jsonl(folder / "results.jsonl")
    )


# ------------------------------------------------------------------ the report being written
@dataclass
class _Report:
    study: StudyOutput
    out: Path
    fmt: str
    labels: Mapping[str, str]
    data_dir: Path | None
    lines: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
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

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> None:
        self.lines += [markdown_table(header, rows, align), ""]

    def figure(self, stem: str, draw: Callable[[Path], Any], caption: str) -> None:
        """Draw a figure into out/<stem>.<fmt> and link it (inline for PNG and SVG)."""
        path = self.out / f"{_slug(stem)}.{self.fmt}"
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


# ------------------------------------------------------------------ helpers on rows
def _teacher_order(study: StudyOutput, names: Iterable[str | None]) -> list[str]:
    declared = [t.get("name") for t in study.spec.get("teachers") or []]
    declared += [t.get("name") for t in study.teachers]
    present = {n for n in names if n is not None}
    ordered = [n for n in dict.fromkeys(declared) if n in present]
    return ordered + sorted(present - set(ordered))


def headline_T(study: StudyOutput) -> float:
    """The T of the single-temperature figures: the examples' T, else the batch sweep's, else 9
    (the thesis's) when the study uses it, else the study's first T."""
    exps = study.experiments
    for name in ("examples", "batch_sweep"):
        if _finite((exps.get(name) or {}).get("T")):
            return float(exps[name]["T"])
    temps = [float(t) for t in (study.spec.get("loss") or {}).get("T") or [] if _finite(t)]
    if 9.0 in temps or not temps:
        return 9.0
    return temps[0]


def entropy_at(teacher: Mapping, T: float) -> float | None:
    """A teacher row's mean train-split entropy at T (interpolated between stored temperatures
    when T is not one of them; None outside their range)."""
    temps, values = teacher.get("entropy_T") or [], teacher.get("mean_entropy") or []
    pts = sorted(
        (float(t), float(v))
        for t, v in zip(temps, values, strict=False)
        if _finite(t) and _finite(v)
    )
    for t, v in pts:
        if abs(t - T) < 1e-9:
            return v
    for (t0, v0), (t1, v1) in zip(pts, pts[1:], strict=False):
        if t0 < T < t1:
            return v0 + (v1 - v0) * (T - t0) / (t1 - t0)
    return None


def _ls_factors(study: StudyOutput) -> list[float]:
    exps = study.experiments
    for name in ("entropy", "missing_class", "noise"):
        factors = [
            float(a) for a in (exps.get(name) or {}).get("label_smoothing") or [] if _finite(a)
        ]
        if factors:
            return sorted(set(factors))
    return list(DEFAULT_LS_FACTORS)


def _ls_band(study: StudyOutput, num_classes: int):
    from rbkd.analysis.plots import Band

    factors = _ls_factors(study)
    lo, hi = min(factors), max(factors)
    label = f"label smoothing, A = {lo:g}" if lo == hi else f"label smoothing, A = {lo:g}–{hi:g}"
    return Band(
        label_smoothing_entropy(lo, num_classes), label_smoothing_entropy(hi, num_classes), label
    )


def _is_clean(row: Mapping) -> bool:
    """A student distilled on the whole transfer set: no excluded class, no subset, no noise."""
    return (
        row.get("missing_class") is None
        and row.get("per_class") is None
        and row.get("noise") is None
    )


def _variants(rows: Sequence[Mapping], keys: Sequence[str]) -> list[str]:
    """The keys among `keys` whose value differs between rows (named in titles)."""
    return [k for k in keys if len({json.dumps(r.get(k)) for r in rows}) > 1]


def _variant_name(row: Mapping, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={_num(row.get(k))}" for k in keys)


# ------------------------------------------------------------------ sections
def _section_header(rep: _Report) -> None:
    s = rep.study
    spec = s.spec
    loss = spec.get("loss") or {}
    limit = spec.get("limit")
    seeds = spec.get("seeds") or []
    rep.lines += [f"# {spec.get('name') or s.folder.name}: reproduction report", ""]
    if spec.get("description"):
        rep.text(str(spec["description"]))
    facts = [
        f"**Dataset:** {rep.data_title}"
        + (f" (first {limit} examples of each split)" if limit else " (full splits)"),
        f"**Student seeds:** {', '.join(map(str, seeds)) or DASH}",
        f"**Loss:** T ∈ {{{', '.join(_num(t) for t in loss.get('T') or [])}}}, "
        f"alpha = {_num(loss.get('alpha'))}, t_squared = {str(loss.get('t_squared')).lower()}",
        f"**Rows:** {_count(len(s.teachers), 'teacher')} (teachers.jsonl), "
        f"{_count(len(s.results), 'student')} (results.jsonl)",
    ]
    rep.text(" · ".join(facts))
    rep.text(
        "Accuracies are in percent of the test split. With several seeds a cell shows mean ± "
        'sample standard deviation (n − 1) over the seeds; "(n=k)" marks a cell with fewer '
        "seeds than the study declares (still running). Entropies are in nats, of the teacher's "
        f"soft labels on the training split. Single-temperature figures use T = {headline_T(s):g}."
    )


def _section_teachers(rep: _Report) -> None:
    rep.heading("Teachers")
    study = rep.study
    T = headline_T(study)
    rows = [t for t in study.teachers if t.get("role", "teacher") == "teacher"]
    if not rows:
        rep.skip("teachers.jsonl has no study teacher yet")
        return
    rep.table(
        [
            "teacher",
            "capacity",
            "batch size",
            "epochs",
            "lr",
            "seed",
            "test accuracy",
            f"mean entropy at T={T:g}",
            "wall time (s)",
        ],
        [
            [
                rep.name(t.get("name")),
                t.get("capacity", DASH),
                _num(t.get("batch_size")),
                _num(t.get("epochs")),
                _num(t.get("lr")),
                _num(t.get("seed")),
                format_cell([t.get("test_accuracy")]),
                _fmt_entropy(entropy_at(t, T)),
                _fmt_seconds(t.get("wall_time_s")),
            ]
            for t in rows
        ],
        "llrrrrrrr",
    )


def _fmt_entropy(v: float | None) -> str:
    return f"{v:.4f}" if _finite(v) else DASH


def _fmt_seconds(v: Any) -> str:
    return f"{v:.0f}" if _finite(v) else DASH


def _missing_class_table(
    rep: _Report,
    rows: list[dict],
    column_key: str,
    column_title: Callable[[float], str],
    title: str,
    stem: str,
    axis_label: str,
) -> None:
    """One thesis-style table: missing class (rows) x column_key (T or A), cells the missing
    class's accuracy over seeds; Markdown plus an annotated heatmap."""
    names = rep.study.class_names
    classes = sorted({int(r["missing_class"]) for r in rows})
    columns = sorted({_key(r.get(column_key)) for r in rows if _finite(r.get(column_key))})
    cells: dict[tuple[int, Any], list] = defaultdict(list)
    for r in rows:
        cells[(int(r["missing_class"]), _key(r.get(column_key)))].append(
            r.get("missing_class_accuracy")
        )
    seeds = rep.seeds("missing_class")

    def label(k: int) -> str:
        return names[k] if k < len(names) else str(k)

    rep.lines += [f"**{title}**", ""]
    rep.table(
        ["missing class", *[column_title(c) for c in columns]],
        [[label(k), *[format_cell(cells[(k, c)], seeds=seeds) for c in columns]] for k in classes],
    )
    means, stds = [], []
    for k in classes:
        stats = [mean_std(cells[(k, c)]) for c in columns]
        means.append([m * 100 if m is not None else None for m, _, _ in stats])
        stds.append([s * 100 if s is not None else None for _, s, _ in stats])
    from rbkd.analysis.plots import plot_table_heatmap

    rep.figure(
        stem,
        lambda p: plot_table_heatmap(
            p,
            means,
            [label(k) for k in classes],
            [column_title(c) for c in columns],
            stds=stds if any(s is not None for row in stds for s in row) else None,
            title=title,
            xlabel=axis_label,
            ylabel="missing class",
            colorbar_label="accuracy (%)",
        ),
        title,
    )


_KD_VARIANTS = ("student", "alpha", "t_squared", "epochs")


def _section_missing_class(rep: _Report) -> None:
    rep.heading("Missing class (tables 5.1-5.7)")
    study = rep.study
    exp = study.experiments.get("missing_class")
    rows = [r for r in study.rows("missing_class") if r.get("missing_class") is not None]
    rows = [r for r in rows if r.get("noise") is None and r.get("per_class") is None]
    if exp is None and not rows:
        rep.skip("the study has no missing_class experiment")
        return
    if not rows:
        rep.skip("results.jsonl has no missing-class student yet")
        return
    rep.text(
        "Each cell: accuracy of the student on the one class it never saw during distillation "
        "(every example of that class removed from the transfer set). It can only learn that "
        "class from the similarity information in the soft labels of the others."
    )
    # one table per teacher and per setting that varies (the loss convention does not apply to
    # label smoothing, which has no KD term)
    kd_keys = _variants([r for r in rows if r.get("teacher") is not None], _KD_VARIANTS)
    ls_keys = _variants([r for r in rows if r.get("teacher") is None], ("student", "epochs"))

    def variant_keys(teacher: str | None) -> list[str]:
        return ls_keys if teacher is None else kd_keys

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        keys = variant_keys(r.get("teacher"))
        groups[(r.get("teacher"), tuple(json.dumps(r.get(k)) for k in keys))].append(r)
    teachers = _teacher_order(study, [t for t, _ in groups])
    order = [(t, v) for t in teachers for (tt, v) in groups if tt == t]
    order += [(None, v) for (tt, v) in groups if tt is None]
    for teacher, variant in order:
        group = groups[(teacher, variant)]
        extra = _variant_name(group[0], variant_keys(teacher))
        suffix = f" ({extra})" if extra else ""
        if teacher is None:
            ls = [r for r in group if r.get("label_smoothing") is not None]
            if not ls:
                continue
            _missing_class_table(
                rep,
                ls,
                "label_smoothing",
                lambda a: f"A={a:g}",
                f"{rep.data_title}, label smoothing{suffix}: accuracy (%) on the missing class",
                f"missing_class_label_smoothing{'_' + extra if extra else ''}",
                "smoothing factor A",
            )
            continue
        _missing_class_table(
            rep,
            group,
            "T",
            lambda t: f"T={t:g}",
            f"{rep.data_title}, teacher {rep.name(teacher)}{suffix}: accuracy (%) on the missing "
            "class",
            f"missing_class_{teacher}{'_' + extra if extra else ''}",
            "temperature T",
        )


def _entropy_table_dict(t: Mapping) -> dict:
    return {
        "temperatures": [float(x) for x in t.get("entropy_T") or []],
        "mean_entropy": t.get("mean_entropy") or [],
        "per_class_entropy": t.get("per_class_entropy") or [],
    }


def _section_entropy(rep: _Report) -> None:
    rep.heading("Soft-label entropy vs temperature (figures 5.1-5.4)")
    study = rep.study
    teachers = [t for t in study.teachers if t.get("role", "teacher") == "teacher"]
    teachers = [t for t in teachers if t.get("entropy_T") and t.get("mean_entropy")]
    if not teachers:
        rep.skip("teachers.jsonl has no study teacher with entropies yet")
        return
    from rbkd.analysis.plots import (
        CLASS_COLORS,
        Reference,
        Series,
        plot_entropy_curves,
        plot_series,
    )

    names = study.class_names
    c = len(teachers[0].get("per_class_accuracy") or names) or len(names)
    band = _ls_band(study, c)
    ln_c = math.log(c)
    factors = _ls_factors(study)
    rep.text(
        "Mean entropy of each teacher's soft labels on the training split. The shaded band is "
        f"the entropy of label-smoothed targets for A = {', '.join(f'{a:g}' for a in factors)} "
        "(they do not depend on T; thesis figure 5.1); the dotted line is ln C, the entropy of "
        "the uniform distribution. A teacher near the band carries about as little similarity "
        "information as label smoothing."
    )
    curves = {t["name"]: _entropy_table_dict(t) for t in teachers}
    rep.figure(
        "entropy_vs_T",
        lambda p: plot_entropy_curves(
            p,
            curves,
            per_class=False,
            band=band,
            max_entropy=ln_c,
            labels=rep.labels,
            title=f"{rep.data_title}: soft-label entropy vs temperature",
        ),
        f"{rep.data_title}: mean soft-label entropy of each teacher against T",
    )
    loss_T = [float(t) for t in (study.spec.get("loss") or {}).get("T") or [] if _finite(t)]
    all_T = sorted({float(x) for t in teachers for x in t.get("entropy_T") or []})
    shown = [T for T in all_T if T in {1.0, headline_T(study), 20.0, *loss_T}] or all_T
    rep.table(
        ["T", *[rep.name(t["name"]) for t in teachers]],
        [[f"{T:g}", *[_fmt_entropy(entropy_at(t, T)) for t in teachers]] for T in shown],
    )
    rep.table(
        ["label smoothing A", "entropy (nats)"],
        [[f"{a:g}", f"{label_smoothing_entropy(a, c):.4f}"] for a in factors]
        + [["ln C", f"{ln_c:.4f}"]],
    )
    grid = sorted({i / 20 for i in range(21)} | set(factors))
    rep.figure(
        "label_smoothing_entropy",
        lambda p: plot_series(
            p,
            [
                Series(
                    "label-smoothed targets",
                    grid,
                    [label_smoothing_entropy(a, c) for a in grid],
                    marker="",
                ),
                Series(
                    "the study's A",
                    factors,
                    [label_smoothing_entropy(a, c) for a in factors],
                    linestyle="none",
                    color="tab:red",
                ),
            ],
            xlabel="smoothing factor A",
            ylabel="entropy (nats)",
            title=f"{rep.data_title}: entropy of label-smoothed targets ({c} classes)",
            references=[Reference(ln_c, f"ln C = {ln_c:.3f}")],
        ),
        f"{rep.data_title}: entropy of (1 - A) onehot + A / C against A (thesis figure 5.1)",
    )
    for t in teachers:
        per_class = t.get("per_class_entropy") or []
        temps = [float(x) for x in t.get("entropy_T") or []]
        if not per_class or len(per_class) != len(temps):
            continue
        series = [
            Series(
                names[k] if k < len(names) else str(k),
                temps,
                [row[k] for row in per_class],
                color=CLASS_COLORS[k % len(CLASS_COLORS)],
                marker="",
                linewidth=1.5,
            )
            for k in range(len(per_class[0]))
        ]
        series.append(
            Series("mean", temps, t.get("mean_entropy") or [], color="black", linewidth=3)
        )
        rep.figure(
            f"entropy_per_class_{t['name']}",
            lambda p, series=series, t=t: plot_series(
                p,
                series,
                xlabel="temperature T",
                ylabel="mean soft-label entropy (nats)",
                title=f"{rep.data_title}, teacher {rep.name(t['name'])}: entropy per class",
                references=[Reference(ln_c, f"ln C = {ln_c:.3f}")],
            ),
            f"{rep.data_title}, teacher {rep.name(t['name'])}: entropy per class against T",
        )


def _section_hypothesis(rep: _Report) -> None:
    rep.heading("Entropy form of the soft-label hypothesis (figures 5.15 / 6.8)")
    study = rep.study
    T = headline_T(study)
    teachers = [t for t in study.teachers if t.get("role", "teacher") == "teacher"]
    sweep = sorted(
        (t for t in study.teachers if t.get("role") == "sweep"),
        key=lambda t: (t.get("epochs") or 0, t.get("batch_size") or 0),
    )
    shown = {t.get("key") for t in teachers}
    sweep = [t for t in sweep if t.get("key") is None or t.get("key") not in shown]  # same run
    teachers = [t for t in teachers + sweep if entropy_at(t, T) is not None]
    if not teachers:
        rep.skip(f"no teacher in teachers.jsonl has its entropy at T={T:g} yet")
        return
    rows = [r for r in study.rows("missing_class") if r.get("missing_class") is not None]
    rows = [r for r in rows if r.get("teacher") is not None and r.get("noise") is None]
    accs: list[float | None] = []
    basis = {}
    for t in teachers:
        mine = [r for r in rows if r.get("teacher") == t["name"]]
        at_T = [r for r in mine if _finite(r.get("T")) and abs(float(r["T"]) - T) < 1e-9]
        use = at_T or mine
        m, _, n = mean_std(r.get("missing_class_accuracy") for r in use)
        accs.append(m * 100 if m is not None else None)
        basis[t["name"]] = (
            f"T={T:g}, {n} students" if at_T else f"all T, {n} students" if use else DASH
        )
    c = len(study.class_names)
    band = _ls_band(study, c)
    names = [rep.name(t["name"]) for t in teachers]
    entropies = [entropy_at(t, T) for t in teachers]
    rep.text(
        f"Each teacher's mean soft-label entropy at T = {T:g} against the label-smoothing band. "
        "The hypothesis: near the band, distillation behaves like label smoothing (a class the "
        "student never saw stays unlearnt); well above it, like RBKD. Diamonds: the mean "
        "accuracy of the teacher's students on their missing class, where the study has them."
    )
    rep.figure(
        "entropy_hypothesis",
        lambda p: plot_entropy_hypothesis_(p, names, entropies, T, band, c, accs, rep),
        f"{rep.data_title}: entropy at T={T:g} per teacher against the label-smoothing band",
    )
    ls_rows = [
        r
        for r in study.rows("missing_class")
        if r.get("teacher") is None and r.get("missing_class") is not None
    ]
    table_rows = [
        [
            n,
            t.get("role", "teacher"),
            _num(t.get("batch_size")),
            _num(t.get("epochs")),
            _fmt_entropy(e),
            DASH if a is None else f"{a:.1f}",
            basis[t["name"]],
        ]
        for n, t, e, a in zip(names, teachers, entropies, accs, strict=True)
    ]
    if ls_rows:
        table_rows.append(
            [
                f"label smoothing ({band.label.split(', ')[-1]})",
                DASH,
                DASH,
                DASH,
                f"{band.low:.4f}–{band.high:.4f}",
                format_cell(r.get("missing_class_accuracy") for r in ls_rows).split(" ±")[0],
                f"{len(ls_rows)} students",
            ]
        )
    rep.table(
        [
            "teacher",
            "role",
            "batch size",
            "epochs",
            f"entropy at T={T:g}",
            "missing-class accuracy (%)",
            "from",
        ],
        table_rows,
        "llrrrrl",
    )


def plot_entropy_hypothesis_(path, names, entropies, T, band, c, accs, rep):
    from rbkd.analysis.plots import plot_entropy_hypothesis

    return plot_entropy_hypothesis(
        path,
        names,
        entropies,
        T=T,
        band=band,
        max_entropy=math.log(c),
        accuracies=accs if any(a is not None for a in accs) else None,
        title=f"{rep.data_title}: entropy form of the soft-label hypothesis (T={T:g})",
    )


def _section_transfer_set(rep: _Report) -> None:
    rep.heading("Entropy-selected transfer sets (figures 5.5, 5.8, 6.6)")
    study = rep.study
    exp = study.experiments.get("transfer_set")
    rows = [r for r in study.rows("transfer_set") if r.get("per_class") is not None]
    rows = [r for r in rows if r.get("missing_class") is None and r.get("noise") is None]
    if exp is None and not rows:
        rep.skip("the study has no transfer_set experiment")
        return
    if not rows:
        rep.skip("results.jsonl has no transfer-set student yet")
        return
    from rbkd.analysis.plots import Reference, Series, color, plot_series

    rep.text(
        "Student test accuracy against the number of training examples per class kept in the "
        "transfer set: the N whose soft labels have the highest entropy at T (solid) or N at "
        "random (dashed). Shaded: ± one standard deviation over seeds. Dotted: the same student "
        "distilled by the same teacher at the same T on the whole transfer set."
    )
    seeds = rep.seeds("transfer_set")
    for T in sorted({_key(r.get("T")) for r in rows}, key=lambda v: (v is None, v)):
        at_T = [r for r in rows if _key(r.get("T")) == T]
        teachers = _teacher_order(study, [r.get("teacher") for r in at_T])
        selects = [s for s in ("entropy", "random") if any(r.get("select") == s for r in at_T)]
        sizes = sorted({int(r["per_class"]) for r in at_T})
        series, refs, columns, cells = [], [], [], {}
        for i, teacher in enumerate(teachers):
            mine = [r for r in at_T if r.get("teacher") == teacher]
            for sel in selects:
                by_n = {
                    n: [
                        r.get("test_accuracy")
                        for r in mine
                        if r.get("select") == sel and int(r["per_class"]) == n
                    ]
                    for n in sizes
                }
                if not any(by_n.values()):
                    continue
                stats = {n: mean_std(v) for n, v in by_n.items() if v}
                xs = [n for n in sizes if n in stats and stats[n][0] is not None]
                series.append(
                    Series(
                        f"{rep.name(teacher)}, {sel}",
                        xs,
                        [stats[n][0] * 100 for n in xs],
                        err=[(stats[n][1] or 0.0) * 100 for n in xs],
                        color=color(i),
                        linestyle="-" if sel == "entropy" else "--",
                    )
                )
                columns.append(f"{rep.name(teacher)}, {sel}")
                for n in sizes:
                    cells[(columns[-1], n)] = format_cell(by_n[n], seeds=seeds)
            students = {r.get("student") for r in mine}
            full = [
                r
                for r in study.results
                if r.get("teacher") == teacher
                and _key(r.get("T")) == T
                and r.get("student") in students
                and _is_clean(r)
                and r.get("label_smoothing") is None
            ]
            m, s, n = mean_std(r.get("test_accuracy") for r in full)
            if m is not None:
                refs.append(Reference(m * 100, f"{rep.name(teacher)}, all data", color(i), ":"))
                # the full-data student fills the last row ("all") of this teacher's columns
                for sel in selects:
                    cells[(f"{rep.name(teacher)}, {sel}", "all")] = format_cell(
                        [r.get("test_accuracy") for r in full], seeds=seeds
                    )
        t_text = f"T={T:g}" if _finite(T) else "T unset"
        rep.figure(
            f"transfer_set_T{T:g}" if _finite(T) else "transfer_set",
            lambda p, series=series, refs=refs, t_text=t_text, sizes=sizes: plot_series(
                p,
                series,
                xlabel="training examples per class",
                ylabel="student test accuracy (%)",
                title=f"{rep.data_title}: student accuracy vs transfer-set size ({t_text})",
                logx=len(sizes) > 1 and sizes[0] > 0 and sizes[-1] / sizes[0] >= 8,
                references=refs,
            ),
            f"{rep.data_title}: transfer-set size against student accuracy, {t_text}",
        )
        rep.table(
            ["examples per class", *columns],
            [[str(n), *[cells.get((col, n), DASH) for col in columns]] for n in [*sizes, "all"]],
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _epochs(e: int) -> str:
    return f"{e} epoch" if e == 1 else f"{e} epochs"


def _sweep_value(t: Mapping, T: float) -> float | None:
    return entropy_at(t, T)


def _section_batch_sweep(rep: _Report) -> None:
    rep.heading("Teacher entropy vs batch size and epochs (figures 6.2-6.4)")
    study = rep.study
    exp = study.experiments.get("batch_sweep")
    sweep = [t for t in study.teachers if t.get("role") == "sweep"]
    if exp is None and not sweep:
        rep.skip("the study has no batch_sweep experiment")
        return
    if not sweep:
        rep.skip("teachers.jsonl has no batch-sweep teacher yet")
        return
    from rbkd.analysis.plots import Reference, Series, color, plot_entropy_curves, plot_series

    T = float((exp or {}).get("T") or headline_T(study))
    batches = sorted({int(t["batch_size"]) for t in sweep})
    epochs = sorted({int(t["epochs"]) for t in sweep})
    grid = {(int(t["batch_size"]), int(t["epochs"])): t for t in sweep}
    capacity = (exp or {}).get("capacity") or sweep[0].get("capacity") or ""
    smalls = [
        t
        for t in study.teachers
        if t.get("role", "teacher") == "teacher" and t.get("capacity") == "small"
    ]
    refs = [
        Reference(v, f"{rep.name(t['name'])} (small teacher)", "black", "--")
        for t in smalls
        if (v := entropy_at(t, T)) is not None
    ]
    rep.text(
        f"The {capacity} teacher trained at every batch size and number of epochs of the sweep; "
        f"mean entropy of its soft labels on the training split at T = {T:g}. Dashed: the "
        "study's small teacher, where it has one."
    )

    def line(points: dict[int, float | None]) -> tuple[list[int], list[float]]:
        xs = [x for x, v in points.items() if v is not None]
        return xs, [points[x] for x in xs]

    by_batch = []
    for i, e in enumerate(epochs):
        xs, ys = line({b: _sweep_value(grid[(b, e)], T) for b in batches if (b, e) in grid})
        by_batch.append(Series(_epochs(e), xs, ys, color=color(i + 1)))
    by_epochs = []
    for i, b in enumerate(batches):
        xs, ys = line({e: _sweep_value(grid[(b, e)], T) for e in epochs if (b, e) in grid})
        by_epochs.append(Series(f"batch {b}", xs, ys, color=color(i + 1)))
    ylabel = f"mean soft-label entropy at T={T:g} (nats)"
    what = f"{rep.data_title}, {capacity} teacher"
    rep.figure(
        "sweep_entropy_vs_batch_size",
        lambda p: plot_series(
            p,
            by_batch,
            xlabel="teacher batch size",
            ylabel=ylabel,
            title=f"{what}: entropy vs batch size",
            logx=len(batches) > 1,
            references=refs,
        ),
        f"{what}: soft-label entropy against pre-training batch size",
    )
    rep.figure(
        "sweep_entropy_vs_epochs",
        lambda p: plot_series(
            p,
            by_epochs,
            xlabel="teacher epochs",
            ylabel=ylabel,
            title=f"{what}: entropy vs epochs",
            references=refs,
        ),
        f"{what}: soft-label entropy against pre-training epochs",
    )
    # figure 6.4: entropy vs T of the sweep at its longest training, the small teacher in bold
    e_max = epochs[-1]
    curves = {t["name"]: _entropy_table_dict(t) for t in smalls if t.get("entropy_T")}
    names = {t["name"]: f"{rep.name(t['name'])} (small teacher)" for t in smalls}
    for b in batches:
        t = grid.get((b, e_max))
        if t is not None and t.get("entropy_T"):
            curves[t["name"]] = _entropy_table_dict(t)
            names[t["name"]] = f"{capacity}, batch {b}, {e_max} epochs"
    c = len(study.class_names)
    if curves:
        rep.figure(
            "sweep_entropy_vs_T",
            lambda p: plot_entropy_curves(
                p,
                curves,
                per_class=False,
                band=_ls_band(study, c),
                max_entropy=math.log(c),
                labels={**names, **rep.labels},
                bold=[t["name"] for t in smalls],
                title=f"{what}, {e_max} epochs: entropy vs T by batch size",
            ),
            f"{what}: entropy against T for each batch size ({e_max} epochs)",
        )
    rep.lines += [f"**Mean entropy at T={T:g} (nats); rows: batch size, columns: epochs**", ""]
    rep.table(
        ["batch size", *[_epochs(e) for e in epochs]],
        [
            [
                str(b),
                *[
                    _fmt_entropy(_sweep_value(grid[(b, e)], T)) if (b, e) in grid else DASH
                    for e in epochs
                ],
            ]
            for b in batches
        ],
    )
    rep.lines += ["**Teacher test accuracy (%)**", ""]
    rep.table(
        ["batch size", *[_epochs(e) for e in epochs]],
        [
            [
                str(b),
                *[
                    format_cell([grid[(b, e)].get("test_accuracy")]) if (b, e) in grid else DASH
                    for e in epochs
                ],
            ]
            for b in batches
        ],
    )


def _section_temperature(rep: _Report) -> None:
    rep.heading("Student accuracy vs temperature (figure 6.5)")
    study = rep.study
    exp = study.experiments.get("temperature")
    rows = [r for r in study.rows("temperature") if r.get("teacher") is not None and _is_clean(r)]
    rows = [r for r in rows if _finite(r.get("T"))]
    if exp is None and not rows:
        rep.skip("the study has no temperature experiment")
        return
    if not rows:
        rep.skip("results.jsonl has no temperature-sweep student yet")
        return
    from rbkd.analysis.plots import Series, color, plot_series

    seeds = rep.seeds("temperature")
    students = sorted({str(r.get("student")) for r in rows})
    temps = sorted({_key(r["T"]) for r in rows})
    teachers = _teacher_order(study, [r.get("teacher") for r in rows])
    series, columns, cells = [], [], {}
    for i, teacher in enumerate(teachers):
        for student in students:
            mine = [
                r for r in rows if r.get("teacher") == teacher and str(r.get("student")) == student
            ]
            if not mine:
                continue
            name = rep.name(teacher) + (f" → {student}" if len(students) > 1 else "")
            by_T = {T: [r.get("test_accuracy") for r in mine if _key(r["T"]) == T] for T in temps}
            stats = {T: mean_std(v) for T, v in by_T.items() if v}
            xs = [T for T in temps if T in stats and stats[T][0] is not None]
            series.append(
                Series(
                    name,
                    xs,
                    [stats[T][0] * 100 for T in xs],
                    err=[(stats[T][1] or 0.0) * 100 for T in xs],
                    color=color(i),
                )
            )
            columns.append(name)
            for T in temps:
                cells[(name, T)] = format_cell(by_T[T], seeds=seeds)
    rep.text(
        f"Test accuracy of the {' and '.join(students)} student distilled by each teacher at each "
        "T, on the whole transfer set (mean ± std over seeds)."
    )
    rep.figure(
        "student_accuracy_vs_T",
        lambda p: plot_series(
            p,
            series,
            xlabel="temperature T",
            ylabel="student test accuracy (%)",
            title=f"{rep.data_title}: {'/'.join(students)} student accuracy vs temperature",
        ),
        f"{rep.data_title}: student accuracy against T for each teacher",
    )
    rep.table(["T", *columns], [[f"{T:g}", *[cells[(c, T)] for c in columns]] for T in temps])


def _section_examples(rep: _Report) -> None:
    rep.heading("Highest-entropy training images (figures 5.6-5.13)")
    exp = rep.study.experiments.get("examples")
    if not exp:
        rep.skip("the study has no examples experiment")
        return
    from rbkd.analysis.examples import plot_top_entropy_examples, teacher_examples

    T, count = float(exp.get("T", 9.0)), int(exp.get("count", 10))
    rep.text(
        f"The {count} training images of each class whose soft labels have the highest entropy "
        f"at T = {T:g}, highest first; the caption gives the entropy and, where the teacher's "
        "own prediction differs from the label, the class it predicts."
    )
    names = rep.study.class_names
    for teacher in exp.get("teachers") or []:
        try:
            found = teacher_examples(
                rep.run_dir(teacher),
                T,
                count,
                data_dir=rep.data_dir,
                limit=rep.study.spec.get("limit"),
            )
        except Exception as e:  # the data or the run is not here: say so, write the rest
            rep.skip(f"teacher {rep.name(teacher)}: {' '.join(str(e).split())}")
            continue
        title = (
            f"{rep.data_title}, teacher {rep.name(teacher)}: top {count} highest-entropy "
            f"training images per class (T={T:g})"
        )
        rep.figure(
            f"examples_{teacher}",
            lambda p, found=found, title=title: plot_top_entropy_examples(
                p, found, title=title, class_names=names
            ),
            title,
        )
        rep.table(
            ["class", "mean entropy of these (nats)", "teacher predicts another class"],
            [
                [
                    names[k] if k < len(names) else str(k),
                    _fmt_entropy(statistics.fmean(hs)) if hs else DASH,
                    f"{sum(p != k for p in preds)} of {len(preds)}",
                ]
                for k, (hs, preds) in enumerate(
                    zip(found.entropies, found.predictions, strict=True)
                )
            ],
            "lrr",
        )


def _section_projection(rep: _Report) -> None:
    rep.heading("Penultimate-layer projections (figures 5.14 / 6.7)")
    exp = rep.study.experiments.get("projection")
    if not exp:
        rep.skip("the study has no projection experiment")
        return
    from rbkd.analysis.plots import ProjectionPanel, plot_projections
    from rbkd.analysis.projection import project_model
    from rbkd.engine import load_run

    classes = [int(k) for k in exp.get("classes") or [0, 1, 2]]
    per_class = int(exp.get("per_class") or 100)
    names = rep.study.class_names
    panels, spreads = [], []
    for teacher in exp.get("teachers") or []:
        try:
            model, _ = load_run(rep.run_dir(teacher))
            proj = project_model(model, rep.dataset("test"), classes, per_class=per_class, seed=0)
        except Exception as e:  # the data or the run is not here: say so, write the rest
            rep.skip(f"teacher {rep.name(teacher)}: {' '.join(str(e).split())}")
            continue
        t = rep.study.teacher(teacher) or {}
        detail = ", ".join(
            x
            for x in (
                t.get("capacity"),
                t.get("batch_size") and f"batch {t['batch_size']}",
                t.get("epochs") and f"{t['epochs']} epochs",
            )
            if x
        )
        panels.append(
            ProjectionPanel(
                f"{rep.name(teacher)}" + (f" ({detail})" if detail else ""),
                proj.coords.tolist(),
                proj.labels.tolist(),
                proj.template_coords.tolist(),
            )
        )
        spreads.append([rep.name(teacher), *[_fmt_entropy(proj.spread[k]) for k in classes]])
    if not panels:
        return
    rep.text(
        f"Penultimate-layer activations of {per_class} test images of each of "
        f"{', '.join(names[k] if k < len(names) else str(k) for k in classes)}, projected onto "
        "the plane through the three class templates (rows of the final layer; Müller et al. "
        "2019). Broad clusters keep similarity information between classes, tight ones lose it. "
        "Spread: mean distance of a class's points to their centre over the mean distance "
        "between the centres."
    )
    rep.figure(
        "projections",
        lambda p: plot_projections(
            p,
            panels,
            classes,
            class_names=names,
            title=f"{rep.data_title}: penultimate-layer projections",
        ),
        f"{rep.data_title}: penultimate-layer projections per teacher",
    )
    rep.table(
        ["teacher", *[f"spread of {names[k] if k < len(names) else k}" for k in classes]], spreads
    )


def _section_noise(rep: _Report) -> None:
    rep.heading("Noise in soft labels (section 4.8)")
    study = rep.study
    exp = study.experiments.get("noise")
    noisy = [r for r in study.rows("noise") if r.get("noise") is not None]
    if exp is None and not noisy:
        rep.skip("the study has no noise experiment")
        return
    if not noisy:
        rep.skip("results.jsonl has no noisy-soft-label student yet")
        return
    seeds = rep.seeds("noise")

    def source(r: Mapping) -> tuple:
        """What the soft labels come from, with T, student and the loss convention."""
        teacher = r.get("teacher")
        return (
            teacher,
            _key(r.get("label_smoothing")) if teacher is None else None,
            _key(r.get("T")) if teacher is not None else None,
            str(r.get("student")),
            _key(r.get("alpha")) if teacher is not None else None,
            r.get("t_squared") if teacher is not None else None,
        )

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in noisy:
        groups[source(r)].append(r)
    # the same student without noise, from whichever experiment ran it
    clean: dict[tuple, list[dict]] = defaultdict(list)
    for r in study.results:
        if _is_clean(r) and source(r) in groups:
            clean[source(r)].append(r)
    noises = sorted({str(r["noise"]) for r in noisy})
    columns = ["no noise", *noises]
    teachers = _teacher_order(study, [k[0] for k in groups])
    order = sorted(
        groups,
        key=lambda k: (
            k[0] is None,
            teachers.index(k[0]) if k[0] in teachers else 0,
            str(k[1]),
            str(k[2]),
            k[3],
        ),
    )
    rep.text(
        "Student test accuracy when noise is added to the soft labels at every epoch (thesis "
        "eq. 4.4), next to the same student without noise (any run of the study with the same "
        "soft labels, T and student on the whole transfer set): artificial variance is no "
        "substitute for the teacher's similarity information."
    )
    table_rows = []
    for k in order:
        teacher, ls, T, student = k[:4]
        name = rep.name(teacher) if teacher is not None else f"label smoothing A={_num(ls)}"
        cells = [format_cell([r.get("test_accuracy") for r in clean.get(k, [])], seeds=seeds)]
        cells += [
            format_cell(
                [r.get("test_accuracy") for r in groups[k] if str(r["noise"]) == n], seeds=seeds
            )
            for n in noises
        ]
        table_rows.append([name, _num(T), student, *cells])
    rep.table(["soft labels", "T", "student", *columns], table_rows, "lrl" + "r" * len(columns))


_SUMMARY_KEYS = (
    "teacher",
    "student",
    "T",
    "label_smoothing",
    "noise",
    "missing_class",
    "per_class",
    "select",
    "alpha",
    "t_squared",
    "epochs",
)


_NUMERIC = {"T", "label_smoothing", "per_class", "alpha", "epochs"}


def _section_summary(rep: _Report) -> None:
    rep.heading("Results by experiment")
    study = rep.study
    present = {e for r in study.results for e in r.get("experiments") or []}
    names = [e for e in EXPERIMENT_ORDER if e in present] + sorted(present - set(EXPERIMENT_ORDER))
    if not names:
        rep.skip("results.jsonl has no student yet")
        return
    rep.text(
        "Every configuration of each experiment, seeds pooled (a student shared by two "
        "experiments appears in both)."
    )
    class_names = study.class_names
    for exp in names:
        rows = study.rows(exp)
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            groups[tuple(json.dumps(_key(r.get(k))) for k in _SUMMARY_KEYS)].append(r)
        shown = [k for k in _SUMMARY_KEYS if len({json.dumps(_key(r.get(k))) for r in rows}) > 1]
        shown = shown or ["teacher"]

        def cell(r: dict, k: str) -> str:
            v = r.get(k)
            if k == "teacher":
                return rep.name(v) if v is not None else "label smoothing"
            if k == "missing_class" and v is not None:
                return class_names[v] if isinstance(v, int) and v < len(class_names) else str(v)
            return _num(v) if not isinstance(v, bool) else str(v).lower()

        order = {
            t: i for i, t in enumerate(_teacher_order(study, [r.get("teacher") for r in rows]))
        }

        def sort_key(r: dict, shown: list = shown, order: dict = order) -> list:
            out = []
            for k in shown:
                v = r.get(k)
                if k == "teacher":
                    out.append((v is None, order.get(v, len(order)), ""))
                elif _finite(v):
                    out.append((False, float(v), ""))
                else:
                    out.append((v is None, 0.0, str(v)))
            return out

        table_rows = [
            [
                *[cell(group[0], k) for k in shown],
                str(len(group)),
                format_cell([r.get("test_accuracy") for r in group]),
                format_cell([r.get("missing_class_accuracy") for r in group]),
            ]
            for group in sorted(groups.values(), key=lambda g: sort_key(g[0]))
        ]
        rep.lines += [
            "<details>",
            f"<summary><b>{exp}</b>: {len(rows)} students, {len(groups)} configurations</summary>",
            "",
        ]
        rep.table(
            [k.replace("_", " ") for k in shown]
            + ["seeds", "test accuracy", "missing-class accuracy"],
            table_rows,
            "".join("r" if k in _NUMERIC else "l" for k in shown) + "rrr",
        )
        rep.lines += ["</details>", ""]


SECTIONS = (  # the thesis's order: chapter 5, then chapter 6
    _section_teachers,
    _section_missing_class,
    _section_entropy,
    _section_transfer_set,
    _section_examples,
    _section_projection,
    _section_hypothesis,
    _section_batch_sweep,
    _section_temperature,
    _section_noise,
    _section_summary,
)


def write_report(
    study_dir: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    fmt: str = "png",
    labels: Mapping[str, str] | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the study's report (report.md and its figures) into `out` (default
    study_dir/report) and return the path of report.md.

    fmt: figure format, png, pdf or svg (PNG and SVG show inline on GitHub, PDF is linked);
    labels: teacher name -> legend name; data_dir: where the dataset is, for the image and
    projection figures (default: $RBKD_DATA and the usual places).
    """
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be png, pdf or svg, got {fmt!r}")
    study = read_study_output(study_dir)
    out = Path(out) if out is not None else study.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    rep = _Report(study, out, fmt, dict(labels or {}), Path(data_dir) if data_dir else None)
    _section_header(rep)
    body_start = len(rep.lines)
    for section in SECTIONS:
        section(rep)
    contents = ["**Contents:** " + " · ".join(f"[{t}](#{_anchor(t)})" for t in rep.sections), ""]
    rep.lines[body_start:body_start] = contents
    text = "\n".join(rep.lines).rstrip() + "\n"
    path = write_bytes(out / REPORT_FILE, text.encode())
    _forget_old_figures(out, [p.name for p in rep.figures])
    return path


def _forget_old_figures(out: Path, figures: list[str]) -> None:
    """Delete the figures an earlier report wrote into `out` that this one did not (a section
    now skipped, another format), so the folder holds exactly what report.md links. Only files
    listed in the manifest are touched: `out` may hold files of the user's."""
    manifest = out / MANIFEST_FILE
    try:
        old = json.loads(manifest.read_text()).get("figures", [])
    except (OSError, ValueError, AttributeError):
        old = []
    for name in set(old) - set(figures):
        if isinstance(name, str) and name == Path(name).name:  # a bare file name, nothing else
            path = out / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
    write_bytes(manifest, (json.dumps({"figures": sorted(figures)}, indent=1) + "\n").encode())
