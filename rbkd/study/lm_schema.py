"""Language-model study files (`[study] kind = "lm"`): read and checked before anything runs.

An LM study is the image study's language-model twin (docs/studies.md, "Language-model
studies"): two or more causal-LM teachers, each captured once into a sparse soft-label store at
the largest k and a temperature grid, and a grid of students per teacher: hard labels only,
dense KD from the teacher online, and top-k renormalised / top-k with the exact tail (bucket) /
sampled at several k and T, over seeds. Every problem is one StudyFileError line naming the file
and the key, as for image studies (rbkd.study.schema, whose reader this uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rbkd.config import check_kd_temperature
from rbkd.lm.train.config import MODEL_SIZES, LMTrainConfig
from rbkd.study.schema import (
    DEFAULT_MAX_RUNS,
    Study,
    StudyFileError,
    _check_seed,
    _Reader,
    _seeds,
)

KIND = "lm"
MODES = ("hard", "online", "renormalize", "bucket", "sampled")  # the storage modes of students
STORE_MODES = ("renormalize", "bucket", "sampled")
# rbkd.lm.store.TOPK_DTYPES's names, spelled out: the study layer imports no torch
# (tests/test_study_lm.py ties the two).
TOPK_DTYPE_NAMES = ("float32", "float16", "bfloat16")
_LM = LMTrainConfig()
# The training keys a [[teacher]] or [student] table may set (LMTrainConfig's fields that change
# the numbers; device, micro-batch and checkpoints are the runner's).
TRAIN_KEYS = ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
              "grad_clip", "eval_every")  # fmt: skip


def is_lm_study(data: dict) -> bool:
    head = data.get("study")
    return isinstance(head, dict) and head.get("kind") == KIND


def _model(r: _Reader) -> str | dict:
    """A named size (rbkd.lm.train.MODEL_SIZES) or a table of GPT-2 config keys."""
    value = r.table.get("model")
    if value is None:
        r.missing("model", f"a size ({', '.join(MODEL_SIZES)}) or a table such as "
                  "{ n_layer = 4, n_embd = 256, n_head = 4 }")  # fmt: skip
    if isinstance(value, str):
        if value not in MODEL_SIZES:
            raise r.fail("model", f"no size {value!r}; sizes: {', '.join(MODEL_SIZES)}, or a table")
        return value
    if not isinstance(value, dict):
        raise r.fail("model", f"must be a size or a table, got {type(value).__name__}")
    for key in ("n_layer", "n_embd", "n_head"):
        v = value.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise r.fail(f"model.{key}", f"must be an integer >= 1, got {v!r}")
    if value["n_embd"] % value["n_head"]:
        raise r.fail(
            "model", f"n_embd {value['n_embd']} is not a multiple of n_head {value['n_head']}"
        )
    return dict(value)


def _train(r: _Reader, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The LMTrainConfig fields the table sets, checked by LMTrainConfig itself."""
    r.known("model", *TRAIN_KEYS, *extra)
    out = {}
    for key in TRAIN_KEYS:
        kind = float if isinstance(getattr(_LM, key), float) else int
        value = r.get(key, kind)
        if value is not None:
            out[key] = value
    try:
        LMTrainConfig(**out).check()
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise r.fail(field if field in out else "steps", str(e)) from None
    return out


def _positive(r: _Reader, key: str, default: int | None) -> int | None:
    value = r.get(key, int, default)
    if value is not None and value < 1:
        raise r.fail(key, f"must be an integer >= 1, got {value}")
    return value


def _temperatures(r: _Reader, key: str, default: list[float]) -> list[float]:
    values = r.number_list(key, float, default, positive=True)
    for T in values:
        try:
            check_kd_temperature(T, "T")
        except ValueError as e:
            raise r.fail(key, str(e)) from None
    if len(set(values)) != len(values):
        raise r.fail(key, f"lists a temperature twice: {values}")
    return [float(T) for T in values]


def _teacher(r: _Reader) -> dict[str, Any]:
    name = r.name("name")
    out = {"name": name, "model": _model(r), "train": _train(r, ("name", "seed", "train_tokens"))}
    out["seed"] = r.get("seed", int, 0)
    _check_seed(r, "seed", out["seed"])
    out["train_tokens"] = _positive(r, "train_tokens", None)  # None: the whole train split
    return out


def parse_lm_study(data: dict, path: Path) -> Study:
    """Check an LM study's TOML content; the normalised study (a plain dict, saved as study.json)."""
    top = _Reader(path, data, "")
    top.known("study", "data", "capture", "student", "teacher", "grid")
    head = top.sub("study")
    head.known("name", "kind", "description", "seeds", "limit", "corpus", "vocab_size", "tokenizer",
               "max_runs")  # fmt: skip
    study = Study(name=head.name("name"), kind=KIND, description=head.get("description", str, ""),
                  seeds=_seeds(head, "seeds", [0, 1]), limit=_positive(head, "limit", None))  # fmt: skip
    study.path = path
    for key in ("corpus", "tokenizer"):  # relative to the study file
        value = head.get(key, str, None)
        study[key] = None if value is None else str(
            Path(value) if Path(value).is_absolute() else path.parent / value)  # fmt: skip
    study["vocab_size"] = _positive(head, "vocab_size", None if study["tokenizer"] else 8192)
    if study["tokenizer"] and study["vocab_size"]:
        raise head.fail("vocab_size", "give tokenizer or vocab_size (to train one), not both")

    d = top.sub("data") or _Reader(path, {}, "data")
    d.known("context", "student_tokens", "eval_tokens")
    study["data"] = {"context": _positive(d, "context", 128),
                     "student_tokens": _positive(d, "student_tokens", None),
                     "eval_tokens": _positive(d, "eval_tokens", 65536)}  # fmt: skip

    c = top.sub("capture") or _Reader(path, {}, "capture")
    c.known("k", "T", "sample_T", "topk_dtype", "batch_size")
    study["capture"] = {
        "k": _positive(c, "k", 128), "T": _temperatures(c, "T", [0.5, 1.0, 2.0, 4.0]),
        "sample_T": _temperatures(c, "sample_T", [1.0])[0],
        "topk_dtype": c.choice("topk_dtype", TOPK_DTYPE_NAMES, "bfloat16"),
        "batch_size": _positive(c, "batch_size", 16),
    }  # fmt: skip

    s = top.sub("student") or top.missing("student", "the students' model and training")
    study["student"] = {"model": _model(s), "train": _train(s, ("alpha",))}
    alpha = s.get("alpha", float, 0.9)
    if not 0 < alpha <= 1:
        raise s.fail("alpha", f"must be in (0, 1] (hard-label students are the 'hard' mode), got {alpha}")  # fmt: skip
    study["student"]["alpha"] = alpha

    teachers = []
    for i, table in enumerate(top.get("teacher", list, [])):
        if not isinstance(table, dict):
            raise top.fail(f"teacher[{i}]", "must be a table ([[teacher]])")
        teachers.append(_teacher(_Reader(path, table, f"teacher[{i}]")))
    if not teachers:
        top.missing("teacher", "declare at least one [[teacher]]")
    names = [t["name"] for t in teachers]
    dup = [n for n in names if names.count(n) > 1]
    if dup:
        raise top.fail("teacher", f"two teachers are named {dup[0]!r}; names must differ")
    study["teachers"] = teachers

    g = top.sub("grid") or _Reader(path, {}, "grid")
    g.known("modes", "k", "T", "teachers")
    modes = g.get("modes", list, list(MODES))
    for m in modes:
        if m not in MODES:
            raise g.fail("modes", f"no mode {m!r}; modes: {', '.join(MODES)}")
    ks = [int(k) for k in g.number_list("k", int, [8, 32, 128], positive=True)]
    big = [k for k in ks if k > study["capture"]["k"]]
    if big:
        raise g.fail("k", f"k = {big[0]} is larger than the captured k = {study['capture']['k']} "
                     "([capture] k): the smaller k are read from that store")  # fmt: skip
    temps = _temperatures(g, "T", [1.0, 2.0])
    off = [T for T in temps if T not in study["capture"]["T"]]
    if off and any(m in ("renormalize", "bucket") for m in modes):
        raise g.fail("T", f"T = {off[0]:g} is not in the captured grid {study['capture']['T']} "
                     "([capture] T): exact values exist only there")  # fmt: skip
    chosen = g.get("teachers", list, names)
    for n in chosen:
        if n not in names:
            raise g.fail("teachers", f"no teacher named {n!r}; the study has {', '.join(names)}")
    study["grid"] = {"modes": modes, "k": ks, "T": temps, "teachers": list(chosen)}
    max_runs = _positive(head, "max_runs", DEFAULT_MAX_RUNS)
    from rbkd.study.lm_plan import count_cells  # here: lm_plan imports this module

    n = count_cells(study)
    if n > max_runs:
        raise head.fail("max_runs", f"the study plans {n:,} runs, more than max_runs = "
                        f"{max_runs:,}; shrink the grid or raise max_runs")  # fmt: skip
    return study


__all__ = ["KIND", "MODES", "STORE_MODES", "StudyFileError", "is_lm_study", "parse_lm_study"]
