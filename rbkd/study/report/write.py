"""`write_report`: the sections in the thesis's order into report.md, its figures beside it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from rbkd.io import claim_folder, read_json_file, write_bytes
from rbkd.study.report.document import Report
from rbkd.study.report.entropy import section_entropy, section_hypothesis
from rbkd.study.report.images import section_examples, section_projection
from rbkd.study.report.load import read_study_output
from rbkd.study.report.markdown import anchor
from rbkd.study.report.missing_class import section_missing_class
from rbkd.study.report.noise import section_noise
from rbkd.study.report.overview import section_header, section_teachers
from rbkd.study.report.summary import section_summary
from rbkd.study.report.sweeps import section_batch_sweep, section_temperature
from rbkd.study.report.transfer_set import section_transfer_set

REPORT_FILE = "report.md"
MANIFEST_FILE = ".report-figures.json"  # what the last report wrote (see _forget_old_figures)
FORMATS = ("png", "pdf", "svg")


SECTIONS = (  # the thesis's order: chapter 5, then chapter 6
    section_teachers,
    section_missing_class,
    section_entropy,
    section_transfer_set,
    section_examples,
    section_projection,
    section_hypothesis,
    section_batch_sweep,
    section_temperature,
    section_noise,
    section_summary,
)


def write_report(
    study_dir: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    fmt: str = "png",
    labels: Mapping[str, str] | None = None,
    data_dir: str | os.PathLike | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write the study's report (report.md and its figures) into `out` (default
    study_dir/report) and return the path of report.md.

    fmt: figure format, png, pdf or svg (PNG and SVG show inline on GitHub, PDF is linked);
    labels: teacher name -> legend name; data_dir: where the dataset is, for the image and
    projection figures (default: $RBKD_DATA and the usual places).

    What could not be drawn because an input is not here (a teacher run or the dataset, as in a
    copy of the study folder without its teachers/; matplotlib) is a "Skipped" line in
    report.md and, after it is written, one line each through `warn` (default: stderr), so
    a report that lost its example grids or projections never looks complete.
    """
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be png, pdf or svg, got {fmt!r}")
    from rbkd.study.report.lm_report import is_lm_study_folder, write_lm_report

    if is_lm_study_folder(study_dir):  # a language-model study: its own report
        return write_lm_report(study_dir, out=out, fmt=fmt)
    study = read_study_output(study_dir)
    out = Path(out) if out is not None else study.folder / "report"
    _claim_report_folder(out, study.folder)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST_FILE).exists():  # first: the mark of a folder rbkd's reports own
        write_bytes(out / MANIFEST_FILE, b'{"figures": []}\n')
    rep = Report(study, out, fmt, dict(labels or {}), Path(data_dir) if data_dir else None)
    section_header(rep)
    body_start = len(rep.lines)
    for section in SECTIONS:
        section(rep)
    contents = ["**Contents:** " + " · ".join(f"[{t}](#{anchor(t)})" for t in rep.sections), ""]
    rep.lines[body_start:body_start] = contents
    text = "\n".join(rep.lines).rstrip() + "\n"
    path = write_bytes(out / REPORT_FILE, text.encode())
    _forget_old_figures(out, [p.name for p in rep.figures])
    say = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    for note in rep.omitted:
        say(f"report: left out of {path}: {note}")
    return path


def _claim_report_folder(out: Path, study_folder: Path) -> None:
    """A report goes into the study's own report folder, or into a folder that is new, empty
    or holds an earlier report (its figure list); a folder of the user's is refused (one line)."""
    if os.path.realpath(out.parent) == os.path.realpath(study_folder) and out.name == "report":
        return  # inside the study folder: rbkd's own
    claim_folder(
        out,
        "report",
        recognise=lambda folder: (folder / MANIFEST_FILE).is_file(),
        todo="give --out a new or empty folder (default: STUDY/report)",
    )


def _forget_old_figures(out: Path, figures: list[str]) -> None:
    """Delete the figures an earlier report wrote into `out` that this one did not (a section
    now skipped, another format), so the folder holds exactly what report.md links. Only files
    listed in the manifest are touched: `out` may hold files of the user's."""
    manifest = out / MANIFEST_FILE
    try:
        old = read_json_file(manifest, "figure list").get("figures", [])
    except (OSError, ValueError, AttributeError):
        old = []
    for name in set(old) - set(figures):
        if isinstance(name, str) and name == Path(name).name:  # a bare file name, nothing else
            path = out / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
    write_bytes(manifest, (json.dumps({"figures": sorted(figures)}, indent=1) + "\n").encode())
