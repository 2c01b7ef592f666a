"""The two sweeps of chapter 6: teacher entropy against batch size and epochs (figures 6.2-6.4)
and student accuracy against T (figure 6.5)."""

from __future__ import annotations

import math

from rbkd.study.report.document import Report
from rbkd.study.report.load import finite, group_key
from rbkd.study.report.markdown import DASH, fmt_entropy, fmt_epochs, format_cell
from rbkd.study.report.rows import (
    accuracy_series,
    entropy_at,
    entropy_table_dict,
    headline_T,
    is_clean,
    loss_label,
    ls_band,
    study_teachers,
    teacher_order,
)


def section_batch_sweep(rep: Report) -> None:
    rep.heading("Teacher entropy vs batch size and epochs (figures 6.2-6.4)")
    study = rep.study
    exp = study.experiments.get("batch_sweep")
    sweep = [t for t in study.teachers if t.get("role") == "sweep"]
    if rep.skipped("batch_sweep", sweep, "teachers.jsonl has no batch-sweep teacher yet"):
        return
    from rbkd.analysis.plots import (
        Reference,
        Series,
        color,
        entropy_axis,
        plot_entropy_curves,
        plot_series,
    )

    T = float((exp or {}).get("T") or headline_T(study))
    batches = sorted({int(t["batch_size"]) for t in sweep})
    epochs = sorted({int(t["epochs"]) for t in sweep})
    grid = {(int(t["batch_size"]), int(t["epochs"])): t for t in sweep}
    capacity = (exp or {}).get("capacity") or sweep[0].get("capacity") or ""
    smalls = [t for t in study_teachers(study) if t.get("capacity") == "small"]
    refs = [
        Reference(v, f"{rep.name(t['name'])} (small teacher)", "black", "--")
        for t in smalls
        if (v := entropy_at(t, T)) is not None
    ]
    rep.text(
        f"The {capacity} teacher trained at every batch size and number of epochs of the sweep; "
        f"mean entropy of its soft labels on the training split at T = {T:g}. Dashed: the "
        "study's small teacher, where it has one; dotted: ln C, the top of the entropy axis."
    )

    def line(points: dict[int, float | None]) -> tuple[list[int], list[float]]:
        xs = [x for x, v in points.items() if v is not None]
        return xs, [points[x] for x in xs]

    by_batch = []
    for i, e in enumerate(epochs):
        xs, ys = line({b: entropy_at(grid[(b, e)], T) for b in batches if (b, e) in grid})
        by_batch.append(Series(fmt_epochs(e), xs, ys, color=color(i + 1)))
    by_epochs = []
    for i, b in enumerate(batches):
        xs, ys = line({e: entropy_at(grid[(b, e)], T) for e in epochs if (b, e) in grid})
        by_epochs.append(Series(f"batch {b}", xs, ys, color=color(i + 1)))
    ylabel = f"mean soft-label entropy at T={T:g} (nats)"
    what = f"{rep.data_title}, {capacity} teacher"
    c = len(study.class_names)
    ylim = entropy_axis(math.log(c)) if c > 1 else None
    if c > 1:  # the ceiling of the fixed entropy axis, named
        refs = [*refs, Reference(math.log(c), f"ln C = {math.log(c):.3f}")]
    # A sweep with one value on an axis has no line to draw along it: say so, draw nothing.
    if len(batches) > 1:
        rep.figure(
            "sweep_entropy_vs_batch_size",
            lambda p: plot_series(
                p,
                by_batch,
                xlabel="teacher batch size",
                ylabel=ylabel,
                title=f"{what}: entropy vs batch size",
                logx=True,
                references=refs,
                ylim=ylim,
            ),
            f"{what}: soft-label entropy against pre-training batch size",
        )
    else:
        rep.text(f"_No entropy-vs-batch-size figure: the sweep has one batch size ({batches[0]})._")
    if len(epochs) > 1:
        rep.figure(
            "sweep_entropy_vs_epochs",
            lambda p: plot_series(
                p,
                by_epochs,
                xlabel="teacher epochs",
                ylabel=ylabel,
                title=f"{what}: entropy vs epochs",
                references=refs,
                ylim=ylim,
            ),
            f"{what}: soft-label entropy against pre-training epochs",
        )
    else:
        rep.text(
            f"_No entropy-vs-epochs figure: the sweep has one number of epochs "
            f"({fmt_epochs(epochs[0])})._"
        )
    # figure 6.4: entropy vs T of the sweep at its longest training, the small teacher in bold
    e_max = epochs[-1]
    curves = {t["name"]: entropy_table_dict(t) for t in smalls if t.get("entropy_T")}
    names = {t["name"]: f"{rep.name(t['name'])} (small teacher)" for t in smalls}
    for b in batches:
        t = grid.get((b, e_max))
        if t is not None and t.get("entropy_T"):
            curves[t["name"]] = entropy_table_dict(t)
            names[t["name"]] = f"{capacity}, batch {b}, {fmt_epochs(e_max)}"
    if curves:
        rep.figure(
            "sweep_entropy_vs_T",
            lambda p: plot_entropy_curves(
                p,
                curves,
                per_class=False,
                band=ls_band(study, c),
                max_entropy=math.log(c),
                labels={**names, **rep.labels},
                bold=[t["name"] for t in smalls],
                title=f"{what}, {fmt_epochs(e_max)}: entropy vs T by batch size",
            ),
            f"{what}: entropy against T for each batch size ({fmt_epochs(e_max)})",
        )
    rep.lines += [f"**Mean entropy at T={T:g} (nats); rows: batch size, columns: epochs**", ""]
    rep.table(
        ["batch size", *[fmt_epochs(e) for e in epochs]],
        [
            [
                str(b),
                *[
                    fmt_entropy(entropy_at(grid[(b, e)], T)) if (b, e) in grid else DASH
                    for e in epochs
                ],
            ]
            for b in batches
        ],
    )
    rep.lines += ["**Teacher test accuracy (%)**", ""]
    rep.table(
        ["batch size", *[fmt_epochs(e) for e in epochs]],
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


def section_temperature(rep: Report) -> None:
    rep.heading("Student accuracy vs temperature (figure 6.5)")
    study = rep.study
    rows = [r for r in study.rows("temperature") if r.get("teacher") is not None and is_clean(r)]
    rows = [r for r in rows if finite(r.get("T"))]
    if rep.skipped("temperature", rows, "results.jsonl has no temperature-sweep student yet"):
        return
    from rbkd.analysis.plots import color, plot_series

    seeds = rep.seeds("temperature")
    students = sorted({str(r.get("student")) for r in rows})
    temps = sorted({group_key(r["T"]) for r in rows})
    teachers = teacher_order(study, [r.get("teacher") for r in rows])
    losses = list(dict.fromkeys(loss_label(r) for r in rows))  # one curve per divergence
    series, columns, cells = [], [], {}
    for i, teacher in enumerate(teachers):
        for student, loss in ((s, d) for s in students for d in losses):
            mine = [
                r
                for r in rows
                if r.get("teacher") == teacher
                and str(r.get("student")) == student
                and loss_label(r) == loss
            ]
            if not mine:
                continue
            name = rep.name(teacher) + (f" → {student}" if len(students) > 1 else "")
            name += f", {loss}" if len(losses) > 1 else ""
            by_T = {
                T: [r.get("test_accuracy") for r in mine if group_key(r["T"]) == T] for T in temps
            }
            series.append(accuracy_series(name, by_T, temps, color=color(i)))
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
