"""Missing-class tables: classes x T per teacher and classes x A for label smoothing (thesis
tables 5.1-5.7), as Markdown and as annotated heatmaps; one per divergence when a study compares
divergences, with a summary of the missing class's accuracy per divergence and teacher."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from rbkd.study.report.document import Report
from rbkd.study.report.load import finite, group_key, mean_std
from rbkd.study.report.markdown import class_label, format_cell, slug
from rbkd.study.report.rows import loss_label, teacher_order, variant_name, variants


def _missing_class_table(
    rep: Report,
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
    columns = sorted({group_key(r.get(column_key)) for r in rows if finite(r.get(column_key))})
    cells: dict[tuple[int, Any], list] = defaultdict(list)
    for r in rows:
        cells[(int(r["missing_class"]), group_key(r.get(column_key)))].append(
            r.get("missing_class_accuracy")
        )
    seeds = rep.seeds("missing_class")

    def label(k: int) -> str:
        return class_label(names, k)

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
_LOSS = "_divergence"  # the rows' divergence label, added here for grouping


def _divergence_summary(rep: Report, rows: list[dict], teachers: list[str]) -> None:
    """Divergences (rows) x teacher, class and T (columns): the missing class's accuracy."""
    names = rep.study.class_names
    losses = list(dict.fromkeys(r[_LOSS] for r in rows))
    columns = list(
        dict.fromkeys(
            (t, int(r["missing_class"]), group_key(r.get("T")))
            for t in teachers
            for r in rows
            if r.get("teacher") == t
        )
    )
    cells: dict[tuple, list] = defaultdict(list)
    for r in rows:
        column = (r.get("teacher"), int(r["missing_class"]), group_key(r.get("T")))
        cells[(r[_LOSS], column)].append(r.get("missing_class_accuracy"))
    seeds = rep.seeds("missing_class")
    rep.lines += [f"**{rep.data_title}: accuracy (%) on the missing class, per divergence**", ""]
    rep.table(
        [
            "divergence",
            *[f"{rep.name(t)}, {class_label(names, k)}, T={T:g}" for t, k, T in columns],
        ],
        [[loss, *[format_cell(cells[(loss, c)], seeds=seeds) for c in columns]] for loss in losses],
    )


def section_missing_class(rep: Report) -> None:
    rep.heading("Missing class (tables 5.1-5.7)")
    study = rep.study
    rows = [r for r in study.rows("missing_class") if r.get("missing_class") is not None]
    rows = [r for r in rows if r.get("noise") is None and r.get("per_class") is None]
    if rep.skipped("missing_class", rows, "results.jsonl has no missing-class student yet"):
        return
    rep.text(
        "Each cell: accuracy of the student on the one class it never saw during distillation "
        "(every example of that class removed from the transfer set). It can only learn that "
        "class from the similarity information in the soft labels of the others."
    )
    # one table per teacher and per setting that varies (the loss convention does not apply to
    # label smoothing, which has no KD term)
    rows = [{**r, _LOSS: loss_label(r)} if r.get("teacher") is not None else r for r in rows]
    kd_rows = [r for r in rows if r.get("teacher") is not None]
    kd_keys = variants(kd_rows, (*_KD_VARIANTS, _LOSS))
    ls_keys = variants([r for r in rows if r.get("teacher") is None], ("student", "epochs"))

    def variant_keys(teacher: str | None) -> list[str]:
        return ls_keys if teacher is None else kd_keys

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        keys = variant_keys(r.get("teacher"))
        groups[(r.get("teacher"), tuple(json.dumps(r.get(k)) for k in keys))].append(r)
    teachers = teacher_order(study, [t for t, _ in groups])
    if _LOSS in kd_keys:  # a study comparing divergences: first the summary across them
        _divergence_summary(rep, kd_rows, teachers)
    order = [(t, v) for t in teachers for (tt, v) in groups if tt == t]
    order += [(None, v) for (tt, v) in groups if tt is None]
    for teacher, variant in order:
        group = groups[(teacher, variant)]
        shown = [k for k in variant_keys(teacher) if k != _LOSS]
        extra = variant_name(group[0], shown)
        suffix = f" ({extra})" if extra else ""
        if teacher is not None and _LOSS in kd_keys:
            divergence = group[0][_LOSS]
            suffix = f", divergence {divergence}{suffix}"
            extra = "_".join(x for x in (slug(divergence), extra) if x)
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
