"""Epoch checkpoints: ONE safetensors file, its bookkeeping in the header's metadata.

Tensors: "model.<name>" (state_dict), "optimizer.<param index>.<key>" (exp_avg, step, ...),
"rng.cpu" / "rng.cuda" (generator states as uint8). Metadata "rbkd_checkpoint": JSON with the
epochs completed, the optimizer's param_groups and non-tensor state, the run's configuration
(what a resume must match: data, model, objective, hyper-parameters, seed) and the metrics row of
every completed epoch (so metrics.jsonl can be rebuilt from it). One file written atomically has
no crash window: a reader sees the previous epoch's checkpoint or the new one, whole.

The old two-file layout (checkpoint.safetensors + checkpoint.json) is still read when both agree.
No pickle anywhere: torch.save/torch.load are never used.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rbkd.engine.rundir import RunDirError
from rbkd.io import atomic_path, jsonable, read_json_file, read_safetensors_metadata

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"  # the old layout's second file; removed once replaced
FORMAT = "rbkd-checkpoint-2"
_META_KEY = "rbkd_checkpoint"
MAX_CHECKPOINT_METADATA = 8 << 20  # ~20 KB per 100 epochs of metrics rows in practice


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


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer,
    epoch: int,
    info: dict,
    *,
    config: dict | None = None,
    metrics: list[dict] | None = None,
) -> None:
    """Write the checkpoint atomically; `epoch` is the number of completed epochs. `info` (seed,
    world size, ...), `config` (the run configuration a resume must match) and `metrics` (one
    row per completed epoch) travel in the same file's header."""
    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # safetensors wants contiguous, unshared CPU storage; clone() also detaches from the live model
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {
        "epoch": epoch,
        "optimizer": opt_meta,
        **info,
        "config": config,
        "metrics": metrics if metrics is not None else [],
    }
    text = json.dumps(jsonable(meta), allow_nan=False)
    with atomic_path(run_dir / CHECKPOINT) as tmp:
        save_file(
            tensors,
            str(tmp),
            metadata={"format": FORMAT, "epoch": str(epoch), _META_KEY: text},
        )
    # The old layout's JSON would disagree with the new file from now on.
    (run_dir / CHECKPOINT_JSON).unlink(missing_ok=True)


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).exists()


def read_checkpoint_info(run_dir: Path) -> dict:
    """The checkpoint's bookkeeping (epoch, optimizer, seed, config, metrics) without its
    tensors; RunDirError (one line) when it is unreadable."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    start_over = f"delete {path} to start the run over, or resume from a copy"
    try:
        header = read_safetensors_metadata(path, "checkpoint", max_metadata=MAX_CHECKPOINT_METADATA)
    except (OSError, ValueError) as e:
        raise RunDirError(f"cannot read the checkpoint ({e}); {start_over}") from e
    if header.get("format") == FORMAT and _META_KEY in header:
        try:
            meta = json.loads(header[_META_KEY])
            meta["epoch"] = int(meta["epoch"])
        except (ValueError, KeyError, TypeError) as e:
            raise RunDirError(f"{path} has unreadable bookkeeping ({e}); {start_over}") from e
        return meta
    # rbkd-checkpoint-1: bookkeeping in checkpoint.json, epoch also in the header.
    meta_path = run_dir / CHECKPOINT_JSON
    if not meta_path.exists():
        raise RunDirError(f"{path} carries no rbkd checkpoint metadata; {start_over}")
    try:
        meta = read_json_file(meta_path, "checkpoint bookkeeping")
        file_epoch = int(header.get("epoch", -1))
    except (OSError, ValueError) as e:
        raise RunDirError(f"cannot read {meta_path} ({e}); {start_over}") from e
    if not isinstance(meta, dict) or meta.get("epoch") != file_epoch:
        raise RunDirError(
            f"{path} holds epoch {file_epoch} but {meta_path} disagrees (an old rbkd was "
            f"interrupted while writing them); {start_over}"
        )
    return meta


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer) -> tuple[int, dict]:
    """Restore model, optimizer and RNG in place; returns (completed epochs, bookkeeping)."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    meta = read_checkpoint_info(run_dir)
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as e:
        raise RunDirError(
            f"cannot read the checkpoint {path} ({e}); delete it to start the run over, or "
            "resume from a copy"
        ) from e
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
