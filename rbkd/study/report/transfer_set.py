"""Entropy-selected transfer sets against random ones (figures 5.5, 5.8, 6.6)."""

from __future__ import annotations

from rbkd.study.report.document import Report
from rbkd.study.report.load import finite, group_key, mean_std
from rbkd.study.report.markdown import DASH, format_cell
from rbkd.study.report.rows import accuracy_series, is_clean, loss_label, teacher_order


def section_transfer_set(rep: Report) -> None:
    rep.heading("Entropy-selected transfer sets (figures 5.5, 5.8, 6.6)")
    study = rep.study
    rows = [r for r in study.rows("transfer_set") if r.get("per_class") is not None]
    rows = [r for r in rows if r.get("missing_class") is None and r.get("noise") is None]
    if rep.skipped("transfer_set", rows, "results.jsonl has no transfer-set student yet"):
        return
    from rbkd.analysis.plots import Reference, color, plot_series

    rep.text(
        "Student test accuracy against the number of training examples per class kept in the "
        "transfer set: the N whose soft labels have the highest entropy at T (solid, circles) or "
        "N at random (dashed, squares). Shaded: ± one standard deviation over seeds. Dotted: the "
        "same student distilled by the same teacher at the same T on the whole transfer set. "
        "Where the sizes span a factor of 8 or more the x axis is logarithmic (its label says "
        "so)."
    )
    seeds = rep.seeds("transfer_set")
    for T in sorted({group_key(r.get("T")) for r in rows}, key=lambda v: (v is None, v)):
        at_T = [r for r in rows if group_key(r.get("T")) == T]
        teachers = teacher_order(study, [r.get("teacher") for r in at_T])
        selects = [s for s in ("entropy", "random") if any(r.get("select") == s for r in at_T)]
        sizes = sorted({int(r["per_class"]) for r in at_T})
        losses = list(dict.fromkeys(loss_label(r) for r in at_T))  # one curve per divergence
        series, refs, columns, cells = [], [], [], {}
        for i, (teacher, loss) in enumerate((t, d) for t in teachers for d in losses):
            mine = [r for r in at_T if r.get("teacher") == teacher and loss_label(r) == loss]
            who = rep.name(teacher) + (f", {loss}" if len(losses) > 1 else "")
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
                series.append(
                    accuracy_series(
                        f"{who}, {sel}",
                        by_n,
                        sizes,
                        color=color(i),
                        linestyle="-" if sel == "entropy" else "--",
                        marker="o" if sel == "entropy" else "s",
                    )
                )
                columns.append(f"{who}, {sel}")
                for n in sizes:
                    cells[(columns[-1], n)] = format_cell(by_n[n], seeds=seeds)
            students = {r.get("student") for r in mine}
            full = [
                r
                for r in study.results
                if r.get("teacher") == teacher
                and group_key(r.get("T")) == T
                and r.get("student") in students
                and is_clean(r)
                and r.get("label_smoothing") is None
                and loss_label(r) == loss
            ]
            m, s, n = mean_std(r.get("test_accuracy") for r in full)
            if m is not None:
                refs.append(Reference(m * 100, f"{who}, all data", color(i), ":"))
                # the full-data student fills the last row ("all") of this teacher's columns
                for sel in selects:
                    cells[(f"{who}, {sel}", "all")] = format_cell(
                        [r.get("test_accuracy") for r in full], seeds=seeds
                    )
        t_text = f"T={T:g}" if finite(T) else "T unset"
        rep.figure(
            f"transfer_set_T{T:g}" if finite(T) else "transfer_set",
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
