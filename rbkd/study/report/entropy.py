"""Soft-label entropy against T with the label-smoothing band (figures 5.1-5.4) and the entropy
form of the soft-label hypothesis (figures 5.15 / 6.8)."""

from __future__ import annotations

import math

from rbkd.analysis.entropy import label_smoothing_entropy
from rbkd.study.report.document import Report
from rbkd.study.report.load import finite, mean_std
from rbkd.study.report.markdown import DASH, class_label, fmt_entropy, fmt_num, format_cell
from rbkd.study.report.rows import (
    entropy_at,
    entropy_table_dict,
    headline_T,
    ls_band,
    ls_factors,
    study_teachers,
)


def section_entropy(rep: Report) -> None:
    rep.heading("Soft-label entropy vs temperature (figures 5.1-5.4)")
    study = rep.study
    teachers = study_teachers(study)
    teachers = [t for t in teachers if t.get("entropy_T") and t.get("mean_entropy")]
    if not teachers:
        rep.skip("teachers.jsonl has no study teacher with entropies yet")
        return
    from rbkd.analysis.plots import (
        CLASS_COLORS,
        Reference,
        Series,
        entropy_axis,
        plot_entropy_curves,
        plot_series,
    )

    names = study.class_names
    c = len(teachers[0].get("per_class_accuracy") or names) or len(names)
    band = ls_band(study, c)
    ln_c = math.log(c)
    factors = ls_factors(study)
    rep.text(
        "Mean entropy of each teacher's soft labels on the training split. The shaded band is "
        f"the entropy of label-smoothed targets for A = {', '.join(f'{a:g}' for a in factors)} "
        "(they do not depend on T; thesis figure 5.1); the dotted line is ln C, the entropy of "
        "the uniform distribution. A teacher near the band carries about as little similarity "
        "information as label smoothing. Every entropy figure has the same y axis, from 0 to "
        "just above ln C, so a flat curve looks flat."
    )
    curves = {t["name"]: entropy_table_dict(t) for t in teachers}
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
    loss_T = [float(t) for t in (study.spec.get("loss") or {}).get("T") or [] if finite(t)]
    all_T = sorted({float(x) for t in teachers for x in t.get("entropy_T") or []})
    shown = [T for T in all_T if T in {1.0, headline_T(study), 20.0, *loss_T}] or all_T
    rep.table(
        ["T", *[rep.name(t["name"]) for t in teachers]],
        [[f"{T:g}", *[fmt_entropy(entropy_at(t, T)) for t in teachers]] for T in shown],
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
                class_label(names, k),
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
                ylim=entropy_axis(ln_c),
            ),
            f"{rep.data_title}, teacher {rep.name(t['name'])}: entropy per class against T",
        )


def section_hypothesis(rep: Report) -> None:
    rep.heading("Entropy form of the soft-label hypothesis (figures 5.15 / 6.8)")
    study = rep.study
    T = headline_T(study)
    teachers = study_teachers(study)
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
        at_T = [r for r in mine if finite(r.get("T")) and abs(float(r["T"]) - T) < 1e-9]
        use = at_T or mine
        m, _, n = mean_std(r.get("missing_class_accuracy") for r in use)
        accs.append(m * 100 if m is not None else None)
        basis[t["name"]] = (
            f"T={T:g}, {n} students" if at_T else f"all T, {n} students" if use else DASH
        )
    c = len(study.class_names)
    band = ls_band(study, c)
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
            fmt_num(t.get("batch_size")),
            fmt_num(t.get("epochs")),
            fmt_entropy(e),
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
