"""The LM study's figures, drawn from its tables alone (teachers.jsonl, stores.jsonl,
results.jsonl), so that a committed copy of the tables redraws them:

- student quality against store bytes per token, one line per storage mode, a panel per teacher
  and T, hard labels and the online teacher as horizontal references;
- the teachers' mean token entropy against T (exact, from the stores' H_j), with ln V;
- the teachers' mean top-k mass against k at each captured T.
"""

from __future__ import annotations

from pathlib import Path

from rbkd.analysis.plots import _new_figure, _save, color
from rbkd.study.report.load import finite, mean_std

MODE_STYLE = {"renormalize": ("o", "--"), "bucket": ("s", "-"), "sampled": ("^", ":")}


def _mean(rows: list[dict], key: str) -> float | None:
    return mean_std(r.get(key) for r in rows)[0]


def quality_vs_bytes(rows: list[dict], teachers: list[str], temps: list[float], path: Path,
                     metric: str = "val_ce_loss") -> Path | None:  # fmt: skip
    """rows: results.csv's (one per student and teacher). Mean over seeds, error bars sd."""
    panels = [(t, T) for t in teachers for T in temps]
    if not rows or not panels:
        return None
    fig = _new_figure(path, (4.2 * len(temps), 3.2 * len(teachers)))
    axes = fig.subplots(len(teachers), len(temps), squeeze=False)
    for (teacher, T), ax in zip(panels, axes.flat, strict=True):
        mine = [r for r in rows if r["teacher"] == teacher]
        for i, (mode, (marker, style)) in enumerate(MODE_STYLE.items()):
            pts = {}
            for r in mine:
                if r["mode"] == mode and r["T"] == T and finite(r.get("bytes_per_token")):
                    pts.setdefault(r["bytes_per_token"], []).append(r[metric])
            if pts:
                xs = sorted(pts)
                stats = [mean_std(pts[x]) for x in xs]
                ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] or 0 for s in stats],
                            marker=marker, linestyle=style, color=color(i + 1), label=mode,
                            capsize=2)  # fmt: skip
        for mode, ls in (("hard", ":"), ("online", "-.")):
            ref = [r for r in mine if r["mode"] == mode and (mode == "hard" or r["T"] == T)]
            value = mean_std(r[metric] for r in ref)[0]
            if value is not None:
                ax.axhline(value, color="0.4" if mode == "hard" else "k", linestyle=ls,
                           label="hard labels" if mode == "hard" else "online teacher (dense)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(f"teacher {teacher}, T = {T:g}", fontsize=9)
        ax.set_xlabel("store bytes per token")
        ax.set_ylabel({"val_ce_loss": "student validation CE (nats)",
                       "kl_to_teacher": "KL(teacher || student) (nats)"}[metric])  # fmt: skip
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def entropy_vs_T(stores: list[dict], path: Path) -> Path | None:
    tops = [s for s in stores if s.get("mean_entropy")]
    if not tops:
        return None
    fig = _new_figure(path, (4.5, 3.4))
    ax = fig.subplots()
    for i, s in enumerate(tops):
        ax.plot(
            s["T"], s["mean_entropy"], marker="o", color=color(i), label=f"teacher {s['teacher']}"
        )
    ax.axhline(tops[0]["max_entropy"], color="0.5", linestyle=":", label="ln V (uniform)")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("mean token soft-label entropy (nats)")
    ax.set_ylim(0, tops[0]["max_entropy"] * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def topk_mass_vs_k(stores: list[dict], path: Path) -> Path | None:
    tops = [s for s in stores if s.get("topk_mass")]
    if not tops:
        return None
    fig = _new_figure(path, (4.5, 3.4))
    ax = fig.subplots()
    styles = ("-", "--", ":", "-.")
    for i, s in enumerate(tops):
        for j, T in enumerate(s["T"]):
            mass = s["topk_mass"][j]  # [T][k]
            ax.plot(range(1, len(mass) + 1), mass, color=color(i), linestyle=styles[j % 4],
                    label=f"{s['teacher']}, T = {T:g}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("k (the teacher's k most probable tokens)")
    ax.set_ylabel("mean teacher mass in the top k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


__all__ = ["entropy_vs_T", "quality_vs_bytes", "topk_mass_vs_k", "_mean"]
