"""The verbs: train a language-model teacher, distill a student. Each is one implementation
(`rbkd lm train-teacher` / `rbkd lm distill` and rbkd.lm.train_teacher / rbkd.lm.distill), run
the way rbkd's image runs are (rbkd.study.teacher, rbkd.study.student): a content key over every
input that changes the numbers, a run folder named by it, the same command again trains
nothing, a killed run resumes from its last step checkpoint, a folder holding another run is
refused, and only rank 0 locks and writes under torchrun.

A teacher's folder: config.json, metrics.jsonl, checkpoint.safetensors, model/ (the Hugging Face
folder: config.json + model.safetensors, loadable by from_pretrained and `rbkd lm soft-labels`)
and result.json, written last. A student's: the same with report.json.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rbkd.engine.device import resolve_device
from rbkd.engine.distributed import main_folder_lock, on_main, setup
from rbkd.engine.rundir import check_run_folder
from rbkd.io import read_json_file, write_json
from rbkd.lm.train.baseline import unigram_perplexity
from rbkd.lm.train.config import LMTrainConfig
from rbkd.lm.train.loop import fit_lm, resolve_precision
from rbkd.lm.train.models import HF_FOLDER, build_model, model_config, quietly, save_hf_folder
from rbkd.lm.train.objectives import HardLabels, OnlineTeacher, StoredTeacher
from rbkd.lm.train.tokens import check_windows, num_windows, split_identity
from rbkd.provenance import recording
from rbkd.study.keys import KEY_CHARS, run_key
from rbkd.study.runstate import RunState, run_state

RESULT_FILE, REPORT_FILE = "result.json", "report.json"
TAILS = ("bucket", "renormalize", "sampled")


def _inputs(train, val, config: dict, cfg: LMTrainConfig) -> dict[str, Any]:
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    return {"train": split_identity(train), "validation": None if val is None else split_identity(val),
            "model": config, **cfg.result_inputs(), "precision": precision}  # fmt: skip


def _size_name(size) -> str:
    return (
        size
        if isinstance(size, str) and "/" not in size and not size.endswith(".json")
        else "custom"
    )


def default_splits(train, val):
    """The pydocs corpus's train and validation tokens (its BPE-8192) where none are given."""
    if train is None:
        from rbkd.lm.tokens import corpus_tokens

        train = corpus_tokens("train")
        val = corpus_tokens("validation") if val is None else val
    return train, val


def _check_splits(train, val, cfg: LMTrainConfig) -> None:
    cfg.check()
    check_windows(train, cfg.context)
    if val is not None:
        check_windows(val, cfg.context)
        if val.vocab_size != train.vocab_size or val.tokenizer_sha256 != train.tokenizer_sha256:
            raise ValueError(
                "the validation split was tokenised with another tokenizer than the training split"
            )


def _run(kind: str, result_file: str, run_dir: Path | None, key: str, cfg, resume, train_fn):
    """Lock, reuse, resume or train (rank 0 decides; every rank takes the same path)."""
    if run_dir is None:
        ctx = setup(cfg.device)
        try:
            return {**train_fn(None, 0), "run_dir": None, "reused": False}
        finally:
            ctx.close()
    with main_folder_lock(run_dir, kind, cfg.device, claim=check_run_folder) as ctx:
        if resume is None:
            state = on_main(ctx, lambda: run_state(run_dir, key, result_file))
        else:
            state = RunState(run_dir, key, "new")
        if state.status == "done":
            return {**state.result, "run_dir": str(run_dir), "reused": True}
        result = train_fn(run_dir, state.epochs_done)

        def finish() -> dict:
            write_json(run_dir / result_file, result)  # last: the mark of a finished run
            return result

        return {**on_main(ctx, finish), "run_dir": str(run_dir), "reused": False}


def train_teacher(train=None, val=None, *, model: str | dict | Path = "teacher", cfg: LMTrainConfig | None = None,
                  out: Path | None = None, root: Path | None = Path("runs"), resume: bool | None = None,
                  progress: bool = True, invocation: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse, or resume) a causal-LM teacher on next-token cross-entropy.

    train, val: token splits (rbkd.lm.tokens.TokenSplit or MemoryTokens; default: pydocs' with
    its BPE-8192; val None: no validation). model: a size of rbkd.lm.train.MODEL_SIZES, a GPT-2
    config dict or a config JSON path. The run goes to `out`, else root/lm-teacher-<size>-<key>
    (both None: nothing is written, and the trained model is returned as `model_object`).
    Returns result.json's content plus run_dir and reused."""
    cfg = cfg or LMTrainConfig()
    train, val = default_splits(train, val)
    _check_splits(train, val, cfg)
    config = model_config(
        model if not isinstance(model, Path) else str(model), train.vocab_size, cfg.context
    )
    key = run_key("lm-teacher", _inputs(train, val, config, cfg))
    run_dir = Path(out) if out is not None else (
        Path(root) / f"lm-teacher-{_size_name(model)}-{key[:KEY_CHARS]}" if root is not None else None)  # fmt: skip

    def train_fn(run_dir, steps_done) -> dict:
        net = build_model(config, cfg.seed)
        t0 = time.perf_counter()
        extra = {"command": "lm train-teacher", "key": key}
        with recording(invocation):
            metrics = fit_lm(net, train, val, cfg, HardLabels(), run_dir=run_dir, resume=True if resume is None else resume,
                             progress=progress, extra_config=extra)  # fmt: skip
        if val is not None:
            metrics["unigram_perplexity"] = unigram_perplexity(
                train, val, cfg.context, cfg.eval_tokens
            )
        result = {"key": key, "kind": "lm-teacher", "model": _size_name(model), "model_config": config,
                  "train_config": cfg.result_inputs(), "metrics": metrics,
                  "steps": metrics["steps"], "epochs": metrics["steps"],
                  "wall_time_s": time.perf_counter() - t0, "resumed_from_step": steps_done}  # fmt: skip
        if run_dir is not None:
            on_main_save(net, run_dir)
            result["hf_folder"] = str(run_dir / HF_FOLDER)
        else:
            result["model_object"] = net
        return result

    return _run("teacher", RESULT_FILE, run_dir, key, cfg, resume, train_fn)


def on_main_save(net, run_dir: Path) -> None:
    from rbkd.engine.distributed import is_main_process

    if is_main_process():
        save_hf_folder(net, run_dir / HF_FOLDER)


def _source(train, cfg, *, store, teacher, T, k, tail, alpha):
    """(objective factory, its identity for the key, the teacher model when one is given): hard
    labels, a store, or a teacher online. The teacher also scores the KL to it on validation."""
    if not (math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if store is None and teacher is None:
        if alpha != 0:
            raise ValueError(
                f"alpha = {alpha:g} needs a teacher: give --store DIR or --teacher RUN, or alpha 0 "
                "(hard labels only)"
            )
        return (lambda: HardLabels()), {"kind": "hard_labels"}, None
    if not (math.isfinite(T) and 0 < T <= 100):
        raise ValueError(f"T must be a finite number in (0, 100], got {T}")
    if store is not None:  # with a teacher too: the store must be that teacher's
        model = _load_teacher(Path(teacher), train, cfg) if teacher is not None else None
        expected = _teacher_identity(model)[1] if model is not None else None
        make, described = _store_source(train, cfg, Path(store), T=T, k=k, tail=tail,
                                        alpha=alpha, teacher_sha256=expected)  # fmt: skip
        if model is not None:  # it also scores the KL to the teacher on validation tokens
            described["validation_teacher_sha256"] = expected
        return make, described, model
    return _teacher_source(train, cfg, Path(teacher), T=T, alpha=alpha)


def hf_folder(path: Path) -> Path:
    """The Hugging Face folder of a teacher: a run folder's model/ (its own config.json is
    rbkd's run record, not a model config), else `path` itself (any HF folder)."""
    path = Path(path)
    if (path / HF_FOLDER / "config.json").is_file():
        return path / HF_FOLDER
    from rbkd.lm.capture import teacher_folder

    return teacher_folder(path)


def _teacher_identity(model) -> tuple[dict, str]:
    from rbkd.lm.capture import teacher_identity

    return teacher_identity(model)


def _load_teacher(path: Path, train, cfg):
    """A teacher for the student's data: its vocabulary the tokenizer's, its context long enough."""
    from rbkd.lm.capture import load_teacher, teacher_positions

    folder = hf_folder(path)
    teacher = quietly(load_teacher, folder)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if vocab != train.vocab_size:
        raise ValueError(
            f"the teacher's vocabulary has {vocab} ids, the student's data {train.vocab_size}: "
            "distill on the tokenizer the teacher was trained with"
        )
    positions = teacher_positions(teacher)
    if positions is not None and positions < cfg.context:
        raise ValueError(
            f"sequences of {cfg.context} tokens are longer than the teacher's context "
            f"({positions}): use --context {positions} or less"
        )
    teacher.rbkd_folder = str(folder)
    return teacher


def _store_source(train, cfg, folder, *, T, k, tail, alpha, teacher_sha256=None):
    from rbkd.lm.capture import CAPTURE_FILE
    from rbkd.lm.store import StoreError
    from rbkd.lm.train.store_reader import StoreRows, open_store

    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    store = open_store(folder, T=T, k=k, tail=tail, vocab_size=train.vocab_size,
                       tokens_needed=num_windows(train, cfg.context) * cfg.context,
                       tokenizer_sha256=train.tokenizer_sha256,
                       corpus_sha256=train.positions_sha256,
                       teacher_sha256=teacher_sha256)  # fmt: skip
    settings = folder / CAPTURE_FILE
    if settings.is_file():
        captured = read_json_file(settings, "capture settings").get("context")
        if captured != cfg.context:
            raise StoreError(
                f"store {folder} was captured at context {captured}, the student trains at "
                f"{cfg.context}: the teacher saw other prefixes; use --context {captured}"
            )
    k = k or store.spec.k
    identity = {"spec_sha256": store.spec.digest(),
                "shards_sha256": run_key("shards", {str(i): e.get("sha256") for i, e in store.entries.items()})}  # fmt: skip
    if tail == "sampled":  # it reads the samples: their number names the run, not k
        k = store.spec.samples
    described = {"kind": "store", "store": identity, "T": T, "k": k, "tail": tail, "alpha": alpha}
    return (lambda: StoredTeacher(StoreRows(store, T, k, samples=tail == "sampled"), T=T, alpha=alpha, tail=tail,
                                  identity={**identity, "folder": str(folder)})), described  # fmt: skip


def _teacher_source(train, cfg, path, *, T, alpha):
    teacher = _load_teacher(path, train, cfg)
    identity = {"teacher_sha256": _teacher_identity(teacher)[1]}
    described = {"kind": "online_teacher", "teacher": identity, "T": T, "alpha": alpha}
    folder = {**identity, "folder": teacher.rbkd_folder}
    return (lambda: OnlineTeacher(teacher, T=T, alpha=alpha, identity=folder)), described, teacher


def distill(train=None, val=None, *, store: Path | None = None, teacher: Path | None = None, T: float = 1.0,
            k: int | None = None, tail: str = "bucket", alpha: float = 0.5,
            model: str | dict | Path = "student", cfg: LMTrainConfig | None = None,
            out: Path | None = None, root: Path | None = Path("runs"), resume: bool | None = None,
            progress: bool = True, invocation: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Distill (or reuse, or resume) a causal-LM student: from a sparse store (`store`, with T,
    k <= the store's, tail), from a teacher run online (`teacher`: dense kd_loss on its logits),
    or from hard labels only (neither, alpha 0). The loss per token is
    (1 - alpha) CE + alpha T^2 KD. `store` and `teacher` together: the store, refused unless
    it was captured from that teacher. Returns report.json's content plus run_dir and reused."""
    cfg = cfg or LMTrainConfig()
    train, val = default_splits(train, val)
    _check_splits(train, val, cfg)
    config = model_config(
        model if not isinstance(model, Path) else str(model), train.vocab_size, cfg.context
    )
    make_objective, source, teacher_model = _source(
        train, cfg, store=store, teacher=teacher, T=T, k=k, tail=tail, alpha=alpha
    )
    key = run_key("lm-student", {**_inputs(train, val, config, cfg), "source": source})
    mode = {"hard_labels": "hard", "online_teacher": "online"}.get(
        source["kind"], source.get("tail")
    )
    name = f"lm-student-{_size_name(model)}-{mode}"
    if source["kind"] != "hard_labels":
        name += f"-T{T:g}-a{alpha:g}" + (f"-k{source['k']}" if source["kind"] == "store" else "")
    run_dir = Path(out) if out is not None else (
        Path(root) / f"{name}-s{cfg.seed}-{key[:KEY_CHARS]}" if root is not None else None)  # fmt: skip

    def train_fn(run_dir, steps_done) -> dict:
        net = build_model(config, cfg.seed)
        t0 = time.perf_counter()
        extra = {"command": "lm distill", "key": key, "source": source}
        # the teacher, when there is one to run, scores the KL to it on validation tokens
        with recording(invocation):
            metrics = fit_lm(net, train, val, cfg, make_objective(), run_dir=run_dir,
                             resume=True if resume is None else resume, progress=progress,
                             extra_config=extra, val_teacher=teacher_model)  # fmt: skip
        report = {"key": key, "kind": "lm-student", "model": _size_name(model), "model_config": config,
                  "source": source, "T": T if source["kind"] != "hard_labels" else None,
                  "k": source.get("k"), "tail": source.get("tail"), "alpha": alpha,
                  "train_config": cfg.result_inputs(), "metrics": metrics, "steps": metrics["steps"],
                  "epochs": metrics["steps"], "wall_time_s": time.perf_counter() - t0,
                  "resumed_from_step": steps_done}  # fmt: skip
        if run_dir is not None:
            on_main_save(net, run_dir)
            report["hf_folder"] = str(run_dir / HF_FOLDER)
        else:
            report["model_object"] = net
        return report

    return _run("distillation", REPORT_FILE, run_dir, key, cfg, resume, train_fn)
