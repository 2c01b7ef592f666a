"""The closing summary: every configuration of each experiment, seeds pooled."""

from __future__ import annotations

import json
from collections import defaultdict

from rbkd.study.report.document import Report
from rbkd.study.report.load import finite, group_key
from rbkd.study.report.markdown import class_label, fmt_num, format_cell
from rbkd.study.report.rows import loss_label, teacher_order

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


_SUMMARY_KEYS = (
    "teacher",
    "student",
    "T",
    "divergence",  # the loss_label of a taught student (label smoothing has none)
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


def section_summary(rep: Report) -> None:
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
        rows = [
            {**r, "divergence": loss_label(r) if r.get("teacher") is not None else None}
            for r in study.rows(exp)
        ]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            groups[tuple(json.dumps(group_key(r.get(k))) for k in _SUMMARY_KEYS)].append(r)
        shown = [
            k
            for k in _SUMMARY_KEYS
            if len(
                {
                    json.dumps(group_key(r.get(k)))
                    for r in rows
                    # a divergence is shown when taught students differ in it
                    if k != "divergence" or r.get("teacher") is not None
                }
            )
            > 1
        ]
        shown = shown or ["teacher"]

        def cell(r: dict, k: str) -> str:
            v = r.get(k)
            if k == "teacher":
                return rep.name(v) if v is not None else "label smoothing"
            if k == "missing_class" and v is not None:
                return class_label(class_names, v) if isinstance(v, int) else str(v)
            return fmt_num(v) if not isinstance(v, bool) else str(v).lower()

        order = {t: i for i, t in enumerate(teacher_order(study, [r.get("teacher") for r in rows]))}

        def sort_key(r: dict, shown: list = shown, order: dict = order) -> list:
            out = []
            for k in shown:
                v = r.get(k)
                if k == "teacher":
                    out.append((v is None, order.get(v, len(order)), ""))
                elif finite(v):
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
