"""`write_lm_report(study_dir)`: an LM study's report (report/report.md and its figures) from its
tables alone (study.json, teachers.jsonl, stores.jsonl, results.jsonl), so that it can be drawn
at any moment of a running study, and redrawn from a committed copy of the tables without the
runs. `rbkd study report DIR` comes here for an LM study (rbkd.study.report.write).

Sections: the setting; the teachers (perplexity, unigram baseline, speed); their stores (capture
speed, bytes on disk, mean entropy at each captured T, top-k mass); the students, mean ± sample
standard deviation over seeds (n shown where seeds are missing), and the figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rbkd.io import read_bounded, read_json_file, write_bytes
from rbkd.study.lm_runner import student_rows
from rbkd.study.report.lm_figures import entropy_vs_T, quality_vs_bytes, topk_mass_vs_k
from rbkd.study.report.load import finite, group_key, mean_std
from rbkd.study.report.markdown import DASH, markdown_table

MODE_ORDER = ("hard", "online", "renormalize", "bucket", "sampled")
MODE_NAMES = {"hard": "hard labels", "online": "online teacher (dense KD)",
              "renormalize": "top-k renormalised", "bucket": "top-k + exact tail",
              "sampled": "sampled (unbiased)"}  # fmt: skip


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    text = read_bounded(path, 256 << 20, "table").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _f(v, digits: int = 3) -> str:
    return f"{v:,.{digits}f}" if finite(v) else DASH


def _ms(values, digits: int = 3, seeds: int = 0) -> str:
    m, s, n = mean_std(values)
    if m is None:
        return DASH
    text = f"{m:,.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")
    return text + (f" (n={n})" if seeds > 1 and n < seeds else "")


def _teachers(rows: list[dict]) -> str:
    head = ("teacher", "parameters", "steps x batch x context", "tokens", "val CE", "val ppl",
            "unigram ppl", "train tokens/s", "wall (s)")  # fmt: skip
    body = [(r["teacher"], f"{r['parameters']:,}" if r.get("parameters") else DASH,
             f"{r['steps']} x {r['batch_size']} x {r['context']}",
             f"{r['train_tokens']:,.0f}" if finite(r.get("train_tokens")) else DASH,
             _f(r["val_ce_loss"]), _f(r["val_perplexity"], 1), _f(r["unigram_perplexity"], 1),
             _f(r["train_tokens_per_s"], 0), _f(r["wall_s"], 0)) for r in rows]  # fmt: skip
    return markdown_table(head, body)


def _stores(rows: list[dict], ks: list[int]) -> str:
    temps = rows[0]["T"] if rows else []
    head = ("teacher", "top-k", "samples", "positions", "capture tokens/s", "bytes/token on disk",
            *[f"H at T={t:g}" for t in temps], *[f"top-{k} mass (T=1)" for k in ks])  # fmt: skip
    body = []
    for r in rows:
        ent = r.get("mean_entropy") or [None] * len(temps)
        mass = r.get("topk_mass")
        col = r["T"].index(1.0) if 1.0 in r["T"] else 0
        at = [(_f(mass[col][k - 1]) if mass and k <= len(mass[col]) else DASH) for k in ks]
        body.append((r["teacher"], r["k"], r["samples"], f"{r['tokens']:,}",
                     _f(r.get("capture_tokens_per_s"), 0), _f(r.get("disk_bytes_per_token"), 1),
                     *[_f(e) for e in ent], *at))  # fmt: skip
    return markdown_table(head, body)


def _order(row: dict) -> tuple:
    return (row["teacher"], MODE_ORDER.index(row["mode"]), group_key(row["T"] or 0),
            -(row["k"] or 0))  # fmt: skip


def _students(rows: list[dict], seeds: int) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=_order):
        groups.setdefault((r["teacher"], r["mode"], r["T"], r["k"]), []).append(r)
    head = ("teacher", "mode", "T", "k", "val CE", "val ppl", "KL to teacher", "bytes/token",
            "capture tok/s", "distill tok/s", "wall (s)", "seeds")  # fmt: skip
    body = []
    for (teacher, mode, T, k), rs in groups.items():
        body.append((teacher, MODE_NAMES[mode], DASH if T is None else f"{T:g}",
                     DASH if k is None else k, _ms([r["val_ce_loss"] for r in rs], 3, seeds),
                     _ms([r["val_perplexity"] for r in rs], 1), _ms([r["kl_to_teacher"] for r in rs], 4),
                     DASH if rs[0]["bytes_per_token"] is None else f"{rs[0]['bytes_per_token']:,}",
                     _ms([r["capture_tokens_per_s"] for r in rs], 0),
                     _ms([r["distill_tokens_per_s"] for r in rs], 0),
                     _ms([r["wall_s"] for r in rs], 0), len(rs)))  # fmt: skip
    return markdown_table(head, body)


def _model(m) -> str:
    if isinstance(m, str):
        return f"size {m!r}"
    return f"{m['n_layer']} layers x {m['n_embd']} ({m['n_head']} heads)"


def _train(t: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in t.items())


def _count(n) -> str:
    return "all" if n is None else f"{n:,}"


def _setting(spec: dict) -> list[str]:
    d, s, c, g = spec["data"], spec["student"], spec["capture"], spec["grid"]
    vocab = spec.get("vocab_size") or f"from {spec.get('tokenizer')}"
    corpus = spec.get("corpus") or "pydocs (Debian's python3.11-doc)"
    limit = f"; --limit {spec['limit']:,} (a quick version)" if spec.get("limit") else ""
    teachers = "; ".join(
        f"**{t['name']}**: {_model(t['model'])}, {_train(t['train'])}" for t in spec["teachers"]
    )
    return [
        f"- corpus: {corpus}, BPE vocabulary {vocab}, context {d['context']}{limit}",
        f"- teachers: {teachers}",
        f"- students: {_model(s['model'])}, {_train(s['train'])}, alpha {s['alpha']:g}, on the "
        f"first {_count(d['student_tokens'])} train tokens; validation: the first "
        f"{d['eval_tokens']:,} tokens of the validation split",
        f"- stores: top-{c['k']} at T = {', '.join(f'{t:g}' for t in c['T'])}, {c['topk_dtype']} "
        f"logits, samples drawn at T = {c['sample_T']:g}",
        f"- grid: {', '.join(g['modes'])}; k = {', '.join(map(str, g['k']))}; "
        f"T = {', '.join(f'{t:g}' for t in g['T'])}; seeds {', '.join(map(str, spec['seeds']))}",
    ]


def is_lm_study_folder(study_dir: str | os.PathLike) -> bool:
    """Whether the folder's study.json is an LM study's (kind "lm")."""
    try:
        spec = read_json_file(Path(study_dir) / "study.json", "study file")
    except (OSError, ValueError):
        return False
    return isinstance(spec, dict) and spec.get("kind") == "lm"


def write_lm_report(study_dir: str | os.PathLike, *, out: str | os.PathLike | None = None,
                    fmt: str = "png", **_) -> Path:  # fmt: skip
    """report.md and its figures into `out` (default study_dir/report); returns report.md."""
    folder = Path(study_dir)
    spec = read_json_file(folder / "study.json", "study file")
    out = Path(out) if out is not None else folder / "report"
    teachers = _jsonl(folder / "teachers.jsonl")
    stores = _jsonl(folder / "stores.jsonl")
    students = _jsonl(folder / "results.jsonl")
    rows = student_rows(students, stores)
    names, temps = spec["grid"]["teachers"], spec["grid"]["T"]
    from rbkd.study.report.write import MANIFEST_FILE, _claim_report_folder

    _claim_report_folder(out, folder)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST_FILE).exists():  # first: the mark of a folder rbkd's reports own
        write_bytes(out / MANIFEST_FILE, b'{"figures": []}\n')
    lines = [f"# {spec['name']}", "", spec.get("description") or "", "", "## Setting", "",
             *_setting(spec), ""]  # fmt: skip
    from rbkd.study.lm_plan import count_cells

    done = len(teachers) + len(stores) + len(students)
    lines += [f"{done} of {count_cells(spec)} cells finished.", "", "## Teachers", "",
              _teachers(teachers) if teachers else "No teacher has finished yet.", "",
              "## Stores (one capture per teacher; smaller k are read from the top-k store)", "",
              _stores(stores, sorted(spec["grid"]["k"])) if stores else "No store has finished yet.", ""]  # fmt: skip
    figures = [
        ("Mean token entropy against T (exact, from the stores)", "entropy_vs_T",
         lambda p: entropy_vs_T(stores, p)),
        ("Teacher mass in its top k against k", "topk_mass_vs_k", lambda p: topk_mass_vs_k(stores, p)),
        ("Student validation CE against store bytes per token", "quality_vs_bytes",
         lambda p: quality_vs_bytes(rows, names, temps, p)),
        ("Student KL to its teacher against store bytes per token", "kl_vs_bytes",
         lambda p: quality_vs_bytes(rows, names, temps, p, "kl_to_teacher")),
    ]  # fmt: skip
    lines += ["## Students (mean ± sd over seeds)", "",
              "Bytes per token: what a store must hold for that student at one T "
              "(rbkd.study.lm_cells.mode_bytes). KL: KL(teacher || student) at T = 1 on the "
              "validation tokens, nats per token.", "",
              _students(rows, len(spec["seeds"])) if rows else "No student has finished yet.", ""]  # fmt: skip
    lines += ["## Figures", ""]
    drawn = []
    for title, name, draw in figures:
        path = draw(out / f"{name}.{fmt}")
        if path:
            drawn.append(path.name)
        lines += [f"### {title}", "", f"![{title}]({name}.{fmt})" if path else "Nothing to draw yet.", ""]  # fmt: skip
    report = out / "report.md"
    write_bytes(report, "\n".join(lines).encode())
    write_bytes(
        out / MANIFEST_FILE, (json.dumps({"figures": sorted(drawn)}, indent=1) + "\n").encode()
    )
    return report
