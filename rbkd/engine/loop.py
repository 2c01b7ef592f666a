"""fit(): the one training loop, for teacher training and distillation alike.

The training set lives on the device as uint8; a batch is an index slice of a permutation drawn
from (seed, epoch), normalised on the fly. Under torchrun each rank takes its contiguous share of
every GLOBAL batch, so `batch_size` means the same thing for any number of processes.
"""

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rbkd.config import TrainConfig
from rbkd.engine import checkpoint as ckpt
from rbkd.engine import distributed
from rbkd.engine.callbacks import run_callbacks
from rbkd.engine.evaluate import evaluation_sums, logits_of, metrics_from_sums
from rbkd.engine.progress import EpochProgress
from rbkd.engine.rundir import (
    RunDirError,
    read_metrics,
    renamed_losses,
    save_model,
    write_metrics,
)
from rbkd.engine.runinfo import check_resumable, run_config
from rbkd.engine.seeds import derive_seed, make_generator
from rbkd.io import remove_stale_temporaries, write_json
from rbkd.locking import folder_lock
from rbkd.provenance import run_provenance

_ORDER_STREAM, _DROPOUT_STREAM = 0, 1  # seed streams (objectives.py uses 2 for noise)


class TrainingDiverged(ValueError):
    """The loss, the gradients or the weights became NaN or infinite; raised before the
    optimizer applies that step (and before a checkpoint could store it)."""


_last_run_dir: list[Path] = []  # the run folder this process opened last (for the CLI)


def last_run_dir() -> Path | None:
    """The run folder the last `fit` of this process wrote (None before any): the command line
    names it, with the command that resumes it, after Ctrl-C or SIGTERM."""
    return _last_run_dir[-1] if _last_run_dir else None


def _max_abs(tensors: list[Tensor]) -> Tensor:
    """max |x| over all tensors: inf when any holds inf, NaN when any holds NaN, and (unlike a
    sum or a 2-norm) never an overflow of finite values. One foreach pass, no host sync."""
    if not tensors:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(tensors, float("inf"))).max().float()


IGNORE_INDEX = -100  # a label that marks an unlabelled row (kd_loss's ignore_index)


def _ratio(total: float, count: float) -> float:
    """A mean over `count` rows; NaN when there are none (no labelled row: no accuracy)."""
    return total / count if count else math.nan


def _nonfinite_gradients(grads: list[Tensor], device: torch.device) -> Tensor:
    """1.0 when any gradient holds NaN or inf, else 0.0 (a device scalar, no host sync).

    GradScaler's fused check (its `unscale_` with a scale of exactly 1, so the gradients are
    unchanged): one kernel for all tensors, about 6x cheaper than a foreach max-norm on the
    baseline student's 10 parameter tensors (34 vs 221 us per step on the 2-core CPU)."""
    found = torch.zeros(1, device=device)
    if grads:
        try:
            one = torch.ones(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
        except (RuntimeError, NotImplementedError):  # a dtype or device the fused check lacks
            found = (~torch.isfinite(_max_abs(grads))).float().reshape(1).to(device)
    return found[0]


def _weights_finite(model: nn.Module) -> bool:
    params = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
    return bool(torch.isfinite(_max_abs(params)))


class DeviceDataset:
    """`dataset`'s images and labels moved to `device` once (images stay uint8: 4x smaller)."""

    def __init__(self, dataset, device: torch.device):
        self.source, self.name, self.split = dataset, dataset.name, dataset.split
        self.num_classes = dataset.num_classes
        self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)

    def normalize(self, batch: Tensor) -> Tensor:
        return self.source.normalize(batch)

    def __len__(self) -> int:
        return len(self.labels)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused=True: one kernel updates every parameter, where the default on CPU is a dozen small
    # ops per parameter tensor, which dominate a step of the thesis's small students.
    fused = all(p.dtype.is_floating_point for p in model.parameters())
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


def _transfer_set(indices: Tensor | None, n: int) -> Tensor:
    if indices is None:
        return torch.arange(n)
    indices = torch.as_tensor(indices).to(torch.int64).flatten().cpu()
    if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= n:
        raise ValueError(f"indices must be a non-empty set of training-set rows in [0, {n})")
    return indices


def fit(
    model: nn.Module,
    train,
    test,
    cfg: TrainConfig,
    objective,
    *,
    run_dir: Path | None = None,
    indices: Tensor | None = None,
    resume: bool = False,
    progress: bool = True,
    extra_config: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    callbacks: Sequence[Callable[[dict], Any]] = (),
) -> dict:
    """Train `model` (any nn.Module) in place on `train[indices]` against `objective`; evaluate on
    `test` after every epoch (test=None: no evaluation, test metrics NaN); write `run_dir`
    (rank 0). Returns the final metrics (see docs/engine-api.md); `on_epoch(row)` receives each
    epoch's metrics row as it is trained (the public API's history without a run folder), on
    every rank. `callbacks` (rbkd.engine.callbacks) are called on rank 0 alone, after the epoch's
    checkpoint, with the row plus `lr`; one raising StopTraining ends training after that epoch."""
    ctx = distributed.setup(cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    # One writer per run folder (rank 0 writes; the other ranks only read the checkpoint). The
    # kernel drops the lock when the process dies, so a killed run never leaves it stale.
    lock = (
        folder_lock(run_dir, "run")
        if run_dir is not None and ctx.is_main
        else contextlib.nullcontext()
    )
    try:
        # The run reseeds the global RNG (dropout); fork_rng hands the caller's state back after.
        with (
            lock,
            torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []),
        ):
            return _fit(
                model,
                train,
                test,
                cfg,
                objective,
                ctx,
                run_dir,
                indices,
                resume,
                progress,
                extra_config,
                on_epoch,
                list(callbacks),
            )
    finally:
        ctx.close()


def _fit(
    model,
    train,
    test,
    cfg,
    objective,
    ctx,
    run_dir,
    indices,
    resume,
    progress,
    extra_config,
    on_epoch,
    callbacks,
):
    device, world = ctx.device, ctx.world_size
    model.to(device)
    rows = _transfer_set(indices, len(train))
    objective.validate(train, rows)
    objective.to(device)
    data = DeviceDataset(train, device)
    test_data = DeviceDataset(test, device) if test is not None else None
    skip_single_row = _skip_single_row(model, data, len(rows), cfg.batch_size)
    optimizer = make_optimizer(model, cfg)
    config = run_config(model, train, test, cfg, objective, rows, world, extra_config)
    if run_dir is not None and ctx.is_main:  # how it was made; never compared, never in a key
        config["provenance"] = run_provenance(device, model, (train, test))
    start_epoch, history = _open_run_dir(run_dir, resume, config, model, optimizer, ctx)
    if not _weights_finite(model):
        where = f"the checkpoint in {run_dir}" if start_epoch else "the model passed to fit"
        raise TrainingDiverged(
            f"the weights of {where} are NaN or inf before any training step; start from "
            "finite weights (a new run folder, or a checkpoint of a healthy run)"
        )

    objective_name = getattr(objective, "loss_name", "loss")
    synced_bn = distributed.sync_batchnorm(model, ctx)
    net = distributed.wrap_model(model, ctx)
    n, batch = len(rows), cfg.batch_size
    # A last batch of one row cannot train a BatchNorm that would see one value per channel:
    # each epoch skips it (`used` rows of its shuffled order), the same way on every resume.
    used = n - 1 if skip_single_row else n
    steps = math.ceil(used / batch)
    rows = rows.to(device)
    try:
        with EpochProgress(progress, cfg.epochs, main=ctx.is_main) as bar:
            if skip_single_row and start_epoch < cfg.epochs:
                bar.log(
                    f"note: {n} training rows at batch size {batch} leave a last batch of 1 row, "
                    "which the model's BatchNorm cannot train on: each epoch skips it (the last "
                    f"row of the epoch's shuffled order) and trains on {used} rows"
                )
            for epoch in range(start_epoch, cfg.epochs):
                # Everything random in an epoch derives from (seed, epoch): resuming at any epoch,
                # on any number of ranks, replays exactly what an uninterrupted run would do.
                torch.manual_seed(derive_seed(cfg.seed, epoch, _DROPOUT_STREAM, ctx.rank))
                objective.start_epoch(epoch, cfg.seed)
                perm = torch.randperm(n, generator=make_generator(cfg.seed, epoch, _ORDER_STREAM))
                order = rows[perm.to(device)]
                net.train()
                bar.start(epoch, steps)
                t0, seen, loss_sum, correct_sum = time.perf_counter(), 0, 0.0, 0.0
                ce_sum, labelled = 0.0, 0.0
                for step in range(steps):
                    global_rows = order[step * batch : min((step + 1) * batch, used)]
                    count = len(global_rows)  # the last global batch may be short
                    idx = ctx.shard(global_rows)
                    x, y = data.normalize(data.images[idx]), data.labels[idx]
                    logits = logits_of(net(x))
                    loss = objective(logits, y, idx)  # sum over this rank's rows
                    # DDP averages gradients over ranks: scaling the local sum by world / count
                    # makes that average the gradient of the mean over the global batch, exactly
                    # what one process computes for the same batch (short last batch included).
                    optimizer.zero_grad(set_to_none=True)
                    (loss * (world / count)).backward()
                    # The cross-entropy on the hard labels too (a student's objective is the KD
                    # loss): over the labelled rows, as accuracy is.
                    scored = logits.detach().float()
                    correct = (scored.argmax(1) == y).sum()
                    ce = F.cross_entropy(scored, y, ignore_index=IGNORE_INDEX, reduction="sum")
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    bad_grads = _nonfinite_gradients(grads, device)
                    stats = torch.stack([loss.detach().float(), correct.float(), bad_grads,
                                         ce, (y != IGNORE_INDEX).sum().float()])  # fmt: skip
                    # .tolist() syncs with the device once per step: the price of refusing a NaN
                    # step before it reaches the weights (and of an honest progress bar).
                    reduced = ctx.all_reduce_sum(stats).tolist()
                    batch_loss, batch_correct, grad_bad, batch_ce, batch_labelled = reduced
                    # Every rank sees the same reduced values, so every rank stops together.
                    if not math.isfinite(batch_loss) or grad_bad != 0:
                        raise _diverged(
                            model, objective, cfg, epoch, step, steps, start_epoch,
                            batch_loss / count,
                        )  # fmt: skip
                    optimizer.step()
                    seen, loss_sum, correct_sum = (
                        seen + count,
                        loss_sum + batch_loss,
                        correct_sum + batch_correct,
                    )
                    ce_sum, labelled = ce_sum + batch_ce, labelled + batch_labelled
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    bar.step(loss_sum / seen, _ratio(correct_sum, labelled), seen / elapsed)
                train_time = time.perf_counter() - t0
                scores = _evaluate_sharded(model, test_data, cfg, ctx)
                row = {
                    "epoch": epoch + 1,
                    # the objective's loss (a student's: the KD loss, T**2-scaled by default)
                    "train_objective_loss": loss_sum / used,
                    "train_ce_loss": _ratio(ce_sum, labelled),  # on the hard labels
                    "train_accuracy": _ratio(correct_sum, labelled),
                    "test_ce_loss": scores["loss"],
                    "test_accuracy": scores["accuracy"],
                    "per_class_accuracy": scores["per_class_accuracy"],
                    "samples_per_s": used / train_time,
                    "epoch_time_s": train_time,
                }
                history.append(row)
                if on_epoch is not None:
                    on_epoch(dict(row))
                tested = (
                    f"test CE loss {scores['loss']:.4f} acc {scores['accuracy']:.2%}"
                    if test_data is not None
                    else "no test data"
                )
                train_acc = row["train_accuracy"]  # NaN: an unlabelled transfer set
                acc = "" if math.isnan(train_acc) else f" acc {train_acc:.2%}"
                bar.log(
                    f"epoch {epoch + 1}/{cfg.epochs}: train {objective_name} "
                    f"{row['train_objective_loss']:.4f}{acc} | {tested} | "
                    f"{row['samples_per_s']:,.0f} samples/s"
                )
                if not _weights_finite(model):  # an overflowing update: never checkpoint it
                    raise TrainingDiverged(
                        f"the weights became NaN or inf during epoch {epoch + 1} although every "
                        f"gradient was finite (an overflow in the optimizer update, lr={cfg.lr}):"
                        " lower the learning rate; the checkpoint of the previous epoch is kept"
                    )
                if run_dir is not None and ctx.is_main:
                    info = {"seed": cfg.seed, "world_size": world}
                    ckpt.save_checkpoint(
                        run_dir, model, optimizer, epoch + 1, info, config=config, metrics=history
                    )
                    write_metrics(run_dir, history)
                if callbacks and _stop_requested(callbacks, row, optimizer, ctx):
                    break
    finally:
        if synced_bn:
            for name, child in model.named_children():
                setattr(model, name, distributed.revert_sync_batchnorm(child))
    final = _final_metrics(model, test_data, cfg, ctx, history)
    if run_dir is not None and ctx.is_main:
        save_model(run_dir, model)
        write_json(run_dir / "config.json", {**config, "final_metrics": final})
    return final


def _stop_requested(callbacks, row, optimizer, ctx) -> bool:
    """Rank 0 calls the callbacks (after the checkpoint: a callback that raises leaves the epoch
    saved); whether one raised StopTraining, agreed by every rank so that all stop together."""
    stop = 0.0
    if ctx.is_main:
        stop = float(run_callbacks(callbacks, {**row, "lr": optimizer.param_groups[0]["lr"]}))
    if ctx.world_size > 1:
        stop = float(ctx.all_reduce_sum(torch.tensor([stop], device=ctx.device)).item())
    return stop > 0


def _single_value_batchnorm(model: nn.Module, data, row: int) -> bool:
    """Whether a batch of one row would give one of the model's BatchNorm layers (in training
    mode) a single value per channel, which it cannot normalise (BatchNorm1d on [N, C]; a
    BatchNorm2d on images sees H x W values per channel and trains on one row). Found by one
    row through the model in eval mode (no statistics updated, no dropout drawn)."""
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if not norms:
        return False
    seen: list[int] = []

    def record(module, inputs):
        x = inputs[0]
        seen.append(x.numel() // max(x.shape[1], 1) if x.dim() > 1 else x.numel())

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(data.normalize(data.images[row : row + 1]))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return 1 in seen


def _skip_single_row(model: nn.Module, data, n: int, batch: int) -> bool:
    """True when every epoch must skip its last batch of one row (see _single_value_batchnorm);
    a ValueError when every batch would have one row."""
    model.train()  # the mode the epochs train in
    if n == 0 or (n % batch != 1 and batch != 1) or not _single_value_batchnorm(model, data, 0):
        return False
    if batch == 1 or n == 1:
        what = "batch_size is 1" if batch == 1 else "the training set has 1 example"
        raise ValueError(
            f"{what}, but the model's BatchNorm needs at least 2 rows per batch in training "
            "(it sees one value per channel); use batch_size >= 2 and at least 2 examples"
        )
    return True


def _diverged(model, objective, cfg, epoch, step, steps, start_epoch, loss):
    """The one-line TrainingDiverged for a non-finite loss or gradient, naming the likely cause."""
    where = f"at epoch {epoch + 1}, step {step + 1}/{steps}"
    what = f"loss became {loss}" if not math.isfinite(loss) else "gradients became NaN or inf"
    if not _weights_finite(model):
        return TrainingDiverged(
            f"{what} {where} because the weights are already NaN or inf (the previous update "
            f"overflowed, lr={cfg.lr}): lower the learning rate; the last checkpoint is intact"
        )
    first = epoch == start_epoch and step == 0
    target = getattr(objective, "T", None)
    objective_text = f"{objective.name}" + (f", T={target:g}" if target is not None else "")
    if first:  # no update has happened yet: the learning rate cannot be the cause
        return TrainingDiverged(
            f"{what} {where}, before any update ({objective_text}): the inputs or the "
            "objective give a non-finite value; check the data, the soft labels and T"
        )
    return TrainingDiverged(
        f"{what} {where} (lr={cfg.lr}, batch_size={cfg.batch_size}, {objective_text}); the "
        "weights were not updated: lower the learning rate or check the inputs"
    )


def _open_run_dir(run_dir, resume, config, model, optimizer, ctx) -> tuple[int, list[dict]]:
    """(completed epochs, their metrics): from the checkpoint when resuming, else (0, [])."""
    if run_dir is None:
        return 0, []
    start_epoch, history = 0, []
    run_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # under the folder lock: no write of ours is in flight
        remove_stale_temporaries(run_dir)
        _last_run_dir[:] = [run_dir]
    if resume and ckpt.has_checkpoint(run_dir):
        info = ckpt.read_checkpoint_info(run_dir)
        if info.get("config"):
            check_resumable(run_dir, config, info["config"], "in the checkpoint")
        else:  # written by an older rbkd: its configuration is config.json's
            check_resumable(run_dir, config)
            if info.get("seed", config["seed"]) != config["seed"]:
                raise RunDirError(
                    f"cannot resume {run_dir}: its checkpoint was written with seed "
                    f"{info['seed']}, this run has seed {config['seed']}; rerun with the run's "
                    "own options, or start a new run folder"
                )
        started_by = (info.get("config") or {}).get("provenance")
        start_epoch, info = ckpt.load_checkpoint(run_dir, model, optimizer)
        if "provenance" in config and isinstance(started_by, dict):
            # config.json keeps the record of the command that started the run (what `rbkd
            # rerun` repeats); each resume is listed after it, with the epoch it resumed at.
            resume_record = {**config["provenance"], "resumed_at_epoch": start_epoch}
            resumes = [*started_by.get("resumes", []), resume_record]
            config["provenance"] = {**started_by, "resumes": resumes}
        # The metrics of the completed epochs travel in the checkpoint: metrics.jsonl is rebuilt
        # from them, so a kill between the two writes never loses or duplicates a row.
        if "metrics" in info and len(info["metrics"]) == start_epoch:
            history = [renamed_losses(r) for r in info["metrics"]]
        else:
            history = [r for r in read_metrics(run_dir) if r["epoch"] <= start_epoch]
            if [r["epoch"] for r in history] != list(range(1, start_epoch + 1)):
                raise RunDirError(
                    f"cannot resume {run_dir}: metrics.jsonl lacks rows of epochs 1..{start_epoch}"
                    " that its old-format checkpoint completed; start a new run folder"
                )
        if ctx.is_main:
            write_metrics(run_dir, history)
    elif not resume and (ckpt.has_checkpoint(run_dir) or (run_dir / "model.safetensors").exists()):
        raise RunDirError(
            f"{run_dir} already holds a run: pass resume=True (--resume) to continue it, or "
            "choose a new run directory"
        )
    if ctx.is_main:
        write_json(run_dir / "config.json", config)
    return start_epoch, history


def _evaluate_sharded(model, test_data, cfg, ctx) -> dict:
    """Each rank scores its shard of the test set; the summed counts are the full-set result."""
    if test_data is None:  # no test split: nothing to score
        return {"accuracy": math.nan, "per_class_accuracy": [], "loss": math.nan, "count": 0}
    sums = evaluation_sums(
        model,
        test_data,
        device=ctx.device,
        batch_size=cfg.eval_batch_size,
        indices=ctx.shard(torch.arange(len(test_data))),
    )
    return metrics_from_sums(ctx.all_reduce_sum(sums))


def _final_metrics(model, test_data, cfg, ctx, history) -> dict:
    if history:
        last = history[-1]
        test = {
            "loss": last["test_ce_loss"],
            "accuracy": last["test_accuracy"],
            "per_class_accuracy": last["per_class_accuracy"],
        }
    else:  # nothing trained (epochs=0, or resuming a finished run without its metrics)
        test = _evaluate_sharded(model, test_data, cfg, ctx)
    times = [r["epoch_time_s"] for r in history]
    samples = sum(r["samples_per_s"] * r["epoch_time_s"] for r in history)
    return {
        "test_accuracy": test["accuracy"],
        "per_class_accuracy": test["per_class_accuracy"],
        "test_ce_loss": test["loss"],
        "train_objective_loss": history[-1]["train_objective_loss"] if history else math.nan,
        "train_ce_loss": history[-1].get("train_ce_loss", math.nan) if history else math.nan,
        "train_accuracy": history[-1]["train_accuracy"] if history else math.nan,
        "epochs": history[-1]["epoch"] if history else 0,
        "samples_per_s": samples / sum(times) if times else math.nan,
        "train_time_s": sum(times),
    }
