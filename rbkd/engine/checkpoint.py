"""Epoch checkpoints: a flat dict of tensors (checkpoint.safetensors) plus JSON (checkpoint.json).

Tensors: "model.<name>" (state_dict), "optimizer.<param index>.<key>" (exp_avg, step, ...),
"rng.cpu" / "rng.cuda" (generator states as uint8). JSON: the epoch just completed, the optimizer's
param_groups and any non-tensor state. The epoch is also written into the safetensors metadata so
that a crash between the two writes cannot pair epoch-k weights with epoch-(k+1) bookkeeping.
No pickle anywhere: torch.save/torch.load are never used.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rbkd.engine.rundir import RunDirError
from rbkd.io import atomic_path, write_json

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, extra = {}, {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                extra.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": extra}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta["state"].items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, epoch: int, info: dict) -> None:
    """Write both files atomically; `epoch` is the number of completed epochs."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # safetensors wants contiguous, unshared CPU storage; clone() also detaches from the live model
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(run_dir / CHECKPOINT) as tmp:
        save_file(tensors, str(tmp), metadata={"epoch": str(epoch), "format": "rbkd-checkpoint-1"})
    write_json(run_dir / CHECKPOINT_JSON, {"epoch": epoch, "optimizer": opt_meta, **info})


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_JSON).exists() and (run_dir / CHECKPOINT).exists()


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer) -> tuple[int, dict]:
    """Restore model, optimizer and RNG in place; returns (completed epochs, checkpoint.json)."""
    path, meta_path = run_dir / CHECKPOINT, run_dir / CHECKPOINT_JSON
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            file_epoch = int((f.metadata() or {}).get("epoch", -1))
    except (OSError, ValueError, SafetensorError) as e:
        raise RunDirError(
            f"cannot read the checkpoint in {run_dir} ({e}); delete {CHECKPOINT} and "
            f"{CHECKPOINT_JSON} to start over, or resume from a copy"
        ) from e
    if file_epoch != meta["epoch"]:
        raise RunDirError(
            f"{path} holds epoch {file_epoch} but {meta_path} says {meta['epoch']} (interrupted "
            "while writing?); delete both checkpoint files to start the run over"
        )
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise RunDirError(f"{path} does not fit this model: {e}") from e
    optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["epoch"]), meta
