"""The noise baseline: students on noisy soft labels next to the same students without noise
(section 4.8)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from rbkd.study.report.document import Report
from rbkd.study.report.load import group_key
from rbkd.study.report.markdown import fmt_num, format_cell
from rbkd.study.report.rows import is_clean, loss_label, teacher_order


def section_noise(rep: Report) -> None:
    rep.heading("Noise in soft labels (section 4.8)")
    study = rep.study
    noisy = [r for r in study.rows("noise") if r.get("noise") is not None]
    if rep.skipped("noise", noisy, "results.jsonl has no noisy-soft-label student yet"):
        return
    seeds = rep.seeds("noise")

    def source(r: Mapping) -> tuple:
        """What the soft labels come from, with T, student and the loss convention."""
        teacher = r.get("teacher")
        return (
            teacher,
            group_key(r.get("label_smoothing")) if teacher is None else None,
            group_key(r.get("T")) if teacher is not None else None,
            str(r.get("student")),
            group_key(r.get("alpha")) if teacher is not None else None,
            r.get("t_squared") if teacher is not None else None,
            loss_label(r) if teacher is not None else None,
        )

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in noisy:
        groups[source(r)].append(r)
    # the same student without noise, from whichever experiment ran it
    clean: dict[tuple, list[dict]] = defaultdict(list)
    for r in study.results:
        if is_clean(r) and source(r) in groups:
            clean[source(r)].append(r)
    noises = sorted({str(r["noise"]) for r in noisy})
    columns = ["no noise", *noises]
    teachers = teacher_order(study, [k[0] for k in groups])
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
    losses = {k[6] for k in groups if k[0] is not None}
    table_rows = []
    for k in order:
        teacher, ls, T, student = k[:4]
        name = rep.name(teacher) if teacher is not None else f"label smoothing A={fmt_num(ls)}"
        if teacher is not None and len(losses) > 1:  # a study comparing divergences
            name += f", {k[6]}"
        cells = [format_cell([r.get("test_accuracy") for r in clean.get(k, [])], seeds=seeds)]
        cells += [
            format_cell(
                [r.get("test_accuracy") for r in groups[k] if str(r["noise"]) == n], seeds=seeds
            )
            for n in noises
        ]
        table_rows.append([name, fmt_num(T), student, *cells])
    rep.table(["soft labels", "T", "student", *columns], table_rows, "lrl" + "r" * len(columns))
