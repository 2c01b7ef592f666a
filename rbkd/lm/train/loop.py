"""fit_lm: the step loop that trains a causal language model (see rbkd/lm/train/__init__.py).

One optimizer step: the global batch of windows (tokens.WindowOrder) is split over the ranks
(each takes a contiguous share, as the engine's fit does) and each rank's share into
micro-batches; every micro-batch's summed loss is scaled by world / (the global batch's token
count), so the accumulated, DDP-averaged gradient is the gradient of the mean over the global
batch, whatever the micro-batch and the number of ranks. Then the gradients are unscaled (fp16),
clipped to a global 2-norm, checked finite, and AdamW steps at the schedule's learning rate.
Everything random derives from (seed, step): a run resumed from its checkpoint replays exactly
what the uninterrupted run does (tests/test_lm_train.py checks bitwise equality).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from torch import nn

from rbkd.engine import checkpoint as ckpt
from rbkd.engine import distributed
from rbkd.engine.loop import TrainingDiverged
from rbkd.engine.rundir import RunDirError, write_metrics
from rbkd.engine.runinfo import check_resumable, describe_model
from rbkd.engine.seeds import derive_seed
from rbkd.io import remove_stale_temporaries, write_json
from rbkd.lm.train.config import LMTrainConfig
from rbkd.lm.train.objectives import IGNORE_INDEX
from rbkd.lm.train.progress import StepProgress
from rbkd.lm.train.schedule import lr_at
from rbkd.lm.train.tokens import (
    WindowOrder,
    check_windows,
    num_windows,
    read_windows,
    split_identity,
)
from rbkd.locking import folder_lock
from rbkd.provenance import run_provenance

_DROPOUT_STREAM = 1


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto": bf16 on a GPU that has it, else fp32. On this CPU bf16 autocast is many times
    slower than fp32 (docs/lm-training.md), so the CPU default is fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError(
                "precision fp16 needs a CUDA device (its loss scaling); use bf16 or fp32"
            )
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Autocast's half-precision logits to float32 for the loss; float32/64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(model: nn.Module, cfg: LMTrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (GPT-2 / nanoGPT practice: not on biases,
    LayerNorm gains or 1-D parameters); fused: one kernel for all parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def micro_batches(cfg: LMTrainConfig, world: int) -> tuple[int, int]:
    """(sequences per rank per step, per forward): every rank runs the same number of
    micro-batches, so DDP's gradient synchronisation lines up."""
    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size {cfg.batch_size} does not split evenly over {world} ranks: use a "
            f"multiple of {world}"
        )
    share = cfg.batch_size // world
    micro = min(cfg.micro_batch or share, share)
    if share % micro:
        raise ValueError(
            f"micro_batch {micro} does not divide the {share} sequences each rank takes per step: "
            "use a divisor of it"
        )
    return share, micro


def fit_lm(model: nn.Module, train, val, cfg: LMTrainConfig,
           objective, *, run_dir: Path | None = None, resume: bool = False, progress: bool = True,
           extra_config: dict | None = None, on_row=None, val_teacher=None) -> dict:  # fmt: skip
    """Train `model` (a causal LM returning `.logits`) in place for cfg.steps steps on `train`
    against `objective`; score `val` every cfg.eval_every steps and at the end; checkpoint to
    `run_dir` every cfg.checkpoint_every steps (rank 0). Returns the final metrics; `on_row(row)`
    receives each metrics row (metrics.jsonl's) as it is made, on every rank. `val_teacher` (a
    causal LM): validation also reports the mean KL(teacher || model) per token at T = 1."""
    cfg.check()
    ctx = distributed.setup(cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    lock = (
        folder_lock(run_dir, "run")
        if run_dir is not None and ctx.is_main
        else contextlib.nullcontext()
    )
    try:
        with lock, torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            return _fit(model, train, val, cfg, objective, ctx, run_dir, resume, progress,
                        extra_config, on_row, val_teacher)  # fmt: skip
    finally:
        ctx.close()


def _fit(model, train, val, cfg, objective, ctx, run_dir, resume, progress, extra_config, on_row,
         val_teacher):  # fmt: skip
    device, world = ctx.device, ctx.world_size
    precision = resolve_precision(cfg.precision, device)
    check_windows(train, cfg.context)
    if val is not None:
        check_windows(val, cfg.context)
    share, micro = micro_batches(cfg, world)
    model.to(device)
    objective.to(device)
    if hasattr(objective, "autocast"):  # a teacher run online computes in the run's precision
        objective.autocast = lambda: autocast(precision, device)
    if val_teacher is not None:
        val_teacher.to(device).eval()
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    config = _run_config(model, train, val, cfg, objective, precision, world, extra_config)
    if run_dir is not None and ctx.is_main:  # how it was made; never compared, never in a key
        config["provenance"] = run_provenance(device, model, ())
        config["provenance"]["data_files"] = _token_files(train, val)
    start, history, state = _open_run_dir(run_dir, resume, config, model, optimizer, scaler, ctx)
    order = WindowOrder(num_windows(train, cfg.context), cfg.seed)
    net = distributed.wrap_model(model, ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    with StepProgress(progress, cfg.steps, start, main=ctx.is_main) as bar:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, lr=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                       min_lr_ratio=cfg.min_lr_ratio)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(derive_seed(cfg.seed, step, _DROPOUT_STREAM, ctx.rank))
            windows = ctx.shard(order.batch(step, cfg.batch_size))
            blocks = read_windows(train, windows, cfg.context).to(device)
            inputs, labels = blocks[:, :-1], blocks[:, 1:]
            counted = (labels != IGNORE_INDEX).sum().float().reshape(1)
            count = float(ctx.all_reduce_sum(counted).item())
            net.train()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            ce_sum = torch.zeros((), device=device)
            for j in range(0, share, micro):
                last = j + micro >= share
                sync = net.no_sync() if world > 1 and not last else contextlib.nullcontext()
                x, y = inputs[j : j + micro], labels[j : j + micro]
                with sync:
                    with autocast(precision, device):
                        logits = net(input_ids=x).logits
                    loss, ce = objective(
                        _upcast(logits), x, y, windows[j : j + micro] * cfg.context
                    )
                    scaler.scale(loss * (world / max(count, 1.0))).backward()
                loss_sum, ce_sum = loss_sum + loss.detach(), ce_sum + ce
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            )
            stats = ctx.all_reduce_sum(torch.stack([loss_sum.float(), ce_sum.float()]))
            batch_loss, batch_ce = (float(v) for v in stats.tolist())
            grad_norm = float(norm)
            if not math.isfinite(batch_loss) or (
                not math.isfinite(grad_norm) and precision != "fp16"
            ):
                what = (
                    f"loss became {batch_loss / count}"
                    if not math.isfinite(batch_loss)
                    else "gradients became NaN or inf"
                )
                raise TrainingDiverged(
                    f"{what} at step {step + 1}/{cfg.steps} (lr={lr:.3g}); the weights were not "
                    "updated and the last checkpoint is intact: lower --lr or check the inputs"
                )
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            scaler.update()
            elapsed = time.perf_counter() - t0
            state["loss"] += batch_loss
            state["ce"] += batch_ce
            state["tokens"] += count
            state["time"] += elapsed
            state["total_tokens"] += count
            state["total_time"] += elapsed
            bar.step(batch_loss / count, count / elapsed)
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                row = _metrics_row(model, val, cfg, precision, ctx, state, done, lr, grad_norm,
                                   val_teacher)  # fmt: skip
                history.append(row)
                if on_row is not None:
                    on_row(dict(row))
                state.update(loss=0.0, ce=0.0, tokens=0.0, time=0.0)
                bar.log(_row_line(row, cfg.steps, objective))
            if (
                run_dir is not None
                and ctx.is_main
                and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
            ):
                info = {"unit": "step", "seed": cfg.seed, "world_size": world,
                        "state": state, "scaler": scaler.state_dict()}  # fmt: skip
                ckpt.save_checkpoint(run_dir, model, optimizer, done, info, config=config,
                                     metrics=history)  # fmt: skip
                write_metrics(run_dir, history)
    final = _final_metrics(model, val, cfg, precision, ctx, history, state, val_teacher)
    if run_dir is not None and ctx.is_main:
        write_json(run_dir / "config.json", {**config, "final_metrics": final})
    return final


def _token_files(*splits) -> list[dict]:
    """The token folders' index files (each lists its shards' SHA-256) the run read."""
    from rbkd.provenance import file_record

    records = []
    for split in splits:
        index = getattr(split, "folder", None)
        if index is not None and (index / "index.json").is_file():
            records.append({"split": split.split, **file_record(index / "index.json")})
    return records


def _architecture(hf_config) -> dict | None:
    """The model's config without what names a library version or a load-time choice (a resume
    under another transformers release is the same run)."""
    if hf_config is None:
        return None
    return {k: v for k, v in hf_config.to_diff_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype",
                                                    "torch_dtype", "use_cache")}  # fmt: skip


def _run_config(model, train, val, cfg, objective, precision, world, extra_config) -> dict:
    """config.json: the keys rbkd.engine.runinfo.check_resumable compares, in LM terms."""
    hf_config = getattr(model, "config", None)
    return {
        "dataset": getattr(train, "name", None) or f"corpus {train.corpus_sha256[:12]}",
        "arch": None,  # rbkd's image models only; the model is described by its HF config
        "model": {
            **describe_model(model),
            "config": _architecture(hf_config),
        },  # fmt: skip
        "train_data": split_identity(train),
        "test_data": None if val is None else split_identity(val),
        "transfer_set": {"windows": num_windows(train, cfg.context), "context": cfg.context},
        "objective": objective.describe(),
        "train_config": {**cfg.to_dict(), "precision": precision},
        "seed": cfg.seed,
        "world_size": world,
        "extra_config": extra_config or {},
    }


def _open_run_dir(run_dir, resume, config, model, optimizer, scaler, ctx):
    """(completed steps, metrics rows, the running sums) from the checkpoint, or a fresh start."""
    state = {"loss": 0.0, "ce": 0.0, "tokens": 0.0, "time": 0.0, "total_tokens": 0.0,
             "total_time": 0.0}  # fmt: skip
    if run_dir is None:
        return 0, [], state
    start, history = 0, []
    run_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        remove_stale_temporaries(run_dir)
    if resume and ckpt.has_checkpoint(run_dir):
        info = ckpt.read_checkpoint_info(run_dir)
        check_resumable(run_dir, config, info.get("config") or {}, "in the checkpoint")
        start, info = ckpt.load_checkpoint(run_dir, model, optimizer)
        history = list(info.get("metrics") or [])
        state.update(info.get("state") or {})
        if info.get("scaler"):
            scaler.load_state_dict(info["scaler"])
        started_by = (info.get("config") or {}).get("provenance")
        if "provenance" in config and isinstance(started_by, dict):
            resumes = [
                *started_by.get("resumes", []),
                {**config["provenance"], "resumed_at_step": start},
            ]
            config["provenance"] = {**started_by, "resumes": resumes}
    elif not resume and ckpt.has_checkpoint(run_dir):
        raise RunDirError(
            f"{run_dir} already holds a run: pass resume=True (--resume) to continue it, or "
            "choose a new run directory"
        )
    if ctx.is_main:
        write_json(run_dir / "config.json", config)
    return start, history, state


@torch.no_grad()
def validation_sums(
    model, val, cfg: LMTrainConfig, precision: str, ctx, teacher=None
) -> list[float]:
    """[summed next-token CE, token count, summed KL(teacher || model) at T = 1] over the
    validation windows scored (the first eval_tokens // context of them, or all), each rank
    scoring its share; the KL is 0 without a teacher."""
    total = num_windows(val, cfg.context)
    if cfg.eval_tokens:
        total = min(total, max(cfg.eval_tokens // cfg.context, 1))
    mine = ctx.shard(torch.arange(total))
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    batch = cfg.micro_batch or max(cfg.batch_size // ctx.world_size, 1)
    for j in range(0, len(mine), batch):
        blocks = read_windows(val, mine[j : j + batch], cfg.context).to(ctx.device)
        inputs, labels = blocks[:, :-1], blocks[:, 1:]
        with autocast(precision, ctx.device):
            logits = _upcast(model(input_ids=inputs).logits)
            reference = None if teacher is None else _upcast(teacher(input_ids=inputs).logits)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
        counted = labels != IGNORE_INDEX
        kl = torch.zeros((), device=ctx.device)
        if reference is not None:
            log_t, log_s = reference.log_softmax(-1), logits.log_softmax(-1)
            kl = ((log_t.exp() * (log_t - log_s)).sum(-1) * counted).sum()
        sums += torch.stack([ce.double(), counted.sum().double(), kl.double()])
    return ctx.all_reduce_sum(sums).tolist()


def _validation(model, val, cfg, precision, ctx, teacher) -> dict:
    """The validation numbers of a metrics row (NaN without a split, or the KL without a teacher)."""
    ce = kl = math.nan
    if val is not None:
        ce_sum, count, kl_sum = validation_sums(model, val, cfg, precision, ctx, teacher)
        ce = ce_sum / count if count else math.nan
        kl = kl_sum / count if count and teacher is not None else math.nan
    ppl = math.exp(ce) if math.isfinite(ce) else math.nan
    return {"val_ce_loss": ce, "val_perplexity": ppl, "val_kl_to_teacher": kl}


def _metrics_row(model, val, cfg, precision, ctx, state, step, lr, grad_norm, teacher) -> dict:
    tokens = max(state["tokens"], 1.0)
    return {
        "step": step,
        "lr": lr,
        "train_objective_loss": state["loss"] / tokens,  # mean over this row's steps' tokens
        "train_ce_loss": state["ce"] / tokens,
        **_validation(model, val, cfg, precision, ctx, teacher),
        "grad_norm": grad_norm,  # before clipping, at the row's last step
        "tokens_per_s": state["tokens"] / max(state["time"], 1e-9),
        "tokens_seen": state["total_tokens"],
    }


def _row_line(row: dict, steps: int, objective) -> str:
    val = f"val CE {row['val_ce_loss']:.4f} ppl {row['val_perplexity']:.1f}"
    if math.isfinite(row.get("val_kl_to_teacher", math.nan)):
        val += f" KL to teacher {row['val_kl_to_teacher']:.4f}"
    return (f"step {row['step']}/{steps}: train {objective.name} {row['train_objective_loss']:.4f} "
            f"CE {row['train_ce_loss']:.4f} | {val} | lr {row['lr']:.2e} | "
            f"{row['tokens_per_s']:,.0f} tokens/s")  # fmt: skip


def _final_metrics(model, val, cfg, precision, ctx, history, state, teacher) -> dict:
    last = history[-1] if history else None
    if last is not None and last["step"] == cfg.steps:
        scores = {k: last.get(k, math.nan) for k in ("val_ce_loss", "val_perplexity",
                                                      "val_kl_to_teacher")}  # fmt: skip
    else:
        scores = _validation(model, val, cfg, precision, ctx, teacher)
    return {
        "steps": cfg.steps,
        **scores,
        "train_objective_loss": last["train_objective_loss"] if last else math.nan,
        "train_ce_loss": last["train_ce_loss"] if last else math.nan,
        "tokens_seen": state["total_tokens"],
        "train_time_s": state["total_time"],
        "tokens_per_s": state["total_tokens"] / state["total_time"]
        if state["total_time"]
        else math.nan,
        "precision": precision,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
