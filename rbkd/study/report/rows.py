"""What the sections ask of the rows: teacher order, the headline T, entropies at T, the
label-smoothing band, which students count as clean, which settings vary."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from rbkd.analysis.entropy import DEFAULT_LS_FACTORS, label_smoothing_entropy
from rbkd.study.report.load import StudyOutput, finite, mean_std
from rbkd.study.report.markdown import fmt_num


def teacher_order(study: StudyOutput, names: Iterable[str | None]) -> list[str]:
    declared = [t.get("name") for t in study.spec.get("teachers") or []]
    declared += [t.get("name") for t in study.teachers]
    present = {n for n in names if n is not None}
    ordered = [n for n in dict.fromkeys(declared) if n in present]
    return ordered + sorted(present - set(ordered))


def study_teachers(study: StudyOutput) -> list[dict]:
    """The teachers.jsonl rows of the study's own teachers (not the batch sweep's)."""
    return [t for t in study.teachers if t.get("role", "teacher") == "teacher"]


def headline_T(study: StudyOutput) -> float:
    """The T of the single-temperature figures: the examples' T, else the batch sweep's, else 9
    (the thesis's) when the study uses it, else the study's first T."""
    exps = study.experiments
    for name in ("examples", "batch_sweep"):
        if finite((exps.get(name) or {}).get("T")):
            return float(exps[name]["T"])
    temps = [float(t) for t in (study.spec.get("loss") or {}).get("T") or [] if finite(t)]
    if 9.0 in temps or not temps:
        return 9.0
    return temps[0]


def entropy_at(teacher: Mapping, T: float) -> float | None:
    """A teacher row's mean train-split entropy at T (interpolated between stored temperatures
    when T is not one of them; None outside their range)."""
    temps, values = teacher.get("entropy_T") or [], teacher.get("mean_entropy") or []
    pts = sorted(
        (float(t), float(v)) for t, v in zip(temps, values, strict=False) if finite(t) and finite(v)
    )
    for t, v in pts:
        if abs(t - T) < 1e-9:
            return v
    for (t0, v0), (t1, v1) in zip(pts, pts[1:], strict=False):
        if t0 < T < t1:
            return v0 + (v1 - v0) * (T - t0) / (t1 - t0)
    return None


def ls_factors(study: StudyOutput) -> list[float]:
    exps = study.experiments
    for name in ("entropy", "missing_class", "noise"):
        factors = [
            float(a) for a in (exps.get(name) or {}).get("label_smoothing") or [] if finite(a)
        ]
        if factors:
            return sorted(set(factors))
    return list(DEFAULT_LS_FACTORS)


def ls_band(study: StudyOutput, num_classes: int):
    from rbkd.analysis.plots import Band

    factors = ls_factors(study)
    lo, hi = min(factors), max(factors)
    label = f"label smoothing, A = {lo:g}" if lo == hi else f"label smoothing, A = {lo:g}–{hi:g}"
    return Band(
        label_smoothing_entropy(lo, num_classes), label_smoothing_entropy(hi, num_classes), label
    )


def is_clean(row: Mapping) -> bool:
    """A student distilled on the whole transfer set: no excluded class, no subset, no noise."""
    return (
        row.get("missing_class") is None
        and row.get("per_class") is None
        and row.get("noise") is None
    )


def variants(rows: Sequence[Mapping], keys: Sequence[str]) -> list[str]:
    """The keys among `keys` whose value differs between rows (named in titles)."""
    return [k for k in keys if len({json.dumps(r.get(k)) for r in rows}) > 1]


def variant_name(row: Mapping, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={fmt_num(row.get(k))}" for k in keys)


def entropy_table_dict(t: Mapping) -> dict:
    return {
        "temperatures": [float(x) for x in t.get("entropy_T") or []],
        "mean_entropy": t.get("mean_entropy") or [],
        "per_class_entropy": t.get("per_class_entropy") or [],
    }


def accuracy_series(label: str, values: Mapping, xs: Iterable, **style):
    """A plot Series of mean accuracy (%) against x with ± one std over seeds (%) as its band;
    `values`: x -> the accuracies of its seeds, drawn in the order of `xs`, an x without any left
    out. `style`: Series options (color, linestyle)."""
    from rbkd.analysis.plots import Series

    stats = {x: mean_std(v) for x, v in values.items() if v}
    shown = [x for x in xs if x in stats and stats[x][0] is not None]
    return Series(
        label,
        shown,
        [stats[x][0] * 100 for x in shown],
        err=[(stats[x][1] or 0.0) * 100 for x in shown],
        **style,
    )


def loss_label(row: Mapping) -> str:
    """A student row's divergence as a title names it ('kl', 'jsd (beta=0.5)'), and ', unlabelled'
    for a student whose loop saw no label (so that every figure and table that draws one curve
    or table per loss keeps labelled and unlabelled transfer apart); a row written before
    divergences existed is forward KL."""
    from rbkd.config import LOSS_OPTIONS, LossSpec

    given = {k: row.get(k) for k in LOSS_OPTIONS if row.get(k) is not None}
    try:
        label = LossSpec.from_dict(given).label()
    except (TypeError, ValueError):  # a hand-edited row: show what it says
        label = str(row.get("divergence"))
    return label + (", unlabelled" if row.get("transfer_labels") == "unlabelled" else "")
