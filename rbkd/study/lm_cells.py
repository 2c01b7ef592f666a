"""Running one cell of an LM study: a teacher, a store (capture + its entropy), or a student
(distill + its KL to the teacher on validation tokens). Each writes `cell.json` last, holding its
key and the numbers the report reads; the runs inside are rbkd.lm's own content-addressed run
folders (`<cell>/run`, `<cell>/store`), so a cell killed half-way resumes from its last checkpoint
or its last shard.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from rbkd.io import read_json_file, write_json
from rbkd.lm.store import TOPK_DTYPES
from rbkd.study.lm_plan import CELL_FILE, LMCell, train_config

RUN, STORE, ENTROPY_FILE = "run", "store", "entropy.json"


def cell_result(cell: LMCell) -> dict | None:
    """cell.json when it carries the cell's key (the cell is done), else None."""
    path = cell.folder / CELL_FILE
    if not path.is_file():
        return None
    try:
        value = read_json_file(path, "cell file")
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("key") == cell.key else None


def mode_bytes(mode: str, k: int | None, topk_dtype: str) -> int | None:
    """Bytes per token a store must hold for this student, at one temperature: the ids (int32)
    and logits it reads, the log-partition the mode needs (bucket: at T; sampled: at T and at
    the sampling T, for the importance weights; renormalize: none), sample counts (int32), and
    the position's input id and document offset every store row carries (8 bytes)."""
    value = TOPK_DTYPES[topk_dtype].itemsize
    if mode in ("hard", "online") or k is None:
        return 0 if mode == "hard" else None
    per = {"renormalize": (4 + value, 0), "bucket": (4 + value, 4), "sampled": (8 + value, 8)}
    each, logz = per[mode]
    return k * each + logz + 8


def _teacher_spec(study: dict, name: str) -> dict:
    return next(t for t in study["teachers"] if t["name"] == name)


def teacher_model_folder(cell: LMCell) -> Path:
    return cell.folder / RUN / "model"


def run_teacher(cell: LMCell, study: dict, data, device: str, progress: bool) -> dict:
    from rbkd.lm.train.runs import train_teacher

    t = _teacher_spec(study, cell.teacher)
    cfg = train_config(study, t["train"], t["seed"], device)
    started = time.perf_counter()
    result = train_teacher(data.teacher_train[t["name"]], data.validation, model=t["model"],
                           cfg=cfg, out=cell.folder / RUN, root=None, progress=progress)  # fmt: skip
    m = result["metrics"]
    return {"kind": "teacher", "teacher": t["name"], "parameters": m.get("parameters"),
            "steps": cfg.steps, "batch_size": cfg.batch_size, "context": cfg.context,
            "train_tokens": m.get("tokens_seen"), "val_ce_loss": m.get("val_ce_loss"),
            "val_perplexity": m.get("val_perplexity"),
            "unigram_perplexity": m.get("unigram_perplexity"),
            "train_tokens_per_s": m.get("tokens_per_s"), "train_wall_s": result.get("wall_time_s"),
            "wall_s": time.perf_counter() - started}  # fmt: skip


def run_store(
    cell: LMCell, study: dict, data, device: str, progress: bool, teacher: LMCell
) -> dict:
    from rbkd.analysis.token_entropy import token_entropy
    from rbkd.lm.capture import capture, load_teacher

    i, cap = cell.inputs, study["capture"]
    model = load_teacher(teacher_model_folder(teacher))
    folder = cell.folder / STORE
    started = time.perf_counter()
    got = capture(model, data.student_train, folder, k=i["k"], temperatures=i["T"],
                  samples=i["samples"], sample_T=i["sample_T"], context=i["context"],
                  batch_size=cap["batch_size"], topk_dtype=i["topk_dtype"], device=device,
                  progress=progress)  # fmt: skip
    # The capture's speed as measured when its shards were written (a resumed capture: the
    # part this process wrote).
    disk = sum(p.stat().st_size for p in folder.glob("shard-*.safetensors"))
    out = {"kind": "store", "teacher": cell.teacher, "k": i["k"], "samples": i["samples"],
           "T": i["T"], "tokens": got.spec.num_tokens, "capture_tokens": got.tokens_written,
           "capture_s": got.seconds, "capture_tokens_per_s": got.tokens_per_s,
           "disk_bytes_per_token": disk / max(got.spec.num_tokens, 1)}  # fmt: skip
    if i["k"] > 1:  # the store with the top-k: its entropy and top-k mass (exact, from the store)
        entropy = token_entropy(folder)
        write_json(cell.folder / ENTROPY_FILE, entropy)
        out["mean_entropy"] = entropy["mean_entropy"]
        out["max_entropy"] = entropy["max_entropy"]
        out["topk_mass"] = entropy["topk_mass"]["mean_mass"]
    out["wall_s"] = time.perf_counter() - started
    return out


def run_student(cell: LMCell, study: dict, data, device: str, progress: bool,
                cells: dict[str, LMCell], teachers: dict[str, LMCell]) -> dict:  # fmt: skip
    from rbkd.lm.train.runs import distill

    i, s = cell.inputs, study["student"]
    seed = i["train_config"]["seed"]
    cfg = train_config(study, s["train"], seed, device)
    mode = i["mode"]
    kw: dict[str, Any] = {"alpha": i["alpha"]}
    if mode == "online":
        kw.update(teacher=teacher_model_folder(teachers[cell.teacher]), T=i["T"])
    elif mode != "hard":
        store = cells[i["source"]].folder / STORE
        kw.update(store=store, T=i["T"], tail=mode, k=None if mode == "sampled" else i["k"])
    started = time.perf_counter()
    result = distill(data.student_train, data.validation, model=s["model"], cfg=cfg,
                     out=cell.folder / RUN, root=None, progress=progress, **kw)  # fmt: skip
    m = result["metrics"]
    names = [cell.teacher] if cell.teacher else list(study["grid"]["teachers"])
    kl = {
        n: validation_kl(
            Path(result["hf_folder"]),
            teacher_model_folder(teachers[n]),
            data.validation,
            cfg.context,
            cfg.eval_tokens,
            device,
        )  # fmt: skip
        for n in names
    }
    return {"kind": "student", "teacher": cell.teacher, "mode": mode, "T": i["T"], "k": i["k"],
            "seed": seed, "alpha": i["alpha"], "parameters": m.get("parameters"),
            "val_ce_loss": m.get("val_ce_loss"), "val_perplexity": m.get("val_perplexity"),
            "kl_to_teacher": kl,
            "bytes_per_token": mode_bytes(mode, i["k"], study["capture"]["topk_dtype"]),
            "distill_tokens_per_s": m.get("tokens_per_s"), "train_tokens": m.get("tokens_seen"),
            "train_wall_s": result.get("wall_time_s"),
            "wall_s": time.perf_counter() - started}  # fmt: skip


@torch.no_grad()
def validation_kl(student: Path, teacher: Path, val, context: int, eval_tokens: int, device: str) -> dict:  # fmt: skip
    """KL(p_teacher || p_student) at T = 1, in nats per token, and both models' cross-entropy,
    over the validation windows the training loop scores (the first eval_tokens // context),
    accumulated in float64."""
    from rbkd.engine.device import resolve_device
    from rbkd.lm.capture import load_teacher
    from rbkd.lm.train.tokens import num_windows, read_windows

    dev = resolve_device(device)
    s_model, t_model = load_teacher(student).to(dev), load_teacher(teacher).to(dev)
    windows = num_windows(val, context)
    if eval_tokens:
        windows = min(windows, max(eval_tokens // context, 1))
    sums = torch.zeros(3, dtype=torch.float64)
    count = 0
    for j in range(0, windows, 16):
        blocks = read_windows(val, torch.arange(j, min(j + 16, windows)), context).to(dev)
        x, y = blocks[:, :-1], blocks[:, 1:].reshape(-1)
        ls = torch.log_softmax(s_model(input_ids=x).logits.double(), -1).flatten(0, 1)
        lt = torch.log_softmax(t_model(input_ids=x).logits.double(), -1).flatten(0, 1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        rows = torch.arange(len(y), device=dev)
        sums += torch.stack([kl.sum(), -ls[rows, y].sum(), -lt[rows, y].sum()]).cpu()
        count += len(y)
    kl, s_ce, t_ce = (sums / max(count, 1)).tolist()
    return {"kl": kl, "student_ce": s_ce, "teacher_ce": t_ce, "tokens": count,
            "teacher_perplexity": math.exp(t_ce)}  # fmt: skip


def finish(cell: LMCell, numbers: dict) -> dict:
    """cell.json, written last and atomically: the mark of a finished cell."""
    record = {"key": cell.key, "name": cell.name, **numbers}
    write_json(cell.folder / CELL_FILE, record)
    return record
