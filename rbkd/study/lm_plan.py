"""An LM study's cells, in the order they run, each named by a content key (torch-free).

Three kinds of cell, each a folder under the study folder holding `cell.json`, written last with
the cell's key (the one mark of a finished cell; rbkd.study.lm_cells):

    teachers/<name>-<key>                     a causal-LM teacher (rbkd.lm.train.train_teacher)
    stores/<teacher>-k<k>-s<samples>-<key>    its sparse soft-label store over the students'
                                              tokens (rbkd.lm.capture), and the store's entropy
    students/<teacher>-<mode>-T<T>-k<k>-s<seed>-<key>   a student (rbkd.lm.train.distill)

A key hashes what determines the cell's result, as image runs' keys do (rbkd.study.keys): the
exact token positions (corpus, tokenizer, split, length: a --limit gives other keys), the
model's config, every training input that changes the numbers, and, for a store, its teacher's
key and the capture's settings; for a student, its store's (or online teacher's) key. So a rerun
trains nothing, and adding a seed, a T or a k runs only the new cells.

Each teacher is captured ONCE at the largest k (the study's [capture] k) with the whole T grid;
students at a smaller k read that store's first k ids, which is exact for the bucket tail because
the stored log-partitions are over the full vocabulary. The sampled students need stores drawn
with s = k samples: the k = [capture] k store carries its samples, and each smaller k has a
store of its own (top-1 only, and s samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbkd.lm.train.config import LMTrainConfig
from rbkd.study.keys import KEY_CHARS, run_key

CELL_FILE = "cell.json"


@dataclass
class LMCell:
    kind: str  # "teacher" | "store" | "student"
    name: str  # one line: what it is
    key: str
    folder: Path
    inputs: dict[str, Any]  # what the key hashes (also what the cell runs with)
    teacher: str | None = None  # the teacher's name (None: a hard-label student)
    needs: list[str] = field(default_factory=list)  # keys of the cells it reads

    def label(self) -> str:
        return self.name


def _fmt(x: float) -> str:
    return f"{x:g}"


def sample_stores(study: dict) -> list[int]:
    """The sample counts that need a store of their own (all sampled k below the captured k)."""
    if "sampled" not in study["grid"]["modes"]:
        return []
    return [k for k in study["grid"]["k"] if k != study["capture"]["k"]]


def count_cells(study: dict) -> int:
    g, seeds = study["grid"], len(study["seeds"])
    n_teachers = len(study["teachers"])
    stores = len(g["teachers"]) * (1 + len(sample_stores(study)))
    per_teacher = 0
    for mode in g["modes"]:
        if mode == "online":
            per_teacher += len(g["T"])
        elif mode != "hard":
            per_teacher += len(g["T"]) * len(g["k"])
    students = seeds * (("hard" in g["modes"]) + len(g["teachers"]) * per_teacher)
    return n_teachers + stores + students


def budget(cfg: dict, study: dict) -> dict:
    """--limit N, the quick version of a study: the students' tokens (and the stores) are cut to
    N, and every run's steps are scaled by the same factor N / [data] student_tokens (at least
    2), so that the teachers keep their ratio (a long and a short teacher stay long and short).
    Without student_tokens, steps are cut to about N tokens. No limit: the file's settings."""
    limit, context = study["limit"], study["data"]["context"]
    if limit is None:
        return dict(cfg)
    out = dict(cfg)
    batch = out.get("batch_size", LMTrainConfig.batch_size)
    steps = out.get("steps", LMTrainConfig.steps)
    full = study["data"]["student_tokens"]
    if full is None:
        steps = min(steps, max(2, limit // (batch * context)))
    elif limit < full:
        steps = max(2, math.ceil(steps * limit / full))
    out["steps"] = steps
    out["warmup_steps"] = min(out.get("warmup_steps", LMTrainConfig.warmup_steps), steps // 2)
    out["eval_every"] = min(out.get("eval_every", LMTrainConfig.eval_every), steps)
    return out


def train_config(study: dict, train: dict, seed: int, device: str) -> LMTrainConfig:
    context = study["data"]["context"]
    eval_tokens = study["data"]["eval_tokens"]
    if study["limit"] is not None:
        eval_tokens = min(eval_tokens, max(study["limit"], context))
    cfg = LMTrainConfig(**budget(train, study), context=context, seed=seed,
                        eval_tokens=eval_tokens, device=device)  # fmt: skip
    cfg.checkpoint_every = max(1, min(cfg.eval_every, cfg.steps))
    cfg.check()
    return cfg


def make_lm_plan(study: dict, out: Path, data: dict, device: str = "auto") -> list[LMCell]:
    """Every cell of the study, in running order: teacher by teacher (in the file's order) its
    training, its stores and its students of the first seed, then the hard-label student (whose
    KL is measured to every teacher); then the next seed's students. So a study stopped early
    holds whole teachers with students, not many teachers and no student. `data`: the splits'
    identities (rbkd.study.lm_data.LMData.identities) and the resolved precision."""
    out = Path(out)
    teachers: dict[str, LMCell] = {}
    for t in study["teachers"]:
        cfg = train_config(study, t["train"], t["seed"], device)
        inputs = {"train": data["teacher_train"][t["name"]], "validation": data["validation"],
                  "model": t["model"], "vocab_size": data["vocab_size"],
                  "train_config": cfg.result_inputs(), "precision": data["precision"]}  # fmt: skip
        key = run_key("lm-study-teacher", inputs)
        tokens = cfg.steps * cfg.batch_size * cfg.context
        teachers[t["name"]] = LMCell(
            "teacher", f"teacher {t['name']}: {cfg.steps} steps x {cfg.batch_size} x "
            f"{cfg.context} = {tokens:,} tokens, seed {t['seed']}", key,
            out / "teachers" / f"{t['name']}-{key[:KEY_CHARS]}", inputs, t["name"])  # fmt: skip
    cap, g = study["capture"], study["grid"]
    main_samples = cap["k"] if ("sampled" in g["modes"] and cap["k"] in g["k"]) else 0
    stores: dict[tuple[str, object], LMCell] = {}  # (teacher, "top" or samples) -> store
    own: dict[str, list[LMCell]] = {}  # teacher -> its stores
    for name in g["teachers"]:
        for k, samples in [(cap["k"], main_samples)] + [(1, s) for s in sample_stores(study)]:
            inputs = {"teacher": teachers[name].key, "tokens": data["student_train"], "k": k,
                      "T": cap["T"], "samples": samples, "sample_T": cap["sample_T"],
                      "topk_dtype": cap["topk_dtype"], "context": study["data"]["context"]}  # fmt: skip
            key = run_key("lm-study-store", inputs)
            what = f"top-{k}" + (f" and {samples} samples" if samples else "")
            cell = LMCell("store", f"store {name}: {what} at T {', '.join(map(_fmt, cap['T']))}",
                          key, out / "stores" / f"{name}-k{k}-s{samples}-{key[:KEY_CHARS]}",
                          inputs, name, [teachers[name].key])  # fmt: skip
            own.setdefault(name, []).append(cell)
            if k == cap["k"]:
                stores[(name, "top")] = cell
            if samples:
                stores[(name, samples)] = cell
    cells = [teachers[n] for n in teachers if n not in g["teachers"]]  # trained, never distilled
    s = study["student"]
    for i, seed in enumerate(study["seeds"]):
        cfg = train_config(study, s["train"], seed, device)
        base = {"tokens": data["student_train"], "validation": data["validation"],
                "model": s["model"], "vocab_size": data["vocab_size"],
                "train_config": cfg.result_inputs(), "precision": data["precision"]}  # fmt: skip
        for name in g["teachers"]:
            if i == 0:
                cells += [teachers[name], *own[name]]
            for T in g["T"]:
                for mode in g["modes"]:
                    if mode == "online":
                        cells.append(_student(out, base, name, mode, T, None, s["alpha"], seed,
                                              teachers[name]))  # fmt: skip
                    elif mode != "hard":
                        for k in sorted(g["k"], reverse=True):
                            src = stores[(name, k if mode == "sampled" else "top")]
                            cells.append(
                                _student(out, base, name, mode, T, k, s["alpha"], seed, src)
                            )
        if "hard" in g["modes"]:
            every = [teachers[name] for name in g["teachers"]]  # its KL is measured to each
            cells.append(_student(out, base, None, "hard", None, None, 0.0, seed, None, every))
    return cells


def _student(out, base, teacher, mode, T, k, alpha, seed, source: LMCell | None,
             reads: list[LMCell] | None = None) -> LMCell:  # fmt: skip
    """A student cell; `reads` (default: its source) are the cells it waits for."""
    inputs = {**base, "mode": mode, "T": T, "k": k, "alpha": alpha,
              "source": None if source is None else source.key}  # fmt: skip
    key = run_key("lm-study-student", inputs)
    what = "hard labels" if mode == "hard" else f"{mode} from {teacher}, T {_fmt(T)}"
    if k is not None:
        what += f", k {k}"
    name = f"student {what}, seed {seed}"
    slug = "-".join(
        [teacher or "none", mode]
        + ([f"T{_fmt(T)}"] if T is not None else [])
        + ([f"k{k}"] if k is not None else [])
        + [f"s{seed}", key[:KEY_CHARS]]
    )
    if reads is None:
        reads = [] if source is None else [source]
    return LMCell("student", name, key, out / "students" / slug, inputs, teacher,
                  [c.key for c in reads])  # fmt: skip
