"""The report's opening: title and study facts, and the table of teachers."""

from __future__ import annotations

from rbkd.study.report.document import Report
from rbkd.study.report.markdown import (
    DASH,
    fmt_count,
    fmt_entropy,
    fmt_num,
    fmt_seconds,
    format_cell,
)
from rbkd.study.report.rows import entropy_at, headline_T, study_teachers


def section_header(rep: Report) -> None:
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
        f"**Loss:** T ∈ {{{', '.join(fmt_num(t) for t in loss.get('T') or [])}}}, "
        f"alpha = {fmt_num(loss.get('alpha'))}, t_squared = {str(loss.get('t_squared')).lower()}"
        + (
            " (students with unlabelled transfer: alpha = 1, no label in their training loop)"
            if any(r.get("transfer_labels") == "unlabelled" for r in s.results)
            else ""
        ),
        f"**Rows:** {fmt_count(len(s.teachers), 'teacher')} (teachers.jsonl), "
        f"{fmt_count(len(s.results), 'student')} (results.jsonl)",
    ]
    rep.text(" · ".join(facts))
    rep.text(
        "Accuracies are in percent of the test split. With several seeds a cell shows mean ± "
        'sample standard deviation (n − 1) over the seeds; "(n=k)" marks a cell with fewer '
        "seeds than the study declares (still running). Entropies are in nats, of the teacher's "
        f"soft labels on the training split. Single-temperature figures use T = {headline_T(s):g}."
    )


def section_teachers(rep: Report) -> None:
    rep.heading("Teachers")
    study = rep.study
    T = headline_T(study)
    rows = study_teachers(study)
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
                fmt_num(t.get("batch_size")),
                fmt_num(t.get("epochs")),
                fmt_num(t.get("lr")),
                fmt_num(t.get("seed")),
                format_cell([t.get("test_accuracy")]),
                fmt_entropy(entropy_at(t, T)),
                fmt_seconds(t.get("wall_time_s")),
            ]
            for t in rows
        ],
        "llrrrrrrr",
    )
