"""The two sections that read the teacher runs and the dataset: the highest-entropy training
images per class (figures 5.6-5.13) and penultimate-layer projections (figures 5.14 / 6.7)."""

from __future__ import annotations

import statistics

from rbkd.study.report.document import Report
from rbkd.study.report.markdown import DASH, class_label, fmt_entropy, fmt_epochs


def section_examples(rep: Report) -> None:
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
            rep.omit(f"teacher {rep.name(teacher)}", str(e))
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
                    class_label(names, k),
                    fmt_entropy(statistics.fmean(hs)) if hs else DASH,
                    f"{sum(p != k for p in preds)} of {len(preds)}",
                ]
                for k, (hs, preds) in enumerate(
                    zip(found.entropies, found.predictions, strict=True)
                )
            ],
            "lrr",
        )


def section_projection(rep: Report) -> None:
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
            rep.omit(f"teacher {rep.name(teacher)}", str(e))
            continue
        t = rep.study.teacher(teacher) or {}
        detail = ", ".join(
            x
            for x in (
                t.get("capacity"),
                t.get("batch_size") and f"batch {t['batch_size']}",
                t.get("epochs") and fmt_epochs(t["epochs"]),
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
        spreads.append([rep.name(teacher), *[fmt_entropy(proj.spread[k]) for k in classes]])
    if not panels:
        return
    rep.text(
        f"Penultimate-layer activations of {per_class} test images of each of "
        f"{', '.join(class_label(names, k) for k in classes)}, projected onto "
        "the plane through the three class templates (rows of the final layer; Müller et al. "
        "2019). Broad clusters keep similarity information between classes, tight ones lose it. "
        "Each panel is drawn in units of its model's mean distance between the class centres "
        "(activations of different models differ in scale), on the same axes; the stars are the "
        "templates, scaled by the factor in the panel's title. Spread: mean distance of a "
        "class's points to their centre in that unit."
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
    rep.table(["teacher", *[f"spread of {class_label(names, k)}" for k in classes]], spreads)
